"""The tar-shard loader: one global sample order over S logical streams, whatever the number of
ranks and workers; exact resume from a few buffered references; elastic resume.

A failure localises as follows: a union test fails → the placement of streams on ranks or the
per-stream chunking; a worker-count test fails → the assembly of worker chunks; a resume test
fails → the stream state (cursor, buffer references, generator); the bytes test fails → a
restore that reads from the start of the epoch again.
"""

from __future__ import annotations

import pytest
import torch

from data.config import DataConfig
from data.loader import build_train_loader
from data.shards import BYTES_READ
from data.wds_source import WebDatasetSource
from tests.data.helpers import TOKENIZER, loader, same, take, wds_config


def rows(batch: dict[str, torch.Tensor]) -> list[bytes]:
    """The batch's pairs as sortable byte strings (pixels + token ids), order forgotten."""
    n = batch["input_ids"].shape[0]
    return sorted(
        batch["pixel_values"][i].numpy().tobytes() + batch["input_ids"][i].numpy().tobytes()
        for i in range(n)
    )


def global_batches(cfg: DataConfig, world: int, steps: int, batch: int = 8) -> list[list[bytes]]:
    """The pairs of each global batch, gathered from every rank of a `world`-rank run."""
    ranks = [loader(cfg, rank=r, world_size=world, batch=batch // world) for r in range(world)]
    out = []
    for _ in range(steps):
        parts = [next(it) for it in ranks]
        out.append(sorted(r for p in parts for r in rows(p)))
    for it in ranks:
        it.close()
    return out


def test_every_rank_yields_exactly_b_with_the_right_shapes(synthetic_dir):
    cfg = wds_config(synthetic_dir / "train", streams=6)
    for rank in range(3):
        batch = next(loader(cfg, rank=rank, world_size=3, batch=4))
        assert batch["pixel_values"].shape == (4, 3, 16, 16)
        assert batch["pixel_values"].dtype == torch.uint8
        assert batch["input_ids"].shape == batch["attention_mask"].shape == (4, 16)


@pytest.mark.parametrize(("world", "workers"), [(2, 0), (4, 0), (2, 2), (4, 1)])
def test_global_batches_do_not_depend_on_ranks_or_workers(synthetic_dir, world, workers):
    """The samples of global batch t are fixed by (data, seed, B, S): 1 rank × 8 gives the same
    pairs, step by step and across an epoch boundary, as N ranks × 8/N with W workers each."""
    one = global_batches(wds_config(synthetic_dir / "train", streams=4), 1, 34)
    many = global_batches(
        wds_config(synthetic_dir / "train", streams=4, workers=workers), world, 34
    )
    assert many == one  # 34 × 8 = 272 > 240 samples: the second epoch starts in there


def test_streams_read_disjoint_shards_covering_all(synthetic_dir):
    source = WebDatasetSource.from_spec(
        str(synthetic_dir / "train"), seed=5, resampled=False, allow_pipe=False
    )
    for epoch in (0, 1):
        seen = [i for s in range(4) for i in source.stream_shards(epoch, s, 4)]
        assert sorted(seen) == list(range(len(source.shards)))
    assert source.stream_shards(0, 0, 4) != source.stream_shards(1, 0, 4)  # reshuffled per epoch


def test_worker_count_does_not_change_the_rank_batch(synthetic_dir):
    """Chunks are assembled in stream order, so even the row order is the same for any W."""
    runs = [take(loader(wds_config(synthetic_dir / "train", workers=w)), 3) for w in (0, 1, 2, 4)]
    assert all(same(runs[0], other) for other in runs[1:])


def test_brace_pattern_equals_directory_and_ranks_differ(synthetic_dir):
    by_dir = wds_config(synthetic_dir / "train")
    by_brace = wds_config(synthetic_dir / "train" / "{000000..000007}.tar")
    assert same(take(loader(by_dir, world_size=2), 2), take(loader(by_brace, world_size=2), 2))
    r0 = next(loader(by_dir, rank=0, world_size=2))
    r1 = next(loader(by_dir, rank=1, world_size=2))
    assert not torch.equal(r0["input_ids"], r1["input_ids"])


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("k", [1, 5, 31])  # 31 × 6 = 186 of 240: deep into the first epoch
def test_resume_is_bit_identical(synthetic_dir, workers, k):
    cfg = wds_config(synthetic_dir / "train", workers=workers)
    reference = loader(cfg, rank=1, world_size=2, batch=3)
    expected = take(reference, k + 12)
    reference.close()
    interrupted = loader(cfg, rank=1, world_size=2, batch=3)
    take(interrupted, k)
    state = interrupted.state_dict()
    interrupted.close()
    resumed = loader(cfg, rank=1, world_size=2, batch=3)
    resumed.load_state_dict(state)
    assert same(take(resumed, 12), expected[k:])
    resumed.close()


@pytest.mark.parametrize(("saved_world", "new_world"), [(2, 1), (1, 2), (2, 4)])
def test_elastic_resume_continues_the_same_global_order(synthetic_dir, saved_world, new_world):
    """States saved by N ranks, loaded by M ranks: the next global batches are those of an
    uninterrupted run (so no sample of the epoch is seen twice or skipped)."""
    cfg = wds_config(synthetic_dir / "train", streams=4)
    expected = global_batches(cfg, 1, 9)
    saved = [loader(cfg, rank=r, world_size=saved_world, batch=8 // saved_world)
             for r in range(saved_world)]  # fmt: skip
    for it in saved:
        take(it, 4)
    states = [it.state_dict() for it in saved]
    resumed = [loader(cfg, rank=r, world_size=new_world, batch=8 // new_world)
               for r in range(new_world)]  # fmt: skip
    for it in resumed:
        it.load_state_dict(states)
    got = [sorted(r for it in resumed for r in rows(next(it))) for _ in range(5)]
    assert got == expected[4:]


def test_restoring_reads_a_buffer_not_an_epoch(synthetic_dir):
    """Bytes read to restore a position and produce the next batch: about the same early and
    late in the epoch (the old loader replayed the epoch up to the position)."""
    cfg = wds_config(synthetic_dir / "train", streams=2, shuffle_buffer=4)

    def restore_cost(steps: int) -> int:
        first = loader(cfg, batch=2)
        take(first, steps)
        resumed = loader(cfg, batch=2)
        resumed.load_state_dict(first.state_dict())
        before = BYTES_READ[0]
        next(resumed)
        return BYTES_READ[0] - before

    early, late = restore_cost(2), restore_cost(100)  # 100 × 2 of 240 samples: 83% in
    assert late <= 1.5 * early, (early, late)


def test_resampled_mode_runs_forever_and_resumes_exactly(synthetic_dir):
    cfg = wds_config(synthetic_dir / "train", resampled=True)
    source = WebDatasetSource.from_spec(cfg.train_shards, seed=0, resampled=True, allow_pipe=False)
    assert source.stream_shards(0, 0, 2) != source.stream_shards(0, 1, 2)
    expected = take(loader(cfg), 40)  # 320 samples > one pass over 240
    resumed = loader(cfg)
    take(resumed, 33)
    again = loader(cfg)
    again.load_state_dict(resumed.state_dict())
    assert same(take(again, 7), expected[33:])


def test_one_shard_needs_resampled_mode(synthetic_dir):
    one = wds_config(synthetic_dir / "train" / "000000.tar", streams=2)
    with pytest.raises(ValueError, match=r"data\.resampled=true"):
        loader(one, world_size=2, batch=4)
    assert next(
        loader(wds_config(one.train_shards, streams=2, resampled=True), world_size=2, batch=4)
    )


def test_other_seed_other_order(synthetic_dir):
    cfg = wds_config(synthetic_dir / "train")
    assert not same(take(loader(cfg, seed=0), 1), take(loader(cfg, seed=1), 1))


def test_state_from_another_order_is_refused(synthetic_dir):
    state = loader(wds_config(synthetic_dir / "train")).state_dict()
    with pytest.raises(ValueError, match="streams"):
        loader(wds_config(synthetic_dir / "train", streams=4)).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        loader(wds_config(synthetic_dir / "train"), seed=3).load_state_dict(state)


def test_pipe_urls_refused_unless_allowed_and_resume_by_replay(synthetic_dir):
    url = f"pipe:cat {synthetic_dir / 'train' / '{000000..000001}.tar'}"
    cfg = DataConfig(train_shards=url, image_size=16)
    with pytest.raises(ValueError, match=r"^train_shards: 'pipe:'"):
        cfg.validate()
    with pytest.raises(ValueError, match="allow_pipe"):
        build_train_loader(
            cfg, rank=0, world_size=1, local_batch_size=4, tokenizer=TOKENIZER, seed=0
        )
    allowed = wds_config(url, allow_pipe=True, streams=1)
    expected = take(loader(allowed, batch=4), 6)
    assert expected[0]["pixel_values"].shape == (4, 3, 16, 16)
    first = loader(allowed, batch=4)
    take(first, 3)
    resumed = loader(allowed, batch=4)
    resumed.load_state_dict(first.state_dict())  # a pipe cannot seek: the epoch is replayed
    assert same(take(resumed, 3), expected[3:])


def test_worker_processes_hand_over_uint8_pinned_only_with_cuda(synthetic_dir):
    """The process path hands over uint8 too; pinned exactly when CUDA is available (so on a
    CPU machine this checks only that nothing is pinned: the pinned path needs a GPU)."""
    it = loader(wds_config(synthetic_dir / "train", workers=2), batch=4)
    batch = next(it)
    assert batch["pixel_values"].dtype == torch.uint8
    assert batch["pixel_values"].shape == (4, 3, 16, 16)
    assert batch["pixel_values"].is_pinned() == torch.cuda.is_available()
    it.close()
