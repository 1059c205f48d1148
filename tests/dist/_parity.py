"""Shared pieces of the distributed loss parity tests: the problem, the run, the comparison.

Each rank encodes its b rows with a shared linear "tower" (so parameter gradients can be
checked after the ÷N data-parallel average, as DeepSpeed does), computes the loss over the
gloo group and back-propagates; the result is compared with an independent single-process
full-batch reference computed on every rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

D_IN, D = 6, 4
# Scalar parameters passed to the loss after the features, in this order, when present.
SCALARS = ("logit_scale", "logit_bias")


MAX_LOGIT_SCALE = math.log(100)


def reference_scale(logit_scale: torch.Tensor) -> torch.Tensor:
    """s = exp(min(logit_scale, ln 100)) with the clamp's agreed gradient, written independently
    of the product: straight through, except that above the bound a gradient that would raise
    logit_scale under descent (negative) is dropped — so a scale pushed past the bound can come
    back down but is never pushed further up."""
    ls = logit_scale.reshape(())
    over = ls.detach() > MAX_LOGIT_SCALE
    clamped = ls - (ls - MAX_LOGIT_SCALE).clamp(min=0).detach()  # value min(ls, bound), d/dls = 1
    if clamped.requires_grad:
        clamped.register_hook(lambda g: torch.where(over & (g < 0), torch.zeros_like(g), g))
    return clamped.exp()


def make_problem(
    n_rows: int,
    dtype: torch.dtype,
    shape: tuple,
    init: float,
    seed: int,
    bias: float | None = None,
):
    """Raw inputs for all B rows and fresh parameters (same seed -> same values)."""
    gen = torch.Generator().manual_seed(seed)
    raw_img = torch.randn(n_rows, D_IN, generator=gen, dtype=torch.float64).to(dtype)
    raw_txt = torch.randn(n_rows, D_IN, generator=gen, dtype=torch.float64).to(dtype)
    w_img = torch.randn(D_IN, D, generator=gen, dtype=torch.float64).to(dtype)
    w_txt = torch.randn(D_IN, D, generator=gen, dtype=torch.float64).to(dtype)
    params = {
        "w_img": w_img.requires_grad_(),
        "w_txt": w_txt.requires_grad_(),
        "logit_scale": torch.full(shape, init, dtype=dtype, requires_grad=True),
    }
    if bias is not None:
        params["logit_bias"] = torch.full(shape, bias, dtype=dtype, requires_grad=True)
    return raw_img, raw_txt, params


def forward_backward(raw_img, raw_txt, params, loss_fn):
    """Loss and gradients (params + features) for the rows given."""
    x = F.normalize(raw_img @ params["w_img"], dim=-1)
    y = F.normalize(raw_txt @ params["w_txt"], dim=-1)
    x.retain_grad()
    y.retain_grad()
    loss = loss_fn(x, y, *(params[k] for k in SCALARS if k in params))
    loss.backward()
    grads = {k: p.grad.clone() for k, p in params.items()}
    grads.update(x=x.grad.clone(), y=y.grad.clone())
    return loss.detach(), grads


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def errors_vs_reference(
    rank: int,
    world: int,
    b_local: int,
    loss_fn: Callable[..., torch.Tensor],
    reference: Callable[..., torch.Tensor],
    cases: list[tuple],
    bias: float | None = None,
) -> list[dict[str, float]]:
    """For each (dtype, scalar shape, logit_scale init) case: relative errors of this
    distributed run, after the data-parallel ÷N, vs the full-batch reference."""
    out = []
    for i, (dtype, shape, init) in enumerate(cases):
        raw_img, raw_txt, ref_params = make_problem(world * b_local, dtype, shape, init, i, bias)
        _, _, params = make_problem(world * b_local, dtype, shape, init, i, bias)
        ref_loss, ref = forward_backward(raw_img, raw_txt, ref_params, reference)

        rows = slice(rank * b_local, (rank + 1) * b_local)
        loss, got = forward_backward(raw_img[rows], raw_txt[rows], params, loss_fn)
        # The data-parallel reduction DeepSpeed applies to every parameter gradient: sum, ÷N.
        mean_loss = loss.clone()
        dist.all_reduce(mean_loss)
        mean_loss /= world
        for key in got:
            if key in ("x", "y"):  # reassemble the full feature gradient from every rank
                parts = [torch.empty_like(got[key]) for _ in range(world)]
                dist.all_gather(parts, got[key])
                got[key] = torch.cat(parts)
            else:
                dist.all_reduce(got[key])
            got[key] /= world
        errs = {k: rel_err(got[k], ref[k]) for k in ref}
        errs["loss"] = rel_err(mean_loss, ref_loss)
        errs["scalar_shapes_kept"] = float(
            any(got[k].shape != torch.Size(shape) for k in SCALARS if k in got)
        )
        out.append(errs)
    return out


def assert_within(errs_per_case: list[dict], cases: list[tuple], tol: dict, what: str) -> None:
    """Every relative error of every case within tol[dtype]; scalar shapes unchanged."""
    for (dtype, shape, _), errs in zip(cases, errs_per_case, strict=True):
        errs = dict(errs)
        assert errs.pop("scalar_shapes_kept") == 0.0, f"{what}: scalar grad shape changed"
        worst = max(errs, key=errs.get)
        assert errs[worst] <= tol[dtype], (
            f"{what} {dtype} scalars{list(shape)}: {worst} rel err {errs[worst]:.2e}"
        )


class AveragingGather(torch.autograd.Function):
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


def averaging_gather(local: torch.Tensor, group=None) -> torch.Tensor:
    return AveragingGather.apply(local, group)
