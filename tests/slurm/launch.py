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
import socket
import subprocess
import sys
from pathlib import Path

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


def run_local(launcher: str, data_dir: Path, work: Path, timeout_s: float = 240) -> Path:
    """Train under `launcher` on this machine; return the run dir. Fails with the log's tail."""
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
        done = subprocess.run(
            command,
            cwd=REPO,
            env=os.environ | RUN_ENV,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=timeout_s,
        )
    assert done.returncode == 0, f"{launcher} exited {done.returncode}:\n{tail(log)}"
    return run_dir


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
    """The loss curve of the deepspeed-launcher run, computed once per dataset per session."""
    if data_dir not in _reference:
        _reference[data_dir] = check_trained(run_local("deepspeed", data_dir, work))
    return _reference[data_dir]
