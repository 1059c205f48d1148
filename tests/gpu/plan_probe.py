"""Measure one ViT-B/32 bf16 training step on cuda:0 and write it beside the planner's prediction.

    python -m tests.gpu.plan_probe --zero 2 --batch 256 [--checkpointing] --out RESULT.json

Run by tests/gpu/test_gpu_plan.py in its own process (one rank, world size 1, NCCL), the way
bench/plan_vs_measured.py measures on CPU: the model and DeepSpeed engine are built as
trainer/build.py builds them (trainer.engine.build_deepspeed_config + initialize, the shipped
ds_configs JSON, so ZeRO's real buckets), one warm-up step with trainer.step.train_step (Adam
state exists afterwards), then one measured step. Measured: `torch.cuda.memory_allocated()`
before the measured step (states) and `torch.cuda.max_memory_allocated()` during it (peak,
absolute: the planner's total is absolute too). The batch is a loader-like one on the host
(uint8 pixels, int64 ids, a full mask); its device copies are part of the peak, as in the plan.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import torch


def loader_like_batch(b: int, image_size: int, context_length: int, eos: int, vocab: int):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab - 2, (b, context_length), generator=gen)
    ids[:, -1] = eos  # the text tower pools at the first eos
    pixels = torch.randint(0, 256, (b, 3, image_size, image_size), generator=gen, dtype=torch.uint8)
    batch = {"pixel_values": pixels, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return {k: v.pin_memory() for k, v in batch.items()}


def measure(zero: int, b: int, checkpointing: bool, context_length: int) -> dict:
    from trainer.dist import DistConfig, free_port, init_distributed, read_dist_info
    from trainer.engine import (
        DeepSpeedConfig,
        OptimConfig,
        WarmupCosine,
        build_deepspeed_config,
        initialize,
    )
    from trainer.losses import make_objective
    from trainer.losses.registry import LossConfig
    from trainer.model import ModelConfig, TokenIds, build_clip_config, build_model
    from trainer.plan.planner import OPENAI_CLIP_VOCAB, PlanSpec, plan
    from trainer.step import train_step

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))  # fmt: skip
    init_distributed(read_dist_info(), DistConfig())
    vocab = OPENAI_CLIP_VOCAB  # and bos/eos/pad as the planner's model_shape counts them
    tokens = TokenIds(vocab_size=vocab, bos=vocab - 2, eos=vocab - 1, pad=0)
    ds_config = build_deepspeed_config(
        DeepSpeedConfig(config=f"ds_configs/zero{zero}.json").load(),
        global_batch_size=b, world_size=1, precision="bf16", optim=OptimConfig(),
    )  # fmt: skip
    hf_keep = None
    if zero == 3:
        from transformers.integrations import HfDeepSpeedConfig

        hf_keep = HfDeepSpeedConfig(ds_config)  # must outlive the model
    torch.manual_seed(0)
    model_cfg = ModelConfig(preset="vit_b32", gradient_checkpointing=checkpointing)
    clip_config = build_clip_config(model_cfg, tokens, context_length)
    model = build_model(model_cfg, clip_config, with_bias=False, zero3=zero == 3)
    engine = initialize(model, ds_config, WarmupCosine(0, 10, 0.0))
    batch = loader_like_batch(
        b, clip_config.vision_config.image_size, context_length, tokens.eos, vocab
    )
    objective = make_objective(LossConfig(name="disco"))

    def step():
        return train_step(engine, batch, objective, chunks=1, dtype=torch.bfloat16)

    warm = step()
    torch.cuda.synchronize()
    states = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    spec = PlanSpec(
        model="vit_b32", gpus=1, gpu_memory=torch.cuda.get_device_properties(0).total_memory,
        batch=b, zero=zero, loss="disco", precision="bf16", checkpointing=checkpointing,
        context_length=context_length,
    )  # fmt: skip
    breakdown = plan(spec)
    del hf_keep  # kept alive until here (ZeRO-3)
    return {
        "zero": zero, "batch": b, "checkpointing": checkpointing,
        "measured_states": states, "measured_peak": peak,
        "plan_total": breakdown.total, "plan_states": breakdown.states,
        "plan": dataclasses.asdict(breakdown),
        "losses": [warm.loss, out.loss], "device": torch.cuda.get_device_name(0),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zero", type=int, default=2, choices=(0, 1, 2, 3))
    parser.add_argument("--batch", type=int, default=256, help="per-GPU batch (world size 1)")
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--context-length", type=int, default=77)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        result = measure(args.zero, args.batch, args.checkpointing, args.context_length)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "plan"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
