"""`build_train_loader`: this rank's infinite stream of exactly-b batches, with exact resume.

Order (docs/data_order.md). Global batch t is B/S consecutive samples of each of the run's S
logical streams (data/stream.py). This rank hosts streams r, r+N, r+2N, ...; with `workers > 0`
DataLoader process w hosts the w-th contiguous block of those and yields one item per step, so
the loader's round-robin gives the main process one item from every worker per step, which it
joins in stream order. With `workers = 0` all the rank's streams run in-process. Neither N nor W
changes which samples make up a global batch.

Resume. The state is the step count plus each hosted stream's position (epoch, reader cursor,
shuffle buffer as references, generator state, skip count). Restoring re-reads the buffered
samples by reference and seeks the reader to its byte offset: about one shuffle buffer plus one
batch per stream, wherever in the epoch. Given the states of every rank of a checkpoint, a rank
of a run with another world size takes the streams it now hosts.

Hand-over. What crosses from a worker to the training process each step is built to cost that
process almost nothing (`_Part`): one shared-memory buffer per worker for all its streams'
samples, and the streams' states as one JSON text, decoded only when a checkpoint asks.
Batches carry uint8 pixels (b, 3, S, S), the crops before rescaling and CLIP
normalisation: the trainer moves them to the GPU and calls data.transforms.normalize_pixels
there (bit-identical to normalising in the worker, 4x less host memory and PCIe traffic than
fp32). When CUDA is available the batches are in pinned memory, so the trainer's
`.to(device, non_blocking=True)` overlaps with compute. Host memory is W x PREFETCH_FACTOR
batches in flight plus each hosted stream's shuffle buffer (`disco-clip plan` prints the sum).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.config import DataConfig
from data.decode import parse_keys
from data.hf import HFSource
from data.mix import MixedSource
from data.stream import StreamSpec, StreamState, stream_chunks
from data.wds_source import WebDatasetSource

log = logging.getLogger(__name__)

STATE_VERSION = 2
PREFETCH_FACTOR = 2  # batches each worker process keeps ready (trainer/plan/planner.py counts them)


@dataclass
class _Part:
    """One loader process's share of a step, shaped so that receiving it is cheap for the
    training process (measured there: 6-10 ms per step before, on a 2-core CPU run).

    - One buffer for all the worker's samples: the DataLoader sends every tensor storage as a
      shared-memory handle of its own, one socket round trip to the worker each, so three
      tensors per stream cost three round trips per stream.
    - The states as one JSON text, decoded only when a checkpoint (or a restart of the
      workers) needs them: a stream's state lists its whole shuffle buffer by reference
      (~1000 entries), and unpickling every stream's every step was ~3 ms in the training
      process. JSON, not pickle: the states are plain data by contract (a checkpoint loads
      them with weights_only=True), and encoding costs the worker ~0.4 ms per 1000-entry
      buffer. In-process (workers = 0) they stay a dict.
    - A dataclass, not a dict: the DataLoader's default_convert would walk every nested list
      of the states in the worker (28% of a worker's CPU before).
    """

    streams: list[int]  # in order; a worker's streams are a contiguous block of the rank's
    rows: int
    buffer: torch.Tensor  # uint8, laid out by _layout: pixels | input_ids | attention_mask
    skipped: dict[int, int]  # stream -> bad samples skipped so far (every step's signals)
    states: str | dict[int, dict]  # stream -> StreamState.as_dict(); JSON across processes


def _layout(rows: int, image_size: int, context_length: int) -> tuple[int, int, int]:
    """Byte offsets (input_ids, attention_mask, end) in a part's buffer; the int64 tensors start
    at multiples of 8 so that the uint8 buffer can be viewed as int64 there."""
    ids_at = -(-rows * 3 * image_size * image_size // 8) * 8
    mask_at = ids_at + rows * context_length * 8
    return ids_at, mask_at, mask_at + rows * context_length * 8


def _views(buffer: torch.Tensor, rows: int, image_size: int, context_length: int) -> dict:
    """The batch dict over a buffer laid out by _layout (views, no copies)."""
    ids_at, mask_at, end = _layout(rows, image_size, context_length)
    pixels = rows * 3 * image_size * image_size
    return {
        "pixel_values": buffer[:pixels].view(rows, 3, image_size, image_size),
        "input_ids": buffer[ids_at:mask_at].view(torch.int64).view(rows, context_length),
        "attention_mask": buffer[mask_at:end].view(torch.int64).view(rows, context_length),
    }


def _parts(spec: StreamSpec, streams: list[int], states: dict[int, dict], *, encode: bool):
    """stream_chunks for `streams`, one _Part per step."""
    size, length = spec.image_size, spec.context_length
    for chunks, after in stream_chunks(spec, streams, _restored(states, streams)):
        rows = sum(len(chunks[s]["input_ids"]) for s in streams)
        buffer = torch.empty(_layout(rows, size, length)[2], dtype=torch.uint8)
        for key, out in _views(buffer, rows, size, length).items():
            torch.cat([chunks[s][key] for s in streams], out=out)
        yield _Part(
            streams, rows, buffer, skipped={s: st["skipped"] for s, st in after.items()},
            states=_encode_states(after) if encode else after,
        )  # fmt: skip


def _encode_states(states: dict[int, dict]) -> str:
    return json.dumps(list(states.items()), separators=(",", ":"))  # int keys stay ints


def _decode_states(states: str | dict[int, dict]) -> dict[int, dict]:
    return {int(s): state for s, state in json.loads(states)} if isinstance(states, str) else states


class _Workers(IterableDataset):
    """DataLoader dataset whose process w hosts logical worker w's streams; each process yields
    one _Part per step, so the loader's round-robin hands the main process one part from every
    worker per step."""

    def __init__(self, spec: StreamSpec, states: dict[int, dict]):
        self.spec, self.states = spec, states

    def __iter__(self):
        streams = self.spec.worker_streams(get_worker_info().id)
        yield from _parts(self.spec, streams, self.states, encode=True)


def _as_is(part: _Part) -> _Part:
    return part


def _restored(states: dict[int, dict], streams: list[int]) -> dict[int, StreamState]:
    return {s: StreamState.from_dict(states[s]) for s in streams if s in states}


def _one_thread(_: int) -> None:
    # W worker processes on a small machine: intra-op threads would only oversubscribe it.
    torch.set_num_threads(1)


class TrainLoader:
    """Infinite iterator of this rank's slice of each global batch: dict(pixel_values (b,3,S,S)
    uint8, input_ids (b,L), attention_mask (b,L)), the chunks of its streams in stream order,
    pinned when CUDA is available; normalise the pixels with data.transforms.normalize_pixels
    after moving them to the device."""

    def __init__(self, spec: StreamSpec, processes: bool):
        self.spec = spec
        self.processes = processes
        self.steps = 0
        self._states: dict[int, dict] = {}  # stream -> its state after the last batch handed out
        self._pending: dict[tuple[int, ...], str | dict] = {}  # newer states, not yet decoded
        self._skipped: dict[int, int] = {}  # stream -> bad samples it skipped so far
        self._iter: Iterator[_Part] | None = None

    @property
    def states(self) -> dict[int, dict]:
        """stream -> its state after the last batch handed out (decoded on demand: _Part)."""
        for encoded in self._pending.values():
            self._states.update(_decode_states(encoded))
        self._pending.clear()
        return self._states

    @property
    def skipped_samples(self) -> int:
        """Bad samples (undecodable, missing caption, truncated tar) skipped by this rank's
        streams since the start of training."""
        return sum(self._skipped.values())

    def __iter__(self) -> TrainLoader:
        return self

    def start(self) -> None:
        """Start producing batches now (worker processes fork and fill their shuffle buffers)
        rather than at the first `next`: the trainer calls it before building the model and
        the engine, so the first batch is ready when they are."""
        if self._iter is None:
            self._iter = self._start()

    def __next__(self) -> dict[str, torch.Tensor]:
        self.start()
        parts = [next(self._iter) for _ in range(self.spec.workers if self.processes else 1)]
        parts.sort(key=lambda part: part.streams[0])  # stream order, whatever the worker count
        for part in parts:
            self._pending[tuple(part.streams)] = part.states
            self._skipped.update(part.skipped)
        self.steps += 1
        # Pinned (page-locked) batches let the trainer's .to(device, non_blocking=True) copy
        # asynchronously. Only on a CUDA machine: pinning needs a CUDA device, so the CPU test
        # suite cannot exercise this path (tests/gpu does).
        return self._join(parts, pin=torch.cuda.is_available())

    def _join(self, parts: list[_Part], pin: bool) -> dict[str, torch.Tensor]:
        """The rank batch: views of the one part's buffer when that will do, else one buffer
        (pinned when `pin`) that the parts are copied into."""
        size, length = self.spec.image_size, self.spec.context_length
        if len(parts) == 1 and not pin:
            return _views(parts[0].buffer, parts[0].rows, size, length)
        rows = sum(part.rows for part in parts)
        buffer = torch.empty(_layout(rows, size, length)[2], dtype=torch.uint8, pin_memory=pin)
        batch = _views(buffer, rows, size, length)
        pieces = [_views(part.buffer, part.rows, size, length) for part in parts]
        for key, out in batch.items():
            torch.cat([piece[key] for piece in pieces], out=out)
        return batch

    def _start(self) -> Iterator[_Part]:
        states = dict(self.states)
        if not self.processes:
            return _parts(self.spec, self.spec.rank_streams(), states, encode=False)
        loader = DataLoader(
            _Workers(self.spec, states),
            batch_size=None,
            collate_fn=_as_is,
            num_workers=self.spec.workers,
            worker_init_fn=_one_thread,
            prefetch_factor=PREFETCH_FACTOR,
            persistent_workers=False,
            # Its own generator: starting workers must not draw from the global torch RNG, or
            # dropout after a resume (which restarts the workers mid-run) would be shifted.
            generator=torch.Generator().manual_seed(self.spec.seed),
        )
        return iter(loader)

    def state_dict(self) -> dict:
        """This rank's streams' positions: plain ints, lists and dicts (weights_only-loadable)."""
        spec = self.spec
        return {
            "version": STATE_VERSION,
            "steps": self.steps,
            "seed": spec.seed,
            "streams": spec.streams,
            "global_batch": spec.global_batch,
            "stream_states": dict(self.states),
        }

    def load_state_dict(self, state: dict | list[dict]) -> None:
        """Continue exactly where the loader(s) that saved `state` stopped: one rank's state,
        or the states of every rank of a checkpoint (then the run may have another world size:
        each rank takes the streams it now hosts)."""
        spec = self.spec
        saved = [state] if isinstance(state, dict) else list(state)
        expected = {"version": STATE_VERSION, "seed": spec.seed, "streams": spec.streams,
                    "global_batch": spec.global_batch}  # fmt: skip
        merged: dict[int, dict] = {}
        for one in saved:
            for name, value in expected.items():
                if one.get(name) != value:
                    raise ValueError(
                        f"loader state: {name}={one.get(name)} but this run has {value}; a "
                        f"resume needs the same run.seed, data.streams and global batch size"
                    )
            merged.update({int(s): st for s, st in one["stream_states"].items()})
        steps = {int(one["steps"]) for one in saved}
        if len(steps) != 1:
            raise ValueError(f"loader state: the saved ranks stopped at different steps {steps}")
        missing = [s for s in spec.rank_streams() if s not in merged and steps != {0}]
        if missing:
            raise ValueError(
                f"loader state: streams {missing[:4]} of this rank are in none of the saved "
                "states; pass the data states of every rank of the checkpoint"
            )
        self.close()
        self.steps = steps.pop()
        self._states = {s: merged[s] for s in spec.rank_streams() if s in merged}
        self._pending.clear()
        self._skipped = {s: int(state["skipped"]) for s, state in self._states.items()}

    def close(self) -> None:
        """Stop worker processes (a new iteration starts them again from the saved position)."""
        if self._iter is not None and hasattr(self._iter, "_shutdown_workers"):
            self._iter._shutdown_workers()
        self._iter = None


def build_source(cfg: DataConfig, seed: int) -> WebDatasetSource | HFSource | MixedSource:
    if cfg.source == "hf":
        return HFSource(cfg.hf_path, cfg.hf_split, cfg.hf_streaming, cfg.image_column,
                        cfg.text_column, seed, cfg.resampled)  # fmt: skip

    def shards(spec: str) -> WebDatasetSource:
        return WebDatasetSource.from_spec(spec, seed=seed, resampled=cfg.resampled,
                                          allow_pipe=cfg.allow_pipe, allow_remote=cfg.allow_remote)  # fmt: skip

    if cfg.sources:
        return MixedSource(tuple(shards(s.train_shards) for s in cfg.sources),
                           tuple(s.weight for s in cfg.sources))  # fmt: skip
    return shards(cfg.train_shards)


def build_train_loader(
    cfg: DataConfig, *, rank: int, world_size: int, local_batch_size: int, tokenizer, seed: int
) -> TrainLoader:
    """This rank's loader: `local_batch_size` pairs per batch, forever."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    if local_batch_size <= 0:
        raise ValueError(f"local_batch_size {local_batch_size} must be positive")
    # Tokenizers' own thread pool deadlocks after fork; batches are tokenised per worker anyway.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    source = build_source(cfg, seed)
    streams, world_batch = cfg.streams, local_batch_size * world_size
    if streams % world_size or world_batch % streams:
        raise ValueError(
            f"streams: data.streams={streams} must be a multiple of the world size {world_size} "
            f"and divide the global batch size {world_batch}"
        )
    source.check_streams(streams)
    workers = max(1, cfg.workers) if cfg.workers > 0 else 1
    most = streams // world_size  # every worker hosts at least one stream
    if workers > most:
        log.warning("data.workers=%d but this rank hosts %d streams; using %d", workers, most, most)
        workers = most
    spec = StreamSpec(
        source=source, tokenizer=tokenizer, seed=seed, streams=streams, global_batch=world_batch,
        rank=rank, world_size=world_size, workers=workers, shuffle_buffer=cfg.shuffle_buffer,
        image_size=cfg.image_size, context_length=cfg.context_length,
        crop_scale=tuple(cfg.random_resized_crop_scale),
    )  # fmt: skip
    if cfg.source == "webdataset":  # HF rows come as members "jpg"/"txt": decode's defaults
        spec = replace(spec, image_keys=parse_keys(cfg.image_key), caption_key=cfg.caption_key)
    return TrainLoader(spec, processes=cfg.workers > 0)
