"""One decision, shared storage (trainer/checkpoint.py) on 2 real gloo processes.

Two ranks of one torchrun cannot be shown different filesystems, but the check itself can be
given a different directory on each rank: that is what a node-local run.dir looks like to it.
A failure localises to check_shared_run_dir (the probe), choose_resume (rank 0's choice not
broadcast), write_manifest / verify (the hashing shared between ranks, the gathered verdict).
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.support.localdist import run_ranks

FILES = {  # a 2-rank ZeRO-2 tag dir's names, small stand-in contents
    "mp_rank_00_model_states.pt": 2**20 + 17,
    "zero_pp_rank_0_mp_rank_00_optim_states.pt": 4096,
    "zero_pp_rank_1_mp_rank_00_optim_states.pt": 4000,
    "rank_00000.pt": 100,
    "rank_00001.pt": 100,
}


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _on_each_rank(rank: int, world: int, root: str) -> dict:
    import torch.distributed as dist

    from trainer.checkpoint import (
        COMPLETE,
        MANIFEST,
        CheckpointConfig,
        StorageError,
        check_shared_run_dir,
        choose_resume,
        verify,
        write_manifest,
    )

    root = Path(root)
    out: dict = {}
    shared = root / "shared"
    check_shared_run_dir(shared)  # the normal case: nothing raised
    dist.barrier()  # rank 0 removes the probe once every rank has read it
    out["shared_probe_left"] = sorted(p.name for p in shared.iterdir())

    own = root / f"node{rank}"  # what a node-local run.dir is to the check
    try:
        check_shared_run_dir(own)
        out["local"] = ""
    except StorageError as err:
        out["local"] = str(err)

    # The manifest of a checkpoint written by both ranks (each writes "its" files), hashed by
    # both, and the verdicts after damage: the same on both ranks.
    tag = shared / "checkpoints" / "step_00000006"
    if rank == 0:
        tag.mkdir(parents=True)
    dist.barrier()
    for i, (name, size) in enumerate(FILES.items()):
        if i % world == rank:
            (tag / name).write_bytes(bytes((i + k) % 251 for k in range(size)))
    dist.barrier()
    write_manifest(tag, step=6)
    if rank == 0:
        (tag / COMPLETE).write_text("6\n")
    dist.barrier()
    out["manifest_files"] = sorted(json.loads((tag / MANIFEST).read_text())["files"])
    out["intact"] = verify(tag).status
    dist.barrier()
    if rank == 1:
        flip_byte(tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    dist.barrier()
    verdict = verify(tag)
    out["damaged"] = (verdict.status, verdict.detail)

    # resume=auto on ranks that (wrongly) see different checkpoint dirs: rank 0 decides.
    ckpt = shared / "checkpoints" if rank == 0 else own / "checkpoints"
    dist.barrier()
    if rank == 1:  # undo the damage so that rank 0 has an intact tag to choose
        flip_byte(tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    dist.barrier()
    chosen, _ = choose_resume(CheckpointConfig(resume="auto"), ckpt)
    out["chosen"] = str(chosen)
    return out


def test_shared_storage_check_and_one_decision(tmp_path):
    (tmp_path / "shared").mkdir()
    for rank in (0, 1):
        (tmp_path / f"node{rank}").mkdir()
    results = run_ranks(_on_each_rank, 2, str(tmp_path))

    assert all(r["shared_probe_left"] == [] for r in results)  # the probe is removed
    # Both ranks stop with one line naming run.dir (here each rank's own path; in a real run
    # the same string), which rank is blind, and the remedy.
    messages = [
        r["local"].replace(str(tmp_path / f"node{i}"), "DIR") for i, r in enumerate(results)
    ]
    assert messages[0] == messages[1] != ""
    assert "\n" not in messages[0]
    assert messages[0].startswith("run.dir: DIR is not the same directory on every rank")
    assert "rank(s) 1 of 2 cannot see" in messages[0]
    assert "must be on storage shared by all ranks" in messages[0]

    assert all(r["manifest_files"] == sorted(FILES) for r in results)
    assert [r["intact"] for r in results] == ["intact", "intact"]
    expected = ("damaged", "zero_pp_rank_1_mp_rank_00_optim_states.pt: sha256 mismatch")
    assert [r["damaged"] for r in results] == [expected, expected]
    chosen = str(tmp_path / "shared" / "checkpoints" / "step_00000006")
    assert [r["chosen"] for r in results] == [chosen, chosen]
