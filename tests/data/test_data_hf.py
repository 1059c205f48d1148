"""HF `datasets` sources: save_to_disk, parquet, imagefolder; streaming or not; custom columns."""

from __future__ import annotations

import io
import itertools
import json
import logging

import pytest
from PIL import Image

from data.config import DataConfig
from data.eval_loader import wds_pairs
from tests.data.helpers import loader, same, take

N = 48


@pytest.fixture(scope="module")
def pairs(synthetic_dir):
    """48 (image, caption) pairs from the synthetic val_pairs shard."""
    return list(itertools.islice(wds_pairs(str(synthetic_dir / "val_pairs")), N))


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def saved_dir(pairs, tmp_path_factory):
    from datasets import Dataset, Features, Image, Value

    features = Features({"img": Image(), "caption": Value("string")})
    ds = Dataset.from_dict({"img": [{"bytes": _jpeg(i), "path": None} for i, _ in pairs],
                            "caption": [c for _, c in pairs]}, features=features)  # fmt: skip
    out = tmp_path_factory.mktemp("hf") / "saved"
    ds.save_to_disk(str(out))
    return out


@pytest.fixture(scope="module")
def parquet_dir(saved_dir, tmp_path_factory):
    from datasets import load_from_disk

    out = tmp_path_factory.mktemp("hf") / "parquet"
    out.mkdir()
    ds = load_from_disk(str(saved_dir))  # two files, as a streaming dataset needs one per stream
    ds.select(range(N // 2)).to_parquet(str(out / "part-0.parquet"))
    ds.select(range(N // 2, N)).to_parquet(str(out / "part-1.parquet"))
    return out


@pytest.fixture(scope="module")
def imagefolder_dir(pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "folder"
    out.mkdir()
    with open(out / "metadata.jsonl", "w") as meta:
        for index, (image, caption) in enumerate(pairs):
            image.save(out / f"{index:03d}.jpg")
            meta.write(json.dumps({"file_name": f"{index:03d}.jpg", "text": caption}) + "\n")
    return out


def _cfg(path, streaming, **columns) -> DataConfig:
    cfg = DataConfig(source="hf", hf_path=str(path), hf_streaming=streaming, image_size=16,
                     context_length=16, shuffle_buffer=10, workers=0, streams=2, **columns)  # fmt: skip
    cfg.validate()
    return cfg


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("kind", ["saved", "parquet", "imagefolder"])
def test_hf_sources_yield_exact_batches_and_resume(kind, streaming, request):
    path = request.getfixturevalue(f"{kind}_dir")
    columns = {"image_column": "img", "text_column": "caption"} if kind != "imagefolder" else {}
    cfg = _cfg(path, streaming, **columns)
    # 48 rows / 2 ranks = 24 per epoch; 7 batches of 5 cross an epoch boundary
    expected = take(loader(cfg, rank=1, world_size=2, batch=5), 7)
    assert all(b["pixel_values"].shape == (5, 3, 16, 16) for b in expected)
    assert expected[0]["input_ids"].shape == (5, 16)
    first = loader(cfg, rank=1, world_size=2, batch=5)
    take(first, 3)
    resumed = loader(cfg, rank=1, world_size=2, batch=5)
    resumed.load_state_dict(first.state_dict())
    assert same(take(resumed, 4), expected[3:])
    other_rank = take(loader(cfg, rank=0, world_size=2, batch=5), 1)
    assert not same(other_rank, expected[:1])


def test_wrong_column_name_is_a_clear_error(saved_dir):
    cfg = _cfg(saved_dir, False, image_column="image", text_column="caption")
    with pytest.raises(ValueError, match=r"^image_column: 'image'"):
        take(loader(cfg, batch=4), 1)


def test_missing_hf_path_fails_validation(tmp_path):
    with pytest.raises(ValueError, match=r"^hf_path: .* does not exist"):
        DataConfig(source="hf", hf_path=str(tmp_path / "nope")).validate()


@pytest.mark.parametrize("kind", ["saved", "parquet"])
def test_streaming_streams_read_the_dataset_once_per_epoch(kind, pairs, request, caplog):
    """Each stream reads its own files, so together they read every row exactly once (the old
    loader read the whole stream in every worker and kept every N·W-th row: N·W times the I/O,
    and with 2 workers over a 2-file parquet set it trained on half of it)."""
    from data.loader import build_source

    columns = {"image_column": "img", "text_column": "caption"}
    cfg = _cfg(request.getfixturevalue(f"{kind}_dir"), True, **columns)
    source = build_source(cfg, seed=0)
    source.check_streams(2)
    seen = [
        s.text.decode() for stream in (0, 1) for s, _ in source.stream_samples(0, stream, 2, None)
    ]
    assert sorted(seen) == sorted(caption for _, caption in pairs)
    with caplog.at_level(logging.WARNING, logger="data.hf"):
        source.check_streams(100)  # more streams than files: correct, but says what it costs
    assert "data.streams=100" in caplog.text
