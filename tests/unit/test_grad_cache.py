"""Gradient caching replays dropout: its gradients equal one backward over the same chunks.

Single process, a minimal stand-in for the DeepSpeed engine's four calls (forward, backward,
set_gradient_accumulation_boundary, step) around a real tiny TrainableCLIP with dropout on.
The DeepSpeed ZeRO-2/3 runs are compared in tests/e2e/test_grad_cache_zero.py.
"""

from __future__ import annotations

import copy

import torch

from tests.support.models import RecordingEngine, trainable_clip_and_batch
from trainer.losses import make_objective
from trainer.losses.registry import LossConfig
from trainer.step import train_step


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
    model, batch = trainable_clip_and_batch(dropout=0.3)
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
