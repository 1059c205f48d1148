"""Exact resume: interrupted at some step k and resumed, a run's loss curve is bit-identical
to an uninterrupted run's (fp32, CPU, 2 gloo ranks), at ZeRO-2 and ZeRO-3.

The interruption is real: SIGUSR1 to the launcher and both ranks mid-run (the preemption path),
which must checkpoint at the next step boundary and exit 75; then `checkpoint.resume=auto`.
A mismatch localises to what is restored: model/optimizer (DeepSpeed), LR schedule, data
position (loader state) or RNG (dropout is on here so RNG state matters).
"""

from __future__ import annotations

import pytest

from tests.support.runs import losses, run_training, run_until_signal
from trainer.checkpoint import complete_tags

STEPS = 12
COMMON = [
    f"train.steps={STEPS}",
    "checkpoint.every=0",
    "model.attention_dropout=0.1",
    "data.workers=1",
]


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_interrupted_run_resumes_bit_identically(tmp_path, synthetic_dir, zero):
    common = [*COMMON, f"deepspeed.config=ds_configs/zero{zero}.json"]
    reference = run_training(tmp_path / "full", synthetic_dir, common)
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = losses(tmp_path / "full")
    assert [s for s, _ in expected] == list(range(1, STEPS + 1))

    run_dir = tmp_path / "interrupted"
    code, out = run_until_signal(run_dir, synthetic_dir, common, after_steps=3)
    # Every rank checkpoints and exits 75 ("preempted, resume me"); torchrun reports that as a
    # child failure (exit 1) naming the first rank's exit code.
    assert code != 0 and "exitcode  : 75" in out, out[-3000:]
    assert out.count("stop requested: checkpoint at step") == 2, out[-3000:]
    stopped_at = int(complete_tags(run_dir / "checkpoints")[-1].split("_")[1])
    assert 3 <= stopped_at < STEPS

    resumed = run_training(run_dir, synthetic_dir, [*common, "checkpoint.resume=auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert losses(run_dir) == expected  # exact float equality, every step
