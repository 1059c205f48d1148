"""ms per training step: plain DDP against DeepSpeed ZeRO-0/1/2/3, same model, batch and AdamW.

    python -m bench.step_bench                         # tiny, 2 gloo ranks × 64, fp32
    python -m bench.step_bench --stages 0 2 --rounds 3 --steps 5
    python -m bench.step_bench --set zero_optimization.reduce_bucket_size=2e6

N gloo processes build every variant once, from the same seed: torch DistributedDataParallel
with torch.optim.AdamW (trainer.engine's parameter groups and hyper-parameters, the LR
schedule), and one DeepSpeed engine per ZeRO stage made the way trainer/build.py makes them
(ds_configs/zero{stage}.json through trainer.engine.build_deepspeed_config and initialize), so
the bench measures what a run gets. Each step is forward + DisCo loss (trainer.losses), backward
and the optimizer step, on fixed synthetic batches (no data loading), timed by phase on rank 0.
The trainer's own loss all-reduce (trainer/step.py) costs the same under every variant and is
left out, so it does not dilute the ratios.

The variants take turns, `--steps` timed steps each per round, in an order that rotates every
round (the machine may be shared: load that comes and goes hits every variant alike). A ratio
is the median over rounds of (variant's median in the round / DDP's median in the same round).
Beside the wall time, "cpu ms" is the process's CPU time per step (all its threads): it leaves
out waiting for a core or for the other rank, so on a loaded machine it shows the work itself.
The last line is the wall-time ratios and the goal: ZeRO-2 <= 1.15× DDP.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

GOAL = 1.15
GOAL_STAGE = 2
PHASES = ("fwd+loss", "backward", "step")
CPU = len(PHASES)  # a row's index of the step's CPU seconds, after the phases' wall seconds
DDP = "DDP"


@dataclass(frozen=True)
class VariantSpec:
    """One way to train the same model: plain DDP (stage None) or a DeepSpeed ZeRO stage,
    optionally with changes to its shipped JSON (dotted key -> value)."""

    name: str
    stage: int | None = None
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BenchSpec:
    preset: str = "tiny"
    batch: int = 64
    """Per-rank batch b."""
    world: int = 2
    steps: int = 5
    """Timed steps per variant per round."""
    rounds: int = 10
    warmup: int = 3
    """Untimed steps per variant before the first round (Adam state, ZeRO buffers)."""
    context_length: int = 16
    """The debug and demo configs' text length."""
    variants: tuple[VariantSpec, ...] = ()


@dataclass
class Runner:
    """A built variant: the three phases of one step, and the model they train."""

    forward: Callable[[], torch.Tensor]  # forward + loss on the fixed batch
    backward: Callable[[torch.Tensor], None]
    step: Callable[[], None]
    module: torch.nn.Module
    keep: Any = None  # ZeRO-3: the HfDeepSpeedConfig that must outlive the model


# One row per timed step: wall seconds per phase, then the process's CPU seconds for the whole
# step (all its threads, gloo's included). Plain lists, because run_ranks hands results back
# through torch.load(weights_only=True).
Row = tuple[float, float, float, float]
Rounds = list[list[Row]]


# ---- building the variants -----------------------------------------------------------------


def _model_parts(spec: BenchSpec):
    from data.config import DataConfig
    from data.tokenizer import load_tokenizer
    from trainer.build import token_ids
    from trainer.model import ModelConfig, build_clip_config

    tokens = token_ids(load_tokenizer(DataConfig().tokenizer))
    model_cfg = ModelConfig(preset=spec.preset)
    return model_cfg, build_clip_config(model_cfg, tokens, spec.context_length), tokens


def _batch(spec: BenchSpec, clip_config, tokens, rank: int) -> tuple[torch.Tensor, ...]:
    """A fixed per-rank batch: normalised-looking pixels, token ids ending in eos, full mask."""
    gen = torch.Generator().manual_seed(rank)
    size = clip_config.vision_config.image_size
    pixels = torch.randn(spec.batch, 3, size, size, generator=gen)
    low = max(tokens.bos, tokens.eos, tokens.pad) + 1  # no early eos: pooling at the last token
    ids = torch.randint(low, tokens.vocab_size, (spec.batch, spec.context_length), generator=gen)
    ids[:, -1] = tokens.eos
    return pixels, ids, torch.ones_like(ids)


def _set_dotted(config: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
        node = node.setdefault(name, {})
    node[leaf] = value


def _ds_config(stage: int, overrides: dict[str, Any], spec: BenchSpec):
    from trainer.engine import DeepSpeedConfig, OptimConfig, build_deepspeed_config

    template = DeepSpeedConfig(config=f"ds_configs/zero{stage}.json").load()
    for key, value in overrides.items():
        _set_dotted(template, key, value)
    return build_deepspeed_config(
        template,
        global_batch_size=spec.batch * spec.world,
        world_size=spec.world,
        precision="fp32",
        optim=OptimConfig(),
    )


def _build_ddp(model_cfg, clip_config, inputs, objective) -> Runner:
    from torch.nn.parallel import DistributedDataParallel
    from torch.optim.lr_scheduler import LambdaLR

    from trainer.engine import OptimConfig, WarmupCosine, parameter_groups
    from trainer.model import build_model

    torch.manual_seed(0)
    model = build_model(model_cfg, clip_config, with_bias=False, zero3=False)
    ddp = DistributedDataParallel(model)
    optim = OptimConfig()
    # What DeepSpeed's torch_adam constructs from the JSON: the same class, groups and values.
    optimizer = torch.optim.AdamW(
        parameter_groups(model, optim.weight_decay), lr=optim.lr, betas=optim.betas,
        eps=optim.eps, fused=True,
    )  # fmt: skip
    schedule = LambdaLR(optimizer, WarmupCosine(0, 10**6, 0.0))

    def step() -> None:
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)

    return Runner(lambda: objective(*ddp(*inputs)), lambda loss: loss.backward(), step, model)


def _build_deepspeed(
    spec: BenchSpec, variant: VariantSpec, model_cfg, clip_config, inputs, objective
) -> Runner:
    from trainer.engine import WarmupCosine, initialize
    from trainer.model import build_model

    assert variant.stage is not None
    ds_config = _ds_config(variant.stage, variant.overrides, spec)
    keep = None
    if variant.stage == 3:  # transformers must see it while the model is built and lives
        from transformers.integrations import HfDeepSpeedConfig

        keep = HfDeepSpeedConfig(ds_config)
    torch.manual_seed(0)
    model = build_model(model_cfg, clip_config, with_bias=False, zero3=variant.stage == 3)
    engine = initialize(model, ds_config, WarmupCosine(0, 10**6, 0.0))

    def forward() -> torch.Tensor:
        return objective(*engine(*inputs))

    return Runner(forward, engine.backward, engine.step, engine.module, keep)


def build_runner(spec: BenchSpec, variant: VariantSpec, rank: int) -> Runner:
    """One variant on this rank's fixed batch, from seed 0 (ZeRO-3 initialises in another order)."""
    from trainer.losses import make_objective
    from trainer.losses.registry import LossConfig

    model_cfg, clip_config, tokens = _model_parts(spec)
    inputs = _batch(spec, clip_config, tokens, rank)
    objective = make_objective(LossConfig(name="disco"))
    if variant.stage is None:
        return _build_ddp(model_cfg, clip_config, inputs, objective)
    return _build_deepspeed(spec, variant, model_cfg, clip_config, inputs, objective)


# ---- measuring -----------------------------------------------------------------------------


def timed_step(runner: Runner) -> Row:
    cpu = time.process_time()
    t0 = time.perf_counter()
    loss = runner.forward()
    t1 = time.perf_counter()
    runner.backward(loss)
    t2 = time.perf_counter()
    runner.step()
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2, time.process_time() - cpu


def _quiet_deepspeed() -> None:
    """DeepSpeed logs every engine's configuration at INFO (pages per variant), and its gloo
    collectives warn of torch deprecations at every call."""
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)


def prepare_rank(rank: int, world: int) -> None:
    """In a run_ranks process: what a launcher and trainer.dist would have set up for DeepSpeed."""
    import deepspeed

    from trainer import cpu_quirks

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    cpu_quirks.patch_deepspeed_for_cpu()
    _quiet_deepspeed()
    # DeepSpeed's comm layer adopts run_ranks' process group now, as at the trainer's start-up:
    # zero.Init (ZeRO-3 construction) reads the world size from it.
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)


def measure_rank(rank: int, world: int, spec: BenchSpec) -> dict[str, Rounds]:
    """Build every variant, warm each up, then alternate them round by round (run_ranks)."""
    prepare_rank(rank, world)
    runners = {v.name: build_runner(spec, v, rank) for v in spec.variants}
    for runner in runners.values():
        for _ in range(spec.warmup):
            timed_step(runner)
    timings: dict[str, Rounds] = {name: [] for name in runners}
    names = list(runners)
    for r in range(spec.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            timings[name].append([timed_step(runners[name]) for _ in range(spec.steps)])
    return timings


# ---- reporting -----------------------------------------------------------------------------


def _median_ms(rows: list[Row], column: int | None = None) -> float:
    """Median of one column, or (None) of the wall total."""
    values = [sum(row[:CPU]) if column is None else row[column] for row in rows]
    return 1e3 * statistics.median(values)


def ratio_vs_ddp(timings: dict[str, Rounds], name: str, column: int | None = None) -> float:
    """Median over rounds of (name's median step / DDP's median step in the same round)."""
    pairs = zip(timings[name], timings[DDP], strict=True)
    return statistics.median(
        _median_ms(mine, column) / _median_ms(ddp, column) for mine, ddp in pairs
    )


def stage_name(stage: int) -> str:
    return f"ZeRO-{stage}"


def format_report(spec: BenchSpec, timings: dict[str, Rounds], load: float | None = None) -> str:
    """The table, then the ratio line; `load`: the machine's 1-minute load average at the end
    (how shared the cores were: wall ratios grow with it, CPU ratios hardly)."""
    loaded = f"; load average {load:.1f} on {os.cpu_count()} CPUs" if load is not None else ""
    lines = [
        f"{spec.preset} CLIP, fp32, N={spec.world} gloo ranks × b={spec.batch}, context "
        f"{spec.context_length}, DisCo loss, AdamW; rank 0, median ms/step over {spec.rounds} "
        f"rounds × {spec.steps} steps after {spec.warmup} warm-up{loaded}",
        f"{'variant':<14}"
        + "".join(f"{p:>10}" for p in PHASES)
        + f"{'total':>10}{'vs DDP':>9}{'cpu ms':>10}{'vs DDP':>9}",
    ]
    for name, rounds in timings.items():
        rows = [row for rnd in rounds for row in rnd]
        phases = "".join(f"{_median_ms(rows, i):>10.1f}" for i in range(len(PHASES)))
        lines.append(
            f"{name:<14}{phases}{_median_ms(rows):>10.1f}{ratio_vs_ddp(timings, name):>8.2f}x"
            f"{_median_ms(rows, CPU):>10.1f}{ratio_vs_ddp(timings, name, CPU):>8.2f}x"
        )
    lines.append(_ratio_line(timings))
    return "\n".join(lines)


def _ratio_line(timings: dict[str, Rounds]) -> str:
    ratios = {name: ratio_vs_ddp(timings, name) for name in timings if name != DDP}
    listed = ", ".join(f"{name} {r:.2f}x" for name, r in ratios.items())
    goal = stage_name(GOAL_STAGE)
    verdict = "not measured"
    if goal in ratios:
        verdict = "met" if ratios[goal] <= GOAL else "NOT met"
    return f"ratios vs DDP: {listed}; goal {goal} <= {GOAL}x: {verdict}"


def _parse_set(items: list[str]) -> dict[str, Any]:
    """KEY=VALUE pairs; VALUE read as JSON where it parses (numbers, true/false), else text."""
    overrides = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        # 2e6 parses as a float; DeepSpeed's sizes are element counts.
        overrides[key] = int(value) if isinstance(value, float) and value.is_integer() else value
    return overrides


def parse_args(argv: list[str] | None = None) -> BenchSpec:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", help="trainer.model preset (tiny, demo, ...)")
    parser.add_argument("--batch", type=int, default=64, help="per-rank batch b")
    parser.add_argument("--world", type=int, default=2, help="gloo processes N")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant per round")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--context-length", type=int, default=16)
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3], choices=range(4))
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change every stage's JSON, e.g. zero_optimization.reduce_bucket_size=2e6",
    )
    args = parser.parse_args(argv)
    overrides = _parse_set(args.set)
    variants = [VariantSpec(DDP)] + [
        VariantSpec(stage_name(s), s, overrides) for s in sorted(set(args.stages))
    ]
    return BenchSpec(
        preset=args.preset,
        batch=args.batch,
        world=args.world,
        steps=args.steps,
        rounds=args.rounds,
        warmup=args.warmup,
        context_length=args.context_length,
        variants=tuple(variants),
    )


def run(spec: BenchSpec) -> dict[str, Rounds]:
    from tests.support import run_ranks

    return run_ranks(measure_rank, spec.world, spec)[0]


def main(argv: list[str] | None = None) -> None:
    spec = parse_args(argv)
    timings = run(spec)
    print(format_report(spec, timings, os.getloadavg()[0]))


if __name__ == "__main__":
    main()
