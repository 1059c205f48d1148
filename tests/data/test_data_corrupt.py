"""Bad samples (undecodable jpg, missing caption, truncated tar) are skipped, counted, logged
with shard and key, and the stream goes on -- also exactly across a resume."""

from __future__ import annotations

import logging
import tarfile

from data.shards import write_shard
from tests.data.helpers import loader, same, take, wds_config


def _copy_members(src, keep=lambda name: True, replace=None):
    replace = replace or {}
    with tarfile.open(src) as tar:
        return [
            (m.name, replace.get(m.name, tar.extractfile(m).read())) for m in tar if keep(m.name)
        ]


def _corrupt_dataset(synthetic_dir, tmp_path):
    shards = sorted((synthetic_dir / "train").glob("*.tar"))
    out = tmp_path / "bad"
    out.mkdir()
    # shard 0: key 000000003's jpg is garbage; shard 1: key 000000031 has no caption
    write_shard(
        out / "000000.tar", _copy_members(shards[0], replace={"000000003.jpg": b"not a jpeg"})
    )
    write_shard(out / "000001.tar", _copy_members(shards[1], keep=lambda n: n != "000000031.txt"))
    # shard 2: cut in the middle of a member
    data = shards[2].read_bytes()
    (out / "000002.tar").write_bytes(data[: len(data) // 2 + 100])
    return out


def test_bad_samples_are_skipped_counted_and_logged(synthetic_dir, tmp_path, caplog):
    bad = _corrupt_dataset(synthetic_dir, tmp_path)
    cfg = wds_config(bad, shuffle_buffer=0, streams=1)
    it = loader(cfg, batch=10)
    with caplog.at_level(logging.WARNING, logger="data.stream"):
        batches = take(it, 8)  # 30 + 30 + ~15 raw samples: the whole first epoch and more
    assert all(b["pixel_values"].shape[0] == 10 for b in batches)
    assert it.skipped_samples == 3
    text = caplog.text
    assert "000000.tar key=000000003: undecodable image" in text
    assert "000001.tar key=000000031: no caption" in text
    assert "000002.tar key=" in text and "truncated tar" in text


def test_resume_after_bad_samples_is_exact_and_keeps_the_count(synthetic_dir, tmp_path):
    bad = _corrupt_dataset(synthetic_dir, tmp_path)
    cfg = wds_config(bad, shuffle_buffer=8)
    expected = take(loader(cfg, batch=10), 12)
    first = loader(cfg, batch=10)
    take(first, 7)
    resumed = loader(cfg, batch=10)
    resumed.load_state_dict(first.state_dict())
    assert resumed.skipped_samples == first.skipped_samples
    assert same(take(resumed, 5), expected[7:])
    assert resumed.skipped_samples >= 3  # the second epoch meets the same bad samples again


def test_failing_pipe_command_is_an_error_not_a_short_shard(synthetic_dir):
    """A `pipe:` shard whose command exits non-zero (a download that died after sending part of
    the tar) ends with an error sample; its exit status used to be ignored."""
    from data.shards import read_shard

    shard = sorted((synthetic_dir / "train").glob("*.tar"))[0]
    local = list(read_shard(str(shard)))
    piped = list(read_shard(f"pipe:cat {shard}", allow_pipe=True))
    assert [s.key for s in piped] == [s.key for s in local] and not any(s.error for s in piped)
    failed = list(read_shard(f"pipe:cat {shard}; exit 3", allow_pipe=True))
    assert failed[-1].error and "exit 3" in failed[-1].error
    before = [s.key for s in failed[:-1]]  # what was read before the status showed: a prefix
    assert before == [s.key for s in local[: len(before)]]
