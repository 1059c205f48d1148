"""The tiled DisCo losses (gathered and ring) and the SigLIP loss vs independent single-process full-batch formulas.

One launch per world size runs every check (process start costs seconds). Failures localise
as in test_loss_parity.py; in addition, for the tiled loss:
- only some tile sizes fail: the online log-sum-exp merge or the last, narrower tile;
- feature gradients fail with the loss right: the tile backward or its reduce-scatter;
- only logit_scale fails: the Σ p_ij·x_i·y_j accumulation.
For SigLIP, a bias-gradient failure alone means the bias is counted per rank, not per row.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

import trainer.losses.siglip as siglip_mod
from tests.dist._parity import (
    assert_within,
    averaging_gather,
    errors_vs_reference,
    reference_scale,
)
from tests.dist.test_loss_parity import CASES, TOL, clip_errors
from tests.support.localdist import run_ranks
from trainer.losses.ring import ring_tiled_disco_clip_loss
from trainer.losses.tiled import tiled_disco_clip_loss

B_LOCAL = 5
# B = 5·N: 1 and 3 never divide it evenly into one tile, 7 rarely divides it, 64 exceeds it.
TILE_SIZES = [1, 3, 7, 64]
TILED = {
    **{f"tiled t={t}": (tiled_disco_clip_loss, t) for t in TILE_SIZES},
    **{f"ring t={t}": (ring_tiled_disco_clip_loss, t) for t in (3, 64)},
}
SIGLIP_BIAS = -10.0
SIGLIP_CASES = [
    (torch.float64, (), math.log(10)),  # SigLIP's init: s = 10, bias = −10
    (torch.float64, (1,), 5.0),  # past the clamp at ln 100
    (torch.float32, (1,), math.log(10)),
]


def reference_siglip(x, y, logit_scale, logit_bias) -> torch.Tensor:
    """−1/B · Σ_ij log σ(z_ij·(s·x_i·y_j + bias)) over the full batch, written out directly."""
    scale = reference_scale(logit_scale)
    z = 2 * torch.eye(x.shape[0], dtype=x.dtype) - 1  # +1 on the diagonal, −1 elsewhere
    return -F.logsigmoid(z * (scale * x @ y.T + logit_bias.reshape(()))).sum() / x.shape[0]


def siglip_errors(rank: int, world: int) -> list[dict[str, float]]:
    return errors_vs_reference(
        rank, world, B_LOCAL, siglip_mod.siglip_loss, reference_siglip, SIGLIP_CASES, SIGLIP_BIAS
    )


def _checks_rank(rank: int, world: int) -> dict:
    results = {
        name: clip_errors(rank, world, functools.partial(fn, tile_size=t))
        for name, (fn, t) in TILED.items()
    }
    results["siglip"] = siglip_errors(rank, world)
    real_gather = siglip_mod.gather_rows
    siglip_mod.gather_rows = averaging_gather
    try:
        results["siglip avg_backward"] = siglip_errors(rank, world)
    finally:
        siglip_mod.gather_rows = real_gather
    return results


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_tiled_and_siglip_equal_full_batch(world: int) -> None:
    per_rank = run_ranks(_checks_rank, world)
    for rank, results in enumerate(per_rank):
        for name in TILED:
            assert_within(results[name], CASES, TOL, f"{name} rank {rank}/{world}")
        assert_within(results["siglip"], SIGLIP_CASES, TOL, f"siglip rank {rank}/{world}")
        # The test must notice a gather that averages instead of summing.
        for (dtype, _, _), errs in zip(SIGLIP_CASES, results["siglip avg_backward"], strict=True):
            worst = max(errs[k] for k in ("y", "w_txt"))
            assert worst <= TOL[dtype] if world == 1 else worst > 0.1
