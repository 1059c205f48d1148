"""Activation memory of one CLIP tower: what autograd keeps for backward, counted per layer.

Counted from HF's CLIPEncoderLayer with sdpa attention (transformers 5), and checked against
the tensors autograd actually saves (torch.autograd.graph.saved_tensors_hooks on the tiny
preset: 48.2K elements/sample counted vs 49.2K saved for the vision tower, 42.5K vs 42.4K for
the text tower). Per token of one layer, with hidden h, MLP width I and a heads:

    layer_norm1   input (h) + mean, rstd (2, fp32)
    q/k/v proj    their shared input, the LN output (h)
    sdpa          q, k, v, output (4h) + log-sum-exp (a, fp32); no s×s matrix (flash /
                  memory-efficient kernels; the eager path would add a·s)
    out_proj      its input, the attention output made contiguous (h)
    layer_norm2   input (h) + mean, rstd (2, fp32)
    fc1           its input, the LN output (h)
    quick_gelu    x and sigmoid(1.702x) (2I)
    fc2           its input (I)
    ---------------------------------------------------------------
    8h + 3I in the activation dtype, 4 + a in fp32

Outside the layers, per sample: the input of the pre/final LayerNorm (s·h), for the vision
tower the last hidden state again (the pooled CLS row is a view that keeps all of it alive),
and ~4 pooled vectors (post-LN input, projection input, normalize input and output).

With activation checkpointing each layer keeps only its input (s·h) and, during its backward,
one layer's full set is recomputed for the whole micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass

_INT64 = 8
_UINT8 = 1


@dataclass(frozen=True)
class TowerShape:
    """The sizes of one transformer tower that its activation memory depends on."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    tokens: int
    """Sequence length s (vision: patches + CLS; text: context length)."""
    is_vision: bool
    input_elements: int
    """Input elements per sample: pixels (vision) or token ids + attention mask (text)."""

    @classmethod
    def vision(cls, layers, hidden, intermediate, heads, image_size, patch_size) -> TowerShape:
        tokens = (image_size // patch_size) ** 2 + 1
        return cls(layers, hidden, intermediate, heads, tokens, True, 3 * image_size**2)

    @classmethod
    def text(cls, layers, hidden, intermediate, heads, context_length) -> TowerShape:
        return cls(layers, hidden, intermediate, heads, context_length, False, 2 * context_length)


def layer_elements(t: TowerShape) -> tuple[int, int]:
    """(activation-dtype, fp32) elements one layer saves per sample (module docstring)."""
    return t.tokens * (8 * t.hidden + 3 * t.intermediate), t.tokens * (4 + t.heads)


def activation_bytes(t: TowerShape, rows: int, *, dtype: int, checkpointing: bool) -> int:
    """Bytes autograd keeps for `rows` samples through tower `t` (without its input batch)."""
    per_layer, per_layer_fp32 = layer_elements(t)
    s, h = t.tokens, t.hidden
    # Pre-LN (vision) / final-LN (text) input, the vision CLS view, 4 pooled vectors.
    outside = s * h * (2 if t.is_vision else 1) + 4 * h
    outside_fp32 = 2 * s  # that LayerNorm's mean and rstd
    if checkpointing:
        kept = t.layers * s * h + per_layer  # layer inputs + one layer recomputed in backward
        kept_fp32 = per_layer_fp32
    else:
        kept, kept_fp32 = t.layers * per_layer, t.layers * per_layer_fp32
    return rows * ((kept + outside) * dtype + (kept_fp32 + outside_fp32) * 4)


def input_bytes(t: TowerShape, rows: int, *, dtype: int) -> int:
    """The input batch on the device: int64 ids and mask, or the loader's uint8 pixels (1 byte)
    and their normalisation (data.transforms.normalize_pixels) in the activation dtype, which
    the patch convolution saves. The fp32 intermediate of the normalisation is freed before
    the forward, so it is not live at the peak."""
    if not t.is_vision:
        return rows * t.input_elements * _INT64
    return rows * t.input_elements * (_UINT8 + dtype)
