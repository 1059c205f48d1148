"""Inject real faults into real runs: start a launcher in its own session, wait for steps,
SIGKILL one rank (found by its RANK variable) or the whole job. Shared by tests/e2e/test_faults.py
and bench/soak.py."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from tests.support.runs import REPO, test_env
from trainer.metrics import read_metrics

BIN = Path(REPO) / ".venv" / "bin"


def launcher_prefix(launcher: str, port: int, nproc: int = 2) -> list[str]:
    if launcher == "deepspeed":
        return [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(port),
                "--module"]  # fmt: skip
    return [str(BIN / "torchrun"), f"--nproc_per_node={nproc}", f"--master_port={port}", "-m"]


class Job:
    """One launched run, in its own session so that the whole tree can be found and killed."""

    def __init__(self, command: list[str], log: Path, env: dict[str, str] | None = None):
        self.log = log
        self.known: set[int] = set()  # every pid seen in the job, so that kill_all finds orphans
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                command, cwd=REPO, env=env or test_env(), stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_steps(self, run_dir: Path, steps: int, timeout: float = 600) -> None:
        """Until metrics.jsonl holds `steps` train records (or the job ended)."""
        deadline = time.monotonic() + timeout
        while len(read_metrics(run_dir)) < steps:
            self.known |= set(self.tree())
            if self.proc.poll() is not None:
                raise RuntimeError(f"job ended before step {steps}:\n{self.output()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no step {steps} within {timeout} s")
            time.sleep(0.05)

    def tree(self) -> list[int]:
        """The launcher and its live descendants (torchrun starts each rank in a session of its
        own, so a process group or session does not reach them; parent links do)."""
        children: dict[int, list[int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                pid, rest = stat.read_text().split(" ", 1)
            except OSError:
                continue
            fields = rest.rsplit(")", 1)[1].split()  # after "(comm)": state, ppid, ...
            if fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(pid))
        found, todo = [], [self.proc.pid] if self.proc.poll() is None else []
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo += children.get(pid, [])
        return found

    def rank_pid(self, rank: int) -> int:
        """The trainer process whose environment says RANK=rank."""
        for pid in self.tree():
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"trainer.train" in cmd and f"RANK={rank}".encode() in env:
                return pid
        raise LookupError(f"no rank {rank} in {self.tree()}")

    def kill_rank(self, rank: int) -> None:
        os.kill(self.rank_pid(rank), signal.SIGKILL)

    def kill_during_write(self, ckpt_dir: Path, after: str, timeout: float = 600) -> str:
        """SIGKILL the whole job the moment a checkpoint tag newer than `after` exists without
        its COMPLETE marker; returns that tag, or "" if none was caught mid-write."""
        from trainer.checkpoint import COMPLETE, TAG_RE

        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            for tag in ckpt_dir.iterdir() if ckpt_dir.is_dir() else []:
                if TAG_RE.match(tag.name) and tag.name > after and not (tag / COMPLETE).exists():
                    self.kill_all()
                    return "" if (tag / COMPLETE).exists() else tag.name
            time.sleep(0.002)
        self.kill_all()
        return ""

    def signal_all(self, sig: int) -> list[int]:
        """Send `sig` to every process the launcher started (ranks and their loader workers),
        not to the launcher: what Slurm does with `scancel --signal` or a job's --signal
        warning. Returns the pids signalled."""
        pids = [pid for pid in self.tree() if pid != self.proc.pid]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        return pids

    def kill_all(self) -> None:
        """The launcher and every rank at once, as when their node dies."""
        self.known |= set(self.tree())
        for pid in self.known:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()

    def wait_all_gone(self, timeout: float) -> float:
        """Seconds until the launcher and every process it had started have exited;
        TimeoutError if they hang."""
        known = set(self.tree())
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            alive = [pid for pid in known if Path(f"/proc/{pid}").exists() and not _zombie(pid)]
            if self.proc.poll() is not None and not alive:
                return time.monotonic() - start
            time.sleep(0.1)
        raise TimeoutError(f"still running after {timeout} s: {self.tree()}")


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False
