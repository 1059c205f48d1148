"""One optimizer step of contrastive training, plain or with gradient caching.

Gradient caching (Gao et al., 2021; docs/grad_cache.md): gradient accumulation does not enlarge
the contrastive batch, because negatives come only from the same step. To fit a per-rank batch
b whose activations do not fit at once, encode it in K chunks without graphs, compute the loss
and dL/d(features) on all b, then re-encode each chunk with a graph and back-propagate its
slice of dL/d(features). Activation memory is that of b/K samples; the result is the plain
step's (dropout masks are replayed by restoring the RNG state before each re-encode).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from data.transforms import normalize_pixels
from trainer.dist import collective_device
from trainer.losses import Objective


@dataclass(frozen=True)
class RankSignals:
    """What this rank must tell the others at every step, besides its loss: whether it was
    asked to stop (SIGUSR1/SIGTERM, trainer/train.py) and how many bad samples its loader has
    skipped so far. They ride on the step's one collective instead of a second one."""

    stop_requested: bool = False
    skipped_samples: int = 0


@dataclass
class StepOutput:
    loss: float  # the full-batch loss: the mean of the ranks' shares (docs/disco.md)
    logit_scale: float
    applied: bool  # False when a non-finite loss made every rank skip the update
    stop: bool = False  # some rank was asked to stop: every rank stops after this step
    skipped_samples: int = 0  # bad samples skipped by all ranks' loaders so far


@dataclass(frozen=True)
class _Agreement:
    mean_loss: float
    finite: bool
    stop: bool
    skipped_samples: int
    logit_scale: float


def _agree(loss: torch.Tensor, scale: torch.Tensor, signals: RankSignals) -> _Agreement:
    """Everything the ranks must agree on this step, in one all-reduce and one host sync.

    Every rank must take the same branch (skip a non-finite step, stop), and a curve logged
    from rank 0's share alone would depend on the world size. The values travel on the device
    the process group serves (NCCL cannot reduce CPU tensors), in fp64 so that the skip count
    stays exact. The logit scale (the same on every rank) joins the one device-to-host copy
    instead of costing a `.item()` of its own after the optimizer step, where a sync would
    stall the next step's launch on a GPU.
    """
    device = collective_device()
    loss = loss.detach().to(device, torch.float64)
    stats = torch.stack([
        loss, (~torch.isfinite(loss)).to(torch.float64),
        torch.tensor(float(signals.stop_requested), dtype=torch.float64, device=device),
        torch.tensor(float(signals.skipped_samples), dtype=torch.float64, device=device),
    ])  # fmt: skip
    world = 1
    if dist.is_initialized():
        # SUM: [Σ loss_n, ranks with a non-finite loss, ranks asked to stop, Σ skipped samples]
        dist.all_reduce(stats)
        world = dist.get_world_size()
    host = torch.cat([stats, scale.detach().to(device, torch.float64).reshape(1)]).tolist()
    total, nonfinite, stops, skipped, logit_scale = host
    return _Agreement(total / world, nonfinite == 0, stops > 0, int(skipped), logit_scale)


def _output(agreed: _Agreement, applied: bool) -> StepOutput:
    return StepOutput(agreed.mean_loss, agreed.logit_scale, applied, agreed.stop,
                      agreed.skipped_samples)  # fmt: skip


def _model_inputs(batch: dict[str, torch.Tensor], dtype: torch.dtype, device, rows=slice(None)):
    """This step's tensors on the device. Loader batches carry uint8 images (a quarter of the
    host memory and of the host-to-device copy); they are normalised here, on the device."""
    pixels = batch["pixel_values"][rows].to(device, non_blocking=True)
    pixels = normalize_pixels(pixels, dtype) if pixels.dtype == torch.uint8 else pixels.to(dtype)
    return (
        pixels,
        batch["input_ids"][rows].to(device, non_blocking=True),
        batch["attention_mask"][rows].to(device, non_blocking=True),
    )


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The generators dropout draws from: the CPU one, and the device's on CUDA."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None  # CUDA-only
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:  # CUDA-only: reached by tests/gpu (grad cache with dropout)
        torch.cuda.set_rng_state(state[1], device)


def train_step(
    engine, batch, objective: Objective, *, chunks: int, dtype: torch.dtype,
    signals: RankSignals = RankSignals(),
) -> StepOutput:  # fmt: skip
    """One step. Host syncs: exactly one, the agreement after the loss (the skip decision must
    be known before backward); no `.item()` elsewhere."""
    if chunks == 1:
        image, text, scale, bias = engine(*_model_inputs(batch, dtype, engine.device))
        loss = objective(image, text, scale, bias)
        agreed = _agree(loss, scale, signals)
        if agreed.finite:
            engine.backward(loss)
            engine.step()
        return _output(agreed, applied=agreed.finite)
    return _grad_cache_step(engine, batch, objective, chunks=chunks, dtype=dtype, signals=signals)


def _grad_cache_step(
    engine, batch, objective: Objective, *, chunks: int, dtype, signals: RankSignals
) -> StepOutput:
    b = batch["input_ids"].shape[0]
    bounds = [slice(k * b // chunks, (k + 1) * b // chunks) for k in range(chunks)]
    device = engine.device

    # 1. Features for the whole per-rank batch, without graphs; remember each chunk's RNG.
    rng_states, images, texts = [], [], []
    with torch.no_grad():
        for rows in bounds:
            rng_states.append(_rng_state(device))
            image, text, scale, bias = engine(*_model_inputs(batch, dtype, device, rows))
            images.append(image)
            texts.append(text)
    rng_after = _rng_state(device)

    # 2. Loss and dL/d(features, scale, bias) on all b rows (the contrastive batch is intact).
    #    The leaves are fp32 whatever the towers' dtype, so the cached gradients cannot
    #    underflow in fp16 before DeepSpeed's loss scale multiplies them in step 3.
    image = torch.cat(images).float().requires_grad_()  # (b, d)
    text = torch.cat(texts).float().requires_grad_()  # (b, d)
    scale_leaf = scale.detach().float().requires_grad_()
    bias_leaf = bias.detach().float().requires_grad_() if bias is not None else None
    loss = objective(image, text, scale_leaf, bias_leaf)
    agreed = _agree(loss, scale, signals)
    if not agreed.finite:
        return _output(agreed, applied=False)
    leaves = [image, text, scale_leaf] + ([bias_leaf] if bias_leaf is not None else [])
    grads = torch.autograd.grad(loss, leaves)
    grad_image, grad_text, grad_scale = grads[:3]

    # 3. Re-encode chunk by chunk with graphs (same dropout masks) and back-propagate the
    #    surrogate Σ features·grad, whose gradient is exactly the cached one. DeepSpeed
    #    reduces gradients only at the accumulation boundary, i.e. after the last chunk.
    for k, rows in enumerate(bounds):
        _set_rng_state(rng_states[k], device)
        image_k, text_k, scale_k, bias_k = engine(*_model_inputs(batch, dtype, device, rows))
        surrogate = (image_k * grad_image[rows]).sum() + (text_k * grad_text[rows]).sum()
        if k == 0:  # the scalar parameters' gradient is added exactly once
            surrogate = surrogate + (scale_k * grad_scale).sum()
            if bias_k is not None:
                surrogate = surrogate + (bias_k * grads[3]).sum()
        engine.set_gradient_accumulation_boundary(k == chunks - 1)
        engine.backward(surrogate, scale_wrt_gas=False)
    _set_rng_state(rng_after, device)
    engine.step()
    return _output(agreed, applied=True)
