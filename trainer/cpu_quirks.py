"""Everything we do differently when there is no CUDA device, in one place.

These paths exist so the whole trainer runs (and is tested) on CPU-only machines with gloo.
None of them is taken on a GPU machine. What CPU cannot test: NCCL collectives, fused CUDA
Adam (torch.optim.AdamW(fused=True), see trainer.engine.choose_optimizer), fp16/bf16 CUDA
kernels, pinned-memory offload and real GPU memory figures.
"""

from __future__ import annotations

import torch


def on_cuda() -> bool:
    return torch.cuda.is_available()


def patch_deepspeed_for_cpu() -> None:
    """Two DeepSpeed start-up decisions that are wrong for a CPU run with gloo.

    - It JIT-compiles a shared-memory comm op at every process start (30-70 s on two cores)
      that the gloo path does not use: skipped.
    - Its CPU accelerator refuses fp16 unless oneDNN has native fp16 kernels (AVX512-FP16 or
      AMX-FP16: recent Intel Xeons, not e.g. AMD EPYC before Zen 5), so `train.precision=fp16`
      would run on one CPU test machine and not another. torch computes fp16 on any x86 CPU
      (converting where there is no native kernel): slower, the same numbers. CPU runs exist to
      exercise the GPU code path, so fp16 is allowed everywhere.
    """
    if on_cuda():
        return
    import importlib

    # importlib, not `import deepspeed.comm.torch as m`: that resolves the attribute
    # `deepspeed.comm.torch`, which is the real torch module re-exported by deepspeed.comm.
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    ds_torch_comm.build_shm_op = lambda: None
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    CPU_Accelerator.is_fp16_supported = lambda self: True


def adapt_deepspeed_config(ds_config: dict) -> dict:
    """Unpinned offload buffers (pinning needs a CUDA context). Returns the config, changed in
    place. (Which Adam runs, torch's on CPU, is trainer.engine.choose_optimizer's decision.)"""
    if on_cuda():
        return ds_config
    zero = ds_config.get("zero_optimization", {})
    for key in ("offload_optimizer", "offload_param"):
        if isinstance(zero.get(key), dict):
            zero[key]["pin_memory"] = False
    return ds_config
