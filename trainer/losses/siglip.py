"""The SigLIP sigmoid loss (Zhai et al., 2023) over a process group: pure math, imports only torch.

Full-batch definition over all B = N·b pairs, with z_ij = +1 if i == j else −1:
    L = −1/B · Σ_i Σ_j log σ(z_ij · (s·x_i·y_j + bias)),   s = exp(logit_scale)

Every pair term is independent (no softmax normaliser), so the rows split exactly: rank n
scores its own b images against all B gathered texts and returns
    L_n = −1/b · Σ_{i∈S_n} Σ_j log σ(z_ij · (s·x_i·y_j + bias)),
whose mean over ranks is L. This is the scaling contract of trainer/losses/disco.py: the text gather's
backward sums over ranks (each text's gradient comes from every rank's rows), so after the
data-parallel ÷N every parameter gradient — logit_scale and logit_bias included — equals the
full-batch gradient. Memory per rank is O(b·B) for the logits, as for DisCo.

Clamp: s is clamped at 100 exactly as in the CLIP losses (`logit_scale_value`), for one
convention across objectives. The SigLIP paper initialises logit_scale = ln 10 and bias = −10
(SIGLIP_INIT_*; this trainer starts the bias at −10 and the scale at `model.logit_scale_init`,
whatever the loss), far from the clamp; the paper leaves the temperature unclamped, and with L2-normalised features the
logits are bounded by s anyway. The bias is not clamped.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from trainer.losses.disco import _check_pair, _compute_dtype, _world, gather_rows, logit_scale_value

SIGLIP_INIT_LOGIT_SCALE = 2.302585092994046  # ln 10, the paper's initial temperature
SIGLIP_INIT_LOGIT_BIAS = -10.0


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """This rank's share of the full-batch sigmoid loss (see the module docstring).

    Args:
        image_features, text_features: this rank's b L2-normalised embeddings, (b, d) each.
            Every rank in `group` must pass the same b. Computed in at least fp32.
        logit_scale: log of the scale s, any one-element shape; s is clamped at 100.
        logit_bias: the learnable bias, any one-element shape.
        group: the data-parallel process group (None: default; uninitialised: single process).

    Returns:
        L_n, a 0-dim tensor; mean over ranks is the full-batch loss L.
    """
    _check_pair(image_features, text_features)
    if logit_bias.numel() != 1:
        raise ValueError(f"logit_bias must have one element, got shape {tuple(logit_bias.shape)}")
    rank, _ = _world(group)
    b = image_features.shape[0]
    dtype = _compute_dtype(image_features)
    scale = logit_scale_value(logit_scale).to(dtype)
    bias = logit_bias.reshape(()).to(dtype)

    x = image_features.to(dtype)
    y = text_features.to(dtype)
    all_text = gather_rows(y, group)  # (B, d), backward sums over ranks
    # z·(s·x_i·y_j + bias) with z = −1 (negatives) everywhere first: (b, d)·(d, B) -> (b, B)
    signed = (x @ all_text.T) * -scale - bias
    # then z = +1 for this rank's positives (i, rank·b + i): flipping the diagonal in place
    # avoids a b×B sign matrix. logsigmoid, not softplus: softplus is linearised past 20.
    signed.diagonal(offset=rank * b).neg_()
    return -F.logsigmoid(signed).sum() / b
