"""model.compile: the compiled towers' step gives the eager loss and gradients (tiny model)."""

from __future__ import annotations

import copy
import os

import torch

from tests.support.models import trainable_clip_and_batch
from trainer.losses import make_objective
from trainer.losses.registry import LossConfig
from trainer.model import ModelConfig, compile_towers

# inductor (g++) passes this test too but took 70 s on this 2-core machine; aot_eager checks the
# same graph capture (dynamo + AOT autograd) without code generation. Run with
# DISCO_COMPILE_TEST_BACKEND=inductor for the full compile.
BACKEND = os.environ.get("DISCO_COMPILE_TEST_BACKEND", "aot_eager")


def _loss_and_grads(model, batch):
    image, text, scale, bias = model(
        batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
    )
    loss = make_objective(LossConfig())(image, text, scale, bias)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_compiled_step_equals_eager() -> None:
    torch._dynamo.reset()
    eager, batch = trainable_clip_and_batch(dropout=0.0)
    compiled = copy.deepcopy(eager)
    compile_towers(compiled, backend=BACKEND)
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # in place: same names
    loss, grads = _loss_and_grads(eager, batch)
    c_loss, c_grads = _loss_and_grads(compiled, batch)
    assert torch.allclose(c_loss, loss, rtol=1e-5, atol=1e-5)
    assert c_grads.keys() == grads.keys()
    for name, grad in grads.items():
        assert torch.allclose(c_grads[name], grad, rtol=1e-5, atol=1e-5), name


def test_config_field_compiles_in_build_model() -> None:
    from trainer.model import TokenIds, build_clip_config, build_model

    cfg = ModelConfig(compile=True, compile_backend=BACKEND)
    model = build_model(
        cfg, build_clip_config(cfg, TokenIds(100, 1, 2, 0), 8), with_bias=False, zero3=False
    )
    assert model.vision_model._compiled_call_impl is not None
    assert model.text_model._compiled_call_impl is not None
