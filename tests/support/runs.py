"""Launch real training runs from tests: `torchrun` with N CPU processes on the gloo backend."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from trainer.dist import free_port
from trainer.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
DEBUG_CONFIG = REPO / "trainer" / "configs" / "debug.yaml"


def train_command(run_dir: Path, data_dir: Path, overrides: list[str], nproc: int = 2) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}", "-m", "trainer.train", "--config", str(DEBUG_CONFIG),
        f"run.dir={run_dir}", f"data.train_shards={data_dir / 'train'}", *overrides,
    ]  # fmt: skip


def test_env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def run_training(run_dir: Path, data_dir: Path, overrides: list[str], nproc: int = 2):
    return subprocess.run(
        train_command(run_dir, data_dir, overrides, nproc),
        cwd=REPO, env=test_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def run_until_signal(run_dir: Path, data_dir: Path, overrides: list[str], after_steps: int):
    """Start a run, send SIGUSR1 to every rank once `after_steps` steps are logged."""
    proc = subprocess.Popen(
        train_command(run_dir, data_dir, overrides), cwd=REPO, env=test_env(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 600
    while len(read_metrics(run_dir)) < after_steps and proc.poll() is None:
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError("training did not reach the signal point")
        time.sleep(0.05)
    # The ranks (torchrun's children), as `scancel --signal=USR1` reaches srun's tasks;
    # torchrun itself does not handle SIGUSR1.
    ranks = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
    for pid in ranks.stdout.split():
        os.kill(int(pid), signal.SIGUSR1)
    out, _ = proc.communicate(timeout=600)
    return proc.returncode, out


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir)]
