"""Small builders for loader tests: configs over a dataset dir, batches to compare."""

from __future__ import annotations

import torch

from data.config import DataConfig
from data.loader import build_train_loader
from data.tokenizer import BUILTIN_TOKENIZER_DIR, load_tokenizer

TOKENIZER = load_tokenizer(BUILTIN_TOKENIZER_DIR)


def wds_config(shards, **overrides) -> DataConfig:
    fields = dict(train_shards=str(shards), image_size=16, context_length=16, shuffle_buffer=20,
                  streams=2,
                  workers=0, random_resized_crop_scale=(0.5, 1.0))  # fmt: skip
    fields.update(overrides)
    cfg = DataConfig(**fields)
    cfg.validate()
    return cfg


def loader(cfg: DataConfig, *, rank=0, world_size=1, batch=8, seed=0):
    return build_train_loader(cfg, rank=rank, world_size=world_size, local_batch_size=batch,
                              tokenizer=TOKENIZER, seed=seed)  # fmt: skip


def take(it, n: int) -> list[dict[str, torch.Tensor]]:
    return [next(it) for _ in range(n)]


def same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x
    )
