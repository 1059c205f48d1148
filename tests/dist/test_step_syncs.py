"""A training step makes one collective and one host sync, and carries the stop flag and the
skip counts on it (issue 17: no synchronisation per step that is not needed).

Two real gloo ranks run `train_step` (plain and with gradient caching) around a plain module
(tests/support/models.RecordingEngine, so DeepSpeed's own reductions are not counted). The
test wraps, never replaces, `dist.all_reduce` and counts it, and counts every
`Tensor.item` / `Tensor.tolist` our step calls. A second collective or a stray `.item()` after
the optimizer step (each a GPU stream stall) fails here; so does a stop request or a skip
count that another rank does not see.
"""

from __future__ import annotations

import torch

from tests.support.localdist import run_ranks


def _count_step(rank: int, world: int, chunks: int) -> dict:
    import torch.distributed as dist

    import trainer.step as step_module
    from tests.support.models import RecordingEngine, trainable_clip_and_batch
    from trainer.losses import make_objective
    from trainer.losses.registry import LossConfig

    model, batch = trainable_clip_and_batch(dropout=0.0)
    engine = RecordingEngine(model)
    objective = make_objective(LossConfig())
    calls = {"all_reduce": 0, "host": 0}
    real_all_reduce, real_item, real_tolist = (
        dist.all_reduce,
        torch.Tensor.item,
        torch.Tensor.tolist,
    )

    def all_reduce(*args, **kwargs):
        calls["all_reduce"] += 1
        return real_all_reduce(*args, **kwargs)

    def counted(real):
        def wrapper(self, *args, **kwargs):
            calls["host"] += 1
            return real(self, *args, **kwargs)

        return wrapper

    signals = step_module.RankSignals(stop_requested=rank == 1, skipped_samples=3 + rank)
    step_module.dist.all_reduce = all_reduce
    torch.Tensor.item, torch.Tensor.tolist = counted(real_item), counted(real_tolist)
    try:
        out = step_module.train_step(engine, batch, objective, chunks=chunks,
                                     dtype=torch.float32, signals=signals)  # fmt: skip
    finally:
        step_module.dist.all_reduce = real_all_reduce
        torch.Tensor.item, torch.Tensor.tolist = real_item, real_tolist
    return {**calls, "stop": out.stop, "skipped": out.skipped_samples, "applied": out.applied,
            "loss": out.loss, "scale": out.logit_scale}  # fmt: skip


def test_one_collective_and_one_host_sync_per_step():
    for chunks in (1, 2):
        got = run_ranks(_count_step, 2, chunks)
        for rank_out in got:
            assert rank_out["all_reduce"] == 1, (chunks, rank_out)
            assert rank_out["host"] == 1, (chunks, rank_out)
            assert rank_out["stop"] is True  # rank 1 asked; both ranks stop
            assert rank_out["skipped"] == 3 + 4
            assert rank_out["applied"] is True
        assert got[0]["loss"] == got[1]["loss"] and got[0]["scale"] == got[1]["scale"]
        assert abs(got[0]["scale"] - torch.log(torch.tensor(1 / 0.07)).item()) < 1e-5
