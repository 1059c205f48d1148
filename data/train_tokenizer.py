"""Train the small CLIP-style BPE tokenizer shipped in data/tokenizer_files/ (run once, kept for
reference).

BPE training with `tokenizers` is not deterministic across processes (same data, different ids),
so the trained files are committed and copied; re-running this script gives a *different*
tokenizer and would invalidate every checkpoint trained with the old one.

    .venv/bin/python -m data.train_tokenizer --out data/tokenizer_files

The corpus is the synthetic captions, CLIP-style prompt templates and ordinary English words.
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

PROMPTS = (
    "This is a photo of {}.",
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a pixelated photo of the {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a good photo of the {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a sketch of the {}.",
    "a doodle of a {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a rendition of the {}.",
    "a toy {}.",
    "itap of a {}.",
    "a video game {}.",
    "a {} in a video game.",
)

WORDS = ["the", "of", "and", "to", "in", "is", "it", "you", "that", "he", "was", "for", "on", "are", "with", "as", "his", "they", "be", "at", "one", "have", "this", "from", "or", "had", "by", "word", "but", "what", "some", "we", "can", "out", "other", "were", "all", "there", "when", "up", "use", "your", "how", "said", "an", "each", "she", "which", "do", "their", "time", "if", "will", "way", "about", "many", "then", "them", "write", "would", "like", "so", "these", "her", "long", "make", "thing", "see", "him", "two", "has", "look", "more", "day", "could", "go", "come", "did", "number", "sound", "no", "most", "people", "my", "over", "know", "water", "than", "call", "first", "who", "may", "down", "side", "been", "now", "find", "any", "new", "work", "part", "take", "get", "place", "made", "live", "where", "after", "back", "little", "only", "round", "man", "year", "came", "show", "every", "good", "me", "give", "our", "under", "name", "very", "through", "just", "form", "sentence", "great", "think", "say", "help", "low", "line", "differ", "turn", "cause", "much", "mean", "before", "move", "right", "boy", "old", "too", "same", "tell", "does", "set", "three", "want", "air", "well", "also", "play", "small", "end", "put", "home", "read", "hand", "port", "large", "spell", "add", "even", "land", "here", "must", "big", "high", "such", "follow", "act", "why", "ask", "men", "change", "went", "light", "kind", "off", "need", "house", "picture", "try", "us", "again", "animal", "point", "mother", "world", "near", "build", "self", "earth", "father", "head", "stand", "own", "page", "should", "country", "found", "answer", "school", "grow", "study", "still", "learn", "plant", "cover", "food", "sun", "four", "between", "state", "keep", "eye", "never", "last", "let", "thought", "city", "tree", "cross", "farm", "hard", "start", "might", "story", "saw", "far", "sea", "draw", "left", "late", "run", "don't", "while", "press", "close", "night", "real", "life", "few", "north", "open", "seem", "together", "next", "white", "children", "begin", "got", "walk", "example", "ease", "paper", "group", "always", "music", "those", "both", "mark", "often", "letter", "until", "mile", "river", "car", "feet", "care", "second", "book", "carry", "took", "science", "eat", "room", "friend", "began", "idea", "fish", "mountain", "stop", "once", "base", "hear", "horse", "cut", "sure", "watch", "colour", "color", "face", "wood", "main", "enough", "plain", "girl", "usual", "young", "ready", "above", "ever", "red", "list", "though", "feel", "talk", "bird", "soon", "body", "dog", "family", "direct", "pose", "leave", "song", "measure", "door", "product", "black", "short", "numeral", "class", "wind", "question", "happen", "complete", "ship", "area", "half", "rock", "order", "fire", "south", "problem", "piece", "told", "knew", "pass", "since", "top", "whole", "king", "space", "heard", "best", "hour", "better", "true", "during", "hundred", "five", "remember", "step", "early", "hold", "west", "ground", "interest", "reach", "fast", "verb", "sing", "listen", "six", "table", "travel", "less", "morning", "ten", "simple", "several", "vowel", "toward", "war", "lay", "against", "pattern", "slow", "center", "love", "person", "money", "serve", "appear", "road", "map", "rain", "rule", "govern", "pull", "cold", "notice", "voice", "unit", "power", "town", "fine", "certain", "fly", "fall", "lead", "cry", "dark", "machine", "note", "wait", "plan", "figure", "star", "box", "noun", "field", "rest", "correct", "able", "pound", "done", "beauty", "drive", "stood", "contain", "front", "teach", "week", "final", "gave", "green", "oh", "quick", "develop", "ocean", "warm", "free", "minute", "strong", "special", "mind", "behind", "clear", "tail", "produce", "fact", "street", "inch", "multiply", "nothing", "course", "stay", "wheel", "full", "force", "blue", "object", "decide", "surface", "deep", "moon", "island", "foot", "system", "busy", "test", "record", "boat", "common", "gold", "possible", "plane", "stead", "dry", "wonder", "laugh", "thousand", "ago", "ran", "check", "game", "shape", "equate", "hot", "miss", "brought", "heat", "snow", "tire", "bring", "yes", "distant", "fill", "east", "paint", "language", "among", "cat", "bicycle", "airplane", "truck", "orange", "purple", "yellow", "pink", "brown", "grey", "gray", "cyan", "circle", "square", "triangle", "ring", "background", "backdrop", "photo", "photograph", "image", "frame", "noisy", "drawing", "coloured", "colored", "showing", "somewhere", "against", "medium", "tiny", "huge", "bright", "dim", "blurry"]


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
