"""Step time with gradient caching (K chunks) vs the plain step, measured in one run.

    python -m bench.grad_cache_bench --data DIR --chunks 4 --batch 128 --steps 20

Launches the same 2-rank training run (tiny model, ZeRO-2, fp32) with train.grad_cache_chunks=1
and =K, one after the other, and compares the median step time over the steps after warm-up.
Goal: K chunks ≤ 1.4× the plain step (the re-encode costs one extra forward per chunk).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from tests.support import run_training
from trainer.metrics import read_metrics

GOAL = 1.4


def median_step_seconds(run_dir: Path, batch: int, warmup: int) -> float:
    records = read_metrics(run_dir)[warmup:]
    return statistics.median(batch / r["samples_per_s"] for r in records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="dir made by make-synthetic")
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--batch", type=int, default=128, help="global batch (2 ranks)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()

    common = [f"train.steps={args.steps}", f"train.global_batch_size={args.batch}",
              "checkpoint.every=0", "checkpoint.at_end=false", "data.workers=1"]  # fmt: skip
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        for chunks in (1, args.chunks):
            run_dir = Path(tmp) / f"k{chunks}"
            result = run_training(
                run_dir, args.data, [*common, f"train.grad_cache_chunks={chunks}"]
            )
            if result.returncode != 0:
                raise SystemExit(result.stderr[-2000:])
            seconds[chunks] = median_step_seconds(run_dir, args.batch, args.warmup)
    ratio = seconds[args.chunks] / seconds[1]
    print(f"B={args.batch} N=2 b={args.batch // 2} tiny CLIP, ZeRO-2, fp32; median s/step")
    print(f"{'variant':<22}{'s/step':>10}{'vs plain':>10}")
    print(f"{'plain (K=1)':<22}{seconds[1]:>10.3f}{1.0:>10.2f}")
    print(f"{f'grad cache (K={args.chunks})':<22}{seconds[args.chunks]:>10.3f}{ratio:>10.2f}")
    print(
        f"grad-cache time ratio: {ratio:.2f}x (goal <= {GOAL}x: {'met' if ratio <= GOAL else 'NOT met'})"
    )


if __name__ == "__main__":
    main()
