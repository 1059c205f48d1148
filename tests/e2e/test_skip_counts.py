"""`skipped_samples` in metrics.jsonl is the whole job's count, not rank 0's."""

from __future__ import annotations

import tarfile

from data.shards import write_shard
from tests.support.runs import run_training
from trainer.metrics import read_metrics


def test_skipped_samples_are_summed_over_ranks(tmp_path, synthetic_dir):
    """The first sample of every shard is broken and the shuffle buffer is off, so each of the
    8 streams (4 on each of the 2 ranks) skips exactly one sample at its first step."""
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    for shard in sorted((synthetic_dir / "train").glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = [(m.name, tar.extractfile(m).read()) for m in tar]
        first = members[0][0].split(".")[0]
        write_shard(data / "train" / shard.name,
                    [(n, b"not a jpeg" if n == f"{first}.jpg" else d) for n, d in members])  # fmt: skip
    proc = run_training(tmp_path / "run", data, ["train.steps=2", "checkpoint.every=0",
                                                 "data.shuffle_buffer=0", "data.streams=8"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["skipped_samples"] for r in read_metrics(tmp_path / "run")] == [8, 8]
