"""`disco-clip eval --model HF_DIR_OR_CHECKPOINT [--zeroshot DIR] [--retrieval SHARDS_OR_FILE]
[--imagenet ROOT] [--imagenet-v2 ROOT] [--imagenet-r ROOT] [--imagenet-sketch ROOT]
[--imagenet-a ROOT] [--out results.json]`.

The ImageNet-family flags run trainer/eval/suites.py (CLIP's 80 prompts by default) and print a
paper-style table (row = the model, columns = the sets, top-1 %); --out writes it as JSON.

The same code as the periodic eval in training (trainer/eval/evaluate.py). Launched by torchrun
(or srun) with several processes, each rank decodes and encodes its own share of every set and
rank 0 prints and writes the results: `torchrun --nproc_per_node 8 -m trainer.cli eval ...`.
--workers sets the decode processes per rank. --model is
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
from trainer.dist import read_dist_info
from trainer.eval.evaluate import EvalConfig, evaluate
from trainer.eval.suites import SUITES, format_table
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


def _rank_default_device(info) -> str | None:
    """With several processes on a CUDA machine, rank r's default is its local GPU."""
    if info.world_size > 1 and torch.cuda.is_available():  # CUDA-only
        return f"cuda:{info.local_rank % torch.cuda.device_count()}"
    return None


def _start_group(info, device: torch.device) -> None:
    """The process group of a multi-process eval (NCCL on CUDA, gloo on CPU); none for one."""
    if info.world_size == 1:
        return
    import os

    os.environ.setdefault("MASTER_ADDR", info.master_addr)
    os.environ.setdefault("MASTER_PORT", str(info.master_port))
    torch.distributed.init_process_group(
        "nccl" if device.type == "cuda" else "gloo", rank=info.rank, world_size=info.world_size
    )
    if device.type == "cuda":  # CUDA-only: NCCL collectives use the current device
        torch.cuda.set_device(device)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="zero-shot accuracy and retrieval recall")
    parser.add_argument("--model", required=True, help="HF CLIP dir, run dir or checkpoint dir")
    parser.add_argument("--zeroshot", default="", help="ImageFolder dir or labelled .tar shards")
    parser.add_argument("--classnames", default="", help="classnames.txt (default: found "
                        "in the zero-shot dir or its parent)")  # fmt: skip
    parser.add_argument("--templates", default="builtin",
                        help="builtin, imagenet80 or a file of templates")  # fmt: skip
    parser.add_argument("--retrieval", default="", help="image-caption .tar shards or a "
                        ".json/.csv caption file (k captions per image allowed)")  # fmt: skip
    for suite in SUITES:
        parser.add_argument("--" + suite.key.replace("_", "-"), default="", metavar="ROOT",
                            help=f"{suite.title} root ({_LAYOUT_HELP[suite.layout]})")  # fmt: skip
    parser.add_argument("--suite-templates", default="imagenet80",
                        help="templates for the ImageNet sets (default: CLIP's 80)")  # fmt: skip
    parser.add_argument("--label", default="", help="row label in the table (default: "
                        "the --model directory name)")  # fmt: skip
    parser.add_argument("--out", type=Path, help="write the ImageNet-sets table (and all "
                        "metrics) to this JSON file")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-samples", type=int, default=0, help="0 = all")
    parser.add_argument("--workers", type=int, default=2,
                        help="image-decoding loader processes per rank (0 = in-process)")  # fmt: skip
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda "
                        "if available, else cpu)")  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the metrics to this JSON file")
    parser.set_defaults(func=_run)


_LAYOUT_HELP = {"wnid": "folders named by wnid, n01440764/...", "index": "folders 0 ... 999"}


def _is_percent(key: str) -> bool:
    if key.endswith(("_images", "_pairs", "_classes")):
        return False
    return key.startswith(("zeroshot_top", "retrieval_")) or key.endswith(("_top1", "_top5"))


def _run(args: argparse.Namespace) -> int:
    suites = {s.key: getattr(args, s.key) for s in SUITES if getattr(args, s.key)}
    cfg = EvalConfig(
        zeroshot_dir=args.zeroshot, classnames=args.classnames, templates=args.templates,
        retrieval_shards=args.retrieval, batch_size=args.batch_size, max_samples=args.max_samples,
        suites=suites, suite_templates=args.suite_templates, workers=args.workers,
    )  # fmt: skip
    try:
        if not (cfg.zeroshot_dir or cfg.retrieval_shards or cfg.suites):
            raise ConfigError(
                "give --zeroshot DIR, --retrieval SHARDS_OR_FILE and/or an ImageNet set "
                "(--imagenet ROOT, --imagenet-v2, --imagenet-r, --imagenet-sketch, --imagenet-a)"
            )
        info = read_dist_info()
        device = resolve_device(args.device or _rank_default_device(info))
        validate_tree(EvalConfig(**{**vars(cfg), "every": 1}))  # every=1: classnames checked
        if not Path(args.model).exists():
            raise InteropError(f"--model: {args.model} does not exist")
        model, tokenizer = load_model(args.model)
        _start_group(info, device)
        metrics = evaluate(model.to(device), tokenizer, cfg, rank=info.rank,
                           world_size=info.world_size, device=device)  # fmt: skip
    except (ConfigError, InteropError, ValueError, FileNotFoundError) as err:
        print(f"disco-clip eval: error: {str(err).splitlines()[0]}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if info.rank != 0:
        return 0  # every rank holds the same metrics; rank 0 reports them
    for key, value in metrics.items():
        print(f"{key}: {f'{100 * value:.2f}%' if _is_percent(key) else value}")
    if suites:
        label = args.label or Path(args.model).resolve().name
        top1 = {key: metrics[f"{key}_top1"] for key in suites}
        print()
        print(format_table({label: top1}))
    if args.json:
        args.json.write_text(json.dumps(metrics, indent=1) + "\n")
    if args.out:
        sets = {
            s.key: {"title": s.title, "root": suites[s.key],
                    **{k: metrics[f"{s.key}_{k}"] for k in ("top1", "top5", "images", "classes")}}
            for s in SUITES if s.key in suites
        }  # fmt: skip
        out = {"model": str(args.model), "label": args.label or Path(args.model).resolve().name,
               "templates": args.suite_templates, "sets": sets, "metrics": metrics}  # fmt: skip
        args.out.write_text(json.dumps(out, indent=1) + "\n")
    return 0
