"""trainer.cpu_quirks: what a CPU run changes in DeepSpeed, checked in a fresh process (the
patches are process-wide)."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import torch
from deepspeed.accelerator import get_accelerator
native = bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
before = get_accelerator().is_fp16_supported()
from trainer import cpu_quirks
cpu_quirks.patch_deepspeed_for_cpu()
import importlib
comm = importlib.import_module("deepspeed.comm.torch")
print(native, before, get_accelerator().is_fp16_supported(),
      torch.float16 in get_accelerator().supported_dtypes(), comm.build_shm_op() is None)
"""


def test_fp16_is_allowed_on_every_cpu_and_the_shm_op_is_not_built():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         check=True).stdout.split()  # fmt: skip
    native, before, after, in_dtypes, no_build = (word == "True" for word in out[-5:])
    # DeepSpeed's own answer follows oneDNN's native fp16 (machine-dependent: AMD EPYC
    # without AVX512-FP16 says no); after the patch fp16 runs on any CPU.
    assert before == native
    assert after and in_dtypes and no_build
