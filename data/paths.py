"""Where the shipped tokenizer lives and what a tokenizer directory must hold.

Kept free of heavy imports (no torch, no transformers) so that config validation and
`make-synthetic` start in a fraction of a second.
"""

from __future__ import annotations

from pathlib import Path

# The directory shipped with the package (trained once by data/train_tokenizer.py).
BUILTIN_TOKENIZER_DIR = Path(__file__).parent / "tokenizer_files"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def missing_tokenizer_files(path: str | Path) -> list[str]:
    """Names of the files CLIPTokenizer needs that are absent from `path` (cheap check)."""
    path = Path(path)
    if not path.is_dir():
        return list(TOKENIZER_FILES)
    has_json = (path / "tokenizer.json").is_file()
    has_bpe = (path / "vocab.json").is_file() and (path / "merges.txt").is_file()
    missing = [] if has_json or has_bpe else ["tokenizer.json (or vocab.json + merges.txt)"]
    if not (path / "tokenizer_config.json").is_file():
        # Without it there is no pad token and pipelines cannot batch.
        missing.append("tokenizer_config.json")
    return missing
