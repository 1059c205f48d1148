"""bench/loader_bench.py: its arithmetic and checks, that its decode counter does see decoding
in the training process, and one real run with tiny settings that prints the ratio last."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from bench import loader_bench as lb

REPO = Path(__file__).resolve().parents[2]


def _rank_row(loader1: float, loader2: float, step: float, main_decodes: int = 0) -> dict:
    def loader(rate):
        return {"samples_per_s": rate, "uint8": True, "main_decodes": main_decodes,
                "main_resizes": 0}  # fmt: skip

    return {"loader1": loader(loader1), "loader2": loader(loader2), "step": {"samples_per_s": step}}


def test_loader_rates_add_up_over_ranks_and_the_step_is_rank_0s() -> None:
    per_rank = [[_rank_row(1000, 1500, 800)], [_rank_row(1100, 1400, 790)]]
    assert lb.combine(per_rank) == [{"loader1": 2100, "loader2": 2900, "step": 800}]


def test_report_ends_with_the_ratios_and_their_verdicts() -> None:
    rounds = [{"loader1": 2100, "loader2": 2900, "step": 1000},
              {"loader1": 1900, "loader2": 3100, "step": 1000}]  # fmt: skip
    lines = lb.report(rounds, [1, 2]).splitlines()
    assert lines[-2] == "loader/step, data.workers=1: 2.00x (goal >= 2x: met)"
    assert lines[-1] == "loader/step, data.workers=2: 3.00x (goal >= 2x: met)"
    slow = lb.report([{"loader1": 1500, "loader2": 1900, "step": 1000}], [1, 2])
    assert slow.splitlines()[-1].endswith("1.90x (goal >= 2x: NOT met)")


def test_decode_checks_name_work_done_in_a_training_process() -> None:
    assert lb.decode_checks([[_rank_row(1, 1, 1)]], [1, 2]) == []
    problems = lb.decode_checks([[_rank_row(1, 1, 1, main_decodes=64)]], [1, 2])
    assert problems[0] == "rank 0, workers 1: the training process decoded 64 images and resized 0"


def test_the_decode_counter_sees_in_process_decoding_and_none_with_workers(tmp_path) -> None:
    """Without workers the training process decodes (the counter must see it); with one worker
    it must see nothing, while uint8 batches still arrive."""
    data = lb.ensure_data(64, tmp_path / "data")
    cfg0 = lb.demo_config(data, tmp_path / "run", 2, workers=0)
    cfg1 = lb.demo_config(data, tmp_path / "run", 2, workers=1)
    in_process = lb.loader_rate(cfg0, rank=0, world=2, warmup=1, batches=1)
    assert in_process["main_decodes"] == 2 * 64 and in_process["main_resizes"] == 2 * 64
    with_worker = lb.loader_rate(cfg1, rank=0, world=2, warmup=1, batches=1)
    assert (with_worker["main_decodes"], with_worker["main_resizes"]) == (0, 0)
    assert with_worker["uint8"] and in_process["uint8"]


def test_the_bench_runs_and_prints_the_ratio_last(tmp_path) -> None:
    cmd = [sys.executable, "-m", "bench.loader_bench", "--samples", "320", "--rounds", "1",
           "--warmup", "1", "--batches", "2", "--steps", "2", "--data", str(tmp_path / "d")]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert "decode in loader workers, uint8 hand-over: checked" in lines
    assert re.fullmatch(
        r"loader/step, data\.workers=2: \d+\.\d\dx \(goal >= 2x: (met|NOT met)\)", lines[-1]
    )
