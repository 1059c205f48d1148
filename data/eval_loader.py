"""Eval sets through a torch DataLoader: each rank decodes only its own share, in workers.

Every eval set is a sequence of samples with a fixed global index: the order of a file list
(ImageFolder, ImageNet-family layouts, caption files) or, over tar shards, the count of raw
samples in shard order. Sample i belongs to rank i mod W, and rank r's j-th sample to its loader
worker j mod K. A reader skips every sample that is not its own *before* decoding it, so the
PIL decode and resize (the cost of an eval) are split W·K ways. Over tar shards a reader still
reads the others' bytes: a tar has no index, so reaching sample i means reading past 0..i-1;
that is a sequential read, far cheaper than a decode.

Items are `(index, pixels, target)`: pixels are the eval transform's crop as uint8 (3, S, S)
(a quarter of fp32 over the worker pipe; normalised on the model's device by
`data.transforms.normalize_pixels`, bit-identical to normalising here), target is an int label
or a list of captions. Because every item carries its global index, results never depend on
which rank or worker encoded it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.decode import open_rgb
from data.eval_sets import sample_captions
from data.shards import expand_shards, read_shard
from data.transforms import eval_crop, to_uint8_tensor

log = logging.getLogger(__name__)

Target = Any  # int label or list[str] captions


@dataclass(frozen=True)
class Share:
    """Which samples one reader owns: rank `rank` of `world` ranks, worker `worker` of that
    rank's `workers` loader workers (a rank's only reader when it has no workers)."""

    rank: int = 0
    world: int = 1
    worker: int = 0
    workers: int = 1

    def owns(self, index: int) -> bool:
        return (
            index % self.world == self.rank and (index // self.world) % self.workers == self.worker
        )


@dataclass(frozen=True)
class ListedSet:
    """A set given as a list of (image file, target), e.g. an ImageFolder."""

    items: Sequence[tuple[Path, Target]]

    def read(self, share: Share) -> Iterator[tuple[int, bytes | Path, Target]]:
        for index, (path, target) in enumerate(self.items):
            if share.owns(index):
                yield index, path, target


@dataclass(frozen=True)
class ShardSet:
    """A set stored as webdataset tar shards; `need` is "label" (an int `label` in the .json)
    or "captions" (data.eval_sets.sample_captions). `limit` > 0 keeps raw samples 0..limit-1."""

    spec: str
    need: str
    limit: int = 0

    def read(self, share: Share) -> Iterator[tuple[int, bytes | Path, Target]]:
        shards = expand_shards(self.spec)
        if not shards:
            raise ValueError(f"no .tar files match '{self.spec}'")
        index = 0
        for url in shards:
            for sample in read_shard(url):
                if sample.error:
                    log.warning("eval shard %s: %s", url, sample.error)
                    continue
                index += 1
                if self.limit and index > self.limit:
                    return
                if not share.owns(index - 1):
                    continue  # someone else's sample: never parsed, never decoded
                target = self._target(sample)
                if target is None or sample.image is None:
                    log.warning("skipping eval sample shard=%s key=%s: no %s or no image",
                                url, sample.key, self.need)  # fmt: skip
                    continue
                yield index - 1, sample.image, target

    def _target(self, sample) -> Target | None:
        try:
            meta = json.loads(sample.meta) if sample.meta else {}
            if self.need == "label":
                label = meta.get("label")
                return label if isinstance(label, int) else None
            text = sample.text.decode("utf-8") if sample.text else ""
            return sample_captions(text, meta) or None
        except (ValueError, UnicodeDecodeError) as exc:
            log.warning("skipping eval sample key=%s: %s", sample.key, exc)
            return None


EvalSet = ListedSet | ShardSet


@dataclass(frozen=True)
class DecodeForEval:
    """Image file or bytes -> uint8 (3, S, S): data.transforms' eval transform before its
    normalisation. Decoded like training images (data/decode.py: every PIL mode, EXIF). A
    class, not a closure: loader workers started by spawn or forkserver must pickle it."""

    image_size: int

    def __call__(self, source: bytes | Path) -> torch.Tensor:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        return to_uint8_tensor(eval_crop(open_rgb(data), self.image_size))


class _RankShare(IterableDataset):
    """This rank's samples, decoded by whichever worker owns them."""

    def __init__(self, source: EvalSet, crop: Callable, rank: int, world: int):
        self.source, self.crop, self.rank, self.world = source, crop, rank, world

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor, Target]]:
        info = get_worker_info()
        share = Share(
            self.rank, self.world, info.id if info else 0, info.num_workers if info else 1
        )
        for index, image, target in self.source.read(share):
            try:
                pixels = self.crop(image)
            except (ValueError, OSError) as exc:
                log.warning("skipping eval image %s: %s", index, exc)
                continue
            yield index, pixels, target


def _collate(items: list[tuple[int, torch.Tensor, Target]]):
    """-> (indices (n,) long, pixels (n, 3, S, S) uint8, targets list)."""
    indices = torch.tensor([i for i, _, _ in items], dtype=torch.long)
    return indices, torch.stack([p for _, p, _ in items]), [t for _, _, t in items]


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)  # decode is single-threaded PIL; intra-op threads only oversubscribe


def eval_batches(
    source: EvalSet, *, image_size: int, batch_size: int, rank: int, world: int, workers: int
) -> DataLoader:
    """Batches (indices, uint8 pixels, targets) of this rank's share of `source`."""
    return DataLoader(
        _RankShare(source, DecodeForEval(image_size), rank, world),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_collate,
        worker_init_fn=_one_thread if workers else None,
        pin_memory=torch.cuda.is_available(),  # CUDA-only: pinned for the async copy
    )


# ---- a whole set in one process (tests, tools): the same reader, owning every sample ------


def decoded(source: EvalSet) -> Iterator[tuple[Image.Image, Target]]:
    """(RGB image, target) for every sample of `source`, in index order; undecodable skipped."""
    for index, image, target in source.read(Share()):
        try:
            data = image if isinstance(image, bytes) else Path(image).read_bytes()
            yield open_rgb(data), target
        except ValueError as exc:
            log.warning("skipping eval image %s: %s", index, exc)


def wds_labelled(spec: str) -> Iterator[tuple[Image.Image, int]]:
    """(image, label) from shards whose .json has an int `label` (zero-shot classification)."""
    return decoded(ShardSet(spec, "label"))


def wds_captioned(spec: str) -> Iterator[tuple[Image.Image, list[str]]]:
    """(image, captions) from shards (data.eval_sets.sample_captions); captionless skipped."""
    return decoded(ShardSet(spec, "captions"))


def wds_pairs(spec: str) -> Iterator[tuple[Image.Image, str]]:
    """(image, caption text) from shards: the captions joined one per line."""
    for image, captions in wds_captioned(spec):
        yield image, "\n".join(captions)
