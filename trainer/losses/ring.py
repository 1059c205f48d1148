"""The tiled DisCo loss with the B columns passed round a ring instead of all-gathered.

Same value, gradients and scaling contract as `trainer.losses.tiled.tiled_disco_clip_loss`
(docs/tiled.md, "Ring"): no rank ever holds more than a few (b, d) chunks of the other ranks'
features, at the price of N sequential point-to-point hops per direction.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from trainer.losses.disco import _world
from trainer.losses.tiled import DEFAULT_TILE_SIZE, _OnlineLse, _prepare, _tile_grads


def _ring_pass(
    tensors: list[torch.Tensor], group: dist.ProcessGroup | None, rank: int, world: int
) -> list[torch.Tensor]:
    """Send each tensor to the next rank in the ring; return those received from the previous."""
    nxt, prev = (rank + 1) % world, (rank - 1) % world
    if group is not None:  # point-to-point takes global ranks
        nxt, prev = dist.get_global_rank(group, nxt), dist.get_global_rank(group, prev)
    received = [torch.empty_like(t) for t in tensors]
    ops = [dist.P2POp(dist.isend, t, nxt, group) for t in tensors]
    ops += [dist.P2POp(dist.irecv, r, prev, group) for r in received]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return received


class _RingTiledClip(torch.autograd.Function):
    """`_TiledClip` with the B columns arriving as N chunks of b round a ring, never all at once.

    Step k holds the features of rank (rank − k) mod N. In the backward each chunk travels
    with a gradient buffer to which every rank adds Σ_i p_ij·rows_i for that chunk; after N
    hops it is home, carrying Σ_m ∂L_m/∂(own columns) — the reduce-scatter's sum, by ring.
    """

    @staticmethod
    def forward(ctx, x, y, scale, group, tile):
        rank, world = _world(group)
        b = x.shape[0]
        s = scale.item()  # a Python float lets the GEMMs apply s (alpha); one sync on CUDA
        img, txt = _OnlineLse(x, s, tile, b), _OnlineLse(y, s, tile, b)
        cols_x, cols_y = x, y
        for step in range(world):
            img.add(cols_y)  # image rows vs rank (rank − step)'s texts
            txt.add(cols_x)  # text rows vs its images
            if step < world - 1:
                cols_x, cols_y = _ring_pass([cols_x, cols_y], group, rank, world)
        lse_img, lse_txt = img.result(), txt.result()
        pos = torch.einsum("id,id->", x, y)  # positives: this rank's own pairs
        ctx.save_for_backward(x, y, scale, lse_img, lse_txt)
        ctx.group, ctx.tile = group, tile
        return (0.5 * (lse_img.sum() + lse_txt.sum()) - scale * pos) / b

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        x, y, scale, lse_img, lse_txt = ctx.saved_tensors
        rank, world = _world(ctx.group)
        b = x.shape[0]
        s = scale.item()
        coef = s / (2 * b)
        gx, gy = torch.zeros_like(x), torch.zeros_like(y)  # row terms, scaled by coef
        cols_x, cols_y = x, y
        col_gx, col_gy = torch.zeros_like(x), torch.zeros_like(y)  # travelling column terms
        dot = x.new_zeros(())
        for step in range(world):
            dot += _tile_grads(x, cols_y, lse_img, s, ctx.tile, gx, coef, col_gy)
            dot += _tile_grads(y, cols_x, lse_txt, s, ctx.tile, gy, coef, col_gx)
            if world == 1:
                break
            if step < world - 1:  # the last hop only takes the gradients home
                cols_x, cols_y, col_gx, col_gy = _ring_pass(
                    [cols_x, cols_y, col_gx, col_gy], ctx.group, rank, world
                )
            else:
                col_gx, col_gy = _ring_pass([col_gx, col_gy], ctx.group, rank, world)
        gx.add_(col_gx, alpha=coef).sub_(y, alpha=s / b).mul_(grad_loss)
        gy.add_(col_gy, alpha=coef).sub_(x, alpha=s / b).mul_(grad_loss)
        grad_scale = (0.5 * dot - torch.einsum("id,id->", x, y)) * (grad_loss / b)
        return gx, gy, grad_scale, None, None


def ring_tiled_disco_clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    tile_size: int = DEFAULT_TILE_SIZE,
) -> torch.Tensor:
    """`tiled_disco_clip_loss` without gathering: O(b·t + b·d) loss memory per rank.

    Same arguments, value and contract. Features travel round a ring of point-to-point
    messages (N − 1 hops forward, N backward) instead of being all-gathered, so no rank holds
    more than a few (b, d) chunks; it pays for that in latency (N sequential hops, no overlap).
    """
    x, y, scale = _prepare(image_features, text_features, logit_scale, tile_size, group)
    return _RingTiledClip.apply(x, y, scale, group, tile_size)
