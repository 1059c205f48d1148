"""data.sources: several shard sets mixed by weight, deterministically and resumably."""

from __future__ import annotations

import shutil

import pytest

from data.config import SourceSpec
from data.loader import build_source
from data.mix import deal_streams
from tests.data.helpers import loader, same, take, wds_config


@pytest.fixture(scope="module")
def two_sources(synthetic_dir, tmp_path_factory):
    """Shards 0-5 as source A, 6-7 as source B."""
    root = tmp_path_factory.mktemp("mix")
    for name, shards in (("a", range(6)), ("b", range(6, 8))):
        (root / name).mkdir()
        for i in shards:
            shutil.copy(synthetic_dir / "train" / f"{i:06d}.tar", root / name)
    return root


def _mix_config(root, **overrides):
    sources = [SourceSpec(str(root / "a"), 3.0), SourceSpec(str(root / "b"), 1.0)]
    return wds_config("", sources=sources, streams=4, **overrides)


def test_streams_are_dealt_by_weight():
    assert deal_streams([3, 1], 4) == [3, 1]
    assert deal_streams([3, 1], 8) == [6, 2]
    assert deal_streams([1, 1, 1], 8) == [3, 3, 2]
    assert deal_streams([100, 1], 4) == [3, 1]  # every source keeps at least one stream
    with pytest.raises(ValueError, match=r"data\.streams"):
        deal_streams([1, 1, 1], 2)


def test_every_batch_holds_each_source_by_its_weight(two_sources, caplog):
    source = build_source(_mix_config(two_sources), seed=0)
    with caplog.at_level("INFO", logger="data.mix"):
        source.check_streams(4)
    assert "75.0% of every batch" in caplog.text and "25.0% of every batch" in caplog.text
    for epoch in (0, 1):
        origin = [
            next(source.stream_samples(epoch, s, 4, None))[0].shard.split("/")[-2] for s in range(4)
        ]
        assert origin == ["a", "a", "a", "b"]


def test_a_mix_resumes_exactly_and_on_another_world_size(two_sources):
    cfg = _mix_config(two_sources)
    expected = take(loader(cfg, batch=8), 10)
    first = loader(cfg, batch=8)
    take(first, 6)  # source B's one stream (60 samples, 2 per step) is deep into its epoch
    resumed = loader(cfg, batch=8)
    resumed.load_state_dict(first.state_dict())
    assert same(take(resumed, 4), expected[6:])
    halves = [loader(cfg, rank=r, world_size=2, batch=4) for r in range(2)]
    for half in halves:
        half.load_state_dict([first.state_dict()])
    rows = sorted(b.numpy().tobytes() for h in halves for b in next(h)["input_ids"])
    assert rows == sorted(b.numpy().tobytes() for b in expected[6]["input_ids"])


def test_sources_and_train_shards_are_exclusive(two_sources):
    with pytest.raises(ValueError, match=r"either data\.train_shards or data\.sources"):
        wds_config(two_sources / "a", sources=[SourceSpec(str(two_sources / "b"))])
    with pytest.raises(ValueError, match=r"^sources\[1\]\.weight"):
        wds_config(
            "", sources=[SourceSpec(str(two_sources / "a")), SourceSpec(str(two_sources / "b"), 0)]
        )
