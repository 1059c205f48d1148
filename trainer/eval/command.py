"""`disco-clip eval --model HF_DIR_OR_CHECKPOINT --zeroshot DIR [--retrieval SHARDS]`.

One process; the same code as the periodic eval in training (trainer/eval/evaluate.py). --model is
an exported / HF CLIP directory or anything `disco-clip export --checkpoint` accepts (see the
trust note in trainer/interop/run_checkpoint.py and docs/trust.md). --device (default: cuda when
there is one, else cpu) is where the model runs; one that this machine lacks is one error line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from trainer.config_io import ConfigError, validate_tree
from trainer.eval.evaluate import EvalConfig, evaluate
from trainer.interop.run_checkpoint import InteropError

EXIT_USAGE = 2


def load_model(path: str | Path):
    """(CLIPModel in eval mode, tokenizer) from an HF directory or a training checkpoint."""
    path = Path(path)
    if (path / "config.json").is_file():
        from transformers import CLIPModel

        from data.tokenizer import load_tokenizer

        return CLIPModel.from_pretrained(path, local_files_only=True).eval(), load_tokenizer(path)
    from trainer.interop.run_checkpoint import build_hf_model, resolve_checkpoint

    model, tokenizer, _ = build_hf_model(resolve_checkpoint(path))
    return model, tokenizer


def resolve_device(spec: str | None) -> torch.device:
    """--device as a torch.device: cpu, cuda or cuda:N, and one this machine has; None is the
    default (cuda if available, else cpu). Errors are one line, naming --device."""
    if spec is None:
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device: {spec!r} is not a device; use cpu, cuda or cuda:N")
    if device.type == "cpu":
        return torch.device("cpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ConfigError(
            f"--device: {spec} asked for, but this machine has no usable CUDA device; "
            "use --device cpu"
        )
    index = torch.cuda.current_device() if device.index is None else device.index
    if index >= count:  # CUDA-only: reached with a CUDA device present
        raise ConfigError(
            f"--device: {spec} does not exist; this machine has {count} CUDA device(s), "
            f"cuda:0 to cuda:{count - 1}"
        )
    return torch.device("cuda", index)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="zero-shot accuracy and retrieval recall")
    parser.add_argument("--model", required=True, help="HF CLIP dir, run dir or checkpoint dir")
    parser.add_argument("--zeroshot", default="", help="ImageFolder dir or labelled .tar shards")
    parser.add_argument("--classnames", default="", help="classnames.txt (default: found "
                        "in the zero-shot dir or its parent)")  # fmt: skip
    parser.add_argument("--templates", default="builtin",
                        help="builtin, imagenet80 or a file of templates")  # fmt: skip
    parser.add_argument("--retrieval", default="", help="image-caption .tar shards")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-samples", type=int, default=0, help="0 = all")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda "
                        "if available, else cpu)")  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the metrics to this JSON file")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    cfg = EvalConfig(
        zeroshot_dir=args.zeroshot, classnames=args.classnames, templates=args.templates,
        retrieval_shards=args.retrieval, batch_size=args.batch_size, max_samples=args.max_samples,
    )  # fmt: skip
    try:
        if not (cfg.zeroshot_dir or cfg.retrieval_shards):
            raise ConfigError("give --zeroshot DIR and/or --retrieval SHARDS")
        device = resolve_device(args.device)
        validate_tree(EvalConfig(**{**vars(cfg), "every": 1}))  # every=1: classnames checked
        if not Path(args.model).exists():
            raise InteropError(f"--model: {args.model} does not exist")
        model, tokenizer = load_model(args.model)
        metrics = evaluate(model.to(device), tokenizer, cfg, device=device)
    except (ConfigError, InteropError, ValueError, FileNotFoundError) as err:
        print(f"disco-clip eval: error: {str(err).splitlines()[0]}", file=sys.stderr)
        return EXIT_USAGE
    for key, value in metrics.items():
        shown = f"{100 * value:.2f}%" if key.startswith(("zeroshot_top", "retrieval_")) and (
            not key.endswith(("images", "pairs"))) else str(value)  # fmt: skip
        print(f"{key}: {shown}")
    if args.json:
        args.json.write_text(json.dumps(metrics, indent=1) + "\n")
    return 0
