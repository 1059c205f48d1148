"""Peak memory measurement on CPU, where torch has no allocator statistics.

The profiler records every allocation and free of the torch CPU allocator ("[memory]" events
with signed byte counts); replaying them in time order gives the peak of live tensor bytes
during `fn`, above what was live before it. This counts tensors only (not Python objects),
which is what the loss-memory claims are about. It does count the torch tensors gloo's
all-gather and reduce-scatter copy their inputs into (one B×d each; NCCL makes none):
bench/loss_bench.py's `nccl_like_collectives` measures without them.
"""

from __future__ import annotations

from collections.abc import Callable

from torch.profiler import ProfilerActivity, profile


def peak_tensor_bytes(fn: Callable[[], object]) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak
