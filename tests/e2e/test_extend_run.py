"""Extending a finished run: resumed with a larger train.steps, the schedule is the new run's
(warmup + cosine over 12 steps), at the checkpoint's position, not the saved 6-step schedule's
floor; and a step skipped for a non-finite loss advances the schedule like any other.

Real runs (debug config, 2 gloo ranks). A failure localises to trainer/checkpoint.py
restore_run_settings (the extension logs the old schedule, or its floor) or advance_schedule in
trainer/train.py's skip branch (every lr after the skipped step is one step late).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.support import runs
from trainer.engine import WarmupCosine
from trainer.metrics import read_metrics

LR, WARMUP = 1e-3, 2  # trainer/configs/debug.yaml
NAN = ["train.inject_nan_at_step=2", "checkpoint.every=0"]  # step 2 skipped (nonfinite=skip)


def lrs(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in read_metrics(run_dir)}


def schedule(total: int) -> dict[int, float]:
    """What step s logs: the lr of the schedule after s - 1 scheduler steps."""
    fn = WarmupCosine(WARMUP, total, 0.0)
    return {s: LR * fn(s - 1) for s in range(1, total + 1)}


def _start(run_dir: Path, data: Path, overrides: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        runs.train_command(run_dir, data, overrides), cwd=runs.REPO, env=runs.test_env(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def test_extension_follows_the_new_schedule_and_skips_count(tmp_path, synthetic_dir):
    data = Path(synthetic_dir)
    launch = {
        "full": _start(tmp_path / "full", data, [*NAN, "train.steps=12"]),
        "short": _start(tmp_path / "short", data, NAN),
    }
    for name, proc in launch.items():
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name}:\n{out[-3000:]}"

    full = lrs(tmp_path / "full")
    assert [r["skipped_steps"] for r in read_metrics(tmp_path / "full")][:3] == [0, 1, 1]
    # The skipped step 2 moved the schedule on: step 3 logs the lr after 2 scheduler steps.
    assert full == pytest.approx(schedule(12), rel=1e-12)
    assert lrs(tmp_path / "short") == pytest.approx(schedule(6), rel=1e-12)
    assert lrs(tmp_path / "short")[6] < 2e-4  # the 6-step run ends near its floor (0)

    extended = runs.run_training(
        tmp_path / "short", data, [*NAN, "train.steps=12", "checkpoint.resume=auto"]
    )
    assert extended.returncode == 0, extended.stderr[-3000:]
    assert "resume: schedule follows this run's config: train.steps 6 -> 12" in extended.stdout
    got = lrs(tmp_path / "short")
    assert sorted(got) == list(range(1, 13))
    # Steps 7-12 log exactly what the uninterrupted 12-step run logged, not the old floor.
    assert [got[s] for s in range(7, 13)] == [full[s] for s in range(7, 13)]
    assert min(got[s] for s in range(7, 12)) > 0
