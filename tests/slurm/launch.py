"""Start 2-process training runs of the real trainer under each launcher, for the e2e launcher
tests and the Slurm tests, which compare their loss curves with one deepspeed-launcher run.

Every run is the demo config for STEPS steps on the session's synthetic dataset, one metrics
line per step, with OMP_NUM_THREADS=1 everywhere: launchers set different thread counts by
default, and a different intra-op reduction order would change the last bits of the loss.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tests.slurm.cluster import Cluster

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CONFIG = REPO / "trainer" / "configs" / "demo.yaml"
STEPS = 24
RUN_ENV = {
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def overrides(data_dir: Path, run_dir: Path, steps: int = STEPS) -> list[str]:
    return [
        f"run.dir={run_dir}",
        f"data.train_shards={data_dir / 'train'}",
        f"data.tokenizer={data_dir / 'tokenizer'}",
        f"train.steps={steps}",
        "log.every=1",
        "checkpoint.every=0",  # only the checkpoint a stop request writes
        # No evaluation: the demo config points it at demo/data, which a fresh clone lacks.
        "eval.every=0",
        "eval.zeroshot_dir=",
        "eval.retrieval_shards=",
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launcher_command(launcher: str, port: int) -> list[str]:
    """The command line that starts 2 local processes of `python -m trainer.train`."""
    if launcher == "deepspeed":
        return [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port), "--module"]
    if launcher == "torchrun":
        return [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(port), "-m"]
    if launcher == "accelerate":
        accelerate_config = REPO / "trainer" / "configs" / "accelerate.yaml"
        return [
            str(BIN / "accelerate"), "launch", "--config_file", str(accelerate_config),
            "--num_processes", "2", "--main_process_port", str(port), "-m",
        ]  # fmt: skip
    raise ValueError(launcher)


@dataclass
class LocalRun:
    """A launcher started in the background; wait() for its run dir."""

    launcher: str
    run_dir: Path
    log: Path
    proc: subprocess.Popen

    def wait(self, timeout_s: float = 300) -> Path:
        """The run dir once the launcher exited 0; fails with the log's tail otherwise."""
        try:
            rc = self.proc.wait(timeout=timeout_s)
        finally:
            self.stop()
        assert rc == 0, f"{self.launcher} exited {rc}:\n{tail(self.log)}"
        return self.run_dir

    def stop(self) -> None:
        """Kill the launcher if it still runs (its process group: the launcher's ranks too)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def start_local(launcher: str, data_dir: Path, work: Path) -> LocalRun:
    """Start a 2-process run under `launcher` on this machine, in the background."""
    run_dir = work / f"run-{launcher}"
    log = work / f"{launcher}.log"
    command = [
        *launcher_command(launcher, free_port()),
        "trainer.train",
        "--config",
        str(CONFIG),
        *overrides(data_dir, run_dir),
    ]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            command,
            cwd=REPO,
            env=os.environ | RUN_ENV,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so stop() reaches the ranks
        )
    return LocalRun(launcher, run_dir, log, proc)


def tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss from metrics.jsonl (a step logged again after a resume: last one)."""
    losses = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("kind", "train") == "train" and "loss" in record:
            losses[record["step"]] = record["loss"]
    return losses


def check_trained(run_dir: Path, steps: int = STEPS) -> dict[int, float]:
    """Every step logged once with a finite loss; return the curve."""
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, steps + 1)), sorted(losses)
    assert all(math.isfinite(v) for v in losses.values()), losses
    return losses


_reference: dict[Path, dict[int, float]] = {}


def deepspeed_reference(data_dir: Path, work: Path) -> dict[int, float]:
    """The loss curve of the deepspeed-launcher run, computed once per dataset per session
    (or handed over by remember_reference)."""
    if data_dir not in _reference:
        remember_reference(data_dir, start_local("deepspeed", data_dir, work).wait())
    return _reference[data_dir]


def remember_reference(data_dir: Path, deepspeed_run_dir: Path) -> dict[int, float]:
    _reference[data_dir] = check_trained(deepspeed_run_dir)
    return _reference[data_dir]


class PreemptedJob:
    """slurm/train.sbatch (2 nodes x 1 task) preempted mid-run by USR1 to the batch shell, what
    `--signal=B:USR1@300` sends before the time limit. A background thread drives it, so that
    its two start-ups overlap with other runs; result() waits for the end."""

    def __init__(self, cluster: Cluster, data_dir: Path, work: Path) -> None:
        (work / "logs").mkdir(parents=True, exist_ok=True)
        self.cluster, self.work, self.run_dir = cluster, work, work / "run"
        self.job_id = cluster.sbatch(
            REPO / "slurm" / "train.sbatch",
            [str(CONFIG), *overrides(data_dir, self.run_dir)],
            options=["--nodes=2", "--ntasks-per-node=1", "--job-name=preempt", f"--chdir={work}"],
            env=sbatch_env(),
        )
        self.log = work / "logs" / f"preempt-{self.job_id}.out"
        self.timings: dict[str, float] = {}
        self.job: dict[str, str] = {}
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._drive, daemon=True)
        self.thread.start()

    def _drive(self) -> None:
        try:
            # Signal early: the rest of the run must outlast the signal's way to the ranks.
            metrics = self.run_dir / "metrics.jsonl"
            deadline = time.monotonic() + 300
            while not metrics.exists() or len(metrics.read_text().splitlines()) < 4:
                assert time.monotonic() < deadline, "no 4 training steps in 300 s:\n" + (
                    tail(self.log) if self.log.exists() else "(no log)"
                )
                time.sleep(0.1)
            signalled = time.monotonic()
            self.cluster.run("scancel", "--signal=USR1", "--batch", str(self.job_id))
            self.cluster.wait_for(self.job_id, lambda f: f["Restarts"] == "1", 120)
            self.timings["signal_to_requeued_s"] = time.monotonic() - signalled
            self.cluster.wait_for(self.job_id, lambda f: f["JobState"] == "RUNNING", 120)
            self.timings["requeued_to_running_s"] = (
                time.monotonic() - signalled - self.timings["signal_to_requeued_s"]
            )
            self.job = self.cluster.wait_end(self.job_id, 400)
        except BaseException as err:  # handed to the test by result()
            self.error = err

    def result(self, timeout_s: float = 900) -> PreemptedJob:
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), f"preempted job {self.job_id} still running"
        if self.error is not None:
            raise self.error
        return self


_preempted: dict[Path, PreemptedJob] = {}


def start_preempted(cluster: Cluster, data_dir: Path, work: Path) -> PreemptedJob:
    """The session's preempted job (started by whichever test module asks first)."""
    if data_dir not in _preempted:
        _preempted[data_dir] = PreemptedJob(cluster, data_dir, work)
    return _preempted[data_dir]


def sbatch_env() -> dict[str, str]:
    """What slurm/train.sbatch needs to find this checkout and interpreter."""
    return {"DISCO_REPO": str(REPO), "DISCO_PYTHON": sys.executable} | RUN_ENV
