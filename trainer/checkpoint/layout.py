"""Where checkpoints live and how a tag is named, complete or not; the collectives the
checkpoint code uses (object collectives, which work on any backend)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

COMPLETE = "COMPLETE"
LATEST = "latest"
MANIFEST = "MANIFEST.json"
MANIFEST_VERSION = 1
TAG_RE = re.compile(r"^step_(\d{8})$")
CLIENT_RE = re.compile(r"^rank_(\d{5})\.pt$")
HASH_CHUNK = 1 << 20  # files are hashed in 1 MiB reads, never loaded whole
PROBE_PREFIX = ".shared-storage-probe-"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or trusted: the message is one line."""


class StorageError(ValueError):
    """A run that must not start: RUN/ not shared by every rank, or no intact checkpoint to
    resume. The message is one line; train.py prints it on every rank and exits 2."""


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
    """The tag dir `cfg.resume` names, as this process sees it (no verification, no
    collective): the newest complete one for "auto". Training uses `choose_resume`."""
    if cfg.resume == "auto":
        tags = complete_tags(ckpt_dir)
        return ckpt_dir / tags[-1] if tags else None
    return Path(cfg.resume) if cfg.resume else None


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---- collectives that work on any backend (object collectives, or the group's device) ------


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _world() -> int:
    return dist.get_world_size() if _distributed() else 1


def _broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not _distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not _distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
