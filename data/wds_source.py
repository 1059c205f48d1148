"""Tar-shard source: which shards each (rank, worker) reads in each epoch.

Epoch mode: one seeded permutation of the shard list per epoch, identical on every rank; rank r
takes every N-th shard from r, and its W workers split those round-robin -- disjoint by
construction. Resampled mode: each (rank, worker) draws shards with replacement from a generator
seeded by (seed, epoch, rank, worker); an "epoch" there is just a fixed number of draws, which
bounds how far a resume has to replay.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from data.shards import RawSample, expand_shards, read_shard


@dataclass(frozen=True)
class WebDatasetSource:
    shards: tuple[str, ...]
    seed: int
    resampled: bool = False
    allow_pipe: bool = False
    # Raw samples come in stored order; the loader's shuffle buffer mixes them.
    presorted = False

    @classmethod
    def from_spec(
        cls, spec: str, *, seed: int, resampled: bool, allow_pipe: bool
    ) -> WebDatasetSource:
        if "pipe:" in spec and not allow_pipe:
            raise ValueError(
                "train_shards: 'pipe:' URLs are refused; set data.allow_pipe=true to allow them"
            )
        shards = expand_shards(spec, allow_pipe=allow_pipe)
        if not shards:
            raise ValueError(
                f"train_shards: no .tar files match '{spec}'; run 'disco-clip make-synthetic --out DIR' or fix the path"
            )
        return cls(tuple(shards), seed, resampled, allow_pipe)

    def max_workers(self, world_size: int) -> int:
        """Most workers per rank that all get at least one shard per epoch."""
        if not self.resampled and len(self.shards) < world_size:
            raise ValueError(
                f"train_shards: {len(self.shards)} shard(s) for {world_size} ranks; every rank needs "
                f"its own shard -- write more, smaller shards (make-synthetic --samples-per-shard)"
            )
        return max(1, len(self.shards) // world_size)

    def epoch_shards(
        self, epoch: int, rank: int, world_size: int, worker: int, workers: int
    ) -> list[str]:
        n = len(self.shards)
        if self.resampled:
            draws = max(1, n // (world_size * workers))
            rng = np.random.default_rng([self.seed, epoch, rank, worker, 1])
            return [self.shards[i] for i in rng.integers(0, n, size=draws)]
        order = np.random.default_rng([self.seed, epoch]).permutation(n)
        return [self.shards[i] for i in order[rank::world_size][worker::workers]]

    def epoch_samples(
        self, epoch: int, rank: int, world_size: int, worker: int, workers: int, skip: int = 0
    ) -> Iterator[RawSample]:
        del skip  # not presorted: the loader replays through its shuffle buffer instead
        for url in self.epoch_shards(epoch, rank, world_size, worker, workers):
            yield from read_shard(url, allow_pipe=self.allow_pipe)
