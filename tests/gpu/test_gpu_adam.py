"""Before the runs: the Adam(W) the trainer chooses on CUDA works here.

trainer.engine.choose_optimizer: DeepSpeed's FusedAdam where its CUDA op is prebuilt, else
torch.optim.AdamW(fused=True) (never an nvcc build; the DS_BUILD_OPS=0 wheel of
bench/gpu_wheels.sh has no prebuilt op, so that is the choice with it). One step of the chosen
optimizer on a CUDA parameter, and the DeepSpeed config the trainer builds says the same.
(Named to sort before the other GPU test files.)
"""

from __future__ import annotations

import torch

from trainer.engine import (
    DEEPSPEED_FUSED_ADAM,
    TORCH_ADAMW_FUSED,
    DeepSpeedConfig,
    OptimConfig,
    build_deepspeed_config,
    choose_optimizer,
)


def test_the_chosen_adam_steps_on_cuda() -> None:
    choice = choose_optimizer(on_cuda=True)
    assert choice in (DEEPSPEED_FUSED_ADAM, TORCH_ADAMW_FUSED), choice
    params = build_deepspeed_config(
        DeepSpeedConfig().load(), global_batch_size=16, world_size=1, precision="bf16",
        optim=OptimConfig(),
    )["optimizer"]["params"]  # fmt: skip
    assert params["torch_adam"] is (choice == TORCH_ADAMW_FUSED), params

    weight = torch.nn.Parameter(torch.ones(64, 64, device="cuda"))
    if choice == DEEPSPEED_FUSED_ADAM:
        from deepspeed.ops.adam import FusedAdam

        optimizer = FusedAdam([weight], lr=0.1)
    else:
        assert params.get("fused") is True, params
        optimizer = torch.optim.AdamW([weight], lr=0.1, fused=True)
    weight.grad = torch.ones_like(weight)
    optimizer.step()
    # Adam's first step moves every element by lr·(1 + weight decay term) against the gradient
    assert torch.all(weight.detach() < 0.95), weight.detach().max().item()
