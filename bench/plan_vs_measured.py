"""The memory planner (trainer/plan/planner.py) against measured peak memory, tiny model, one table.

    python -m bench.plan_vs_measured            # the default configurations, ~1-2 min
    python -m bench.plan_vs_measured --quick    # three configurations

For each configuration (loss, ZeRO stage, global batch B, gradient-cache chunks K) two gloo
processes build the tiny CLIP preset and a DeepSpeed engine the way trainer/build.py does
(trainer.engine.build_deepspeed_config + initialize), take one warm-up step (so Adam state
exists), then one measured step with trainer.step.train_step. Measured, on rank 0:

- states: live tensor bytes before the measured step (parameters, optimizer state, fp32
  master/partitions, ZeRO buffers), found by walking every live torch tensor and counting
  each storage once;
- step: the peak of live tensor bytes above that during the step (tests/support/memory.py replays
  the CPU allocator's events): activations, loss, gradients, communication buckets.

The CPU profiler counts tensor bytes only: no CUDA context, no allocator fragmentation, no
gloo-internal buffers, no Python objects; the planner's `usable_fraction` is what stands for
those on a GPU. The tiny preset runs at image_size 32 (4×4 patches of 8 → 17 tokens) and the
debug config's context length 16, in fp32.
"""

from __future__ import annotations

import argparse
import gc
import time
import warnings
from dataclasses import dataclass

import torch

# The ZeRO-2/3 gradient buckets default to 5e8 elements (GBs) whatever the model size; the
# bench shrinks them so the activations and the loss are what is measured. The planner is
# given the same value.
BENCH_BUCKET = 2_000_000


@dataclass(frozen=True)
class BenchCase:
    loss: str
    stage: int
    batch: int
    chunks: int = 1

    @property
    def label(self) -> str:
        gc_tag = f" K={self.chunks}" if self.chunks > 1 else ""
        return f"{self.loss:<6} z{self.stage} B={self.batch}{gc_tag}"


DEFAULT_CASES = (
    BenchCase("naive", 0, 2048),
    BenchCase("disco", 0, 2048),
    BenchCase("tiled", 0, 2048),
    BenchCase("naive", 1, 4096),
    BenchCase("disco", 1, 4096),
    BenchCase("disco", 2, 4096),
    BenchCase("tiled", 2, 4096),
    BenchCase("disco", 2, 4096, chunks=4),
    BenchCase("disco", 3, 2048),
    BenchCase("naive", 3, 2048),
)
QUICK_CASES = (DEFAULT_CASES[0], DEFAULT_CASES[5], DEFAULT_CASES[8])


def live_tensor_bytes() -> int:
    """Bytes of every live CPU tensor storage reachable from Python, each storage once."""
    gc.collect()
    seen: dict[int, int] = {}
    with warnings.catch_warnings():  # isinstance on some library proxies warns; irrelevant
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and not obj.is_meta:
                storage = obj.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
    seen.pop(0, None)  # empty tensors share the null pointer
    return sum(seen.values())


def _batch(b: int, context_length: int, image_size: int, vocab: int, eos: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab - 2, (b, context_length), generator=gen)
    ids[:, -1] = eos  # the text tower pools at the first eos
    return {
        # uint8, as the loader hands pixels over (train_step normalises them)
        "pixel_values": torch.randint(
            0, 256, (b, 3, image_size, image_size), dtype=torch.uint8, generator=gen
        ),
        "input_ids": ids,
        "attention_mask": torch.ones(b, context_length, dtype=torch.long),
    }


def _ds_template(stage: int) -> dict:
    from trainer.engine import DeepSpeedConfig

    template = DeepSpeedConfig(config=f"ds_configs/zero{stage}.json").load()
    zero = template["zero_optimization"]
    for key in ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size"):
        if key in zero:
            zero[key] = BENCH_BUCKET
    return template


def _input_bytes(batch: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in batch.values())


def _build_engine(stage: int, world: int, batch: int, ctx: int):
    """Tiny model + DeepSpeed engine as trainer/build.py makes them (fp32, bench buckets)."""
    from data.config import DataConfig
    from data.tokenizer import load_tokenizer
    from trainer.build import token_ids
    from trainer.engine import OptimConfig, WarmupCosine, build_deepspeed_config, initialize
    from trainer.model import ModelConfig, build_clip_config, build_model

    tokens = token_ids(load_tokenizer(DataConfig().tokenizer))
    ds_config = build_deepspeed_config(
        _ds_template(stage),
        global_batch_size=batch,
        world_size=world,
        precision="fp32",
        optim=OptimConfig(),
    )
    hf_keep = None
    if stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        hf_keep = HfDeepSpeedConfig(ds_config)  # must outlive the model (ZeRO-3 construction)
    torch.manual_seed(0)
    model_cfg = ModelConfig(preset="tiny")
    clip_config = build_clip_config(model_cfg, tokens, ctx)
    model = build_model(model_cfg, clip_config, with_bias=False, zero3=stage == 3)
    engine = initialize(model, ds_config, WarmupCosine(0, 10, 0.0))
    return engine, clip_config, tokens, hf_keep


def measure_rank(rank: int, world: int, cases: list[BenchCase], ctx: int) -> list[dict]:
    """One engine per ZeRO stage (in order), each case's step measured on it; rank's figures.

    All stages share one launch because process start-up (imports) dominates the bench time.
    """
    import os

    from tests.support import peak_tensor_bytes
    from trainer import cpu_quirks
    from trainer.losses import make_objective
    from trainer.losses.registry import LossConfig
    from trainer.step import train_step

    # run_ranks starts the processes itself: give DeepSpeed the variables a launcher would.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    cpu_quirks.skip_deepspeed_shm_build()
    results: dict[BenchCase, dict] = {}
    for stage in sorted({c.stage for c in cases}):
        baseline = live_tensor_bytes()  # whatever earlier stages left behind is not counted
        stage_cases = [c for c in cases if c.stage == stage]
        engine, clip_config, tokens, hf_keep = _build_engine(
            stage, world, stage_cases[0].batch, ctx
        )
        image_size = clip_config.vision_config.image_size
        for case in stage_cases:
            batch = _batch(
                case.batch // world, ctx, image_size, tokens.vocab_size, tokens.eos, rank
            )
            objective = make_objective(LossConfig(name=case.loss))

            def step(engine=engine, batch=batch, objective=objective, chunks=case.chunks):
                train_step(engine, batch, objective, chunks=chunks, dtype=torch.float32)

            step()  # warm-up: optimizer state and ZeRO buffers exist afterwards
            inputs = _input_bytes(batch)
            states = live_tensor_bytes() - baseline - inputs
            start = time.perf_counter()
            # The uint8 batch is live before the step; it belongs with the activations, as in
            # the planner (input_bytes: the uint8 pixels + their normalisation, which the conv
            # saves; the normalised copy is made inside the step, so the peak counts it).
            peak = peak_tensor_bytes(step) + inputs
            seconds = time.perf_counter() - start
            results[case] = {"states": states, "step": peak, "seconds": seconds}
            del batch, step
        del engine, hf_keep
        gc.collect()
    return [results[c] for c in cases]


def predict(case: BenchCase, world: int, ctx: int, vocab: int) -> tuple[int, int]:
    """(states, step) bytes the planner predicts for `case`, split like the measurement."""
    from trainer.plan.planner import PlanSpec, plan

    spec = PlanSpec(
        model="tiny",
        gpus=world,
        batch=case.batch,
        zero=case.stage,
        loss=case.loss,
        precision="fp32",
        grad_cache=case.chunks,
        context_length=ctx,
        vocab_size=vocab,
        reduce_bucket=BENCH_BUCKET,
    )
    br = plan(spec)
    # ZeRO-3 allocates its bucket at initialisation; ZeRO-1/2 allocate theirs in each step.
    persistent_buffers = br.buffers if case.stage == 3 else 0
    states = br.parameters + br.optimizer + persistent_buffers
    return states, br.total - states


def _row(label: str, pred: tuple[int, int], meas: dict) -> str:
    mib = 2**20
    total_p, total_m = sum(pred), meas["states"] + meas["step"]
    err = total_p / total_m - 1
    return (
        f"{label:<22}{pred[0] / mib:>9.1f}{meas['states'] / mib:>9.1f}"
        f"{pred[1] / mib:>10.1f}{meas['step'] / mib:>10.1f}"
        f"{total_p / mib:>10.1f}{total_m / mib:>10.1f}{err:>+8.1%}  {'ok' if abs(err) <= 0.15 else 'MISS'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="three configurations only")
    parser.add_argument("--world", type=int, default=2, help="gloo processes")
    parser.add_argument("--context-length", type=int, default=16, help="debug config's 16")
    args = parser.parse_args()

    from data.config import DataConfig
    from data.tokenizer import load_tokenizer
    from tests.support import run_ranks

    cases = list(QUICK_CASES if args.quick else DEFAULT_CASES)
    vocab = len(load_tokenizer(DataConfig().tokenizer))
    start = time.perf_counter()
    measured = run_ranks(measure_rank, args.world, cases, args.context_length)[0]
    print(
        f"tiny CLIP, fp32, N={args.world} gloo ranks, image 32, context {args.context_length}, "
        f"ZeRO buckets {BENCH_BUCKET:.0e} elements; rank 0; MiB of live tensor bytes"
    )
    print(
        f"{'config':<22}{'states':>9}{'':>9}{'step':>10}{'':>10}{'total':>10}{'':>10}"
        f"{'error':>8}\n{'':<22}{'plan':>9}{'meas':>9}{'plan':>10}{'meas':>10}"
        f"{'plan':>10}{'meas':>10}"
    )
    hits = 0
    for case, meas in zip(cases, measured, strict=True):
        pred = predict(case, args.world, args.context_length, vocab)
        print(_row(case.label, pred, meas))
        hits += abs(sum(pred) / (meas["states"] + meas["step"]) - 1) <= 0.15
    print(
        f"{hits}/{len(cases)} within ±15% of the measured total; "
        f"{time.perf_counter() - start:.0f} s (states: live before the step; step: peak above)"
    )


if __name__ == "__main__":
    main()
