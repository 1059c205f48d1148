"""Loss memory and time per rank: DisCo vs the naive full-batch loss, side by side, one run.

    python -m bench.loss_bench --batch 4096 --world 2 --dim 512

Runs `--world` real gloo processes on this machine. Peak memory is the peak of live tensor
bytes during one forward+backward of the loss (features and their gradients included),
measured by replaying the allocator's events (bench/memory.py). The baseline is the naive
loss measured in the same run.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from bench.memory import peak_tensor_bytes
from trainer.localdist import run_ranks
from trainer.loss import disco_clip_loss, full_batch_clip_loss

LOSSES = {"naive": full_batch_clip_loss, "disco": disco_clip_loss}


def _measure(rank: int, world: int, batch: int, dim: int, repeats: int) -> dict:
    b = batch // world
    gen = torch.Generator().manual_seed(rank)
    results = {}
    for name, loss_fn in LOSSES.items():
        x = F.normalize(torch.randn(b, dim, generator=gen), dim=-1).requires_grad_()
        y = F.normalize(torch.randn(b, dim, generator=gen), dim=-1).requires_grad_()
        scale = torch.tensor(2.659, requires_grad=True)

        def step(x=x, y=y, scale=scale, loss_fn=loss_fn):
            loss_fn(x, y, scale).backward()

        peak = peak_tensor_bytes(step)
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        results[name] = {"peak": peak, "seconds": (time.perf_counter() - start) / repeats}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4096, help="global contrastive batch B")
    parser.add_argument("--world", type=int, default=2, help="number of processes N")
    parser.add_argument("--dim", type=int, default=512, help="embedding dimension d")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.batch % args.world:
        parser.error(f"--batch {args.batch} is not divisible by --world {args.world}")

    per_rank = run_ranks(_measure, args.world, args.batch, args.dim, args.repeats)
    b = args.batch // args.world
    print(f"B={args.batch} N={args.world} b={b} d={args.dim} fp32, per rank (rank 0 shown)")
    print(f"{'loss':<8}{'logits/rank':>14}{'peak MiB':>12}{'ms/step':>10}{'mem vs naive':>14}")
    naive = per_rank[0]["naive"]
    for name, logit_rows in (("naive", args.batch), ("disco", b)):
        r = per_rank[0][name]
        print(
            f"{name:<8}{f'{logit_rows}x{args.batch}':>14}{r['peak'] / 2**20:>12.1f}"
            f"{r['seconds'] * 1e3:>10.1f}{r['peak'] / naive['peak']:>14.3f}"
        )


if __name__ == "__main__":
    main()
