"""Gradient caching on CUDA: K = 2 chunks give the plain step's weights, and dropout is replayed.

Two checks, because "equal to the plain step" has two parts and, with dropout on, only one of
them can be seen from whole runs:

1. Whole runs (bf16, ZeRO-2, the trainer's entry point): train.grad_cache_chunks=2 against =1,
   same seed, 4 steps, final fp32 master weights compared. Dropout is OFF here: a plain step
   draws one attention-dropout mask for all b rows, K chunks draw one per chunk (in another
   order across layers), so with dropout on two correct runs differ by the dropout noise itself
   and no tolerance would separate a bug from that.
2. Dropout ON (attention_dropout 0.3), on the GPU, in process: `trainer.step.train_step` with
   chunks=2 must produce exactly the gradients of one backward over the same two chunks with
   the same masks, i.e. the re-encode must replay the masks of the graph-free encode. On CUDA
   the masks come from the CUDA generator, which `torch.get_rng_state()` does not hold: this is
   the check that the replay covers it.
"""

from __future__ import annotations

import copy

import torch

from tests.gpu.jobs import uses
from tests.support.models import RecordingEngine
from trainer.interop.run_checkpoint import fp32_state_dict, resolve_checkpoint
from trainer.losses import make_objective
from trainer.losses.registry import LossConfig
from trainer.model import ModelConfig, TokenIds, build_clip_config, build_model
from trainer.step import train_step

# Relative difference of the two runs' weight updates, ||w_K2 - w_K1|| / ||w_K1 - w_0||.
#
# Both runs compute the same math in bf16 with fp32 accumulation; they differ in the order of
# reductions only: the towers' GEMMs run on b/2 rows instead of b (cuBLAS may pick other tiles
# or split-K, so some bf16 outputs round the other way), and the K = 2 step accumulates each
# parameter's gradient over two backward passes. bf16 keeps 8 significant bits, a unit roundoff
# u = 2^-8 ≈ 3.9e-3: an output that rounds the other way differs by one ulp (≤ 2u relative),
# and only some outputs do, so a step's gradient differs by about u in norm. With eps = 1
# Adam's update is ≈ lr·m, linear in the gradient (as in tests/e2e/test_grad_cache_zero.py:
# the default eps would turn the rounding noise of parameters whose true gradient is ~0 into
# lr-sized steps), so the 4 steps' updates inherit that: expected ≈ u. Measured with these
# very runs on CPU (bf16, oneDNN): 3.1e-3 (lr 0.5) and 3.9e-3 (lr 0.1), i.e. ≈ u. Tolerance
# 2e-2 ≈ 5u: room for the GPU's other kernels and reduction orders. The bugs this is for are
# 15× above it: a chunk's gradient lost or counted twice, or the scalar logit_scale's gradient
# added per chunk, change the update by ~0.3 or more.
TOLERANCE = 2e-2


def _flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([state[k].double().flatten() for k in sorted(state)])


def _weights(job) -> dict[str, torch.Tensor]:
    return fp32_state_dict(resolve_checkpoint(job.check().run_dir))


@uses("gc_k1", "gc_k2", "gc_w0")
def test_grad_cache_two_chunks_matches_plain_step_bf16(gpu_jobs) -> None:
    plain, cached, start = (_weights(gpu_jobs.get(n)) for n in ("gc_k1", "gc_k2", "gc_w0"))
    assert plain.keys() == cached.keys() == start.keys()
    w1, w2, w0 = _flat(plain), _flat(cached), _flat(start)
    moved = (w1 - w0).norm().item()
    assert moved > 1e-3 * w1.norm().item(), "training hardly moved the weights: no comparison"
    relative = (w2 - w1).norm().item() / moved
    worst = max(((plain[k] - cached[k]).abs().max().item(), k) for k in plain)
    assert relative <= TOLERANCE, (
        f"||w_K2 - w_K1|| / ||w_K1 - w_0|| = {relative:.2e} > {TOLERANCE:.0e} "
        f"(largest |Δw| {worst[0]:.2e} in {worst[1]})"
    )


class CallRecordingEngine(RecordingEngine):
    """RecordingEngine on CUDA that also records every forward's inputs (as train_step
    prepared them) with whether autograd was on."""

    def __init__(self, module: torch.nn.Module):
        super().__init__(module)
        self.calls: list[tuple[tuple[torch.Tensor, ...], bool]] = []

    def __call__(self, *inputs):
        self.calls.append((tuple(t.detach().clone() for t in inputs), torch.is_grad_enabled()))
        return self.module(*inputs)


def _one_backward(model, chunks_inputs, seed: int) -> dict[str, torch.Tensor]:
    """Encode the chunks WITH graphs, the RNG advancing from `seed` as in a graph-free pass
    over the same chunks, and one backward of the loss over all rows."""
    torch.manual_seed(seed)
    images, texts, scale = [], [], None
    for inputs in chunks_inputs:
        image, text, scale, _ = model(*inputs)
        images.append(image)
        texts.append(text)
    make_objective(LossConfig())(torch.cat(images), torch.cat(texts), scale, None).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_grad_cache_replays_cuda_dropout() -> None:
    chunks, b, ctx, dropout = 2, 16, 8, 0.3
    device = torch.device("cuda", 0)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32
    try:
        torch.manual_seed(0)
        cfg = ModelConfig(preset="tiny", attention_dropout=dropout)
        model = build_model(
            cfg, build_clip_config(cfg, TokenIds(100, 1, 2, 0), ctx), with_bias=False, zero3=False
        )
        model = model.to(device).train()
        reference = copy.deepcopy(model)
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(3, 100, (b, ctx), generator=gen)
        ids[:, 5] = 2  # eos
        batch = {
            "pixel_values": torch.randint(0, 256, (b, 3, 32, 32), generator=gen, dtype=torch.uint8),
            "input_ids": ids,
            "attention_mask": torch.ones(b, ctx, dtype=torch.long),
        }  # loader-like: uint8 pixels on the host; train_step prepares them for the model

        engine = CallRecordingEngine(model)
        torch.manual_seed(7)
        train_step(engine, batch, make_objective(LossConfig()), chunks=chunks, dtype=torch.float32)
        encode = [inputs for inputs, grad in engine.calls if not grad]
        reencode = [inputs for inputs, grad in engine.calls if grad]
        assert len(encode) == len(reencode) == chunks, "expected K graph-free and K graph calls"
        for first, again in zip(encode, reencode, strict=True):
            assert all(torch.equal(x, y) for x, y in zip(first, again, strict=True))

        expected = _one_backward(reference, encode, seed=7)
        assert engine.grads is not None and engine.grads.keys() == expected.keys()
        for name, grad in expected.items():
            assert torch.allclose(engine.grads[name], grad, rtol=1e-4, atol=1e-6), (
                f"{name}: max |Δ| {(engine.grads[name] - grad).abs().max().item():.2e}: the "
                "re-encode did not replay the CUDA dropout masks"
            )

        # Teeth: dropout is live on CUDA, and other masks give visibly other gradients.
        other = copy.deepcopy(reference)
        for p in other.parameters():
            p.grad = None
        wrong = _one_backward(other, encode, seed=12345)
        name = "visual_projection.weight"
        assert not torch.allclose(wrong[name], expected[name], rtol=1e-3, atol=1e-6)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
