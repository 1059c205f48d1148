"""Patch dropout (FLIP, model.patch_dropout): training-only, exact when off, replayed by gradient
caching."""

from __future__ import annotations

import copy

import torch

from tests.support.models import RecordingEngine
from trainer.losses import make_objective
from trainer.losses.registry import LossConfig
from trainer.model import ModelConfig, TokenIds, build_clip_config, build_model
from trainer.step import train_step


def _model(patch_dropout: float):
    torch.manual_seed(0)
    cfg = ModelConfig(patch_dropout=patch_dropout)
    return build_model(
        cfg, build_clip_config(cfg, TokenIds(100, 1, 2, 0), 8), with_bias=False, zero3=False
    )


def _batch(n: int = 8):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 100, (n, 8), generator=gen)
    ids[:, 5] = 2  # eos
    return {"pixel_values": torch.randn(n, 3, 32, 32, generator=gen), "input_ids": ids,
            "attention_mask": torch.ones(n, 8, dtype=torch.long)}  # fmt: skip


def test_off_and_eval_equal_the_hf_tower() -> None:
    pixels = _batch()["pixel_values"]
    for p, training in ((0.0, True), (0.5, False)):
        model = _model(p).train(training)
        with torch.no_grad():
            pooled = model.vision_model(pixel_values=pixels).pooler_output
            expected = torch.nn.functional.normalize(model.visual_projection(pooled), dim=-1)
            assert torch.equal(model.encode_image(pixels), expected), (p, training)


def test_training_drops_round_n_p_patches_keeps_class_token() -> None:
    model = _model(0.3).train()
    seen = {}
    model.vision_model.pre_layrnorm.register_forward_hook(
        lambda module, args, out: seen.setdefault("tokens", args[0])
    )
    embeddings = model.vision_model.embeddings(_batch()["pixel_values"])  # (8, 1 + 16, 64)
    n = embeddings.shape[1] - 1
    torch.manual_seed(3)
    model.encode_image(_batch()["pixel_values"])
    tokens = seen["tokens"]
    assert tokens.shape == (8, 1 + n - round(n * 0.3), 64)
    assert torch.equal(tokens[:, 0], embeddings[:, 0])  # the class token, first
    for row in range(8):  # every kept token is one of that image's own patches, none twice
        match = (tokens[row, 1:, None] == embeddings[row, None, 1:]).all(-1)  # (keep, n)
        assert (match.sum(1) == 1).all() and (match.sum(0) <= 1).all()
    # masks differ between images and draws (not a fixed subset)
    picked = [set(torch.nonzero(m).flatten().tolist()) for m in [
        (tokens[r, 1:, None] == embeddings[r, None, 1:]).all(-1).any(0) for r in range(2)
    ]]  # fmt: skip
    assert picked[0] != picked[1]


def test_grad_cache_replays_patch_masks() -> None:
    model, batch = _model(0.5).train(), _batch(12)
    reference = copy.deepcopy(model)
    objective = make_objective(LossConfig())
    torch.manual_seed(7)
    engine = RecordingEngine(model)
    train_step(engine, batch, objective, chunks=2, dtype=torch.float32)

    # One backward over the same two chunks, encoded with graphs, RNG advancing as in pass 1.
    torch.manual_seed(7)
    images, texts = [], []
    for rows in (slice(0, 6), slice(6, 12)):
        image, text, scale, _ = reference(
            batch["pixel_values"][rows], batch["input_ids"][rows], batch["attention_mask"][rows]
        )
        images.append(image)
        texts.append(text)
    objective(torch.cat(images), torch.cat(texts), scale, None).backward()
    expected = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert engine.grads.keys() == expected.keys()
    for name, grad in expected.items():
        assert torch.allclose(engine.grads[name], grad, rtol=1e-5, atol=1e-7), name

    # Teeth: other masks give other gradients.
    other = copy.deepcopy(reference)
    other.zero_grad(set_to_none=True)
    torch.manual_seed(8)
    image, text, scale, _ = other(
        *(batch[k] for k in ("pixel_values", "input_ids", "attention_mask"))
    )
    objective(image, text, scale, None).backward()
    assert not torch.allclose(
        other.visual_projection.weight.grad, expected["visual_projection.weight"], rtol=1e-3
    )
