"""The losses without any process group: the plain single-process CLIP loss."""

import math

import pytest
import torch
import torch.nn.functional as F

from tests.dist.test_loss_parity import reference_loss
from trainer.losses.disco import disco_clip_loss, full_batch_clip_loss, logit_scale_value


@pytest.mark.parametrize("loss_fn", [disco_clip_loss, full_batch_clip_loss])
def test_no_process_group_is_plain_clip_loss(loss_fn) -> None:
    gen = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(7, 5, generator=gen, dtype=torch.float64), dim=-1)
    y = F.normalize(torch.randn(7, 5, generator=gen, dtype=torch.float64), dim=-1)
    scale = torch.tensor(2.0, dtype=torch.float64)
    assert torch.allclose(loss_fn(x, y, scale), reference_loss(x, y, scale), rtol=1e-12)


def test_bf16_features_are_reduced_in_fp32() -> None:
    gen = torch.Generator().manual_seed(1)
    x = F.normalize(torch.randn(16, 8, generator=gen), dim=-1)
    y = F.normalize(torch.randn(16, 8, generator=gen), dim=-1)
    scale = torch.tensor(math.log(100.0))
    loss = disco_clip_loss(x.bfloat16(), y.bfloat16(), scale)
    assert loss.dtype == torch.float32
    assert torch.allclose(loss, reference_loss(x, y, scale), rtol=2e-2)


def test_logit_scale_is_clamped_at_100_and_must_be_one_element() -> None:
    assert logit_scale_value(torch.tensor([7.0])).item() == pytest.approx(100.0)
    assert logit_scale_value(torch.tensor(1.0)).item() == pytest.approx(math.e)
    with pytest.raises(ValueError, match="one element"):
        logit_scale_value(torch.zeros(2))


def test_mismatched_feature_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="same shape"):
        disco_clip_loss(torch.zeros(4, 3), torch.zeros(5, 3), torch.tensor(1.0))


def test_bf16_loss_math_runs_in_fp32() -> None:
    """bf16 features and a bf16 logit_scale: the scale reaches exactly 100 at the bound (a bf16
    clamp tops out at 98.9), and the logits and softmax are computed in fp32, so the loss equals
    the fp32 loss of the same (bf16-rounded) values."""
    bound = torch.tensor(math.log(100.0)).bfloat16()  # 4.59375 < ln 100 after rounding
    assert logit_scale_value(torch.tensor([5.0]).bfloat16()).item() == pytest.approx(100.0, 1e-6)
    assert logit_scale_value(bound).dtype == torch.float32
    gen = torch.Generator().manual_seed(3)
    x = F.normalize(torch.randn(32, 16, generator=gen), dim=-1).bfloat16()
    y = F.normalize(torch.randn(32, 16, generator=gen), dim=-1).bfloat16()
    scale = torch.tensor(math.log(1 / 0.07)).bfloat16()
    for loss_fn in (disco_clip_loss, full_batch_clip_loss):
        got = loss_fn(x, y, scale)
        want = reference_loss(x.float(), y.float(), scale.float())
        assert got.dtype == torch.float32
        assert abs(got.item() - want.item()) <= 1e-6 * want.item(), loss_fn.__name__


def _scale_grad(init: float, pull_up: bool) -> float:
    """d loss / d logit_scale for a loss whose descent raises the scale (aligned pairs) or
    lowers it (shuffled pairs)."""
    gen = torch.Generator().manual_seed(0)
    # Nearly parallel features: margins of ~1e-4, far from saturating even at s = 100.
    x = F.normalize(torch.ones(8, 16) + 0.01 * torch.randn(8, 16, generator=gen), dim=-1)
    y = x.clone() if pull_up else x.roll(1, dims=0)
    logit_scale = torch.tensor([init], requires_grad=True)
    disco_clip_loss(x, y, logit_scale).backward()
    return logit_scale.grad.item()


def test_scale_pushed_past_the_bound_can_come_back() -> None:
    """Above ln 100 the clamp lets a gradient through when descent lowers the scale, and blocks
    it when descent would raise it further (a plain clamp blocks both: stuck for good)."""
    over = math.log(100.0) + 0.5
    assert _scale_grad(over, pull_up=False) > 0  # descent lowers it: passes
    assert _scale_grad(over, pull_up=True) == 0.0  # descent would raise it: blocked
    assert _scale_grad(1.0, pull_up=True) < 0  # below the bound: the ordinary gradient


def test_simulated_group_is_one_rank_of_n() -> None:
    """SimulatedGroup (bench mode): the gathered rows hold the local features at the rank's
    slice and fixed unit vectors elsewhere; the loss is this rank's DisCo share over them."""
    from trainer.losses.disco import SimulatedGroup, gather_rows

    group = SimulatedGroup(rank=1, world=3, seed=7)
    gen = torch.Generator().manual_seed(1)
    x = F.normalize(torch.randn(4, 8, generator=gen), dim=-1).requires_grad_()
    y = F.normalize(torch.randn(4, 8, generator=gen), dim=-1).requires_grad_()
    all_x, all_y = gather_rows(x, group), gather_rows(y, group)
    assert all_x.shape == (12, 8) and torch.equal(all_x[4:8], x)
    assert torch.allclose(all_x.norm(dim=1), torch.ones(12))
    assert torch.equal(gather_rows(x, group), all_x)  # deterministic
    scale = torch.tensor(2.0)
    loss = disco_clip_loss(x, y, scale, group=group)
    labels = torch.arange(4) + 4
    want = 0.5 * (
        F.cross_entropy(scale.exp() * x @ all_y.T, labels)
        + F.cross_entropy(scale.exp() * y @ all_x.T, labels)
    )
    assert torch.allclose(loss, want)
    loss.backward()
    assert x.grad.shape == (4, 8) and torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match="rank 3"):
        SimulatedGroup(rank=3, world=3)
