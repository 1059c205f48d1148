"""One loader worker's infinite stream of batches, and the position that replays it.

A worker's sample order is a pure function of (source, seed, rank, world size, worker, worker
count, epoch): the source picks the epoch's raw samples, a shuffle buffer seeded by the same
values mixes them, and bad samples are skipped at the position where they would have been
yielded. The position after a batch is (epoch, raw samples taken from this epoch, bad samples
skipped so far); starting a worker from it gives exactly the batches that would have followed.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import torch

from data.decode import decode
from data.shards import RawSample
from data.tokenizer import tokenize
from data.transforms import sample_seed, train_transform

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerPosition:
    epoch: int = 0
    offset: int = 0  # raw samples already taken from this epoch's shuffled stream
    skipped: int = 0  # bad samples skipped by this worker since the start of training

    def as_list(self) -> list[int]:
        return [self.epoch, self.offset, self.skipped]


@dataclass(frozen=True)
class StreamSpec:
    """What every worker of one rank needs (picklable: sent to worker processes)."""

    source: Any  # WebDatasetSource | HFSource
    tokenizer: Any
    seed: int
    rank: int
    world_size: int
    workers: int  # logical workers: the order depends on this, not on processes
    batch_size: int
    shuffle_buffer: int
    image_size: int
    context_length: int
    crop_scale: tuple[float, float]


def shuffled(
    samples: Iterator[RawSample], size: int, rng: np.random.Generator
) -> Iterator[RawSample]:
    """Classic reservoir shuffle: fill `size`, then emit a random slot per incoming sample."""
    if size <= 1:
        yield from samples
        return
    buffer: list[RawSample] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        slot = int(rng.integers(size))
        buffer[slot], sample = sample, buffer[slot]
        yield sample
    for slot in rng.permutation(len(buffer)):
        yield buffer[slot]


def epoch_stream(spec: StreamSpec, worker: int, epoch: int, skip: int) -> Iterator[RawSample]:
    """This worker's raw samples of `epoch` in final order, without the first `skip` (which are
    read but never decoded)."""
    args = (epoch, spec.rank, spec.world_size, worker, spec.workers)
    if spec.source.presorted:
        return spec.source.epoch_samples(*args, skip=skip)
    rng = np.random.default_rng([spec.seed, epoch, spec.rank, worker, spec.workers, 2])
    stream = shuffled(spec.source.epoch_samples(*args), spec.shuffle_buffer, rng)
    return itertools.islice(stream, skip, None)


def worker_batches(
    spec: StreamSpec, worker: int, start: WorkerPosition
) -> Iterator[tuple[dict[str, torch.Tensor], WorkerPosition]]:
    """Infinite (batch, position after it) pairs of one logical worker, from `start`.

    A batch is dict(pixel_values (b, 3, S, S) uint8, input_ids (b, L), attention_mask (b, L)):
    the pixels are not rescaled or normalised here (see data/transforms.normalize_pixels)."""
    transform = train_transform(spec.image_size, spec.crop_scale)
    epoch, offset, skipped = start.epoch, start.offset, start.skipped
    pixels: list[torch.Tensor] = []
    texts: list[str] = []
    while True:
        good_in_epoch, resumed_mid_epoch = 0, offset > 0
        for sample in epoch_stream(spec, worker, epoch, offset):
            offset += 1
            try:
                image, text = decode(sample)
            except ValueError as exc:
                skipped += 1
                log.warning(
                    "skipping bad sample shard=%s key=%s: %s", sample.shard, sample.key, exc
                )
                continue
            good_in_epoch += 1
            # The crop depends on the sample's identity, not on process or timing.
            key = f"{PurePosixPath(sample.shard).name}/{sample.key}"
            pixels.append(transform(image, sample_seed(spec.seed, epoch, key)))
            texts.append(text)
            if len(pixels) == spec.batch_size:
                input_ids, attention_mask = tokenize(spec.tokenizer, texts, spec.context_length)
                batch = {
                    # uint8 RGB crops; the trainer normalises on the device (normalize_pixels).
                    "pixel_values": torch.stack(pixels),  # (b, 3, S, S) uint8
                    "input_ids": input_ids,  # (b, L)
                    "attention_mask": attention_mask,  # (b, L)
                }
                yield batch, WorkerPosition(epoch, offset, skipped)
                pixels, texts = [], []
        if good_in_epoch == 0 and not resumed_mid_epoch:
            raise RuntimeError(
                f"rank {spec.rank} worker {worker} got no usable sample in epoch {epoch}; "
                f"check the data (all samples bad?) or use fewer workers/ranks"
            )
        epoch, offset = epoch + 1, 0
