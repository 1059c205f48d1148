"""Host memory per rank and per node of the loader (`disco-clip plan` prints it beside the GPU
plan); the formula is in trainer/plan/planner.py's module docstring, "Host memory"."""

from __future__ import annotations

from dataclasses import dataclass

from trainer.plan.planner import PlanSpec, _shape

# because data.loader pulls in transformers and `disco-clip plan` must start fast.
LOADER_PREFETCH_FACTOR = 2
# = data.loader.PREFETCH_FACTOR (tests/unit/test_plan.py checks they agree); not imported,
PIXEL_BYTES = 1  # uint8 pixels from the loader (the old fp32 hand-over: 4)


@dataclass(frozen=True)
class HostBreakdown:
    """Host bytes of one rank's input pipeline by component (module docstring)."""

    batch: int
    """One batch as the loader hands it over: pixels + token ids and mask."""
    prefetched: int
    stacking: int
    shuffle: int
    pinned: int
    gpus_per_node: int

    @property
    def per_rank(self) -> int:
        return self.prefetched + self.stacking + self.shuffle + self.pinned

    @property
    def per_node(self) -> int:
        return self.per_rank * self.gpus_per_node


def loader_batch_bytes(
    b: int, image_size: int, context_length: int, pixel_bytes: int = PIXEL_BYTES
) -> int:
    """Bytes of one loader batch: (b, 3, S, S) pixels + int64 input_ids and attention_mask."""
    return b * 3 * image_size**2 * pixel_bytes + 2 * b * context_length * 8


def host_plan(spec: PlanSpec, *, pixel_bytes: int = PIXEL_BYTES) -> HostBreakdown:
    """Host memory of one rank's loader (module docstring); `pixel_bytes` 4 = the old fp32."""
    b = spec.batch // spec.gpus
    batch = loader_batch_bytes(b, _shape(spec).image_size, spec.context_length, pixel_bytes)
    return HostBreakdown(
        batch=batch,
        prefetched=LOADER_PREFETCH_FACTOR * batch if spec.workers else 0,
        stacking=2 * batch,
        shuffle=max(1, spec.streams // spec.gpus) * spec.shuffle_buffer * spec.sample_bytes,
        pinned=batch,
        gpus_per_node=spec.gpus_per_node,
    )
