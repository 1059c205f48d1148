"""Distributed losses vs an independent single-process full-batch CLIP loss.

Each rank encodes its b rows with a shared linear "tower" (so we can check parameter gradients
after the ÷N data-parallel average, as DeepSpeed does), computes the loss over the gloo group,
and back-propagates (tests/dist/_parity.py). A failure localises as follows:
- loss mismatch: wrong labels / rows / scale in the forward;
- feature-gradient mismatch with loss OK: the gather's backward (sum vs average, own slice);
- only logit_scale mismatch: the per-rank loss is not the mean over local rows.
"""

from __future__ import annotations

import math

import pytest
import torch

import trainer.losses.disco as loss_mod
from tests.dist._parity import (
    assert_within,
    averaging_gather,
    errors_vs_reference,
    reference_scale,
)
from tests.support.localdist import run_ranks

B_LOCAL = 5
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
    """CLIP's full-batch symmetric cross-entropy, written out independently of trainer.losses.disco."""
    scale = reference_scale(logit_scale)
    logits = scale * x @ y.T
    log_p = logits - logits.logsumexp(dim=1, keepdim=True)
    log_q = logits.T - logits.T.logsumexp(dim=1, keepdim=True)
    return -0.5 * (log_p.diagonal().mean() + log_q.diagonal().mean())


def clip_errors(rank: int, world: int, loss_fn) -> list[dict[str, float]]:
    """Per CASES entry: relative errors of `loss_fn` run on this group vs `reference_loss`."""
    return errors_vs_reference(rank, world, B_LOCAL, loss_fn, reference_loss, CASES)


def _parity_rank(rank: int, world: int) -> dict:
    results = {name: clip_errors(rank, world, fn) for name, fn in LOSSES.items()}
    real_gather = loss_mod.gather_rows
    loss_mod.gather_rows = averaging_gather
    try:
        results["avg_backward"] = clip_errors(rank, world, loss_mod.disco_clip_loss)
    finally:
        loss_mod.gather_rows = real_gather
    return results


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_distributed_losses_equal_full_batch(world: int) -> None:
    per_rank = run_ranks(_parity_rank, world)
    for rank, results in enumerate(per_rank):
        for name in LOSSES:
            assert_within(results[name], CASES, TOL, f"{name} rank {rank}/{world}")
        # The averaging backward must be caught whenever there is more than one rank.
        for (dtype, _, _), errs in zip(CASES, results["avg_backward"], strict=True):
            if world == 1:
                assert max(errs[k] for k in ("x", "y", "w_img", "w_txt")) <= TOL[dtype]
            else:
                assert min(errs[k] for k in ("x", "y", "w_img", "w_txt")) > 0.1


def _bf16_reduce_scatter_rank(rank: int, world: int) -> list[str]:
    """The dtypes that reach the gather's reduce-scatter when the towers run in bf16."""
    seen: list[str] = []
    real = loss_mod._reduce_scatter_single

    def recording(out, inp, *args, **kwargs):
        seen.append(str(inp.dtype))
        return real(out, inp, *args, **kwargs)

    loss_mod._reduce_scatter_single = recording
    try:
        gen = torch.Generator().manual_seed(rank)
        x = torch.randn(B_LOCAL, 8, generator=gen).bfloat16().requires_grad_()
        y = torch.randn(B_LOCAL, 8, generator=gen).bfloat16().requires_grad_()
        loss_mod.disco_clip_loss(x, y, torch.tensor(2.0).bfloat16()).backward()
        assert x.grad.dtype == torch.bfloat16  # rounded back once, after the fp32 sum
    finally:
        loss_mod._reduce_scatter_single = real
    return seen


def test_feature_gradients_are_summed_across_ranks_in_fp32() -> None:
    """With bf16 towers, the reduce-scatter that adds the other ranks' feature gradients runs on
    fp32 tensors: a bf16 sum would round every partial sum to 8 mantissa bits."""
    for seen in run_ranks(_bf16_reduce_scatter_rank, 2):
        assert seen == ["torch.float32", "torch.float32"]


def _parity_without_single_collectives(rank: int, world: int) -> list[dict[str, float]]:
    """torch < 2.13 (the GPU machine has 2.11) has no all_gather_single/reduce_scatter_single:
    remove them, re-import the losses and check parity again."""
    import importlib

    import torch.distributed as dist

    for name in ("all_gather_single", "reduce_scatter_single"):
        if hasattr(dist, name):
            delattr(dist, name)
    fresh = importlib.reload(loss_mod)
    assert fresh._all_gather_single is dist.all_gather_into_tensor
    assert fresh._reduce_scatter_single is dist.reduce_scatter_tensor
    return clip_errors(rank, world, fresh.disco_clip_loss)


def test_parity_holds_with_the_older_collective_names() -> None:
    for rank, errs in enumerate(run_ranks(_parity_without_single_collectives, 2)):
        assert_within(errs, CASES, TOL, f"disco without *_single, rank {rank}/2")
