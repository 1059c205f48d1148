"""Elastic resume (docs/elastic_resume.md): an N-rank ZeRO checkpoint read parameter by
parameter and written into an M-rank engine."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from trainer.checkpoint.layout import (
    CheckpointError,
)
from trainer.checkpoint.settings import (
    HYPERPARAMS,
)

# ---- elastic resume: an N-rank ZeRO checkpoint into an M-rank engine ------------------------

OPTIM_RE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
STATE_KEYS = ("fp32", "exp_avg", "exp_avg_sq")


def _optim_files(tag_dir: Path) -> list[Path]:
    """DeepSpeed's per-rank optimizer files, in rank order ([] at ZeRO-0)."""
    found = [(int(m.group(1)), p) for p in tag_dir.iterdir() if (m := OPTIM_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def deepspeed_safe_globals() -> list:
    """The non-tensor objects in DeepSpeed's optimizer files (0.19.8): the loss scaler, the
    ZeRO stage enum and the parameter slice mappings' fragment addresses. Allowing exactly
    these lets weights_only=True read them; anything else in a file is refused."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_deepspeed_file(
    path: Path,
    *,
    problem: str = "cannot be read for an elastic resume",
    refusal: str = "resume on the number of ranks that wrote it",
) -> dict:
    """One of DeepSpeed's checkpoint files, memory-mapped (tensors are read when touched),
    with weights_only=True and only `deepspeed_safe_globals` allowed; anything else is a
    one-line CheckpointError: the path, `problem`, the cause, `refusal` (what to do)."""
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: {problem} ({first}); {refusal}") from None


class _Flat:
    """A virtual concatenation of 1-D tensors, sliced without building the whole."""

    def __init__(self, parts: list[torch.Tensor]):
        self.parts = [p.reshape(-1) for p in parts]
        self.starts = [0]
        for part in self.parts:
            self.starts.append(self.starts[-1] + part.numel())

    @property
    def numel(self) -> int:
        return self.starts[-1]

    def slice(self, start: int, length: int) -> torch.Tensor:
        pieces, end = [], start + length
        for part, lo, hi in zip(self.parts, self.starts[:-1], self.starts[1:], strict=True):
            if hi > start and lo < end:
                pieces.append(part[max(start, lo) - lo : min(end, hi) - lo])
        out = torch.cat(pieces) if pieces else torch.empty(0)
        if out.numel() != length:
            raise CheckpointError(
                f"elastic resume: wanted {length} values at {start}, found {out.numel()}"
            )
        return out.float()


class ZeroCheckpoint:
    """The fp32 master weights and Adam moments of every parameter of an N-rank ZeRO-1/2/3
    checkpoint, read from its files (weights_only=True, memory-mapped: a parameter's values
    are read when it is asked for).

    Layouts (DeepSpeed 0.19.8; the same ones deepspeed.utils.zero_to_fp32 merges):
    - ZeRO-1/2: per param group, one flat vector (parameters in `param_shapes` order, each
      followed by its alignment padding) cut into N consecutive partitions; a rank's file
      holds its partition of the fp32 master weights without the group's tail padding
      (`single_partition_of_fp32_groups`) and the torch optimizer state of that partition with
      it (`base_optimizer_state`, padding length in `group_paddings`).
    - ZeRO-3: every parameter is cut into N equal pieces of ceil(numel/N) (the last one padded);
      rank r's flat groups hold piece r of each parameter in order (`fp32_flat_groups`, and the
      optimizer state of the same shape).
    """

    def __init__(self, tag_dir: Path):
        tag_dir = Path(tag_dir)
        files = _optim_files(tag_dir)
        if not files:
            raise CheckpointError(f"{tag_dir}: no ZeRO optimizer files (*_optim_states.pt)")
        self.world_size = len(files)
        states = [load_deepspeed_file(f)["optimizer_state_dict"] for f in files]
        if "zero_stage" not in states[0]:
            raise CheckpointError(
                f"{files[0]}: not a ZeRO-1/2/3 optimizer file; elastic resume supports ZeRO "
                "stages 1-3 (resume on the number of ranks that wrote it)"
            )
        self.stage = int(states[0]["zero_stage"])
        counts = states[0]["partition_count"]
        count = max(counts) if isinstance(counts, list) else int(counts)
        if count != self.world_size:
            raise CheckpointError(
                f"{tag_dir}: {self.world_size} optimizer files but written by {count} ranks; the "
                "checkpoint is incomplete"
            )
        model_name = (
            "zero_pp_rank_0_mp_rank_00_model_states.pt"
            if self.stage == 3
            else "mp_rank_00_model_states.pt"
        )
        model = load_deepspeed_file(tag_dir / model_name)
        self.param_shapes: list[dict[str, torch.Size]] = list(model["param_shapes"])
        self.lr_scheduler: dict | None = model.get("lr_scheduler")
        self.counters = {
            k: model.get(k, 0) for k in ("global_steps", "global_samples", "skipped_steps")
        }
        self.global_state = states[0]  # loss scaler, clip, version: the same on every rank
        self.shapes = {
            name: torch.Size(s) for group in self.param_shapes for name, s in group.items()
        }
        if self.stage <= 2:
            self._init_zero12(states)
        else:
            self._init_zero3(states)

    def _init_zero12(self, states: list[dict]) -> None:
        groups = len(self.param_shapes)
        rigid = isinstance(states[0]["base_optimizer_state"], dict)
        parts: dict[str, list[list[torch.Tensor]]] = {
            k: [[] for _ in range(groups)] for k in STATE_KEYS
        }
        for sd in states:
            fp32 = sd["single_partition_of_fp32_groups"]
            base = sd["base_optimizer_state"]
            for i in range(groups):
                parts["fp32"][i].append(fp32[i].reshape(-1))
                state = base["state"][i] if rigid else base[i]
                keep = fp32[i].numel()  # the partition without its share of the tail padding
                for key in ("exp_avg", "exp_avg_sq"):
                    parts[key][i].append(state[key].reshape(-1)[:keep])
        base0 = states[0]["base_optimizer_state"]
        first = base0["state"][0] if rigid else base0[0]
        self.step = first.get("step", states[0].get("base_optimizer_state_step"))
        self.param_groups = base0.get("param_groups") if rigid else None
        self._flats = {k: [_Flat(p) for p in parts[k]] for k in STATE_KEYS}
        paddings = states[0].get("param_alignment_paddings")
        self._where: dict[str, tuple[int, int]] = {}
        for i, shapes in enumerate(self.param_shapes):
            offset = 0
            for j, (name, shape) in enumerate(shapes.items()):
                self._where[name] = (i, offset)
                offset += torch.Size(shape).numel() + (paddings[i][j] if paddings else 0)
            if offset > self._flats["fp32"][i].numel:
                raise CheckpointError(f"elastic resume: param group {i} is shorter than its shapes")

    def _init_zero3(self, states: list[dict]) -> None:
        self._flats = {
            "fp32": [_Flat(list(sd["fp32_flat_groups"])) for sd in states],
            **{
                key: [
                    _Flat([sd["optimizer_state_dict"]["state"][i][key]
                           for i in range(len(sd["fp32_flat_groups"]))])
                    for sd in states
                ]
                for key in ("exp_avg", "exp_avg_sq")
            },
        }  # fmt: skip
        opt0 = states[0]["optimizer_state_dict"]
        self.step = opt0["state"][0].get("step")
        self.param_groups = opt0.get("param_groups")
        self._where = {}
        offset = 0
        for name, shape in self.shapes.items():
            self._where[name] = (-1, offset)
            offset += -(-shape.numel() // self.world_size)  # ceil: each rank's piece
        if offset != self._flats["fp32"][0].numel:
            raise CheckpointError(
                f"elastic resume: ZeRO-3 partitions hold {self._flats['fp32'][0].numel} values "
                f"per rank, the shapes need {offset}"
            )

    def full(self, name: str, key: str) -> torch.Tensor:
        """The whole fp32 tensor of `key` ("fp32", "exp_avg", "exp_avg_sq") of parameter
        `name`, in its shape."""
        shape = self.shapes[name]
        numel = shape.numel()
        group, offset = self._where[name]
        if self.stage <= 2:
            return self._flats[key][group].slice(offset, numel).view(shape)
        piece = -(-numel // self.world_size)
        pieces = [flat.slice(offset, piece) for flat in self._flats[key]]
        return torch.cat(pieces)[:numel].view(shape)

    def settings(self) -> dict:
        """The checkpoint's settings in `run_settings` form (for the "what changed" line)."""
        lambdas, base_lrs = [SimpleNamespace()], [None]
        if self.lr_scheduler:
            lambdas = [
                SimpleNamespace(**(fn or {})) for fn in self.lr_scheduler.get("lr_lambdas", [{}])
            ]
            base_lrs = list(self.lr_scheduler.get("base_lrs", [None]))
        groups = [{k: g[k] for k in HYPERPARAMS if k in g} for g in (self.param_groups or [])]
        clip = self.global_state.get("clip_grad")
        return {"lambdas": lambdas, "base_lrs": base_lrs, "groups": groups, "clip_grad": clip}


def _flat_partitions(optimizer, stage: int) -> list[tuple[torch.Tensor, dict]]:
    """(flat fp32 partition, its torch param group) pairs the Adam state belongs to. ZeRO-3
    hands the base optimizer one sub-group at a time (stage3._optimizer_step), so its flats
    are not in the param groups between steps."""
    base = optimizer.optimizer
    if stage == 3:
        flats = optimizer.fp32_partitioned_groups_flat
        groups = [base.param_groups[optimizer.sub_group_to_group_id[i]] for i in range(len(flats))]
        return list(zip(flats, groups, strict=True))
    return [(p, group) for group in base.param_groups for p in group["params"]]


def _ensure_optimizer_state(optimizer, stage: int, saved_step: Any) -> None:
    """Adam state for every flat partition of a fresh engine (torch creates it lazily at the
    first step), with the saved step count in the saved form (a tensor for torch's AdamW,
    on the parameter's device when fused or capturable, as torch itself puts it)."""
    state_of = optimizer.optimizer.state
    for flat, group in _flat_partitions(optimizer, stage):
        on_device = bool(group.get("fused") or group.get("capturable"))
        state = state_of[flat]
        if torch.is_tensor(saved_step):
            state["step"] = saved_step.detach().clone().to(flat.device if on_device else "cpu")
        else:
            state["step"] = copy.copy(saved_step)
            if saved_step is not None and "step" in group:
                group["step"] = saved_step  # optimizers that count per group (FusedAdam)
        for key in ("exp_avg", "exp_avg_sq"):
            if key not in state:
                state[key] = torch.zeros_like(flat, memory_format=torch.preserve_format)


def _zero3_piece(full: torch.Tensor, param, optimizer) -> torch.Tensor:
    """This rank's ZeRO-3 partition of `full`: piece r of ceil(numel/M), zero-padded."""
    n = param.ds_tensor.numel()
    rank = optimizer._get_param_partition_rank(param)
    flat = full.reshape(-1)
    piece = flat[rank * n : (rank + 1) * n]
    if piece.numel() < n:
        piece = torch.cat([piece, flat.new_zeros(n - piece.numel())])
    return piece


def load_elastic(engine, tag_dir: Path) -> dict:
    """Load an N-rank ZeRO-1/2/3 checkpoint into this M-rank engine; returns the checkpoint's
    settings (`run_settings` form).

    Chosen over DeepSpeed's universal checkpoint (ds_to_universal + "load_universal"): that
    needs an offline conversion pass writing a second, per-parameter copy of the checkpoint,
    and a DeepSpeed config flag that must be set before the engine exists, i.e. before we know
    whether the world size changed. Here the ranks read the N-rank files directly
    (`ZeroCheckpoint`, memory-mapped, weights_only=True) and each writes only its own
    partition through DeepSpeed's tensor-fragment API: safe_set_full_fp32_param /
    safe_set_full_optimizer_state at ZeRO-1/2, the safe_set_local_* forms at ZeRO-3 (whose
    full-tensor setter indexes past the end of a parameter whose size M does not divide).
    Then the 16/32-bit model weights are refreshed from the fp32 master weights, and the step
    count, loss scaler and engine counters are restored."""
    from deepspeed.utils import (
        safe_set_full_fp32_param,
        safe_set_full_optimizer_state,
        safe_set_local_fp32_param,
        safe_set_local_optimizer_state,
    )

    saved = ZeroCheckpoint(tag_dir)
    stage = engine.zero_optimization_stage()
    if stage not in (1, 2, 3):
        raise CheckpointError(
            f"{tag_dir} was written by {saved.world_size} ranks at ZeRO-{saved.stage}; this run "
            f"is ZeRO-{stage}: elastic resume needs ZeRO-1, 2 or 3 on both sides"
        )
    optimizer = engine.optimizer
    _ensure_optimizer_state(optimizer, stage, saved.step)
    if stage == 3:
        optimizer.checkpoint_event_prologue()  # every parameter partitioned
    else:
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()  # fragments -> the new Adam state
    missing = [
        n for n, p in engine.module.named_parameters() if p.requires_grad and n not in saved.shapes
    ]
    if missing:
        raise CheckpointError(f"{tag_dir} lacks parameters of this model: {missing[:3]}")
    for name, param in engine.module.named_parameters():
        if not param.requires_grad:
            continue
        for key in STATE_KEYS:
            value = saved.full(name, key).to(engine.device)
            if stage == 3:
                piece = _zero3_piece(value, param, optimizer)
                if key == "fp32":
                    safe_set_local_fp32_param(param, piece)
                else:
                    safe_set_local_optimizer_state(param, piece, key)
            elif key == "fp32":
                safe_set_full_fp32_param(param, value)
            else:
                safe_set_full_optimizer_state(param, value, key)
    if stage == 3:
        with torch.no_grad():
            for i, fp32 in enumerate(optimizer.fp32_partitioned_groups_flat):
                if fp32.numel():
                    optimizer.fp16_partitioned_groups_flat[i].data.copy_(fp32.data)
        optimizer._load_global_state_stage3(saved.global_state)
        optimizer.checkpoint_event_epilogue()  # persistent parameters gathered again
    else:
        optimizer.update_lp_params()  # 16/32-bit model weights from the fp32 partitions
        optimizer._load_global_state(saved.global_state)
    for key, value in saved.counters.items():
        setattr(engine, key, value)
    if saved.lr_scheduler:
        engine.lr_scheduler.load_state_dict(saved.lr_scheduler)
    return saved.settings()
