"""Opening a Hugging Face `datasets` source: a `save_to_disk` directory (Dataset or
DatasetDict), parquet files, or an imagefolder directory; as a table or as a stream.

Errors a user can fix (a split the dataset does not have) are one-line ValueErrors naming the
`data.` field. A stream is returned as a `WholeStream`: iterated in full in every process (see
there for why), cut into as many files ("shards") as it sensibly can be, so that the loader's
streams can each read their own: a saved dataset or an imagefolder into up to 64 row ranges,
parquet into its row groups.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def open_hf_dataset(path: str, split: str, streaming: bool):
    """The split `split` of the dataset at `path`: a `datasets.Dataset`, or a `WholeStream`
    over a `datasets.IterableDataset` when `streaming`.

    A `save_to_disk` directory of a single Dataset ignores `split`; a DatasetDict or an
    imagefolder with split folders (train/, test/, ...) must have it, else ValueError naming
    data.hf_split and the splits there are. Parquet files are all read as `split` (its name is
    only a label there).

    Streaming an imagefolder: `datasets` streams a whole folder as ONE file, which no two
    loader streams can share; it is opened as a table instead (an Arrow cache of the paths and
    metadata in the HF cache, no image bytes) and streamed from that in row ranges, in the
    same order."""
    import datasets

    root = Path(path)
    if any((root / name).is_file() for name in ("state.json", "dataset_dict.json")):
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(_split_error(path, split, list(ds)))
            ds = ds[split]
        if not streaming:
            return ds
        # Cut the table into row ranges, so that a stream can be split into its own files.
        return WholeStream(_row_ranges(ds))
    if root.suffix == ".parquet" or (root.is_dir() and any(root.rglob("*.parquet"))):
        files = [path] if root.is_file() else sorted(str(p) for p in root.rglob("*.parquet"))
        ds = datasets.load_dataset(
            "parquet", data_files={split: files}, split=split, streaming=streaming
        )
        return WholeStream(ds.reshard()) if streaming else ds  # one shard per row group
    builder = datasets.load_dataset_builder("imagefolder", data_dir=path)
    splits = [str(name) for name in (builder.config.data_files or {})]
    if split not in splits:
        raise ValueError(_split_error(path, split, splits))
    ds = datasets.load_dataset("imagefolder", data_dir=path, split=split)
    return WholeStream(_row_ranges(ds)) if streaming else ds


def _row_ranges(ds):
    """A table as a stream of up to 64 row ranges (so that streams can get their own)."""
    return ds.to_iterable_dataset(num_shards=max(1, min(len(ds), 64)))


def _split_error(path: str, split: str, splits: list[str]) -> str:
    return (
        f"hf_split: '{split}' is not a split of {path} (splits: {', '.join(splits) or 'none'}); "
        f"set data.hf_split to one of them"
    )


class WholeStream:
    """A `datasets.IterableDataset` that every process iterates in full.

    Iterated inside a torch DataLoader worker, an IterableDataset splits its files among the
    workers by itself (worker w of W reads files w::W, and nothing at all when it has fewer
    files than W: "Too many dataloader workers ... Stopping 1 dataloader workers"). HFSource
    already gives every worker its own rows or files, so that second split silently dropped
    data, or left a worker with an empty stream ("got no usable sample"). This wrapper iterates
    through `IterableDataset.iter` (the same examples in the same order as iterating it in the
    main process, never split by worker) and delegates everything else, wrapping again the
    IterableDatasets that methods such as `cast_column` and `shard` return."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.dataset.iter(batch_size=1):
            yield {column: values[0] for column, values in batch.items()}

    def __getattr__(self, name: str):
        if name.startswith("_") or name == "dataset":  # also keeps pickle/copy from recursing
            raise AttributeError(name)
        value = getattr(self.dataset, name)
        if not callable(value):
            return value

        @functools.wraps(value)
        def call(*args, **kwargs):
            import datasets

            out = value(*args, **kwargs)
            return WholeStream(out) if isinstance(out, datasets.IterableDataset) else out

        return call

    def __repr__(self) -> str:
        return f"WholeStream({self.dataset!r})"
