"""The whole run is exact, not only the loss: N ranks × B/N train the weights of 1 rank × B.

Same init, same data (the global sample order of data/stream.py does not depend on the world
size), fp32, the debug config for 5 optimizer steps; every run's final fp32 weights are compared
with one reference run (1 process, ZeRO-0, plain DisCo loss) by relative norm of the whole
state. Covered: 2 ranks at ZeRO-0, 2 and 3, 4 ranks at ZeRO-2, and at 2 ranks the tiled loss
and gradient caching with K = 2, which must all be the same optimisation.

Adam runs with eps = 1 (as in test_grad_cache_zero.py): in its default regime Adam divides each
gradient by its own magnitude, so parameters whose true gradient is exactly zero (attention key
biases) take lr-sized steps in the direction of fp32 rounding noise, which differs between any
two summation orders; with eps = 1 the update is ≈ lr·g and the comparison sees gradient
differences at their real size. A failure localises: only the multi-rank runs differ → the data
order or the gradient scaling across ranks; only one ZeRO stage → that stage's partitioning;
only tiled / K = 2 → that loss or the grad-cache step.
"""

from __future__ import annotations

import pytest
import torch

from tests.support.runs import run_training

COMMON = ["train.steps=5", "checkpoint.every=5", "optim.eps=1.0", "optim.lr=0.05"]
VARIANTS = {
    "2 ranks, ZeRO-0": (2, ["deepspeed.config=ds_configs/zero0.json"]),
    "2 ranks, ZeRO-2": (2, ["deepspeed.config=ds_configs/zero2.json"]),
    "2 ranks, ZeRO-3": (2, ["deepspeed.config=ds_configs/zero3.json"]),
    "4 ranks, ZeRO-2": (4, ["deepspeed.config=ds_configs/zero2.json"]),
    "2 ranks, tiled": (2, ["deepspeed.config=ds_configs/zero2.json", "loss.name=tiled",
                           "loss.tile_size=3"]),
    "2 ranks, grad cache K=2": (2, ["deepspeed.config=ds_configs/zero2.json",
                                    "train.grad_cache_chunks=2"]),
}  # fmt: skip


def _weights(run_dir) -> dict[str, torch.Tensor]:
    from trainer.interop.run_checkpoint import fp32_state_dict, resolve_checkpoint

    return fp32_state_dict(resolve_checkpoint(run_dir))


def _rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    diff = sum(((a[k] - b[k]) ** 2).sum() for k in b) ** 0.5
    return float(diff / sum((b[k] ** 2).sum() for k in b) ** 0.5)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, synthetic_dir):
    run = tmp_path_factory.mktemp("exact") / "reference"
    proc = run_training(run, synthetic_dir, [*COMMON, "deepspeed.config=ds_configs/zero0.json"], 1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _weights(run)


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_n_ranks_train_the_weights_of_one(tmp_path, synthetic_dir, reference, variant):
    world, overrides = VARIANTS[variant]
    proc = run_training(tmp_path / "run", synthetic_dir, [*COMMON, *overrides], world)
    assert proc.returncode == 0, proc.stderr[-3000:]
    weights = _weights(tmp_path / "run")
    assert weights.keys() == reference.keys()
    assert _rel(weights, reference) <= 1e-5, f"{variant}: rel {_rel(weights, reference):.2e}"
