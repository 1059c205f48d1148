"""The exported model card carries the run's final eval, ImageNet-family table included."""

from __future__ import annotations

from pathlib import Path

from trainer.config import Config
from trainer.interop.hf_export import model_card
from trainer.interop.run_checkpoint import CheckpointRef


def _card(evals: dict | None, suites: dict[str, str]) -> str:
    cfg = Config()
    cfg.eval.suites = suites
    ref = CheckpointRef(Path("runs/x"), Path("runs/x/checkpoints"), "step_00000010")
    return model_card(ref, cfg, evals, bias=None)


def test_card_has_the_paper_style_table_of_the_final_eval():
    evals = {"kind": "eval", "step": 10, "imagenet_top1": 0.3125, "imagenet_top5": 0.6,
             "imagenet_r_top1": 0.05, "imagenet_r_top5": 0.2}  # fmt: skip
    card = _card(evals, {"imagenet": "/data/val", "imagenet_r": "/data/r"})
    header = next(line for line in card.splitlines() if "ImageNet-R" in line and "|" in line)
    row = card.splitlines()[card.splitlines().index(header) + 2]
    assert "ImageNet" in header and row.split("|")[1].strip() == "step 10"
    assert [c.strip() for c in row.split("|")[2:4]] == ["31.25", "5.00"]
    assert "imagenet `/data/val`" in card and "templates `imagenet80`" in card


def test_card_without_suites_has_no_table():
    card = _card({"kind": "eval", "step": 3, "zeroshot_top1": 0.5}, {})
    assert "Zero-shot top-1 (%)" not in card and "zeroshot_top1" in card
