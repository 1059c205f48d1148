"""Safe loading (issue 9): what the trainer reads from disk cannot run code, and a checkpoint a
kill left half-written is never taken for complete. No processes, no process group."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from trainer.checkpoint import (
    COMPLETE,
    LATEST,
    CheckpointConfig,
    CheckpointError,
    complete_tags,
    find_resume_dir,
    load_client_state,
)

REPO = Path(__file__).resolve().parents[2]


class _Payload:
    """Unpickling this runs a shell command (the classic malicious-pickle shape)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_client_state_is_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "rank_00000.pt"
    torch.save({"step": 3, "data": {}, "rng": _Payload(marker)}, evil)
    with pytest.raises(CheckpointError, match=r"refused by weights_only=True") as err:
        load_client_state(evil)
    assert not marker.exists(), "the pickle's payload ran"
    assert "\n" not in str(err.value)


def test_genuine_client_state_loads(tmp_path):
    path = tmp_path / "rank_00000.pt"
    state = {"step": 3, "data": {"batches": 3}, "rng": {"torch": torch.get_rng_state()}}
    torch.save(state, path)
    assert load_client_state(path)["step"] == 3


@pytest.mark.parametrize("blob", [b"", b"not a zip", b"PK\x03\x04truncated"])
def test_corrupt_client_state_is_one_line(tmp_path, blob):
    path = tmp_path / "rank_00000.pt"
    path.write_bytes(blob)
    with pytest.raises(CheckpointError) as err:
        load_client_state(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_partial_checkpoint_is_never_taken_for_complete(tmp_path):
    """A kill mid-write leaves a tag without COMPLETE (and `latest` may even name it):
    resume=auto takes the newest tag that has the marker."""
    ckpt = tmp_path / "checkpoints"
    for step, complete in [(3, True), (6, True), (9, False)]:
        tag = ckpt / f"step_{step:08d}"
        tag.mkdir(parents=True)
        (tag / "mp_rank_00_model_states.pt").write_bytes(b"x")
        if complete:
            (tag / COMPLETE).write_text(f"{step}\n")
    (ckpt / LATEST).write_text("step_00000009\n")
    assert complete_tags(ckpt) == ["step_00000003", "step_00000006"]
    assert find_resume_dir(CheckpointConfig(resume="auto"), ckpt) == ckpt / "step_00000006"
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        CheckpointConfig(resume=str(ckpt / "step_00000009")).validate()


def _python_files():
    """The repository's own Python files: not a venv inside it (bench/vs_openclip.py installs
    OpenCLIP's into bench/.venv-openclip, git-ignored), whose packages are not ours."""
    for folder in ("trainer", "data", "bench"):
        for path in (REPO / folder).rglob("*.py"):
            if not any(part.startswith(".venv") for part in path.relative_to(REPO).parts):
                yield path


def test_every_torch_load_is_weights_only():
    """Static: each torch.load in the package passes weights_only=True, DeepSpeed's own files
    included (export and eval read them with four DeepSpeed classes allowed: docs/trust.md)."""
    allowed: set[tuple[str, str]] = set()
    offenders = []
    for path in _python_files():
        text = path.read_text()
        for match in re.finditer(r"torch\.load\(([^()]|\([^()]*\))*\)", text):
            call = match.group(0)
            rel = str(path.relative_to(REPO))
            if "weights_only=True" in call or any(
                rel == f and marker in call for f, marker in allowed
            ):
                continue
            offenders.append(f"{rel}: {call}")
    assert not offenders, offenders


def test_no_pickle_module_in_the_package():
    users = [
        str(p.relative_to(REPO))
        for p in _python_files()
        if re.search(
            r"^\s*(import pickle|from pickle|import dill|import cloudpickle)", p.read_text(), re.M
        )
    ]
    assert not users, users


@pytest.mark.parametrize("zero_files", [False, True], ids=["stage0", "zero"])
def test_export_refuses_a_crafted_deepspeed_file_without_running_it(tmp_path, zero_files):
    """export and eval read DeepSpeed's files with weights_only=True: a model-states (or
    optimizer) file whose pickle would run a command is refused in one line, and the command
    never runs. (They used to go through DeepSpeed's own merger, which unpickles in full.)"""
    from trainer.interop.run_checkpoint import CheckpointRef, InteropError, fp32_state_dict

    marker = tmp_path / "pwned"
    tag = tmp_path / "run" / "checkpoints" / "step_00000001"
    tag.mkdir(parents=True)
    name = (
        "zero_pp_rank_0_mp_rank_00_optim_states.pt" if zero_files else "mp_rank_00_model_states.pt"
    )
    torch.save({"module": {"w": torch.zeros(1)}, "x": _Payload(marker)}, tag / name)
    ref = CheckpointRef(tmp_path / "run", tag.parent, tag.name)
    with pytest.raises(InteropError, match=r"refusing to unpickle it") as err:
        fp32_state_dict(ref)
    assert not marker.exists(), "the pickle's payload ran"
    assert "\n" not in str(err.value)
