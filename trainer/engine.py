"""DeepSpeed: config merge ("auto" values from the run config), parameter groups, LR schedule.

The ZeRO stage files in ds_configs/ are standard DeepSpeed JSON. Values we own (batch sizes,
learning rate, clipping, precision) are written "auto" there and filled from the run config
here; a concrete value in the JSON that disagrees with the run config is an error rather than
a silent winner.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from trainer import cpu_quirks
from trainer.model import SCALAR_PARAMS

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class OptimConfig:
    lr: float = 1e-3
    """Peak learning rate (AdamW), reached after warmup."""
    weight_decay: float = 0.1
    """Decoupled weight decay; never applied to biases, norms, logit_scale/logit_bias."""
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    grad_clip: float = 0.0
    """Global gradient-norm clip; 0 = off. Always passed to DeepSpeed explicitly, since
    DeepSpeed otherwise clips at 1.0."""

    def validate(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be in [0, 1), got {list(self.betas)}")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0 = off), got {self.grad_clip}")


@dataclass
class ScheduleConfig:
    warmup_steps: int = 0
    """Linear warmup from 0 to optim.lr over this many steps."""
    min_lr_ratio: float = 0.0
    """Cosine decay ends at optim.lr × min_lr_ratio at train.steps."""

    def validate(self) -> None:
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class DeepSpeedConfig:
    config: str = "ds_configs/zero2.json"
    """DeepSpeed JSON (ZeRO stage etc.); relative paths are tried from the working directory,
    then from the repository root."""

    def resolved_path(self) -> Path:
        path = Path(self.config)
        if not path.is_absolute() and not path.exists():
            path = PACKAGE_ROOT / path
        return path

    def validate(self) -> None:
        path = self.resolved_path()
        if not path.is_file():
            raise ValueError(
                f"config: {self.config} not found; use one of ds_configs/zero0.json … zero3.json"
            )
        try:
            json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(
                f"config: {path} is not valid JSON ({err.msg}, line {err.lineno})"
            ) from None

    def load(self) -> dict:
        return json.loads(self.resolved_path().read_text())


class WarmupCosine:
    """LR multiplier: linear warmup, then cosine to `min_ratio` at `total_steps`.

    A class (not a lambda) so LambdaLR's state_dict can carry it through checkpoints.
    """

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float):
        self.warmup_steps, self.total_steps, self.min_ratio = warmup_steps, total_steps, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _fill_auto(node: Any, values: dict[str, Any], path: str = "") -> Any:
    """Replace "auto" leaves by `values[dotted path]`; check concrete leaves against them."""
    if isinstance(node, dict):
        return {k: _fill_auto(v, values, f"{path}.{k}" if path else k) for k, v in node.items()}
    if path not in values:
        if node == "auto":
            raise ValueError(
                f"deepspeed.config: {path} is 'auto' but the trainer has no value for it"
            )
        return node
    if node != "auto" and node != values[path]:
        raise ValueError(
            f"deepspeed.config: {path} is {node!r} in the JSON but the run config says "
            f'{values[path]!r}; set it to "auto" or change the run config'
        )
    return values[path]


def build_deepspeed_config(
    template: dict,
    *,
    global_batch_size: int,
    world_size: int,
    precision: str,
    optim: OptimConfig,
    on_cuda: bool | None = None,
) -> dict:
    """The DeepSpeed config of a run: "auto" leaves filled, the optimizer chosen
    (choose_optimizer; `on_cuda` defaults to this machine), CPU-only changes applied."""
    values = {
        "train_batch_size": global_batch_size,
        "train_micro_batch_size_per_gpu": global_batch_size // world_size,
        # Negatives come only from the same step: accumulation does not enlarge the
        # contrastive batch (see gradient caching, train.grad_cache_chunks, instead).
        "gradient_accumulation_steps": 1,
        "gradient_clipping": optim.grad_clip,
        "bf16.enabled": precision == "bf16",
        "fp16.enabled": precision == "fp16",
        "optimizer.params.lr": optim.lr,
        "optimizer.params.betas": list(optim.betas),
        "optimizer.params.eps": optim.eps,
        "optimizer.params.weight_decay": optim.weight_decay,
    }
    if on_cuda is None:
        on_cuda = cpu_quirks.on_cuda()
    config = _fill_auto(_with_optimizer_choice(template, on_cuda), values)
    # Clipping must be explicit even if the JSON omitted it: DeepSpeed defaults to 1.0.
    config["gradient_clipping"] = config.get("gradient_clipping", optim.grad_clip)
    return config if on_cuda else cpu_quirks.adapt_deepspeed_config(config)


# ---- which Adam runs -----------------------------------------------------------------------
# DeepSpeed builds the optimizer from the JSON's "optimizer" section and our parameter groups.
# With "torch_adam": true it constructs torch.optim.AdamW(groups, lr, betas, eps, weight_decay,
# **other params) itself, so {"torch_adam": true, "fused": true} gives torch's fused AdamW
# with no client optimizer (and no zero_allow_untested_optimizer: torch.optim.AdamW is on
# ZeRO's supported list anyway). With "torch_adam": false it uses deepspeed.ops.adam.FusedAdam,
# whose CUDA op is JIT-compiled with nvcc at the first run unless it was prebuilt at install
# time (DS_BUILD_FUSED_ADAM=1 pip install deepspeed); we take it only when prebuilt.

TORCH_ADAMW = "torch.optim.AdamW"
TORCH_ADAMW_FUSED = "torch.optim.AdamW(fused=True)"
DEEPSPEED_FUSED_ADAM = "deepspeed.ops.adam.FusedAdam"
DEEPSPEED_CPU_ADAM = "deepspeed.ops.adam.DeepSpeedCPUAdam"


def prebuilt_fused_adam() -> bool:
    """Is DeepSpeed's FusedAdam CUDA op installed prebuilt, so that using it builds nothing?

    The same checks OpBuilder.load() makes before it imports a prebuilt op rather than
    JIT-compiling it (deepspeed/ops/op_builder/builder.py): the op is in installed_ops, the
    install was for CUDA, torch and CUDA major.minor match the install's, and the compiled
    module exists. Builds and loads nothing itself. (FusedAdamBuilder().is_compatible() is no
    such test: it says whether a JIT build could work.)
    """
    import importlib.util

    try:
        from deepspeed.git_version_info import accelerator_name, installed_ops, torch_info
    except ImportError:
        return False
    if not installed_ops.get("fused_adam", False) or accelerator_name != "cuda":
        return False
    if torch_info.get("version") != ".".join(torch.__version__.split(".")[:2]):
        return False
    cuda = torch.version.cuda
    if cuda is None or torch_info.get("cuda_version") != ".".join(cuda.split(".")[:2]):
        return False
    try:
        return importlib.util.find_spec("deepspeed.ops.adam.fused_adam_op") is not None
    except (ImportError, ValueError):
        return False


def choose_optimizer(on_cuda: bool, *, cpu_offload: bool = False) -> str:
    """Which Adam(W) the engine will run; one of the names above (what initialize prints).

    - ZeRO optimizer offload (offload_optimizer in the JSON): DeepSpeed's CPU Adam, its choice,
      kept (a C++ JIT build, no nvcc).
    - CPU: torch.optim.AdamW(fused=True) through DeepSpeed's torch_adam: torch's fused CPU
      kernel, 0.5 ms per step on the tiny preset's 78 tensors where the single-tensor default
      takes 3.2 ms and foreach 1.9 ms (the same update, at most one rounding apart).
    - CUDA: DeepSpeed's FusedAdam if its op is prebuilt, else torch.optim.AdamW(fused=True):
      never an nvcc build at start-up, which fails on machines without the CUDA toolkit.
    """
    if cpu_offload:
        return DEEPSPEED_CPU_ADAM
    if on_cuda and prebuilt_fused_adam():
        return DEEPSPEED_FUSED_ADAM
    return TORCH_ADAMW_FUSED


def _with_optimizer_choice(template: dict, on_cuda: bool) -> dict:
    """A copy of the JSON with optimizer.params.torch_adam ("auto" or absent) and, for torch's
    fused AdamW, optimizer.params.fused set from choose_optimizer. A concrete torch_adam in
    the JSON is the user's choice and is kept (initialize prints what ran)."""
    config = copy.deepcopy(template)
    optimizer = config.get("optimizer")
    if not isinstance(optimizer, dict) or str(optimizer.get("type", "")).lower() not in (
        "adam", "adamw",
    ):  # fmt: skip
        return config
    offload = config.get("zero_optimization", {}).get("offload_optimizer") or {}
    choice = choose_optimizer(on_cuda, cpu_offload=offload.get("device") in ("cpu", "nvme"))
    params = optimizer.setdefault("params", {})
    torch_adam = choice in (TORCH_ADAMW, TORCH_ADAMW_FUSED)
    if params.get("torch_adam") == "auto" or ("torch_adam" not in params and torch_adam):
        params["torch_adam"] = torch_adam
    if params.get("torch_adam") is True and choice == TORCH_ADAMW_FUSED:
        params.setdefault("fused", True)  # DeepSpeed passes unknown params on to AdamW
    return config


# ---- DeepSpeed settings measured with bench/step_bench.py ----------------------------------
# ds_configs/zero2.json sets "reduce_scatter": false. With DeepSpeed's default
# use_multi_rank_bucket_allreduce, the reduce_scatter path all-reduces the whole bucket as well,
# only after copying it into a fresh flat tensor and back out slice by slice; false all-reduces
# the bucket in place and copies just this rank's partition out: the same traffic and the same
# sum (divided by N after the reduction instead of before: bit-identical when N is a power of
# two, otherwise one rounding apart), with less copying and per-parameter Python: 0.7 ms of CPU
# per step on the bench's ZeRO-2.
#
# The gradient-norm pass stays on (DeepSpeed's zero_optimization.compute_grad_norm, default
# true), although without clipping it costs 3-5 ms of a ~55 ms tiny-preset step on CPU (one
# all-reduce more per step): it is what makes ZeRO-1/2 skip a step whose loss was finite but
# whose gradients are not, and DeepSpeed refuses to resume a clipped run into an engine without
# it. On a real model the pass is a small fraction of a step; a run that wants it off sets
# "compute_grad_norm": false in its JSON.


def optimizer_label(optimizer) -> str:
    """The name choose_optimizer uses for an optimizer instance (what actually ran)."""
    cls = type(optimizer)
    if cls is torch.optim.AdamW:
        return TORCH_ADAMW_FUSED if optimizer.defaults.get("fused") else TORCH_ADAMW
    if cls.__module__.startswith("deepspeed.ops.adam"):
        return f"deepspeed.ops.adam.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: not on biases, norms, logit_scale / logit_bias."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # Under ZeRO-3 param.data is an empty partition; ds_shape keeps the real shape.
        ndim = len(getattr(param, "ds_shape", param.shape))
        exempt = ndim < 2 or name.endswith(".bias") or "norm" in name or name in SCALAR_PARAMS
        (no_decay if exempt else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def initialize(model: torch.nn.Module, ds_config: dict, schedule: WarmupCosine):
    """deepspeed.initialize with our parameter groups and LR schedule; returns the engine."""
    import deepspeed

    weight_decay = ds_config["optimizer"]["params"]["weight_decay"]
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=parameter_groups(model, weight_decay),
        config=ds_config,
        lr_scheduler=lambda optimizer: LambdaLR(optimizer, schedule),
    )
    if engine.global_rank == 0:
        basic = getattr(engine, "basic_optimizer", engine.optimizer)
        print(f"optimizer: {optimizer_label(basic)}", flush=True)
    return engine
