"""Zero-shot classification and image↔text retrieval, sharded over ranks.

`run_periodic_eval` is what the training loop calls every `eval.every` steps on every rank;
`evaluate` is the same computation for a model loaded outside training (`disco-clip eval`,
see trainer/eval/command.py). Each rank encodes every world_size-th sample, features are gathered,
and the metrics (trainer/eval/zeroshot.py, trainer/eval/retrieval.py) are computed on all ranks alike.

Under ZeRO-3 every forward is a collective (parameters are gathered per module), so every rank
must run the same number of forwards: a rank that ran out of samples encodes a dummy batch
and drops the result until all ranks agree they are done.

Devices: the model runs where it lives (the engine's device in training, --device for
`disco-clip eval`); every batch is moved there and the features and metric math stay there.
Collectives go through trainer.dist.collective_device() (the CUDA device under NCCL, which
cannot reduce CPU tensors; the CPU under gloo). CUDA-only: the NCCL path is not reached by
any CPU test (tests/e2e/test_eval_export.py runs the gloo one).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

from trainer.dist import collective_device
from trainer.eval.config import (
    EvalConfig,
    _is_imagefolder,
    find_classnames,
)
from trainer.eval.zeroshot import class_embeddings, prompts, zeroshot_metrics

T = TypeVar("T")


def model_device(model) -> torch.device:
    """The device a model's parameters live on (under ZeRO-3, that of their empty
    placeholders, which is where DeepSpeed gathers them)."""
    return next(model.parameters()).device


def encode_images(model, pixels: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """(n, 3, S, S) -> (n, d) normalised fp32 on `device` (default: the model's). Tower +
    projection called directly: under ZeRO-3 each module gathers its own parameters, and
    CLIPModel.forward is not needed."""
    param = next(model.parameters())
    pixels = pixels.to(device=device or param.device, dtype=param.dtype)
    pooled = model.vision_model(pixel_values=pixels).pooler_output
    return F.normalize(model.visual_projection(pooled).float(), dim=-1)


def encode_texts(
    model, tokenizer, texts: list[str], device: torch.device | None = None
) -> torch.Tensor:
    """n strings -> (n, d) normalised fp32 on `device` (default: the model's), tokenized
    exactly as in training."""
    from data.tokenizer import tokenize

    device = device or model_device(model)
    ids, mask = tokenize(tokenizer, texts, model.config.text_config.max_position_embeddings)
    pooled = model.text_model(input_ids=ids.to(device), attention_mask=mask.to(device))
    return F.normalize(model.text_projection(pooled.pooler_output).float(), dim=-1)


# ---- sharding: each rank encodes its share, everyone gets everything ----------------------


def _any_rank(flag: bool, world_size: int) -> bool:
    if world_size == 1 or not dist.is_initialized():
        return flag
    t = torch.tensor([float(flag)], device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _gather_rows(local: torch.Tensor, world_size: int) -> torch.Tensor:
    """Every rank's rows of `local`, concatenated rank-major, on `local`'s device. Row counts
    may differ per rank; dtype and trailing shape must not. Collective."""
    device = collective_device()
    count = torch.tensor([local.shape[0]], dtype=torch.long, device=device)
    counts = [torch.empty_like(count) for _ in range(world_size)]
    dist.all_gather(counts, count)
    rows = [int(c.item()) for c in counts]
    if max(rows) == 0:
        return local
    padded = torch.zeros((max(rows), *local.shape[1:]), dtype=local.dtype, device=device)
    padded[: local.shape[0]] = local.to(device)
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, rows, strict=True)]).to(local.device)


def gather_encoded(
    encode: Callable[[list[T]], dict[str, torch.Tensor]],
    items: Iterable[T],
    *,
    dummy: T,
    batch_size: int,
    rank: int,
    world_size: int,
) -> dict[str, torch.Tensor]:
    """Encode this rank's share (items rank, rank+W, ...) in batches; return every rank's
    outputs concatenated (row order: rank-major, which callers never rely on: each output
    row carries its own label/partner), on the device `encode` returned them on. Empty dict
    if there were no items at all.

    Every rank knows every key, dtype and trailing shape: as soon as any rank has items, all
    ranks encode (a dummy batch if need be), so tensors, not pickles, can be gathered.
    """
    mine: Iterator[T] = itertools.islice(items, rank, None, world_size)
    outputs: list[dict[str, torch.Tensor]] = []
    empty: dict[str, torch.Tensor] = {}
    while True:
        batch = list(itertools.islice(mine, batch_size))
        if not _any_rank(bool(batch), world_size):
            break
        out = encode(batch or [dummy])  # same forwards on every rank (ZeRO-3)
        empty = {k: v[:0] for k, v in out.items()}
        if batch:
            outputs.append(out)
    local = {k: torch.cat([o[k] for o in outputs]) for k in empty} if outputs else empty
    if world_size == 1 or not dist.is_initialized():
        return local
    return {k: _gather_rows(local[k], world_size) for k in sorted(local)}


def _open(image: Image.Image | Path) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    with Image.open(image) as img:
        return img.convert("RGB")


# ---- the two evaluations -------------------------------------------------------------------


def zeroshot_samples(cfg: EvalConfig) -> tuple[list[str], Iterable[tuple[Any, int]]]:
    """(classnames, (image or path, label) samples) of the configured zero-shot set."""
    from data.eval_sets import imagefolder_samples, load_classnames, wds_labelled

    path = find_classnames(cfg)
    if path is None:
        raise ValueError(f"eval.classnames: no classnames.txt found for {cfg.zeroshot_dir}")
    names = load_classnames(path)
    if _is_imagefolder(cfg.zeroshot_dir):
        listed = imagefolder_samples(cfg.zeroshot_dir, names)
        if cfg.max_samples and len(listed) > cfg.max_samples:
            # Evenly spaced, so a capped eval still covers every class (the list is class-major).
            step = len(listed) / cfg.max_samples
            listed = [listed[int(i * step)] for i in range(cfg.max_samples)]
        return names, listed
    samples: Iterable[tuple[Any, int]] = wds_labelled(cfg.zeroshot_dir)
    if cfg.max_samples:
        samples = itertools.islice(samples, cfg.max_samples)
    return names, samples


def zeroshot_eval(
    model, tokenizer, cfg: EvalConfig, *, rank: int, world_size: int, device: torch.device
) -> dict:
    from data.transforms import eval_transform
    from trainer.eval.zeroshot import load_templates

    names, samples = zeroshot_samples(cfg)
    templates = load_templates(cfg.templates)
    size = model.config.vision_config.image_size
    transform = eval_transform(size)
    shard = dict(batch_size=cfg.batch_size, rank=rank, world_size=world_size)

    def encode_prompts(batch: list[tuple[int, str]]) -> dict[str, torch.Tensor]:
        return {
            "text": encode_texts(model, tokenizer, [text for _, text in batch], device),
            "cls": torch.tensor([c for c, _ in batch], device=device),
        }

    def encode_batch(batch: list[tuple[Any, int]]) -> dict[str, torch.Tensor]:
        pixels = torch.stack([transform(_open(img)) for img, _ in batch])  # (n, 3, S, S), CPU
        return {
            "image": encode_images(model, pixels, device),
            "label": torch.tensor([y for _, y in batch], device=device),
        }

    text = gather_encoded(encode_prompts, prompts(names, templates), dummy=(0, "a"), **shard)
    emb = class_embeddings(text["text"], text["cls"], len(names))  # (C, d)
    black = Image.new("RGB", (size, size))
    images = gather_encoded(encode_batch, samples, dummy=(black, 0), **shard)
    if not images:
        raise ValueError(f"eval.zeroshot_dir: no labelled images in {cfg.zeroshot_dir}")
    metrics = zeroshot_metrics(images["image"], images["label"], emb)
    return {**metrics, "zeroshot_images": len(images["label"])}


def retrieval_items(cfg: EvalConfig) -> Iterable[tuple[Any, list[str]]]:
    """(image or path, captions) of the configured retrieval set (shards or caption file)."""
    from data.eval_sets import CAPTION_FILE_EXTS, load_caption_file, wds_captioned

    spec = cfg.retrieval_shards
    if Path(spec).suffix.lower() in CAPTION_FILE_EXTS:
        items: Iterable[tuple[Any, list[str]]] = load_caption_file(spec)
    else:
        items = wds_captioned(spec)
    if cfg.max_samples:
        items = itertools.islice(items, cfg.max_samples)
    return items


def retrieval_eval(
    model, tokenizer, cfg: EvalConfig, *, rank: int, world_size: int, device: torch.device
) -> dict:
    from data.transforms import eval_transform
    from trainer.eval.retrieval import recall_at_k_multi

    size = model.config.vision_config.image_size
    transform = eval_transform(size)
    # (global image id, image, captions): ids survive the rank-major gather
    items = ((i, img, caps) for i, (img, caps) in enumerate(retrieval_items(cfg)))

    def encode_batch(batch: list[tuple[int, Any, list[str]]]) -> dict[str, torch.Tensor]:
        pixels = torch.stack([transform(_open(img)) for _, img, _ in batch])  # (n, 3, S, S)
        captions = [c for _, _, caps in batch for c in caps]
        owners = [i for i, _, caps in batch for _ in caps]
        return {
            "image": encode_images(model, pixels, device),  # (n, d)
            "image_id": torch.tensor([i for i, _, _ in batch], device=device),  # (n,)
            "text": encode_texts(model, tokenizer, captions, device),  # (m, d)
            "text_image_id": torch.tensor(owners, device=device),  # (m,)
        }

    dummy = (0, Image.new("RGB", (size, size)), ["a"])
    feats = gather_encoded(
        encode_batch, items, dummy=dummy, batch_size=cfg.batch_size, rank=rank,
        world_size=world_size,
    )  # fmt: skip
    if not feats:
        raise ValueError(f"eval.retrieval_shards: no captioned images in {cfg.retrieval_shards}")
    n = len(feats["image_id"])
    position = torch.empty(n, dtype=torch.long, device=feats["image_id"].device)
    position[feats["image_id"]] = torch.arange(n, device=position.device)  # image id -> row
    caption_image = position[feats["text_image_id"]]
    metrics = recall_at_k_multi(feats["image"], feats["text"], caption_image)
    return {**metrics, "retrieval_images": n, "retrieval_pairs": len(caption_image)}


def suites_eval(
    model, tokenizer, cfg: EvalConfig, *, rank: int, world_size: int, device: torch.device
) -> dict[str, dict]:
    """trainer/eval/suites.run_suites on cfg.suites: {set: {top1, top5, images, classes}}."""
    from trainer.eval.suites import run_suites

    return run_suites(
        model, tokenizer, cfg.suites, templates=cfg.suite_templates, batch_size=cfg.batch_size,
        max_samples=cfg.max_samples, rank=rank, world_size=world_size, device=device,
    )  # fmt: skip


def evaluate(
    model,
    tokenizer,
    cfg: EvalConfig,
    *,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str | None = None,
) -> dict:
    """Every configured evaluation; collective when world_size > 1 (call on all ranks).

    The model runs on `device` (default: where its parameters are), which must be where the
    model is; it is not moved here (under ZeRO-3 it cannot be)."""
    device = torch.device(device) if device is not None else model_device(model)
    shard = dict(rank=rank, world_size=world_size, device=device)
    was_training = model.training
    model.eval()
    metrics: dict[str, float] = {}
    try:
        with torch.no_grad():
            if cfg.zeroshot_dir:
                metrics.update(zeroshot_eval(model, tokenizer, cfg, **shard))
            if cfg.retrieval_shards:
                metrics.update(retrieval_eval(model, tokenizer, cfg, **shard))
            if cfg.suites:
                from trainer.eval.suites import flat_metrics

                metrics.update(flat_metrics(suites_eval(model, tokenizer, cfg, **shard)))
    finally:
        model.train(was_training)
    return metrics


def run_periodic_eval(model, cfg: EvalConfig, parts, info) -> dict[str, float]:
    """Called by the training loop on every rank at the same step; returns the same metrics
    on every rank (rank 0 logs them). Runs on the engine's device."""
    engine = getattr(parts, "engine", None)
    device = getattr(engine, "device", None)
    return evaluate(
        model, parts.tokenizer, cfg, rank=info.rank, world_size=info.world_size, device=device
    )
