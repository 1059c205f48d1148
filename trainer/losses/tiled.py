"""The DisCo CLIP loss over column tiles: exact, without ever building the b×B logit block.

Same value, gradients and scaling contract as `trainer.losses.disco.disco_clip_loss` (see that module's
docstring): each rank returns the mean over its b rows of the symmetric cross-entropy, and
after the data-parallel ÷N every parameter gradient is the full-batch gradient.

How (docs/tiled.md): for each of this rank's rows the
log-sum-exp over all B columns is accumulated online over tiles of t columns, in both
directions, keeping b numbers per direction. The backward recomputes each tile's
probabilities p_ij = exp(s·x_i·y_j − lse_i) and accumulates, tile by tile,
    ∂/∂x_i  += s/(2b) · Σ_j p_ij·y_j     (this rank's rows)
    ∂/∂y_j   = s/(2b) · Σ_i p_ij·x_i     (gathered columns; reduce-scattered with a SUM)
and ∂/∂s = 1/(2b)·Σ_ij p_ij·x_i·y_j (both directions) − 1/b·Σ_i x_i·y_i, the sum taken as
Σ_j y_j·(Σ_i p_ij·x_i) before the tile's columns are overwritten (next paragraph).

Memory per rank, in elements: the gathered features 2·B·d (kept from forward to backward, as
DisCo keeps them) + one (b, t) tile + a few (b, d) row buffers, i.e. O(b·t + B·d); no b×B
tensor ever exists. The gathered tensors are owned here, so the backward writes each tile's
column gradients into the columns' own storage, and sends (reduce-scatters) and frees the
text columns before the image columns are processed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from trainer.losses.disco import (
    SimulatedGroup,
    _all_gather_single,
    _check_pair,
    _compute_dtype,
    _reduce_scatter_single,
    _world,
    logit_scale_value,
)

DEFAULT_TILE_SIZE = 512


def _gather_owned(local: torch.Tensor, group: dist.ProcessGroup | None, world: int) -> torch.Tensor:
    """All-gather (no autograd) into a fresh (B, d) tensor this module may overwrite."""
    if world == 1:
        return local.clone()
    gathered = local.new_empty((world * local.shape[0], local.shape[1]))
    _all_gather_single(gathered, local, group=group)
    return gathered


def _reduce_scatter_sum(
    full: torch.Tensor, group: dist.ProcessGroup | None, world: int
) -> torch.Tensor:
    """Rank n's slice of Σ_m full_m: the gradients every rank computed for rank n's rows."""
    if world == 1:
        return full
    local = full.new_empty((full.shape[0] // world, full.shape[1]))
    _reduce_scatter_single(local, full, op=dist.ReduceOp.SUM, group=group)
    return local


def _tile_buffer(rows: torch.Tensor, n_cols: int, tile: int) -> torch.Tensor:
    """Flat storage for one (b, t) tile, reused by every tile (the last may be narrower)."""
    return rows.new_empty(rows.shape[0] * min(tile, n_cols))


class _OnlineLse:
    """Running log Σ_j exp(s·rows_i·cols_j) per row, fed one block of columns at a time.

    Max-shifted accumulation (as in flash attention): never exp of an unshifted logit, so it
    cannot overflow, and only b running maxima and sums are kept besides one (b, t) tile.
    """

    def __init__(self, rows: torch.Tensor, scale: float, tile: int, n_cols: int) -> None:
        self.rows, self.scale, self.tile = rows, scale, tile
        self.run_max = rows.new_full((rows.shape[0],), -torch.inf)
        self.run_sum = rows.new_zeros(rows.shape[0])
        self.flat = _tile_buffer(rows, n_cols, tile)

    def add(self, cols: torch.Tensor) -> None:
        b = self.rows.shape[0]
        for start in range(0, cols.shape[0], self.tile):
            block = cols[start : start + self.tile]
            logits = self.flat[: b * block.shape[0]].view(b, block.shape[0])
            logits.addmm_(self.rows, block.T, beta=0, alpha=self.scale)  # (b,d)·(d,t) -> (b,t)
            new_max = torch.maximum(self.run_max, logits.amax(dim=1))
            self.run_sum.mul_(torch.exp(self.run_max - new_max))
            self.run_sum.add_(logits.sub_(new_max[:, None]).exp_().sum(dim=1))
            self.run_max = new_max

    def result(self) -> torch.Tensor:
        return self.run_max + self.run_sum.log()  # (b,)


def _row_lse(rows: torch.Tensor, cols: torch.Tensor, scale: float, tile: int) -> torch.Tensor:
    """log Σ_j exp(s·rows_i·cols_j) for every row, over all of `cols`, tile by tile."""
    acc = _OnlineLse(rows, scale, tile, cols.shape[0])
    acc.add(cols)
    return acc.result()


def _tile_grads(
    rows: torch.Tensor,
    cols: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    tile: int,
    grad_rows: torch.Tensor,
    alpha: float,
    grad_cols: torch.Tensor | None = None,
) -> torch.Tensor:
    """Adds alpha·Σ_j p_ij·cols_j to grad_rows and Σ_i p_ij·rows_i to grad_cols.

    grad_cols=None overwrites `cols` with their gradient instead: tile j's columns are last
    needed by tile j itself, so gathered features and their gradients never coexist. Returns
    Σ_j cols_j·(Σ_i p_ij·rows_i) = Σ_ij p_ij·rows_i·cols_j (for ∂/∂s).
    """
    b, d = rows.shape
    flat = _tile_buffer(rows, cols.shape[0], tile)
    col_grad = rows.new_empty((min(tile, cols.shape[0]), d))
    dot = rows.new_zeros(())
    for start in range(0, cols.shape[0], tile):
        block = cols[start : start + tile]
        t = block.shape[0]
        probs = flat[: b * t].view(b, t)
        probs.addmm_(rows, block.T, beta=0, alpha=scale)  # s · (b, d)·(d, t) -> (b, t)
        probs.sub_(lse[:, None]).exp_()
        grad_rows.addmm_(probs, block, alpha=alpha)  # (b, t)·(t, d) -> (b, d)
        torch.mm(probs.T, rows, out=col_grad[:t])  # (t, b)·(b, d) -> (t, d)
        dot += torch.einsum("jd,jd->", block, col_grad[:t])
        if grad_cols is None:
            block.copy_(col_grad[:t])
        else:
            grad_cols[start : start + t].add_(col_grad[:t])
    return dot


class _TiledClip(torch.autograd.Function):
    """Forward: the per-rank DisCo loss. Backward: tile-by-tile recompute (see module doc)."""

    @staticmethod
    def forward(ctx, x, y, scale, group, tile):
        _, world = _world(group)
        b = x.shape[0]
        # A Python float lets the GEMMs apply s for free (alpha); on CUDA this is one sync.
        s = scale.item()
        all_x = _gather_owned(x, group, world)  # (B, d)
        all_y = _gather_owned(y, group, world)  # (B, d)
        lse_img = _row_lse(x, all_y, s, tile)  # (b,) image rows vs all texts
        lse_txt = _row_lse(y, all_x, s, tile)  # (b,) text rows vs all images
        # The positives s·x_i·y_i (column rank·b + i is this rank's own pair i).
        pos = torch.einsum("id,id->", x, y)
        loss = (0.5 * (lse_img.sum() + lse_txt.sum()) - scale * pos) / b
        ctx.save_for_backward(x, y, scale, lse_img, lse_txt)
        # Not saved tensors: the backward overwrites them in place (gradients reuse storage).
        ctx.gathered = (all_x, all_y)
        ctx.group, ctx.world, ctx.tile = group, world, tile
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        if ctx.gathered is None:
            raise RuntimeError("tiled_disco_clip_loss: backward twice (retain_graph) unsupported")
        x, y, scale, lse_img, lse_txt = ctx.saved_tensors
        all_x, all_y = ctx.gathered
        ctx.gathered = None
        b = x.shape[0]
        s = scale.item()
        coef = s / (2 * b)  # ∂L_n/∂logit_ij = (p_ij − δ_ij)/(2b), and ∂logit/∂x = s·y

        # Image rows vs all texts; all_y then holds raw text-column gradients. Sending them
        # at once lets all_y go before the text direction starts.
        gx = torch.zeros_like(x)
        dot_img = _tile_grads(x, all_y, lse_img, s, ctx.tile, gx, coef)
        gy = _reduce_scatter_sum(all_y.mul_(coef), ctx.group, ctx.world)  # (b, d)
        del all_y
        # Text rows vs all images, accumulated onto the text-column gradients just received.
        dot_txt = _tile_grads(y, all_x, lse_txt, s, ctx.tile, gy, coef)
        gx.add_(_reduce_scatter_sum(all_x.mul_(coef), ctx.group, ctx.world))
        del all_x

        # The positives −s/b·x_i·y_i, in both gradients and in ∂L_n/∂s.
        gx.sub_(y, alpha=s / b).mul_(grad_loss)
        gy.sub_(x, alpha=s / b).mul_(grad_loss)
        grad_scale = (0.5 * (dot_img + dot_txt) - torch.einsum("id,id->", x, y)) * (grad_loss / b)
        return gx, gy, grad_scale, None, None


def _prepare(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    tile_size: int,
    group=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checked inputs in the compute dtype (at least fp32) and the clamped scale s."""
    _check_pair(image_features, text_features)
    if isinstance(group, SimulatedGroup):
        raise TypeError("tiled and ring losses gather on their own: SimulatedGroup is for disco")
    if tile_size < 1:
        raise ValueError(f"tile_size must be ≥ 1, got {tile_size}")
    dtype = _compute_dtype(image_features)
    scale = logit_scale_value(logit_scale).to(dtype)
    x = image_features.to(dtype).contiguous()
    y = text_features.to(dtype).contiguous()
    return x, y, scale


def tiled_disco_clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    tile_size: int = DEFAULT_TILE_SIZE,
) -> torch.Tensor:
    """`disco_clip_loss` computed over column tiles: O(b·t + B·d) loss memory per rank.

    Args:
        image_features, text_features: this rank's b L2-normalised embeddings, (b, d) each.
            Every rank in `group` must pass the same b. Computed in at least fp32.
        logit_scale: the log-scale parameter, any one-element shape; clamped at ln 100.
        group: the data-parallel process group (None: default; uninitialised: single process).
        tile_size: columns per tile t. Any t ≥ 1 is exact; t need not divide B.

    Returns:
        This rank's scalar loss, equal to `disco_clip_loss` to rounding (same contract).
    """
    x, y, scale = _prepare(image_features, text_features, logit_scale, tile_size, group)
    return _TiledClip.apply(x, y, scale, group, tile_size)
