"""`disco-clip plot RUN_DIR`: training loss and zero-shot top-1 against steps, as PNGs.

The two panels of the paper's appendix Fig. 1, read from RUN/metrics.jsonl and written to
RUN/plots/loss.png, RUN/plots/zeroshot_top1.png and both side by side in RUN/plots/curves.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trainer.metrics import read_metrics


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if key in r]
    return [s for s, _ in points], [v for _, v in points]


def _draw_loss(ax, run_dir: Path) -> None:
    steps, loss = _series(read_metrics(run_dir, "train"), "loss")
    ax.plot(steps, loss, linewidth=1)
    ax.set(xlabel="step", ylabel="training loss", title="Training loss")
    ax.grid(alpha=0.3)


def _draw_accuracy(ax, run_dir: Path) -> None:
    steps, top1 = _series(read_metrics(run_dir, "eval"), "zeroshot_top1")
    ax.plot(steps, [100 * v for v in top1], marker="o", linewidth=1)
    ax.set(xlabel="step", ylabel="zero-shot top-1 (%)", title="Zero-shot top-1 accuracy")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write the PNGs; returns their paths. Raises FileNotFoundError without metrics."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    if not read_metrics(run_dir, "train"):
        raise FileNotFoundError(f"{run_dir}/metrics.jsonl has no training records")
    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    written = []
    for name, draws in (
        ("loss.png", [_draw_loss]),
        ("zeroshot_top1.png", [_draw_accuracy]),
        ("curves.png", [_draw_loss, _draw_accuracy]),
    ):
        fig, axes = plt.subplots(1, len(draws), figsize=(5 * len(draws), 3.6), squeeze=False)
        for ax, draw in zip(axes[0], draws, strict=True):
            draw(ax, run_dir)
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        written.append(out / name)
    return written


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("plot", help="PNG curves of loss and zero-shot accuracy")
    parser.add_argument("run_dir", type=Path, help="a run directory (holds metrics.jsonl)")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        paths = plot_run(args.run_dir)
    except FileNotFoundError as err:
        print(f"disco-clip plot: error: {err}", file=sys.stderr)
        return 2
    for path in paths:
        print(f"wrote {path}")
    return 0
