"""Run metrics: RUN/metrics.jsonl, TensorBoard, a tqdm bar and a summary line (rank 0 only).

metrics.jsonl holds one JSON object per record, with a "kind" ("train" per step, "eval" per
evaluation). On resume, records past the resumed step are dropped first, so an interrupted and
resumed run has exactly the file an uninterrupted run would have.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class LogConfig:
    every: int = 10
    """Print a one-line summary every this many steps (metrics.jsonl gets every step)."""
    tensorboard: bool = True
    """Also write TensorBoard event files under RUN/tensorboard."""
    progress_bar: bool = True
    """tqdm bar on rank 0 when stderr is a terminal."""

    def validate(self) -> None:
        if self.every < 1:
            raise ValueError(f"every must be >= 1 step, got {self.every}")


def read_metrics(run_dir: str | Path, kind: str = "train") -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("kind") == kind]


def truncate_after(path: Path, step: int) -> None:
    """Drop records past `step` (atomically): they belong to the part of a run being redone."""
    if not path.is_file():
        return
    kept = [
        line
        for line in path.read_text().splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= step
    ]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


class MetricsLogger:
    def __init__(
        self, cfg: LogConfig, run_dir: Path, *, enabled: bool, total_steps: int, start_step: int
    ):
        self.cfg, self.enabled = cfg, enabled
        self.path = run_dir / "metrics.jsonl"
        self._tb = self._bar = None
        self._last_time = time.perf_counter()
        if not enabled:
            return
        truncate_after(self.path, start_step)
        self._file = self.path.open("a")
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)
        if cfg.progress_bar and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def log(self, kind: str, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(f"{kind}/{key}", value, step)
        if kind == "train" and self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{values['loss']:.4f}")
        if kind != "train" or step % self.cfg.every == 0:
            shown = " ".join(f"{k}={_fmt(v)}" for k, v in values.items())
            print(
                f"[{kind}] step {step} {shown}",
                file=sys.stderr if self._bar else sys.stdout,
                flush=True,
            )

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._bar is not None:
            self._bar.close()


def _fmt(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"
