"""Zero-shot classification math (CLIP's protocol), pure functions over features.

Class embedding = the normalised mean of the normalised text embeddings of every prompt
template filled with the class name; prediction = the class whose embedding has the highest
cosine similarity with the image embedding. The logit scale is left out on purpose: it
multiplies every logit by the same positive number, so it cannot change a ranking.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F

BUILTIN_TEMPLATE_SETS = ("builtin", "imagenet80")
TOPK = (1, 5)


def load_templates(spec: str) -> list[str]:
    """Prompt templates, one per line with a `{}` for the class name.

    `spec` is "builtin" (a small set for the built-in dataset), "imagenet80" (CLIP's 80
    ImageNet templates) or the path of a text file in the same format.
    """
    if spec in BUILTIN_TEMPLATE_SETS:
        text = resources.files("trainer").joinpath(f"templates/{spec}.txt").read_text("utf-8")
    else:
        path = Path(spec)
        if not path.is_file():
            raise ValueError(
                f"templates: {spec!r} is neither {' nor '.join(BUILTIN_TEMPLATE_SETS)} nor a "
                "file; pass one of those or a text file with one template per line"
            )
        text = path.read_text("utf-8")
    templates = [line.strip() for line in text.splitlines() if line.strip()]
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise ValueError(
            f"templates: {spec!r} must hold one template per line, each with exactly one '{{}}'"
            + (f" (bad: {bad[0]!r})" if bad else " (it is empty)")
        )
    return templates


def prompts(classnames: list[str], templates: list[str]) -> list[tuple[int, str]]:
    """(class index, prompt text) for every class × template, class-major."""
    return [(c, t.format(name)) for c, name in enumerate(classnames) for t in templates]


def class_embeddings(
    text_features: torch.Tensor, class_index: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """Per-class normalised mean of normalised prompt embeddings.

    text_features: (P, d) one row per prompt, in any order; class_index: (P,) its class.
    Returns (C, d) on text_features' device. Every class must have at least one prompt.
    """
    feats = F.normalize(text_features.float(), dim=-1)  # (P, d)
    index = class_index.to(device=feats.device, dtype=torch.long)  # (P,)
    sums = feats.new_zeros(num_classes, feats.shape[1]).index_add_(0, index, feats)  # (C, d)
    counts = torch.bincount(index, minlength=num_classes)  # (C,)
    if (counts == 0).any():
        raise ValueError("every class needs at least one prompt embedding")
    return F.normalize(sums / counts[:, None], dim=-1)  # (C, d)


def topk_accuracy(
    logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = TOPK
) -> dict[int, float]:
    """Fraction of rows whose label is among the k highest logits; k is capped at the
    number of classes (top-5 of 3 classes is 1.0)."""
    # (N, C) -> (N, kmax) indices of the highest logits
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hits = top == labels.to(device=top.device, dtype=torch.long)[:, None]  # (N, kmax)
    return {k: hits[:, : min(k, kmax)].any(dim=1).float().mean().item() for k in ks}


def zeroshot_metrics(
    image_features: torch.Tensor, labels: torch.Tensor, class_emb: torch.Tensor
) -> dict[str, float]:
    """{"zeroshot_top1": ..., "zeroshot_top5": ...} as fractions in [0, 1]."""
    img = F.normalize(image_features.float(), dim=-1)
    logits = img @ class_emb.to(img.device).T  # (N, d)·(d, C) -> (N, C)
    acc = topk_accuracy(logits, labels)
    return {f"zeroshot_top{k}": v for k, v in acc.items()}
