"""The planner counts frozen towers (LiT) as weights only: no gradients, no optimizer state."""

from __future__ import annotations

import torch

from trainer.model import ModelConfig, TokenIds, TrainableCLIP, build_clip_config, lock_towers
from trainer.plan.command import _spec_from_args, add_parser
from trainer.plan.planner import PlanSpec, _shape, plan, state_bytes


def _frozen_count(spec: PlanSpec, **lock) -> int:
    """Frozen parameters of the real lock (trainer.model.lock_towers) on the meta device."""
    cfg = ModelConfig(preset=spec.model, **lock)
    tokens = TokenIds(spec.vocab_size, spec.vocab_size - 2, spec.vocab_size - 1, 0)
    with torch.device("meta"):
        model = TrainableCLIP(build_clip_config(cfg, tokens, spec.context_length))
    lock_towers(model, cfg)
    return sum(p.numel() for p in model.parameters() if not p.requires_grad)


def test_locked_image_tower_lowers_states_by_its_parameters() -> None:
    for zero, precision in ((0, "fp32"), (1, "bf16"), (2, "bf16"), (3, "bf16"), (3, "fp32")):
        spec = PlanSpec(model="vit_b32", gpus=8, zero=zero, precision=precision)
        locked = PlanSpec(**{**spec.__dict__, "lock_image": True})
        frozen = _frozen_count(spec, lock_image=True)
        assert frozen == _shape(spec).image_tower_params  # 87.8M of ViT-B/32's 151M
        params, grads, optim = state_bytes(_shape(spec), spec)
        l_params, l_grads, l_optim = state_bytes(_shape(locked), locked)
        dtype = 4 if precision == "fp32" else 2
        shards = 8 if zero >= 1 else 1
        master = 4 if (precision != "fp32" or zero >= 1) else 0
        assert l_params == params  # the frozen weights are still there
        grad_shards = 8 if zero >= 2 else 1
        assert abs((grads - l_grads) - dtype * frozen / grad_shards) < 1, (zero, precision)
        assert abs((optim - l_optim) - (8 + master) * frozen / shards) < 1, (zero, precision)
    # and the whole plan drops (activations of the frozen tower too)
    assert plan(locked).total < plan(spec).total


def test_locked_text_and_both_towers() -> None:
    spec = PlanSpec(model="vit_b32", gpus=1, zero=0, precision="fp32")
    both = PlanSpec(**{**spec.__dict__, "lock_image": True, "lock_text": True})
    _, grads, optim = state_bytes(_shape(both), both)
    # only logit_scale remains trainable
    assert grads == 4 and optim == 8
    assert _frozen_count(spec, lock_text=True) == _shape(spec).text_tower_params


def test_cli_flags() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["plan", "--lock-image", "--lock-text"])
    spec = _spec_from_args(args)
    assert spec.lock_image and spec.lock_text
    assert not _spec_from_args(parser.parse_args(["plan"])).lock_image
