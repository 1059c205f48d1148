"""Several tar-shard sources mixed by weight: the S logical streams are dealt to the sources.

Source k gets n_k of the S streams, n_k proportional to its weight (largest remainder, at least
one each), and stream s reads as stream j of n_k of its source. Every global batch therefore
holds exactly n_k/S of source k, the same at every step, on any number of ranks, and a stream's
position is its source's position: the mix is as deterministic and resumable as one source.
The realised shares differ from the weights by less than 1/S; they are logged at start.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

from data.shards import RawSample
from data.wds_source import WebDatasetSource

log = logging.getLogger(__name__)


def deal_streams(weights: list[float], streams: int) -> list[int]:
    """Streams per source: proportional to `weights`, at least one each, summing to `streams`."""
    if streams < len(weights):
        raise ValueError(
            f"sources: {len(weights)} sources need at least as many streams; data.streams is "
            f"{streams}"
        )
    total = sum(weights)
    spare = streams - len(weights)  # one each first, the rest by weight
    exact = [w / total * spare for w in weights]
    counts = [1 + int(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda k: exact[k] - int(exact[k]), reverse=True)
    for k in by_remainder[: streams - sum(counts)]:
        counts[k] += 1
    return counts


@dataclass(frozen=True)
class MixedSource:
    sources: tuple[WebDatasetSource, ...]
    weights: tuple[float, ...]
    presorted = False

    @property
    def seekable(self) -> bool:
        return all(source.seekable for source in self.sources)

    def _route(self, stream: int, streams: int) -> tuple[int, int, int]:
        """(source index, stream index within that source, that source's stream count)."""
        counts = deal_streams(list(self.weights), streams)
        first = 0
        for k, count in enumerate(counts):
            if stream < first + count:
                return k, stream - first, count
            first += count
        raise ValueError(f"stream {stream} is outside data.streams={streams}")

    def check_streams(self, streams: int) -> None:
        counts = deal_streams(list(self.weights), streams)
        for k, (source, count) in enumerate(zip(self.sources, counts, strict=True)):
            try:
                source.check_streams(count)
            except ValueError as err:
                raise ValueError(f"sources[{k}]: {err}") from None
            log.info(
                "data: source %d (%d shards, weight %g) reads %d of %d streams: %.1f%% of every "
                "batch", k, len(source.shards), self.weights[k], count, streams,
                100 * count / streams,
            )  # fmt: skip

    def stream_samples(
        self, epoch: int, stream: int, streams: int, cursor: list | None
    ) -> Iterator[tuple[RawSample, list]]:
        k, local, count = self._route(stream, streams)
        for sample, after in self.sources[k].stream_samples(epoch, local, count, cursor):
            sample.ref = [k, *sample.ref]  # which source can read it again
            yield sample, after

    def fetch(self, refs: list) -> list[RawSample]:
        out = []
        for k, *ref in refs:
            (sample,) = self.sources[k].fetch([ref])
            sample.ref = [k, *sample.ref]
            out.append(sample)
        return out
