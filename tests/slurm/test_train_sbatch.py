"""slurm/*.sbatch with the real trainer on the local two-node Slurm.

Training is preempted mid-run: the batch shell gets USR1 (what `--signal=B:USR1@300` sends
before the time limit); every rank finishes its step, checkpoints and exits 75; the script
requeues the job; the requeued job resumes from the checkpoint (checkpoint.resume=auto) and
finishes. Its loss curve must equal the uninterrupted deepspeed-launcher run's step for step.
(The uninterrupted sbatch run is tests/e2e/test_launchers.py::test_srun.) A mismatch after the
resume step points at what the checkpoint or the data loader's resume state leaves out.
Then eval.sbatch and export.sbatch run on the finished run.
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.slurm import launch
from tests.slurm.cluster import Cluster

pytestmark = pytest.mark.slow
JOB_ENV = {"DISCO_REPO": str(launch.REPO), "DISCO_PYTHON": sys.executable} | launch.RUN_ENV


@dataclass(frozen=True)
class PreemptedRun:
    job: dict[str, str]
    log: str
    run_dir: Path
    work: Path


@pytest.fixture(scope="module")
def preempted(
    slurm_cluster: Cluster, synthetic_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> PreemptedRun:
    work = tmp_path_factory.mktemp("preempt")
    (work / "logs").mkdir()
    run_dir = work / "run"
    job_id = slurm_cluster.sbatch(
        launch.REPO / "slurm" / "train.sbatch",
        [str(launch.CONFIG), *launch.overrides(Path(synthetic_dir), run_dir)],
        options=["--nodes=2", "--ntasks-per-node=1", "--job-name=preempt", f"--chdir={work}"],
        env=JOB_ENV,
    )
    log = work / "logs" / f"preempt-{job_id}.out"

    # Signal early: the rest of the run must outlast the signal's way to the ranks.
    deadline = time.monotonic() + 180
    metrics = run_dir / "metrics.jsonl"
    while not metrics.exists() or len(metrics.read_text().splitlines()) < 4:
        assert time.monotonic() < deadline, "no 4 training steps in 180 s; log:\n" + (
            launch.tail(log) if log.exists() else "(none)"
        )
        time.sleep(0.1)
    signalled = time.monotonic()
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", str(job_id))
    slurm_cluster.wait_for(job_id, lambda f: f["Restarts"] == "1", 120)
    requeued = time.monotonic()
    slurm_cluster.wait_for(job_id, lambda f: f["JobState"] == "RUNNING", 120)
    restarted = time.monotonic()
    done = slurm_cluster.wait_end(job_id, 300)
    print(
        f"\nUSR1 -> requeued {requeued - signalled:.1f} s, "
        f"requeued -> running {restarted - requeued:.1f} s, "
        f"running -> finished {time.monotonic() - restarted:.1f} s"
    )
    return PreemptedRun(done, log.read_text(), run_dir, work)


def test_preempted_training_resumes_exactly(
    preempted: PreemptedRun, synthetic_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    job, log = preempted.job, preempted.log
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    assert "got SIGUSR1" in log and "requeueing job" in log and "start 2 on" in log, log
    stopped_at = max(int(s) for s in re.findall(r"checkpoint at step (\d+) written", log))
    assert 4 <= stopped_at < launch.STEPS, log
    reference = launch.deepspeed_reference(
        Path(synthetic_dir), tmp_path_factory.mktemp("reference")
    )
    assert launch.check_trained(preempted.run_dir) == reference


def test_eval_and_export_jobs(
    slurm_cluster: Cluster, preempted: PreemptedRun, synthetic_dir: Path
) -> None:
    """Both submitted at once on the finished run: an HF export, and zero-shot metrics."""
    work, data = preempted.work, Path(synthetic_dir)
    export_id = slurm_cluster.sbatch(
        launch.REPO / "slurm" / "export.sbatch",
        ["--checkpoint", str(preempted.run_dir), "--out", str(work / "export")],
        options=[f"--chdir={work}"],
        env=JOB_ENV,
    )
    eval_args = ["--model", str(preempted.run_dir), "--zeroshot", str(data / "val")]
    eval_id = slurm_cluster.sbatch(
        launch.REPO / "slurm" / "eval.sbatch",
        [*eval_args, "--json", str(work / "eval.json")],
        options=[f"--chdir={work}"],
        env=JOB_ENV,
    )
    for job_id, name in ((export_id, "export"), (eval_id, "eval")):
        done = slurm_cluster.wait_end(job_id, 240)
        log = work / "logs" / f"disco-clip-{name}-{job_id}.out"
        assert (done["JobState"], done["ExitCode"]) == ("COMPLETED", "0:0"), launch.tail(log)
    assert (work / "export" / "config.json").is_file()
    assert 0.0 <= json.loads((work / "eval.json").read_text())["zeroshot_top1"] <= 1.0
