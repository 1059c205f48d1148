"""A damaged checkpoint is named and skipped, never loaded (real runs: debug config, 2 ranks).

Six steps with a checkpoint every 3; one byte of the step-6 checkpoint's model file flipped;
resume=auto with train.steps=9 must say so, resume from step 3 and finish. Then, with every
checkpoint damaged, a resume is refused with one line and exit 2 (before any rank builds a
model); export of the run dir falls back to the intact one with a warning.

A failure localises to trainer/checkpoint.py: write_manifest (no manifest, or one missing a
file), verify / choose_resume (the damage missed, or the wrong fallback), or train.py's
handling of StorageError (a traceback instead of one line).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support import runs
from trainer.checkpoint import complete_tags


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damaged_checkpoint_is_skipped_then_refused(tmp_path, synthetic_dir, capsys):
    data, run_dir = Path(synthetic_dir), tmp_path / "run"
    ckpt = run_dir / "checkpoints"
    first = runs.run_training(run_dir, data, ["checkpoint.every=3"])  # 6 steps
    assert first.returncode == 0, first.stderr[-3000:]
    assert complete_tags(ckpt) == ["step_00000003", "step_00000006"]
    assert all((ckpt / tag / "MANIFEST.json").is_file() for tag in complete_tags(ckpt))
    flip_byte(ckpt / "step_00000006" / "mp_rank_00_model_states.pt")

    resumed = runs.run_training(
        run_dir, data, ["checkpoint.every=3", "train.steps=9", "checkpoint.resume=auto"]
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (
        "checkpoint step_00000006 is damaged (mp_rank_00_model_states.pt: sha256 mismatch); "
        "resuming from step_00000003"
    ) in resumed.stdout
    assert f"resumed from {ckpt / 'step_00000003'} at step 3" in resumed.stdout
    assert complete_tags(ckpt) == ["step_00000006", "step_00000009"]  # step 6 written anew

    # Export of the run dir: the newest intact checkpoint, the damaged one named on stderr.
    from trainer.interop.run_checkpoint import resolve_checkpoint

    flip_byte(ckpt / "step_00000009" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    capsys.readouterr()
    assert resolve_checkpoint(run_dir).tag == "step_00000006"
    assert (
        "checkpoint step_00000009 is damaged (zero_pp_rank_0_mp_rank_00_optim_states.pt: "
        "sha256 mismatch); reading from step_00000006"
    ) in capsys.readouterr().err

    # Nothing intact: one line, exit 2, no traceback (one process, no launcher: its stderr is
    # the trainer's alone; the check comes before the world size matters).
    flip_byte(ckpt / "step_00000006" / "rank_00001.pt")
    refused = subprocess.run(
        [sys.executable, "-m", "trainer.train", "--config", str(runs.DEBUG_CONFIG),
         f"run.dir={run_dir}", f"data.train_shards={data / 'train'}", "train.steps=12",
         "checkpoint.resume=auto"],
        cwd=runs.REPO, env=runs.test_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    errors = [line for line in refused.stderr.splitlines() if "error:" in line]
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "Traceback" not in refused.stderr
    assert len(errors) == 1, refused.stderr[-3000:]
    assert "checkpoint.resume=auto: no intact checkpoint in" in errors[0]
    assert "step_00000009: zero_pp_rank_0_mp_rank_00_optim_states.pt: sha256 mismatch" in errors[0]
    assert "step_00000006: rank_00001.pt: sha256 mismatch" in errors[0]
