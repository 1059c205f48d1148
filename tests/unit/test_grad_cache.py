"""Gradient caching replays dropout: its gradients equal one backward over the same chunks.

Single process, a minimal stand-in for the DeepSpeed engine's four calls (forward, backward,
set_gradient_accumulation_boundary, step) around a real tiny TrainableCLIP with dropout on.
The DeepSpeed ZeRO-2/3 runs are compared in tests/e2e/test_grad_cache_zero.py.
"""

from __future__ import annotations

import copy

import torch

from tests.support.models import RecordingEngine
from trainer.losses import make_objective
from trainer.losses.registry import LossConfig
from trainer.model import ModelConfig, TokenIds, build_clip_config, build_model
from trainer.step import train_step


def _model_and_batch(dropout: float):
    torch.manual_seed(0)
    cfg = ModelConfig(attention_dropout=dropout)
    model = build_model(
        cfg, build_clip_config(cfg, TokenIds(100, 1, 2, 0), 8), with_bias=False, zero3=False
    )
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 100, (12, 8), generator=gen)
    ids[:, 5] = 2  # eos
    batch = {"pixel_values": torch.randn(12, 3, 32, 32, generator=gen), "input_ids": ids,
             "attention_mask": torch.ones(12, 8, dtype=torch.long)}  # fmt: skip
    return model, batch


def _reference_grads(model, batch, chunks: int, replay: bool):
    """Encode the same chunks WITH graphs (the RNG advancing as in the first pass) and do one
    backward of the loss over all rows: what gradient caching must reproduce."""
    objective = make_objective(LossConfig())
    b = batch["input_ids"].shape[0]
    images, texts = [], []
    for k in range(chunks):
        rows = slice(k * b // chunks, (k + 1) * b // chunks)
        image, text, scale, _ = model(
            batch["pixel_values"][rows], batch["input_ids"][rows], batch["attention_mask"][rows]
        )
        images.append(image)
        texts.append(text)
    if not replay:  # what a re-encode with fresh dropout masks would do
        torch.manual_seed(12345)
        images = [model.encode_image(batch["pixel_values"][: b // chunks]), *images[1:]]
    objective(torch.cat(images), torch.cat(texts), scale, None).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_grad_cache_replays_dropout_and_matches_one_backward() -> None:
    model, batch = _model_and_batch(dropout=0.3)
    reference_model = copy.deepcopy(model)
    torch.manual_seed(7)
    engine = RecordingEngine(model)
    train_step(engine, batch, make_objective(LossConfig()), chunks=3, dtype=torch.float32)
    torch.manual_seed(7)
    expected = _reference_grads(reference_model, batch, chunks=3, replay=True)
    assert engine.grads.keys() == expected.keys()
    for name, grad in expected.items():
        assert torch.allclose(engine.grads[name], grad, rtol=1e-5, atol=1e-7), name

    # The check has teeth: with other dropout masks the gradients are visibly different.
    other = copy.deepcopy(reference_model)
    for p in other.parameters():
        p.grad = None
    torch.manual_seed(7)
    wrong = _reference_grads(other, batch, chunks=3, replay=False)
    assert not torch.allclose(
        wrong["visual_projection.weight"], expected["visual_projection.weight"], rtol=1e-3
    )
