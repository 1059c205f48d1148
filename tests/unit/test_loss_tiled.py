"""The tiled DisCo loss in one process: equal to DisCo, and never holding a b×B tensor."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.dist.test_loss_parity import reference_loss
from tests.support.memory import peak_tensor_bytes
from trainer.losses.disco import disco_clip_loss
from trainer.losses.ring import ring_tiled_disco_clip_loss
from trainer.losses.tiled import tiled_disco_clip_loss


def _features(n: int, d: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=-1)
    y = F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=-1)
    return x.to(dtype).requires_grad_(), y.to(dtype).requires_grad_()


@pytest.mark.parametrize("tile_size", [1, 4, 13, 100])
@pytest.mark.parametrize("tiled", [tiled_disco_clip_loss, ring_tiled_disco_clip_loss])
def test_equals_disco_without_process_group(tiled, tile_size: int) -> None:
    x, y = _features(13, 6, torch.float64)
    scale = torch.tensor([math.log(1 / 0.07)], dtype=torch.float64, requires_grad=True)
    want = torch.autograd.grad(disco_clip_loss(x, y, scale), (x, y, scale))
    loss = tiled(x, y, scale, tile_size=tile_size)
    got = torch.autograd.grad(loss, (x, y, scale))
    assert torch.allclose(loss, reference_loss(x, y, scale), rtol=1e-12)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        assert torch.allclose(g, w, rtol=1e-10, atol=1e-14)


def test_large_logits_do_not_overflow() -> None:
    # Unnormalised features: logits in the thousands, where a plain exp would overflow.
    x, y = _features(9, 4, torch.float64, seed=3)
    with torch.no_grad():
        x.mul_(30)
    scale = torch.tensor(math.log(100.0), dtype=torch.float64, requires_grad=True)
    want = torch.autograd.grad(disco_clip_loss(x, y, scale), (x, y, scale))
    loss = tiled_disco_clip_loss(x, y, scale, tile_size=2)
    got = torch.autograd.grad(loss, (x, y, scale))
    assert torch.isfinite(loss)
    assert torch.allclose(loss, disco_clip_loss(x, y, scale), rtol=1e-12)
    for g, w in zip(got, want, strict=True):
        assert torch.allclose(g, w, rtol=1e-9, atol=1e-12)


def test_bf16_features_get_bf16_gradients_and_fp32_loss() -> None:
    x, y = _features(16, 8, torch.bfloat16)
    scale = torch.tensor(math.log(10.0))
    loss = tiled_disco_clip_loss(x, y, scale, tile_size=5)
    loss.backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    assert torch.allclose(loss, disco_clip_loss(x.float(), y.float(), scale), rtol=1e-5)


def test_inputs_are_not_modified_and_second_backward_is_refused() -> None:
    x, y = _features(6, 3, torch.float64)
    before = (x.detach().clone(), y.detach().clone())
    loss = tiled_disco_clip_loss(x, y, torch.tensor(2.0, dtype=torch.float64), tile_size=4)
    loss.backward(retain_graph=True)
    assert torch.equal(x, before[0]) and torch.equal(y, before[1])
    with pytest.raises(RuntimeError, match="backward twice"):
        loss.backward()


def test_bad_tile_size_is_refused() -> None:
    x, y = _features(4, 3, torch.float64)
    with pytest.raises(ValueError, match="tile_size"):
        tiled_disco_clip_loss(x, y, torch.tensor(1.0), tile_size=0)


def test_backward_never_holds_a_b_by_B_tensor() -> None:
    """Peak live tensor bytes of forward+backward: DisCo needs several b×B blocks, the tiled
    loss O(b·t + B·d). The bound, an eighth of one b×B block, fails if any b×B tensor exists."""
    n, d, tile = 1536, 8, 48
    x, y = _features(n, d, torch.float64)
    scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    block = n * n * 8  # one b×B fp64 tensor (b = B without a process group): 18 MiB
    small = (n * tile + n * d) * 8  # one tile + one copy of the features: 0.66 MiB

    def run(loss_fn):
        x.grad = y.grad = scale.grad = None
        return peak_tensor_bytes(lambda: loss_fn(x, y, scale).backward())

    assert run(disco_clip_loss) > block  # the measurement does see b×B tensors
    tiled_peak = run(lambda a, b, s: tiled_disco_clip_loss(a, b, s, tile_size=tile))
    assert tiled_peak < block / 8
    assert tiled_peak < 4 * small
