"""The built-in learnable dataset: coloured shapes on noisy backgrounds (`make-synthetic`).

    DIR/train/000000.tar ...     img2dataset webdataset layout: KEY.jpg, KEY.txt, KEY.json
    DIR/val/red_circle/*.jpg     ImageFolder-style held-out images (folder = class, '_' for ' ')
    DIR/classnames.txt           one class per line, in label order
    DIR/val_pairs/000000.tar     held-out image-caption pairs, `label` in the json (retrieval)
    DIR/tokenizer/               the shipped CLIP BPE tokenizer (copied, never retrained)

Every sample is drawn from its own generator seeded by (seed, split, index), so output is a pure
function of the arguments: same seed -> byte-identical files.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data.concepts import CAPTION_TEMPLATES, COLOURS, SHAPES, class_names, folder_name
from data.paths import BUILTIN_TOKENIZER_DIR
from data.shards import write_shard

SPLIT_TRAIN, SPLIT_VAL, SPLIT_VAL_PAIRS = 0, 1, 2
JPEG_QUALITY = 90


def render(rng: np.random.Generator, label: int, size: int) -> tuple[Image.Image, dict[str, str]]:
    """One image of class `label` with random background, position, size and noise; also the
    words a caption may use about it (size, background)."""
    colour_name = list(COLOURS)[label // len(SHAPES)]
    shape = SHAPES[label % len(SHAPES)]
    dark = bool(rng.random() < 0.5)
    level = rng.uniform(10, 80) if dark else rng.uniform(165, 240)
    background = np.clip(level + rng.uniform(-15, 15, size=3), 0, 255)
    canvas = np.empty((size, size, 3), dtype=np.float32)
    canvas[:] = background
    image = Image.fromarray(canvas.astype(np.uint8))

    fraction = rng.uniform(0.45, 0.85)  # shape extent / image side
    extent = max(6, round(fraction * size))
    left = int(rng.integers(0, size - extent + 1))
    top = int(rng.integers(0, size - extent + 1))
    colour = tuple(
        int(c) for c in np.clip(np.array(COLOURS[colour_name]) + rng.uniform(-20, 20, 3), 0, 255)
    )
    _draw_shape(
        ImageDraw.Draw(image), shape, (left, top, left + extent - 1, top + extent - 1), colour
    )

    sigma = rng.uniform(0, 12)
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, sigma, size=(size, size, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    size_word = "small" if fraction < 0.58 else "large" if fraction > 0.72 else ""
    return image, {
        "colour": colour_name,
        "shape": shape,
        "size": size_word,
        "bg": "dark" if dark else "light",
    }


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], colour: tuple
) -> None:
    x0, y0, x1, y1 = box
    extent = x1 - x0 + 1
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "bar":  # a wide, flat rectangle: unlike the circle even at 16 px
        height = max(2, extent // 3)
        mid = y0 + (extent - height) // 2
        draw.rectangle((x0, mid, x1, mid + height - 1), fill=colour)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour)
    elif shape == "cross":
        bar = max(2, extent // 3)
        mid0 = x0 + (extent - bar) // 2
        draw.rectangle((mid0, y0, mid0 + bar - 1, y1), fill=colour)
        mid0 = y0 + (extent - bar) // 2
        draw.rectangle((x0, mid0, x1, mid0 + bar - 1), fill=colour)
    elif shape == "ring":
        draw.ellipse(box, outline=colour, width=max(2, extent // 5))
    else:
        raise ValueError(f"unknown shape {shape!r}")


def caption(rng: np.random.Generator, words: dict[str, str]) -> str:
    template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
    return " ".join(template.format(**words).split())


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _sample(seed: int, split: int, index: int, image_size: int, label: int | None = None):
    rng = np.random.default_rng([seed, split, index])
    label = int(rng.integers(len(class_names()))) if label is None else label
    image, words = render(rng, label, image_size)
    return image, caption(rng, words), label


def _pair_members(key: str, image: Image.Image, text: str, label: int) -> list[tuple[str, bytes]]:
    meta = {"key": key, "caption": text, "label": label, "classname": class_names()[label],
            "status": "success", "width": image.width, "height": image.height}  # fmt: skip
    return [
        (f"{key}.jpg", _jpeg(image)),
        (f"{key}.txt", text.encode("utf-8")),
        (f"{key}.json", json.dumps(meta, sort_keys=True).encode("utf-8")),
    ]


def _write_shard(job: tuple) -> None:
    path, split, indices, seed, size, labels = job
    members: list[tuple[str, bytes]] = []
    for index in indices:
        label = None if labels is None else labels[index]
        image, text, label = _sample(seed, split, index, size, label)
        members += _pair_members(f"{index:09d}", image, text, label)
    write_shard(path, members)


def _write_pairs(
    out: Path, split: int, count: int, per_shard: int, seed: int, size: int, labels=None
) -> None:
    out.mkdir(parents=True)
    jobs = [
        (
            out / f"{shard:06d}.tar",
            split,
            range(start, min(start + per_shard, count)),
            seed,
            size,
            labels,
        )
        for shard, start in enumerate(range(0, count, per_shard))
    ]
    # Shards are independent (per-sample seeds), so processes cannot change the bytes.
    processes = min(len(jobs), os.cpu_count() or 1)
    if processes <= 1:
        for job in jobs:
            _write_shard(job)
        return
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        pool.map(_write_shard, jobs, chunksize=1)


def make_synthetic(
    out: str | Path,
    train_samples: int = 10000,
    val_per_class: int = 20,
    image_size: int = 64,
    seed: int = 0,
    samples_per_shard: int = 500,
    force: bool = False,
) -> Path:
    """Write the dataset to `out` (see module doc); refuses a non-empty `out` unless `force`.
    Writes into a temporary sibling directory and renames it, so `out` is never half-written."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise FileExistsError(f"--out '{out}' exists and is not empty; pass --force to replace it")
    if min(train_samples, val_per_class, image_size, samples_per_shard) <= 0 or image_size < 16:
        raise ValueError(
            "train_samples, val_per_class, samples_per_shard must be > 0 and image_size >= 16"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        names = class_names()
        _write_pairs(tmp / "train", SPLIT_TRAIN, train_samples, samples_per_shard, seed, image_size)
        for label, name in enumerate(names):
            folder = tmp / "val" / folder_name(name)
            folder.mkdir(parents=True)
            for i in range(val_per_class):
                image, _, _ = _sample(seed, SPLIT_VAL, label * val_per_class + i, image_size, label)
                (folder / f"{i:04d}.jpg").write_bytes(_jpeg(image))
        (tmp / "classnames.txt").write_text("".join(f"{n}\n" for n in names))
        pair_labels = [i % len(names) for i in range(val_per_class * len(names))]
        _write_pairs(
            tmp / "val_pairs",
            SPLIT_VAL_PAIRS,
            len(pair_labels),
            len(pair_labels),
            seed,
            image_size,
            pair_labels,
        )
        shutil.copytree(BUILTIN_TOKENIZER_DIR, tmp / "tokenizer")
        info = {"train_samples": train_samples, "val_per_class": val_per_class, "image_size": image_size,
                "seed": seed, "samples_per_shard": samples_per_shard, "classes": len(names)}  # fmt: skip
        (tmp / "synthetic.json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `disco-clip make-synthetic`."""
    parser = subparsers.add_parser("make-synthetic", help="write the built-in learnable dataset")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--train-samples", type=int, default=10000)
    parser.add_argument("--val-per-class", type=int, default=20)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--samples-per-shard", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        out = make_synthetic(args.out, args.train_samples, args.val_per_class, args.image_size,
                             args.seed, args.samples_per_shard, args.force)  # fmt: skip
    except (FileExistsError, ValueError) as exc:
        print(f"disco-clip make-synthetic: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
