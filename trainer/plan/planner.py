"""`disco-clip plan`: per-rank GPU memory of a CLIP run, the largest global batch that fits, and
the host memory the input pipeline needs per rank and per node.

An analytic model, checked on this machine by bench/plan_vs_measured.py (tiny model, measured
peak tensor bytes). Per rank, in bytes, with P parameters, N ranks, b = B/N:

- parameters: the model's weights in the training dtype (fp32: 4P; bf16/fp16: 2P); ZeRO-3
  shards them, except parameters smaller than `stage3_param_persistence_threshold`, which
  every rank keeps whole (DeepSpeed's persistence rule).
- gradients: one per parameter in the training dtype; sharded from ZeRO-2.
- optimizer: AdamW's two fp32 moments (8P) plus the fp32 master weights (4P) — under mixed
  precision, and also in fp32 from ZeRO-1 (DeepSpeed clones the fp32 partition); sharded from
  ZeRO-1. Mixed precision: 2P + 2P + 12P, the ZeRO paper's K = 12.
- buffers: ZeRO's gradient buckets, `reduce_bucket_size` elements each, read from the ZeRO
  stage's ds_configs JSON (ZeRO-1: one fp32 bucket; ZeRO-2: one per overlap_comm buffer, in
  the training dtype; ZeRO-3: one). At the shipped 5e8 elements they are GBs.
- activations: what autograd saves, per sample, per tower (plan_activations below), plus the
  input batch.
- loss: the contrastive loss's peak, fp32 (the losses cast up before the gather), checked
  against measured tensor bytes by tests/dist/test_loss_memory.py and bench/loss_bench.py:
  naive 5 B×B blocks + 2·B·d; disco 2 b×B blocks (one softmax − onehot per direction) +
  4·B·d (gathered features and their gradients) + 2·b·d; tiled one gathered B×d at a time +
  one b×t tile and its t×d slice + 2·b·d row buffers (see `loss_bytes`).

The total is the states + buffers + gradients plus the larger of two phases: the loss backward
with every activation still live (a plain step's peak), or — with gradient caching, where the
loss runs between the graph-free encode and the re-encode — the re-encode of b/K samples
beside the cached features. Counting all gradients at the peak over-estimates by at most
one gradient copy. It must fit in gpu_memory ×
usable_fraction (default 0.9: the CUDA context, NCCL buffers and allocator fragmentation).

Host memory per rank (host_plan), in bytes, with W loader workers (data.workers), batch bytes
β = b·3·S² (uint8 pixels: data/loader.py hands them over unnormalised) + 2·b·L·8 (int64 ids
and mask):

- prefetched: PREFETCH_FACTOR × β: each of the W workers keeps PREFETCH_FACTOR items in flight
  (in shared memory), and an item is its streams' share of one batch, β/W
  (data/loader.py's PREFETCH_FACTOR);
- stacking: 2 × β, the workers' crops while torch.stack copies them into their chunks (β in
  all) and the main process's concatenation of the chunks into the batch (β);
- shuffle buffers: (S/N) × shuffle_buffer × sample_bytes, the undecoded samples (jpg + txt +
  json) held by the shuffle buffers of the S/N logical streams this rank hosts (data.streams); sample_bytes is an assumption, 40 KiB by default
  (the order of img2dataset's 256 px LAION JPEGs; not measured here: measure your shards
  and pass --sample-bytes);
- pinned: β, the batch the trainer holds in page-locked memory while it copies it to the GPU.

Not counted: the processes themselves (Python, torch and the tokenizer in W + 1 processes,
some hundred MB each), DeepSpeed's host-side buffers, the page cache. Per node = per rank ×
GPUs per node. The old fp32 hand-over (pixel_bytes=4) needed 4× the pixel terms.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, replace

from trainer.plan.activations import TowerShape, activation_bytes, input_bytes

LOSS_NAMES = ("disco", "naive", "tiled")
PRECISION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
NAIVE_BLOCKS = 5  # B×B fp32 blocks at the naive loss's peak (bench/loss_bench.py, d=64, N=2)
DISCO_BLOCKS = 2  # b×B fp32 blocks at the DisCo loss's peak: one softmax − onehot per direction
DISCO_FEATURE_BUFFERS = 4  # B×d fp32 at DisCo's peak: both gathered features and their gradients
ROW_BUFFERS = 2  # b×d fp32 row gradients (image, text) at the disco and tiled peaks
LOSS_DTYPE_BYTES = 4  # the losses upcast to fp32 before gathering, whatever the precision
CE_CHUNKS = 8  # row chunks of DisCo's cross-entropy (trainer/losses/disco.py: _CE_CHUNKS)
OPENAI_CLIP_VOCAB = 49408
SAMPLE_BYTES = 40 * 2**10  # assumed mean undecoded LAION sample (jpg + txt + json)
_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


@dataclass(frozen=True)
class PlanSpec:
    """One run to plan: model, cluster, batch and training options."""

    model: str = "vit_b32"
    """A preset of trainer.model.PRESETS."""
    gpus: int = 8
    """Data-parallel ranks N."""
    gpu_memory: int = 40 * 2**30
    """Bytes per GPU."""
    batch: int = 32768
    """Global contrastive batch B (a multiple of gpus)."""
    zero: int = 2
    """ZeRO stage 0-3 (0 = plain data parallel, as DDP)."""
    loss: str = "disco"
    """disco, naive or tiled."""
    precision: str = "bf16"
    """fp32, bf16 or fp16 (DeepSpeed mixed precision: the model and activations in 16 bits)."""
    grad_cache: int = 1
    """Gradient-caching chunks K (1 = off)."""
    checkpointing: bool = False
    """Activation (gradient) checkpointing of every encoder layer."""
    tile: int = 512
    """Columns per tile of the tiled loss."""
    context_length: int = 77
    """Text tokens per sample (CLIP: 77)."""
    vocab_size: int = OPENAI_CLIP_VOCAB
    """Text vocabulary (CLIP's BPE: 49408)."""
    usable_fraction: float = 0.9
    """Share of gpu_memory that tensors may use (the rest: CUDA context, fragmentation)."""
    reduce_bucket: int | None = None
    """ZeRO gradient bucket in elements; None reads ds_configs/zero{zero}.json."""
    image_size: int = 0
    """Input resolution S; 0 keeps the preset's (vit_b32: 224), like model.image_size."""
    workers: int = 8
    """Loader worker processes per rank (data.workers; vit_b32_laion.yaml: 8)."""
    shuffle_buffer: int = 1000
    """Samples in each stream's shuffle buffer (data.shuffle_buffer; vit_b32_laion.yaml: 1000)."""
    streams: int = 512
    """Logical streams of the sample order (data.streams; vit_b32_laion.yaml: 512); each rank
    hosts streams/gpus of them, each with its own shuffle buffer."""
    sample_bytes: int = SAMPLE_BYTES
    """Assumed mean undecoded sample in a shuffle buffer (40 KiB: LAION at 256 px)."""
    gpus_per_node: int = 8
    """Ranks per node, for the host memory per node."""
    lock_image: bool = False
    """The vision tower and its projection frozen (model.lock_image, no unlocked groups): no
    gradients, optimizer state or saved activations for them."""
    lock_text: bool = False
    """The text tower and its projection frozen (model.lock_text, no unlocked layers)."""


@dataclass(frozen=True)
class ModelShape:
    params: int
    """Exact parameter count (the preset built on the meta device)."""
    persistent_params: int
    """Parameters below ZeRO-3's persistence threshold: never sharded."""
    towers: tuple[TowerShape, ...]
    embed_dim: int
    image_size: int
    """Input resolution S of the vision tower."""
    image_tower_params: int = 0
    """Parameters of vision_model + visual_projection (what model.lock_image freezes)."""
    text_tower_params: int = 0
    """Parameters of text_model + text_projection (what model.lock_text freezes)."""


@dataclass(frozen=True)
class Breakdown:
    """Per-rank bytes by component."""

    parameters: int
    gradients: int
    optimizer: int
    buffers: int
    activations: int
    loss: int
    live_during_loss: int
    """Activation bytes still live while the loss runs: all of them in a plain step; with
    gradient caching only the inputs and cached features (the loss runs between the
    graph-free encode and the re-encode, and its graph is freed before the re-encode)."""

    @property
    def states(self) -> int:
        """What lives between steps: weights, optimizer state and (ZeRO-3) buckets."""
        return self.parameters + self.optimizer

    @property
    def total(self) -> int:
        model = self.parameters + self.gradients + self.optimizer + self.buffers
        return model + max(self.activations, self.live_during_loss + self.loss)


def parse_memory(text: str) -> int:
    """'40GB', '40GiB', '80 G', '512MiB' -> bytes. GB means GiB: a '40GB' A100 has 40 GiB."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"--gpu-memory: cannot parse {text!r}; use e.g. 40GB, 80GiB, 24576MB")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


@functools.lru_cache(maxsize=8)
def model_shape(
    model: str, context_length: int, vocab_size: int, image_size: int = 0
) -> ModelShape:
    """Count the preset's parameters exactly by building it on the meta device (no memory);
    `image_size` 0 keeps the preset's resolution."""
    import torch

    from trainer.model import ModelConfig, TokenIds, TrainableCLIP, build_clip_config

    tokens = TokenIds(vocab_size=vocab_size, bos=vocab_size - 2, eos=vocab_size - 1, pad=0)
    model_cfg = ModelConfig(preset=model, image_size=image_size)
    config = build_clip_config(model_cfg, tokens, context_length)
    with torch.device("meta"):
        clip = TrainableCLIP(config)
    threshold = _ds_zero_section(3).get("stage3_param_persistence_threshold", 100_000)
    sizes = [p.numel() for p in clip.parameters()]
    vision, text = config.vision_config, config.text_config
    return ModelShape(
        params=sum(sizes),
        persistent_params=sum(n for n in sizes if n < threshold),
        towers=(
            TowerShape.vision(
                vision.num_hidden_layers,
                vision.hidden_size,
                vision.intermediate_size,
                vision.num_attention_heads,
                vision.image_size,
                vision.patch_size,
            ),
            TowerShape.text(
                text.num_hidden_layers,
                text.hidden_size,
                text.intermediate_size,
                text.num_attention_heads,
                context_length,
            ),
        ),
        embed_dim=config.projection_dim,
        image_size=vision.image_size,
        image_tower_params=_count(clip.vision_model, clip.visual_projection),
        text_tower_params=_count(clip.text_model, clip.text_projection),
    )


def _count(*modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def _ds_zero_section(stage: int) -> dict:
    from trainer.engine import DeepSpeedConfig

    return DeepSpeedConfig(config=f"ds_configs/zero{stage}.json").load()["zero_optimization"]


def buffer_bytes(stage: int, precision: str, reduce_bucket: int | None) -> int:
    """ZeRO's contiguous gradient buckets (DeepSpeed allocates them whole, whatever P is)."""
    if stage == 0:
        return 0
    zero = _ds_zero_section(stage)
    if not zero.get("contiguous_gradients", True):
        return 0
    elements = int(zero.get("reduce_bucket_size", 5e8)) if reduce_bucket is None else reduce_bucket
    if stage == 1:  # ZeRO-1 stages the fp32 accumulator
        return elements * 4 * (2 if zero.get("overlap_comm", False) else 1)
    if stage == 2:  # low-precision staging, double-buffered with overlap_comm
        return elements * PRECISION_BYTES[precision] * (2 if zero.get("overlap_comm") else 1)
    return elements * PRECISION_BYTES[precision]


def trainable_params(shape: ModelShape, spec: PlanSpec) -> int:
    """Parameters that get gradients and optimizer state: all but the locked towers'."""
    frozen = shape.image_tower_params * spec.lock_image + shape.text_tower_params * spec.lock_text
    return shape.params - frozen


def state_bytes(shape: ModelShape, spec: PlanSpec) -> tuple[int, int, int]:
    """(parameters, gradients, optimizer) bytes per rank under ZeRO stage `spec.zero`.
    Frozen parameters (locked towers) count as weights only: trainer/engine.py leaves them out
    of the optimizer groups, so they have neither gradients nor optimizer state."""
    n, dtype = spec.gpus, PRECISION_BYTES[spec.precision]
    mixed = spec.precision != "fp32"
    if spec.zero >= 3:
        sharded = shape.params - shape.persistent_params
        parameters = dtype * (sharded // n + shape.persistent_params)
    else:
        parameters = dtype * shape.params
    p = trainable_params(shape, spec)
    gradients = dtype * p // (n if spec.zero >= 2 else 1)
    master = 4 * p if (mixed or spec.zero >= 1) else 0
    optimizer = (8 * p + master) // (n if spec.zero >= 1 else 1)
    return parameters, gradients, optimizer


def loss_bytes(loss: str, *, batch: int, gpus: int, embed_dim: int, feat_bytes: int, tile: int):
    """Peak bytes of the contrastive loss forward+backward on one rank, on NCCL (whose
    collectives allocate no tensors; gloo's copy their inputs, see tests/dist/test_loss_memory.py).

    Everything is fp32 (LOSS_DTYPE_BYTES): the losses cast 16-bit features up before the
    gather, and keep those two (b, d) copies for the backward. At each loss's peak:
    - naive: NAIVE_BLOCKS B×B blocks + the gathered features 2·B·d;
    - disco: the two saved b×B softmax − onehot blocks, the gathered features and their
      gradients 4·B·d, and the two (b, d) row gradients (in `_DiscoClip.backward`); or, when
      b is large beside d, the forward's two blocks + 2·B·d + one cross-entropy row chunk;
    - tiled: one gathered B×d at a time (each direction gathers its columns again in the
      backward), the (b, t) tile beside its (t, d) column buffer — or the (b, d) output of
      the reduce-scatter, whichever is larger —, the two row gradients and the two (b,)
      log-sum-exps. Checked against measurement by tests/dist/test_loss_memory.py.
    """
    b, d, f = batch // gpus, embed_dim, LOSS_DTYPE_BYTES
    casts = 2 * b * d * f if feat_bytes < f else 0  # fp32 copies of 16-bit features
    rows = ROW_BUFFERS * b * d * f + casts
    if loss == "naive":
        return NAIVE_BLOCKS * batch * batch * f + 2 * batch * d * f
    if loss == "disco":
        backward = DISCO_BLOCKS * b * batch + DISCO_FEATURE_BUFFERS * batch * d  # + rows
        # The forward: both blocks, the gathered features, and F.cross_entropy's log-softmax
        # of one row chunk (trainer/losses/disco.py: _CE_CHUNKS). Larger than the backward
        # only when ceil(b/8)·B > 2·B·d + 2·b·d, i.e. roughly b > 16·d.
        forward = DISCO_BLOCKS * b * batch + 2 * batch * d + -(-b // CE_CHUNKS) * batch
        return max(backward * f + rows, forward * f + casts)
    t = min(tile, batch)
    return (batch * d + max(b * t + t * d, b * d) + 2 * b) * f + rows


def _shape(spec: PlanSpec) -> ModelShape:
    return model_shape(spec.model, spec.context_length, spec.vocab_size, spec.image_size)


def plan(spec: PlanSpec) -> Breakdown:
    """The per-rank memory breakdown of `spec`."""
    shape = _shape(spec)
    parameters, gradients, optimizer = state_bytes(shape, spec)
    b = spec.batch // spec.gpus
    dtype = PRECISION_BYTES[spec.precision]
    live_rows = b // spec.grad_cache  # samples whose activations exist at once
    inputs = sum(input_bytes(t, b, dtype=dtype) for t in shape.towers)
    locked = (spec.lock_image, spec.lock_text)  # a frozen tower saves nothing for backward
    activations = inputs + sum(
        activation_bytes(t, live_rows, dtype=dtype, checkpointing=spec.checkpointing)
        for t, frozen in zip(shape.towers, locked, strict=True)
        if not frozen
    )
    live_during_loss = activations
    if spec.grad_cache > 1:  # cached features (b, d) ×2 and their fp32 gradients
        cache = 2 * b * shape.embed_dim * (dtype + 4)
        activations += cache
        live_during_loss = inputs + cache
    return Breakdown(
        parameters=parameters,
        gradients=gradients,
        optimizer=optimizer,
        buffers=buffer_bytes(spec.zero, spec.precision, spec.reduce_bucket),
        activations=activations,
        loss=loss_bytes(
            spec.loss,
            batch=spec.batch,
            gpus=spec.gpus,
            embed_dim=shape.embed_dim,
            feat_bytes=dtype,
            tile=spec.tile,
        ),
        live_during_loss=live_during_loss,
    )


def budget(spec: PlanSpec) -> int:
    return int(spec.gpu_memory * spec.usable_fraction)


def fits(spec: PlanSpec) -> bool:
    return plan(spec).total <= budget(spec)


def largest_batch(spec: PlanSpec) -> int:
    """Largest B (a multiple of N·K) whose plan fits; 0 if not even one step of N·K does.

    Memory grows with B, so: double until it does not fit, then bisect on B/(N·K).
    """
    step = spec.gpus * spec.grad_cache
    if not fits(replace(spec, batch=step)):
        return 0
    lo, hi = 1, 2
    while fits(replace(spec, batch=hi * step)):
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # invariant: lo fits, hi does not
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(replace(spec, batch=mid * step)) else (lo, mid)
    return lo * step
