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

from trainer.losses import Objective


@dataclass
class StepOutput:
    loss: float
    logit_scale: float
    applied: bool  # False when a non-finite loss made every rank skip the update


def _all_finite(loss: torch.Tensor) -> bool:
    """Every rank must take the same branch, so finiteness is agreed by all_reduce."""
    flag = torch.tensor([float(torch.isfinite(loss).all())])
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _model_inputs(batch: dict[str, torch.Tensor], dtype: torch.dtype, device, rows=slice(None)):
    return (
        batch["pixel_values"][rows].to(device=device, dtype=dtype),
        batch["input_ids"][rows].to(device),
        batch["attention_mask"][rows].to(device),
    )


def train_step(
    engine, batch, objective: Objective, *, chunks: int, dtype: torch.dtype
) -> StepOutput:
    if chunks == 1:
        image, text, scale, bias = engine(*_model_inputs(batch, dtype, engine.device))
        loss = objective(image, text, scale, bias)
        if not _all_finite(loss):
            return StepOutput(loss.item(), scale.item(), applied=False)
        engine.backward(loss)
        engine.step()
        return StepOutput(loss.item(), scale.item(), applied=True)
    return _grad_cache_step(engine, batch, objective, chunks=chunks, dtype=dtype)


def _grad_cache_step(engine, batch, objective: Objective, *, chunks: int, dtype) -> StepOutput:
    b = batch["input_ids"].shape[0]
    bounds = [slice(k * b // chunks, (k + 1) * b // chunks) for k in range(chunks)]

    # 1. Features for the whole per-rank batch, without graphs; remember each chunk's RNG.
    rng_states, images, texts = [], [], []
    with torch.no_grad():
        for rows in bounds:
            rng_states.append(torch.get_rng_state())
            image, text, scale, bias = engine(*_model_inputs(batch, dtype, engine.device, rows))
            images.append(image)
            texts.append(text)
    rng_after = torch.get_rng_state()

    # 2. Loss and dL/d(features, scale, bias) on all b rows (the contrastive batch is intact).
    image = torch.cat(images).requires_grad_()  # (b, d)
    text = torch.cat(texts).requires_grad_()  # (b, d)
    scale_leaf = scale.detach().clone().requires_grad_()
    bias_leaf = bias.detach().clone().requires_grad_() if bias is not None else None
    loss = objective(image, text, scale_leaf, bias_leaf)
    if not _all_finite(loss):
        return StepOutput(loss.item(), scale.item(), applied=False)
    leaves = [image, text, scale_leaf] + ([bias_leaf] if bias_leaf is not None else [])
    grads = torch.autograd.grad(loss, leaves)
    grad_image, grad_text, grad_scale = grads[:3]

    # 3. Re-encode chunk by chunk with graphs (same dropout masks) and back-propagate the
    #    surrogate Σ features·grad, whose gradient is exactly the cached one. DeepSpeed
    #    reduces gradients only at the accumulation boundary, i.e. after the last chunk.
    for k, rows in enumerate(bounds):
        torch.set_rng_state(rng_states[k])
        image_k, text_k, scale_k, bias_k = engine(*_model_inputs(batch, dtype, engine.device, rows))
        surrogate = (image_k * grad_image[rows]).sum() + (text_k * grad_text[rows]).sum()
        if k == 0:  # the scalar parameters' gradient is added exactly once
            surrogate = surrogate + (scale_k * grad_scale).sum()
            if bias_k is not None:
                surrogate = surrogate + (bias_k * grads[3]).sum()
        engine.set_gradient_accumulation_boundary(k == chunks - 1)
        engine.backward(surrogate, scale_wrt_gas=False)
    torch.set_rng_state(rng_after)
    engine.step()
    return StepOutput(loss.item(), scale.item(), applied=True)
