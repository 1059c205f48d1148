"""Every supported launcher starts a 2-process run of the real trainer that trains.

deepspeed --num_gpus 2, torchrun --nproc_per_node 2, accelerate launch (the shipped
trainer/configs/accelerate.yaml) and srun (slurm/train.sbatch, 2 nodes x 1 task, on the local
Slurm). Each run is the demo config for a few dozen steps; every curve must equal the deepspeed
run's exactly: the launchers differ only in how they hand out rank, world size and master
address, so any difference localises to trainer/dist.py or the launcher's environment.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.slurm import launch
from tests.slurm.cluster import Cluster, shared_cluster

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("launchers")


@pytest.fixture(scope="module")
def reference(synthetic_dir: Path, work: Path) -> dict[int, float]:
    return launch.deepspeed_reference(Path(synthetic_dir), work)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with shared_cluster() as running:
        yield running


def test_deepspeed(reference: dict[int, float]) -> None:
    assert len(reference) == launch.STEPS
    assert reference[launch.STEPS] < reference[1], "the loss did not go down"


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_local_launcher(
    launcher: str, synthetic_dir: Path, work: Path, reference: dict[int, float]
) -> None:
    run_dir = launch.run_local(launcher, Path(synthetic_dir), work)
    assert launch.check_trained(run_dir) == reference


def test_srun(
    cluster: Cluster, synthetic_dir: Path, work: Path, reference: dict[int, float]
) -> None:
    """2 nodes x 1 task under slurm/train.sbatch: completes, same curve as deepspeed."""
    (work / "logs").mkdir(exist_ok=True)
    run_dir = work / "run-srun"
    job_id = cluster.sbatch(
        launch.REPO / "slurm" / "train.sbatch",
        [str(launch.CONFIG), *launch.overrides(Path(synthetic_dir), run_dir)],
        options=["--nodes=2", "--ntasks-per-node=1", "--job-name=srun", f"--chdir={work}"],
        env={"DISCO_REPO": str(launch.REPO), "DISCO_PYTHON": sys.executable} | launch.RUN_ENV,
    )
    done = cluster.wait_end(job_id, 240)
    log = work / "logs" / f"srun-{job_id}.out"
    assert (done["JobState"], done["ExitCode"]) == ("COMPLETED", "0:0"), launch.tail(log)
    assert "training finished" in log.read_text()
    assert launch.check_trained(run_dir) == reference
