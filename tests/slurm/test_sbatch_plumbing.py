"""slurm/train.sbatch on a real local Slurm, with a stand-in trainer (tests/slurm/standin_train.py).

The stand-in keeps the trainer's exit-code contract and takes a second to start, so these tests
localise a failure to the batch script and Slurm (signal forwarding, requeue, resume in the same
run dir, failure propagation) rather than to the model. test_train_sbatch.py runs the real one.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest

from tests.slurm.cluster import REPO, Cluster

pytestmark = pytest.mark.slow
TRAIN_SBATCH = REPO / "slurm" / "train.sbatch"


def submit_standin(
    cluster: Cluster, work: Path, name: str, overrides: list[str], nodes: int = 2
) -> tuple[int, Path]:
    """Submit train.sbatch running the stand-in on `nodes` nodes; return (job id, run dir)."""
    (work / "logs").mkdir(parents=True, exist_ok=True)  # the script's default --output dir
    run_dir = work / name
    job_id = cluster.sbatch(
        TRAIN_SBATCH,
        ["unused.yaml", *overrides],
        options=[
            f"--nodes={nodes}",
            "--ntasks-per-node=1",
            f"--job-name={name}",
            f"--chdir={work}",
        ],
        env={
            "DISCO_REPO": str(REPO),
            "DISCO_PYTHON": sys.executable,
            "DISCO_TRAIN_MODULE": "tests.slurm.standin_train",
            "DISCO_RUN_DIR": str(run_dir),
        },
    )
    return job_id, run_dir


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss from metrics.jsonl; a step logged again after a resume keeps its last value."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {rec["step"]: rec["loss"] for rec in map(json.loads, lines)}


def wait_steps(run_dir: Path, steps: int, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= steps:
            return
        time.sleep(0.1)
    raise AssertionError(f"{run_dir} did not reach step {steps} in {timeout_s} s")


def log_of(work: Path, name: str, job_id: int) -> str:
    return (work / "logs" / f"{name}-{job_id}.out").read_text()


def test_ranks_terminated_requeue_and_resume(slurm_cluster: Cluster, tmp_path: Path) -> None:
    """TERM to the ranks, not to the batch shell (what preemption with a grace time sends):
    all ranks checkpoint and exit 75, the script requeues the job, the next start resumes, and
    the loss curve equals the uninterrupted run's step for step. (USR1 to the batch shell, the
    --signal path, is tested with the real trainer in test_train_sbatch.py.)"""
    overrides = ["train.steps=30", "standin.step_s=0.15"]
    ref_id, ref_dir = submit_standin(slurm_cluster, tmp_path, "reference", overrides)
    job_id, run_dir = submit_standin(slurm_cluster, tmp_path, "preempted", overrides)

    wait_steps(run_dir, 5)
    signalled = time.monotonic()
    slurm_cluster.run("scancel", "--signal=TERM", str(job_id))  # the steps, not the batch shell
    slurm_cluster.wait_for(job_id, lambda f: f["Restarts"] == "1", 60)
    requeued = time.monotonic()
    slurm_cluster.wait_for(job_id, lambda f: f["JobState"] == "RUNNING", 60)
    restarted = time.monotonic()
    print(
        f"TERM -> requeued {requeued - signalled:.1f} s, requeued -> running {restarted - requeued:.1f} s"
    )

    done = slurm_cluster.wait_end(job_id, 120)
    ref = slurm_cluster.wait_end(ref_id, 60)
    assert (ref["JobState"], ref["ExitCode"]) == ("COMPLETED", "0:0"), log_of(
        tmp_path, "reference", ref_id
    )
    log = log_of(tmp_path, "preempted", job_id)
    assert (done["JobState"], done["ExitCode"]) == ("COMPLETED", "0:0"), log
    assert "after a signal to the ranks" in log and "requeueing job" in log, log
    resumed_at = [int(s) for s in re.findall(r"rank 0/2 \(slurm\) from step (\d+)", log)]
    assert resumed_at[0] == 0 and resumed_at[1] >= 5, log
    assert losses(run_dir) == losses(ref_dir)
    assert max(losses(run_dir)) == 30


def test_dead_rank_fails_job_quickly(slurm_cluster: Cluster, tmp_path: Path) -> None:
    """A rank that dies mid-run fails the job with its exit code and no requeue, long before
    the process-group timeout (dist.timeout_s) would have ended the others."""
    start = time.monotonic()
    job_id, _ = submit_standin(
        slurm_cluster,
        tmp_path,
        "dies",
        ["train.steps=1000", "standin.die_rank=1", "standin.die_step=3", "dist.timeout_s=120"],
    )
    done = slurm_cluster.wait_end(job_id, 60)
    log = log_of(tmp_path, "dies", job_id)
    assert done["JobState"] == "FAILED" and done["Restarts"] == "0", log
    assert "training failed with exit code" in log, log
    assert time.monotonic() - start < 60
