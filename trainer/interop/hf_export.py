"""Checkpoint → Hugging Face directory: `disco-clip export --checkpoint RUN_OR_CKPT --out DIR`.

Any ZeRO stage's DeepSpeed checkpoint is merged into fp32 weights and saved as a plain
CLIPModel (config.json + model.safetensors), with the run's tokenizer, a CLIPImageProcessor
matching the training eval transform (data/transforms.eval_transform) and a README model card
holding the training config and the eval numbers logged at that step. The result loads with
`CLIPModel` / `CLIPProcessor.from_pretrained` and `pipeline("zero-shot-image-classification")`
with nothing from this project installed.

SigLIP runs: CLIPModel has no `logit_bias`, so its value goes into config.json as the extra
attribute `logit_bias` (plus `disco_clip_loss: "siglip"`), and the card says how to use it.
Rankings (zero-shot argmax, retrieval) do not depend on it.

Trust boundary: DeepSpeed's checkpoint files are pickles holding more than tensors, and
DeepSpeed's own merger (zero_to_fp32) unpickles them with weights_only=False. Export and
eval therefore execute whatever a checkpoint file contains: point them only at checkpoints
your own training runs wrote. Exported directories hold safetensors only (no pickle).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.checkpoint import COMPLETE, complete_tags

EXIT_USAGE = 2


class ExportError(ValueError):
    """A bad --checkpoint / --out: the message is one line saying what to do."""


@dataclass(frozen=True)
class CheckpointRef:
    run_dir: Path  # holds config.yaml and metrics.jsonl
    ckpt_dir: Path  # RUN/checkpoints
    tag: str  # step_XXXXXXXX

    @property
    def step(self) -> int:
        return int(self.tag.split("_")[1])


def resolve_checkpoint(path: str | Path) -> CheckpointRef:
    """A run dir, its checkpoints/ dir (newest complete tag) or one complete tag dir."""
    path = Path(path)
    if (path / COMPLETE).is_file():
        return CheckpointRef(path.parent.parent, path.parent, path.name)
    ckpt_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    tags = complete_tags(ckpt_dir)
    if not tags:
        raise ExportError(
            f"--checkpoint: {path} holds no complete checkpoint; pass a run dir, its "
            "checkpoints/ dir or a checkpoints/step_XXXXXXXX dir with a COMPLETE marker"
        )
    ref = CheckpointRef(ckpt_dir.parent, ckpt_dir, tags[-1])
    if not (ref.run_dir / "config.yaml").is_file():
        raise ExportError(f"--checkpoint: {ref.run_dir} has no config.yaml; is this a run dir?")
    return ref


def load_run_config(run_dir: Path):
    """The run's resolved config, without validation (data paths may be gone by now)."""
    from trainer.config import Config
    from trainer.config_io import build_dataclass, read_yaml

    return build_dataclass(Config, read_yaml(run_dir / "config.yaml"))


def fp32_state_dict(ref: CheckpointRef) -> dict[str, torch.Tensor]:
    """fp32 weights of any ZeRO stage (see the module doc for the trust boundary)."""
    tag_dir = ref.ckpt_dir / ref.tag
    if any(tag_dir.glob("*optim_states.pt")):  # ZeRO 1/2/3: partitioned fp32 master weights
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # DeepSpeed reports progress on stdout; keep stdout for our own results (eval prints
        # metrics there).
        with contextlib.redirect_stdout(sys.stderr):
            state = get_fp32_state_dict_from_zero_checkpoint(str(ref.ckpt_dir), tag=ref.tag)
    else:  # stage 0: the whole module is in the model-states file
        blob = torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=False)
        state = blob["module"]
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
        raise ExportError(f"checkpoint does not match the run's model: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}")  # fmt: skip
    tokenizer.model_max_length = cfg.data.context_length
    return model.eval(), tokenizer, cfg


def image_processor(size: int):
    """The CLIPImageProcessor equal to data.transforms.eval_transform(size)."""
    from transformers import CLIPImageProcessor

    from data.transforms import CLIP_MEAN, CLIP_STD

    return CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": size}, resample=3,  # PIL bicubic
        do_center_crop=True, crop_size={"height": size, "width": size},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_convert_rgb=True,
    )  # fmt: skip


def logged_eval(run_dir: Path, step: int) -> dict | None:
    """The eval record logged at `step` (or the last one before it), if any."""
    from trainer.metrics import read_metrics

    records = [r for r in read_metrics(run_dir, "eval") if r["step"] <= step]
    return records[-1] if records else None


def model_card(ref: CheckpointRef, cfg, evals: dict | None, bias: float | None) -> str:
    from trainer.config_io import dump_yaml

    lines = [
        "---", "library_name: transformers", "pipeline_tag: zero-shot-image-classification",
        "tags: [clip, disco-clip]", "---", "", "# CLIP trained with disco-clip", "",
        f"Exported from `{ref.ckpt_dir / ref.tag}` (step {ref.step}) of run `{ref.run_dir}`: "
        f"fp32 weights merged from the DeepSpeed checkpoint, loss `{cfg.loss.name}`.", "",
        "## Evaluation", "",
    ]  # fmt: skip
    if evals:
        lines += [f"Logged by the trainer at step {evals['step']}:", "", "| metric | value |",
                  "|---|---|"]  # fmt: skip
        lines += [f"| {k} | {v:.4f} |" for k, v in evals.items() if k not in ("kind", "step")]
        lines += ["", f"Templates: `{cfg.eval.templates}`; zero-shot set: "
                  f"`{cfg.eval.zeroshot_dir}`; retrieval pairs: `{cfg.eval.retrieval_shards}`."]  # fmt: skip
    else:
        lines += ["No evaluation was logged for this checkpoint (eval.every was 0)."]
    if bias is not None:
        lines += ["", "## SigLIP bias", "",
                  f"Trained with a sigmoid loss: `config.logit_bias` = {bias:.6f}. Pair "
                  "probability = sigmoid(exp(logit_scale) * cos + logit_bias). The HF pipeline "
                  "applies a softmax and ignores the bias; rankings are unaffected."]  # fmt: skip
    lines += ["", "## Usage", "", "```python", "from transformers import pipeline", "",
              'clf = pipeline("zero-shot-image-classification", model="THIS_DIR")',
              'clf("image.jpg", candidate_labels=["red circle", "blue square"],',
              '    hypothesis_template="a photo of a {}.")', "```", "",
              "## Training config", "", "```yaml", dump_yaml(cfg).rstrip(), "```", ""]  # fmt: skip
    return "\n".join(lines)


def check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out: {out} is a file; choose a directory path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"--out: {out} is not empty; pass --force to replace it")


def export(checkpoint: str | Path, out: str | Path, *, force: bool = False) -> Path:
    """Write the HF directory to a temporary sibling, then rename it to `out`."""
    from transformers import CLIPProcessor

    out = Path(out)
    ref = resolve_checkpoint(checkpoint)
    check_out(out, force)
    model, tokenizer, cfg = build_hf_model(ref)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        processor = image_processor(model.config.vision_config.image_size)
        processor.save_pretrained(tmp)  # preprocessor_config.json, for older readers
        CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(tmp)
        bias = getattr(model.config, "logit_bias", None)
        card = model_card(ref, cfg, logged_eval(ref.run_dir, ref.step), bias)
        (tmp / "README.md").write_text(card)
        (tmp / "disco_clip.json").write_text(json.dumps(
            {"checkpoint": str(ref.ckpt_dir / ref.tag), "step": ref.step}, indent=1) + "\n")  # fmt: skip
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export", help="checkpoint (any ZeRO stage) -> Hugging Face CLIP directory"
    )
    parser.add_argument("--checkpoint", required=True,
                        help="run dir, RUN/checkpoints, or RUN/checkpoints/step_XXXXXXXX")  # fmt: skip
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        out = export(args.checkpoint, args.out, force=args.force)
    except (ExportError, FileNotFoundError) as err:
        print(f"disco-clip export: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    print(f"exported {out}")
    return 0
