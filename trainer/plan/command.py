"""`disco-clip plan`: the arguments, the report, the exit codes."""

from __future__ import annotations

import argparse
import sys

from trainer.plan.host import LOADER_PREFETCH_FACTOR, host_plan
from trainer.plan.planner import (
    LOSS_NAMES,
    PRECISION_BYTES,
    SAMPLE_BYTES,
    PlanSpec,
    _shape,
    budget,
    fits,
    largest_batch,
    parse_memory,
    plan,
)
from trainer.plan.stage import recommend_stage, recommendation_line


def _gib(n: int) -> str:
    return f"{n / 2**30:8.2f} GiB"


def format_report(spec: PlanSpec) -> str:
    """The breakdown, the verdict, the largest batch and the assumptions, as printed."""
    shape = _shape(spec)
    br = plan(spec)
    host = host_plan(spec)
    b = spec.batch // spec.gpus
    extras = f", grad-cache K={spec.grad_cache}" if spec.grad_cache > 1 else ""
    extras += ", activation checkpointing" if spec.checkpointing else ""
    lines = [
        f"{spec.model} ({shape.params / 1e6:.1f}M params), {spec.gpus} GPUs × "
        f"{spec.gpu_memory / 2**30:g} GiB, B={spec.batch} (b={b}/rank), ZeRO-{spec.zero}, "
        f"{spec.precision}, loss={spec.loss}{extras}",
        f"  parameters   {_gib(br.parameters)}",
        f"  gradients    {_gib(br.gradients)}",
        f"  optimizer    {_gib(br.optimizer)}",
        f"  zero buffers {_gib(br.buffers)}",
        f"  activations  {_gib(br.activations)}",
        f"  loss         {_gib(br.loss)}",
        f"  total        {_gib(br.total)}  of {_gib(budget(spec))} usable "
        f"({spec.usable_fraction:.0%}): {'FITS' if fits(spec) else 'DOES NOT FIT'}",
        f"  largest global batch that fits: {largest_batch(spec)}",
        recommendation_line(recommend_stage(spec)),
        f"host memory per rank {_gib(host.per_rank)}  (loader, S={shape.image_size}, "
        f"{spec.workers} workers, batch {host.batch / 2**30:.2f} GiB uint8)",
        f"  prefetched   {_gib(host.prefetched)}  "
        f"({LOADER_PREFETCH_FACTOR} batches, in {spec.workers} workers' shares)",
        f"  stacking     {_gib(host.stacking)}  (the crops, and their concatenation)",
        f"  shuffle      {_gib(host.shuffle)}  ({spec.shuffle_buffer} samples × "
        f"{spec.sample_bytes / 2**10:g} KiB × {max(1, spec.streams // spec.gpus)} streams)",
        f"  pinned       {_gib(host.pinned)}  (the batch being copied to the GPU)",
        f"  per node     {_gib(host.per_node)}  ({spec.gpus_per_node} GPUs per node)",
        "assumptions: AdamW; mixed precision = 16-bit weights, gradients and activations "
        "with fp32 master and moments; sdpa attention (no s×s matrix kept); loss in fp32; "
        "ZeRO buckets from ds_configs; peak in the loss backward (or, with grad-cache, the "
        "larger of the loss and the re-encode); "
        f"{1 - spec.usable_fraction:.0%} of memory kept for CUDA context and fragmentation; "
        "host: uint8 pixels normalised on the GPU, an assumed "
        f"{spec.sample_bytes / 2**10:g} KiB per undecoded sample, processes themselves not "
        "counted.",
    ]
    return "\n".join(lines)


def _spec_from_args(args: argparse.Namespace) -> PlanSpec:
    """Validate the CLI arguments; a ValueError's message is the one-line error."""
    from trainer.model import PRESETS

    if args.model not in PRESETS:
        raise ValueError(f"--model: unknown {args.model!r}; choose one of {', '.join(PRESETS)}")
    if args.gpus < 1 or args.batch < 1 or args.grad_cache < 1:
        raise ValueError("--gpus, --batch and --grad-cache must be >= 1")
    if args.batch % args.gpus:
        raise ValueError(f"--batch {args.batch} is not divisible by --gpus {args.gpus}")
    if (args.batch // args.gpus) % args.grad_cache:
        raise ValueError(
            f"--grad-cache {args.grad_cache} does not divide the per-GPU batch "
            f"{args.batch // args.gpus}"
        )
    if args.image_size < 0 or args.workers < 0 or args.shuffle_buffer < 0 or args.streams < 1:
        raise ValueError(
            "--image-size, --workers and --shuffle-buffer must be >= 0, --streams >= 1"
        )
    if args.gpus_per_node < 1 or args.sample_bytes < 0:
        raise ValueError("--gpus-per-node must be >= 1 and --sample-bytes >= 0")
    if not 0 < args.usable_fraction <= 1:
        raise ValueError(f"--usable-fraction must be in (0, 1], got {args.usable_fraction}")
    return PlanSpec(
        model=args.model,
        gpus=args.gpus,
        gpu_memory=parse_memory(args.gpu_memory),
        batch=args.batch,
        zero=args.zero,
        loss=args.loss,
        precision=args.precision,
        grad_cache=args.grad_cache,
        checkpointing=args.grad_checkpointing,
        tile=args.tile,
        context_length=args.context_length,
        usable_fraction=args.usable_fraction,
        image_size=args.image_size,
        workers=args.workers,
        shuffle_buffer=args.shuffle_buffer,
        streams=args.streams,
        sample_bytes=args.sample_bytes,
        gpus_per_node=args.gpus_per_node,
        lock_image=args.lock_image,
        lock_text=args.lock_text,
    )


def _run(args: argparse.Namespace) -> int:
    try:
        spec = _spec_from_args(args)
    except ValueError as err:
        print(f"disco-clip plan: error: {err}", file=sys.stderr)
        return 2
    print(format_report(spec))
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("plan", help="per-GPU memory breakdown and the largest batch")
    p.add_argument("--model", default="vit_b32", help="model preset (tiny, vit_b32)")
    p.add_argument("--gpus", type=int, default=8, help="data-parallel GPUs N")
    p.add_argument("--gpu-memory", default="40GB", help="per GPU; GB = GiB (e.g. 40GB, 80GiB)")
    p.add_argument("--batch", type=int, default=32768, help="global contrastive batch B")
    p.add_argument("--zero", type=int, default=2, choices=(0, 1, 2, 3), help="ZeRO stage")
    p.add_argument("--loss", default="disco", choices=LOSS_NAMES)
    p.add_argument("--precision", default="bf16", choices=tuple(PRECISION_BYTES))
    p.add_argument("--grad-cache", type=int, default=1, help="gradient-caching chunks K")
    p.add_argument("--grad-checkpointing", action="store_true", help="checkpoint every layer")
    p.add_argument("--tile", type=int, default=512, help="tile columns of the tiled loss")
    p.add_argument("--context-length", type=int, default=77, help="text tokens per sample")
    p.add_argument("--usable-fraction", type=float, default=0.9, help="of --gpu-memory")
    p.add_argument("--image-size", type=int, default=0, help="input side S (0: preset's, 224)")
    p.add_argument("--workers", type=int, default=8, help="loader workers per rank")
    p.add_argument("--shuffle-buffer", type=int, default=1000, help="samples per stream buffer")
    p.add_argument("--streams", type=int, default=512, help="data.streams (S logical streams)")
    p.add_argument(
        "--sample-bytes",
        type=int,
        default=SAMPLE_BYTES,
        help="assumed mean undecoded sample in a shuffle buffer (default 40 KiB: LAION)",
    )
    p.add_argument("--gpus-per-node", type=int, default=8, help="ranks per node (host memory)")
    p.add_argument("--lock-image", action="store_true", help="frozen image tower (LiT)")
    p.add_argument("--lock-text", action="store_true", help="frozen text tower")
    p.set_defaults(func=_run)
