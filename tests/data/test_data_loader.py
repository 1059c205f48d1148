"""build_train_loader over tar shards: exact b per rank, disjoint shards, exact resume."""

from __future__ import annotations

import json

import pytest
import torch

from data.config import DataConfig
from data.loader import build_train_loader
from data.wds_source import WebDatasetSource
from tests.data.helpers import TOKENIZER, loader, same, take, wds_config


def test_every_rank_yields_exactly_b_with_the_right_shapes(synthetic_dir):
    cfg = wds_config(synthetic_dir / "train")
    for rank in range(3):
        # 8 shards of 30 over 3 ranks: at most 90 per epoch, so 7 batches of 16 roll over.
        it = loader(cfg, rank=rank, world_size=3, batch=16)
        for batch in take(it, 7):
            assert batch["pixel_values"].shape == (16, 3, 16, 16)
            assert batch["pixel_values"].dtype == torch.uint8
            assert batch["input_ids"].shape == batch["attention_mask"].shape == (16, 16)
            assert batch["input_ids"].dtype == torch.long
        assert it.state_dict()["positions"][0][0] == 1  # rolled into epoch 1 by itself


def test_ranks_and_workers_read_disjoint_shards_covering_all(synthetic_dir):
    source = WebDatasetSource.from_spec(
        str(synthetic_dir / "train"), seed=5, resampled=False, allow_pipe=False
    )
    for epoch in range(2):
        seen = [
            s for r in range(2) for w in range(2) for s in source.epoch_shards(epoch, r, 2, w, 2)
        ]
        assert sorted(seen) == sorted(source.shards)  # disjoint (no repeats) and complete
    assert source.epoch_shards(0, 0, 2, 0, 2) != source.epoch_shards(1, 0, 2, 0, 2)  # reshuffled


def test_ranks_get_different_data_and_brace_pattern_equals_directory(synthetic_dir):
    by_dir = wds_config(synthetic_dir / "train")
    by_brace = wds_config(synthetic_dir / "train" / "{000000..000007}.tar")
    assert same(take(loader(by_dir, world_size=2), 2), take(loader(by_brace, world_size=2), 2))
    r0 = take(loader(by_dir, rank=0, world_size=2), 1)[0]
    r1 = take(loader(by_dir, rank=1, world_size=2), 1)[0]
    assert not torch.equal(r0["pixel_values"], r1["pixel_values"])


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("k", [3, 5])
def test_resume_is_bit_identical(synthetic_dir, workers, k):
    """State after k batches -> new loader -> the next batches equal the uninterrupted run's,
    across an epoch boundary (rank 1 of 2 has 4 shards = 120 samples per epoch, split over
    the workers; 8 more batches of 12 run every worker into its next epoch)."""
    cfg = wds_config(synthetic_dir / "train", workers=workers)
    reference = loader(cfg, rank=1, world_size=2, batch=12)
    expected = take(reference, k + 8)
    assert any(epoch == 1 for epoch, _, _ in reference.state_dict()["positions"])
    interrupted = loader(cfg, rank=1, world_size=2, batch=12)
    take(interrupted, k)
    state = json.loads(json.dumps(interrupted.state_dict()))  # must survive JSON
    interrupted.close()
    resumed = loader(cfg, rank=1, world_size=2, batch=12)
    resumed.load_state_dict(state)
    assert same(take(resumed, 8), expected[k:])
    for it in (reference, resumed):
        it.close()


def test_workers_split_is_round_robin_and_in_process_matches_one_worker(synthetic_dir):
    two = loader(wds_config(synthetic_dir / "train", workers=2))
    batches = take(two, 4)
    two.close()
    assert [p[1] for p in two.state_dict()["positions"]] == [16, 16]  # 2 batches of 8 each
    zero = take(loader(wds_config(synthetic_dir / "train", workers=0)), 3)
    one = loader(wds_config(synthetic_dir / "train", workers=1))
    assert same(zero, take(one, 3))
    one.close()
    assert not same(batches[:1], zero[:1])  # two workers read different shards first


def test_resampled_mode_runs_forever_and_resumes_exactly(synthetic_dir):
    cfg = wds_config(synthetic_dir / "train", resampled=True)
    source = WebDatasetSource.from_spec(cfg.train_shards, seed=0, resampled=True, allow_pipe=False)
    draws = [s for e in range(20) for s in source.epoch_shards(e, 0, 1, 0, 1)]
    assert len(set(draws)) < len(draws)  # with replacement
    expected = take(loader(cfg), 40)  # 320 samples > one pass over 240
    resumed = loader(cfg)
    take(resumed, 17)
    state = resumed.state_dict()
    again = loader(cfg)
    again.load_state_dict(state)
    assert same(take(again, 23), expected[17:])


def test_other_seed_other_order(synthetic_dir):
    cfg = wds_config(synthetic_dir / "train")
    assert not same(take(loader(cfg, seed=0), 1), take(loader(cfg, seed=1), 1))


def test_state_from_another_layout_is_refused(synthetic_dir):
    state = loader(wds_config(synthetic_dir / "train")).state_dict()
    with pytest.raises(ValueError, match="world_size"):
        loader(wds_config(synthetic_dir / "train"), world_size=2).load_state_dict(state)


def test_pipe_urls_refused_unless_allowed(synthetic_dir):
    url = f"pipe:cat {synthetic_dir / 'train' / '000000.tar'}"
    cfg = DataConfig(train_shards=url, image_size=16)
    with pytest.raises(ValueError, match=r"^train_shards: 'pipe:'"):
        cfg.validate()
    with pytest.raises(ValueError, match="allow_pipe"):
        build_train_loader(
            cfg, rank=0, world_size=1, local_batch_size=4, tokenizer=TOKENIZER, seed=0
        )
    allowed = wds_config(url, allow_pipe=True)
    assert take(loader(allowed, batch=4), 1)[0]["pixel_values"].shape == (4, 3, 16, 16)


def test_worker_processes_hand_over_uint8_pinned_only_with_cuda(synthetic_dir):
    """The process path hands over uint8 too; pinned exactly when CUDA is available (so on a
    CPU machine this checks only that nothing is pinned: the pinned path needs a GPU)."""
    it = loader(wds_config(synthetic_dir / "train", workers=2), batch=4)
    batch = next(it)
    assert batch["pixel_values"].dtype == torch.uint8
    assert batch["pixel_values"].shape == (4, 3, 16, 16)
    assert it._iter._pin_memory == torch.cuda.is_available()  # the DataLoader's iterator
    assert batch["pixel_values"].is_pinned() == torch.cuda.is_available()
    it.close()
