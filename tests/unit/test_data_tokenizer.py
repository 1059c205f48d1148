"""The shipped tokenizer loads offline with CLIPTokenizer; `tokenize` pads and keeps eos."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPTokenizer

from data.concepts import class_names
from data.tokenizer import BUILTIN_TOKENIZER_DIR, load_tokenizer, tokenize
from data.train_tokenizer import PROMPTS


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(BUILTIN_TOKENIZER_DIR)


def test_loads_as_clip_tokenizer_with_special_tokens(tok, synthetic_dir):
    assert isinstance(tok, CLIPTokenizer)
    assert tok.bos_token == "<|startoftext|>" and tok.eos_token == "<|endoftext|>"
    assert tok.pad_token_id is not None and tok.eos_token_id != tok.bos_token_id
    copied = CLIPTokenizer.from_pretrained(str(synthetic_dir / "tokenizer"), local_files_only=True)
    assert copied("a red circle").input_ids == tok("a red circle").input_ids


@pytest.mark.parametrize("template", [*PROMPTS, "Ünïcode & punctuation: 12%!"])
def test_prompts_round_trip_without_unk(tok, template):
    for name in [*class_names()[:5], "zebra", "golden retriever"]:
        text = template.format(name) if "{}" in template else template
        ids = tok(text).input_ids
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert tok.unk_token_id not in ids[1:-1]  # unk is eos here: must only end the text
        # decoding re-spaces punctuation; every character must come back
        decoded = tok.decode(ids, skip_special_tokens=True)
        assert "".join(decoded.split()) == "".join(text.lower().split())


def test_tokenize_pads_with_mask_and_truncates_keeping_eos(tok):
    long = " ".join(["red circle"] * 60)
    ids, mask = tokenize(tok, ["a blue ring", long], context_length=16)
    assert ids.shape == mask.shape == (2, 16) and ids.dtype == mask.dtype == torch.long
    short = tok("a blue ring").input_ids
    assert ids[0, : len(short)].tolist() == short
    assert (ids[0, len(short) :] == tok.pad_token_id).all()
    assert mask[0].tolist() == [1] * len(short) + [0] * (16 - len(short))
    assert ids[1, 0] == tok.bos_token_id and ids[1, -1] == tok.eos_token_id and mask[1].all()
    assert ids[1, 1:-1].tolist() == tok(long).input_ids[1:15]


def test_missing_tokenizer_dir_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"^tokenizer: .*missing"):
        load_tokenizer(tmp_path / "nope")


def _eos_last_reference(tok, texts, context_length):
    """The contract `tokenize` had when it was hand-written: untruncated ids, cut to L−1 tokens
    plus eos, padded with pad; mask 1 on the kept tokens."""
    ids = torch.full((len(texts), context_length), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(texts), context_length), dtype=torch.long)
    for row, text in enumerate(texts):
        seq = tok(text, truncation=False).input_ids
        if len(seq) > context_length:
            seq = [*seq[: context_length - 1], tok.eos_token_id]
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return ids, mask


@pytest.mark.parametrize("context_length", [2, 3, 8, 16, 77])
def test_tokenize_is_the_tokenizer_call_with_eos_kept_last(tok, context_length):
    """`tokenize` is `tokenizer(texts, padding="max_length", truncation=True, max_length=L)` on
    the shipped tokenizer: same ids and mask as the explicit eos-last construction, for short,
    empty, exactly-L and far-too-long texts, punctuation, digits and other scripts."""
    words = [*class_names(), "golden retriever", "Ünïcode", "12%!", "日本語", "🙂", "—", ""]
    texts = [" ".join(words[i : i + n]) for n in (0, 1, 3, 7, 40) for i in range(0, len(words), 5)]
    ids, mask = tokenize(tok, texts, context_length)
    ref_ids, ref_mask = _eos_last_reference(tok, texts, context_length)
    assert torch.equal(ids, ref_ids) and torch.equal(mask, ref_mask)
    assert ids.dtype == mask.dtype == torch.long
