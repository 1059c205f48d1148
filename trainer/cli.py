"""`disco-clip` console entry: one subcommand per job, each owned by its module.

Each module listed in SUBCOMMANDS exposes `add_parser(subparsers)`, which registers its
subcommand and sets `func` (taking the parsed args, returning an exit code). Modules are
imported lazily so that `disco-clip --help` and bad-argument errors stay fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module that owns it
SUBCOMMANDS: dict[str, str] = {
    "make-synthetic": "data.synthetic",
    "train": "trainer.train",
    "eval": "trainer.eval.command",
    "export": "trainer.interop.hf_export",
    "plot": "trainer.eval.plot",
    "plan": "trainer.plan.command",
    "make-tokenizer": "trainer.interop.clip_tokenizer",
    "convert": "trainer.interop.openclip",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="disco-clip", description="CLIP training at very large batch sizes (DisCo loss)."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in dict.fromkeys(SUBCOMMANDS.values()):
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
