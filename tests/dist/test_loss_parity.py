"""Distributed losses vs an independent single-process full-batch CLIP loss.

Each rank encodes its b rows with a shared linear "tower" (so we can check parameter gradients
after the ÷N data-parallel average, as DeepSpeed does), computes the loss over the gloo group,
and back-propagates. A failure localises as follows:
- loss mismatch: wrong labels / rows / scale in the forward;
- feature-gradient mismatch with loss OK: the gather's backward (sum vs average, own slice);
- only logit_scale mismatch: the per-rank loss is not the mean over local rows.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import trainer.loss as loss_mod
from trainer.localdist import run_ranks

B_LOCAL, D_IN, D = 5, 6, 4
LOSSES = {"disco": loss_mod.disco_clip_loss, "naive": loss_mod.full_batch_clip_loss}
# (dtype, logit_scale shape, initial logit_scale) — the last one is past the clamp at ln 100.
CASES = [
    (torch.float64, (), math.log(1 / 0.07)),
    (torch.float64, (1,), 1.3),
    (torch.float64, (1,), 5.0),
    (torch.float32, (), math.log(1 / 0.07)),
    (torch.float32, (1,), 0.7),
]
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


def reference_loss(x: torch.Tensor, y: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's full-batch symmetric cross-entropy, written out independently of trainer.loss."""
    scale = logit_scale.reshape(()).clamp(max=math.log(100)).exp()
    logits = scale * x @ y.T
    log_p = logits - logits.logsumexp(dim=1, keepdim=True)
    log_q = logits.T - logits.T.logsumexp(dim=1, keepdim=True)
    return -0.5 * (log_p.diagonal().mean() + log_q.diagonal().mean())


def make_problem(world: int, dtype: torch.dtype, shape: tuple, init: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    n = world * B_LOCAL
    raw_img = torch.randn(n, D_IN, generator=gen, dtype=torch.float64).to(dtype)
    raw_txt = torch.randn(n, D_IN, generator=gen, dtype=torch.float64).to(dtype)
    w_img = torch.randn(D_IN, D, generator=gen, dtype=torch.float64).to(dtype)
    w_txt = torch.randn(D_IN, D, generator=gen, dtype=torch.float64).to(dtype)
    params = {
        "w_img": w_img.requires_grad_(),
        "w_txt": w_txt.requires_grad_(),
        "logit_scale": torch.full(shape, init, dtype=dtype, requires_grad=True),
    }
    return raw_img, raw_txt, params


def forward_backward(raw_img, raw_txt, params, loss_fn):
    """Loss and gradients (params + features) for the rows given."""
    x = F.normalize(raw_img @ params["w_img"], dim=-1)
    y = F.normalize(raw_txt @ params["w_txt"], dim=-1)
    x.retain_grad()
    y.retain_grad()
    loss = loss_fn(x, y, params["logit_scale"])
    loss.backward()
    grads = {k: p.grad.clone() for k, p in params.items()}
    grads.update(x=x.grad.clone(), y=y.grad.clone())
    return loss.detach(), grads


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _errors_on_rank(rank: int, world: int, loss_fn) -> list[dict[str, float]]:
    """For each case: relative errors of this run vs the full-batch reference (on every rank)."""
    out = []
    for i, (dtype, shape, init) in enumerate(CASES):
        raw_img, raw_txt, ref_params = make_problem(world, dtype, shape, init, seed=i)
        _, _, params = make_problem(world, dtype, shape, init, seed=i)
        ref_loss, ref = forward_backward(raw_img, raw_txt, ref_params, reference_loss)

        rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        loss, got = forward_backward(raw_img[rows], raw_txt[rows], params, loss_fn)
        # The data-parallel reduction DeepSpeed applies to every parameter gradient: sum, ÷N.
        mean_loss = loss.clone()
        dist.all_reduce(mean_loss)
        mean_loss /= world
        for key in ("w_img", "w_txt", "logit_scale", "x", "y"):
            if key in ("x", "y"):  # reassemble the full feature gradient from every rank
                parts = [torch.empty_like(got[key]) for _ in range(world)]
                dist.all_gather(parts, got[key])
                got[key] = torch.cat(parts)
            else:
                dist.all_reduce(got[key])
            got[key] /= world
        errs = {k: rel_err(got[k], ref[k]) for k in ref}
        errs["loss"] = rel_err(mean_loss, ref_loss)
        errs["logit_scale_shape_kept"] = float(got["logit_scale"].shape != torch.Size(shape))
        out.append(errs)
    return out


class _AveragingGather(torch.autograd.Function):
    """The paper's public-code variant: averages instead of sums in the gather backward."""

    @staticmethod
    def forward(ctx, local, group):
        ctx.world = dist.get_world_size(group)
        parts = [torch.empty_like(local) for _ in range(ctx.world)]
        dist.all_gather(parts, local.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        rank = dist.get_rank()
        b = grad.shape[0] // ctx.world
        return grad[rank * b : (rank + 1) * b] / ctx.world, None


def _parity_rank(rank: int, world: int) -> dict:
    results = {name: _errors_on_rank(rank, world, fn) for name, fn in LOSSES.items()}
    real_gather = loss_mod.gather_rows
    loss_mod.gather_rows = lambda t, group=None: _AveragingGather.apply(t, group)
    try:
        results["avg_backward"] = _errors_on_rank(rank, world, loss_mod.disco_clip_loss)
    finally:
        loss_mod.gather_rows = real_gather
    return results


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_distributed_losses_equal_full_batch(world: int) -> None:
    per_rank = run_ranks(_parity_rank, world)
    for rank, results in enumerate(per_rank):
        for name in LOSSES:
            for (dtype, shape, _), errs in zip(CASES, results[name], strict=True):
                assert errs.pop("logit_scale_shape_kept") == 0.0
                worst = max(errs, key=errs.get)
                assert errs[worst] <= TOL[dtype], (
                    f"{name} rank {rank}/{world} {dtype} logit_scale{list(shape)}: "
                    f"{worst} rel err {errs[worst]:.2e}"
                )
        # The averaging backward must be caught whenever there is more than one rank.
        for (dtype, _, _), errs in zip(CASES, results["avg_backward"], strict=True):
            if world == 1:
                assert max(errs[k] for k in ("x", "y", "w_img", "w_txt")) <= TOL[dtype]
            else:
                assert min(errs[k] for k in ("x", "y", "w_img", "w_txt")) > 0.1
