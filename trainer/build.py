"""Setup for a training run: tokenizer, model, DeepSpeed engine, data loader.

Kept apart from train.py so the loop there reads like the algorithm. Each build_* function
takes only the config sections it needs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

from trainer.config import Config
from trainer.dist import DistInfo
from trainer.engine import (
    WarmupCosine,
    build_deepspeed_config,
    initialize,
    zero_stage,
)
from trainer.model import TokenIds, build_clip_config, build_model


@dataclass
class Components:
    engine: Any
    loader: Any
    tokenizer: Any
    ds_config: dict
    # Under ZeRO-3, transformers must see a live HfDeepSpeedConfig for as long as the model
    # exists (it decides partitioned construction and gathered saving).
    hf_ds_config: Any = None


def token_ids(tokenizer) -> TokenIds:
    return TokenIds(
        vocab_size=len(tokenizer),
        bos=tokenizer.bos_token_id,
        eos=tokenizer.eos_token_id,
        pad=tokenizer.pad_token_id,
    )


def build_components(
    cfg: Config,
    info: DistInfo,
    *,
    data_states: list[dict] | None = None,
    start_loader: bool = False,
) -> Components:
    """Tokenizer, loader, model and engine. `data_states`: every saved rank's loader state of
    the checkpoint being resumed. `start_loader`: start the loader's workers before the model
    and engine are built, so that their start (fork, shuffle buffers, first decode) overlaps
    with that work instead of following it; the loader is closed again if the build fails."""
    from data.loader import build_train_loader
    from data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg.data.tokenizer)
    loader = build_train_loader(
        cfg.data,
        rank=info.rank,
        world_size=info.world_size,
        local_batch_size=cfg.train.global_batch_size // info.world_size,
        tokenizer=tokenizer,
        seed=cfg.run.seed,
    )
    if data_states is not None:
        # On another world size each rank takes the logical streams it now hosts
        # (docs/data_order.md), so the order carries on.
        loader.load_state_dict(data_states)
    if start_loader:
        loader.start()
    try:
        engine, hf_ds_config, ds_config = _build_engine(cfg, info, tokenizer)
    except BaseException:
        loader.close()
        raise
    return Components(engine, loader, tokenizer, ds_config, hf_ds_config)


def _build_engine(cfg: Config, info: DistInfo, tokenizer):
    ds_config = build_deepspeed_config(
        cfg.deepspeed.load(),
        global_batch_size=cfg.train.global_batch_size,
        world_size=info.world_size,
        precision=cfg.train.precision,
        optim=cfg.optim,
    )
    zero3 = zero_stage(ds_config) == 3
    with_bias = cfg.loss.name == "siglip"
    clip_config = build_clip_config(cfg.model, token_ids(tokenizer), cfg.data.context_length)
    # Identical initial weights on every rank, and at every ZeRO stage: zero.Init initialises
    # each module as it partitions it, drawing from the RNG in another order than a plain
    # construction, so under ZeRO-3 the plain model is built first (on the CPU, before
    # transformers is told about ZeRO-3) and copied in. One full fp32 copy in host memory per
    # rank, during setup only.
    random.seed(cfg.run.seed)
    torch.manual_seed(cfg.run.seed)
    initial_state = None
    if zero3 and not cfg.model.pretrained_dir:
        plain = build_model(cfg.model, clip_config, with_bias=with_bias, zero3=False)
        initial_state = plain.state_dict()
        del plain
    hf_ds_config = None
    if zero3:
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds_config = HfDeepSpeedConfig(ds_config)
    model = build_model(
        cfg.model, clip_config, with_bias=with_bias, zero3=zero3, initial_state=initial_state
    )
    schedule = WarmupCosine(cfg.schedule.warmup_steps, cfg.train.steps, cfg.schedule.min_lr_ratio)
    engine = initialize(model, ds_config, schedule)
    # From here on, randomness (dropout) differs per rank, as each rank sees other samples.
    torch.manual_seed(cfg.run.seed + 1 + info.rank)
    return engine, hf_ds_config, ds_config
