"""The CPU-checkable parts of bench/gpu_bench.py: the FLOPs formula, the peak table, the one
table it prints, and its step / OOM handling on the tiny preset (the bench itself needs CUDA)."""

from __future__ import annotations

import math

import pytest
import torch

from bench import gpu_bench as gb
from trainer.model import ModelConfig, TokenIds, build_clip_config


def _vit_b32_towers():
    config = build_clip_config(ModelConfig(preset="vit_b32"), TokenIds(49408, 49406, 49407, 0), 77)
    return gb.vision_tower(config.vision_config), gb.text_tower(config.text_config, 77), config


def test_vit_b32_image_tower_flops_match_the_published_figure() -> None:
    # OpenCLIP's model profile lists ViT-B-32 at 4.41 image GFLOPs at 224 px, counting one
    # multiply-add as one FLOP; the bench counts it as two (8.82 GFLOPs forward).
    vision, _, _ = _vit_b32_towers()
    assert vision.tokens == 50  # 7×7 patches + CLS
    assert vision.forward_flops() / 2 == pytest.approx(4.41e9, rel=0.01)


def test_vit_b32_text_tower_flops_match_the_published_figure() -> None:
    _, text, _ = _vit_b32_towers()  # published: 2.96 G multiply-adds at 77 tokens
    assert text.forward_flops() / 2 == pytest.approx(2.96e9, rel=0.02)


def test_forward_flops_formula_by_hand() -> None:
    # L·(2·s·(4h² + 2hI) + 4·s²·h) + embed + 2·h·e
    tower = gb.Tower(layers=2, hidden=8, intermediate=32, tokens=5, proj_dim=4, embed_flops=100)
    per_layer = 2 * 5 * (4 * 64 + 2 * 8 * 32) + 4 * 25 * 8
    assert tower.forward_flops() == 2 * per_layer + 100 + 2 * 8 * 4


def test_train_flops_are_three_forwards_plus_the_loss() -> None:
    vision, text, config = _vit_b32_towers()
    b, batch, e = 256, 2048, config.projection_dim
    per_sample = vision.forward_flops() + text.forward_flops()
    assert gb.train_flops_per_step([vision, text], b, batch, e) == 3 * b * per_sample + (
        12 * b * batch * e
    )
    # 6·P·s + 12·L·s²·h per tower (the docstring's form), embeddings and projection aside
    layers = vision.layers * (4 * 768**2 + 2 * 768 * 3072)
    attention = 12 * vision.layers * vision.tokens**2 * 768
    rest = 3 * (vision.embed_flops + 2 * 768 * e)
    assert 3 * vision.forward_flops() == 6 * layers * vision.tokens + attention + rest


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H200", 989.0),
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA A100-SXM4-40GB", 312.0),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_peak_table(name, peak) -> None:
    assert gb.peak_bf16_tflops(name) == peak


def test_mfu() -> None:
    assert gb.mfu(989e12 * 0.5, 1.0, 989.0) == pytest.approx(0.5)
    assert gb.mfu(1e12, 1.0, None) is None
    assert gb.fmt(None, ".1%") == "n/a"
    assert gb.fmt(float("nan"), ".1f") == "n/a"
    assert gb.fmt(0.4567, ".1%") == "45.7%"


def test_format_table_aligns_columns() -> None:
    table = gb.format_table(["run", "x"], [["a", "1"], ["longer", "22.5"]])
    lines = table.splitlines()
    assert lines[0] == "run        x"
    assert lines[1] == "------  ----"
    assert lines[2] == "a          1"
    assert lines[3] == "longer  22.5"


@pytest.fixture(scope="module")
def tiny():
    model, config, eos = gb.build("tiny", torch.device("cpu"), context_length=16)
    optimizer = gb.MixedAdamW(model)
    batch = gb.host_batch(
        4, config.vision_config.image_size, 16, config.text_config.vocab_size, eos
    )
    return model, optimizer, batch


def test_mixed_precision_step_on_cpu(tiny) -> None:
    model, optimizer, batch = tiny
    assert next(model.parameters()).dtype == torch.bfloat16
    assert all(m.dtype == torch.float32 for _, m in optimizer.pairs)
    before = [p.detach().clone() for p in model.parameters()]
    result = gb.measure(model, optimizer, gb.Result("tiny", 4, 4, False), batch, steps=1, warmup=1)
    assert result.status == "ok" and not result.failed
    assert set(result.seconds) == set(gb.SEGMENTS) and result.step > 0
    assert all(math.isfinite(x) for x in result.losses) and len(result.losses) == 2
    moved = any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert moved
    # the bf16 weights are the fp32 masters, rounded
    for p, master in optimizer.pairs:
        assert torch.equal(p.detach(), master.detach().to(p.dtype))


def test_simulated_group_step_on_cpu(tiny) -> None:
    from trainer.losses.disco import SimulatedGroup

    model, optimizer, batch = tiny
    result = gb.Result("paper", 4, 32, True, kind="paper")
    gb.measure(model, optimizer, result, batch, steps=1, warmup=1,
               group=SimulatedGroup(rank=0, world=8), peak_from_start=True)  # fmt: skip
    assert result.status == "ok", result.note


def test_oom_is_reported_not_raised(tiny, monkeypatch) -> None:
    model, optimizer, batch = tiny

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(gb, "train_step", oom)
    paper = gb.measure(model, optimizer, gb.Result("p", 4, 32, True, kind="paper"), batch,
                       steps=1, warmup=1)  # fmt: skip
    assert (paper.status, paper.failed) == ("does not fit", True)
    planned_no_fit = gb.measure(model, optimizer, gb.Result("t", 4, 4, False), batch, steps=1,
                                warmup=1, oom_is_failure=False)  # fmt: skip
    assert (planned_no_fit.status, planned_no_fit.failed) == ("OOM", False)
    text = gb.report([paper, planned_no_fit], "NVIDIA H200", 989.0)
    assert text.count("\n---") == 1  # one table
    assert text.splitlines()[-1] == "gpu_bench: 1/2 runs ok; FAILED: p (does not fit)"


def test_main_without_cuda_prints_one_line(capsys, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gb.main([]) == 0
    assert capsys.readouterr().out == "gpu_bench: no CUDA device here; nothing to measure\n"
