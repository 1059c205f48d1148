"""Raw samples per second out of local tar shards: read_shard's direct tar reader against the
tarfile reader it replaced.

    python -m bench.tar_bench                      # 4 shards x 500 samples, 7 rounds
    python -m bench.tar_bench --shards 2 --rounds 3   # quick

Shards in img2dataset's layout (KEY.jpg of 1-3 KB of JPEG-like bytes, KEY.txt, KEY.json), made
by data/shards.py's write_shard in a temporary directory and read once before timing, so both
readers find them in the page cache: what is timed is the CPU a loader worker spends turning
tar bytes into RawSamples (no decoding). The baseline is read_shard as it was (tarfile's
random-access mode, the member machinery and the counting wrapper around every read), which
data/shards.py keeps as `_tarfile_samples`. Each round times a full pass of both readers over all shards, alternately, so a change
in machine load hits both alike; the medians are printed, the ratio new/baseline last. Before
timing, both readers must yield the same samples (refs included).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from data.shards import (
    RawSample,
    _CountingReader,
    _open,
    _tarfile_samples,
    read_shard,
    write_shard,
)


def tarfile_read_shard(url: str) -> Iterator[RawSample]:
    """The baseline: read_shard for a local shard before the direct reader, which is the path
    data/shards.py keeps for pipes and for what the direct reader hands over to tarfile."""
    return _tarfile_samples(url, _CountingReader(_open(url, allow_pipe=False)), seekable=True)


def write_shards(where: Path, shards: int, per_shard: int) -> list[str]:
    """`shards` tars of `per_shard` samples: jpg 1-3 KB (a JPEG marker, then random bytes, as
    compressed data looks), a caption, a small json."""
    rng = random.Random(0)
    urls = []
    for s in range(shards):
        members = []
        for i in range(per_shard):
            key = f"{s * per_shard + i:09d}"
            jpg = b"\xff\xd8\xff\xe0" + rng.randbytes(rng.randint(1000, 3000))
            caption = f"a photo of thing number {i} on a plain background".encode()
            meta = json.dumps({"key": key, "width": 256, "height": 256, "status": "success"})
            members += [
                (f"{key}.jpg", jpg),
                (f"{key}.txt", caption),
                (f"{key}.json", meta.encode()),
            ]
        path = where / f"{s:06d}.tar"
        write_shard(path, members)
        urls.append(str(path))
    return urls


def pass_seconds(reader: Callable[[str], Iterator[RawSample]], urls: list[str]) -> float:
    """Seconds to read every sample of every shard with `reader`."""
    start = time.perf_counter()
    for url in urls:
        for _ in reader(url):
            pass
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--samples-per-shard", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=7, help="timed passes of each reader")
    args = parser.parse_args()

    readers = {"tarfile (baseline)": tarfile_read_shard, "read_shard": read_shard}
    with tempfile.TemporaryDirectory(prefix="tar_bench-") as tmp:
        urls = write_shards(Path(tmp), args.shards, args.samples_per_shard)
        for url in urls:  # same output, and the shards in the page cache
            assert list(read_shard(url)) == list(tarfile_read_shard(url)), url
        times: dict[str, list[float]] = {name: [] for name in readers}
        for _ in range(args.rounds):
            for name, reader in readers.items():
                times[name].append(pass_seconds(reader, urls))
    samples = args.shards * args.samples_per_shard
    rates = {name: samples / statistics.median(t) for name, t in times.items()}
    print(f"{args.shards} shards x {args.samples_per_shard} samples (jpg 1-3 KB, txt, json), "
          f"median of {args.rounds} rounds")  # fmt: skip
    for name, rate in rates.items():
        print(f"{name:>20}: {rate:>10,.0f} samples/s")
    base, new = rates["tarfile (baseline)"], rates["read_shard"]
    print(f"ratio read_shard / tarfile: {new / base:.2f}")


if __name__ == "__main__":
    main()
