"""Train-step time of the tiny ViT with patch dropout (FLIP) 0 and 0.5, side by side.

    python -m bench.patch_dropout_bench --preset tiny --batch 64 --repeats 7

In-process on the CPU, no DeepSpeed: forward, contrastive loss, backward and an AdamW step of
trainer.model's TrainableCLIP on random inputs; median seconds over the repeats after warm-up.
Only the vision tower gets cheaper (the text tower is unchanged), so the ratio is above 0.5.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from trainer.losses import make_objective
from trainer.losses.registry import LossConfig
from trainer.model import ModelConfig, TokenIds, build_clip_config, build_model

RATES = (0.0, 0.5)


def step_seconds(preset: str, patch_dropout: float, batch: int, repeats: int, warmup: int):
    torch.manual_seed(0)
    cfg = ModelConfig(preset=preset, patch_dropout=patch_dropout)
    config = build_clip_config(cfg, TokenIds(1000, 1, 2, 0), 16)
    model = build_model(cfg, config, with_bias=False, zero3=False).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    objective = make_objective(LossConfig())
    size = config.vision_config.image_size
    pixels = torch.randn(batch, 3, size, size)
    ids = torch.randint(3, 1000, (batch, 16))
    ids[:, -1] = 2  # eos
    mask = torch.ones_like(ids)
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        image, text, scale, bias = model(pixels, ids, mask)
        objective(image, text, scale, bias).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    patches = (size // config.vision_config.patch_size) ** 2
    return statistics.median(times), patches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", help="trainer.model preset (tiny, demo)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    for rate in RATES:
        results[rate], patches = step_seconds(
            args.preset, rate, args.batch, args.repeats, args.warmup
        )
    print(
        f"preset={args.preset} batch={args.batch} patches={patches} repeats={args.repeats} "
        f"threads={torch.get_num_threads()}"
    )
    print("  ".join(f"patch_dropout={r}: {results[r] * 1e3:.1f} ms" for r in RATES))
    print(f"ratio (0.5 / 0): {results[0.5] / results[0.0]:.3f}")


if __name__ == "__main__":
    main()
