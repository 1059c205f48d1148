"""slurm/train.sbatch with the real trainer on the local two-node Slurm: preempted mid-run.

The batch shell gets USR1 (what `--signal=B:USR1@300` sends before the time limit); every rank
finishes its step, checkpoints and exits 75; the script requeues the job; the requeued job
resumes from the checkpoint (checkpoint.resume=auto) and finishes. Its loss curve must equal
the uninterrupted deepspeed-launcher run's step for step. (The uninterrupted sbatch run is
tests/e2e/test_launchers.py::test_srun.) A mismatch after the resume step points at what the
checkpoint or the data loader's resume state leaves out.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest

from tests.slurm import launch
from tests.slurm.cluster import Cluster

pytestmark = pytest.mark.slow


def test_preempted_training_resumes_exactly(
    slurm_cluster: Cluster, synthetic_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    data = Path(synthetic_dir)
    work = tmp_path_factory.mktemp("preempt")
    (work / "logs").mkdir()
    run_dir = work / "run"
    job_id = slurm_cluster.sbatch(
        launch.REPO / "slurm" / "train.sbatch",
        [str(launch.CONFIG), *launch.overrides(data, run_dir)],
        options=["--nodes=2", "--ntasks-per-node=1", "--job-name=preempt", f"--chdir={work}"],
        env={"DISCO_REPO": str(launch.REPO), "DISCO_PYTHON": sys.executable} | launch.RUN_ENV,
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
    done = slurm_cluster.wait_end(job_id, 240)
    print(
        f"\nUSR1 -> requeued {requeued - signalled:.1f} s, "
        f"requeued -> running {restarted - requeued:.1f} s, "
        f"running -> finished {time.monotonic() - restarted:.1f} s"
    )

    text = log.read_text()
    assert (done["JobState"], done["ExitCode"]) == ("COMPLETED", "0:0"), launch.tail(log)
    assert "got SIGUSR1" in text and "requeueing job" in text and "start 2 on" in text, text
    stopped_at = max(int(s) for s in re.findall(r"checkpoint at step (\d+) written", text))
    assert 4 <= stopped_at < launch.STEPS, text
    reference = launch.deepspeed_reference(data, tmp_path_factory.mktemp("reference"))
    assert launch.check_trained(run_dir) == reference
