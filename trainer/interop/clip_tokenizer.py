"""`disco-clip make-tokenizer`: OpenAI CLIP's BPE tokenizer (49,408 tokens) as an HF directory,
built offline from the merges file shipped in data/clip_bpe/ (no hub, no download).

The vocabulary is built as OpenAI's `SimpleTokenizer` (and OpenCLIP's copy of it) builds it:
the 256 byte symbols of GPT-2's byte-to-unicode map, the same with '</w>', one token per merge
of `merges[1:49152-256-2+1]`, then <|startoftext|> (49406) and <|endoftext|> (49407). The HF
`CLIPTokenizer` (transformers 5: the tokenizers-backed one) is constructed from that vocab and
those merges; its pre-tokenizer is OpenAI's regex.

Padding: with <|endoftext|> (49407), the HF hub convention (openai/clip-vit-*), and the
attention mask 0 there. OpenCLIP's `tokenize` pads with id 0 instead; `pad_token="!"` would
make HF split every "!" out of the text as a special token, so it is not offered. Through
`data.tokenizer.tokenize` (pad to max_length, truncate keeping eos last) the ids equal
`open_clip.tokenize(texts, context_length)` on every unmasked position, i.e.
`ids.masked_fill(mask == 0, 0)` is OpenCLIP's tensor exactly. The text tower is causal and pools
at the first eos (OpenCLIP: the argmax id, the same position), so the padded positions never
reach the features of an OpenCLIP-converted model.

Text cleaning: OpenCLIP cleans with ftfy.fix_text, html.unescape twice, whitespace collapse and
lower-casing; HF's CLIP normalizer (rebuilt by CLIPTokenizer on every load, so it cannot be
customised in tokenizer.json) does NFC, whitespace collapse and lower-casing. Ids are equal
wherever ftfy and html.unescape change nothing (tests/unit/test_clip_tokenizer.py: NFC text,
emoji, digits, punctuation, whitespace runs, long captions). They differ on HTML entities
("&amp;" stays four characters) and on what ftfy repairs (mojibake, curly quotes, ligatures,
full-width forms, control characters): unescape/ftfy such captions upstream.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from functools import lru_cache
from pathlib import Path

BPE_PATH = (
    Path(__file__).resolve().parents[2] / "data" / "clip_bpe" / "bpe_simple_vocab_16e6.txt.gz"
)
VOCAB_SIZE = 49408
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CONTEXT_LENGTH = 77


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map (OpenAI CLIP's `bytes_to_unicode`)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    bs += range(ord("®"), ord("ÿ") + 1)
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def read_merges(bpe_path: str | Path = BPE_PATH) -> list[tuple[str, str]]:
    """OpenAI's merges: lines[1 : 49152 - 256 - 2 + 1] of the gzip'd file, as pairs."""
    lines = gzip.decompress(Path(bpe_path).read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    if any(len(m) != 2 for m in merges):
        raise ValueError(f"{bpe_path}: not a CLIP BPE merges file (a line is not one pair)")
    return merges  # type: ignore[return-value]


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    symbols = list(bytes_to_unicode().values())
    vocab = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges), BOS, EOS]
    return {token: i for i, token in enumerate(vocab)}


def build_tokenizer(bpe_path: str | Path = BPE_PATH):
    """The HF CLIPTokenizer with OpenAI's vocabulary, padding with eos (see the module doc)."""
    from transformers import CLIPTokenizer

    merges = read_merges(bpe_path)
    vocab = build_vocab(merges)
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"{bpe_path}: built {len(vocab)} tokens, expected {VOCAB_SIZE}")
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=EOS, model_max_length=CONTEXT_LENGTH)


def write_tokenizer(out: str | Path, *, force: bool = False) -> Path:
    """Save the tokenizer (tokenizer.json, tokenizer_config.json, vocab.json, merges.txt)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"--out: {out} is not empty; pass --force to overwrite it")
    tokenizer = build_tokenizer()
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out))
    merges = read_merges()
    (out / "vocab.json").write_text(json.dumps(build_vocab(merges), ensure_ascii=False))
    with open(out / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return out


def _run(args: argparse.Namespace) -> int:
    try:
        out = write_tokenizer(args.out, force=args.force)
    except (FileExistsError, ValueError, OSError) as err:
        print(f"disco-clip make-tokenizer: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote the OpenAI CLIP tokenizer ({VOCAB_SIZE} tokens) to {out}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "make-tokenizer", help="write OpenAI CLIP's BPE tokenizer (49,408 tokens), offline"
    )
    p.add_argument("--out", required=True, help="directory to write (data.tokenizer=DIR)")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    p.set_defaults(func=_run)
