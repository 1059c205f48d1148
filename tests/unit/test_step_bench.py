"""bench/step_bench.py's arithmetic and report (no processes)."""

from __future__ import annotations

import pytest

from bench import step_bench as sb


def _rows(ms: float, n: int = 3) -> list[sb.Row]:
    """n identical steps of `ms` wall (split over the phases) and ms/2 CPU."""
    s = ms / 1e3
    return [(s / 4, s / 2, s / 4, s / 2)] * n


def test_ratio_is_the_median_of_per_round_ratios() -> None:
    # Round 2 is slow for everyone (load on the machine): a per-round ratio does not see it.
    timings = {
        sb.DDP: [_rows(40), _rows(80), _rows(40)],
        "ZeRO-2": [_rows(44), _rows(88), _rows(60)],
    }
    assert sb.ratio_vs_ddp(timings, "ZeRO-2") == pytest.approx(1.1)
    assert sb.ratio_vs_ddp(timings, "ZeRO-2", sb.CPU) == pytest.approx(1.1)


@pytest.mark.parametrize(("zero2_ms", "verdict"), [(45, "met"), (47, "NOT met")])
def test_report_ends_with_the_ratio_line_and_verdict(zero2_ms: float, verdict: str) -> None:
    spec = sb.parse_args(["--stages", "0", "2", "--rounds", "1", "--steps", "3"])
    assert [v.name for v in spec.variants] == [sb.DDP, "ZeRO-0", "ZeRO-2"]
    timings = {sb.DDP: [_rows(40)], "ZeRO-0": [_rows(40)], "ZeRO-2": [_rows(zero2_ms)]}
    last = sb.format_report(spec, timings).splitlines()[-1]
    assert last.startswith("ratios vs DDP: ZeRO-0 1.00x, ZeRO-2 ")
    assert last.endswith(f"goal ZeRO-2 <= 1.15x: {verdict}")


def test_report_without_zero2_says_not_measured() -> None:
    spec = sb.parse_args(["--stages", "3"])
    timings = {sb.DDP: [_rows(40)], "ZeRO-3": [_rows(80)]}
    assert sb.format_report(spec, timings).endswith("goal ZeRO-2 <= 1.15x: not measured")


def test_set_overrides_reach_every_stage_as_numbers_and_booleans() -> None:
    spec = sb.parse_args(
        ["--set", "zero_optimization.reduce_bucket_size=2e6",
         "--set", "zero_optimization.overlap_comm=false"]
    )  # fmt: skip
    for variant in spec.variants[1:]:
        assert variant.overrides == {
            "zero_optimization.reduce_bucket_size": 2_000_000,
            "zero_optimization.overlap_comm": False,
        }
