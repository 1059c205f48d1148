"""bench/vs_openclip.py's reading of the runs, its report, the OpenCLIP model config and
command it writes, and the CPU shims; the bench itself installs OpenCLIP into its own venv,
which CI does not do."""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from argparse import Namespace
from pathlib import Path

import pytest

from bench import vs_openclip as vs

NAN = float("nan")
OURS_LINES = [
    (1.2, "*****************************************", NAN),
    (6.2, "[2026-12-01 22:51:57,753] [WARNING] [real_accelerator.py:213:get_accelerator] CPU", NAN),
    (9.3, "[train] step 1 loss=5.272 lr=0.001 logit_scale=2.658 samples_per_s=170", 8.5),
    (9.5, "[train] step 2 loss=6.37 lr=0.0009994 logit_scale=2.657 samples_per_s=572.7", 8.9),
    (9.7, "[eval] step 2 zeroshot_top1=0.1", NAN),
    (9.9, "[train] step 3 loss=4.9 lr=0.0009 logit_scale=2.657 samples_per_s=600", 9.3),
    (10.3, "[train] step 4 loss=4.9 lr=0.0009 logit_scale=2.657 samples_per_s=600", 9.668),
]
OPENCLIP_LINES = [
    (10.2, "2026-12-01,22:48:54 | INFO | Start epoch 0", NAN),
    (11.4, "2026-12-01,22:48:56 | INFO | Train Epoch: 0 [ 128/8192 (2%)] Data (t): 1.058", 9.0),
    (11.7, "2026-12-01,22:48:57 | INFO | Train Epoch: 0 [ 256/8192 (3%)] Data (t): 0.034", 9.5),
    (12.0, "2026-12-01,22:48:57 | INFO | Train Epoch: 0 [ 384/8192 (5%)] Data (t): 0.005", 10.0),
    (12.2, "2026-12-01,22:48:57 | INFO | Train Epoch: 0 [8192/8192 (100%)] Data (t): 0.005", 40.0),
]


def test_step_lines_read_each_trainers_step_line() -> None:
    ours = vs.step_lines(OURS_LINES, "ours", 128)
    assert {k: v[0] for k, v in ours.items()} == {1: 9.3, 2: 9.5, 3: 9.9, 4: 10.3}
    # OpenCLIP counts the samples all ranks have seen: 128 per step here
    theirs = vs.step_lines(OPENCLIP_LINES, "openclip", 128)
    assert {k: v[0] for k, v in theirs.items()} == {1: 11.4, 2: 11.7, 3: 12.0, 64: 12.2}


def test_steady_runs_from_the_skipped_step_to_the_last() -> None:
    steps = vs.step_lines(OURS_LINES, "ours", 128)
    samples_per_s, cpu_ms = vs.steady(steps, 128, skip=2)
    assert samples_per_s == pytest.approx(2 * 128 / 0.8)
    assert cpu_ms == pytest.approx(1000 * 0.768 / 256)  # 3 ms of CPU per sample
    with pytest.raises(ValueError, match="step 9"):
        vs.steady(steps, 128, skip=9)


def test_measure_takes_start_up_at_the_line_after_step_1() -> None:
    m = vs.measure(vs.Launch(OURS_LINES, peak_rss=3 * 2**30), "ours", 128, skip=2)
    assert (m.startup_s, m.startup_cpu_s, m.peak_rss_mib) == (9.3, 8.5, 3072)
    with pytest.raises(ValueError, match="step 1"):
        vs.measure(vs.Launch(OURS_LINES[:2], 0), "ours", 128, skip=2)


def test_report_ends_with_the_ratios_and_their_verdicts() -> None:
    def m(speed, startup):
        return vs.Measured(startup, 9.0, speed, 3.0, 2000.0)

    # per-round ratios 1.2 and 1.3 (geomean 1.249); start-up 0.9 and 1.0 (geomean 0.949)
    results = {"ours": [m(1200, 4.5), m(1300, 5.0)], "openclip": [m(1000, 5.0), m(1000, 5.0)]}
    lines = vs.report(results).splitlines()
    assert lines[-1] == "  samples/s 1.25x (goal >= 1.15x: met)"
    assert lines[-2] == "  start-up 0.95x (goal <= 1.00x: met)"
    assert re.match(r"ours +med +1250\.0 +3\.00 +4\.75 ", lines[3])
    slow = {"ours": [m(1000, 6.0)], "openclip": [m(1000, 5.0)]}
    assert vs.report(slow).splitlines()[-2:] == [
        "  start-up 1.20x (goal <= 1.00x: NOT met)",
        "  samples/s 1.00x (goal >= 1.15x: NOT met)",
    ]


def test_tree_usage_sees_this_process() -> None:
    rss, cpu = vs.tree_usage(os.getpid())
    assert rss > 10 * 2**20 and cpu > 0


def test_openclip_model_config_has_the_tiny_preset_shape() -> None:
    from trainer.model import ModelConfig, TokenIds, build_clip_config

    config = build_clip_config(ModelConfig(preset="tiny"), TokenIds(1553, 0, 1, 1), 16)
    cfg = vs.openclip_model_config(config)
    assert cfg["embed_dim"] == 64 and cfg["quick_gelu"] is True
    assert cfg["vision_cfg"] == {
        "image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 16,
        "mlp_ratio": 4.0,
    }  # fmt: skip
    text = cfg["text_cfg"]
    assert (text["context_length"], text["vocab_size"], text["width"], text["heads"]) == (
        16, 1553, 64, 4,
    )  # fmt: skip
    # pooled at the first eos, as HF's CLIP text tower does with eos_token_id
    assert (text["pool_type"], text["eos_id"], text["pad_id"]) == ("eos", 1, 1)


def _args(**kw) -> Namespace:
    base = dict(nproc=2, per_rank=64, steps=64, workers=2, image_size=32, context_length=16,
                preset="tiny", ds_config="ds_configs/zero0.json")  # fmt: skip
    return Namespace(**{**base, **kw})


def test_openclip_command_is_the_task(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"{i:06d}.tar").touch()
    cmd = vs.openclip_command(_args(), Path("/venv/bin/python"), Path("/m"), tmp_path)
    assert cmd[:5] == ["/venv/bin/python", "-m", "torch.distributed.run", "--standalone",
                       "--nproc_per_node=2"]  # fmt: skip
    assert f"--train-data={tmp_path}/{{000000..000002}}.tar" in cmd
    for flag in ("--local-loss", "--gather-with-grad", "--precision=fp32", "--batch-size=64",
                 "--train-num-samples=8192", "--workers=2", "--log-every-n-steps=1"):  # fmt: skip
        assert flag in cmd
    # torchrun's parser takes --logs for its own --logs-specs and refuses the launch
    assert not any(a.startswith("--logs") for a in cmd)


def test_ours_command_sets_only_the_task_and_the_zero_stage(tmp_path: Path) -> None:
    cmd = vs.ours_command(_args(), tmp_path / "run", tmp_path / "train")
    overrides = cmd[cmd.index("trainer.train") + 1 :]
    assert {o.split("=")[0] for o in overrides} == {
        "run.dir", "data.train_shards", "data.image_size", "data.context_length",
        "model.preset", "train.steps", "train.global_batch_size", "deepspeed.config", "log.every",
    }  # fmt: skip
    assert "train.global_batch_size=128" in overrides
    shipped = vs.ours_command(_args(ds_config=""), tmp_path / "run", tmp_path / "train")
    assert not any(a.startswith("deepspeed.config") for a in shipped)


@pytest.fixture
def shims():
    """bench/openclip_shims/sitecustomize.py loaded under another name, with the import hook
    it installs taken out again (this process must stay unpatched)."""
    path = Path(vs.SHIMS) / "sitecustomize.py"
    before = list(sys.meta_path)
    spec = importlib.util.spec_from_file_location("openclip_shims_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.meta_path[:] = before
    return module


def test_ddp_shim_drops_cpu_device_ids_only(shims) -> None:
    import torch

    calls = []
    init = shims._ddp_init_without_cpu_devices(lambda self, m, ids, out, *a, **k: calls.append(ids))
    init(None, "model", device_ids=[torch.device("cpu")], output_device="cpu")
    init(None, "model", device_ids=["cpu"])
    init(None, "model", device_ids=[torch.device("cuda", 0)])
    assert calls == [None, None, [torch.device("cuda", 0)]]


def test_torchvision_libraries_are_refused_and_others_loaded(shims) -> None:
    loaded = []
    load = shims._refuse_torchvision_library(loaded.append)
    with pytest.raises(OSError, match="refused"):
        load("/venv/site-packages/torchvision/_C.so")
    load("/venv/site-packages/other/_C.so")
    assert loaded == ["/venv/site-packages/other/_C.so"]
    assert set(shims.HOOKS) == {
        "torchvision.extension", "torchvision._meta_registrations", "torch.nn.parallel.distributed",
    }  # fmt: skip
