"""Hugging Face `datasets` source: a `save_to_disk` directory, parquet files or an imagefolder.

Images are read undecoded (`Image(decode=False)`) so that shuffling, skipping and resuming never
pay for decoding; the loader decodes only what it yields. Non-streaming: each epoch is a seeded
permutation of row indices dealt to the S logical streams, so a resume jumps straight to its
row. Streaming: each stream reads its own files of the dataset (so the streams together read it
once), and its shuffle buffer mixes them; a resume replays the stream's epoch (reading, not
decoding).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.hf_open import open_hf_dataset
from data.shards import RawSample

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HFSource:
    path: str
    split: str
    streaming: bool
    image_column: str
    text_column: str
    seed: int
    resampled: bool = False

    @property
    def presorted(self) -> bool:
        # Non-streaming epochs are already a random permutation: no buffer, direct jumps.
        return not self.streaming

    @property
    def seekable(self) -> bool:
        return not self.streaming

    def check_streams(self, streams: int) -> None:
        ds = self.dataset()
        if self.streaming:
            files = ds.num_shards
            if files < streams:
                log.warning(
                    "hf_path: the streaming dataset has %d file(s) for data.streams=%d: every "
                    "stream reads all of it and keeps its share (%d× the reading); give it at "
                    "least as many files as streams, or set data.hf_streaming=false",
                    files, streams, streams,
                )  # fmt: skip
            return
        elif len(ds) < streams:
            raise ValueError(
                f"hf_path: {len(ds)} rows for data.streams={streams}; need one per stream"
            )

    @functools.cache  # noqa: B019 -- one open dataset per process; the source lives for the run
    def dataset(self):
        ds = open_hf_dataset(self.path, self.split, self.streaming)
        for column in (self.image_column, self.text_column):
            if column not in (ds.column_names or []):
                raise ValueError(
                    f"{'image' if column == self.image_column else 'text'}_column: '{column}' is not "
                    f"a column of {self.path} (columns: {ds.column_names})"
                )
        from datasets import Image

        if isinstance(ds.features[self.image_column], Image):
            ds = ds.cast_column(self.image_column, Image(decode=False))
        return ds

    def stream_samples(
        self, epoch: int, stream: int, streams: int, cursor: list | None
    ) -> Iterator[tuple[RawSample, list]]:
        """(raw sample, cursor after it) of `stream` in `epoch`. Non-streaming: the stream's
        rows are every S-th row of the epoch's permutation and the cursor is the position among
        them. Streaming: the stream reads its own files (`IterableDataset.shard`), so the
        streams together read the dataset once per epoch; the cursor only counts."""
        ds = self.dataset()
        if self.streaming:
            if ds.num_shards >= streams:  # its own files
                rows = enumerate(ds.shard(num_shards=streams, index=stream))
            else:  # fewer files than streams: every S-th row of the whole stream
                rows = ((i, r) for i, r in enumerate(ds) if i % streams == stream)
            for index, (_, row) in enumerate(rows):
                yield self._raw(f"{stream}.{index}", row), [index + 1]
            return
        n = len(ds)
        if self.resampled:
            rng = np.random.default_rng([self.seed, epoch, stream, 1])
            rows = rng.integers(0, n, size=max(1, n // streams))
        else:
            rows = np.random.default_rng([self.seed, epoch]).permutation(n)[stream::streams]
        start = cursor[0] if cursor else 0
        for position in range(start, len(rows)):
            index = int(rows[position])
            yield self._raw(str(index), ds[index]), [position + 1]

    def fetch(self, refs: list) -> list[RawSample]:
        raise NotImplementedError("presorted or non-seekable: nothing is ever fetched")

    def _raw(self, key: str, row: dict) -> RawSample:
        image, text = row.get(self.image_column), row.get(self.text_column)
        if isinstance(image, dict):  # an undecoded Image feature: bytes, or a path to read
            if image.get("bytes") is None and image.get("path"):
                image = {"bytes": Path(image["path"]).read_bytes()}
            image = image.get("bytes")
        elif isinstance(image, str):
            image = Path(image).read_bytes()
        members = {}
        if isinstance(image, bytes):
            members["jpg"] = image  # the decoder reads any format PIL knows, whatever the name
        if isinstance(text, str):
            members["txt"] = text.encode("utf-8")
        return RawSample(shard=f"{self.path}[{self.split}]", key=key, members=members)
