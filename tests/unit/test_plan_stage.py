"""`disco-clip plan` recommends the fastest ZeRO stage that fits (trainer/plan/stage.py): stage 0
whenever the unsharded states fit, else the lowest stage that does, whatever --zero says.

The ViT-L/14 batches sit between the largest batches each stage fits at 8 × 16 GiB, bf16,
activation checkpointing (from the planner: ZeRO-0 2392, ZeRO-1 3088, ZeRO-2 3296, ZeRO-3 3784).
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from trainer import cli
from trainer.plan.planner import PlanSpec, fits
from trainer.plan.stage import recommend_stage

VIT_L_SMALL_GPUS = PlanSpec(
    model="vit_l14", gpus=8, gpu_memory=16 * 2**30, precision="bf16", checkpointing=True
)


@pytest.mark.parametrize("zero", [0, 2, 3])
def test_small_model_on_8_gpus_gets_stage_0_whatever_zero_says(zero: int) -> None:
    spec = PlanSpec(model="tiny", gpus=8, batch=32768, zero=zero)
    assert recommend_stage(spec).stage == 0


@pytest.mark.parametrize(("batch", "stage"), [(2048, 0), (3000, 1), (3200, 2), (3600, 3)])
def test_vit_l_on_small_gpus_gets_the_lowest_stage_that_fits(batch: int, stage: int) -> None:
    spec = replace(VIT_L_SMALL_GPUS, batch=batch)
    assert recommend_stage(spec).stage == stage
    assert fits(replace(spec, zero=stage))
    assert not any(fits(replace(spec, zero=lower)) for lower in range(stage))


def test_no_stage_fits_says_so_with_zero3s_largest_batch() -> None:
    choice = recommend_stage(replace(VIT_L_SMALL_GPUS, batch=4096))
    assert choice.stage is None
    assert choice.largest_at_zero3 == 3784


def test_cli_prints_the_recommendation_as_one_line(capsys) -> None:
    argv = ["plan", "--model", "vit_l14", "--gpus", "8", "--gpu-memory", "16GB"]
    assert cli.main([*argv, "--batch", "3200", "--grad-checkpointing", "--zero", "3"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "recommended ZeRO stage" in ln]
    assert len(lines) == 1
    assert lines[0].startswith("recommended ZeRO stage: 2 (the fastest that fits B=3200")
