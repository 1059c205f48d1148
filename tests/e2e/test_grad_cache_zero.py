"""Gradient caching under DeepSpeed: K chunks give the plain run's parameters (ZeRO-2 and 3).

Two ranks, 4 steps, dropout off (a plain step draws one dropout mask for all b rows, chunks draw
per chunk, so only dropout-free runs can be compared across K; dropout replay within a
grad-cache step is tested in tests/unit/test_grad_cache.py).

Adam runs with eps=1: in its default regime (eps ≪ |g|) Adam divides a gradient by its own
magnitude, so parameters whose true gradient is exactly zero (attention key biases: softmax is
shift-invariant) take lr-sized steps in the direction of fp32 rounding noise, which differs
between any two summation orders. With eps=1 the update is ≈ lr·g, linear in the gradient, so
the comparison sees gradient differences at their real size (plain Adam: ~1e-5 after 4 steps,
all of it on those zero-gradient biases).
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.support.runs import run_training
from trainer.checkpoint import complete_tags


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt = run_dir / "checkpoints"
    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=complete_tags(ckpt)[-1])


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_grad_cache_matches_plain_step(tmp_path, synthetic_dir, zero) -> None:
    common = [
        "train.steps=4", "checkpoint.every=0", "optim.eps=1.0", "optim.lr=0.5",
        f"deepspeed.config=ds_configs/zero{zero}.json",
    ]  # fmt: skip
    weights = {}
    for chunks in (1, 4):
        run_dir = tmp_path / f"k{chunks}"
        result = run_training(
            run_dir, synthetic_dir, [*common, f"train.grad_cache_chunks={chunks}"]
        )
        assert result.returncode == 0, result.stderr[-3000:]
        weights[chunks] = final_weights(run_dir)
    plain, cached = weights[1], weights[4]
    assert plain.keys() == cached.keys()
    worst = max((plain[k] - cached[k]).abs().max().item() for k in plain)
    moved = max(
        (plain[k] - final_weights_init(plain, k)).abs().max().item() for k in ["logit_scale"]
    )
    assert worst <= 1e-6, f"max |Δw| = {worst:.2e}"
    assert moved > 0  # training did change the weights, so equality is not trivial


def final_weights_init(weights, key):
    # logit_scale starts at ln(1/0.07) in every run (trainer/model.py).

    return torch.full_like(weights[key], math.log(1 / 0.07))
