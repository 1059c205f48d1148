"""The memory planner (trainer/plan/planner.py) against measured peak memory, tiny model, one table.

    python -m bench.plan_vs_measured            # the default configurations, ~2 min
    python -m bench.plan_vs_measured --quick    # three configurations

For each configuration (loss, ZeRO stage, global batch B, gradient-cache chunks K) two gloo
processes build the tiny CLIP preset and a DeepSpeed engine the way trainer/build.py does
(trainer.engine.build_deepspeed_config + initialize), take one warm-up step (so Adam state
exists), then one measured step with trainer.step.train_step. Measured, on rank 0:

- states: live tensor bytes before the measured step (parameters, optimizer state, fp32
  master/partitions, ZeRO buffers), found by walking every live torch tensor and counting
  each storage once;
- step: the peak of live tensor bytes above that during the step (the CPU allocator's events
  replayed, as tests/support/memory.py does): activations, loss, gradients, buckets;
- at loss: what is live above the states when the loss is called (planned: gradients +
  buffers + `Breakdown.live_during_loss`);
- loss: the loss's own peak, from its call to the end of its backward (both feature gradients
  made, neither tower's backward begun), above what was live at its call: `loss_bytes`
  checked inside a real step. With the total, the two checked columns.

Collectives. The planner models NCCL, whose collectives allocate no tensors. gloo's
all-gather and reduce-scatter copy their input into tensors of their own, which the CPU
profiler counts (one B×d per call in the losses); so the losses' gathers and reduce-scatters
run through `bench.loss_bench.nccl_like_collectives` (an in-place all_reduce, which allocates
nothing on gloo), in the warm-up and the measured step alike. DeepSpeed's own collectives stay
gloo's; they move at most the tiny model's 1.2 MiB of fp32 parameters or gradients, so any copy
gloo makes of them is under 1% of a step.

Not counted: the CUDA context, allocator fragmentation, NCCL's own buffers, Python objects;
the planner's `usable_fraction` stands for those on a GPU. The tiny preset runs at image_size
32 (4×4 patches of 8 → 17 tokens) and the debug config's context length 16, in fp32.

What the table shows about the planner (its gaps, not the bench's; B = 2048-4096 here):

- its step is the larger of the loss phase and the activations alone; it has no phase for
  the towers' backward. There, in the text tower's MLPs (QuickGELU, x·sigmoid(1.702x)), the
  backward makes about two (b, 16, 256) fp32 temporaries while nearly every activation is
  still live: about 30 KiB a sample. Where the loss needs less (tiled), the step peaks there
  and the total is under-planned by the difference (about −7%), while the loss matches;
- "at loss" is planned high: ZeRO-1/2's buckets and the gradients do not exist yet when the
  loss runs, and under gradient caching only the uint8 pixels are live then (each chunk's
  normalised copy is made and dropped in its encode), not the whole batch's normalisation;
- disco's loss is planned at its backward (2·b·B + 4·B·d + 2·b·d); its forward holds
  2·b·B + 2·B·d + the cross-entropy of one row chunk, (b/8)·B (trainer/losses/disco.py),
  which is more once (b/8)·B > 2·B·d + 2·b·d, as at B = 4096 here (−1.5%).
"""

from __future__ import annotations

import argparse
import bisect
import gc
import time
import warnings
from dataclasses import dataclass

import torch
from torch.profiler import ProfilerActivity, profile, record_function

# The ZeRO-2/3 gradient buckets default to 5e8 elements (GBs) whatever the model size; the
# bench shrinks them so the activations and the loss are what is measured. The planner is
# given the same value.
BENCH_BUCKET = 2_000_000
TOLERANCE = 0.15  # |plan / measured − 1| allowed, for the total and for the loss
# Profiler markers that bound the loss: its call, and the end of its backward (per feature).
LOSS_START, FEATURE_GRAD = "plan_vs_measured.loss_start", "plan_vs_measured.feature_grad"


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


def _mark(name: str) -> None:
    """An empty profiler range: a timestamp on the same clock as the allocator's events."""
    with record_function(name):
        pass


def mark_loss_phase(objective):
    """`objective`, marking the loss phase: its call, then the end of its backward.

    The end is marked from an identity view of each feature, not the feature itself: a hook on
    a tensor runs when its grad_fn does, and the autograd engine runs a whole tower's backward
    before reaching the other tower's output node. The engine runs the ready node created last
    first, so the views' nodes run right after the loss's, before both towers'. The scale
    passes through a view made before theirs, so its gradient lands after the mark, and with
    it DeepSpeed's first gradient hook, which under ZeRO-2 allocates the buckets there (the
    planner's `buffers`, not the loss's). Views share their tensor's storage: no memory.
    """

    def run(image, text, scale, bias):
        _mark(LOSS_START)
        scale = scale.view_as(scale)
        image, text = image.view_as(image), text.view_as(text)
        for features in (image, text):
            features.register_hook(lambda grad: _mark(FEATURE_GRAD))
        return objective(image, text, scale, bias)

    return run


def step_peaks(step) -> tuple[int, int, int]:
    """Live tensor bytes above those live when `step` starts: (the step's peak, what is live
    when the loss is called, the peak from then to the end of the loss's backward)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = list(prof.profiler.kineto_results.events())
    start = min(e.start_ns() for e in events if e.name() == LOSS_START)
    end = max(e.end_ns() for e in events if e.name() == FEATURE_GRAD)
    times, lives, live = [], [], 0
    for t, nbytes in sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"):
        live += nbytes
        times.append(t)
        lives.append(live)
    first, last = bisect.bisect_left(times, start), bisect.bisect_right(times, end)
    at_loss = lives[first - 1] if first else 0  # after the last event before the loss's call
    return max(lives, default=0), at_loss, max([at_loss, *lives[first:last]])


def measure_rank(rank: int, world: int, cases: list[BenchCase], ctx: int) -> list[dict]:
    """One engine per ZeRO stage (in order), each case's step measured on it; rank's figures.

    All stages share one launch because process start-up (imports) dominates the bench time.
    """
    import os

    from bench.loss_bench import nccl_like_collectives
    from trainer import cpu_quirks
    from trainer.losses import make_objective
    from trainer.losses.registry import LossConfig
    from trainer.step import train_step

    # run_ranks starts the processes itself: give DeepSpeed the variables a launcher would.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    cpu_quirks.patch_deepspeed_for_cpu()
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
            objective = mark_loss_phase(make_objective(LossConfig(name=case.loss)))

            def step(engine=engine, batch=batch, objective=objective, chunks=case.chunks):
                # The planner models NCCL: without this, gloo's copies of the losses'
                # collective inputs would be measured too (see the module doc).
                with nccl_like_collectives():
                    train_step(engine, batch, objective, chunks=chunks, dtype=torch.float32)

            step()  # warm-up: optimizer state and ZeRO buffers exist afterwards
            inputs = _input_bytes(batch)
            states = live_tensor_bytes() - baseline - inputs
            start = time.perf_counter()
            # The uint8 batch is live before the step; it belongs with the activations, as in
            # the planner (input_bytes: the uint8 pixels + their normalisation, which the conv
            # saves; the normalised copy is made inside the step, so the peak counts it).
            peak, at_loss, loss_peak = step_peaks(step)
            seconds = time.perf_counter() - start
            results[case] = {
                "states": states,
                "step": peak + inputs,
                "at_loss": at_loss + inputs,
                "loss": loss_peak - at_loss,
                "seconds": seconds,
            }
            del batch, step
        del engine, hf_keep
        gc.collect()
    return [results[c] for c in cases]


def predict(case: BenchCase, world: int, ctx: int, vocab: int) -> dict[str, int]:
    """The bytes the planner predicts for `case`, split like the measurement."""
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
    model = br.parameters + br.gradients + br.optimizer + br.buffers
    return {
        "states": states,
        "step": br.total - states,
        "at_loss": model + br.live_during_loss - states,
        "loss": br.loss,
    }


def _error(planned: int, measured: int) -> float:
    return planned / measured - 1


def _row(label: str, pred: dict[str, int], meas: dict) -> str:
    mib = 2**20
    loss_err = _error(pred["loss"], meas["loss"])
    total_p, total_m = pred["states"] + pred["step"], meas["states"] + meas["step"]
    err = _error(total_p, total_m)
    cells = [f"{label:<22}"]
    for key in ("states", "step", "at_loss", "loss"):
        cells.append(f"{pred[key] / mib:>9.1f}{meas[key] / mib:>9.1f}")
    cells.append(f"{loss_err:>+8.1%}{total_p / mib:>9.1f}{total_m / mib:>9.1f}{err:>+8.1%}")
    verdict = "ok" if max(abs(err), abs(loss_err)) <= TOLERANCE else "MISS"
    return "".join(cells) + f"  {verdict}"


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
        f"tiny CLIP, fp32, N={args.world} gloo ranks (the losses' collectives NCCL-like), "
        f"image 32, context {args.context_length}, ZeRO buckets {BENCH_BUCKET:.0e} elements; "
        "rank 0; MiB of live tensor bytes"
    )
    heads = ("states", "step", "at loss", "loss")
    print(
        f"{'config':<22}" + "".join(f"{h:>18}" for h in heads) + f"{'error':>8}{'total':>18}"
        f"{'error':>8}\n{'':<22}" + f"{'plan':>9}{'meas':>9}" * 4 + f"{'':>8}{'plan':>9}{'meas':>9}"
    )
    totals = losses = 0
    for case, meas in zip(cases, measured, strict=True):
        pred = predict(case, args.world, args.context_length, vocab)
        print(_row(case.label, pred, meas))
        losses += abs(_error(pred["loss"], meas["loss"])) <= TOLERANCE
        totals += (
            abs(_error(pred["states"] + pred["step"], meas["states"] + meas["step"])) <= TOLERANCE
        )
    print(
        f"{time.perf_counter() - start:.0f} s. states: live before the step; step: peak above; "
        "at loss: live at the loss's call; loss: its peak above that, to its backward's end"
    )
    print(
        f"within ±{TOLERANCE:.0%} of the measured: loss {losses}/{len(cases)}, "
        f"total {totals}/{len(cases)}"
    )


if __name__ == "__main__":
    main()
