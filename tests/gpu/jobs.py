"""The GPU tests' subprocesses: training runs through the project's entry point and probes.

Every job a selected test declares (`@uses("name")`) is started at the first `JobPool.get`,
at most `GPU_CHECK_PARALLEL` at a time (they share the GPU; most of a tiny run is process
start-up), and waited for with a timeout. Environment:

- GPU_CHECK_NPROC: ranks per training run (torchrun --nproc_per_node; default 1). Per-GPU
  batch stays 16, so the global batch is 16 × NPROC. bench/gpu_check.sh sets it to the
  node's GPU count.
- GPU_CHECK_PARALLEL: jobs at once (default: CPU cores // NPROC, between 1 and 8).
- GPU_CHECK_JOB_TIMEOUT: seconds per job (default 240).

Jobs stay in pytest's process group, so a `timeout` around pytest reaches them too; a job past
its own timeout gets SIGTERM (torchrun stops its ranks), then SIGKILL.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.support import runs

PER_GPU_BATCH = 16
TRAIN_STEPS = 20
GRAD_CACHE_STEPS = 4


def nproc() -> int:
    return max(1, int(os.environ.get("GPU_CHECK_NPROC", "1")))


def parallel() -> int:
    default = min(8, max(1, (os.cpu_count() or 2) // nproc()))
    return max(1, int(os.environ.get("GPU_CHECK_PARALLEL", default)))


def job_timeout() -> float:
    return float(os.environ.get("GPU_CHECK_JOB_TIMEOUT", "240"))


def uses(*names: str):
    """Declare the jobs a test reads, so that all of them start together."""

    def mark(fn):
        fn.gpu_jobs = (*getattr(fn, "gpu_jobs", ()), *names)
        return fn

    return mark


@dataclass
class Job:
    name: str
    command: list[str]
    log: Path
    run_dir: Path | None = None
    out: Path | None = None
    proc: subprocess.Popen | None = None
    started: float = 0.0
    seconds: float = 0.0
    returncode: int | None = None
    timed_out: bool = False

    def output(self, tail: int = 6000) -> str:
        if not self.log.is_file():
            return ""
        return self.log.read_text(errors="replace")[-tail:]

    def check(self) -> Job:
        """Assert the job exited 0; the message holds the tail of its output."""
        why = f"timed out after {self.seconds:.0f} s" if self.timed_out else (
            f"exited {self.returncode} after {self.seconds:.0f} s"
        )  # fmt: skip
        assert self.returncode == 0, f"{self.name} {why}: {' '.join(self.command)}\n{self.output()}"
        return self


def env() -> dict[str, str]:
    return dict(runs.test_env(), TOKENIZERS_PARALLELISM="false", HF_DATASETS_OFFLINE="1")


def training_job(name: str, root: Path, data_dir: Path, overrides: list[str]) -> Job:
    """`python -m torch.distributed.run --nproc_per_node NPROC -m trainer.train --config
    trainer/configs/debug.yaml run.dir=... data.train_shards=... OVERRIDES`."""
    n = nproc()
    run_dir = root / name
    common = [f"train.global_batch_size={PER_GPU_BATCH * n}", "checkpoint.every=0"]
    command = runs.train_command(run_dir, data_dir, [*common, *overrides], nproc=n)
    return Job(name, command, root / f"{name}.log", run_dir=run_dir)


def eval_overrides(data_dir: Path) -> list[str]:
    return [
        "eval.every=10",
        f"eval.zeroshot_dir={data_dir / 'val'}",
        f"eval.retrieval_shards={data_dir / 'val_pairs'}",
        "eval.batch_size=16",
    ]


def grad_cache_overrides(chunks: int, *, steps: int = GRAD_CACHE_STEPS, lr: str = "0.5"):
    # tests/gpu/test_gpu_grad_cache.py says why eps=1 and dropout off.
    return [
        "deepspeed.config=ds_configs/zero2.json", "train.precision=bf16",
        f"train.steps={steps}", f"optim.lr={lr}", "optim.eps=1.0",
        "model.attention_dropout=0.0", f"train.grad_cache_chunks={chunks}",
    ]  # fmt: skip


def define_jobs(root: Path, data_dir: Path) -> dict[str, Job]:
    z2, z3 = "deepspeed.config=ds_configs/zero2.json", "deepspeed.config=ds_configs/zero3.json"
    steps = f"train.steps={TRAIN_STEPS}"
    jobs = [
        training_job("z2_bf16", root, data_dir,
                     [z2, "train.precision=bf16", steps, *eval_overrides(data_dir)]),
        training_job("z3_bf16_ckpt", root, data_dir,
                     [z3, "train.precision=bf16", steps, "model.gradient_checkpointing=true"]),
        training_job("z2_fp16", root, data_dir, [z2, "train.precision=fp16", steps]),
        training_job("gc_k1", root, data_dir, grad_cache_overrides(1)),
        training_job("gc_k2", root, data_dir, grad_cache_overrides(2)),
        # The weights before any update, through the same engine (bf16 master copies of the
        # same init): one step at lr 1e-30 moves no fp32 weight.
        training_job("gc_w0", root, data_dir, grad_cache_overrides(1, steps=1, lr="1.0e-30")),
    ]  # fmt: skip
    for zero, batch, ckpt in PLAN_CASES:
        name = plan_job_name(zero, batch, ckpt)
        out = root / f"{name}.json"
        command = [sys.executable, "-m", "tests.gpu.plan_probe", "--zero", str(zero),
                   "--batch", str(batch), "--out", str(out)]  # fmt: skip
        if ckpt:
            command.append("--checkpointing")
        jobs.append(Job(name, command, root / f"{name}.log", out=out))
    return {job.name: job for job in jobs}


# (ZeRO stage, per-GPU batch, gradient checkpointing) for the planner-vs-measured probe.
PLAN_CASES = ((2, 256, False), (2, 512, True))


def plan_job_name(zero: int, batch: int, ckpt: bool) -> str:
    return f"plan_z{zero}_b{batch}" + ("_ckpt" if ckpt else "")


class JobPool:
    def __init__(self, jobs: dict[str, Job], wanted: set[str]):
        self.jobs, self.wanted, self.done = jobs, set(wanted), False

    def get(self, name: str) -> Job:
        if name not in self.jobs:
            raise KeyError(f"no GPU job {name!r}; known: {', '.join(self.jobs)}")
        if self.jobs[name].returncode is None and not self.jobs[name].timed_out:
            self._run(sorted(self.wanted | {name}))
        return self.jobs[name]

    def _run(self, names: list[str]) -> None:
        pending = [self.jobs[n] for n in names if self.jobs[n].proc is None]
        running: list[Job] = []
        limit, timeout = parallel(), job_timeout()
        while pending or running:
            while pending and len(running) < limit:
                job = pending.pop(0)
                job.log.parent.mkdir(parents=True, exist_ok=True)
                with job.log.open("w") as log:
                    job.proc = subprocess.Popen(
                        job.command, cwd=runs.REPO, env=env(), stdout=log,
                        stderr=subprocess.STDOUT, text=True,
                    )  # fmt: skip
                job.started = time.monotonic()
                running.append(job)
            time.sleep(0.2)
            for job in list(running):
                job.seconds = time.monotonic() - job.started
                if job.proc.poll() is not None:
                    job.returncode = job.proc.returncode
                    running.remove(job)
                elif job.seconds > timeout:
                    job.timed_out = True
                    self._stop(job)
                    job.returncode = job.proc.returncode
                    running.remove(job)

    @staticmethod
    def _stop(job: Job) -> None:
        job.proc.terminate()
        try:
            job.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            job.proc.kill()
            job.proc.wait()

    def stop_all(self) -> None:
        for job in self.jobs.values():
            if job.proc is not None and job.proc.poll() is None:
                self._stop(job)
