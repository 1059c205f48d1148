"""Held-out sets for evaluation: class names, ImageFolder directories, labelled tar shards.

ImageFolder mapping: the folder of class "red circle" is `red_circle` (spaces -> '_'); a folder
named exactly like the class (spaces kept) is accepted too.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from data.shards import IMAGE_EXTS, expand_shards, read_shard

log = logging.getLogger(__name__)


def load_classnames(path: str | Path) -> list[str]:
    """One class per line, blank lines ignored, in label order."""
    names = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    return [n for n in names if n]


def imagefolder_samples(root: str | Path, classnames: list[str]) -> list[tuple[Path, int]]:
    """(image path, label) for every image under root/<folder of class>/, sorted per class."""
    root = Path(root)
    samples: list[tuple[Path, int]] = []
    for label, name in enumerate(classnames):
        candidates = [root / name.replace(" ", "_"), root / name]
        folder = next((c for c in candidates if c.is_dir()), None)
        if folder is None:
            raise ValueError(
                f"no folder for class '{name}' under {root} (expected {candidates[0].name})"
            )
        files = sorted(p for p in folder.iterdir() if p.suffix.lower().lstrip(".") in IMAGE_EXTS)
        samples.extend((path, label) for path in files)
    return samples


def _decoded(spec: str) -> Iterator[tuple[Image.Image, str, dict]]:
    shards = expand_shards(spec)
    if not shards:
        raise ValueError(f"no .tar files match '{spec}'")
    for url in shards:
        for sample in read_shard(url):
            try:
                if sample.error or sample.image is None:
                    raise ValueError(sample.error or "no image")
                image = Image.open(io.BytesIO(sample.image)).convert("RGB")
                text = sample.text.decode("utf-8").strip() if sample.text else ""
                meta = json.loads(sample.meta) if sample.meta else {}
            except Exception as exc:
                log.warning("skipping bad eval sample shard=%s key=%s: %s", url, sample.key, exc)
                continue
            yield image, text, meta


def wds_labelled(spec: str) -> Iterator[tuple[Image.Image, int]]:
    """(image, label) from shards whose .json has an int `label` (zero-shot classification)."""
    for image, _, meta in _decoded(spec):
        if isinstance(meta.get("label"), int):
            yield image, meta["label"]


def wds_pairs(spec: str) -> Iterator[tuple[Image.Image, str]]:
    """(image, caption) pairs from shards (retrieval)."""
    for image, text, _ in _decoded(spec):
        if text:
            yield image, text
