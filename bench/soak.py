"""Soak: a run that is killed again and again, resumed with resume=auto each time, must end
with the loss curve of a run that was never interrupted — exactly.

    .venv/bin/python -m bench.soak [--faults 4] [--steps 60] [--every 5] [--seed 0] [--out DIR]

Each fault is drawn (seeded) from: SIGKILL rank 0, SIGKILL rank 1, SIGKILL the launcher and
every rank at once (node loss), or SIGKILL everything the moment a checkpoint is being
written. Faults strike at a random time after the resumed run has logged a new step. The
uninterrupted reference (2 ranks, torchrun, fp32, dropout on) runs beside the first attempt.
Prints faults survived, the seconds from each kill until the launcher and ranks were gone, and
whether the curves match.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from tests.support import DEBUG_CONFIG, Job, launcher_prefix, losses
from trainer.checkpoint import complete_tags
from trainer.dist import free_port
from trainer.metrics import read_metrics

KINDS = ("kill rank 0", "kill rank 1", "kill job", "kill mid-checkpoint")


def command(run_dir: Path, data: Path, steps: int, every: int) -> list[str]:
    return [
        *launcher_prefix("torchrun", free_port()), "trainer.train", "--config", str(DEBUG_CONFIG),
        f"run.dir={run_dir}", f"data.train_shards={data / 'train'}", f"train.steps={steps}",
        f"checkpoint.every={every}", "checkpoint.resume=auto", "model.attention_dropout=0.1",
        "data.workers=1", "dist.timeout_s=60",
    ]  # fmt: skip


def strike(job: Job, run_dir: Path, kind: str, rng: random.Random) -> tuple[float, str]:
    """Inject one fault into a running job: (seconds until all its processes were gone after
    a rank was killed, the checkpoint tag caught mid-write if any)."""
    done = len(read_metrics(run_dir))
    job.wait_steps(run_dir, done + 1)  # progress first, so every attempt moves forward
    if kind == "kill mid-checkpoint":
        newest = (complete_tags(run_dir / "checkpoints") or ["step_00000000"])[-1]
        caught = job.kill_during_write(run_dir / "checkpoints", newest)  # "": marker won
        if job.proc.returncode == 0:
            raise RuntimeError("the run ended before a checkpoint write could be caught")
        return 0.0, caught
    time.sleep(rng.uniform(0.0, 1.5))
    if job.proc.poll() is not None:
        raise RuntimeError("the run ended before the fault")
    if kind == "kill job":
        job.kill_all()
        return 0.0, ""
    job.kill_rank(int(kind[-1]))
    return job.wait_all_gone(120), ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faults", type=int, default=4)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=5, help="checkpoint every this many steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="work dir (default: a temp dir)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="soak-"))
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    started = time.monotonic()

    from data.synthetic import make_synthetic

    data = out / "data"
    if not (data / "train").is_dir():
        make_synthetic(data, train_samples=240, val_per_class=2, image_size=32, seed=0,
                       samples_per_shard=30)  # fmt: skip
    ref_dir, run_dir = out / "reference", out / "soaked"
    reference = Job(command(ref_dir, data, args.steps, args.every), out / "reference.log")

    faults, attempts = [], 0
    while True:
        attempts += 1
        job = Job(command(run_dir, data, args.steps, args.every), out / f"attempt{attempts}.log")
        if len(faults) == args.faults:
            code = job.proc.wait()
            break
        kind = rng.choice(KINDS)
        try:
            seconds, caught = strike(job, run_dir, kind, rng)
        except RuntimeError:  # the job finished before the fault could strike
            code = job.proc.wait()
            break
        finally:
            job.kill_all()  # leftovers of a kill, if any
        at = len(read_metrics(run_dir))
        faults.append({"kind": kind, "after_step": at, "all_gone_s": round(seconds, 1),
                       "caught_mid_write": caught})  # fmt: skip
        print(f"fault {len(faults)}: {kind} after step {at}"
              + (f"; all exited in {seconds:.1f} s" if seconds else "")
              + (f"; {caught} caught without COMPLETE" if caught else ""), flush=True)  # fmt: skip

    ref_code = reference.proc.wait()
    expected, got = losses(ref_dir), losses(run_dir)
    match = ref_code == 0 and code == 0 and got == expected and len(got) == args.steps
    diff = max((abs(a[1] - b[1]) for a, b in zip(got, expected, strict=False)), default=0.0)
    summary = {
        "faults_survived": len(faults) if code == 0 else 0, "faults": faults,
        "attempts": attempts, "steps": args.steps, "checkpoint_every": args.every,
        "curves_match_exactly": match, "max_abs_loss_diff": diff,
        "wall_s": round(time.monotonic() - started, 1), "out": str(out),
    }  # fmt: skip
    (out / "soak.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    print(f"survived {summary['faults_survived']} faults in {attempts} attempts; "
          f"curve {'matches' if match else 'DIFFERS from'} the uninterrupted run "
          f"({len(got)}/{args.steps} steps, max |diff| {diff:.3g})")  # fmt: skip
    return 0 if match else 1


if __name__ == "__main__":
    raise SystemExit(main())
