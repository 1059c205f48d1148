"""Tar-shard source: which shards each logical stream reads in each epoch, and re-reading a
sample from its reference.

Epoch mode: one seeded permutation of the shard list per epoch; stream s of S takes every S-th
shard from s -- disjoint, and the union is every shard once. Resampled mode: each stream draws
n/S shards with replacement from a generator seeded by (seed, epoch, stream); an "epoch" there
is just that many draws. Neither depends on ranks or workers (docs/data_order.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from data.shards import RawSample, expand_shards, read_shard


def _is_local(url: str) -> bool:
    return not (url.startswith("pipe:") or "://" in url)


@dataclass(frozen=True)
class WebDatasetSource:
    shards: tuple[str, ...]
    seed: int
    resampled: bool = False
    allow_pipe: bool = False
    allow_remote: bool = False
    # Raw samples come in stored order; each stream's shuffle buffer mixes them.
    presorted = False

    @classmethod
    def from_spec(
        cls, spec: str, *, seed: int, resampled: bool, allow_pipe: bool, allow_remote: bool = False
    ) -> WebDatasetSource:
        if "pipe:" in spec and not allow_pipe:
            raise ValueError(
                "train_shards: 'pipe:' URLs are refused; set data.allow_pipe=true to allow them"
            )
        shards = expand_shards(spec, allow_pipe=allow_pipe, allow_remote=allow_remote)
        if not shards:
            raise ValueError(
                f"train_shards: no .tar files match '{spec}'; run 'disco-clip make-synthetic --out DIR' or fix the path"
            )
        return cls(tuple(shards), seed, resampled, allow_pipe, allow_remote)

    @property
    def seekable(self) -> bool:
        """Local files: a resume seeks to byte offsets. Pipes and URLs replay instead."""
        return all(_is_local(url) for url in self.shards)

    def check_streams(self, streams: int) -> None:
        if not self.resampled and len(self.shards) < streams:
            raise ValueError(
                f"train_shards: {len(self.shards)} shard(s) for data.streams={streams} logical "
                f"streams; every stream reads its own shards in an epoch -- set "
                f"data.resampled=true (streams draw shards with replacement), lower data.streams, "
                f"or write more, smaller shards (make-synthetic --samples-per-shard)"
            )

    def stream_shards(self, epoch: int, stream: int, streams: int) -> list[int]:
        """Indices into `shards` that `stream` reads in `epoch`, in reading order."""
        n = len(self.shards)
        if self.resampled:
            rng = np.random.default_rng([self.seed, epoch, stream, 1])
            return [int(i) for i in rng.integers(0, n, size=max(1, n // streams))]
        order = np.random.default_rng([self.seed, epoch]).permutation(n)
        return [int(i) for i in order[stream::streams]]

    def stream_samples(
        self, epoch: int, stream: int, streams: int, cursor: list | None
    ) -> Iterator[tuple[RawSample, list]]:
        """(raw sample, cursor after it) of `stream` in `epoch`, from `cursor` = [position in the
        stream's shard list, byte offset of the next sample in that shard] (None: the start).
        Each sample's `ref` is [shard index, start byte, end byte] ([shard, -1, -1] for an
        error sample, and for pipes and URLs, which cannot seek)."""
        order = self.stream_shards(epoch, stream, streams)
        first, offset = cursor if cursor else (0, 0)
        for position in range(first, len(order)):
            shard = order[position]
            url = self.shards[shard]
            start = offset if position == first else 0
            for sample in read_shard(
                url, allow_pipe=self.allow_pipe, allow_remote=self.allow_remote, offset=start
            ):
                if sample.ref is None:  # error sample, or a shard that cannot seek
                    sample.ref = [shard, -1, -1]
                    yield sample, [position + 1, 0] if sample.error else [position, -1]
                    continue
                begin, end = sample.ref
                sample.ref = [shard, begin, end]
                yield sample, [position, end]

    def fetch(self, refs: list) -> list[RawSample]:
        """The samples at `refs` (from `stream_samples`), in the same order."""
        out = []
        for shard, begin, _end in refs:
            url = self.shards[shard]
            if begin < 0:
                out.append(RawSample(shard=url, key="?", error="unreadable when buffered"))
                continue
            sample = next(
                iter(
                    read_shard(
                        url,
                        allow_pipe=self.allow_pipe,
                        allow_remote=self.allow_remote,
                        offset=begin,
                    )
                )
            )
            sample.ref = [shard, begin, sample.ref[1] if sample.ref else -1]
            out.append(sample)
        return out
