"""`disco-clip make-tokenizer` writes OpenAI CLIP's BPE tokenizer; through `data.tokenizer`'s
`tokenize` its ids, with the padding (mask 0) read as OpenCLIP's 0, equal OpenAI's
SimpleTokenizer at context 77 (an independent reference below) and, where open_clip_torch is
installed, `open_clip.tokenizer.tokenize` itself."""

from __future__ import annotations

import gzip
import html
import importlib
import random
import sys
import types
import unicodedata
from functools import lru_cache
from pathlib import Path

import pytest
import regex
import torch

from data.tokenizer import load_tokenizer, tokenize
from trainer.cli import main
from trainer.interop.clip_tokenizer import BPE_PATH, VOCAB_SIZE

L = 77


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clip_tok")
    assert main(["make-tokenizer", "--out", str(out), "--force"]) == 0
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


class Reference:
    """OpenAI's SimpleTokenizer, written from its published algorithm (not imported)."""

    def __init__(self):
        bs = [*range(33, 127), *range(161, 173), *range(174, 256)]
        cs = bs[:]
        for n, b in enumerate([b for b in range(256) if b not in bs]):
            bs.append(b)
            cs.append(256 + n)
        self.byte_encoder = {b: chr(c) for b, c in zip(bs, cs, strict=True)}
        lines = gzip.decompress(BPE_PATH.read_bytes()).decode("utf-8").split("\n")
        merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
        vocab += ["<start_of_text>", "<end_of_text>"]
        self.encoder = {t: i for i, t in enumerate(vocab)}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.sot, self.eot = self.encoder["<start_of_text>"], self.encoder["<end_of_text>"]
        self.pat = regex.compile(
            r"<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"
            r"[^\s\p{L}\p{N}]+",
            regex.IGNORECASE,
        )
        self.bpe = lru_cache(maxsize=None)(self._bpe)

    def _bpe(self, token: str) -> list[str]:
        word = [*token[:-1], token[-1] + "</w>"]
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return word

    def clean(self, text: str) -> str:
        # OpenCLIP's 'lower' cleaning with ftfy.fix_text replaced by NFC (what fix_text does to
        # text it has nothing to repair; the corpus below holds only such text).
        text = html.unescape(html.unescape(unicodedata.normalize("NFC", text))).strip()
        return " ".join(text.split()).strip().lower()

    def __call__(self, texts: list[str], context_length: int = L) -> torch.Tensor:
        out = torch.zeros(len(texts), context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.sot]
            for piece in self.pat.findall(self.clean(text)):
                piece = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
                ids += [self.encoder[t] for t in self.bpe(piece)]
            ids.append(self.eot)
            if len(ids) > context_length:  # OpenCLIP's rule: cut, then eot replaces the last
                ids = ids[:context_length]
                ids[-1] = self.eot
            out[row, : len(ids)] = torch.tensor(ids)
        return out


WORDS_TEXT = (
    "a photo of the cat dog golden retriever on table skyscraper in new york at night "
    "café naïve résumé über straße façade jalapeño crème brûlée Zürich São Paulo "
    "東京 日本語 中文字符 한국어 русский текст ελληνικά עברית العربية हिन्दी ไทย "
    "12 3.14 1,000,000 2024-01-01 #hashtag @user www.example.com/path?q=1 "
    "isn't it's we're they've I'm you'll he'd DON'T CAN'T O'Brien rock'n'roll "
    "!!! ??? ... -- (brackets) [sq] {curly} <angle> \"quoted\" 'single' a/b c\\d 50% $5 "
    "😀 🐱 🇯🇵 👩‍👩‍👧 ❤️ ☃ ★ → ∑ © ® ™ ° ± × ÷ µ § ¶ • … "
    "UPPER MiXeD CaSe x-ray e-mail state-of-the-art co-op 3D 4K HDR 1080p MP3 "
    "supercalifragilisticexpialidocious pneumonoultramicroscopicsilicovolcanoconiosis"
)
WORDS = WORDS_TEXT.split(" ")
FIXED = [
    "",
    " ",
    "a",
    "A photo of a cat.",
    "  leading and trailing   ",
    "tabs\tand\nnewlines\r\nand\u00a0nbsp\u2003em space",
    "   many      spaces      between      words   ",
    "emoji only 😀😀😀🐱🐱",
    "digits 0123456789 9876543210",
    "punctuation!?!?...,,;;::--__==++",
    "e\u0301 decomposed accent (NFC composes it)",
    "x" * 500,
    " ".join(["word"] * 200),
    "a " * 80,
]


def corpus(n: int = 1200, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = list(FIXED)
    seps = [" ", "  ", "\t", "\n", " \u00a0", "", ", ", ". "]
    while len(texts) < n:
        length = rng.choice([1, 2, 3, 5, 8, 13, 21, 40, 90])
        parts = []
        for _ in range(length):
            parts.append(rng.choice(WORDS))
            parts.append(rng.choice(seps))
        text = "".join(parts)
        if rng.random() < 0.2:
            text = text.upper()
        texts.append(text)
    return texts


TEXTS = corpus()


def test_vocabulary_and_special_tokens(tok):
    assert len(tok) == VOCAB_SIZE == 49408
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
    assert tok.convert_ids_to_tokens([0, 256]) == ["!", "!</w>"]
    ref = Reference()
    assert tok.get_vocab() == {
        **{t: i for t, i in ref.encoder.items() if i < 49406},
        "<|startoftext|>": 49406,
        "<|endoftext|>": 49407,
    }


def openclip_view(tok, texts, context_length=L):
    """Our ids with the padding as OpenCLIP writes it (0), and the mask."""
    ids, mask = tokenize(tok, texts, context_length)
    assert (ids[mask == 0] == tok.pad_token_id).all()
    return ids.masked_fill(mask == 0, 0), mask


def test_ids_equal_the_reference_simple_tokenizer(tok):
    assert len(TEXTS) >= 1000
    ids, mask = openclip_view(tok, TEXTS)
    ref = Reference()(TEXTS, L)
    bad = [i for i in range(len(TEXTS)) if not torch.equal(ids[i], ref[i])]
    assert not bad, f"{len(bad)} differ, first: {TEXTS[bad[0]]!r}"
    # the mask: 1 over bos..eos (the first eos), 0 on the padding
    first_eos = (ids == tok.eos_token_id).int().argmax(-1)
    assert torch.equal(mask, (torch.arange(L) <= first_eos[:, None]).long())
    long_rows = mask.all(-1)
    assert long_rows.sum() >= 50 and (ids[long_rows, -1] == tok.eos_token_id).all()


@pytest.mark.parametrize("context_length", [2, 5, 16])
def test_truncation_keeps_eos_last_at_other_lengths(tok, context_length):
    texts = TEXTS[:200]
    ids, _ = openclip_view(tok, texts, context_length)
    assert torch.equal(ids, Reference()(texts, context_length))


def test_html_entities_are_a_documented_difference(tok):
    """OpenCLIP unescapes HTML entities; the HF tokenizer keeps them as characters."""
    ids, _ = openclip_view(tok, ["AT&amp;T"])
    assert not torch.equal(ids, Reference()(["AT&amp;T"], L))
    assert torch.equal(openclip_view(tok, ["AT&T"])[0], Reference()(["AT&amp;T"], L))


def _import_open_clip_tokenizer():
    """open_clip.tokenizer alone: a bare `open_clip` package so that its __init__ (which imports
    torchvision, broken beside CPU torch here) never runs; ftfy, when missing, stubbed by NFC."""
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open_clip_torch is not installed")
    saved = {k: sys.modules.get(k) for k in ("open_clip", "open_clip.tokenizer", "ftfy")}
    try:
        package = types.ModuleType("open_clip")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["open_clip"] = package
        if importlib.util.find_spec("ftfy") is None:
            ftfy = types.ModuleType("ftfy")
            ftfy.fix_text = lambda text: unicodedata.normalize("NFC", text)
            sys.modules["ftfy"] = ftfy
        return importlib.import_module("open_clip.tokenizer")
    finally:
        for key, value in saved.items():
            if value is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = value


def test_ids_equal_open_clip_tokenize(tok):
    oc = _import_open_clip_tokenizer()
    expected = oc.tokenize(TEXTS, context_length=L)
    ids, _ = openclip_view(tok, TEXTS)
    bad = [i for i in range(len(TEXTS)) if not torch.equal(ids[i], expected[i])]
    assert not bad, f"{len(bad)} differ, first: {TEXTS[bad[0]]!r}"


def test_eos_padding_and_refusal_to_overwrite(tok_dir, tok, capsys):
    ids, mask = tokenize(tok, ["a cat!"], 8)
    assert ids[0].tolist() == [49406, 320, 2368, 256, 49407, 49407, 49407, 49407]  # 256: "!</w>"
    assert mask[0].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    assert main(["make-tokenizer", "--out", str(tok_dir)]) == 2
    assert "not empty" in capsys.readouterr().err
