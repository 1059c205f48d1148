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
from pathlib import Path

import pytest

from tests.slurm import launch
from tests.slurm.cluster import Cluster

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def preempted(
    slurm_cluster: Cluster, synthetic_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> launch.PreemptedJob:
    """Finished; tests/e2e/test_launchers.py may have started it already, beside its runs."""
    work = tmp_path_factory.mktemp("preempt")
    job = launch.start_preempted(slurm_cluster, Path(synthetic_dir), work).result()
    print(f"\npreemption timings: {job.timings}")
    return job


def test_preempted_training_resumes_exactly(
    preempted: launch.PreemptedJob, synthetic_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    job, log = preempted.job, preempted.log.read_text()
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    assert "got SIGUSR1" in log and "requeueing job" in log and "start 2 on" in log, log
    stopped_at = max(int(s) for s in re.findall(r"checkpoint at step (\d+) written", log))
    assert 4 <= stopped_at < launch.STEPS, log
    reference = launch.deepspeed_reference(
        Path(synthetic_dir), tmp_path_factory.mktemp("reference")
    )
    assert launch.check_trained(preempted.run_dir) == reference


def test_eval_and_export_jobs(
    slurm_cluster: Cluster, preempted: launch.PreemptedJob, synthetic_dir: Path
) -> None:
    """Both submitted at once on the finished run: an HF export, and zero-shot metrics."""
    work, data = preempted.work, Path(synthetic_dir)
    export_id = slurm_cluster.sbatch(
        launch.REPO / "slurm" / "export.sbatch",
        ["--checkpoint", str(preempted.run_dir), "--out", str(work / "export")],
        options=[f"--chdir={work}"],
        env=launch.sbatch_env(),
    )
    eval_args = ["--model", str(preempted.run_dir), "--zeroshot", str(data / "val")]
    eval_id = slurm_cluster.sbatch(
        launch.REPO / "slurm" / "eval.sbatch",
        [*eval_args, "--json", str(work / "eval.json")],
        options=[f"--chdir={work}"],
        env=launch.sbatch_env(),
    )
    for job_id, name in ((export_id, "export"), (eval_id, "eval")):
        done = slurm_cluster.wait_end(job_id, 240)
        log = work / "logs" / f"disco-clip-{name}-{job_id}.out"
        assert (done["JobState"], done["ExitCode"]) == ("COMPLETED", "0:0"), launch.tail(log)
    assert (work / "export" / "config.json").is_file()
    assert 0.0 <= json.loads((work / "eval.json").read_text())["zeroshot_top1"] <= 1.0
