"""Real faults injected into real runs (issue 9): a SIGKILLed rank under torchrun and under the
deepspeed launcher, a job killed around a checkpoint write, NaN losses under both policies, a
run dir without space. Every job starts at once in the module fixture (start-up dominates on
two cores); each test then drives and checks its own job.

What a failure localises: dead rank -> trainer/train.py's lost-peer handling or the launcher;
kill during a write -> trainer/checkpoint.py's COMPLETE marker / resume=auto; NaN -> the
finiteness flag in trainer/step.py and the policy in trainer/train.py; no space ->
train.check_free_space.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from tests.support import runs
from tests.support.faults import Job, launcher_prefix
from tests.support.runs import DEBUG_CONFIG, REPO, losses
from trainer.checkpoint import COMPLETE, LATEST, TAG_RE, complete_tags
from trainer.dist import free_port
from trainer.metrics import read_metrics

pytestmark = pytest.mark.slow

DEAD_RANK_LIMIT_S = 120  # the promise: everything exits within this after a kill -9
RESUME_STEPS = 24
RESUME_COMMON = [
    f"train.steps={RESUME_STEPS}", "checkpoint.every=3", "model.attention_dropout=0.1",
    "data.workers=1",
]  # fmt: skip


def command(launcher: str, run_dir: Path, data: Path, overrides: list[str]) -> list[str]:
    return [
        *launcher_prefix(launcher, free_port()), "trainer.train", "--config", str(DEBUG_CONFIG),
        f"run.dir={run_dir}", f"data.train_shards={data / 'train'}", *overrides,
    ]  # fmt: skip


class Driver(threading.Thread):
    """Runs one job's fault injection beside the others; the test reads `result` or the error."""

    def __init__(self, action):
        super().__init__(daemon=True)
        self.action, self.result, self.error = action, None, None
        self.start()

    def run(self) -> None:
        try:
            self.result = self.action()
        except BaseException as err:  # re-raised in the test
            self.error = err

    def outcome(self):
        self.join(900)
        if self.error is not None:
            raise self.error
        return self.result


def kill_rank_1(job: Job, run_dir: Path) -> float:
    """Once the job has trained 3 steps, SIGKILL rank 1; seconds until everything is gone."""
    try:
        job.wait_steps(run_dir, 3)
        job.kill_rank(1)
        return job.wait_all_gone(DEAD_RANK_LIMIT_S)
    finally:
        job.kill_all()


def terminate_launcher(job: Job, run_dir: Path) -> int:
    """SIGTERM to the launcher only (what `docker stop`, Kubernetes or a scheduler sends):
    torchrun passes it to the ranks, which must checkpoint at the step boundary and exit."""
    try:
        job.wait_steps(run_dir, 3)
        job.proc.send_signal(signal.SIGTERM)
        return job.proc.wait(timeout=DEAD_RANK_LIMIT_S)
    finally:
        job.kill_all()


def signal_every_process(job: Job, run_dir: Path) -> int:
    """Once the job has trained 3 steps, SIGUSR1 to every rank and every loader worker at once,
    as Slurm's preemption warning arrives; returns how many processes got it."""
    try:
        job.wait_steps(run_dir, 3)
        signalled = job.signal_all(signal.SIGUSR1)
        job.proc.wait(timeout=DEAD_RANK_LIMIT_S)
        return len(signalled)
    finally:
        job.kill_all()


@pytest.fixture(scope="module")
def jobs(synthetic_dir, tmp_path_factory) -> dict:
    data, root = Path(synthetic_dir), tmp_path_factory.mktemp("faults")
    started = {}

    def start(name: str, launcher: str, overrides: list[str]) -> Job:
        cmd = command(launcher, root / name, data, overrides)
        started[name] = Job(cmd, root / f"{name}.log")
        return started[name]

    forever = ["train.steps=100000", "checkpoint.every=0", "checkpoint.at_end=false",
               "dist.timeout_s=60"]  # fmt: skip
    out = {"root": root, "data": data}
    disks = {
        "no-space": DiskRun(root, data, "64k", []),
        "disk-full": DiskRun(root, data, "8m", ["checkpoint.every=2", "checkpoint.keep_last=1"]),
    }
    out.update(disks)
    for launcher in ("torchrun", "deepspeed"):
        job = start(f"dead-{launcher}", launcher, forever)
        run_dir = root / f"dead-{launcher}"
        out[f"killer-{launcher}"] = Driver(lambda j=job, d=run_dir: kill_rank_1(j, d))
    nan = ["train.steps=4", "train.inject_nan_at_step=2", "checkpoint.every=1"]
    start("nan-skip", "torchrun", nan)
    start("nan-stop", "torchrun", [*nan, "train.nonfinite=stop"])
    start("reference", "torchrun", RESUME_COMMON)
    sigterm = start("sigterm", "torchrun", forever)
    out["killer-sigterm"] = Driver(lambda: terminate_launcher(sigterm, root / "sigterm"))
    usr1 = start("usr1-everywhere", "torchrun", [*forever, "data.workers=1"])
    out["killer-usr1"] = Driver(lambda: signal_every_process(usr1, root / "usr1-everywhere"))
    crashed = start("crashed", "torchrun", RESUME_COMMON)
    out["killer-crashed"] = Driver(
        lambda: crashed.kill_during_write(root / "crashed" / "checkpoints", "step_00000003")
    )
    out.update(started)
    try:
        yield out
    finally:
        for job in started.values():
            job.kill_all()
        for disk in disks.values():
            disk.close()


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_dead_rank_ends_the_job(jobs, launcher: str) -> None:
    """kill -9 of rank 1 mid-run: rank 0 and the launcher exit non-zero within 120 s, with
    a message naming the failure; nothing hangs. (tests/e2e/test_launchers.py covers ranks
    started without a launcher.)"""
    seconds = jobs[f"killer-{launcher}"].outcome()
    job: Job = jobs[f"dead-{launcher}"]
    out = job.output()
    print(f"\n{launcher}: rank 1 SIGKILLed -> launcher and ranks gone after {seconds:.1f} s")
    assert job.proc.returncode not in (0, None), out[-3000:]
    # Rank 0 says what happened in one line; the launcher names the dead rank's signal.
    assert "error: rank 0: lost contact with another rank" in out, out[-3000:]
    assert "SIGKILL" in out or "-9" in out or "signal 9" in out.lower(), out[-3000:]


def test_sigterm_checkpoints_then_exits(jobs) -> None:
    """Both ranks write one complete checkpoint at the next step boundary, say so and exit 75
    (preempted: resume with checkpoint.resume=auto; exactness is tests/e2e/test_resume.py's),
    well within torchrun's grace period before it SIGKILLs them."""
    jobs["killer-sigterm"].outcome()
    out = jobs["sigterm"].output()
    assert out.count("stop requested: checkpoint at step") == 2, out[-3000:]
    assert jobs["sigterm"].proc.returncode != 0  # torchrun re-raises the signal it got
    tags = complete_tags(jobs["root"] / "sigterm" / "checkpoints")
    assert len(tags) == 1 and int(tags[0].split("_")[1]) >= 3, tags


def test_sigusr1_to_every_process_checkpoints_then_exits(jobs) -> None:
    """SIGUSR1 reaches the loader workers too (Slurm signals every process of the job step).
    They must survive it until the training process stops them: a worker killed by it failed
    the rank before its checkpoint ("DataLoader worker ... is killed by signal")."""
    signalled = jobs["killer-usr1"].outcome()
    out = jobs["usr1-everywhere"].output()
    assert signalled >= 4, signalled  # 2 ranks and their loader workers
    assert "killed by signal" not in out, out[-3000:]
    assert out.count("stop requested: checkpoint at step") == 2, out[-3000:]
    tags = complete_tags(jobs["root"] / "usr1-everywhere" / "checkpoints")
    assert len(tags) == 1 and int(tags[0].split("_")[1]) >= 3, tags


def test_kill_during_checkpoint_write_resumes_from_previous(jobs) -> None:
    """The whole job is SIGKILLed while a checkpoint is being written (caught live when the
    poll sees a tag dir without COMPLETE; otherwise the newest checkpoint is made partial the
    way such a kill leaves it: no COMPLETE, a rank file missing, `latest` naming it).
    resume=auto must take the previous complete one, and the curve must equal the
    uninterrupted run's exactly."""
    run_dir = jobs["root"] / "crashed"
    ckpt = run_dir / "checkpoints"
    caught = jobs["killer-crashed"].outcome()
    live = bool(caught)
    if not caught:
        caught = complete_tags(ckpt)[-1]
        (ckpt / caught / COMPLETE).unlink()
        (ckpt / caught / "rank_00001.pt").unlink()
        (ckpt / LATEST).write_text(f"{caught}\n")
    previous = complete_tags(ckpt)[-1]
    assert previous < caught
    print(f"\npartial checkpoint {caught} (killed mid-write: {live}); resuming from {previous}")

    reference: Job = jobs["reference"]
    assert reference.proc.wait(timeout=600) == 0, reference.output()[-3000:]
    resumed = Job(
        command("torchrun", run_dir, jobs["data"], [*RESUME_COMMON, "checkpoint.resume=auto"]),
        jobs["root"] / "resumed.log",
    )
    assert resumed.proc.wait(timeout=600) == 0, resumed.output()[-3000:]
    assert f"resumed from {ckpt / previous} at step" in resumed.output()
    assert losses(run_dir) == losses(jobs["root"] / "reference")  # exact, every step
    assert complete_tags(ckpt)[-1] == f"step_{RESUME_STEPS:08d}"


def _checkpoint_weights(tag_dir: Path) -> dict[str, torch.Tensor]:
    # Our own test run's file: trusted, so the full unpickler is fine here.
    states = torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=False)
    return {k: v for k, v in states["module"].items() if torch.is_tensor(v)}


def test_nan_skip_policy_skips_and_counts(jobs) -> None:
    job: Job = jobs["nan-skip"]
    assert job.proc.wait(timeout=600) == 0, job.output()[-3000:]
    records = read_metrics(jobs["root"] / "nan-skip")
    assert [r["skipped_steps"] for r in records] == [0, 1, 1, 1]
    assert records[1]["loss"] != records[1]["loss"]  # NaN logged as such
    assert all(r["loss"] == r["loss"] for r in records[2:])
    ckpt = jobs["root"] / "nan-skip" / "checkpoints"
    for tag in complete_tags(ckpt):
        weights = _checkpoint_weights(ckpt / tag)
        assert weights and all(torch.isfinite(w).all() for w in weights.values()), tag


def test_nan_stop_policy_stops_without_checkpoint(jobs) -> None:
    job: Job = jobs["nan-stop"]
    code = job.proc.wait(timeout=600)
    out = job.output()
    assert code != 0, out[-3000:]
    assert "error: non-finite loss at step 2; stopping (train.nonfinite=stop)" in out
    assert 'File "/work/main/trainer' not in out  # torchrun's own summary aside, no traceback
    ckpt = jobs["root"] / "nan-stop" / "checkpoints"
    assert [p.name for p in ckpt.iterdir() if TAG_RE.match(p.name)] == ["step_00000001"]


def mount_tmpfs(path: Path, size: str) -> str:
    """Mount a tmpfs of `size` at `path`; "" on success, else why not (then the test skips)."""
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)  # fmt: skip
    return "" if done.returncode == 0 else f"cannot mount a {size} tmpfs: {done.stderr.strip()}"


class DiskRun:
    """A single-process run (no launcher: its stderr is the trainer's alone) with its run dir
    on a tmpfs of the given size."""

    def __init__(self, root: Path, data: Path, size: str, overrides: list[str]):
        self.mount, self.skip = root / f"tmpfs-{size}", mount_tmpfs(root / f"tmpfs-{size}", size)
        self.run_dir = self.mount / "run"
        if self.skip:
            return
        cmd = [sys.executable, "-m", "trainer.train", "--config", str(DEBUG_CONFIG),
               f"run.dir={self.run_dir}", f"data.train_shards={data / 'train'}", *overrides]  # fmt: skip
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=runs.test_env(), text=True,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip

    def wait(self) -> tuple[int, str, list[str]]:
        """(exit code, stderr, its error lines)."""
        if self.skip:
            pytest.skip(self.skip)
        _, stderr = self.proc.communicate(timeout=600)
        errors = [line for line in stderr.splitlines() if "error:" in line]
        return self.proc.returncode, stderr, errors

    def close(self) -> None:
        if not self.skip:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            subprocess.run(["umount", "-l", str(self.mount)], check=False)


def test_disk_full_mid_run_keeps_the_previous_checkpoint(jobs) -> None:
    """The disk fills while the second checkpoint is written (8 MiB: room for one checkpoint
    of the tiny model, ~5.2 MB, not two; keep_last=1 deletes the first only after the second
    is complete): one line, exit 1, the failed tag dir removed, the first checkpoint intact
    and still what resume=auto would take."""
    disk: DiskRun = jobs["disk-full"]
    code, stderr, errors = disk.wait()
    assert code == 1, stderr[-3000:]
    assert 'File "' not in stderr, stderr[-3000:]
    assert len(errors) == 1 and "step_00000004 could not be written" in errors[0], stderr
    assert "MiB free" in errors[0] and "previous complete checkpoint is intact" in errors[0]
    ckpt = disk.run_dir / "checkpoints"
    assert [p.name for p in ckpt.iterdir() if TAG_RE.match(p.name)] == ["step_00000002"]
    assert complete_tags(ckpt) == ["step_00000002"]


def test_out_of_space_refused_before_training(jobs) -> None:
    """A run dir on a 64 KiB filesystem: one line, exit 2 before step 1, nothing half-written
    (only the atomically written config.yaml and the empty checkpoints/ dir)."""
    disk: DiskRun = jobs["no-space"]
    code, stderr, errors = disk.wait()
    assert code == 2, stderr[-3000:]
    assert "Traceback" not in stderr
    assert len(errors) == 1 and "MiB free" in errors[0] and "run.dir" in errors[0], stderr
    assert sorted(p.name for p in disk.run_dir.iterdir()) == ["checkpoints", "config.yaml"]
    assert not any((disk.run_dir / "checkpoints").iterdir())
