"""The SigLIP loss in one process, and the objective table."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainer.losses.registry import LOSSES, LossConfig, needs_bias
from trainer.losses.siglip import SIGLIP_INIT_LOGIT_BIAS, SIGLIP_INIT_LOGIT_SCALE, siglip_loss


def test_matches_the_pairwise_definition() -> None:
    gen = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(6, 4, generator=gen, dtype=torch.float64), dim=-1)
    y = F.normalize(torch.randn(6, 4, generator=gen, dtype=torch.float64), dim=-1)
    scale = torch.tensor([SIGLIP_INIT_LOGIT_SCALE], dtype=torch.float64)
    bias = torch.tensor(SIGLIP_INIT_LOGIT_BIAS, dtype=torch.float64)
    want = 0.0
    for i in range(6):
        for j in range(6):
            z = 1.0 if i == j else -1.0
            logit = 10.0 * float(x[i] @ y[j]) + SIGLIP_INIT_LOGIT_BIAS
            want -= math.log(1 / (1 + math.exp(-z * logit)))
    assert siglip_loss(x, y, scale, bias).item() == pytest.approx(want / 6, rel=1e-12)


def test_saturated_pairs_keep_their_gradient() -> None:
    # A positive with logit 90: its gradient is −σ(−90) ≈ 8e-40, not 0 or a rounding error.
    x = torch.tensor([[1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    bias = torch.tensor([-10.0], dtype=torch.float64, requires_grad=True)
    siglip_loss(x, y, torch.tensor(math.log(100.0), dtype=torch.float64), bias).backward()
    assert bias.grad.item() == pytest.approx(-math.exp(-90), rel=1e-12)


def test_bias_must_have_one_element() -> None:
    with pytest.raises(ValueError, match="logit_bias"):
        siglip_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor(1.0), torch.zeros(2))


def test_objective_table_and_config() -> None:
    assert set(LOSSES) == {"disco", "naive", "tiled", "ring", "siglip"}
    assert needs_bias("siglip") and not needs_bias("disco")
    LossConfig().validate()
    assert LossConfig(name="tiled", tile_size=64).loss_kwargs() == {"tile_size": 64}
    assert LossConfig(name="ring", tile_size=8).loss_kwargs() == {"tile_size": 8}
    assert LossConfig(name="disco").loss_kwargs() == {}
    with pytest.raises(ValueError, match=r"^name: .*disco.*siglip"):
        LossConfig(name="infonce").validate()
    with pytest.raises(ValueError, match=r"^tile_size"):
        LossConfig(name="tiled", tile_size=0).validate()
