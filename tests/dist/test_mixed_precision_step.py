"""bf16 and fp16 training steps under DeepSpeed on 2 gloo ranks: the towers run in 16 bits, the
loss math in fp32.

Each rank builds the tiny model and a real DeepSpeed engine (bf16 at ZeRO-3, fp16 with dynamic
loss scaling at ZeRO-2) and runs `trainer.step.train_step`, plain and with gradient caching,
recording the dtype of what reaches the objective and of the logits that reach the
cross-entropy. A failure localises to: the loss upcast (logits not fp32), gradient caching
(cached features not fp32: they could underflow in fp16 before the loss scale applies), or
DeepSpeed's mixed-precision path through our custom autograd functions (no finite update).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from tests.support.localdist import run_ranks

WORLD, B_LOCAL, CTX = 2, 4, 16


def _engine(stage: int, precision: str):
    from data.config import DataConfig
    from data.tokenizer import load_tokenizer
    from trainer.build import token_ids
    from trainer.engine import (
        DeepSpeedConfig,
        OptimConfig,
        WarmupCosine,
        build_deepspeed_config,
        initialize,
    )
    from trainer.model import ModelConfig, build_clip_config, build_model

    tokens = token_ids(load_tokenizer(DataConfig().tokenizer))
    ds_config = build_deepspeed_config(
        DeepSpeedConfig(config=f"ds_configs/zero{stage}.json").load(),
        global_batch_size=WORLD * B_LOCAL,
        world_size=WORLD,
        precision=precision,
        optim=OptimConfig(),
    )
    keep = None
    if stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        keep = HfDeepSpeedConfig(ds_config)  # must outlive the model (ZeRO-3 construction)
    torch.manual_seed(0)
    cfg = ModelConfig(preset="tiny")
    clip_config = build_clip_config(cfg, tokens, CTX)
    model = build_model(cfg, clip_config, with_bias=False, zero3=stage == 3)
    return initialize(model, ds_config, WarmupCosine(0, 10, 0.0)), clip_config, tokens, keep


def _steps_rank(rank: int, world: int) -> dict:
    from trainer import cpu_quirks
    from trainer.losses import make_objective
    from trainer.losses.registry import LossConfig
    from trainer.step import train_step

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    cpu_quirks.patch_deepspeed_for_cpu()
    import deepspeed

    deepspeed.init_distributed(
        dist_backend="gloo"
    )  # adopts run_ranks' group (ZeRO-3 Init needs it)
    seen: dict[str, list[str]] = {"features": [], "logits": [], "loss": []}
    real_ce = F.cross_entropy

    def recording_ce(logits, *args, **kwargs):
        seen["logits"].append(str(logits.dtype))
        return real_ce(logits, *args, **kwargs)

    objective = make_objective(LossConfig())

    def recording_objective(image, text, scale, bias):
        seen["features"].append(str(image.dtype))
        loss = objective(image, text, scale, bias)
        seen["loss"].append(str(loss.dtype))
        return loss

    results = {}
    F.cross_entropy = recording_ce
    try:
        for stage, precision, dtype in ((2, "fp16", torch.float16), (3, "bf16", torch.bfloat16)):
            engine, clip_config, tokens, _keep = _engine(stage, precision)
            size = clip_config.vision_config.image_size
            gen = torch.Generator().manual_seed(rank)
            batch = {
                "pixel_values": torch.randint(0, 256, (B_LOCAL, 3, size, size), generator=gen,
                                              dtype=torch.uint8),
                "input_ids": torch.randint(3, tokens.vocab_size - 2, (B_LOCAL, CTX), generator=gen),
                "attention_mask": torch.ones(B_LOCAL, CTX, dtype=torch.long),
            }  # fmt: skip
            batch["input_ids"][:, -1] = tokens.eos
            for key in seen:
                seen[key].clear()
            outs = [
                train_step(engine, batch, recording_objective, chunks=chunks, dtype=dtype)
                for chunks in (1, 2, 1)
            ]
            results[precision] = {
                "seen": {k: list(v) for k, v in seen.items()},
                "applied": [o.applied for o in outs],
                "losses": [o.loss for o in outs],
                "loss_scale": float(getattr(engine.optimizer, "cur_scale", 1.0)),
            }
    finally:
        F.cross_entropy = real_ce
    return results


def test_16_bit_towers_with_fp32_loss_math():
    per_rank = run_ranks(_steps_rank, WORLD)
    for rank, results in enumerate(per_rank):
        for precision, tower in (("bf16", "torch.bfloat16"), ("fp16", "torch.float16")):
            r = results[precision]
            what = f"rank {rank} {precision}"
            # plain step: 16-bit features in; grad-cache step: fp32 cached leaves in
            assert r["seen"]["features"] == [tower, "torch.float32", tower], what
            assert set(r["seen"]["logits"]) == {"torch.float32"}, what
            assert set(r["seen"]["loss"]) == {"torch.float32"}, what
            assert all(torch.isfinite(torch.tensor(r["losses"]))), what
        # fp16: DeepSpeed's dynamic loss scale is in use, and at least one update went through
        assert per_rank[rank]["fp16"]["loss_scale"] > 1 and any(per_rank[rank]["fp16"]["applied"])
        assert all(per_rank[rank]["bf16"]["applied"])
    # The logged loss is the full-batch loss: the same number on every rank.
    assert per_rank[0]["bf16"]["losses"] == per_rank[1]["bf16"]["losses"]
