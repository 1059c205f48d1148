"""Train the small CLIP-style BPE tokenizer shipped in data/tokenizer_files/ (a one-off tool, run
once and kept for reference; the input pipeline never imports it).

BPE training with `tokenizers` is not deterministic across processes (same data, different ids),
so the trained files are committed and copied; re-running this script gives a *different*
tokenizer and would invalidate every checkpoint trained with the old one.

    .venv/bin/python -m data.train_tokenizer --out data/tokenizer_files

The corpus is the synthetic captions, CLIP-style prompt templates and ordinary English words
(data/tokenizer_corpus/).
Every byte-level character is added as a whole word ("c</w>") too, so any text -- punctuation,
digits, other scripts -- tokenises without the unknown token.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import CLIPTokenizer

from data.concepts import CAPTION_TEMPLATES, COLOURS, SHAPES, class_names

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# The same split as transformers' CLIPTokenizer, so trained merges apply to the same pieces.
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

CORPUS_DIR = Path(__file__).parent / "tokenizer_corpus"


def _lines(name: str) -> tuple[str, ...]:
    return tuple(line for line in (CORPUS_DIR / name).read_text("utf-8").splitlines() if line)


# CLIP-style prompt templates (one "{}" each) and ordinary English words, kept as text files so
# that this one-off tool stays short.
PROMPTS = _lines("prompts.txt")
WORDS = _lines("words.txt")


def corpus() -> list[str]:
    lines = []
    for colour in COLOURS:
        for shape in SHAPES:
            for template in CAPTION_TEMPLATES:
                for size in ("small", "", "large"):
                    for bg in ("dark", "light"):
                        text = template.format(colour=colour, shape=shape, size=size, bg=bg)
                        lines.append(" ".join(text.split()))
    for prompt in PROMPTS:
        lines.extend(prompt.format(name) for name in [*class_names(), *WORDS[:200]])
    lines.extend(WORDS)
    return lines


def train(out: Path, vocab_size: int = 2048) -> None:
    tokenizer = Tokenizer(
        models.BPE(unk_token=EOS, continuing_subword_prefix="", end_of_word_suffix="</w>")
    )
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=alphabet,
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    vocab: dict[str, int] = dict(sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]))
    # Whole-word forms of every byte so punctuation and rare characters never map to UNK.
    for char in sorted(alphabet):
        vocab.setdefault(char + "</w>", len(vocab))
    merges = _merges(tokenizer)
    clip = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    out.mkdir(parents=True, exist_ok=True)
    clip.save_pretrained(str(out))


def _merges(tokenizer: Tokenizer) -> list[tuple[str, str]]:
    state = json.loads(tokenizer.to_str())
    return [
        tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["model"]["merges"]
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "tokenizer_files")
    parser.add_argument("--vocab-size", type=int, default=2048)
    args = parser.parse_args()
    train(args.out, args.vocab_size)


if __name__ == "__main__":
    main()
