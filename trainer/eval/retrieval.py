"""Image↔text retrieval recall@K on features, pure math, with k captions per image.

Definition (the COCO / Flickr30k "Karpathy split" protocol, as CLIP and open_clip report it):
images i = 0..N-1, captions t = 0..T-1, caption t describes image `caption_image[t]`; every
image has at least one caption; similarity = cosine.

- image→text R@K: the fraction of the N images for which at least one of their own captions is
  among the K captions (out of all T) most similar to the image. Equivalently: the best-ranked
  own caption has rank < K.
- text→image R@K: every caption is a query, once: the fraction of the T captions whose image is
  among the K images (out of all N) most similar to the caption.

With one caption per image (T = N, caption i of image i) both reduce to plain recall@K, which
is `recall_at_k`. Rank = the number of candidates strictly more similar than the partner (for
image→text: than the image's most similar own caption), so ties are resolved in the query's
favour; that only matters for degenerate features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

RECALL_KS = (1, 5, 10)


def recall_at_k_multi(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    caption_image: torch.Tensor,
    ks: tuple[int, ...] = RECALL_KS,
) -> dict[str, float]:
    """Recall@K with k captions per image (see the module docstring), fractions in [0, 1].

    image_features: (N, d); text_features: (T, d); caption_image: (T,) the image of each caption.
    Returns {"retrieval_i2t_r1": ..., "retrieval_t2i_r1": ..., ...}."""
    n, t = image_features.shape[0], text_features.shape[0]
    if caption_image.shape != (t,):
        raise ValueError(f"caption_image must have one entry per caption ({t}), got "
                         f"{tuple(caption_image.shape)}")  # fmt: skip
    img = F.normalize(image_features.float(), dim=-1)
    txt = F.normalize(text_features.float(), dim=-1).to(img.device)
    owner = caption_image.to(device=img.device, dtype=torch.long)  # (T,)
    if t and (owner.min() < 0 or owner.max() >= n):
        raise ValueError(f"caption_image holds an image index outside 0..{n - 1}")
    if torch.bincount(owner, minlength=n).min() == 0:
        raise ValueError("every image needs at least one caption")
    sims = img @ txt.T  # (N, d)·(d, T) -> (N, T): row = image, column = caption
    own = owner[None, :] == torch.arange(n, device=img.device)[:, None]  # (N, T)
    best_own = sims.masked_fill(~own, float("-inf")).amax(dim=1)  # (N,)
    i2t_rank = (sims > best_own[:, None]).sum(dim=1)  # (N,) captions better than the best own
    partner = sims.gather(0, owner[None, :]).squeeze(0)  # (T,) sim of each caption to its image
    t2i_rank = (sims > partner[None, :]).sum(dim=0)  # (T,) images better than its own
    return {
        **{f"retrieval_i2t_r{k}": (i2t_rank < k).float().mean().item() for k in ks},
        **{f"retrieval_t2i_r{k}": (t2i_rank < k).float().mean().item() for k in ks},
    }


def recall_at_k(
    image_features: torch.Tensor, text_features: torch.Tensor, ks: tuple[int, ...] = RECALL_KS
) -> dict[str, float]:
    """One caption per image: pair i is (image i, caption i). Same keys as recall_at_k_multi."""
    if image_features.shape != text_features.shape:
        raise ValueError(
            f"retrieval needs one caption per image: {tuple(image_features.shape)} image vs "
            f"{tuple(text_features.shape)} text features"
        )
    owner = torch.arange(image_features.shape[0], device=image_features.device)
    return recall_at_k_multi(image_features, text_features, owner, ks)
