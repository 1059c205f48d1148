"""Zero-shot classification and image↔text retrieval, sharded over ranks.

`run_periodic_eval` is what the training loop calls every `eval.every` steps on every rank;
`evaluate` is the same computation for a model loaded outside training (`disco-clip eval`,
see trainer/eval/command.py). Metrics (trainer/eval/zeroshot.py, trainer/eval/retrieval.py) are
computed on all ranks alike from features gathered once per set.

Scale (docs/eval.md): images come through data/eval_loader.py, a DataLoader in which each rank
decodes only its own share of every set (file lists and tar shards alike), in `eval.workers`
worker processes; prompts are split the same way. Each rank encodes its share, and every key's
rows are all-gathered once at the end. Zero-shot classifiers (class embeddings) are computed
once per (template set, class names) per evaluation, and kept across periodic evaluations while
the text side is locked (`ClassEmbeddingCache`).

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
import weakref
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import TypeVar

import torch
import torch.distributed as dist
import torch.nn.functional as F

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
    """(n, 3, S, S) -> (n, d) normalised fp32 on `device` (default: the model's). Pixels are
    either normalised floats or the eval loader's uint8 crops, normalised here on the device
    (bit-identical, data/transforms.normalize_pixels). Tower + projection called directly:
    under ZeRO-3 each module gathers its own parameters, and CLIPModel.forward is not needed."""
    from data.transforms import normalize_pixels

    param = next(model.parameters())
    pixels = pixels.to(device=device or param.device, non_blocking=True)
    if pixels.dtype == torch.uint8:
        pixels = normalize_pixels(pixels, param.dtype)
    pooled = model.vision_model(pixel_values=pixels.to(param.dtype)).pooler_output
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


def rank_batches(
    items: Iterable[T], batch_size: int, rank: int, world_size: int
) -> Iterator[list[T]]:
    """This rank's share of `items` (items rank, rank+W, ...), in batches."""
    mine = itertools.islice(items, rank, None, world_size)
    while batch := list(itertools.islice(mine, batch_size)):
        yield batch


def gather_encoded(
    encode: Callable[[T], dict[str, torch.Tensor]],
    batches: Iterable[T],
    *,
    dummy: T,
    world_size: int,
) -> dict[str, torch.Tensor]:
    """Encode this rank's batches; return every rank's outputs concatenated (row order:
    rank-major, which callers never rely on: each output row carries its own label, index or
    partner), on the device `encode` returned them on. Empty dict if no rank had a batch.

    Every rank knows every key, dtype and trailing shape: as soon as any rank has a batch, all
    ranks encode (the dummy batch if need be), so tensors, not pickles, are gathered, once per
    key at the end.
    """
    mine = iter(batches)
    outputs: list[dict[str, torch.Tensor]] = []
    empty: dict[str, torch.Tensor] = {}
    while True:
        batch = next(mine, None)
        if not _any_rank(batch is not None, world_size):
            break
        out = encode(dummy if batch is None else batch)  # same forwards on every rank (ZeRO-3)
        empty = {k: v[:0] for k, v in out.items()}
        if batch is not None:
            outputs.append(out)
    local = {k: torch.cat([o[k] for o in outputs]) for k in empty} if outputs else empty
    if world_size == 1 or not dist.is_initialized():
        return local
    return {k: _gather_rows(local[k], world_size) for k in sorted(local)}


def dummy_image_batch(image_size: int, target) -> tuple[torch.Tensor, torch.Tensor, list]:
    """One black image in the eval loader's batch format, for ranks with nothing left."""
    return (torch.zeros(1, dtype=torch.long),
            torch.zeros(1, 3, image_size, image_size, dtype=torch.uint8), [target])  # fmt: skip


def image_batches(source, model, cfg: EvalConfig, rank: int, world_size: int):
    """This rank's share of an eval set, decoded by data/eval_loader.py's workers."""
    from data.eval_loader import eval_batches

    return eval_batches(
        source, image_size=model.config.vision_config.image_size, batch_size=cfg.batch_size,
        rank=rank, world=world_size, workers=cfg.workers,
    )  # fmt: skip


# ---- zero-shot classifiers ------------------------------------------------------------------


def text_side_frozen(model) -> bool:
    """True when nothing a prompt's embedding depends on can train (lock_text with no unlocked
    layers): the text tower and its projection have no trainable parameter."""
    params = itertools.chain(model.text_model.parameters(), model.text_projection.parameters())
    return not any(p.requires_grad for p in params)


class ClassEmbeddingCache:
    """Class embeddings per (template set, class names), kept while they cannot change.

    A classifier costs C × T prompt forwards (80,000 for ImageNet's 80 templates): it is
    computed once per key per evaluation, and reused by later evaluations of the same model
    only while `text_side_frozen` (under LiT the text side is fixed; otherwise each periodic
    eval must see the current weights, so nothing is kept)."""

    def __init__(self) -> None:
        self._kept: dict[Hashable, torch.Tensor] = {}
        self.computed = 0  # how many classifiers were computed (tests, logs)

    def get(self, model, key: Hashable, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        if not text_side_frozen(model):
            self._kept.clear()  # the text side trains: a kept classifier would be stale
            self.computed += 1
            return compute()
        if key not in self._kept:
            self._kept[key] = compute()
            self.computed += 1
        return self._kept[key]


_PERIODIC_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def periodic_cache(model) -> ClassEmbeddingCache:
    """The cache the periodic evals of one training run (one model object) share."""
    if model not in _PERIODIC_CACHES:
        _PERIODIC_CACHES[model] = ClassEmbeddingCache()
    return _PERIODIC_CACHES[model]


def prompt_classifier(
    model, tokenizer, names: list[str], templates: list[str], *, batch_size: int, rank: int,
    world_size: int, device: torch.device,
) -> torch.Tensor:  # fmt: skip
    """(C, d) class embeddings of `names` under `templates`, prompts sharded over ranks."""

    def encode_prompts(batch: list[tuple[int, str]]) -> dict[str, torch.Tensor]:
        return {
            "text": encode_texts(model, tokenizer, [text for _, text in batch], device),
            "cls": torch.tensor([c for c, _ in batch], device=device),
        }

    text = gather_encoded(
        encode_prompts, rank_batches(prompts(names, templates), batch_size, rank, world_size),
        dummy=[(0, "a")], world_size=world_size,
    )  # fmt: skip
    return class_embeddings(text["text"], text["cls"], len(names))


def encode_labelled(model, device):
    """encode() for (indices, pixels, labels) batches -> image features and labels."""

    def encode(batch) -> dict[str, torch.Tensor]:
        _, pixels, labels = batch
        return {
            "image": encode_images(model, pixels, device),
            "label": torch.tensor(labels, dtype=torch.long, device=device),
        }

    return encode


# ---- the two evaluations -------------------------------------------------------------------


def zeroshot_samples(cfg: EvalConfig):
    """(classnames, data.eval_loader set) of the configured zero-shot set."""
    from data.eval_loader import ListedSet, ShardSet
    from data.eval_sets import imagefolder_samples, load_classnames

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
        return names, ListedSet(listed)
    return names, ShardSet(cfg.zeroshot_dir, "label", cfg.max_samples)


def zeroshot_eval(
    model, tokenizer, cfg: EvalConfig, *, rank: int, world_size: int, device: torch.device,
    cache: ClassEmbeddingCache,
) -> dict:  # fmt: skip
    from trainer.eval.zeroshot import load_templates

    names, source = zeroshot_samples(cfg)
    shard = dict(batch_size=cfg.batch_size, rank=rank, world_size=world_size, device=device)
    emb = cache.get(model, ("zeroshot", cfg.templates, tuple(names)), lambda: prompt_classifier(
        model, tokenizer, names, load_templates(cfg.templates), **shard))  # fmt: skip
    images = gather_encoded(
        encode_labelled(model, device), image_batches(source, model, cfg, rank, world_size),
        dummy=dummy_image_batch(model.config.vision_config.image_size, 0), world_size=world_size,
    )  # fmt: skip
    if not images:
        raise ValueError(f"eval.zeroshot_dir: no labelled images in {cfg.zeroshot_dir}")
    metrics = zeroshot_metrics(images["image"], images["label"], emb)
    return {**metrics, "zeroshot_images": len(images["label"])}


def retrieval_items(cfg: EvalConfig):
    """The configured retrieval set (caption file or shards) as a data.eval_loader set."""
    from pathlib import Path

    from data.eval_loader import ListedSet, ShardSet
    from data.eval_sets import CAPTION_FILE_EXTS, load_caption_file

    spec = cfg.retrieval_shards
    if Path(spec).suffix.lower() in CAPTION_FILE_EXTS:
        items = load_caption_file(spec)
        return ListedSet(items[: cfg.max_samples] if cfg.max_samples else items)
    return ShardSet(spec, "captions", cfg.max_samples)


def retrieval_eval(
    model, tokenizer, cfg: EvalConfig, *, rank: int, world_size: int, device: torch.device
) -> dict:
    from trainer.eval.retrieval import recall_at_k_multi

    def encode_batch(batch) -> dict[str, torch.Tensor]:
        indices, pixels, captions = batch  # (n,), (n, 3, S, S), n lists of captions
        owners = [int(i) for i, caps in zip(indices, captions, strict=True) for _ in caps]
        flat = [c for caps in captions for c in caps]
        return {
            "image": encode_images(model, pixels, device),  # (n, d)
            "image_id": indices.to(device),  # (n,) the images' global indices
            "text": encode_texts(model, tokenizer, flat, device),  # (m, d)
            "text_image_id": torch.tensor(owners, device=device),  # (m,)
        }

    source = retrieval_items(cfg)
    feats = gather_encoded(
        encode_batch, image_batches(source, model, cfg, rank, world_size),
        dummy=dummy_image_batch(model.config.vision_config.image_size, ["a"]),
        world_size=world_size,
    )  # fmt: skip
    if not feats:
        raise ValueError(f"eval.retrieval_shards: no captioned images in {cfg.retrieval_shards}")
    # Images in global index order (whatever rank encoded them); each caption -> its image's row.
    order = feats["image_id"].argsort()
    image, image_id = feats["image"][order], feats["image_id"][order]
    caption_image = torch.searchsorted(image_id, feats["text_image_id"])
    metrics = recall_at_k_multi(image, feats["text"], caption_image)
    return {**metrics, "retrieval_images": len(image_id), "retrieval_pairs": len(caption_image)}


def suites_eval(
    model, tokenizer, cfg: EvalConfig, *, rank: int, world_size: int, device: torch.device,
    cache: ClassEmbeddingCache,
) -> dict[str, dict]:  # fmt: skip
    """trainer/eval/suites.run_suites on cfg.suites: {set: {top1, top5, images, classes}}."""
    from trainer.eval.suites import run_suites

    return run_suites(
        model, tokenizer, cfg.suites, templates=cfg.suite_templates, batch_size=cfg.batch_size,
        max_samples=cfg.max_samples, workers=cfg.workers, rank=rank, world_size=world_size,
        device=device, cache=cache,
    )  # fmt: skip


def evaluate(
    model,
    tokenizer,
    cfg: EvalConfig,
    *,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str | None = None,
    cache: ClassEmbeddingCache | None = None,
) -> dict:
    """Every configured evaluation; collective when world_size > 1 (call on all ranks).

    The model runs on `device` (default: where its parameters are), which must be where the
    model is; it is not moved here (under ZeRO-3 it cannot be). `cache` keeps classifiers
    across calls (see ClassEmbeddingCache); default: a fresh one."""
    device = torch.device(device) if device is not None else model_device(model)
    shard = dict(rank=rank, world_size=world_size, device=device)
    cache = cache if cache is not None else ClassEmbeddingCache()
    was_training = model.training
    model.eval()
    metrics: dict[str, float] = {}
    try:
        with torch.no_grad():
            if cfg.zeroshot_dir:
                metrics.update(zeroshot_eval(model, tokenizer, cfg, **shard, cache=cache))
            if cfg.retrieval_shards:
                metrics.update(retrieval_eval(model, tokenizer, cfg, **shard))
            if cfg.suites:
                from trainer.eval.suites import flat_metrics

                results = suites_eval(model, tokenizer, cfg, **shard, cache=cache)
                metrics.update(flat_metrics(results))
    finally:
        model.train(was_training)
    return metrics


def run_periodic_eval(model, cfg: EvalConfig, parts, info) -> dict[str, float]:
    """Called by the training loop on every rank at the same step; returns the same metrics
    on every rank (rank 0 logs them). Runs on the engine's device; classifiers are kept
    between the run's evals while the text side is locked."""
    engine = getattr(parts, "engine", None)
    device = getattr(engine, "device", None)
    return evaluate(
        model, parts.tokenizer, cfg, rank=info.rank, world_size=info.world_size, device=device,
        cache=periodic_cache(model),
    )  # fmt: skip
