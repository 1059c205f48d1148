"""The demo's input pipeline against what its train step consumes, measured in one run.

    python -m bench.loader_bench                 # demo config, workers 1 and 2, 3 rounds
    python -m bench.loader_bench --samples 2000 --batches 10 --steps 5 --rounds 1   # quick

Both sides run as the demo runs: 2 gloo processes, trainer/configs/demo.yaml (its model, its
ZeRO stage, global batch 128), over the demo's data (demo/data when `make demo` made it, else
the same synthetic dataset written once under runs/loader_bench/). Issue 17's goal: the loader
delivers at least 2x the samples per second that the train step consumes.

- loader samples/s: each rank iterates its own TrainLoader (the product's build_train_loader
  with data.workers = 1, then 2) and does nothing else; after `--warmup` batches (the first
  fills the shuffle buffers), `--batches` batches are timed; the ranks' rates are summed.
- step samples/s: each rank runs the product's train_step on fixed batches taken from the
  loader beforehand (no loading in the loop), global batch x steps / wall time after warm-up.

Rounds alternate the three measurements, so a change in machine load hits all of them alike;
the medians are printed, the ratio loader/step last. Decode stays off the training processes:
with workers > 0 every rank counts the image decodes and PIL resizes its own process made while
iterating (they must be 0: the loader workers did them) and checks that the pixels arrive as
uint8 (normalised on the device by the trainer, data/transforms.py).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "trainer" / "configs" / "demo.yaml"
DEMO_DATA = REPO / "demo" / "data"
BENCH_DATA = REPO / "runs" / "loader_bench" / "data"  # git-ignored (/runs/)
GOAL = 2.0  # loader samples/s at least this many times the step's


def demo_config(data: Path, run_dir: Path, world: int, workers: int):
    """The demo's run config with its paths pointed at `data` and `run_dir`."""
    from trainer.config import load_config

    overrides = [
        f"run.dir={run_dir}", f"data.train_shards={data / 'train'}", f"data.workers={workers}",
        f"eval.zeroshot_dir={data / 'val'}", f"eval.retrieval_shards={data / 'val_pairs'}",
    ]  # fmt: skip
    return load_config(DEMO_CONFIG, overrides, world)


def ensure_data(samples: int, where: Path = BENCH_DATA) -> Path:
    """demo/data if `make demo` made it (and no smaller set was asked for), else the same
    synthetic dataset (trainer/demo.py's settings) with `samples` training pairs in `where`,
    made once."""
    import json

    from data.synthetic import make_synthetic

    if samples == 10000 and where == BENCH_DATA and (DEMO_DATA / "classnames.txt").is_file():
        return DEMO_DATA
    # The demo's 500 per shard; smaller sets get smaller shards, at least 16 of them, so that
    # each of the demo's 8 logical streams still reads its own.
    wanted = {"train_samples": samples, "samples_per_shard": max(1, min(500, samples // 16))}
    info = where / "synthetic.json"
    made = json.loads(info.read_text()) if info.is_file() else {}
    if any(made.get(k) != v for k, v in wanted.items()):
        print(f"writing {samples} synthetic samples to {where}", flush=True)
        make_synthetic(where, val_per_class=2, image_size=32, seed=0, force=True, **wanted)
    return where


# ---- counting decode work in this process (the loader workers are other processes) ----------


class MainProcessWork:
    """Counts image decodes and PIL resizes done by this very process while active. Worker
    processes inherit the wrappers when they fork, but their counts stay in their own memory:
    so a count of 0 here, with batches arriving, means the workers did the work."""

    def __init__(self) -> None:
        from PIL import Image

        import data.stream

        self.decodes = self.resizes = 0
        self._pid = os.getpid()
        self._stream, self._image = data.stream, Image.Image
        self._decode, self._resize = data.stream.decode, Image.Image.resize

    def __enter__(self) -> MainProcessWork:
        def decode(*args, **kwargs):
            self.decodes += os.getpid() == self._pid
            return self._decode(*args, **kwargs)

        def resize(image, *args, **kwargs):
            self.resizes += os.getpid() == self._pid
            return self._resize(image, *args, **kwargs)

        self._stream.decode, self._image.resize = decode, resize
        return self

    def __exit__(self, *exc) -> None:
        self._stream.decode, self._image.resize = self._decode, self._resize


# ---- the two measurements, on each rank -----------------------------------------------------


def loader_rate(cfg, rank: int, world: int, warmup: int, batches: int) -> dict:
    """This rank's loader alone: samples/s after warm-up, and where the decoding ran."""
    import torch

    from data.loader import build_train_loader
    from data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg.data.tokenizer)
    local = cfg.train.global_batch_size // world
    # The workers fork from this process, which has run collectives. Garbage left from them
    # (gloo objects that own threads) that a worker collects aborts that worker, whose copy
    # has no threads ("terminate called without an active exception": 2 of 96 loader starts
    # after train steps here, none of 96 with this collection first). So it is collected
    # here, where the threads exist.
    gc.collect()
    with MainProcessWork() as work:
        loader = build_train_loader(cfg.data, rank=rank, world_size=world, local_batch_size=local,
                                    tokenizer=tokenizer, seed=cfg.run.seed)  # fmt: skip
        try:
            for _ in range(warmup):
                batch = next(loader)
            start = time.perf_counter()
            for _ in range(batches):
                batch = next(loader)
            seconds = time.perf_counter() - start
        finally:
            loader.close()
    return {
        "samples_per_s": local * batches / seconds,
        "uint8": batch["pixel_values"].dtype == torch.uint8,
        "main_decodes": work.decodes,
        "main_resizes": work.resizes,
    }


def fixed_step(cfg, rank: int, world: int):
    """The demo's engine and a function running its train step on fixed batches (taken from
    an in-process loader here, so the timed steps load nothing)."""
    import torch

    from trainer import cpu_quirks
    from trainer.build import build_components
    from trainer.dist import read_dist_info
    from trainer.losses import make_objective
    from trainer.step import train_step

    # run_ranks started the processes and the group: give DeepSpeed what a launcher would.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world))  # fmt: skip
    cpu_quirks.patch_deepspeed_for_cpu()
    parts = build_components(cfg, read_dist_info())
    fixed = [next(parts.loader) for _ in range(4)]
    parts.loader.close()
    objective = make_objective(cfg.loss)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        cfg.train.precision
    ]

    def step(i: int) -> None:
        train_step(parts.engine, fixed[i % len(fixed)], objective, chunks=1, dtype=dtype)

    return step


def step_rate(step, global_batch: int, warmup: int, steps: int) -> dict:
    for i in range(warmup):
        step(i)
    start = time.perf_counter()
    for i in range(steps):
        step(i)
    return {"samples_per_s": global_batch * steps / (time.perf_counter() - start)}


def measure_rank(rank: int, world: int, data: str, args: dict) -> list[dict]:
    """All rounds on one rank: [{"loader1": ..., "loader2": ..., "step": ...}, ...]."""
    results = []
    with tempfile.TemporaryDirectory() as run_dir:
        configs = {w: demo_config(Path(data), Path(run_dir), world, workers=w)
                   for w in [0, *args["workers"]]}  # fmt: skip
        step = fixed_step(configs[0], rank, world)
        global_batch = configs[0].train.global_batch_size
        for _ in range(args["rounds"]):
            row = {
                f"loader{w}": loader_rate(configs[w], rank, world, args["warmup"], args["batches"])
                for w in args["workers"]
            }
            row["step"] = step_rate(step, global_batch, args["warmup"], args["steps"])
            results.append(row)
    return results


# ---- the report -----------------------------------------------------------------------------


def combine(per_rank: list[list[dict]]) -> list[dict[str, float]]:
    """Per round: the loaders' samples/s summed over ranks (each rank loads its own slice), and
    the step's samples/s (global: every rank reports the same run; rank 0's is taken)."""
    rounds = []
    for rows in zip(*per_rank, strict=True):
        combined = {k: sum(r[k]["samples_per_s"] for r in rows) for k in rows[0] if k != "step"}
        combined["step"] = rows[0]["step"]["samples_per_s"]
        rounds.append(combined)
    return rounds


def decode_checks(per_rank: list[list[dict]], workers: list[int]) -> list[str]:
    """Problems found: pixels not uint8, or decode/resize work done in a training process while
    loader workers were meant to do it."""
    problems = []
    for rank, rows in enumerate(per_rank):
        for row in rows:
            for w in workers:
                got = row[f"loader{w}"]
                if not got["uint8"]:
                    problems.append(f"rank {rank}, workers {w}: pixel_values are not uint8")
                if w > 0 and (got["main_decodes"] or got["main_resizes"]):
                    problems.append(
                        f"rank {rank}, workers {w}: the training process decoded "
                        f"{got['main_decodes']} images and resized {got['main_resizes']}"
                    )
    return problems


def report(rounds: list[dict[str, float]], workers: list[int]) -> str:
    """samples/s per round and their median for each measurement, then the ratios (the median
    of the per-round ratios) with the goal, last."""
    names = {f"loader{w}": f"loader, data.workers={w}" for w in workers}
    names["step"] = "train step (no loading)"
    head = "".join(f"{f'round {i}':>9}" for i in range(1, len(rounds) + 1))
    lines = [f"{'samples/s':<26}{head}{'median':>9}"]
    for key, label in names.items():
        values = [r[key] for r in rounds]
        cells = "".join(f"{v:>9.0f}" for v in [*values, statistics.median(values)])
        lines.append(f"{label:<26}{cells}")
    for w in workers:
        ratio = statistics.median(r[f"loader{w}"] / r["step"] for r in rounds)
        verdict = "met" if ratio >= GOAL else "NOT met"
        lines.append(
            f"loader/step, data.workers={w}: {ratio:.2f}x (goal >= {GOAL:.0f}x: {verdict})"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3, help="batches / steps before timing")
    parser.add_argument("--batches", type=int, default=30, help="timed loader batches per rank")
    parser.add_argument("--steps", type=int, default=20, help="timed train steps")
    parser.add_argument("--samples", type=int, default=10000, help="synthetic training pairs")
    parser.add_argument("--data", type=Path, default=BENCH_DATA,
                        help="where the synthetic set is written (demo/data is used if present)")  # fmt: skip
    args = parser.parse_args(argv)

    from tests.support import run_ranks

    data = ensure_data(args.samples, args.data)
    workers = [1, 2]
    settings = {"rounds": args.rounds, "warmup": args.warmup, "batches": args.batches,
                "steps": args.steps, "workers": workers}  # fmt: skip
    per_rank = run_ranks(measure_rank, 2, str(data), settings)
    problems = decode_checks(per_rank, workers)
    print(f"demo config ({DEMO_CONFIG.relative_to(REPO)}), 2 processes, data {data}")
    print("decode in loader workers, uint8 hand-over: "
          + ("checked" if not problems else "FAILED: " + "; ".join(problems)))  # fmt: skip
    print(report(combine(per_rank), workers))
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
