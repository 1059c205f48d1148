"""A finished run's checkpoint, read back: which tag, its config, its fp32 weights, the HF model.

Shared by `disco-clip export` (trainer/interop/hf_export.py) and `disco-clip eval`
(trainer/eval/command.py). A path may be a run dir, its checkpoints/ dir (newest complete tag)
or one complete tag dir.

Every file of the checkpoint is checked against its MANIFEST.json (size, sha256) first: a
damaged tag dir given by name is refused with one line naming the file; given a run dir, the
newest intact checkpoint is taken and the damaged newer ones are named on stderr. Checkpoints
from before manifests are read with a warning.

Trust boundary (docs/trust.md): DeepSpeed's checkpoint files are pickles holding a few of
DeepSpeed's own classes beside tensors. They are read here with weights_only=True and only those
classes allowed (not with DeepSpeed's merger, zero_to_fp32, which unpickles them in full), so a
file that would run code is refused with one line, and export and eval never execute it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.checkpoint import COMPLETE, complete_tags, damaged_note, unverified_note, verify


class InteropError(ValueError):
    """A bad --checkpoint / --model / --out: the message is one line saying what to do."""


@dataclass(frozen=True)
class CheckpointRef:
    run_dir: Path  # holds config.yaml and metrics.jsonl
    ckpt_dir: Path  # RUN/checkpoints
    tag: str  # step_XXXXXXXX

    @property
    def step(self) -> int:
        return int(self.tag.split("_")[1])


def warn(line: str) -> None:
    print(f"disco-clip: warning: {line}", file=sys.stderr, flush=True)


def resolve_checkpoint(path: str | Path) -> CheckpointRef:
    """A run dir, its checkpoints/ dir (newest intact complete tag) or one complete tag dir,
    verified against its manifest (module doc)."""
    path = Path(path)
    if (path / COMPLETE).is_file():
        verdict = verify(path)
        if verdict.status == "damaged":
            raise InteropError(
                f"--checkpoint: checkpoint {path.name} is damaged ({verdict.detail}); refusing "
                "to read it: pass another checkpoint, or the run dir to take its newest intact one"
            )
        if verdict.status == "unverified":
            warn(unverified_note(path.name))
        return CheckpointRef(path.parent.parent, path.parent, path.name)
    ckpt_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    tags = complete_tags(ckpt_dir)
    if not tags:
        raise InteropError(
            f"--checkpoint: {path} holds no complete checkpoint; pass a run dir, its "
            "checkpoints/ dir or a checkpoints/step_XXXXXXXX dir with a COMPLETE marker"
        )
    if not (ckpt_dir.parent / "config.yaml").is_file():
        raise InteropError(
            f"--checkpoint: {ckpt_dir.parent} has no config.yaml; is this a run dir?"
        )
    damaged: list[tuple[str, str]] = []
    for tag in reversed(tags):
        verdict = verify(ckpt_dir / tag)
        if verdict.status == "damaged":
            damaged.append((tag, verdict.detail))
            continue
        if damaged:
            warn(damaged_note(damaged, tag, verb="reading"))
        if verdict.status == "unverified":
            warn(unverified_note(tag))
        return CheckpointRef(ckpt_dir.parent, ckpt_dir, tag)
    said = "; ".join(f"{tag}: {detail}" for tag, detail in damaged)
    raise InteropError(f"--checkpoint: no intact checkpoint in {ckpt_dir} (damaged: {said})")


def load_run_config(run_dir: Path):
    """The run's resolved config, without validation (data paths may be gone by now)."""
    from trainer.config import Config
    from trainer.config_io import build_dataclass, read_yaml

    return build_dataclass(Config, read_yaml(run_dir / "config.yaml"))


def _read_deepspeed(path: Path) -> dict:
    """One DeepSpeed checkpoint file, without running code from it (docs/trust.md)."""
    from trainer.checkpoint import CheckpointError, load_deepspeed_file

    try:
        return load_deepspeed_file(
            path,
            problem="holds more than tensors and DeepSpeed's own records, or is not a checkpoint",
            refusal="refusing to unpickle it",
        )
    except CheckpointError as err:
        raise InteropError(f"--checkpoint: {err}") from None


def _frozen_zero3(tag_dir: Path) -> dict[str, torch.Tensor]:
    """ZeRO-3 parameters outside the optimizer (locked towers): each rank's file holds its
    fragment; the whole tensor is their concatenation, cut to size."""
    files = sorted(tag_dir.glob("zero_pp_rank_*_mp_rank_00_model_states.pt"),
                   key=lambda f: int(f.name.split("_")[3]))  # fmt: skip
    blobs = [_read_deepspeed(f) for f in files]
    shapes = blobs[0].get("frozen_param_shapes") or {}
    out = {}
    for name, shape in shapes.items():
        parts = torch.cat([b["frozen_param_fragments"][name].reshape(-1) for b in blobs])
        out[name] = parts[: torch.Size(shape).numel()].reshape(shape)
    return out


def fp32_state_dict(ref: CheckpointRef) -> dict[str, torch.Tensor]:
    """fp32 weights of any ZeRO stage, read without unpickling anything but tensors and plain
    records: ZeRO-1/2/3 from the fp32 master partitions (trainer.checkpoint.ZeroCheckpoint, the
    reader of the elastic resume), parameters outside the optimizer (locked towers) from the
    model-states files, stage 0 from its model-states file."""
    from trainer.checkpoint import CheckpointError, ZeroCheckpoint

    tag_dir = ref.ckpt_dir / ref.tag
    model_file = tag_dir / "mp_rank_00_model_states.pt"
    if any(tag_dir.glob("*optim_states.pt")):  # ZeRO 1/2/3: partitioned fp32 master weights
        for path in sorted(tag_dir.glob("*.pt")):  # one clear line for a file that is refused
            _read_deepspeed(path)
        try:
            zero = ZeroCheckpoint(tag_dir)
        except CheckpointError as err:
            raise InteropError(f"--checkpoint: {err}") from None
        state = {name: zero.full(name, "fp32") for name in zero.shapes}
        if zero.stage <= 2:  # the model-states file holds every parameter whole (16-bit)
            module = _read_deepspeed(model_file)["module"]
            state.update({k: v for k, v in module.items() if k not in state})
        else:
            state.update(_frozen_zero3(tag_dir))
    else:  # stage 0: the whole module is in the model-states file
        state = _read_deepspeed(model_file)["module"]
    return {k: v.detach().float().clone() for k, v in state.items()}


def build_hf_model(ref: CheckpointRef):
    """(plain CLIPModel with the checkpoint's fp32 weights, tokenizer, run config)."""
    from transformers import CLIPModel

    from data.tokenizer import load_tokenizer
    from trainer.build import token_ids
    from trainer.model import build_clip_config

    cfg = load_run_config(ref.run_dir)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    config = build_clip_config(cfg.model, token_ids(tokenizer), cfg.data.context_length)
    state = fp32_state_dict(ref)
    state["logit_scale"] = state["logit_scale"].reshape(())  # [1] in training, 0-dim in HF
    bias = state.pop("logit_bias", None)
    if bias is not None:
        config.logit_bias = float(bias.reshape(()))
        config.disco_clip_loss = cfg.loss.name
    model = CLIPModel(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Non-persistent buffers (position ids) are rebuilt by the constructor; nothing else may
    # be missing.
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise InteropError(f"checkpoint does not match the run's model: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}")  # fmt: skip
    tokenizer.model_max_length = cfg.data.context_length
    return model.eval(), tokenizer, cfg


def logged_eval(run_dir: Path, step: int) -> dict | None:
    """The eval record logged at `step` (or the last one before it), if any."""
    from trainer.metrics import read_metrics

    records = [r for r in read_metrics(run_dir, "eval") if r["step"] <= step]
    return records[-1] if records else None
