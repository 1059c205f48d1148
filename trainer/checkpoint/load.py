"""Resuming from one checkpoint: same world size through DeepSpeed's own load, another through
the elastic path."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from trainer.checkpoint.elastic import (
    _optim_files,
    load_elastic,
)
from trainer.checkpoint.layout import (
    _world,
)
from trainer.checkpoint.settings import (
    restore_run_settings,
    run_settings,
)
from trainer.checkpoint.state import (
    _set_rng_state,
    load_client_state,
    saved_world_size,
)

# ---- load -------------------------------------------------------------------------------------


@dataclass
class Resumed:
    step: int
    client: dict  # this rank's client state (saved rank `rank`'s; saved rank 0's past N)
    saved_world_size: int
    notes: list[str] = field(default_factory=list)  # lines for rank 0 to print


def load(engine, tag_dir: Path, *, rank: int, world_size: int | None = None) -> Resumed:
    """Restore engine + this rank's RNG from a checkpoint written on any number of ranks.

    Same world size: DeepSpeed's load_checkpoint (exact resume). Another world size at ZeRO
    1-3: `load_elastic`. Either way the run's own settings then replace the checkpoint's
    (`restore_run_settings`). RNG: rank r takes saved rank r's state when there was a rank r;
    a rank beyond the saved world keeps its own fresh seed (trainer/build.py: run.seed + 1 +
    rank), so no two ranks share a dropout stream. The data position is the caller's
    (`load_data_states`)."""
    tag_dir = Path(tag_dir)
    world_size = world_size if world_size is not None else _world()
    saved_world = saved_world_size(tag_dir)
    own = tag_dir / f"rank_{rank:05d}.pt"
    client = load_client_state(own if rank < saved_world else tag_dir / "rank_00000.pt")
    step = int(client["step"])
    current = run_settings(engine)
    notes = []
    if saved_world == world_size or not _optim_files(tag_dir):
        # Equal world sizes, or ZeRO-0 (the optimizer state is whole in the model-states file).
        engine.load_checkpoint(
            str(tag_dir.parent),
            tag=tag_dir.name,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        saved = run_settings(engine)
    else:
        saved = load_elastic(engine, tag_dir)
        notes.append(
            f"resume: {tag_dir.name} was written by {saved_world} rank(s), this run has "
            f"{world_size}: weights, fp32 master weights and Adam moments re-partitioned"
        )
    if rank < saved_world:
        _set_rng_state(client["rng"])
    line = restore_run_settings(engine, current, saved, step)
    if line:
        notes.append(line)
    return Resumed(step, client, saved_world, notes)
