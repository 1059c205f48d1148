"""ViT-B/32 on one GPU: throughput, MFU, step-time split and peak memory beside the planner.

    python -m bench.gpu_bench                      # the full bench (~1-2 min on an H200)
    python -m bench.gpu_bench --batches 256 --skip-paper

Single process, cuda:0, no DeepSpeed and no loader: the batches are random uint8 224-px images
and random token ids made once in pinned host memory, so the "data" column is the
host-to-device copy of the batch plus `data.transforms.normalize_pixels` on the device (what
the trainer does with a loader batch), not a loader's decode time. The model is the trainer's
own `TrainableCLIP` (`model.preset=vit_b32`) in bf16, trained the way DeepSpeed's bf16 mixed
precision does: bf16 weights, gradients and activations, fp32 master weights and AdamW moments
(torch's fused AdamW on the masters). The step is split with CUDA events (synchronised once per
step, inside this bench only): data, towers forward, loss forward+backward (features detached,
dL/dfeatures by autograd.grad), towers backward (from those gradients; with gradient
checkpointing the recompute is in here), optimizer.

1. Throughput: per-GPU batch 256, 512, 1024, gradient checkpointing off and on, world 1 (the
   plain CLIP loss over this GPU's batch). samples/s per GPU, MFU, the split, the loss's share
   of the step, peak `torch.cuda.max_memory_allocated` beside `disco-clip plan`'s prediction
   for the same run (ZeRO-0, one GPU: the states this process holds).
2. One rank's share of the paper's two runs, with this process's CUDA memory capped at 40 GiB
   (`torch.cuda.set_per_process_memory_fraction`), standing in for an A100-40GB: ViT-B/32 bf16
   with gradient checkpointing, b = 4,096 of B = 32,768 (N = 8) and b = 3,072 of B = 196,608
   (N = 64), 3 steps each. The other N-1 ranks' features come from
   `trainer.losses.disco.SimulatedGroup`, whose gather returns (N·b, d) rows (this rank's
   real ones and fixed random unit vectors) and whose backward keeps this rank's slice: one
   rank's memory and compute with no process group. This process holds the FULL optimizer
   state (bf16 weights and gradients, fp32 master and moments: 16 bytes per parameter), so its
   honest comparison is the planner's ZeRO-0 number for the same B and N ("plan"); the
   planner's ZeRO-2 number, the paper's setup (optimizer state and gradients sharded N ways,
   plus ZeRO's buckets), is printed beside it ("plan z2"). An OOM under the cap is reported
   as "does not fit", not a crash.

Model FLOPs (the MFU numerator), per sample, for a tower of L layers, width h, MLP width I,
s tokens and projection width e, counting a multiply-add as 2 FLOPs:

    forward = L · (2·s·(4h² + 2hI) + 4·s²·h) + embed + 2·h·e

where 4h² + 2hI are one layer's weight parameters per token (q, k, v, out; fc1, fc2), 4·s²·h is
attention's QKᵀ and AV, embed is the patch convolution 2·(3p²)·h·(s-1) (vision; 0 for the text
embedding lookup) and 2·h·e the projection of the pooled token. Training counts forward +
backward = 3 × forward, i.e. 6·s·P_layers + 12·L·s²·h per tower (+ 3·embed + 6·h·e). The
contrastive loss adds 12·b·B·e per rank (two b×e by e×B logit matmuls, forward and the two
gradients of each). Gradient checkpointing's recompute is NOT model FLOPs: the same numerator
with and without it. MFU = model FLOPs per step / step time / the GPU's dense bf16 peak
(PEAK_BF16_TFLOPS; n/a for a GPU not in the table). Check: ViT-B/32's image tower at 224 px is
8.82 GFLOPs forward = 4.41 G multiply-adds, the figure published as "4.4 GFLOPs" (OpenCLIP's
model profile, which counts multiply-adds); its text tower 2.98 G (published 2.96).

The bench prints ONE table at the end and exits 1 on any failure: an exception, a non-finite
loss, an OOM in part 1 where the planner says the run fits this GPU, or a paper run that does
not fit under the cap (README: both fit). Without CUDA it prints one line and exits 0.
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import textwrap
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

GIB = 2**30
CONTEXT_LENGTH = 77
IMAGE_SIZE = 224
# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s; matched by
# substring of torch.cuda.get_device_name(), first match wins (so the PCIe/NVL parts first).
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("A100", 312.0),
)
PAPER_RUNS = ((8, 4096), (64, 3072))  # (N, b): B = 32,768 and 196,608
DEFAULT_BATCHES = (256, 512, 1024)
SEGMENTS = ("data", "forward", "loss", "backward", "optimizer")


# ----------------------------------------------------------------------------- FLOPs


@dataclass(frozen=True)
class Tower:
    """The sizes of one tower that its FLOPs depend on."""

    layers: int
    hidden: int
    intermediate: int
    tokens: int
    proj_dim: int
    embed_flops: int = 0
    """Forward FLOPs of the input embedding per sample (vision: the patch convolution)."""

    def forward_flops(self) -> int:
        """Forward FLOPs per sample (module docstring)."""
        h, s = self.hidden, self.tokens
        layer_params = 4 * h * h + 2 * h * self.intermediate
        per_layer = 2 * s * layer_params + 4 * s * s * h
        return self.layers * per_layer + self.embed_flops + 2 * h * self.proj_dim


def vision_tower(cfg) -> Tower:
    """From a CLIPVisionConfig (with projection_dim)."""
    patches = (cfg.image_size // cfg.patch_size) ** 2
    embed = 2 * (3 * cfg.patch_size**2) * cfg.hidden_size * patches
    return Tower(
        cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, patches + 1,
        cfg.projection_dim, embed,
    )  # fmt: skip


def text_tower(cfg, context_length: int) -> Tower:
    """From a CLIPTextConfig (with projection_dim)."""
    return Tower(
        cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, context_length,
        cfg.projection_dim,
    )  # fmt: skip


def loss_flops(b: int, batch: int, embed_dim: int) -> int:
    """One rank's contrastive-loss matmul FLOPs, forward + backward: 12·b·B·e."""
    return 12 * b * batch * embed_dim


def train_flops_per_step(towers: Sequence[Tower], b: int, batch: int, embed_dim: int) -> int:
    """Model FLOPs of one training step of one rank (3 × forward per tower + the loss);
    activation recompute is not counted."""
    return 3 * b * sum(t.forward_flops() for t in towers) + loss_flops(b, batch, embed_dim)


def peak_bf16_tflops(device_name: str) -> float | None:
    for key, peak in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


def mfu(flops: float, seconds: float, peak_tflops: float | None) -> float | None:
    if peak_tflops is None or seconds <= 0:
        return None
    return flops / seconds / (peak_tflops * 1e12)


# ----------------------------------------------------------------------------- table


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned first column, right-aligned others, two spaces between, a rule under the
    header."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        parts = [
            str(c).ljust(w) if i == 0 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:{spec}}{suffix}"


# ----------------------------------------------------------------------------- the step


class Marks:
    """Named time marks within one step: CUDA events on a GPU (read after one synchronise),
    perf_counter on the CPU (for the CPU smoke test of this module)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.points: list[tuple[str, object]] = []

    def mark(self, name: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.points.append((name, event))
        else:
            self.points.append((name, time.perf_counter()))

    def seconds(self) -> dict[str, float]:
        """{segment: seconds from the previous mark}; synchronises the device once."""
        if self.cuda:
            torch.cuda.synchronize()
        out = {}
        for (_, before), (name, after) in zip(self.points, self.points[1:], strict=False):
            if self.cuda:
                out[name] = before.elapsed_time(after) / 1e3
            else:
                out[name] = after - before
        return out


class MixedAdamW:
    """DeepSpeed-style bf16 mixed precision around torch's fused AdamW: the model's bf16
    parameters, fp32 master copies that the optimizer updates (with its fp32 moments), the
    bf16 gradients turned into fp32 master gradients at each step and the masters copied back.
    Weight decay on matrices only (trainer.engine.parameter_groups)."""

    def __init__(self, model: torch.nn.Module, *, lr=5e-4, betas=(0.9, 0.98), eps=1e-6, wd=0.2):
        from trainer.engine import parameter_groups

        self.pairs: list[tuple[torch.nn.Parameter, torch.nn.Parameter]] = []
        groups = []
        for group in parameter_groups(model, wd):
            masters = []
            for p in group["params"]:
                master = torch.nn.Parameter(p.detach().float().clone())
                self.pairs.append((p, master))
                masters.append(master)
            groups.append({"params": masters, "weight_decay": group["weight_decay"]})
        fused = next(model.parameters()).device.type == "cuda"
        self.optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)

    @torch.no_grad()
    def step(self) -> None:
        for p, master in self.pairs:
            master.grad = None if p.grad is None else p.grad.float()
            p.grad = None
        self.optimizer.step()
        for p, master in self.pairs:
            p.copy_(master)
            master.grad = None

    def zero_grad(self) -> None:
        for p, master in self.pairs:
            p.grad = None
            master.grad = None


def build(preset: str, device: torch.device, *, context_length: int = CONTEXT_LENGTH):
    """(bf16 TrainableCLIP on `device`, its CLIPConfig, eos id). The text vocabulary is CLIP's
    49408 with bos/eos/pad as the planner counts them, so the parameter count is the planner's."""
    from trainer.model import ModelConfig, TokenIds, build_clip_config, build_model
    from trainer.plan.planner import OPENAI_CLIP_VOCAB

    vocab = OPENAI_CLIP_VOCAB
    tokens = TokenIds(vocab_size=vocab, bos=vocab - 2, eos=vocab - 1, pad=0)
    model_cfg = ModelConfig(preset=preset)
    config = build_clip_config(model_cfg, tokens, context_length)
    torch.manual_seed(0)
    model = build_model(model_cfg, config, with_bias=False, zero3=False)
    model = model.to(device=device, dtype=torch.bfloat16).train()
    return model, config, tokens.eos


def set_checkpointing(model, on: bool) -> None:
    """As trainer.model.build_model does it (HF's non-reentrant checkpointing per layer)."""
    with warnings.catch_warnings():  # transformers >= 5.2x: renamed, old name still works
        warnings.simplefilter("ignore", FutureWarning)
        if on:
            kwargs = {"use_reentrant": False}
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_disable()


def host_batch(b: int, image_size: int, context_length: int, vocab: int, eos: int, seed: int = 0):
    """A loader-like batch in (pinned, on a CUDA machine) host memory: uint8 pixels, int64 ids
    ending in eos, a full attention mask."""
    where = "cuda" if torch.cuda.is_available() else "cpu"  # drawing 600M bytes on a CPU: s
    gen = torch.Generator(device=where).manual_seed(seed)
    shape = (b, 3, image_size, image_size)
    pixels = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8, device=where)
    ids = torch.randint(1, vocab - 2, (b, context_length), generator=gen, device=where)
    ids[:, -1] = eos
    batch = {"pixel_values": pixels, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
    batch = {k: v.cpu() for k, v in batch.items()}
    if where == "cuda":
        batch = {k: v.pin_memory() for k, v in batch.items()}
    return batch


def _normalize(pixels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    from data import transforms

    if hasattr(transforms, "normalize_pixels"):
        return transforms.normalize_pixels(pixels, dtype)
    mean = torch.tensor(transforms.CLIP_MEAN, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(transforms.CLIP_STD, device=pixels.device).view(1, 3, 1, 1)
    return ((pixels.float() / 255 - mean) / std).to(dtype)


def train_step(model, optimizer: MixedAdamW, batch, *, group=None) -> tuple[float, dict]:
    """One step, split by Marks: (loss value, {segment: seconds})."""
    from trainer.losses.disco import disco_clip_loss

    device = next(model.parameters()).device
    marks = Marks(device)
    marks.mark("start")
    pixels = batch["pixel_values"].to(device, non_blocking=True)
    ids = batch["input_ids"].to(device, non_blocking=True)
    mask = batch["attention_mask"].to(device, non_blocking=True)
    pixels = _normalize(pixels, torch.bfloat16)
    marks.mark("data")
    image, text, scale, _ = model(pixels, ids, mask)
    marks.mark("forward")
    leaves = [image.detach().requires_grad_(), text.detach().requires_grad_(),
              scale.detach().requires_grad_()]  # fmt: skip
    loss = disco_clip_loss(*leaves, group=group)
    grads = torch.autograd.grad(loss, leaves)
    marks.mark("loss")
    torch.autograd.backward([image, text, scale], list(grads))
    del image, text, scale, leaves, grads
    marks.mark("backward")
    optimizer.step()
    marks.mark("optimizer")
    seconds = marks.seconds()
    return float(loss.detach().float()), seconds


# ----------------------------------------------------------------------------- measuring


@dataclass
class Result:
    label: str
    b: int
    batch: int
    checkpointing: bool
    kind: str = "throughput"  # or "paper"
    seconds: dict[str, float] = field(default_factory=dict)  # median per segment
    losses: list[float] = field(default_factory=list)
    peak: int | None = None
    plan: int | None = None
    plan_z2: int | None = None
    flops: int = 0
    status: str = "ok"
    failed: bool = False
    note: str = ""

    @property
    def step(self) -> float:
        return sum(self.seconds.values())


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def plan_bytes(b: int, gpus: int, zero: int, checkpointing: bool, gpu_memory: int):
    """(total bytes, fits) of `disco-clip plan` for ViT-B/32 bf16 disco at b per GPU."""
    from trainer.plan.planner import PlanSpec, fits, plan

    spec = PlanSpec(
        model="vit_b32", gpus=gpus, gpu_memory=gpu_memory, batch=b * gpus, zero=zero,
        loss="disco", precision="bf16", checkpointing=checkpointing,
        context_length=CONTEXT_LENGTH,
    )  # fmt: skip
    return plan(spec).total, fits(spec)


def measure(
    model, optimizer, result: Result, batch, *, steps: int, warmup: int, group=None,
    oom_is_failure: bool = True, peak_from_start: bool = False,
) -> Result:  # fmt: skip
    """Run warmup + steps steps; per-segment medians of the measured ones; the peak over the
    measured ones (over all of them with peak_from_start)."""
    device = next(model.parameters()).device
    per_step: list[dict[str, float]] = []
    reset_at = 0 if peak_from_start else warmup
    try:
        for i in range(warmup + steps):
            if i == reset_at and device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            loss, seconds = train_step(model, optimizer, batch, group=group)
            result.losses.append(loss)
            if i >= warmup:
                per_step.append(seconds)
        if device.type == "cuda":
            result.peak = torch.cuda.max_memory_allocated()
        result.seconds = {k: statistics.median(s[k] for s in per_step) for k in SEGMENTS}
        if not all(math.isfinite(x) for x in result.losses):
            result.status, result.failed = "non-finite loss", True
    except torch.cuda.OutOfMemoryError:
        optimizer.zero_grad()
        result.status = "OOM" if result.kind == "throughput" else "does not fit"
        result.failed = oom_is_failure
        if device.type == "cuda":
            result.peak = torch.cuda.max_memory_allocated()
    except Exception as err:  # reported in the table; the bench goes on
        optimizer.zero_grad()
        result.status, result.failed = f"error: {type(err).__name__}", True
        result.note = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
    _free(device)
    return result


def throughput_runs(model, optimizer, config, eos, device, args, gpu_memory) -> list[Result]:
    towers = [vision_tower(config.vision_config), text_tower(config.text_config, CONTEXT_LENGTH)]
    results = []
    for b in args.batches:
        batch = host_batch(b, config.vision_config.image_size, CONTEXT_LENGTH,
                           config.text_config.vocab_size, eos)  # fmt: skip
        for ckpt in (False, True):
            set_checkpointing(model, ckpt)
            total, plan_fits = plan_bytes(b, 1, 0, ckpt, gpu_memory)
            result = Result(f"b={b} ckpt={'on' if ckpt else 'off'}", b, b, ckpt, plan=total,
                            flops=train_flops_per_step(towers, b, b, config.projection_dim))  # fmt: skip
            print(f"gpu_bench: {result.label} ...", file=sys.stderr, flush=True)
            # An OOM is a failure only where the planner says the run fits this GPU.
            results.append(measure(model, optimizer, result, batch, steps=args.steps,
                                   warmup=args.warmup, oom_is_failure=plan_fits))  # fmt: skip
        del batch
        _free(device)
    return results


def paper_runs(model, optimizer, config, eos, device, args) -> list[Result]:
    from trainer.losses.disco import SimulatedGroup

    towers = [vision_tower(config.vision_config), text_tower(config.text_config, CONTEXT_LENGTH)]
    cap = int(args.cap_gib * GIB)
    set_checkpointing(model, True)
    results = []
    capped = False
    if device.type == "cuda":
        _free(device)
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), device)
        capped = True
    try:
        for world, b in args.paper_runs:
            batch_size = world * b
            result = Result(f"N={world} b={b} B={batch_size} cap {args.cap_gib:g} GiB", b,
                            batch_size, True, kind="paper",
                            flops=train_flops_per_step(towers, b, batch_size, config.projection_dim))  # fmt: skip
            result.plan, _ = plan_bytes(b, world, 0, True, cap)
            result.plan_z2, _ = plan_bytes(b, world, 2, True, cap)
            print(f"gpu_bench: paper run {result.label} ...", file=sys.stderr, flush=True)
            batch = host_batch(b, config.vision_config.image_size, CONTEXT_LENGTH,
                               config.text_config.vocab_size, eos, seed=world)  # fmt: skip
            _free(device)  # host_batch drew it on the GPU: hand those blocks back under the cap
            group = SimulatedGroup(rank=0, world=world)
            # Timings from the steps after the first; the peak over all of them.
            measure(model, optimizer, result, batch, steps=args.paper_steps - 1, warmup=1,
                    group=group, peak_from_start=True)  # fmt: skip
            if result.status == "ok":
                result.status = "fits"
            del batch
            _free(device)
            results.append(result)
    finally:
        if capped:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
    return results


def report(results: list[Result], device_name: str, peak_tflops: float | None) -> str:
    headers = ["run", "samples/s", "MFU", "data ms", "towers ms", "loss ms", "optim ms",
               "step ms", "loss %", "peak GiB", "plan GiB", "plan err", "plan z2", "status"]  # fmt: skip
    rows = []
    for r in results:
        ok = bool(r.seconds) and r.step > 0
        towers = r.seconds.get("forward", 0) + r.seconds.get("backward", 0)
        peak = r.peak / GIB if r.peak is not None and ok else None
        plan = r.plan / GIB if r.plan is not None else None
        err = peak / plan - 1 if peak is not None and plan else None
        rows.append([
            r.label,
            fmt(r.b / r.step if ok else None, ".0f"),
            fmt(mfu(r.flops, r.step, peak_tflops) if ok else None, ".1%"),
            fmt(r.seconds.get("data", 0) * 1e3 if ok else None, ".1f"),
            fmt(towers * 1e3 if ok else None, ".1f"),
            fmt(r.seconds.get("loss", 0) * 1e3 if ok else None, ".1f"),
            fmt(r.seconds.get("optimizer", 0) * 1e3 if ok else None, ".1f"),
            fmt(r.step * 1e3 if ok else None, ".1f"),
            fmt(r.seconds.get("loss", 0) / r.step if ok else None, ".1%"),
            fmt(peak, ".2f"),
            fmt(plan, ".2f"),
            fmt(err, "+.1%"),
            fmt(r.plan_z2 / GIB if r.plan_z2 is not None else None, ".2f"),
            r.status,
        ])  # fmt: skip
    lines = [
        f"gpu_bench: ViT-B/32 bf16 on {device_name} (1 GPU, cuda:0); in-memory random batches "
        f"(data = H2D copy + normalisation); MFU vs "
        + (f"{peak_tflops:g} TFLOP/s dense bf16" if peak_tflops else "n/a (GPU not in the table)"),
        format_table(headers, rows),
        textwrap.fill(
            "peak = torch.cuda.max_memory_allocated over the measured steps (tensors only: no "
            "CUDA context, no fragmentation). plan = disco-clip plan for the same run at ZeRO-0, "
            "the states this single process holds (bf16 weights and gradients, fp32 master and "
            "moments); plan z2 = the planner for the paper's ZeRO-2 run (N GPUs of 40 GiB). "
            "MFU counts model FLOPs only (no checkpointing recompute). Paper rows: one rank of N "
            "through SimulatedGroup, under the memory cap; 'does not fit' = OOM under the cap.",
            width=100,
        ),
    ]
    for r in results:
        if r.note:
            lines.append(f"  {r.label}: {r.status}: {r.note}")
    failures = [r for r in results if r.failed]
    lines.append(
        f"gpu_bench: {len(results) - len(failures)}/{len(results)} runs ok"
        + (
            f"; FAILED: {', '.join(f'{r.label} ({r.status})' for r in failures)}"
            if failures
            else ""
        )
    )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")],
                        default=list(DEFAULT_BATCHES), help="per-GPU batches (comma-separated)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=5, help="measured steps per throughput run")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up steps per throughput run")
    parser.add_argument("--paper-steps", type=int, default=3, help="steps per paper run (>= 2)")
    parser.add_argument("--cap-gib", type=float, default=40.0, help="memory cap for paper runs")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-paper", action="store_true")
    args = parser.parse_args(argv)
    args.paper_runs = list(PAPER_RUNS)
    args.paper_steps = max(2, args.paper_steps)
    return args


def main(argv: list[str] | None = None) -> int:
    if not torch.cuda.is_available():
        print("gpu_bench: no CUDA device here; nothing to measure")
        return 0
    args = parse_args(argv)
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    name = torch.cuda.get_device_name(device)
    gpu_memory = torch.cuda.get_device_properties(device).total_memory
    peak_tflops = peak_bf16_tflops(name)
    started = time.perf_counter()
    results: list[Result] = []
    try:
        model, config, eos = build("vit_b32", device)
        optimizer = MixedAdamW(model)
        if not args.skip_throughput:
            results += throughput_runs(model, optimizer, config, eos, device, args, gpu_memory)
        if not args.skip_paper:
            results += paper_runs(model, optimizer, config, eos, device, args)
    except Exception as err:  # setup failed: still one table, and a failing exit code
        failed = Result("setup", 0, 0, False, status=f"error: {type(err).__name__}", failed=True)
        failed.note = (str(err).strip().splitlines() or [""])[0][:200]
        results.append(failed)
    print(report(results, name, peak_tflops))
    print(f"gpu_bench: {time.perf_counter() - started:.0f} s")
    return 1 if any(r.failed for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
