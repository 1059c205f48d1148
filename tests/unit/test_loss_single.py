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
