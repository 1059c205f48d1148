"""Run config: defaults ← YAML ← dotted overrides; bad values rejected with the key named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer.config import load_config
from trainer.config_io import ConfigError, dump_yaml, read_yaml

REPO = Path(__file__).resolve().parents[2]
DEBUG = REPO / "trainer" / "configs" / "debug.yaml"


@pytest.fixture
def shards(synthetic_dir) -> str:
    return f"data.train_shards={synthetic_dir / 'train'}"


def test_yaml_then_overrides_typed(shards) -> None:
    cfg = load_config(DEBUG, [shards, "optim.lr=3e-4", "optim.betas=[0.8, 0.9]"], world_size=2)
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.train.steps == 6  # from debug.yaml
    assert cfg.loss.name == "disco"  # dataclass default


def test_resolved_config_round_trips(shards, tmp_path) -> None:
    cfg = load_config(DEBUG, [shards, "train.steps=9"], world_size=1)
    path = tmp_path / "config.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_config(path, [], world_size=1) == cfg


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim.lrr=1"], "optim.lrr: unknown key"),
        (["bogus.x=1"], "bogus: unknown key"),
        (["optim.lr=fast"], "optim.lr: expected a number"),
        (["train.steps=1.5"], "train.steps: expected an integer"),
        (["log.tensorboard=maybe"], "log.tensorboard: expected true or false"),
        (["optim.lr=-1e-3"], "optim.lr must be > 0"),
        (["optim.betas=[0.9]"], "optim.betas: expected 2 values"),
        (["train.global_batch_size=15"], "train.global_batch_size: 15 is not divisible"),
        (["train.precision=fp8"], "train.precision must be one of"),
        (["loss.name=infonce"], "loss.name: unknown loss"),
        (["model.preset=vit_z99"], "model.preset: unknown"),
        (["deepspeed.config=nowhere.json"], "deepspeed.config: nowhere.json not found"),
        (["data.train_shards=/nonexistent/{0..3}.tar"], "data.train_shards: no .tar files"),
        (["checkpoint.resume=/nonexistent"], "checkpoint.resume: /nonexistent is not a complete"),
        (["optim"], "not of the form section.key=value"),
        (["optim=3"], "optim: expected a section"),
    ],
)
def test_bad_values_name_the_key(shards, overrides, message) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        load_config(DEBUG, [shards, *overrides], world_size=2)


def test_bad_files(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        read_yaml(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  steps: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        read_yaml(broken)
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        read_yaml(listed)


def test_cli_reports_one_line_and_exit_2(tmp_path, shards) -> None:
    """Before any process group or model: one line on stderr, exit 2, no traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "trainer.train", "--config", str(DEBUG), shards,
         f"run.dir={tmp_path / 'run'}", "optim.lr=-1"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("disco-clip: error: optim.lr")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()  # nothing written for a rejected config


def test_schedule_is_transformers_cosine_one_step_earlier():
    """Why `WarmupCosine` is kept instead of transformers' cosine-with-min-lr schedule: after
    warmup the two are the same function, but transformers' warmup starts at lr 0 (its first
    optimizer step is wasted) and, past the last step, its cosine rises again; ours reaches the
    peak at the last warmup step and then stays at the floor."""
    from torch.optim.lr_scheduler import LambdaLR
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    from trainer.engine import WarmupCosine

    warmup, total, floor = 10, 100, 0.1
    ours = WarmupCosine(warmup, total, floor)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    hf = get_cosine_with_min_lr_schedule_with_warmup(opt, warmup, total, min_lr_rate=floor)
    assert isinstance(hf, LambdaLR)
    theirs = hf.lr_lambdas[0]
    for step in range(warmup, total + 1):
        assert abs(ours(step) - theirs(step)) < 1e-12, step
    for step in range(warmup):
        assert abs(ours(step) - theirs(step + 1)) < 1e-12, step  # one step earlier
    assert theirs(0) == 0.0 and ours(0) == 1 / warmup
    assert ours(total + 50) == floor and theirs(total + 50) > floor
