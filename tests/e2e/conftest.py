"""Trained runs shared by the eval/export tests: one tiny ZeRO-2 and one ZeRO-3 run per session.

Both are launched at once (most of a launch is process start-up) with periodic eval on, so the
sharded in-training evaluation is exercised too.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.support import runs

EVAL_STAGES = (2, 3)


def eval_overrides(data_dir: Path, zero: int) -> list[str]:
    return [
        f"deepspeed.config=ds_configs/zero{zero}.json",
        "eval.every=3",
        f"eval.zeroshot_dir={data_dir / 'val'}",
        f"eval.retrieval_shards={data_dir / 'val_pairs'}",
        "eval.batch_size=16",  # several batches per rank, with a ragged last one
    ]


@pytest.fixture(scope="session")
def eval_runs(synthetic_dir, tmp_path_factory) -> dict[int, Path]:
    """{ZeRO stage: finished run dir} (debug config: 6 steps, checkpoints at 3 and 6)."""
    root = tmp_path_factory.mktemp("eval_runs")
    procs = {}
    for zero in EVAL_STAGES:
        cmd = runs.train_command(
            root / f"zero{zero}", Path(synthetic_dir), eval_overrides(Path(synthetic_dir), zero)
        )
        procs[zero] = subprocess.Popen(
            cmd, cwd=runs.REPO, env=runs.test_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
    for zero, proc in procs.items():
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"ZeRO-{zero} run failed:\n{out[-3000:]}"
    return {zero: root / f"zero{zero}" for zero in EVAL_STAGES}


@pytest.fixture(scope="session")
def exported(eval_runs, tmp_path_factory) -> dict[int, Path]:
    """{ZeRO stage: HF directory exported from that run's last checkpoint}."""
    from trainer.interop.hf_export import export

    root = tmp_path_factory.mktemp("exports")
    return {zero: export(run, root / f"zero{zero}") for zero, run in eval_runs.items()}
