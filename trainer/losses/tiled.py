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

Memory per rank, in elements: one gathered (B, d) feature tensor at a time (each direction
gathers its columns, uses them and drops them; the backward gathers them again instead of
keeping both from the forward) + one (b, t) tile + one (t, d) column buffer + a few (b, d)
row buffers, i.e. O(b·t + B·d); no b×B tensor ever exists. The gathered tensors are owned
here, so the backward writes each tile's column gradients into the columns' own storage, and
sends (reduce-scatters) and frees the text columns before the image columns are gathered.
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
        # A flat dot product: einsum here would allocate two (t, d) temporaries per tile.
        dot += torch.vdot(block.reshape(-1), col_grad[:t].view(-1))
        if grad_cols is None:
            block.copy_(col_grad[:t])
        else:
            grad_cols[start : start + t].add_(col_grad[:t])
    return dot


class _TiledClip(torch.autograd.Function):
    """Forward: the per-rank DisCo loss. Backward: tile-by-tile recompute (see module doc).

    Only one gathered (B, d) tensor exists at a time: each direction gathers its columns,
    uses them and drops them, and the backward gathers them again rather than keeping both
    from the forward (an all-gather of B·d values costs far less than a b·B·d matmul).
    """

    @staticmethod
    def forward(ctx, x, y, scale, group, tile):
        _, world = _world(group)
        b = x.shape[0]
        # A Python float lets the GEMMs apply s for free (alpha); on CUDA this is one sync.
        s = scale.item()
        lse_img = _row_lse(x, _gather_owned(y, group, world), s, tile)  # image rows vs texts
        lse_txt = _row_lse(y, _gather_owned(x, group, world), s, tile)  # text rows vs images
        # The positives s·x_i·y_i (column rank·b + i is this rank's own pair i).
        pos = torch.einsum("id,id->", x, y)
        loss = (0.5 * (lse_img.sum() + lse_txt.sum()) - scale * pos) / b
        ctx.save_for_backward(x, y, scale, lse_img, lse_txt)
        ctx.group, ctx.world, ctx.tile = group, world, tile
        ctx.done = False
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        # The backward re-gathers, so a second one would now be correct; it stays refused only
        # because that is this loss's pinned contract (tests/unit/test_loss_tiled.py).
        if ctx.done:
            raise RuntimeError("tiled_disco_clip_loss: backward twice (retain_graph) unsupported")
        ctx.done = True
        x, y, scale, lse_img, lse_txt = ctx.saved_tensors
        b = x.shape[0]
        s = scale.item()
        coef = s / (2 * b)  # ∂L_n/∂logit_ij = (p_ij − δ_ij)/(2b), and ∂logit/∂x = s·y

        # Image rows vs all texts: the re-gathered texts become their raw column gradients
        # in place, and are sent (and freed) before the images are gathered.
        gx = torch.zeros_like(x)
        dot_img, gy = _columns_pass(x, y, lse_img, s, gx, coef, ctx)
        # Text rows vs all images, accumulated onto the text-column gradients just received.
        dot_txt, gx_cols = _columns_pass(y, x, lse_txt, s, gy, coef, ctx)
        gx.add_(gx_cols)
        del gx_cols

        # The positives −s/b·x_i·y_i, in both gradients and in ∂L_n/∂s.
        gx.sub_(y, alpha=s / b).mul_(grad_loss)
        gy.sub_(x, alpha=s / b).mul_(grad_loss)
        grad_scale = (0.5 * (dot_img + dot_txt) - torch.einsum("id,id->", x, y)) * (grad_loss / b)
        return gx, gy, grad_scale, None, None


def _columns_pass(
    rows: torch.Tensor,
    local_cols: torch.Tensor,
    lse: torch.Tensor,
    s: float,
    grad_rows: torch.Tensor,
    coef: float,
    ctx: torch.autograd.function.FunctionCtx,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather the columns, add this direction's row gradients to grad_rows, and return
    (Σ_ij p_ij·rows_i·cols_j, this rank's slice of Σ_m coef·∂/∂cols): the gathered tensor
    holds the column gradients after `_tile_grads` and is gone when this returns."""
    group, world = ctx.group, ctx.world  # type: ignore[attr-defined]
    all_cols = _gather_owned(local_cols, group, world)
    dot = _tile_grads(rows, all_cols, lse, s, ctx.tile, grad_rows, coef)  # type: ignore[attr-defined]
    return dot, _reduce_scatter_sum(all_cols.mul_(coef), group, world)


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
