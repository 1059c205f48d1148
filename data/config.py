"""`DataConfig`: everything the input pipeline needs, validated cheaply (no decoding)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from data.decode import DEFAULT_CAPTION_KEY, DEFAULT_IMAGE_KEY, parse_keys
from data.paths import BUILTIN_TOKENIZER_DIR, missing_tokenizer_files
from data.shards import expand_shards, is_remote

SOURCES = ("webdataset", "hf")
MAKE_HINT = "run 'disco-clip make-synthetic --out DIR' or fix the path"


@dataclass
class SourceSpec:
    """One tar-shard source of a mix (data.sources)."""

    train_shards: str = ""
    """Shards of this source, in any form data.train_shards takes."""
    weight: float = 1.0
    """Relative share of every global batch (OpenCLIP's --train-data-upsampling-factors)."""


@dataclass
class DataConfig:
    """The `data.` section of the run config."""

    source: str = "webdataset"
    """Where training pairs come from: "webdataset" (tar shards) or "hf" (`datasets`)."""

    train_shards: str = ""
    """webdataset only: a shard path, a brace pattern (`train/{000000..000009}.tar`,
    `{a,b}.tar`), a directory whose *.tar files are used (sorted), a glob (`train/*.tar`,
    sorted), a `pipe:` command if allow_pipe (braces expand to one command per shard), or
    http(s)/s3/gs URLs if allow_remote (brace patterns, read unchecked)."""

    sources: list[SourceSpec] = field(default_factory=list)
    """webdataset only, instead of train_shards: several shard sets mixed by weight, e.g.
    [{train_shards: /data/laion/{00000..41407}.tar, weight: 4}, {train_shards: /data/cc12m,
    weight: 1}]. The S logical streams are dealt to the sources in proportion to their weights
    (largest remainder, at least one each), so every global batch holds the same share of each
    source, deterministically and resumably; the realised mix is logged at start."""

    image_key: str = DEFAULT_IMAGE_KEY
    """webdataset only: the image member's extension, as a ';'-separated list tried in order
    (first present wins; OpenCLIP's --wds image key), e.g. "jpg;png" or "image.png" for
    `KEY.image.png` members. Matched case-insensitively."""

    caption_key: str = DEFAULT_CAPTION_KEY
    """webdataset only: the caption: a member extension ("txt") or "json:FIELD" (a string field
    of the sample's .json, e.g. "json:caption"), or a ';'-separated list of those tried in
    order ("txt;json:caption": the json's caption where the .txt is missing). No implicit
    fallback: with "txt", a sample without .txt is skipped as having no caption."""

    hf_path: str = ""
    """hf only: a `save_to_disk` directory, a parquet file/directory, or an imagefolder directory
    (images plus metadata.jsonl/csv holding the caption column)."""

    hf_split: str = "train"
    """hf only: split to read (ignored for a `save_to_disk` directory of a single Dataset)."""

    hf_streaming: bool = False
    """hf only: stream examples instead of loading the table (resume then replays the stream
    up to the saved position without decoding images)."""

    image_column: str = "image"
    """hf only: column holding the image (an `Image` feature, bytes, or a path)."""

    text_column: str = "text"
    """hf only: column holding the caption string."""

    tokenizer: str = str(BUILTIN_TOKENIZER_DIR)
    """Local directory of a saved CLIPTokenizer (default: the one shipped in data/)."""

    allow_toy_tokenizer: bool = False
    """Let a preset other than tiny/demo train with the shipped 1,553-token toy tokenizer
    (refused by default: a ViT-B/32 or larger wants OpenAI's, `disco-clip make-tokenizer`)."""

    image_size: int = 64
    """Side S of the square (3, S, S) pixel tensors fed to the vision tower."""

    context_length: int = 77
    """Token ids per caption; longer captions are cut keeping eos last, shorter are padded."""

    shuffle_buffer: int = 1000
    """Samples held by the shuffle buffer of each logical stream (0 = no shuffle beyond the
    per-epoch shard permutation). A resume re-reads about this many samples per stream."""

    streams: int = 8
    """S, the logical streams of the global sample order, fixed for the run: global batch t is
    B/S consecutive samples of every stream, whatever the number of ranks and workers. Must
    divide the global batch size and be a multiple of ranks × workers (each rank hosts S/N
    streams, each worker at least one); each stream reads its own shards (at least S shards,
    or data.resampled=true). Set it for the largest job the run may ever resume on."""

    resampled: bool = False
    """Draw shards with replacement forever instead of visiting each once per epoch."""

    allow_pipe: bool = False
    """Allow shell `pipe:` shard URLs (they run a command: off unless you mean it)."""

    allow_remote: bool = False
    """Allow http/https/s3/gs shard URLs (read with curl, `aws s3 cp`, `gsutil cat`: network
    access, off unless you mean it). A shard whose download fails ends with a skipped,
    counted error sample, like a truncated local tar."""

    workers: int = 2
    """DataLoader worker processes per rank (0 = in-process); each hosts some of the rank's
    streams. The sample order does not depend on it (nor on the world size): see data.streams."""

    random_resized_crop_scale: tuple[float, float] = field(default=(0.9, 1.0))
    """Area fraction range of the training random-resized crop ((1.0, 1.0) = no crop)."""

    def validate(self) -> None:
        """Raise ValueError naming the first bad field, what is wrong and what to do."""
        if self.source not in SOURCES:
            raise ValueError(f"source: '{self.source}' is not one of {list(SOURCES)}")
        if self.source == "webdataset":
            self._validate_shards()
        else:
            self._validate_hf()
        missing = missing_tokenizer_files(self.tokenizer)
        if missing:
            raise ValueError(
                f"tokenizer: '{self.tokenizer}' lacks {', '.join(missing)}; "
                f"point it at a saved CLIPTokenizer directory (e.g. DIR/tokenizer from "
                f"'disco-clip make-synthetic')"
            )
        _positive("image_size", self.image_size)
        if self.context_length < 2:
            raise ValueError(
                f"context_length: {self.context_length} leaves no room for bos and eos; use >= 2"
            )
        if self.shuffle_buffer < 0:
            raise ValueError(
                f"shuffle_buffer: {self.shuffle_buffer} < 0; use 0 to disable shuffling"
            )
        if self.streams < 1:
            raise ValueError(f"streams: {self.streams} < 1; use at least 1 logical stream")
        if self.workers < 0:
            raise ValueError(f"workers: {self.workers} < 0; use 0 to load in the training process")
        low, high = self.random_resized_crop_scale
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(
                f"random_resized_crop_scale: {tuple(self.random_resized_crop_scale)} is not "
                f"0 < low <= high <= 1; e.g. (0.9, 1.0)"
            )

    def _validate_shards(self) -> None:
        if self.sources:
            if self.train_shards:
                raise ValueError("sources: set either data.train_shards or data.sources, not both")
            for i, source in enumerate(self.sources):
                if not source.weight > 0:
                    raise ValueError(f"sources[{i}].weight: {source.weight}; must be > 0")
                try:
                    self._validate_spec(source.train_shards)
                except ValueError as err:
                    raise ValueError(f"sources[{i}].{err}") from None
        else:
            self._validate_spec(self.train_shards)
        self._validate_keys()

    def _validate_spec(self, spec: str) -> None:
        if not spec:
            raise ValueError(f"train_shards: empty; {MAKE_HINT}")
        if is_remote(spec):
            if not self.allow_remote:
                raise ValueError(
                    "train_shards: remote (http/https/s3/gs) URLs are refused; "
                    "set data.allow_remote=true to read them over the network"
                )
            if "*" in spec:
                raise ValueError(
                    "train_shards: '*' globs match local files only; list remote shards with a "
                    "brace pattern, e.g. https://host/train/{000000..000099}.tar"
                )
        if "pipe:" in spec and not self.allow_pipe:
            raise ValueError(
                "train_shards: 'pipe:' URLs run shell commands and are refused; "
                "set data.allow_pipe=true if you trust them"
            )
        if not expand_shards(spec, allow_pipe=self.allow_pipe, allow_remote=self.allow_remote):
            raise ValueError(f"train_shards: no .tar files match '{spec}'; {MAKE_HINT}")

    def _validate_keys(self) -> None:
        if not parse_keys(self.image_key):
            raise ValueError('image_key: empty; use e.g. "jpg;png;jpeg;webp" (member extensions)')
        keys = [k.strip() for k in self.caption_key.split(";") if k.strip()]
        if not keys or any(k.lower() == "json:" for k in keys):
            raise ValueError(
                f"caption_key: '{self.caption_key}' names no caption; use e.g. 'txt' or "
                "'json:caption' (a field of the sample's .json)"
            )

    def _validate_hf(self) -> None:
        if not self.hf_path:
            raise ValueError(
                "hf_path: empty; set it to a save_to_disk, parquet or imagefolder path"
            )
        if not Path(self.hf_path).exists():
            raise ValueError(f"hf_path: '{self.hf_path}' does not exist; fix the path")
        for name in ("image_column", "text_column", "hf_split"):
            if not getattr(self, name):
                raise ValueError(f"{name}: empty; set it to the dataset's column/split name")


def _positive(name: str, value: int) -> None:
    if value <= 0:
        raise ValueError(f"{name}: {value} must be a positive integer")
