"""Real training runs on CUDA: `python -m torch.distributed.run -m trainer.train --config
trainer/configs/debug.yaml ...` on GPU_CHECK_NPROC GPUs (default 1; tests/gpu/jobs.py).

The debug config (tiny model, 32-px synthetic data) for 20 steps at bf16 ZeRO-2 (with periodic
eval) and bf16 ZeRO-3 with gradient checkpointing, fp16 with DeepSpeed's dynamic loss scaling,
then the export of the ZeRO-2 run through the Hugging Face pipeline on the GPU.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.gpu.jobs import TRAIN_STEPS, uses
from trainer.checkpoint import complete_tags
from trainer.metrics import read_metrics


def assert_trained(run_dir: Path, *, allow_skipped: bool = False) -> list[float]:
    """All TRAIN_STEPS steps logged with finite losses, the last checkpoint complete; the
    losses."""
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, TRAIN_STEPS + 1))
    losses = [r["loss"] for r in records]
    assert all(math.isfinite(x) for x in losses), losses
    if not allow_skipped:
        assert records[-1]["skipped_steps"] == 0, records[-1]
    assert complete_tags(run_dir / "checkpoints")[-1] == f"step_{TRAIN_STEPS:08d}"
    return losses


def assert_decreases(losses: list[float]) -> None:
    # CPU reference (same config, fp32, 1 rank): 3.05 over the first 5 steps -> 2.71 over the
    # last 5; at B = 16·N the contrastive loss starts near ln(B) and falls as soon as the
    # logit scale and the towers learn.
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first, f"loss did not decrease: first 5 mean {first:.4f}, last 5 {last:.4f}"


@uses("z2_bf16")
def test_bf16_zero2_trains(gpu_jobs) -> None:
    job = gpu_jobs.get("z2_bf16").check()
    assert_decreases(assert_trained(job.run_dir))


@uses("z3_bf16_ckpt")
def test_bf16_zero3_with_gradient_checkpointing_trains(gpu_jobs) -> None:
    job = gpu_jobs.get("z3_bf16_ckpt").check()
    assert_decreases(assert_trained(job.run_dir))


@uses("z2_fp16")
def test_fp16_dynamic_loss_scaling_trains(gpu_jobs) -> None:
    """fp16 starts at a loss scale of 2^16 (ds_configs: initial_scale_power 16): DeepSpeed
    itself skips the steps whose scaled gradients overflow and lowers the scale; the loss the
    trainer logs stays finite throughout."""
    job = gpu_jobs.get("z2_fp16").check()
    assert_trained(job.run_dir)


def _val_images(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "val").glob("*/*.jpg"))


@uses("z2_bf16")
def test_periodic_eval_on_gpu(gpu_jobs, synthetic_dir) -> None:
    job = gpu_jobs.get("z2_bf16").check()
    records = read_metrics(job.run_dir, "eval")
    assert [r["step"] for r in records] == [10, 20]
    n_images = len(_val_images(Path(synthetic_dir)))
    for record in records:
        assert record["zeroshot_images"] == n_images, record
        assert record["retrieval_pairs"] == n_images, record  # val_pairs: as many as val
        scores = {k: v for k, v in record.items() if k.startswith(("zeroshot_top", "retrieval_"))}
        scores = {k: v for k, v in scores.items() if k != "retrieval_pairs"}
        assert "zeroshot_top1" in scores and "retrieval_i2t_r1" in scores, record
        assert all(0.0 <= v <= 1.0 for v in scores.values()), record


@uses("z2_bf16")
def test_export_then_hf_pipeline_on_gpu(gpu_jobs, synthetic_dir, tmp_path) -> None:
    from PIL import Image
    from transformers import pipeline

    from trainer.interop.hf_export import export

    job = gpu_jobs.get("z2_bf16").check()
    out = export(job.run_dir, tmp_path / "hf")
    names = (Path(synthetic_dir) / "classnames.txt").read_text().split("\n")
    names = [n for n in names if n.strip()]
    classifier = pipeline("zero-shot-image-classification", model=str(out), device=0)
    assert classifier.device.type == "cuda"
    assert next(classifier.model.parameters()).is_cuda
    paths = _val_images(Path(synthetic_dir))[::10][:6]
    images = [Image.open(p).convert("RGB") for p in paths]
    results = classifier(images, candidate_labels=names, hypothesis_template="a photo of a {}.")
    assert len(results) == len(images)
    for path, ranked in zip(paths, results, strict=True):
        assert sorted(r["label"] for r in ranked) == sorted(names), path
        scores = torch.tensor([r["score"] for r in ranked])
        assert torch.isfinite(scores).all(), path
        assert scores.sum().item() == pytest.approx(1.0, abs=1e-3), path
