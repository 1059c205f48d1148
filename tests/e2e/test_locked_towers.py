"""Locked towers (LiT, model.lock_image / lock_text): frozen weights stay put, the rest trains,
and the optimizer holds state for the trainable parameters only (ZeRO-2 and ZeRO-3).

ZeRO-3 runs a partly unlocked image tower with gradient checkpointing, the reentrant case
where the first unlocked layer's input needs no gradient (trainer/model.py
_checkpoint_only_trainable_layers)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from tests.support.runs import DEBUG_CONFIG, run_training
from trainer.checkpoint import complete_tags

CASES = {
    2: ["model.lock_image=true"],
    3: ["model.lock_image=true", "model.lock_image_unlocked_groups=1",
        "model.gradient_checkpointing=true"],
}  # fmt: skip


def initial_model(overrides: list[str]):
    """The run's model as trainer/build.py builds it before training (seed, token ids)."""
    from data.tokenizer import load_tokenizer
    from trainer.build import token_ids
    from trainer.config import load_config
    from trainer.model import build_clip_config, build_model

    cfg = load_config(DEBUG_CONFIG, overrides, world_size=2)
    clip_config = build_clip_config(
        cfg.model, token_ids(load_tokenizer(cfg.data.tokenizer)), cfg.data.context_length
    )
    random.seed(cfg.run.seed)
    torch.manual_seed(cfg.run.seed)
    return build_model(cfg.model, clip_config, with_bias=False, zero3=False)


def optimizer_numel(ckpt: Path) -> int:
    """fp32 master elements over all ranks and groups of the checkpoint (ZeRO-2 or 3)."""
    from deepspeed.utils.zero_to_fp32 import get_optim_files, parse_optim_states

    tag_dir = ckpt / complete_tags(ckpt)[-1]
    _, _, groups, _ = parse_optim_states(get_optim_files(str(tag_dir)), str(tag_dir))
    return sum(t.numel() for rank in groups for t in (rank if isinstance(rank, list) else [rank]))


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_locked_image_tower(tmp_path, synthetic_dir, zero) -> None:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    overrides = ["train.steps=3", "checkpoint.every=3", f"deepspeed.config=ds_configs/zero{zero}.json",
                 *CASES[zero]]  # fmt: skip
    result = run_training(tmp_path / "run", Path(synthetic_dir), overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = tmp_path / "run" / "checkpoints"
    final = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=complete_tags(ckpt)[-1])

    model = initial_model([f"data.train_shards={synthetic_dir}/train", *overrides])
    initial = model.state_dict()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(("vision_model.", "visual_projection.")) for n in frozen)
    if zero == 3:  # the last vision layer, post_layernorm and the projection are unlocked
        assert "vision_model.encoder.layers.1.mlp.fc1.weight" in trainable
        assert "visual_projection.weight" in trainable
        assert "vision_model.encoder.layers.0.mlp.fc1.weight" in frozen
    else:
        assert not any(n.startswith(("vision_model.", "visual_projection.")) for n in trainable)

    still = [n for n in frozen if not torch.equal(final[n], initial[n].reshape(final[n].shape))]
    assert not still, f"locked weights moved: {still[:5]}"
    moved = [n for n in trainable if n.endswith("weight") and n != "logit_scale"]
    unmoved = [n for n in moved if torch.equal(final[n], initial[n].reshape(final[n].shape))]
    assert not unmoved, f"trainable weights did not move: {unmoved[:5]}"

    count = sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    total = sum(p.numel() for p in model.parameters())
    state = optimizer_numel(ckpt)
    assert count <= state <= count + 4096, (state, count, total)  # alignment padding only


@pytest.mark.parametrize("unlocked", [0, 1, 2])
def test_reentrant_checkpointing_trains_the_unlocked_layers(unlocked) -> None:
    """In process: reentrant checkpointing (what ZeRO-3 uses) with a locked image tower gives
    every trainable parameter a gradient and none to the frozen ones."""
    from tests.support.models import trainable_clip_and_batch
    from trainer.model import ModelConfig, TokenIds, build_clip_config, build_model

    cfg = ModelConfig(
        gradient_checkpointing=True, lock_image=True, lock_image_unlocked_groups=unlocked
    )
    torch.manual_seed(0)
    model = build_model(
        cfg, build_clip_config(cfg, TokenIds(100, 1, 2, 0), 8), with_bias=False, zero3=True
    ).train()
    _, batch = trainable_clip_and_batch(dropout=0.0)
    needs_grad = []  # no backward runs through the frozen layers
    for layer in model.vision_model.encoder.layers:
        layer.register_forward_hook(lambda m, a, out: needs_grad.append(out[0].requires_grad))
    image, text, scale, _ = model(
        batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
    )
    ((image @ text.T) * scale).logsumexp(1).sum().backward()
    for name, param in model.named_parameters():
        if "position_ids" in name:
            continue
        assert (param.grad is not None) == param.requires_grad, name
    layers = model.vision_model.encoder.layers
    assert needs_grad == [i >= len(layers) - unlocked for i in range(len(layers))]
    assert sum(p.requires_grad for p in layers.parameters()) == unlocked * len(
        list(layers[0].parameters())
    )
