"""Image↔text retrieval recall@K on paired features, pure math.

Pair i is (image i, caption i). A query counts as retrieved at K if its own partner is among
the K most similar candidates. Ties are resolved in the query's favour (only strictly more
similar candidates push the partner down), which only matters for degenerate features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

RECALL_KS = (1, 5, 10)


def _recall(sims: torch.Tensor, ks: tuple[int, ...]) -> dict[int, float]:
    """sims: (Q, Q), row q = one query against all candidates; the partner is on the diagonal."""
    partner = sims.diagonal()[:, None]  # (Q, 1)
    rank = (sims > partner).sum(dim=1)  # (Q,) candidates strictly better than the partner
    return {k: (rank < k).float().mean().item() for k in ks}


def recall_at_k(
    image_features: torch.Tensor, text_features: torch.Tensor, ks: tuple[int, ...] = RECALL_KS
) -> dict[str, float]:
    """{"retrieval_i2t_r1": ..., "retrieval_t2i_r1": ..., ...} as fractions in [0, 1]."""
    if image_features.shape != text_features.shape:
        raise ValueError(
            f"retrieval needs one caption per image: {tuple(image_features.shape)} image vs "
            f"{tuple(text_features.shape)} text features"
        )
    img = F.normalize(image_features.float(), dim=-1)
    txt = F.normalize(text_features.float(), dim=-1).to(img.device)
    sims = img @ txt.T  # (N, d)·(d, N) -> (N, N): row = image, column = caption
    i2t, t2i = _recall(sims, ks), _recall(sims.T, ks)
    return {
        **{f"retrieval_i2t_r{k}": v for k, v in i2t.items()},
        **{f"retrieval_t2i_r{k}": v for k, v in t2i.items()},
    }
