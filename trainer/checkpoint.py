"""DeepSpeed checkpoints that a crash can never leave looking complete.

Layout under RUN/checkpoints/:
    step_00000120/             DeepSpeed's files (model, optimizer shards per rank)
    step_00000120/rank_00001.pt this rank's client state: data position, RNG states
    step_00000120/COMPLETE     written by rank 0 after every rank finished writing
    latest                     the newest complete tag, replaced atomically (temp + rename)

`resume=auto` takes the newest tag that has COMPLETE, whatever `latest` says: a kill during a
write leaves a tag without the marker, which is ignored (and removed by the next cleanup).
A write that fails (disk full) removes its tag dir; weights that are not finite are never saved.

Trust boundary: our client state is read with `torch.load(weights_only=True)` (tensors and
plain containers only) before DeepSpeed's `load_checkpoint`, which unpickles its own files in
full: resume only from checkpoints your runs wrote.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from trainer.dist import collective_device

COMPLETE = "COMPLETE"
LATEST = "latest"
TAG_RE = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or trusted: the message is one line."""


@dataclass
class CheckpointConfig:
    every: int = 0
    """Save every this many steps (0: only at the end and on preemption signals)."""
    keep_last: int = 2
    """Complete checkpoints kept; older ones are deleted after a newer one is complete."""
    resume: str = ""
    """"" starts fresh (refused if the run dir already has checkpoints), "auto" resumes from
    the newest complete checkpoint if there is one, or a path to a checkpoint tag dir."""
    at_end: bool = True
    """Save when training finishes."""

    def validate(self) -> None:
        if self.every < 0:
            raise ValueError(f"every must be >= 0 steps (0 = only at the end), got {self.every}")
        if self.keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {self.keep_last}")
        if self.resume not in ("", "auto") and not (Path(self.resume) / COMPLETE).is_file():
            raise ValueError(
                f"resume: {self.resume} is not a complete checkpoint (no {COMPLETE} marker); "
                "pass a RUN/checkpoints/step_XXXXXXXX dir or 'auto'"
            )


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Complete checkpoint tags, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if TAG_RE.match(p.name) and (p / COMPLETE).is_file()]
    return sorted(tags)


def find_resume_dir(cfg: CheckpointConfig, ckpt_dir: Path) -> Path | None:
    if cfg.resume == "auto":
        tags = complete_tags(ckpt_dir)
        return ckpt_dir / tags[-1] if tags else None
    return Path(cfg.resume) if cfg.resume else None


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


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
        tmp = client_path.with_suffix(".tmp")
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
    dist.barrier()  # every rank's files are on disk before the marker says so
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
        raise CheckpointError(
            f"{path} missing: the checkpoint was written by a run with a different "
            "world size; resume with the same number of ranks"
        )
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


def load(engine, tag_dir: Path, *, rank: int) -> dict:
    """Restore engine + this rank's RNG; returns the client state (step, data position)."""
    client = load_client_state(tag_dir / f"rank_{rank:05d}.pt")  # the safe load goes first
    engine.load_checkpoint(
        str(tag_dir.parent),
        tag=tag_dir.name,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    _set_rng_state(client["rng"])
    return client
