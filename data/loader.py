"""`build_train_loader`: this rank's infinite stream of exactly-b batches, with exact resume.

Order. Logical worker w of W reads its own shards/rows (see wds_source.py, hf.py) and emits
whole batches; batch n of the rank comes from worker n mod W. With `workers > 0` each logical
worker is a DataLoader process, whose round-robin fetching produces exactly that interleaving;
with `workers = 0` the one logical worker runs in-process (same order as `workers = 1`). Each
worker rolls into its next epoch by itself, and so does each rank: ranks never need to agree
on steps per epoch because the loader never ends. The order depends on (seed, world size,
workers), so resume needs the same three.

Resume. The state is the number of batches yielded plus each worker's position after its last
batch (epoch, raw samples taken in that epoch, bad samples skipped). Restoring restarts each
worker at its position: a non-streaming HF source jumps to the row; tar shards and HF streams
replay the epoch up to the offset through the seeded shuffle buffer, reading bytes but never
decoding them (cost: reading at most one epoch of this worker's shards).

Hand-over. Batches carry uint8 pixels (b, 3, S, S), the crops before rescaling and CLIP
normalisation: the trainer moves them to the GPU and calls data.transforms.normalize_pixels
there (bit-identical to normalising in the worker, 4x less host memory and PCIe traffic than
fp32). When CUDA is available the batches are in pinned memory, so the trainer's
`.to(device, non_blocking=True)` overlaps with compute. Host memory is W x PREFETCH_FACTOR
batches in flight plus each worker's shuffle buffer (`disco-clip plan` prints the sum).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.config import DataConfig
from data.hf import HFSource
from data.stream import StreamSpec, WorkerPosition, worker_batches
from data.wds_source import WebDatasetSource

log = logging.getLogger(__name__)

STATE_VERSION = 1
PREFETCH_FACTOR = 2  # batches each worker process keeps ready (trainer/plan/planner.py counts them)


class _Workers(IterableDataset):
    """DataLoader dataset whose process i plays logical worker (i + rotation) mod W, so that a
    restored loader continues the round-robin where the interrupted one stopped."""

    def __init__(self, spec: StreamSpec, positions: list[WorkerPosition], rotation: int):
        self.spec, self.positions, self.rotation = spec, positions, rotation

    def __iter__(self):
        info = get_worker_info()
        worker = (info.id + self.rotation) % self.spec.workers
        for batch, position in worker_batches(self.spec, worker, self.positions[worker]):
            yield batch, worker, position.as_list()


def _one_thread(_: int) -> None:
    # W worker processes on a small machine: intra-op threads would only oversubscribe it.
    torch.set_num_threads(1)


class TrainLoader:
    """Infinite iterator of dict(pixel_values (b,3,S,S) uint8, input_ids (b,L), attention_mask
    (b,L)), pinned when CUDA is available; normalise the pixels with
    data.transforms.normalize_pixels after moving them to the device."""

    def __init__(self, spec: StreamSpec, processes: bool):
        self.spec = spec
        self.processes = processes
        self.batches = 0
        self.positions = [WorkerPosition() for _ in range(spec.workers)]
        self._iter: Iterator | None = None

    @property
    def skipped_samples(self) -> int:
        """Bad samples (undecodable, missing caption, truncated tar) skipped on this rank."""
        return sum(p.skipped for p in self.positions)

    @property
    def epoch(self) -> int:
        """Epochs every worker of this rank has finished (workers roll over independently)."""
        return min(p.epoch for p in self.positions)

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._iter is None:
            self._iter = self._start()
        batch, worker, position = next(self._iter)
        self.positions[worker] = WorkerPosition(*position)
        self.batches += 1
        return batch

    def _start(self) -> Iterator:
        # Pinned (page-locked) batches let the trainer's .to(device, non_blocking=True) copy
        # asynchronously. Only on a CUDA machine: the CPU test suite cannot exercise the pinned
        # path (pin_memory needs a CUDA device), so it is tested where a GPU is.
        pin = torch.cuda.is_available()
        if not self.processes:
            batches = worker_batches(self.spec, 0, self.positions[0])
            return ((_pinned(b) if pin else b, 0, p.as_list()) for b, p in batches)
        dataset = _Workers(self.spec, list(self.positions), self.batches % self.spec.workers)
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.spec.workers,
            worker_init_fn=_one_thread,
            prefetch_factor=PREFETCH_FACTOR,
            # The pin thread pins into the current CUDA device's context when the loader
            # starts (the first next()), after the trainer has chosen its device.
            pin_memory=pin,
            persistent_workers=False,
            # Its own generator: starting workers must not draw from the global torch RNG, or
            # dropout after a resume (which restarts the workers mid-run) would be shifted.
            generator=torch.Generator().manual_seed(self.spec.seed),
        )
        return iter(loader)

    def state_dict(self) -> dict:
        """JSON-serialisable position: plain ints and lists."""
        spec = self.spec
        return {
            "version": STATE_VERSION,
            "batches": self.batches,
            "seed": spec.seed,
            "rank": spec.rank,
            "world_size": spec.world_size,
            "workers": spec.workers,
            "batch_size": spec.batch_size,
            "positions": [p.as_list() for p in self.positions],
            "skipped_samples": self.skipped_samples,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where the loader that saved `state` stopped."""
        spec = self.spec
        expected = {"version": STATE_VERSION, "seed": spec.seed, "rank": spec.rank,
                    "world_size": spec.world_size, "workers": spec.workers, "batch_size": spec.batch_size}  # fmt: skip
        for name, value in expected.items():
            if state.get(name) != value:
                raise ValueError(
                    f"loader state: {name}={state.get(name)} but this loader has {value}; exact "
                    f"resume needs the same seed, rank, world size, workers and batch size"
                )
        self.close()
        self.batches = int(state["batches"])
        self.positions = [WorkerPosition(*map(int, p)) for p in state["positions"]]

    def close(self) -> None:
        """Stop worker processes (a new iteration starts them again from the saved position)."""
        if self._iter is not None and hasattr(self._iter, "_shutdown_workers"):
            self._iter._shutdown_workers()
        self._iter = None


def _pinned(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.pin_memory() for name, tensor in batch.items()}


def build_source(cfg: DataConfig, seed: int) -> WebDatasetSource | HFSource:
    if cfg.source == "hf":
        return HFSource(cfg.hf_path, cfg.hf_split, cfg.hf_streaming, cfg.image_column,
                        cfg.text_column, seed, cfg.resampled)  # fmt: skip
    return WebDatasetSource.from_spec(cfg.train_shards, seed=seed, resampled=cfg.resampled,
                                      allow_pipe=cfg.allow_pipe)  # fmt: skip


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
    workers = max(1, cfg.workers)
    most = source.max_workers(world_size)
    if workers > most:
        log.warning("data.workers=%d but rank shards allow only %d; using %d", workers, most, most)
        workers = most
    spec = StreamSpec(
        source=source, tokenizer=tokenizer, seed=seed, rank=rank, world_size=world_size,
        workers=workers, batch_size=local_batch_size, shuffle_buffer=cfg.shuffle_buffer,
        image_size=cfg.image_size, context_length=cfg.context_length,
        crop_scale=tuple(cfg.random_resized_crop_scale),
    )  # fmt: skip
    return TrainLoader(spec, processes=cfg.workers > 0)
