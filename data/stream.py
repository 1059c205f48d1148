"""The global sample order: S logical streams, each an infinite, resumable sequence of samples.

Global batch t holds B/S consecutive samples of every stream s = 0 … S−1 (docs/data_order.md).
A stream's order is a pure function of (source, seed, S, s): per epoch the source gives the
stream its own shards (or rows), and a shuffle buffer seeded by (seed, epoch, s) mixes them. No
rank or worker count appears anywhere, so ranks and workers are only a placement of streams:
rank r hosts the streams s ≡ r (mod N), its W workers split those, and any N, W that divide S
give the same global batches (each rank holds a different slice of them; the loss does not
care which).

A stream's position (`StreamState`) is what a resume needs and no more: the epoch, where the
source's reader stands (a byte offset into a shard for tar files), the buffered samples as
references the source can re-read, and the buffer's random generator. Restoring reads about one
shuffle buffer plus one batch per stream, wherever in the epoch the position is. Sources that
cannot seek (pipes, remote URLs, streaming HF datasets) replay the stream's epoch instead.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import torch

from data.decode import DEFAULT_CAPTION_KEY, DEFAULT_IMAGE_KEYS, decode
from data.shards import RawSample
from data.tokenizer import tokenize
from data.transforms import sample_seed, train_transform

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamSpec:
    """What every worker of one rank needs (picklable: sent to worker processes)."""

    source: Any  # WebDatasetSource | HFSource
    tokenizer: Any
    seed: int
    streams: int  # S, fixed for the run
    global_batch: int  # B; every stream gives B/S samples per step
    rank: int
    world_size: int
    workers: int  # logical workers of this rank (a placement only: the order ignores it)
    shuffle_buffer: int  # samples buffered per stream
    image_size: int
    context_length: int
    crop_scale: tuple[float, float]
    image_keys: tuple[str, ...] = DEFAULT_IMAGE_KEYS  # tar member extensions, first present wins
    caption_key: str = DEFAULT_CAPTION_KEY  # "txt", "json:caption", "txt;json:caption"

    @property
    def per_stream(self) -> int:
        return self.global_batch // self.streams

    def rank_streams(self) -> list[int]:
        return list(range(self.rank, self.streams, self.world_size))

    def worker_streams(self, worker: int) -> list[int]:
        """Worker w hosts the w-th of W contiguous blocks of this rank's streams: the workers'
        items, taken in worker order, are then already in stream order."""
        streams, w = self.rank_streams(), self.workers
        return streams[worker * len(streams) // w : (worker + 1) * len(streams) // w]


@dataclass
class StreamState:
    """Where one stream stands, after the samples it has handed out so far.

    `cursor` is the source's read position in this epoch (None: the start). `buffer` holds the
    shuffle buffer as source references, in slot order (seekable sources), and `draining` says
    the epoch's input is exhausted and the buffer is being emptied front to back. `taken`
    counts raw samples taken from this epoch (how a non-seekable source is replayed)."""

    epoch: int = 0
    cursor: list | None = None
    buffer: list = field(default_factory=list)
    draining: bool = False
    rng: dict | None = None
    taken: int = 0
    skipped: int = 0
    good_in_epoch: int = 0

    def as_dict(self) -> dict:
        # The buffer's references are shared, not copied: a loader worker sends every stream's
        # state every step, and a reference (a RawSample's `ref`) is never changed once made.
        return {
            "epoch": self.epoch, "cursor": self.cursor, "buffer": list(self.buffer),
            "draining": self.draining, "rng": self.rng, "taken": self.taken,
            "skipped": self.skipped, "good_in_epoch": self.good_in_epoch,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, state: dict) -> StreamState:
        return cls(**{**state, "buffer": [list(r) for r in state["buffer"]]})


def _epoch_rng(seed: int, epoch: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, stream, 2])


class StreamReader:
    """One stream's raw samples in final order, forever (epoch after epoch), with its state.

    The shuffle is the classic reservoir: fill `size` slots, then each incoming sample swaps
    with a random slot and the old occupant goes out; at the end of the epoch the slots are
    permuted once and emptied front to back."""

    def __init__(self, spec: StreamSpec, stream: int, state: StreamState | None = None):
        self.spec, self.stream, self.source = spec, stream, spec.source
        self.size = 0 if self.source.presorted else spec.shuffle_buffer
        self.state = state or StreamState()
        self._buffer: list[RawSample] = []
        self._restore()

    def _restore(self) -> None:
        st = self.state
        if st.rng is None:
            st.rng = _epoch_rng(self.spec.seed, st.epoch, self.stream).bit_generator.state
        self._rng = np.random.default_rng()
        self._rng.bit_generator.state = st.rng
        if self.source.seekable or st.taken == 0:
            self._buffer = self.source.fetch(st.buffer) if st.buffer else []
            cursor = st.cursor if self.source.seekable else None
            self._input = self.source.stream_samples(
                st.epoch, self.stream, self.spec.streams, cursor
            )
        else:  # cannot seek: replay this epoch up to the position (read, never decode)
            replay = StreamReader(self.spec, self.stream, StreamState(epoch=st.epoch))
            for _ in range(st.taken):
                replay.next_raw()
            self._buffer, self._input, self._rng = replay._buffer, replay._input, replay._rng
            st.draining, st.cursor = replay.state.draining, replay.state.cursor

    def _pull(self) -> RawSample | None:
        item = next(self._input, None)
        if item is None:
            return None
        sample, self.state.cursor = item
        return sample

    def next_raw(self) -> RawSample:
        st = self.state
        while True:
            if not st.draining:
                sample = self._pull()
                if sample is None:  # the epoch's input is exhausted: empty the buffer
                    st.draining = True
                    self._buffer = [
                        self._buffer[i] for i in self._rng.permutation(len(self._buffer))
                    ]
                    continue
                if self.size <= 1:
                    out = sample
                elif len(self._buffer) < self.size:
                    self._buffer.append(sample)
                    continue
                else:
                    slot = int(self._rng.integers(self.size))
                    out, self._buffer[slot] = self._buffer[slot], sample
            elif self._buffer:
                out = self._buffer.pop(0)
            else:
                self._next_epoch()
                st = self.state
                continue
            st.taken += 1
            return out

    def _next_epoch(self) -> None:
        st = self.state
        if st.good_in_epoch == 0:
            raise RuntimeError(
                f"stream {self.stream} got no usable sample in epoch {st.epoch}; check the "
                f"data (all samples bad?) or lower data.streams"
            )
        self.state = StreamState(epoch=st.epoch + 1, skipped=st.skipped)
        self._restore()

    def snapshot(self) -> StreamState:
        """The state now (cheap: references and counters, no sample bytes)."""
        st = self.state
        st.rng = self._rng.bit_generator.state
        refs = [s.ref for s in self._buffer] if self.source.seekable else []
        return replace(st, buffer=refs, cursor=list(st.cursor) if st.cursor else None)


def stream_chunks(
    spec: StreamSpec, streams: list[int], states: dict[int, StreamState]
) -> Iterator[tuple[dict[int, dict[str, torch.Tensor]], dict[int, dict]]]:
    """Forever, per step: ({stream: its B/S decoded samples}, {stream: state after them}).

    A chunk is dict(pixel_values (B/S, 3, S, S) uint8, input_ids (B/S, L), attention_mask).
    Bad samples are skipped, logged and counted where they would have been used."""
    transform = train_transform(spec.image_size, spec.crop_scale)
    readers = {s: StreamReader(spec, s, states.get(s)) for s in streams}
    shard_names: dict[str, str] = {}  # shard URL -> its file name (the augmentation key's head)
    while True:
        chunks = {}
        for stream, reader in readers.items():
            pixels, texts = [], []
            while len(pixels) < spec.per_stream:
                sample = reader.next_raw()
                try:
                    image, text = decode(
                        sample, image_keys=spec.image_keys, caption_key=spec.caption_key
                    )
                except ValueError as exc:
                    reader.state.skipped += 1
                    log.warning(
                        "skipping bad sample shard=%s key=%s: %s", sample.shard, sample.key, exc
                    )
                    continue
                reader.state.good_in_epoch += 1
                # The crop depends on the sample's identity, not on process, stream or timing.
                name = shard_names.get(sample.shard)
                if name is None:
                    name = shard_names[sample.shard] = PurePosixPath(sample.shard).name
                key = f"{name}/{sample.key}"
                pixels.append(transform(image, sample_seed(spec.seed, reader.state.epoch, key)))
                texts.append(text)
            input_ids, attention_mask = tokenize(spec.tokenizer, texts, spec.context_length)
            chunks[stream] = {
                "pixel_values": torch.stack(pixels),  # (B/S, 3, S, S) uint8
                "input_ids": input_ids,  # (B/S, L)
                "attention_mask": attention_mask,  # (B/S, L)
            }
        yield chunks, {s: r.snapshot().as_dict() for s, r in readers.items()}
