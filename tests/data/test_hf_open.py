"""open_hf_dataset: a wrong split is one line naming data.hf_split; a stream is read in full
inside every DataLoader worker (datasets' own per-worker file split used to leave a worker of a
1-file stream with nothing: a 1-file imagefolder streamed with data.workers=2 failed with
"data.train_shards: rank 0 worker 1 got no usable sample"); streams come in several files."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from data.hf_open import WholeStream, open_hf_dataset

TEXTS = [f"caption {i}" for i in range(6)]


@pytest.fixture(scope="module")
def dataset_dict(tmp_path_factory):
    from datasets import Dataset, DatasetDict

    out = tmp_path_factory.mktemp("hf_open") / "dict"
    DatasetDict(
        {"train": Dataset.from_dict({"text": TEXTS}), "test": Dataset.from_dict({"text": ["t"]})}
    ).save_to_disk(str(out))
    return out


@pytest.fixture(scope="module")
def one_file_parquet(tmp_path_factory):
    """One parquet file of one row group: a stream of a single file (num_shards == 1)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path_factory.mktemp("hf_open") / "one.parquet"
    pq.write_table(pa.table({"text": TEXTS}), out)
    return out


@pytest.fixture(scope="module")
def row_groups_parquet(tmp_path_factory):
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path_factory.mktemp("hf_open") / "groups.parquet"
    pq.write_table(pa.table({"text": TEXTS}), out, row_group_size=2)
    return out


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """An imagefolder, which `datasets` streams as a single file."""
    out = tmp_path_factory.mktemp("hf_open") / "folder"
    out.mkdir()
    with open(out / "metadata.jsonl", "w") as meta:
        for index, text in enumerate(TEXTS):
            Image.new("RGB", (4, 4), (40 * index, 0, 0)).save(out / f"{index}.png")
            meta.write(json.dumps({"file_name": f"{index}.png", "text": text}) + "\n")
    return out


def test_a_saved_dataset_dict_opens_by_split(dataset_dict):
    assert open_hf_dataset(str(dataset_dict), "train", False)["text"] == TEXTS
    stream = open_hf_dataset(str(dataset_dict), "train", True)
    assert isinstance(stream, WholeStream)
    assert [row["text"] for row in stream] == TEXTS


@pytest.mark.parametrize("streaming", [False, True])
def test_a_wrong_split_of_a_dataset_dict_is_one_line_naming_the_field(dataset_dict, streaming):
    with pytest.raises(ValueError) as info:
        open_hf_dataset(str(dataset_dict), "validation", streaming)
    message = str(info.value)
    assert message.startswith("hf_split: 'validation' is not a split of ")
    assert "splits: train, test" in message and "set data.hf_split" in message
    assert "\n" not in message


def test_a_wrong_split_of_an_imagefolder_is_one_line_naming_the_field(image_folder):
    with pytest.raises(ValueError, match=r"^hf_split: 'val' .*\(splits: train\); set data\.hf_"):
        open_hf_dataset(str(image_folder), "val", True)


class _EachWorkerReads(torch.utils.data.IterableDataset):
    """Yields, from each DataLoader worker, the texts that worker reads from the stream (or
    from shard `shard` of 2 of it)."""

    def __init__(self, path: str, shard: int | None = None) -> None:
        self.path, self.shard = path, shard

    def __iter__(self):
        stream = open_hf_dataset(self.path, "train", True)
        if "image" in stream.column_names:
            stream = stream.cast_column("image", _undecoded())  # as HFSource does
        if self.shard is not None:
            stream = stream.shard(num_shards=2, index=self.shard)
        info = torch.utils.data.get_worker_info()
        yield info.id, [row["text"] for row in stream]


def _undecoded():
    from datasets import Image as ImageFeature

    return ImageFeature(decode=False)


def test_a_one_file_stream_is_read_in_full_by_every_worker(one_file_parquet):
    assert open_hf_dataset(str(one_file_parquet), "train", True).num_shards == 1
    loader = torch.utils.data.DataLoader(
        _EachWorkerReads(str(one_file_parquet)), batch_size=None, num_workers=2
    )
    seen = dict(loader)
    # before: worker 1 got [] ("Too many dataloader workers ... Stopping 1 dataloader workers")
    assert seen == {0: TEXTS, 1: TEXTS}


def test_an_imagefolder_stream_comes_in_row_ranges_in_table_order(image_folder):
    """datasets streams a folder as one file; opened here as row ranges, so that streams can
    each read their own, in the same order as the table."""
    stream = open_hf_dataset(str(image_folder), "train", True)
    assert stream.num_shards == len(TEXTS) and stream.column_names == ["image", "text"]
    assert [row["text"] for row in stream] == TEXTS
    assert open_hf_dataset(str(image_folder), "train", False)["text"] == TEXTS
    halves = [stream.shard(num_shards=2, index=i) for i in range(2)]
    assert sorted(row["text"] for half in halves for row in half) == sorted(TEXTS)
    loader = torch.utils.data.DataLoader(
        _EachWorkerReads(str(image_folder)), batch_size=None, num_workers=2
    )
    assert dict(loader) == {0: TEXTS, 1: TEXTS}


def test_a_parquet_stream_comes_in_row_groups(row_groups_parquet):
    stream = open_hf_dataset(str(row_groups_parquet), "train", True)
    assert stream.num_shards == 3
    assert [row["text"] for row in stream] == TEXTS


def test_a_shard_of_a_stream_is_not_split_again_by_worker(dataset_dict):
    """A stream's own shard (what HFSource gives one logical stream) read in worker 1 of 2 is
    the whole shard, not the part of it that datasets would give worker 1."""
    shard = open_hf_dataset(str(dataset_dict), "train", True).shard(num_shards=2, index=1)
    assert isinstance(shard, WholeStream)
    expected = [row["text"] for row in shard]  # read in the main process
    assert 0 < len(expected) < len(TEXTS)
    loader = torch.utils.data.DataLoader(
        _EachWorkerReads(str(dataset_dict), shard=1), batch_size=None, num_workers=2
    )
    assert dict(loader) == {0: expected, 1: expected}
