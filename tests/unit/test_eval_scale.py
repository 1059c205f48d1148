"""Eval at scale: each rank (and each loader worker) decodes only its own share of a set, a
2-process eval equals a 1-process one exactly, and zero-shot classifiers are kept across
periodic evals only while the text side is locked.

A failure here localises to data/eval_loader.py (the share arithmetic, or a reader decoding
someone else's samples), to the gather in trainer/eval/evaluate.py (a 2-process result that
differs), or to ClassEmbeddingCache (a stale or a recomputed classifier).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from data.eval_loader import ListedSet, ShardSet, Share, _RankShare
from tests.support.localdist import run_ranks
from tests.support.models import tiny_hf_clip
from trainer.eval.evaluate import ClassEmbeddingCache, EvalConfig, evaluate, periodic_cache
from trainer.eval.suites import imagenet_wnids, shipped_list


@pytest.mark.parametrize(("world", "workers"), [(1, 1), (2, 1), (2, 3), (3, 2)])
def test_every_sample_has_exactly_one_reader(world, workers):
    readers = [Share(r, world, w, workers) for r in range(world) for w in range(workers)]
    for index in range(60):
        assert sum(share.owns(index) for share in readers) == 1, index
    # A rank's share is i ≡ rank (mod W), whatever the number of its workers.
    for r in range(world):
        mine = {i for i in range(60) for w in range(workers) if Share(r, world, w, workers).owns(i)}
        assert mine == set(range(r, 60, world))


def _decode_counts(source, world: int) -> tuple[list[int], list[set[int]]]:
    """(decodes per rank, indices per rank) when each rank reads `source` in-process."""
    counts, seen = [], []
    for rank in range(world):
        calls = []

        def crop(image, calls=calls):
            calls.append(image)
            return torch.zeros(3, 2, 2, dtype=torch.uint8)

        seen.append({index for index, _, _ in _RankShare(source, crop, rank, world)})
        counts.append(len(calls))
    return counts, seen


def test_tar_shards_are_decoded_once_in_all_not_once_per_rank(synthetic_dir):
    source = ShardSet(str(synthetic_dir / "val_pairs"), "label")
    total = sum(1 for _ in ShardSet(source.spec, "label").read(Share()))
    counts, seen = _decode_counts(source, world=3)
    assert sum(counts) == total  # the old reader decoded `total` images on every rank
    assert max(counts) - min(counts) <= 1
    assert set().union(*seen) == set(range(total))
    assert all(not (a & b) for a, b in itertools.combinations(seen, 2))


def test_listed_sets_split_the_same_way(tmp_path):
    items = [(tmp_path / f"{i}.png", i % 3) for i in range(11)]
    counts, seen = _decode_counts(ListedSet(items), world=2)
    assert counts == [6, 5] and seen == [set(range(0, 11, 2)), set(range(1, 11, 2))]


def test_shard_limit_counts_stored_samples(synthetic_dir):
    limited = ShardSet(str(synthetic_dir / "val_pairs"), "label", limit=7)
    assert [i for i, _, _ in limited.read(Share())] == list(range(7))


# ---- 2 processes vs 1 ------------------------------------------------------------------------


def _suite_fixture(root) -> str:
    """An ImageNet-R-style wnid folder: 3 of the 200 classes, 3 images each."""
    from PIL import Image

    subset = shipped_list("imagenet_r_wnids")
    g = torch.Generator().manual_seed(1)
    for wnid in subset[:3]:
        (root / wnid).mkdir(parents=True)
        for i in range(3):
            pixels = (torch.rand(12, 16, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / wnid / f"{i}.JPEG")
    assert subset[0] in imagenet_wnids()
    return str(root)


def _config(synthetic_dir, suite_root, templates, *, workers: int, batch: int) -> EvalConfig:
    return EvalConfig(
        zeroshot_dir=str(synthetic_dir / "val_pairs"),  # tar shards with int labels
        classnames=str(synthetic_dir / "classnames.txt"),
        retrieval_shards=str(synthetic_dir / "val_pairs"),
        suites={"imagenet_r": suite_root}, suite_templates=templates,
        max_samples=40, workers=workers, batch_size=batch,
    )  # fmt: skip


def _eval_on_rank(rank: int, world: int, synthetic_dir, suite_root, templates) -> dict:
    model, tok = tiny_hf_clip()
    cfg = _config(synthetic_dir, suite_root, templates, workers=1, batch=3)
    return evaluate(model, tok, cfg, rank=rank, world_size=world)


def test_two_process_eval_equals_one_process_eval_exactly(synthetic_dir, tmp_path):
    templates = tmp_path / "one_template.txt"
    templates.write_text("a photo of a {}.\n")
    suite_root = _suite_fixture(tmp_path / "imagenet-r")
    model, tok = tiny_hf_clip()
    single = evaluate(model, tok, _config(synthetic_dir, suite_root, str(templates), workers=0,
                                          batch=64))  # fmt: skip
    assert single["zeroshot_images"] == 40 and single["imagenet_r_images"] == 9
    for got in run_ranks(_eval_on_rank, 2, synthetic_dir, suite_root, str(templates)):
        assert got == single


# ---- classifiers kept across periodic evals --------------------------------------------------


def test_classifier_is_kept_across_evals_only_while_the_text_side_is_locked(synthetic_dir):
    model, tok = tiny_hf_clip()
    cfg = EvalConfig(zeroshot_dir=str(synthetic_dir / "val"), max_samples=8, workers=0)

    trainable = ClassEmbeddingCache()
    first = evaluate(model, tok, cfg, cache=trainable)
    assert evaluate(model, tok, cfg, cache=trainable) == first
    assert trainable.computed == 2  # the text side may have trained in between: recomputed

    for module in (model.text_model, model.text_projection):
        module.requires_grad_(False)  # lock_text
    locked = ClassEmbeddingCache()
    assert evaluate(model, tok, cfg, cache=locked) == first
    assert evaluate(model, tok, cfg, cache=locked) == first
    assert locked.computed == 1
    assert periodic_cache(model) is periodic_cache(model)


def test_eval_command_under_torchrun_prints_what_one_process_prints(synthetic_dir, tmp_path):
    """`torchrun --nproc_per_node 2 -m trainer.cli eval`: rank 0 reports, ranks split the set."""
    import os
    import subprocess
    import sys

    model, tok = tiny_hf_clip()
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    args = ["-m", "trainer.cli", "eval", "--model", str(tmp_path / "model"),
            "--zeroshot", str(synthetic_dir / "val_pairs"), "--classnames",
            str(synthetic_dir / "classnames.txt"), "--retrieval", str(synthetic_dir / "val_pairs"),
            "--max-samples", "30", "--workers", "1", "--device", "cpu"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(prefix: list[str]) -> str:
        done = subprocess.run([sys.executable, *prefix, *args], capture_output=True, text=True,
                              env=env, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout

    one = run([])
    two = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"])
    assert "zeroshot_top1" in one and two == one
