"""Which ZeRO stage `disco-clip plan` recommends: the fastest one whose plan fits.

Lower stages communicate less and keep less bookkeeping per step, so they are tried in order:
stage 0 (plain data parallel: one gradient all-reduce per step) whenever the unsharded states
fit, else ZeRO-1 (optimizer state sharded, plus an all-gather of the updated weights), ZeRO-2
(gradients sharded too, the same collectives), ZeRO-3 (weights sharded as well: gathered
layer by layer in every forward and backward, and its small parameters re-gathered one by one
after every step). Measured with bench/step_bench.py (tiny preset, 2 gloo ranks × 64, fp32, the
shipped ds_configs), step time vs plain DDP over several runs on a shared 2-core machine:
ZeRO-0 0.96–1.04×, ZeRO-1 1.04–1.19×, ZeRO-2 1.01–1.15×, ZeRO-3 1.9–2.5× — that order. ZeRO-1
and ZeRO-2 are within noise of each other there; ZeRO-1 goes first as the one with less sharded
state to track.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from trainer.plan.planner import PlanSpec, fits, largest_batch

FASTEST_FIRST = (0, 1, 2, 3)


@dataclass(frozen=True)
class StageChoice:
    stage: int | None
    """The recommended ZeRO stage; None when no stage fits the batch."""
    batch: int
    """The global batch it was chosen for."""
    largest_at_zero3: int = 0
    """With no stage fitting: the largest global batch ZeRO-3 fits (0: not even N·K)."""


def recommend_stage(spec: PlanSpec) -> StageChoice:
    """The first stage of FASTEST_FIRST whose plan fits `spec` (its own `zero` is ignored)."""
    for stage in FASTEST_FIRST:
        if fits(replace(spec, zero=stage)):
            return StageChoice(stage, spec.batch)
    return StageChoice(None, spec.batch, largest_batch(replace(spec, zero=FASTEST_FIRST[-1])))


def recommendation_line(choice: StageChoice) -> str:
    """The report's one line about the stage."""
    if choice.stage is None:
        return (
            f"recommended ZeRO stage: none fits B={choice.batch}; ZeRO-3 fits up to "
            f"B={choice.largest_at_zero3}"
        )
    why = "the unsharded states fit" if choice.stage == 0 else "no lower stage fits"
    return (
        f"recommended ZeRO stage: {choice.stage} (the fastest that fits B={choice.batch}: "
        f"{why}; lower stages communicate less)"
    )
