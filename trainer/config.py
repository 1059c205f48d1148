"""The run config: the component configs composed into one root, loaded and validated.

Each component owns its dataclass next to its code; this module only composes them and adds
the few knobs that belong to the run as a whole (`run.*`, `train.*`).
Loading order: dataclass defaults ← YAML file ← dotted overrides (`optim.lr=1e-3`).
"""

from __future__ import annotations

import filecmp
import json
from dataclasses import dataclass, field
from pathlib import Path

from data.config import DataConfig
from data.paths import BUILTIN_TOKENIZER_DIR
from trainer.checkpoint import CheckpointConfig
from trainer.config_io import (
    ConfigError,
    apply_overrides,
    build_dataclass,
    read_yaml,
    validate_tree,
)
from trainer.dist import DistConfig
from trainer.engine import PRECISIONS, DeepSpeedConfig, OptimConfig, ScheduleConfig
from trainer.eval.evaluate import EvalConfig
from trainer.losses.registry import LossConfig
from trainer.metrics import LogConfig
from trainer.model import PRESETS, ModelConfig


@dataclass
class RunConfig:
    dir: str = "runs/default"
    """Run directory: resolved config, metrics.jsonl, TensorBoard, checkpoints/, plots."""
    seed: int = 0
    """Seeds model init, data order and augmentation, dropout."""


@dataclass
class TrainConfig:
    steps: int = 100
    """Optimizer steps to train for."""
    global_batch_size: int = 64
    """The contrastive batch B (all ranks together); each rank gets B / world_size."""
    precision: str = "fp32"
    """fp32, bf16 or fp16 (DeepSpeed mixed precision; the loss reduces in fp32)."""
    grad_cache_chunks: int = 1
    """Encode each rank's b pairs in this many chunks with gradient caching: activation
    memory of b/K samples, contrastive batch still B (1 = off)."""
    nonfinite: str = "skip"
    """On a non-finite loss: "skip" the step (counted in metrics) or "stop" the run."""
    inject_nan_at_step: int = 0
    """Debug/test knob: make the loss NaN at this step to exercise `nonfinite` (0 = never)."""

    def validate(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {self.global_batch_size}")
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
            )
        if self.grad_cache_chunks < 1:
            raise ValueError(f"grad_cache_chunks must be >= 1, got {self.grad_cache_chunks}")
        if self.inject_nan_at_step < 0:
            raise ValueError(f"inject_nan_at_step must be >= 0, got {self.inject_nan_at_step}")
        if self.nonfinite not in ("skip", "stop"):
            raise ValueError(f"nonfinite must be skip or stop, got {self.nonfinite!r}")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def validate_for(self, world_size: int) -> None:
        """Checks that need the world size, after every section validated itself."""
        b = self.train.global_batch_size
        if b % world_size:
            raise ConfigError(
                f"train.global_batch_size: {b} is not divisible by the world size "
                f"{world_size}; DisCo needs the same b on every rank"
            )
        if (b // world_size) % self.train.grad_cache_chunks:
            raise ConfigError(
                f"train.grad_cache_chunks: {self.train.grad_cache_chunks} does not divide the "
                f"per-rank batch {b // world_size}"
            )
        streams = self.data.streams
        if b % streams or streams % world_size:
            raise ConfigError(
                f"data.streams: {streams} logical streams must divide train.global_batch_size "
                f"{b} and be a multiple of the world size {world_size} (each rank hosts "
                f"streams/world_size of them); e.g. data.streams={_streams_hint(b, world_size)}"
            )
        self._check_model_fits_data()

    def _check_model_fits_data(self) -> None:
        """The model against the data section: tokenizer, context length, image size."""
        model, data = self.model, self.data
        vocab = _tokenizer_vocab_size(data.tokenizer)
        if model.pretrained_dir:
            hf = json.loads((Path(model.pretrained_dir) / "config.json").read_text())
            text, vision = hf.get("text_config", {}), hf.get("vision_config", {})
            model_image = vision.get("image_size", 224)
            model_vocab = text.get("vocab_size", 49408)
            positions = text.get("max_position_embeddings", 77)
            if vocab is not None and vocab > model_vocab:
                raise ConfigError(
                    f"data.tokenizer: {vocab} tokens do not fit the vocabulary of "
                    f"model.pretrained_dir ({model_vocab} embeddings); use its tokenizer"
                )
            if data.context_length > positions:
                raise ConfigError(
                    f"data.context_length: {data.context_length} is more than the "
                    f"{positions} positions of model.pretrained_dir; use <= {positions}"
                )
        else:
            model_image = PRESETS[model.preset]["vision_config"]["image_size"]
        model_image = model.image_size or model_image
        if data.image_size != model_image:
            raise ConfigError(
                f"data.image_size: {data.image_size} is not the model's image size "
                f"{model_image}; set data.image_size={model_image} (or model.image_size)"
            )
        big = model.pretrained_dir or model.preset not in TOY_PRESETS
        if big and not data.allow_toy_tokenizer and _is_toy_tokenizer(data.tokenizer):
            name = model.pretrained_dir or model.preset
            raise ConfigError(
                f"data.tokenizer: {data.tokenizer} is the toy {vocab}-token tokenizer, made "
                f"for the tiny/demo models, not for {name}; run 'disco-clip make-tokenizer "
                f"--out DIR' and set data.tokenizer=DIR (or data.allow_toy_tokenizer=true)"
            )


TOY_PRESETS = ("tiny", "demo")


def _is_toy_tokenizer(path: str) -> bool:
    """The shipped toy tokenizer, or a copy of it (make-synthetic copies it into DIR/tokenizer)."""
    mine, toy = Path(path) / "tokenizer.json", BUILTIN_TOKENIZER_DIR / "tokenizer.json"
    return mine.is_file() and filecmp.cmp(mine, toy, shallow=False)


def _tokenizer_vocab_size(path: str) -> int | None:
    """Tokens of a tokenizer directory (tokenizer.json or vocab.json), without transformers."""
    directory = Path(path)
    try:
        if (directory / "tokenizer.json").is_file():
            tree = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
            ids = list(tree["model"]["vocab"].values())
            ids += [t["id"] for t in tree.get("added_tokens", [])]
        else:
            ids = list(json.loads((directory / "vocab.json").read_text(encoding="utf-8")).values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # load_tokenizer names the problem when the run starts
    return max(ids) + 1 if ids else None


def _streams_hint(batch: int, world_size: int) -> int:
    """The smallest multiple of the world size that divides the batch (the batch itself
    always does, since the world size divides it)."""
    return next(s for s in range(world_size, batch + 1, world_size) if batch % s == 0)


def load_config(path: str | Path | None, overrides: list[str], world_size: int) -> Config:
    """Defaults ← YAML ← overrides, then type checks and every section's validate()."""
    tree = read_yaml(path) if path else {}
    cfg = build_dataclass(Config, apply_overrides(tree, overrides))
    validate_tree(cfg)
    cfg.validate_for(world_size)
    return cfg
