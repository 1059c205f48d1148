"""Run a function on N local processes joined by a gloo process group (tests and benches).

`run_ranks(fn, world_size, *args)` spawns `world_size` processes, initialises
torch.distributed with gloo on a free 127.0.0.1 port, calls `fn(rank, world_size, *args)` in
each, and returns the per-rank results (anything `torch.save` can store, read back with
weights_only=True). An exception in any rank fails the call with that rank's traceback.

Process start-up costs seconds (imports), so tests run several checks per launch.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.dist import free_port


def _entry(rank: int, world_size: int, port: int, out_dir: str, fn: Callable, args: tuple):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any) -> list[Any]:
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_entry, args=(world_size, free_port(), out_dir, fn, args), nprocs=world_size)
        return [
            torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=True) for r in range(world_size)
        ]
