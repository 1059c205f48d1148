"""Contrastive CLIP losses over a process group: pure math, imports only torch.

Scaling contract (every loss in this module honours it; docs/disco.md):
    Each rank returns its own scalar L_n with mean_n(L_n) == L, the full-batch loss over all
    B = N·b pairs. After the data-parallel reduction that DDP / DeepSpeed apply to parameter
    gradients (sum over ranks, ÷N), every parameter gradient, `logit_scale` included, equals
    ∂L/∂θ of the full-batch loss exactly (to rounding). The gradient a rank sees for its own
    features is therefore N·∂L/∂x_local: the ÷N happens later, in the engine.

All ranks must pass the same local batch size b: the gathers assume equal-sized slices.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

MAX_LOGIT_SCALE = math.log(100.0)

# torch 2.13 renamed the tensor-in/tensor-out collectives (*_single); older torch has only the
# *_tensor names. Same semantics on NCCL and gloo.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class SimulatedGroup:
    """A stand-in for a process group of `world` ranks, as seen from `rank`: a test and bench
    mode (one rank's memory and compute of an N-rank run on one device), never a training
    default.

    `gather_rows` returns (world·b, d) rows whose slice for `rank` is the real local tensor and
    whose other rows are fixed random unit vectors (seeded, same device and dtype, no gradient);
    the backward therefore returns this rank's slice only, where a real run would add the
    other ranks' contributions by reduce-scatter. Shapes, memory and FLOPs match one real rank;
    the loss value does not match any real run. Only `disco_clip_loss`, `full_batch_clip_loss`
    and `siglip_loss` accept it (they gather through `gather_rows`).
    """

    def __init__(self, rank: int, world: int, seed: int = 0) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"SimulatedGroup: rank {rank} is not in [0, {world})")
        self.rank, self.world, self.seed = rank, world, seed

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        b, d = local.shape
        gen = torch.Generator(device=local.device).manual_seed(self.seed)
        others = torch.randn(
            (self.world - 1) * b, d, generator=gen, device=local.device, dtype=local.dtype
        )
        others = F.normalize(others, dim=-1)
        before, after = others[: self.rank * b], others[self.rank * b :]
        return torch.cat([before, local, after])  # (world·b, d); cat's backward slices


def _world(group: dist.ProcessGroup | SimulatedGroup | None) -> tuple[int, int]:
    """(rank, world size) in `group`; (0, 1) when torch.distributed is not initialised."""
    if isinstance(group, SimulatedGroup):
        return group.rank, group.world
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class _GatherRows(torch.autograd.Function):
    """All-gather b×d rows into B×d; backward is reduce-scatter(sum).

    Rank n's slice of the backward output is Σ_m ∂L_m/∂X[S_n]: the gradients that every rank
    computed for rank n's rows. That is DisCo's "inter-GPU" term arriving by collective instead
    of being recomputed. Summing (not averaging) keeps the scaling contract above: averaging
    here would scale every feature gradient by 1/N (the bug in the paper's public code).
    """

    @staticmethod
    def forward(ctx, local: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        world = dist.get_world_size(group)
        local = local.contiguous()
        gathered = local.new_empty((world * local.shape[0], *local.shape[1:]))
        _all_gather_single(gathered, local, group=group)
        return gathered  # (B, d); slice S_n holds this rank's own values bit for bit

    @staticmethod
    def backward(ctx, grad_gathered: torch.Tensor):
        world = dist.get_world_size(ctx.group)
        grad_gathered = grad_gathered.contiguous()
        grad_local = grad_gathered.new_empty(
            (grad_gathered.shape[0] // world, *grad_gathered.shape[1:])
        )
        _reduce_scatter_single(grad_local, grad_gathered, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad_local, None


def gather_rows(local: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """All-gather with a summing backward; identity when there is a single process."""
    if isinstance(group, SimulatedGroup):
        return group.gather(local)
    if _world(group)[1] == 1:
        return local
    return _GatherRows.apply(local, group)


class _ClampFromAbove(torch.autograd.Function):
    """min(x, bound), with a gradient that can bring x back once it is past the bound.

    A plain clamp has zero gradient above the bound, so a logit_scale that an optimizer step
    pushed past ln 100 would stay there for good. OpenCLIP avoids that by clamping the parameter
    after each step; under ZeRO with mixed precision the parameter the model sees is a 16-bit
    copy of an fp32 master that only the optimizer owns, so the clamp lives here instead (see
    docs/disco.md, "logit_scale"): above the bound the gradient passes when it points down
    (descent lowers x) and is zero when it points up. At or below the bound this is a clamp.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, bound: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.bound = bound
        return x.clamp(max=bound)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        blocked = (x > ctx.bound) & (grad < 0)  # above the bound and descent would raise it
        return grad.masked_fill(blocked, 0.0), None


def logit_scale_value(logit_scale: torch.Tensor) -> torch.Tensor:
    """exp(logit_scale) clamped at 100, as a 0-dim tensor in at least fp32; any one-element
    shape and any dtype (a bf16 parameter is upcast first: in bf16, ln 100 rounds to 4.594 and
    the scale would top out at 98.9).

    The clamp lives in the forward (not on the parameter) so that mixed-precision engines,
    which keep an fp32 master copy, are clamped too; its gradient lets a scale that went past
    the bound come back (`_ClampFromAbove`).
    """
    if logit_scale.numel() != 1:
        raise ValueError(f"logit_scale must have one element, got shape {tuple(logit_scale.shape)}")
    value = logit_scale.reshape(()).to(_compute_dtype(logit_scale))
    return _ClampFromAbove.apply(value, MAX_LOGIT_SCALE).exp()


def _compute_dtype(features: torch.Tensor) -> torch.dtype:
    # Softmax / cross-entropy in fp16 or bf16 loses too much: do them in at least fp32.
    return torch.promote_types(features.dtype, torch.float32)


def _check_pair(image_features: torch.Tensor, text_features: torch.Tensor) -> None:
    if image_features.dim() != 2 or image_features.shape != text_features.shape:
        raise ValueError(
            "image_features and text_features must both be (b, d) with the same shape, got "
            f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )


# F.cross_entropy materialises its log-softmax: run it on row chunks of at most this share of
# the (b, B) logits, so that temporary stays an eighth of a block instead of a whole one.
_CE_CHUNKS = 8


def _row_cross_entropy(logits: torch.Tensor, first_label: int) -> torch.Tensor:
    """CE of every row i of `logits` against column first_label + i, (b,), in row chunks."""
    b = logits.shape[0]
    labels = torch.arange(b, device=logits.device) + first_label
    rows = -(-b // _CE_CHUNKS)
    return torch.cat(
        [
            F.cross_entropy(logits[i : i + rows], labels[i : i + rows], reduction="none")
            for i in range(0, b, rows)
        ]
    )


def _loss_and_grad_factor(
    rows: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor, first_label: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_i CE(s·rows_i·colsᵀ, first_label + i), and the (b, B) block softmax − onehot.

    The block is the one b×B tensor of this direction: the logits are written into it, and
    overwritten in place by ∂CE/∂logits, all that the backward needs from them.
    """
    logits = torch.mm(rows, cols.T).mul_(scale)  # (b, d)·(d, B) -> (b, B)
    ce = _row_cross_entropy(logits, first_label)
    # The positive of row i is column first_label + i: the diagonal at that offset.
    positives = logits.diagonal(first_label)
    lse = ce + positives  # CE_i = lse_i − positive_i, so no second pass for the normaliser
    grad_factor = logits.sub_(lse[:, None]).exp_()  # row softmax, in place
    grad_factor.diagonal(first_label).sub_(1.0)  # − onehot
    return ce.sum(), grad_factor


def _direction_grads(
    factor: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    coef: torch.Tensor,
    need_cols: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """One direction's (∂/∂rows, ∂/∂cols or None, Σ_ij factor_ij·rows_i·cols_j) from its block.

    The dot is Σ_i rows_i·(factor·cols)_i, read off the row gradient before it is scaled: it
    is ∂/∂s of this direction up to 1/(2b), without a second pass over the block.
    """
    grad_rows = torch.mm(factor, cols)  # (b, B)·(B, d) -> (b, d)
    dot = torch.vdot(rows.reshape(-1), grad_rows.view(-1))  # flat: no (b, d) temporary
    grad_rows.mul_(coef)
    grad_cols = torch.mm(factor.T, rows).mul_(coef) if need_cols else None  # (B, d)
    return grad_rows, grad_cols, dot


class _DiscoClip(torch.autograd.Function):
    """Forward: L_n from this rank's rows against the gathered columns, both directions.
    Backward: ∂L_n/∂(rows, gathered columns, s) from the two saved softmax − onehot blocks.

    Autograd through `F.cross_entropy` would keep the logits, the log-softmax and then its
    gradient (three b×B blocks per direction); this keeps one per direction (docs/disco.md).
    """

    @staticmethod
    def forward(ctx, x, y, all_x, all_y, scale, rank):
        b = x.shape[0]
        ce_img, factor_img = _loss_and_grad_factor(x, all_y, scale, rank * b)
        ce_txt, factor_txt = _loss_and_grad_factor(y, all_x, scale, rank * b)
        ctx.save_for_backward(x, y, all_x, all_y, scale, factor_img, factor_txt)
        return (ce_img + ce_txt) / (2 * b)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        x, y, all_x, all_y, scale, factor_img, factor_txt = ctx.saved_tensors
        need = ctx.needs_input_grad
        b = x.shape[0]
        coef = grad_loss * scale / (2 * b)  # ∂L_n/∂logit = factor/(2b), ∂logit/∂x = s·y
        gx, g_all_y, dot_img = _direction_grads(factor_img, x, all_y, coef, need[3])
        gy, g_all_x, dot_txt = _direction_grads(factor_txt, y, all_x, coef, need[2])
        grad_scale = (dot_img + dot_txt) * (grad_loss / (2 * b))
        return gx, gy, g_all_x, g_all_y, grad_scale, None


def disco_clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """The DisCo-CLIP loss: exact full-batch CLIP loss with O(b·B) logits per rank.

    Args:
        image_features, text_features: this rank's b L2-normalised embeddings, (b, d) each, any
            float dtype. Every rank in `group` must pass the same b.
        logit_scale: the log-scale parameter, any shape with one element (HF's is 0-dim).
        group: the data-parallel process group; None means the default group. Without an
            initialised process group (or with world size 1) this is the plain CLIP loss.

    Returns:
        This rank's mean over its b rows of the symmetric cross-entropy (see the module
        docstring for how it relates to the full-batch loss and its gradients). Forward and
        backward keep one (b, B) block per direction (`_DiscoClip`).
    """
    _check_pair(image_features, text_features)
    rank, _ = _world(group)
    dtype = _compute_dtype(image_features)
    scale = logit_scale_value(logit_scale).to(dtype)
    # Upcast before the gather: the logits, the softmax and the reduce-scatter that sums the
    # other ranks' feature gradients all run in fp32 (the cast's backward rounds once, at the end).
    image, text = image_features.to(dtype), text_features.to(dtype)

    all_image = gather_rows(image, group)  # (B, d)
    all_text = gather_rows(text, group)  # (B, d)
    # Only this rank's rows, in both directions: (b, d) · (d, B) -> (b, B) per direction
    return _DiscoClip.apply(image, text, all_image, all_text, scale, rank)


def full_batch_clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """The naive distributed baseline: every rank builds the full B×B logit matrix.

    Same signature and scaling contract as `disco_clip_loss` (it returns the full-batch loss L
    on every rank, whose mean over ranks is L). Memory per rank is O(B²): this is what OpenCLIP
    does by default and what DisCo removes. Kept for benchmarks and parity tests.
    """
    _check_pair(image_features, text_features)
    dtype = _compute_dtype(image_features)
    scale = logit_scale_value(logit_scale).to(dtype)
    image, text = image_features.to(dtype), text_features.to(dtype)  # as in disco_clip_loss

    all_image = gather_rows(image, group)  # (B, d)
    all_text = gather_rows(text, group)  # (B, d)
    logits = scale * (all_image @ all_text.T)  # (B, d) · (d, B) -> (B, B)
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
