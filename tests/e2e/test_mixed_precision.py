"""bf16 and fp16 training end to end on CPU: the real launcher, the debug config, 4 steps.

Only fp32 used to run anywhere. DeepSpeed runs both 16-bit modes on CPU, so these runs take the
same path a GPU run takes through our custom autograd functions and DeepSpeed's mixed-precision
optimizers (fp16 with its dynamic loss scale, bf16 with fp32 master weights). That the loss
math inside is fp32 is checked per step in tests/dist/test_mixed_precision_step.py.
"""

from __future__ import annotations

import math

import pytest

from tests.support.runs import losses, run_training


@pytest.mark.parametrize(
    ("precision", "zero", "chunks", "checkpointing"),
    [("bf16", 3, 1, True), ("fp16", 2, 2, False)],
)
def test_16_bit_run_trains(tmp_path, synthetic_dir, precision, zero, chunks, checkpointing) -> None:
    run = tmp_path / precision
    proc = run_training(run, synthetic_dir, [
        f"train.precision={precision}", f"deepspeed.config=ds_configs/zero{zero}.json",
        f"train.grad_cache_chunks={chunks}", "train.steps=4", "checkpoint.every=2",
        f"model.gradient_checkpointing={str(checkpointing).lower()}",
    ])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    curve = losses(run)
    assert [step for step, _ in curve] == [1, 2, 3, 4]
    assert all(math.isfinite(loss) and 0 < loss < 10 for _, loss in curve), curve


def test_zero3_with_gradient_checkpointing_gives_the_plain_curve(tmp_path, synthetic_dir) -> None:
    """ZeRO-3 replays its recorded parameter-fetch order every step; with the recompute of
    gradient checkpointing that order must stay the same (it did not: step 2 raised a ZeRO-3
    "tracing error"). The recompute changes no number: the same curve, fp32."""
    curves = {}
    for on in (False, True):
        run = tmp_path / f"ckpt_{on}"
        proc = run_training(run, synthetic_dir, [
            "deepspeed.config=ds_configs/zero3.json", "train.steps=4", "checkpoint.every=0",
            f"model.gradient_checkpointing={str(on).lower()}",
        ])  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        curves[on] = [loss for _, loss in losses(run)]
    assert len(curves[True]) == 4
    assert curves[True] == pytest.approx(curves[False], rel=1e-6)
