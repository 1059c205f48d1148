"""bench/step_bench.py end to end (tiny settings: a smoke run, not a measurement), and the
DeepSpeed settings it led to train exactly as before.

ds_configs/zero2.json all-reduces its bucket in place (reduce_scatter false, trainer/engine.py
says why): on 2 gloo ranks, three steps with the shipped JSON give bit-identical weights to
three with the previous setting.
"""

from __future__ import annotations

import subprocess
import sys

import torch

from bench import step_bench as sb
from tests.support import runs
from tests.support.localdist import run_ranks

PREVIOUS = {2: {"zero_optimization.reduce_scatter": True}}  # zero2.json before step_bench


def test_bench_runs_and_prints_the_ratio_line_last() -> None:
    cmd = [sys.executable, "-m", "bench.step_bench", "--batch", "8", "--steps", "2",
           "--rounds", "1", "--warmup", "1"]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=runs.REPO, env=runs.test_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    for name in ("DDP", "ZeRO-0", "ZeRO-1", "ZeRO-2", "ZeRO-3"):
        assert any(line.startswith(name) for line in lines), name
    assert lines[-1].startswith("ratios vs DDP: ZeRO-0 ")
    assert lines[-1].endswith(("goal ZeRO-2 <= 1.15x: met", "goal ZeRO-2 <= 1.15x: NOT met"))


def _weights_after_steps(rank: int, world: int, steps: int) -> dict[str, list[torch.Tensor]]:
    sb.prepare_rank(rank, world)
    spec = sb.BenchSpec(batch=8)
    variants = [sb.VariantSpec(f"shipped {s}", s) for s in PREVIOUS]
    variants += [sb.VariantSpec(f"previous {s}", s, overrides) for s, overrides in PREVIOUS.items()]
    weights = {}
    for variant in variants:
        runner = sb.build_runner(spec, variant, rank)
        for _ in range(steps):
            sb.timed_step(runner)
        weights[variant.name] = [p.detach().clone() for p in runner.module.parameters()]
    return weights


def test_shipped_zero12_settings_train_bit_identically_to_the_previous_ones() -> None:
    weights = run_ranks(_weights_after_steps, 2, 3)[0]
    for stage in PREVIOUS:
        shipped, previous = weights[f"shipped {stage}"], weights[f"previous {stage}"]
        assert len(shipped) == len(previous) > 0
        assert all(torch.equal(a, b) for a, b in zip(shipped, previous, strict=True)), stage
