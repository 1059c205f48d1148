"""Distributed facts, read once from the environment, and process-group start-up.

Every launcher we support leaves its facts in environment variables; this is the one place that
reads them. Precedence: torchrun / deepspeed / accelerate (RANK, WORLD_SIZE, LOCAL_RANK, ...),
then Slurm's srun (SLURM_PROCID, SLURM_NTASKS, ...), then a plain single process.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch

from trainer import cpu_quirks


@dataclass
class DistConfig:
    timeout_s: int = 300
    """Seconds a collective may wait for a peer before the process group gives up: a dead
    rank makes the others fail after at most this long instead of hanging forever."""
    backend: str = "auto"
    """"auto" (nccl on CUDA, gloo on CPU), "nccl" or "gloo"."""

    def validate(self) -> None:
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {self.timeout_s}")
        if self.backend not in ("auto", "nccl", "gloo"):
            raise ValueError(f"backend must be auto, nccl or gloo, got {self.backend!r}")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" (any RANK/WORLD_SIZE launcher), "slurm" or "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))


def _first_slurm_host(nodelist: str) -> str:
    """First hostname of a Slurm nodelist like 'gpu[003-005,007],cpu1' (no scontrol needed)."""
    depth = 0
    for i, char in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            nodelist = nodelist[:i]
            break
    if "[" not in nodelist:
        return nodelist
    prefix, ranges = nodelist.split("[", 1)
    return prefix + ranges.rstrip("]").split(",")[0].split("-")[0]


def _slurm_tasks_on_this_node(env: Mapping[str, str]) -> int:
    """Tasks on this node. SLURM_TASKS_PER_NODE is always set, run-length encoded per node
    ('4(x2),3' = 4, 4, 3); SLURM_NTASKS_PER_NODE only with --ntasks-per-node."""
    encoded = env.get("SLURM_STEP_TASKS_PER_NODE", env.get("SLURM_TASKS_PER_NODE", ""))
    counts: list[int] = []
    for part in encoded.split(","):
        if part:
            count, _, repeat = part.partition("(x")
            counts += [int(count)] * int(repeat.rstrip(")") or 1)
    node = int(env.get("SLURM_NODEID", 0))
    if node < len(counts):
        return counts[node]
    return int(env.get("SLURM_NTASKS_PER_NODE", "1"))


def read_dist_info(env: Mapping[str, str] = os.environ) -> DistInfo:
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return DistInfo(
            rank=int(env["RANK"]),
            world_size=world,
            local_rank=int(env.get("LOCAL_RANK", 0)),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        job_id = int(env.get("SLURM_JOB_ID", 0))
        return DistInfo(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            local_world_size=_slurm_tasks_on_this_node(env),
            master_addr=env.get("MASTER_ADDR")
            or _first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")),
            # Derived from the job id so that concurrent jobs sharing a node do not collide.
            master_port=int(env.get("MASTER_PORT", 20000 + job_id % 20000)),
            launcher="slurm",
        )
    return DistInfo(0, 1, 0, 1, "127.0.0.1", free_port(), "single")


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for single-process runs, local tests and benches)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(info: DistInfo, cfg: DistConfig) -> None:
    """Start the process group through DeepSpeed (so its `comm` layer knows it) from `info`.

    The env:// variables are written from `info` so that every launcher, a plain `python`
    included, looks the same to torch and DeepSpeed (without them DeepSpeed tries MPI).
    """
    import deepspeed

    os.environ.update(
        RANK=str(info.rank),
        WORLD_SIZE=str(info.world_size),
        LOCAL_RANK=str(info.local_rank),
        LOCAL_WORLD_SIZE=str(info.local_world_size),
        MASTER_ADDR=info.master_addr,
        MASTER_PORT=str(info.master_port),
    )
    cpu_quirks.patch_deepspeed_for_cpu()
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if cpu_quirks.on_cuda() else "gloo")
    if cpu_quirks.on_cuda():  # CUDA-only: no CPU test reaches this branch
        index = cuda_device_index(info.local_rank, torch.cuda.device_count())
        torch.cuda.set_device(index)
        # DeepSpeed picks its device from LOCAL_RANK again (the process group's device_id,
        # engine.device, zero.Init's local device), so LOCAL_RANK must name the CUDA index we
        # chose, not the node-local task number (they differ under srun --gpus-per-task).
        os.environ["LOCAL_RANK"] = str(index)
    deepspeed.init_distributed(
        dist_backend=backend,
        auto_mpi_discovery=False,
        timeout=timedelta(seconds=cfg.timeout_s),
        verbose=False,
    )


def cuda_device_index(local_rank: int, visible_devices: int) -> int:
    """The CUDA index this process trains on.

    One GPU per node-local rank (torchrun, deepspeed, srun --gpus-per-node): index local_rank.
    Under srun --gpus-per-task (or any launcher that narrows CUDA_VISIBLE_DEVICES per process)
    each process sees exactly one GPU, index 0, while its local rank may be 1, 2, ...
    """
    if 0 <= local_rank < visible_devices:
        return local_rank
    if visible_devices == 1:
        return 0
    raise ValueError(
        f"LOCAL_RANK is {local_rank} but this process sees {visible_devices} CUDA device(s) "
        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}); give "
        "each node as many GPUs as tasks (srun --gpus-per-node, torchrun --nproc-per-node) "
        "or exactly one GPU per task (srun --gpus-per-task=1)"
    )


def train_device() -> torch.device:
    """Where this process's model and batches live: its current CUDA device (set by
    init_distributed) on a GPU machine, else the CPU."""
    if cpu_quirks.on_cuda():  # CUDA-only
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def collective_device(group=None) -> torch.device:
    """The device a tensor must be on to go through a collective of `group` (default: the
    default process group): the current CUDA device under NCCL, which cannot reduce CPU
    tensors; the CPU under gloo, or when no process group is running."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return torch.device("cpu")
    if dist.get_backend(group) != "nccl":
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())  # CUDA-only: tests/gpu (none yet)
