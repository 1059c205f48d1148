"""The memory planner (trainer/plan/planner.py): the paper's claims, consistency, CLI errors.

The paper's settings (DisCo-CLIP, CVPR 2023) are reproduced with mixed precision and
activation checkpointing: without checkpointing the planner says ViT-B/32's activations at
b = 4096 per GPU alone exceed 40 GB, so the 32K-on-8-GPUs run must have recomputed them.
Both ZeRO-2 (our default) and stage 0 (the paper's plain data parallelism) are checked.
Host memory: at the shipped vit_b32_laion.yaml the loader's uint8 hand-over fits a node.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from trainer import cli
from trainer.config_io import read_yaml
from trainer.plan.activations import activation_bytes, input_bytes
from trainer.plan.host import LOADER_PREFETCH_FACTOR, host_plan, loader_batch_bytes
from trainer.plan.planner import (
    PlanSpec,
    fits,
    largest_batch,
    model_shape,
    parse_memory,
    plan,
    state_bytes,
)

PAPER = PlanSpec(model="vit_b32", gpus=8, gpu_memory=parse_memory("40GB"), batch=32768,
                 precision="bf16", checkpointing=True)  # fmt: skip


@pytest.mark.parametrize("zero", [0, 2])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_paper_32k_on_8_a100_fits_with_disco_not_naive(zero: int, precision: str) -> None:
    spec = replace(PAPER, zero=zero, precision=precision)
    assert fits(replace(spec, loss="disco"))
    assert not fits(replace(spec, loss="naive"))


@pytest.mark.parametrize("zero", [0, 2])
def test_paper_196k_on_64_a100_fits_with_disco(zero: int) -> None:
    spec = replace(PAPER, gpus=64, batch=196608, zero=zero, loss="disco")
    assert fits(spec)
    assert largest_batch(spec) >= 196608


def test_without_checkpointing_activations_alone_do_not_fit() -> None:
    """Why the claims need checkpointing (or gradient caching): 4096 ViT-B/32 samples."""
    br = plan(replace(PAPER, checkpointing=False))
    assert br.activations > PAPER.gpu_memory
    assert fits(replace(PAPER, checkpointing=False, grad_cache=8))


def test_parameter_count_is_exact() -> None:
    from trainer.model import ModelConfig, TokenIds, TrainableCLIP, build_clip_config

    tokens = TokenIds(vocab_size=1000, bos=998, eos=999, pad=0)
    real = TrainableCLIP(build_clip_config(ModelConfig(preset="tiny"), tokens, 16))
    assert model_shape("tiny", 16, 1000).params == sum(p.numel() for p in real.parameters())
    # OpenAI's ViT-B/32 has 151,277,313 parameters (logit_scale included).
    assert model_shape("vit_b32", 77, 49408).params == 151_277_313


def test_activation_formula_matches_saved_tensors_of_tiny() -> None:
    """The per-layer count against what autograd really saves (weights excluded), ±5%."""
    from trainer.model import ModelConfig, TokenIds, TrainableCLIP, build_clip_config

    tokens = TokenIds(vocab_size=1000, bos=998, eos=999, pad=0)
    model = TrainableCLIP(build_clip_config(ModelConfig(preset="tiny"), tokens, 16))
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    b = 8
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.encode_image(torch.randn(b, 3, 32, 32))
        ids = torch.randint(0, 990, (b, 16))
        model.encode_text(ids, torch.ones_like(ids))
    towers = model_shape("tiny", 16, 1000).towers
    predicted = sum(activation_bytes(t, b, dtype=4, checkpointing=False) for t in towers)
    predicted += input_bytes(towers[0], b, dtype=4)  # the conv saves the pixels themselves
    assert predicted == pytest.approx(sum(saved.values()), rel=0.05)


def test_more_gpus_never_need_more_memory_per_rank_with_disco() -> None:
    totals = [plan(replace(PAPER, gpus=n, batch=65536)).total for n in (8, 16, 32, 64, 128)]
    assert totals == sorted(totals, reverse=True)


def test_tiled_loss_needs_no_more_than_disco() -> None:
    for gpus, batch in [(8, 32768), (64, 196608), (2, 4096)]:
        spec = replace(PAPER, gpus=gpus, batch=batch)
        assert plan(replace(spec, loss="tiled")).loss <= plan(spec).loss
        assert plan(spec).loss <= plan(replace(spec, loss="naive")).loss


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_model_states_shrink_with_each_zero_stage(precision: str) -> None:
    shape = model_shape("vit_b32", 77, 49408)
    states = [
        sum(state_bytes(shape, replace(PAPER, zero=z, precision=precision))) for z in range(4)
    ]
    assert states == sorted(states, reverse=True)
    assert states[3] < states[0] / 4


def test_grad_cache_and_checkpointing_reduce_activations() -> None:
    plain = plan(replace(PAPER, checkpointing=False)).activations
    assert plan(replace(PAPER, checkpointing=False, grad_cache=4)).activations < plain / 3
    assert plan(PAPER).activations < plain


def test_largest_batch_is_the_boundary() -> None:
    spec = replace(PAPER, loss="naive")
    best = largest_batch(spec)
    assert best % spec.gpus == 0
    assert fits(replace(spec, batch=best))
    assert not fits(replace(spec, batch=best + spec.gpus))


def test_parse_memory() -> None:
    assert parse_memory("40GB") == 40 * 2**30
    assert parse_memory("80GiB") == 80 * 2**30
    assert parse_memory("512 MB") == 512 * 2**20
    with pytest.raises(ValueError, match="40XB"):
        parse_memory("40XB")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--batch", "1000", "--gpus", "64"], "not divisible"),
        (["--model", "vit_z99"], "unknown 'vit_z99'"),
        (["--gpu-memory", "40XB"], "cannot parse '40XB'"),
    ],
)
def test_cli_bad_arguments_exit_2_with_one_line(argv, message, capsys) -> None:
    assert cli.main(["plan", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_cli_prints_breakdown_and_largest_batch(capsys) -> None:
    argv = ["plan", "--gpus", "8", "--batch", "32768", "--loss", "naive", "--grad-checkpointing"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    for word in ("parameters", "gradients", "optimizer", "activations", "loss", "DOES NOT FIT"):
        assert word in out
    assert "largest global batch that fits:" in out


def _shipped_laion_spec() -> PlanSpec:
    """PlanSpec from trainer/configs/vit_b32_laion.yaml on 8 GPUs (b = 4096 per rank)."""
    tree = read_yaml("trainer/configs/vit_b32_laion.yaml")
    data = tree["data"]
    return replace(PAPER, batch=tree["train"]["global_batch_size"], model=tree["model"]["preset"],
                   image_size=data["image_size"], workers=data["workers"],
                   shuffle_buffer=data["shuffle_buffer"], streams=data["streams"],
                   context_length=data["context_length"])  # fmt: skip


def test_planner_prefetch_factor_is_the_loaders() -> None:
    from data.loader import PREFETCH_FACTOR

    assert LOADER_PREFETCH_FACTOR == PREFETCH_FACTOR


def test_host_memory_at_shipped_laion_settings_fits_and_uint8_is_4x_smaller() -> None:
    spec = _shipped_laion_spec()
    b, size, workers = spec.batch // spec.gpus, spec.image_size, spec.workers
    assert (b, size, workers, spec.shuffle_buffer, spec.streams) == (4096, 224, 8, 1000, 512)
    host = host_plan(spec)
    assert host.per_rank < 64 * 2**30
    assert host.per_node == 8 * host.per_rank
    # Each worker prefetches items that are its streams' share of a batch: PREFETCH_FACTOR
    # uint8 batches in flight in all, whatever the worker count.
    assert host.prefetched == LOADER_PREFETCH_FACTOR * loader_batch_bytes(b, size, 77)
    # The old hand-over: every worker prefetched whole fp32 batches: ~39 GB for that alone.
    old = workers * LOADER_PREFETCH_FACTOR * loader_batch_bytes(b, size, 77, pixel_bytes=4)
    assert 39e9 < old < 40e9
    assert old / host.prefetched == pytest.approx(4 * workers, rel=0.01)


def test_host_memory_components_follow_their_settings() -> None:
    spec = _shipped_laion_spec()
    host = host_plan(spec)
    assert host_plan(replace(spec, sample_bytes=2 * spec.sample_bytes)).shuffle == 2 * host.shuffle
    assert host_plan(replace(spec, workers=4)).prefetched == host.prefetched  # shares of a batch
    assert host_plan(replace(spec, streams=2 * spec.streams)).shuffle == 2 * host.shuffle
    assert host_plan(replace(spec, gpus_per_node=4)).per_node == 4 * host.per_rank
    in_process = host_plan(replace(spec, workers=0))  # one logical worker, no DataLoader
    assert in_process.prefetched == 0 and in_process.stacking == 2 * host.batch
    assert host.pinned == host.batch


def test_image_size_flag_changes_the_model_too() -> None:
    default = plan(replace(PAPER, image_size=0))
    assert plan(replace(PAPER, image_size=224)) == default
    assert plan(replace(PAPER, image_size=288)).activations > default.activations
    assert host_plan(replace(PAPER, image_size=288)).batch > host_plan(PAPER).batch


def test_cli_prints_host_memory_per_rank_and_per_node(capsys) -> None:
    argv = ["plan", "--grad-checkpointing", "--gpus-per-node", "4", "--sample-bytes", "65536"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "host memory per rank" in out and "per node" in out
    assert "4 GPUs per node" in out and "64 KiB" in out
    assert cli.main(["plan", "--workers", "-1"]) == 2
