"""Resume cost early and late in an epoch: bytes read from shards and seconds to the first batch.

    python -m bench.resume_bench [--samples 20000] [--buffer 1000] [--batch 32]

One logical stream over a synthetic epoch of `--samples` samples (16 px images, written once
under --dir). A position is taken at 1% and at 90% of the epoch, the loader is restored from it,
and the first batch after it is produced; the bench counts the bytes read from the shards in
that (data/shards.py BYTES_READ) and times it. Beside each row: the bytes a replay of the epoch
up to the position would read (the previous loader's resume, and the baseline this design
removes). Goal: the 90% restore costs at most 1.2× the 1% one (ratio, printed last).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def _position_state(cfg, batch: int, fraction: float, samples: int) -> tuple[dict, int]:
    """The loader state after `fraction` of the epoch, reached by reading raw samples only."""
    from data.loader import STATE_VERSION, build_train_loader
    from data.shards import BYTES_READ
    from data.stream import StreamReader
    from data.tokenizer import BUILTIN_TOKENIZER_DIR, load_tokenizer

    loader = build_train_loader(cfg, rank=0, world_size=1, local_batch_size=batch,
                                tokenizer=load_tokenizer(BUILTIN_TOKENIZER_DIR), seed=0)  # fmt: skip
    steps = int(samples * fraction) // batch
    before = BYTES_READ[0]
    reader = StreamReader(loader.spec, 0)
    for _ in range(steps * batch):
        reader.next_raw()
    replay_bytes = BYTES_READ[0] - before  # what replaying the epoch to here reads
    reader.state.good_in_epoch = steps * batch  # (all synthetic samples are good)
    state = {"version": STATE_VERSION, "steps": steps, "seed": 0, "streams": 1,
             "global_batch": batch, "stream_states": {0: reader.snapshot().as_dict()}}  # fmt: skip
    return state, replay_bytes


def _restore_cost(cfg, batch: int, state: dict) -> tuple[int, float]:
    from data.loader import build_train_loader
    from data.shards import BYTES_READ
    from data.tokenizer import BUILTIN_TOKENIZER_DIR, load_tokenizer

    loader = build_train_loader(cfg, rank=0, world_size=1, local_batch_size=batch,
                                tokenizer=load_tokenizer(BUILTIN_TOKENIZER_DIR), seed=0)  # fmt: skip
    before, start = BYTES_READ[0], time.perf_counter()
    loader.load_state_dict(state)
    next(loader)
    return BYTES_READ[0] - before, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20000, help="samples in the epoch")
    parser.add_argument("--buffer", type=int, default=1000, help="data.shuffle_buffer")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dir", type=Path, default=Path("runs/resume_bench_data"))
    args = parser.parse_args()

    from data.config import DataConfig
    from data.synthetic import make_synthetic

    train = args.dir / "train"
    if len(list(train.glob("*.tar"))) * 1000 < args.samples:
        make_synthetic(args.dir, train_samples=args.samples, val_per_class=1, image_size=16,
                       seed=0, samples_per_shard=1000, force=True)  # fmt: skip
    cfg = DataConfig(train_shards=str(train), image_size=16, context_length=16, streams=1,
                     shuffle_buffer=args.buffer, workers=0)  # fmt: skip
    cfg.validate()
    rows = []
    _restore_cost(
        cfg, args.batch, _position_state(cfg, args.batch, 0.01, args.samples)[0]
    )  # warm-up
    for fraction in (0.01, 0.9):
        state, replay = _position_state(cfg, args.batch, fraction, args.samples)
        read, seconds = _restore_cost(cfg, args.batch, state)
        rows.append((fraction, read, seconds, replay))
    print(f"resume cost, 1 stream, epoch of {args.samples} samples, shuffle buffer {args.buffer}, "
          f"batch {args.batch}")  # fmt: skip
    print(f"{'position':>9} {'bytes read':>12} {'s to 1st batch':>15} {'replay would read':>18}")
    for fraction, read, seconds, replay in rows:
        print(f"{fraction:>8.0%} {read:>12,} {seconds:>15.3f} {replay:>18,}")
    (_, early, early_s, _), (_, late, late_s, _) = rows
    print(f"ratio 90% / 1%: bytes {late / early:.2f}, seconds {late_s / early_s:.2f} (goal <= 1.2)")


if __name__ == "__main__":
    main()
