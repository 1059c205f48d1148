"""Hugging Face `datasets` source: a `save_to_disk` directory, parquet files or an imagefolder.

Images are read undecoded (`Image(decode=False)`) so that shuffling, skipping and resuming never
pay for decoding; the loader decodes only what it yields. Non-streaming: each epoch is a seeded
permutation of row indices split rank-then-worker, so a resume jumps straight to its row.
Streaming: rows are dealt round-robin to the (rank, worker) slots in stream order, and the
loader's shuffle buffer mixes them; a resume replays the stream (reading, not decoding).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.shards import RawSample


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
        # Non-streaming epochs are already a random permutation: no buffer, direct skips.
        return not self.streaming

    def max_workers(self, world_size: int) -> int:
        if self.streaming:
            return 1 << 30  # rows are dealt one by one: any worker count gets rows
        rows = len(self.dataset())
        if rows < world_size:
            raise ValueError(
                f"hf_path: {rows} rows for {world_size} ranks; need at least one per rank"
            )
        return max(1, rows // world_size)

    @functools.cache  # noqa: B019 -- one open dataset per process; the source lives for the run
    def dataset(self):
        ds = _open(self.path, self.split, self.streaming)
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

    def epoch_samples(
        self, epoch: int, rank: int, world_size: int, worker: int, workers: int, skip: int = 0
    ) -> Iterator[RawSample]:
        ds = self.dataset()
        if self.streaming:
            slot, slots = rank * workers + worker, world_size * workers
            for index, row in enumerate(ds):
                if index % slots == slot:
                    yield self._raw(index, row)
            return
        n = len(ds)
        if self.resampled:
            rng = np.random.default_rng([self.seed, epoch, rank, worker, 1])
            mine = rng.integers(0, n, size=max(1, n // (world_size * workers)))
        else:
            mine = np.random.default_rng([self.seed, epoch]).permutation(n)[rank::world_size][
                worker::workers
            ]
        for index in mine[skip:]:
            yield self._raw(int(index), ds[int(index)])

    def _raw(self, index: int, row: dict) -> RawSample:
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
        return RawSample(shard=f"{self.path}[{self.split}]", key=str(index), members=members)


def _open(path: str, split: str, streaming: bool):
    import datasets

    root = Path(path)
    if any((root / name).is_file() for name in ("state.json", "dataset_dict.json")):
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split]
        return ds.to_iterable_dataset() if streaming else ds
    if root.suffix == ".parquet" or (root.is_dir() and any(root.rglob("*.parquet"))):
        files = [path] if root.is_file() else sorted(str(p) for p in root.rglob("*.parquet"))
        return datasets.load_dataset(
            "parquet", data_files={split: files}, split=split, streaming=streaming
        )
    return datasets.load_dataset("imagefolder", data_dir=path, split=split, streaming=streaming)
