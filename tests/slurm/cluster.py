"""A real local Slurm for tests, started by slurm/local_cluster.sh and shared by its users.

Fixtures call `get_cluster()`. Every test session gets its own state dir and ports, so a cluster a developer left running is not touched. When
Slurm cannot be had here (no root, no apt-get, the install or the daemons fail) the tests skip
with the reason.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "slurm" / "local_cluster.sh"
NODES = 2
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


@dataclass(frozen=True)
class Cluster:
    state_dir: Path
    env: dict[str, str]
    """os.environ plus SLURM_CONF: pass it to every Slurm client command."""

    def run(self, *args: str) -> str:
        done = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout

    def sbatch(
        self, script: Path, script_args: Sequence[str], *, options: Sequence[str], env: dict
    ) -> int:
        """Submit and return the job id. `env` is added to the job's environment."""
        exports = ",".join(["ALL", *(f"{k}={v}" for k, v in env.items())])
        out = self.run(
            "sbatch", "--parsable", f"--export={exports}", *options, str(script), *script_args
        )
        return int(out.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """Fields of `scontrol show job` (kept by Slurm for MinJobAge=300 s after the end)."""
        line = self.run("scontrol", "show", "job", "-o", str(job_id))
        return dict(re.findall(r"(\w+)=(\S*)", line))

    def wait_for(self, job_id: int, done, timeout_s: float, poll_s: float = 0.3) -> dict:
        """Poll until done(job fields) holds; fail the test with the job's fields on timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            fields = self.job(job_id)
            if done(fields):
                return fields
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} not done after {timeout_s} s: {fields}")
            time.sleep(poll_s)

    def wait_end(self, job_id: int, timeout_s: float) -> dict:
        return self.wait_for(job_id, lambda f: f["JobState"] in TERMINAL_STATES, timeout_s)


def _free_port_block(count: int, start: int = 17817) -> int:
    """First port p >= start with p..p+count-1 all free on every interface."""
    for base in range(start, start + 2000, 10):
        try:
            for port in range(base, base + count):
                with socket.socket() as sock:
                    sock.bind(("0.0.0.0", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free block of ports for the local Slurm")


def _script(command: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), command], env=env, capture_output=True, text=True, timeout=300
    )


def _start(state_dir: Path) -> Cluster:
    if os.geteuid() != 0:
        pytest.skip("the local Slurm needs root (its daemons run as root and munged as munge)")
    env = dict(os.environ)
    env |= {
        "DISCO_SLURM_DIR": str(state_dir),
        "DISCO_SLURM_NODES": str(NODES),
        "DISCO_SLURM_PORT": str(_free_port_block(NODES + 1)),
        # Room for every job the tests keep running at once (up to 3 tasks per node).
        "DISCO_SLURM_CPUS": "4",
    }
    if not shutil.which("slurmctld"):
        installed = _script("install", env)  # apt-get install slurm-wlm munge (~10-30 s)
        if installed.returncode != 0:
            pytest.skip(f"Slurm cannot be installed here: {installed.stderr.strip()[-500:]}")
    started = _script("start", env)
    if started.returncode != 0:
        _script("stop", env)  # whatever half of it did start
        logs = "; ".join(p.name for p in (state_dir / "log").glob("*"))
        pytest.skip(f"the local Slurm did not start ({logs}): {started.stderr.strip()[-500:]}")
    return Cluster(state_dir=state_dir, env=env | {"SLURM_CONF": str(state_dir / "slurm.conf")})


# tests/slurm (a session fixture in its conftest) and tests/e2e/test_launchers.py share one
# cluster, started on first use and stopped when the test process exits: jobs submitted by one
# module may still run while the other one's tests go on.
_shared: dict[str, object] = {}


def get_cluster() -> Cluster:
    """The running local cluster; skips the calling test when Slurm cannot be had here."""
    if "skip" in _shared:
        pytest.skip(str(_shared["skip"]))
    if "cluster" not in _shared:
        # Not under pytest's tmp dir: that is private to root, and munged runs as munge. A short
        # path, too: munged's unix socket lives in it (108-byte limit).
        state_dir = Path(tempfile.mkdtemp(prefix="disco-slurm-"))
        state_dir.chmod(0o755)
        try:
            cluster = _start(state_dir)
        except pytest.skip.Exception as why:
            _shared["skip"] = str(why)
            shutil.rmtree(state_dir, ignore_errors=True)
            raise
        _shared["cluster"] = cluster
        atexit.register(_stop, cluster)
    cluster = _shared["cluster"]
    assert isinstance(cluster, Cluster)
    return cluster


def _stop(cluster: Cluster) -> None:
    _script("stop", cluster.env)
    shutil.rmtree(cluster.state_dir, ignore_errors=True)
