"""A tiny stand-in for `python -m trainer.train` that keeps the trainer's cluster contract.

It tests the Slurm plumbing (srun, signal forwarding, requeue, resume) in a few seconds and
independently of the model: the distributed facts come from trainer/dist.py like the trainer's,
the "training" is a gloo all_reduce per step over a state that a wrong resume would change,
and the exit codes are the trainer's: 0 finished, 75 stopped by SIGUSR1/SIGTERM after a
checkpoint, anything else failed.

Overrides it reads: run.dir, train.steps, checkpoint.resume (auto|none), standin.step_s (sleep
per step, to leave time for a signal), standin.die_rank / standin.die_step (that rank exits 3
at that step, to test that the others do not hang), dist.timeout_s.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.dist import read_dist_info

EXIT_RESUME = 75


def parse(argv: list[str]) -> dict[str, str]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    values = {"train.steps": "20", "checkpoint.resume": "none", "standin.step_s": "0.05"}
    values |= {"standin.die_rank": "-1", "standin.die_step": "-1", "dist.timeout_s": "30"}
    for text in args.overrides:
        key, _, value = text.partition("=")
        values[key] = value
    return values


def main(argv: list[str]) -> int:
    cfg = parse(argv)
    info = read_dist_info()
    run_dir = Path(cfg["run.dir"])
    ckpt = run_dir / "checkpoints" / f"rank{info.rank}.json"
    stop = {"signal": 0}

    def request_stop(signum: int, _frame: object) -> None:
        stop["signal"] = signum  # acted on at the end of the current step, by every rank

    signal.signal(signal.SIGUSR1, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{info.master_addr}:{info.master_port}",
        rank=info.rank,
        world_size=info.world_size,
        timeout=timedelta(seconds=float(cfg["dist.timeout_s"])),
    )
    step, weight = 0, float(info.rank + 1)
    if cfg["checkpoint.resume"] == "auto" and ckpt.exists():
        state = json.loads(ckpt.read_text())
        step, weight = state["step"], state["weight"]
    print(f"rank {info.rank}/{info.world_size} ({info.launcher}) from step {step}", flush=True)
    if info.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    steps = int(cfg["train.steps"])
    while step < steps:
        if info.rank == int(cfg["standin.die_rank"]) and step == int(cfg["standin.die_step"]):
            print(f"rank {info.rank}: dying at step {step}", flush=True)
            os._exit(3)
        time.sleep(float(cfg["standin.step_s"]))
        weight = 0.9 * weight + 0.1 * (step % 7)
        total = torch.tensor([weight, float(stop["signal"] != 0)], dtype=torch.float64)
        dist.all_reduce(total)
        step += 1
        if info.rank == 0:
            with open(run_dir / "metrics.jsonl", "a") as out:
                out.write(json.dumps({"step": step, "loss": total[0].item() / 3}) + "\n")
        if total[1] > 0:  # some rank was signalled: all stop after this same step
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            ckpt.write_text(json.dumps({"step": step, "weight": weight}))
            dist.barrier()
            print(f"rank {info.rank}: checkpoint at step {step}, exiting 75", flush=True)
            dist.destroy_process_group()
            return EXIT_RESUME
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
