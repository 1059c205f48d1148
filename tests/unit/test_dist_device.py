"""Which CUDA index a process takes, and which device collectives use (trainer/dist.py).

Pure: no GPU needed. The CUDA branches of init_distributed / train_device / collective_device
themselves are CUDA-only and not reached here; these tests pin the decisions they rely on.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from trainer.dist import collective_device, cuda_device_index, train_device


@pytest.mark.parametrize(
    ("local_rank", "visible", "expected"),
    [
        (3, 8, 3),  # one GPU per local rank (torchrun, srun --gpus-per-node)
        (0, 8, 0),
        (5, 1, 0),  # srun --gpus-per-task=1: the task's only GPU is index 0
        (0, 1, 0),
    ],
)
def test_cuda_device_index(local_rank, visible, expected):
    assert cuda_device_index(local_rank, visible) == expected


def test_cuda_device_index_refuses_an_ambiguous_layout(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    with pytest.raises(ValueError) as err:
        cuda_device_index(3, 2)
    message = str(err.value)
    assert len(message.splitlines()) == 1
    assert "LOCAL_RANK is 3" in message and "sees 2 CUDA device" in message
    assert "CUDA_VISIBLE_DEVICES=4,5" in message and "--gpus-per-task" in message


def test_cpu_devices_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only answers")
    assert train_device() == torch.device("cpu")


def test_collective_device_is_cpu_without_a_group_and_under_gloo(tmp_path):
    assert not dist.is_initialized()
    assert collective_device() == torch.device("cpu")
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        assert collective_device() == torch.device("cpu")
        assert collective_device(dist.group.WORLD) == torch.device("cpu")
    finally:
        dist.destroy_process_group()
