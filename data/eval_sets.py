"""Held-out sets for evaluation: class names, ImageFolder directories, caption files and the
shards' captions (k captions per image: `load_caption_file` and `sample_captions`; a
multi-line caption is never read as one caption), and the checks that open them before
training. Reading the sets' images is data/eval_loader.py's.

ImageFolder mapping: the folder of class "red circle" is `red_circle` (spaces -> '_'); a folder
named exactly like the class (spaces kept) is accepted too.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
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


# ---- retrieval with k captions per image ---------------------------------------------------

CAPTION_FILE_EXTS = (".json", ".csv")


def _caption_list(value, where: str) -> list[str]:
    """A list of non-empty, one-line captions; anything else is an error naming `where`."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: captions must be a non-empty list of strings")
    captions = []
    for caption in value:
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(f"{where}: every caption must be a non-empty string, got {caption!r}")
        if "\n" in caption.strip():
            raise ValueError(
                f"{where}: caption {caption[:40]!r}... spans several lines; give each caption "
                "as its own list entry (JSON) or row (CSV)"
            )
        captions.append(caption.strip())
    return captions


def load_caption_file(path: str | Path) -> list[tuple[Path, list[str]]]:
    """(image path, captions) per image from a caption file, images in file order.

    JSON: {"img.jpg": ["a cat", "a small cat"], ...} or [{"image": "img.jpg", "captions": [...]},
    ...]. CSV: a header with `image` and `caption` columns, one row per caption (rows of the
    same image need not be adjacent). Relative image paths are relative to the file's folder.
    Raises ValueError (starting with the file name) on any malformed entry or missing image."""
    import csv

    path = Path(path)
    base = path.parent
    grouped: dict[str, list[str]] = {}
    if path.suffix.lower() == ".json":
        try:
            tree = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        if isinstance(tree, dict):
            items = list(tree.items())
        elif isinstance(tree, list):
            items = []
            for i, entry in enumerate(tree):
                if not isinstance(entry, dict) or "image" not in entry:
                    raise ValueError(f"{path}: entry {i} needs an 'image' and a 'captions' list")
                items.append((entry["image"], entry.get("captions", entry.get("caption"))))
        else:
            raise ValueError(f"{path}: expected an object or a list of objects")
        for image, caps in items:
            grouped.setdefault(str(image), []).extend(_caption_list(caps, f"{path}: {image}"))
    elif path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"image", "caption"} <= set(reader.fieldnames):
                raise ValueError(f"{path}: the CSV header must name 'image' and 'caption' columns")
            for row in reader:
                where = f"{path}: line {reader.line_num}"
                grouped.setdefault(row["image"], []).extend(_caption_list(row["caption"], where))
    else:
        raise ValueError(f"{path}: a caption file must be .json or .csv")
    if not grouped:
        raise ValueError(f"{path}: no images listed")
    out = []
    for image, caps in grouped.items():
        image_path = Path(image) if Path(image).is_absolute() else base / image
        if not image_path.is_file():
            raise ValueError(f"{path}: image {image} not found (looked at {image_path})")
        out.append((image_path, caps))
    return out


def sample_captions(text: str, meta: dict) -> list[str]:
    """A shard sample's captions: the .json's "captions" list if present, else the lines of its
    .txt (a multi-line .txt is k captions, one per line, never one caption)."""
    if "captions" in meta:
        return _caption_list(meta["captions"], "captions")
    return [line.strip() for line in text.splitlines() if line.strip()]


def check_shards(spec: str, need: str, peek: int = 4) -> None:
    """Open the first shard of `spec` and check its first `peek` samples decode and carry
    `need` ("label": an int .json label; "captions": a caption). Raises ValueError."""
    shards = expand_shards(spec)
    if not shards:
        raise ValueError(f"no .tar files match '{spec}'")
    seen = 0
    try:
        for sample in itertools.islice(read_shard(shards[0]), peek):
            seen += 1
            if sample.error or sample.image is None:
                raise ValueError(f"sample {sample.key}: {sample.error or 'no image'}")
            Image.open(io.BytesIO(sample.image)).verify()
            meta = json.loads(sample.meta) if sample.meta else {}
            if need == "label" and not isinstance(meta.get("label"), int):
                raise ValueError(f"sample {sample.key} has no integer 'label' in its .json")
            text = sample.text.decode("utf-8") if sample.text else ""
            if need == "captions" and not sample_captions(text, meta):
                raise ValueError(f"sample {sample.key} has no caption (.txt or .json 'captions')")
    except ValueError as exc:
        raise ValueError(f"{shards[0]}: {exc}") from None
    except Exception as exc:  # unreadable tar, bad image, bad JSON
        raise ValueError(f"{shards[0]}: cannot be read ({type(exc).__name__}: {exc})") from None
    if not seen:
        raise ValueError(f"{shards[0]}: holds no samples")
