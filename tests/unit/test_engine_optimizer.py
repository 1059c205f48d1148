"""Which Adam the engine runs (trainer.engine.choose_optimizer) and how the DeepSpeed JSON
says so, for the CPU branch and, without a GPU, the CUDA branch's choice.

What CPU cannot test: torch.optim.AdamW(fused=True) stepping CUDA tensors inside a ZeRO
engine (CUDA-only). Here the CUDA config goes through DeepSpeed's own optimizer construction
(DeepSpeedEngine._configure_basic_optimizer) with CPU parameters, which torch's fused AdamW
also accepts.
"""

from __future__ import annotations

import json

import pytest
import torch

from trainer import engine as eng
from trainer.engine import (
    DEEPSPEED_CPU_ADAM,
    DEEPSPEED_FUSED_ADAM,
    TORCH_ADAMW,
    TORCH_ADAMW_FUSED,
    OptimConfig,
    build_deepspeed_config,
    choose_optimizer,
    optimizer_label,
    parameter_groups,
)
from trainer.model import ModelConfig, TokenIds, build_clip_config, build_model

STAGES = ("zero0", "zero1", "zero2", "zero3")


def _template(name: str) -> dict:
    return json.loads((eng.PACKAGE_ROOT / "ds_configs" / f"{name}.json").read_text())


def _config(name: str, *, on_cuda: bool, template: dict | None = None) -> dict:
    return build_deepspeed_config(
        template or _template(name), global_batch_size=8, world_size=2, precision="bf16",
        optim=OptimConfig(), on_cuda=on_cuda,
    )  # fmt: skip


def test_cpu_branch_is_deepspeeds_torch_adam_fused():
    assert choose_optimizer(False) == TORCH_ADAMW_FUSED
    for stage in STAGES:
        params = _config(stage, on_cuda=False)["optimizer"]["params"]
        assert params["torch_adam"] is True and params["fused"] is True, stage


def test_cuda_branch_without_prebuilt_op_is_torch_fused_adamw():
    # This install, like any plain `pip install deepspeed`, has no prebuilt fused_adam op.
    assert eng.prebuilt_fused_adam() is False
    assert choose_optimizer(True) == TORCH_ADAMW_FUSED
    for stage in STAGES:
        config = _config(stage, on_cuda=True)
        params = config["optimizer"]["params"]
        assert params["torch_adam"] is True and params["fused"] is True, stage
        assert "zero_allow_untested_optimizer" not in config  # torch AdamW is ZeRO-supported


def test_cuda_branch_with_prebuilt_op_is_deepspeed_fused_adam(monkeypatch):
    monkeypatch.setattr(eng, "prebuilt_fused_adam", lambda: True)
    assert choose_optimizer(True) == DEEPSPEED_FUSED_ADAM
    params = _config("zero2", on_cuda=True)["optimizer"]["params"]
    assert params["torch_adam"] is False and "fused" not in params


def test_offload_keeps_deepspeeds_cpu_adam():
    assert choose_optimizer(True, cpu_offload=True) == DEEPSPEED_CPU_ADAM
    for on_cuda in (False, True):
        params = _config("zero3_offload", on_cuda=on_cuda)["optimizer"]["params"]
        assert "torch_adam" not in params and "fused" not in params


def test_a_concrete_torch_adam_in_the_json_is_kept():
    template = _template("zero2")
    template["optimizer"]["params"]["torch_adam"] = False
    params = _config("zero2", on_cuda=True, template=template)["optimizer"]["params"]
    assert params["torch_adam"] is False and "fused" not in params


def _tiny_model():
    torch.manual_seed(0)
    cfg = ModelConfig()
    clip = build_clip_config(cfg, TokenIds(100, 1, 2, 0), 8)
    return build_model(cfg, clip, with_bias=True, zero3=False)


def _deepspeed_builds(ds_params: dict, groups: list[dict]) -> torch.optim.Optimizer:
    """The basic optimizer DeepSpeed builds from the JSON's optimizer section (its own code,
    DeepSpeedEngine._configure_basic_optimizer, on a stand-in engine)."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    class StandIn(DeepSpeedEngine):
        def __init__(self):  # no DeepSpeed set-up: only the optimizer factory is used
            torch.nn.Module.__init__(self)

        def optimizer_params(self):
            return ds_params

        def optimizer_name(self):
            return "adamw"

        def zero_use_cpu_optimizer(self):
            return False

    return StandIn()._configure_basic_optimizer(groups)


@pytest.mark.parametrize("on_cuda", [False, True])
def test_deepspeed_builds_the_chosen_adamw_with_our_groups(on_cuda):
    model = _tiny_model()
    config = _config("zero2", on_cuda=on_cuda)
    groups = parameter_groups(model, config["optimizer"]["params"]["weight_decay"])
    optimizer = _deepspeed_builds(config["optimizer"]["params"], groups)
    assert optimizer_label(optimizer) == choose_optimizer(on_cuda)
    assert type(optimizer) is torch.optim.AdamW
    assert optimizer.defaults.get("fused") is True  # torch's fused kernel, on CPU as on CUDA
    assert tuple(optimizer.defaults["betas"]) == (0.9, 0.98)
    assert optimizer.defaults["eps"] == 1e-6 and optimizer.defaults["lr"] == 1e-3

    # The parameter groups arrive unchanged: decay on matrices only.
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    decayed = {names[id(p)] for p in decay["params"]}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert decayed | exempt == set(names.values()) and not decayed & exempt
    assert {"logit_scale", "logit_bias"} <= exempt
    assert all(n.endswith(".bias") or "norm" in n or n in ("logit_scale", "logit_bias")
               or model.get_parameter(n).ndim < 2 for n in exempt)  # fmt: skip
    assert all(model.get_parameter(n).ndim >= 2 and "norm" not in n for n in decayed)
    assert "text_model.embeddings.token_embedding.weight" in decayed

    # One step runs (fused=True on CPU tensors: torch supports it, so the CUDA kwargs work).
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()


def test_optimizer_label_names():
    p = [torch.nn.Parameter(torch.zeros(2, 2))]
    assert optimizer_label(torch.optim.AdamW(p)) == TORCH_ADAMW
    assert optimizer_label(torch.optim.AdamW(p, fused=True)) == TORCH_ADAMW_FUSED
    assert optimizer_label(torch.optim.SGD(p, lr=0.1)) == "torch.optim.sgd.SGD"
