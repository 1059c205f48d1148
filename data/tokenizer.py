"""Loading the CLIP tokenizer from a local directory and batching text to fixed-length ids."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPTokenizer

from data.paths import BUILTIN_TOKENIZER_DIR, missing_tokenizer_files

__all__ = ["BUILTIN_TOKENIZER_DIR", "load_tokenizer", "tokenize"]


def load_tokenizer(path: str | Path) -> CLIPTokenizer:
    """Load a CLIP tokenizer from a local directory, never from the hub."""
    missing = missing_tokenizer_files(path)
    if missing:
        raise ValueError(
            f"tokenizer: '{path}' is not a tokenizer directory (missing {', '.join(missing)}); "
            f"point it at a saved CLIPTokenizer, e.g. DIR/tokenizer from 'disco-clip make-synthetic'"
        )
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as err:  # a corrupt tokenizer.json/config: name the dir, not a traceback
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"tokenizer: '{path}' could not be loaded ({first}); point it at a saved "
            f"CLIPTokenizer directory, e.g. DIR/tokenizer from 'disco-clip make-synthetic'"
        ) from None
    if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
        raise ValueError(
            f"tokenizer: '{path}' has no eos or pad token; set them in tokenizer_config.json"
        )
    return tokenizer


def tokenize(
    tokenizer: CLIPTokenizer, texts: list[str], context_length: int = 77
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask, both (n, context_length) int64, padded with the pad token.

    The tokenizer's own call does the work: its post-processor adds bos/eos after truncation,
    so a long text keeps eos as its last token. That matters because CLIP's text tower pools
    at the first eos; a cut-off eos would pool at a padding position instead.
    """
    if context_length < 2:
        raise ValueError("context_length: must be >= 2 (room for bos and eos)")
    encoded = tokenizer(
        list(texts),
        padding="max_length",
        truncation=True,
        max_length=context_length,
        return_tensors="pt",
    )
    return encoded["input_ids"].long(), encoded["attention_mask"].long()
