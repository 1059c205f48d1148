"""ImageNet-family zero-shot suites, as the CLIP paper reports them: top-1 on ImageNet val,
ImageNet-V2, ImageNet-R, ImageNet-Sketch and ImageNet-A with CLIP's 80 prompts (`imagenet80`).

On-disk layouts (each set's standard one):

- ImageNet val, ImageNet-Sketch: ImageFolder of WordNet ids, `ROOT/n01440764/*.JPEG`.
- ImageNet-V2 (any of its three variants): folders named by class index, `ROOT/0 ... ROOT/999`.
- ImageNet-R, ImageNet-A: wnid folders of a 200-class subset. Scored with the 1,000-way
  classifier restricted to the subset's 200 rows (argmax over those classes only, as the
  literature does); the subsets ship as trainer/templates/imagenet_{r,a}_wnids.txt (from the
  sets' authors' evaluation code, hendrycks/imagenet-r and hendrycks/natural-adv-examples).

Class names: trainer/templates/imagenet_classnames.txt, the list OpenAI's CLIP notebook uses, in
class-index order (= the sorted wnid order of imagenet_wnids.txt), with one change: index 744
(n04008634, "projectile, missile") is "projectile" where OpenAI's list repeats "missile" (index
657), so that all 1,000 names are distinct.

Class embeddings (trainer/eval/zeroshot.py: the normalised mean of the prompt embeddings) are
computed once for the classes any requested set needs and shared by all sets. Each set's
images are encoded with the same code as the periodic eval (trainer/eval/evaluate.py), sharded
over ranks when world_size > 1.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F

from trainer.eval.zeroshot import load_templates, topk_accuracy

WNID_RE = re.compile(r"^n\d{8}$")
NUM_CLASSES = 1000


@dataclass(frozen=True)
class Suite:
    key: str
    """Config / JSON key and CLI flag stem (imagenet_v2 -> --imagenet-v2)."""
    title: str
    """Column title in the results table."""
    layout: str
    """"wnid" (folders named n01440764 ...) or "index" (folders named 0 ... 999)."""
    subset: str | None = None
    """Shipped wnid list of a class subset (masking), or None for the full 1,000 classes."""


SUITES: tuple[Suite, ...] = (
    Suite("imagenet", "ImageNet", "wnid"),
    Suite("imagenet_v2", "ImageNet-V2", "index"),
    Suite("imagenet_r", "ImageNet-R", "wnid", "imagenet_r_wnids"),
    Suite("imagenet_sketch", "ImageNet-Sketch", "wnid"),
    Suite("imagenet_a", "ImageNet-A", "wnid", "imagenet_a_wnids"),
)
SUITE_BY_KEY = {s.key: s for s in SUITES}


def shipped_list(name: str) -> list[str]:
    """Lines of trainer/templates/<name>.txt (imagenet_classnames, imagenet_wnids, ...)."""
    text = resources.files("trainer").joinpath(f"templates/{name}.txt").read_text("utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def imagenet_wnids() -> list[str]:
    return shipped_list("imagenet_wnids")


def imagenet_classnames() -> list[str]:
    return shipped_list("imagenet_classnames")


def get_suite(key: str) -> Suite:
    if key not in SUITE_BY_KEY:
        raise ValueError(f"unknown eval set {key!r}; use one of {', '.join(SUITE_BY_KEY)}")
    return SUITE_BY_KEY[key]


def suite_rows(key: str) -> list[int] | None:
    """Class indices (rows of the 1,000-way classifier) the set is scored on; None = all."""
    suite = get_suite(key)
    if suite.subset is None:
        return None
    index = {w: i for i, w in enumerate(imagenet_wnids())}
    return sorted(index[w] for w in shipped_list(suite.subset))


def _image_files(folder: Path) -> list[Path]:
    from data.shards import IMAGE_EXTS

    return sorted(p for p in folder.iterdir() if p.suffix.lower().lstrip(".") in IMAGE_EXTS)


def suite_samples(key: str, root: str | Path, max_samples: int = 0) -> list[tuple[Path, int]]:
    """(image path, ImageNet class index 0..999) for every image of the set at `root`, in
    folder order; `max_samples` > 0 keeps that many, evenly spaced (so every class stays
    represented). Raises ValueError, naming the folder, on any layout mismatch."""
    suite = get_suite(key)
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root} is not a directory")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ValueError(f"{root} has no class folders")
    index = {w: i for i, w in enumerate(imagenet_wnids())}
    labelled: list[tuple[Path, int]] = []
    if suite.layout == "index":
        for folder in folders:
            if not folder.name.isdigit() or not 0 <= int(folder.name) < NUM_CLASSES:
                hint = " (it looks like a wnid layout)" if WNID_RE.match(folder.name) else ""
                raise ValueError(
                    f"{folder} is not a class-index folder; {suite.title} expects folders "
                    f"named 0 ... 999{hint}"
                )
            labelled.append((folder, int(folder.name)))
    else:
        allowed = set(shipped_list(suite.subset)) if suite.subset else set(index)
        for folder in folders:
            if folder.name not in index:
                hint = " (it looks like ImageNet-V2's layout)" if folder.name.isdigit() else ""
                raise ValueError(
                    f"{folder} is not an ImageNet wnid folder; {suite.title} expects folders "
                    f"named like n01440764{hint}"
                )
            if folder.name not in allowed:
                raise ValueError(
                    f"{folder}: class {folder.name} is not one of {suite.title}'s 200 classes "
                    f"(trainer/templates/{suite.subset}.txt)"
                )
            labelled.append((folder, index[folder.name]))
    samples = [(path, label) for folder, label in labelled for path in _image_files(folder)]
    if not samples:
        raise ValueError(f"{root}: no images (.jpg/.jpeg/.png/.webp) in its class folders")
    if max_samples and len(samples) > max_samples:
        step = len(samples) / max_samples
        samples = [samples[int(i * step)] for i in range(max_samples)]
    return samples


def check_suite(key: str, root: str | Path) -> None:
    """Open the set and check its layout (what EvalConfig.validate runs); ValueError if bad."""
    suite_samples(key, root)


def masked_topk(
    image_features: torch.Tensor,
    labels: torch.Tensor,
    class_emb: torch.Tensor,
    rows: list[int] | None = None,
) -> dict[int, float]:
    """Top-1/top-5 of the 1,000-way classifier `class_emb` (C, d) on (N, d) image features
    with labels in 0..C-1; `rows` restricts the argmax to those classes (ImageNet-R/A's 200):
    logits of every other class are dropped, and every label must be one of `rows`."""
    img = F.normalize(image_features.float(), dim=-1)
    logits = img @ class_emb.to(img.device).T  # (N, d)·(d, C) -> (N, C)
    labels = labels.to(device=img.device, dtype=torch.long)
    if rows is not None:
        keep = torch.tensor(rows, device=img.device, dtype=torch.long)  # (R,)
        position = torch.full((class_emb.shape[0],), -1, dtype=torch.long, device=img.device)
        position[keep] = torch.arange(len(rows), device=img.device)
        logits, labels = logits[:, keep], position[labels]  # (N, R), (N,) in 0..R-1
        if (labels < 0).any():
            raise ValueError("an image's class is outside the subset it is scored on")
    return topk_accuracy(logits, labels)


def suite_class_embeddings(
    model, tokenizer, needed: list[int], templates: list[str], *, batch_size: int,
    rank: int = 0, world_size: int = 1, device: torch.device | None = None,
) -> torch.Tensor:  # fmt: skip
    """(1000, d) class embeddings, rows outside `needed` left zero (never scored)."""
    from trainer.eval.evaluate import prompt_classifier

    names = imagenet_classnames()
    emb = prompt_classifier(
        model,
        tokenizer,
        [names[i] for i in needed],
        templates,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        device=device,
    )  # fmt: skip
    full = emb.new_zeros(NUM_CLASSES, emb.shape[1])
    full[torch.tensor(needed, device=emb.device)] = emb
    return full


def run_suites(
    model,
    tokenizer,
    roots: dict[str, str],
    *,
    templates: str = "imagenet80",
    batch_size: int = 64,
    max_samples: int = 0,
    workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | None = None,
    cache=None,
) -> dict[str, dict]:
    """{set key: {"top1", "top5" (fractions), "images", "classes"}} for every set in `roots`
    ({key: ROOT}), in SUITES order. Images are decoded in `workers` loader processes per rank,
    each rank its own share; `cache` (trainer.eval.evaluate.ClassEmbeddingCache) may keep the
    classifier across calls. Collective when world_size > 1; call under no_grad."""
    from data.eval_loader import ListedSet, eval_batches
    from trainer.eval.evaluate import (
        ClassEmbeddingCache,
        dummy_image_batch,
        encode_labelled,
        gather_encoded,
        model_device,
    )

    device = device or model_device(model)
    cache = cache if cache is not None else ClassEmbeddingCache()
    keys = [s.key for s in SUITES if s.key in roots]
    for key in roots:
        get_suite(key)
    if not keys:
        return {}
    rows = {key: suite_rows(key) for key in keys}
    needed = sorted(
        set().union(*(r if r is not None else range(NUM_CLASSES) for r in rows.values()))
    )
    # One classifier for every requested set: ImageNet, V2 and Sketch share all 1,000 rows.
    emb = cache.get(model, ("suites", templates, tuple(needed)), lambda: suite_class_embeddings(
        model, tokenizer, needed, load_templates(templates), batch_size=batch_size, rank=rank,
        world_size=world_size, device=device))  # fmt: skip
    size = model.config.vision_config.image_size
    results: dict[str, dict] = {}
    for key in keys:
        batches = eval_batches(
            ListedSet(suite_samples(key, roots[key], max_samples)), image_size=size,
            batch_size=batch_size, rank=rank, world=world_size, workers=workers,
        )  # fmt: skip
        feats = gather_encoded(
            encode_labelled(model, device), batches, dummy=dummy_image_batch(size, 0),
            world_size=world_size,
        )  # fmt: skip
        acc = masked_topk(feats["image"], feats["label"], emb, rows[key])
        results[key] = {
            "top1": acc[1], "top5": acc[5], "images": len(feats["label"]),
            "classes": NUM_CLASSES if rows[key] is None else len(rows[key]),
        }  # fmt: skip
    return results


def flat_metrics(results: dict[str, dict]) -> dict[str, float]:
    """run_suites' results as flat metric keys: imagenet_top1, imagenet_r_images, ..."""
    return {f"{key}_{name}": value for key, r in results.items() for name, value in r.items()}


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """A paper-style table: one row per model ({label: {set key: top-1 fraction}}), one
    column per set present in any row (SUITES order), top-1 in % with 2 decimals; a set a
    model was not run on shows as '-'. Markdown, with aligned columns."""
    keys = [s.key for s in SUITES if any(s.key in r for r in rows.values())]
    header = ["model", *(SUITE_BY_KEY[k].title for k in keys)]
    body = [[label, *(f"{100 * r[k]:.2f}" if k in r else "-" for k in keys)]
            for label, r in rows.items()]  # fmt: skip
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        rest = zip(cells[1:], widths[1:], strict=True)
        parts = [cells[0].ljust(widths[0]), *(c.rjust(w) for c, w in rest)]
        return "| " + " | ".join(parts) + " |"

    rule = "|" + "|".join("-" * (widths[0] + 2) if i == 0 else "-" * (w + 1) + ":"
                          for i, w in enumerate(widths)) + "|"  # fmt: skip
    return "\n".join([line(header), rule, *(line(b) for b in body)])
