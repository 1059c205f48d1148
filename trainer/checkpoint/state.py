"""Writing and reading one checkpoint: DeepSpeed's files plus each rank's client state
(data position, RNG), the COMPLETE marker, keep-last-K cleanup."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from trainer.checkpoint.integrity import (
    write_manifest,
)
from trainer.checkpoint.layout import (
    CLIENT_RE,
    COMPLETE,
    LATEST,
    TAG_RE,
    CheckpointError,
    _atomic_write_text,
    complete_tags,
    tag_for,
)
from trainer.dist import collective_device

# ---- client state: data position and RNG -------------------------------------------------


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def weights_finite(engine) -> bool:
    """Agreed by all ranks: every parameter this rank holds (its ZeRO-3 partition) is finite.

    The check stays on the parameters' device (one host sync, not one per tensor) and the flag
    goes through the collective on the device the process group serves."""
    held = [getattr(p, "ds_tensor", p) for p in engine.module.parameters()]
    local = torch.stack([torch.isfinite(t).all() for t in held if t.numel()]).all()
    flag = local.float().reshape(1).to(collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def save(engine, ckpt_dir: Path, *, step: int, data_state: dict, keep_last: int, rank: int) -> Path:
    """Collective: every rank must call it at the same step."""
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    if not weights_finite(engine):
        raise CheckpointError(
            f"weights are not finite at step {step} (non-finite gradients?); no checkpoint "
            "written: resume from the newest complete one with a lower optim.lr"
        )
    if rank == 0 and tag_dir.exists():  # a stale incomplete attempt at this same step
        shutil.rmtree(tag_dir)
    dist.barrier()
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False)
        client = {"step": step, "data": data_state, "rng": _rng_state()}
        client_path = tag_dir / f"rank_{rank:05d}.pt"
        tmp = client_path.with_name(f".{client_path.name}.tmp")
        torch.save(client, tmp)
        os.replace(tmp, client_path)
    except (OSError, RuntimeError) as err:
        # Disk full or unwritable. torch.save reports it as a RuntimeError from its zip writer
        # ("inline_container"); any other RuntimeError (a lost peer) is not ours to explain.
        if isinstance(err, RuntimeError) and "inline_container" not in str(err):
            raise
        shutil.rmtree(tag_dir, ignore_errors=True)  # no half-written tag left behind
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        free = shutil.disk_usage(ckpt_dir).free / 2**20
        raise CheckpointError(
            f"checkpoint {tag} could not be written ({reason.strip().splitlines()[0][:120]}; "
            f"{free:.1f} MiB free at {ckpt_dir}); the previous complete checkpoint is intact: "
            "free space and resume with checkpoint.resume=auto"
        ) from None
    dist.barrier()  # every rank's files are on disk before the manifest and the marker say so
    write_manifest(tag_dir, step=step)
    if rank == 0:
        _atomic_write_text(tag_dir / COMPLETE, f"{step}\n")
        _atomic_write_text(ckpt_dir / LATEST, f"{tag}\n")
        _cleanup(ckpt_dir, keep_last)
    dist.barrier()
    return tag_dir


def _cleanup(ckpt_dir: Path, keep_last: int) -> None:
    complete = complete_tags(ckpt_dir)
    keep = set(complete[-keep_last:])
    newest = complete[-1] if complete else ""
    for path in ckpt_dir.iterdir():
        # Old complete tags beyond keep_last, and incomplete ones older than the newest
        # complete (leftovers of a killed write; a newer incomplete one may be in progress).
        if TAG_RE.match(path.name) and path.name not in keep and path.name < newest:
            shutil.rmtree(path, ignore_errors=True)


def load_client_state(path: Path) -> dict:
    """This rank's client state, tensors and plain containers only (weights_only=True): a
    file that needs arbitrary unpickling is refused, not executed."""
    if not path.is_file():
        raise CheckpointError(f"{path} missing: the checkpoint lacks a rank's client state")
    try:
        client = torch.load(path, weights_only=True)
    except Exception as err:  # UnpicklingError for foreign objects, others for corrupt files
        first = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path} is not a client state this trainer wrote (refused by weights_only=True: "
            f"{first}); resume from a checkpoint your own run wrote"
        ) from None
    if not isinstance(client, dict) or not {"step", "data", "rng"} <= client.keys():
        raise CheckpointError(f"{path} lacks step/data/rng; it was not written by this trainer")
    return client


def saved_world_size(tag_dir: Path) -> int:
    """How many ranks wrote the checkpoint: one client-state file each (rank_XXXXX.pt)."""
    ranks = sorted(
        int(m.group(1)) for p in Path(tag_dir).iterdir() if (m := CLIENT_RE.match(p.name))
    )
    if not ranks or ranks != list(range(len(ranks))):
        raise CheckpointError(
            f"{tag_dir}: client states of ranks {ranks[:8]} found, not 0..N-1; this checkpoint "
            "is incomplete"
        )
    return len(ranks)


def load_data_states(resume_dir: Path, world_size_saved: int) -> list[dict]:
    """Every saved rank's data position, in saved-rank order (rank i's file is saved rank i's):
    what a loader whose state is per logical stream needs to pick its own streams on any
    world size."""
    return [
        load_client_state(Path(resume_dir) / f"rank_{r:05d}.pt")["data"]
        for r in range(world_size_saved)
    ]
