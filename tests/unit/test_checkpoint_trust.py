"""Checkpoints you can trust later, and resume settings that do not surprise (issue "Data and
resume at scale"). No processes, no process group: the manifest, verification and resume
choice run locally here (tests/dist/test_shared_storage.py runs them on 2 ranks).

A failure localises to: write_manifest / verify (a damaged file not named, or an intact one
refused), choose_resume (the fallback order or its one-line messages), resolve_checkpoint and
the export command (trainer/interop/run_checkpoint.py), restore_run_settings (the LR schedule
after a resume), load_deepspeed_file (the weights_only allowlist of the elastic path).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

from trainer.checkpoint import (
    COMPLETE,
    MANIFEST,
    CheckpointConfig,
    CheckpointError,
    StorageError,
    _share,
    advance_schedule,
    choose_resume,
    load_deepspeed_file,
    restore_run_settings,
    run_settings,
    verify,
    write_manifest,
)
from trainer.engine import WarmupCosine

FILES = {  # the shape of a 2-rank ZeRO-2 tag dir, with small stand-in contents
    "mp_rank_00_model_states.pt": 3 * 2**20 + 17,  # > one 1 MiB hash chunk
    "zero_pp_rank_0_mp_rank_00_optim_states.pt": 4096,
    "zero_pp_rank_1_mp_rank_00_optim_states.pt": 4000,
    "rank_00000.pt": 100,
    "rank_00001.pt": 100,
}


def make_checkpoint(ckpt_dir: Path, step: int, *, manifest: bool = True) -> Path:
    tag_dir = ckpt_dir / f"step_{step:08d}"
    tag_dir.mkdir(parents=True)
    for i, (name, size) in enumerate(FILES.items()):
        (tag_dir / name).write_bytes(bytes((step + i + k) % 251 for k in range(size)))
    if manifest:
        write_manifest(tag_dir, step=step)
    (tag_dir / COMPLETE).write_text(f"{step}\n")
    return tag_dir


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_manifest_records_every_file_and_verifies(tmp_path):
    tag = make_checkpoint(tmp_path, 6)
    manifest = json.loads((tag / MANIFEST).read_text())
    assert manifest["step"] == 6 and manifest["world_size"] == 1
    assert set(manifest["files"]) == set(FILES)
    assert {n: e["size"] for n, e in manifest["files"].items()} == FILES
    assert verify(tag).status == "intact"


@pytest.mark.parametrize(
    ("damage", "detail"),
    [
        (lambda p: flip_byte(p), "mp_rank_00_model_states.pt: sha256 mismatch"),
        (lambda p: flip_byte(p, offset=2**20 + 5), "mp_rank_00_model_states.pt: sha256 mismatch"),
        (
            lambda p: os.truncate(p, 1000),
            "mp_rank_00_model_states.pt: 1000 bytes, 3145745 expected",
        ),
        (lambda p: p.unlink(), "mp_rank_00_model_states.pt: missing"),
        (lambda p: (p.parent / MANIFEST).write_text("{not json"), "MANIFEST.json: unreadable"),
    ],
    ids=["flipped-byte", "flipped-byte-second-chunk", "truncated", "missing", "bad-manifest"],
)
def test_damage_is_named(tmp_path, damage, detail):
    tag = make_checkpoint(tmp_path, 6)
    damage(tag / "mp_rank_00_model_states.pt")
    verdict = verify(tag)
    assert (verdict.status, verdict.detail) == ("damaged", detail)


def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path):
    for step in (3, 6, 9):
        make_checkpoint(tmp_path, step)
    flip_byte(tmp_path / "step_00000009" / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    flip_byte(tmp_path / "step_00000006" / "mp_rank_00_model_states.pt")
    chosen, notes = choose_resume(CheckpointConfig(resume="auto"), tmp_path)
    assert chosen == tmp_path / "step_00000003"
    assert notes == [
        "checkpoint step_00000009 is damaged (zero_pp_rank_1_mp_rank_00_optim_states.pt: "
        "sha256 mismatch), checkpoint step_00000006 is damaged (mp_rank_00_model_states.pt: "
        "sha256 mismatch); resuming from step_00000003"
    ]


def test_resume_refuses_when_nothing_is_intact(tmp_path):
    for step in (3, 6):
        make_checkpoint(tmp_path, step)
        flip_byte(tmp_path / f"step_{step:08d}" / "rank_00001.pt")
    with pytest.raises(StorageError) as err:
        choose_resume(CheckpointConfig(resume="auto"), tmp_path)
    message = str(err.value)
    assert "\n" not in message and "no intact checkpoint" in message
    assert "step_00000006: rank_00001.pt: sha256 mismatch" in message
    # An explicit damaged tag is refused too, not swapped for another one.
    with pytest.raises(StorageError, match=r"checkpoint step_00000003 is damaged \(rank_00001"):
        choose_resume(CheckpointConfig(resume=str(tmp_path / "step_00000003")), tmp_path)
    # Nothing there at all: a fresh start, as before.
    assert choose_resume(CheckpointConfig(resume="auto"), tmp_path / "empty") == (None, [])


def test_checkpoint_without_manifest_is_taken_with_a_warning(tmp_path):
    make_checkpoint(tmp_path, 3, manifest=False)
    chosen, notes = choose_resume(CheckpointConfig(resume="auto"), tmp_path)
    assert chosen == tmp_path / "step_00000003"
    assert notes == [
        "checkpoint step_00000003 has no MANIFEST.json (written before manifests): its files "
        "are not verified"
    ]


def test_export_refuses_a_damaged_tag_dir_with_one_line(tmp_path, capsys):
    from trainer.cli import main

    run = tmp_path / "run"
    tag = make_checkpoint(run / "checkpoints", 6)
    (run / "config.yaml").write_text("run:\n  dir: x\n")
    flip_byte(tag / "mp_rank_00_model_states.pt")
    code = main(["export", "--checkpoint", str(tag), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1, err
    assert (
        "checkpoint step_00000006 is damaged (mp_rank_00_model_states.pt: sha256 mismatch)"
        in err[0]
    )
    assert not (tmp_path / "out").exists()


def test_run_dir_export_and_eval_fall_back_with_a_warning(tmp_path, capsys):
    from trainer.interop.run_checkpoint import InteropError, resolve_checkpoint

    run = tmp_path / "run"
    for step in (3, 6):
        make_checkpoint(run / "checkpoints", step)
    (run / "config.yaml").write_text("run:\n  dir: x\n")
    flip_byte(run / "checkpoints" / "step_00000006" / "rank_00000.pt")
    assert resolve_checkpoint(run).tag == "step_00000003"
    assert capsys.readouterr().err.strip() == (
        "disco-clip: warning: checkpoint step_00000006 is damaged (rank_00000.pt: sha256 "
        "mismatch); reading from step_00000003"
    )
    flip_byte(run / "checkpoints" / "step_00000003" / "rank_00000.pt")
    with pytest.raises(InteropError, match="no intact checkpoint") as err:
        resolve_checkpoint(run)
    assert "\n" not in str(err.value)


def _engine(lr: float, schedule: WarmupCosine):
    """What restore_run_settings touches of a DeepSpeed engine: a LambdaLR over an optimizer
    with the trainer's two param groups (decay, no decay)."""
    from types import SimpleNamespace

    decay, no_decay = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.AdamW(
        [{"params": [decay], "weight_decay": 0.1}, {"params": [no_decay], "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.98), eps=1e-6,
    )  # fmt: skip
    return SimpleNamespace(optimizer=optimizer, lr_scheduler=LambdaLR(optimizer, schedule))


def _lr(engine) -> float:
    return engine.optimizer.param_groups[0]["lr"]


def test_extended_run_follows_the_new_schedule_not_the_saved_one():
    """A 6-step run extended to 12 with a lower lr: DeepSpeed's load brings the old scheduler
    (WarmupCosine object included) and the old param groups; afterwards the new run's schedule
    rules, at the saved position."""
    old = _engine(1e-3, WarmupCosine(2, 6, 0.0))
    for _ in range(6):
        old.optimizer.step()
        old.lr_scheduler.step()
    assert _lr(old) == 0.0  # the old schedule's floor

    new = _engine(5e-4, WarmupCosine(2, 12, 0.0))
    new_schedule = WarmupCosine(2, 12, 0.0)  # a copy: the load below rewrites the engine's
    current = run_settings(new)
    new.optimizer.load_state_dict(old.optimizer.state_dict())  # what load_checkpoint does
    new.lr_scheduler.load_state_dict(old.lr_scheduler.state_dict())
    assert new.lr_scheduler.lr_lambdas[0].total_steps == 6  # the saved lambda won: the bug
    saved = run_settings(new)

    line = restore_run_settings(new, current, saved, step=6)
    assert line == (
        "resume: schedule follows this run's config: train.steps 6 -> 12, optim.lr 0.001 -> 0.0005"
    )
    assert [g["lr"] for g in new.optimizer.param_groups] == [5e-4 * new_schedule(6)] * 2
    assert [g["weight_decay"] for g in new.optimizer.param_groups] == [0.1, 0.0]
    for step in range(7, 12):
        new.optimizer.step()
        new.lr_scheduler.step()
        assert _lr(new) == pytest.approx(5e-4 * new_schedule(step), rel=1e-12)
    assert restore_run_settings(new, current, run_settings(new), step=11) == ""


def test_changed_optimizer_settings_are_applied_and_said():
    old = _engine(1e-3, WarmupCosine(2, 6, 0.0))
    new = _engine(1e-3, WarmupCosine(4, 6, 0.1))
    for group in new.optimizer.param_groups:
        group["betas"], group["eps"] = (0.9, 0.95), 1e-8
    new.optimizer.param_groups[0]["weight_decay"] = 0.2
    new.optimizer.clip_grad = 1.0  # where ZeRO-1/2 keep optim.grad_clip
    current = run_settings(new)
    new.optimizer.load_state_dict(old.optimizer.state_dict())
    new.lr_scheduler.load_state_dict(old.lr_scheduler.state_dict())
    new.optimizer.clip_grad = 0.0  # ZeRO-1/2's load takes the saved clipping
    line = restore_run_settings(new, current, run_settings(new), step=3)
    assert line == (
        "resume: schedule follows this run's config: schedule.warmup_steps 2 -> 4, "
        "schedule.min_lr_ratio 0 -> 0.1, optim.grad_clip 0 -> 1, optim.weight_decay 0.1 -> 0.2, "
        "optim.betas [0.9, 0.98] -> [0.9, 0.95], optim.eps 1e-06 -> 1e-08"
    )
    assert new.optimizer.clip_grad == 1.0
    groups = new.optimizer.param_groups
    assert [(g["weight_decay"], g["betas"], g["eps"]) for g in groups] == [
        (0.2, (0.9, 0.95), 1e-8), (0.0, (0.9, 0.95), 1e-8)
    ]  # fmt: skip


def test_a_skipped_step_advances_the_schedule(recwarn):
    engine = _engine(1e-3, WarmupCosine(2, 6, 0.0))
    advance_schedule(engine)  # step 1 skipped (no optimizer step yet): no warning either
    assert _lr(engine) == pytest.approx(1e-3 * WarmupCosine(2, 6, 0.0)(1))
    assert not [w for w in recwarn if "lr_scheduler.step()" in str(w.message)]


def test_hashing_is_shared_by_size_among_the_ranks_that_see_a_file():
    sizes = {"a": 100, "b": 90, "c": 10, "d": 5, "e": 1}
    everyone = {n: [0, 1, 2] for n in sizes}
    assert _share(sizes, everyone, 3) == [["a"], ["b"], ["c", "d", "e"]]
    assert _share(sizes, {**everyone, "a": [2]}, 3) == [["b"], ["c", "d", "e"], ["a"]]
    assert _share(sizes, {n: [0] for n in sizes}, 1) == [["a", "b", "c", "d", "e"]]


class _Payload:
    """Unpickling this runs a shell command (the classic malicious-pickle shape)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_elastic_reader_refuses_foreign_objects_in_deepspeed_files(tmp_path):
    """The elastic path reads DeepSpeed's optimizer files with weights_only=True, allowing only
    DeepSpeed's loss scaler, ZeRO stage enum and fragment address: a payload is refused, not
    run."""
    marker = tmp_path / "pwned"
    evil = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": {"loss_scaler": _Payload(marker)}}, evil)
    with pytest.raises(CheckpointError, match="cannot be read for an elastic resume") as err:
        load_deepspeed_file(evil)
    assert not marker.exists(), "the pickle's payload ran"
    assert "\n" not in str(err.value)
