"""The HF CLIPModel we train: built from a preset or a local HF directory, encoded tower by tower.

`TrainableCLIP` is a CLIPModel (same modules, same state-dict keys, `save_pretrained` works)
whose forward returns normalised features and `logit_scale` instead of building the local
B×B logit matrix that `CLIPModel.forward` makes. Two training-only differences:
- `logit_scale` is a shape-[1] parameter, because DeepSpeed 0.19.8 crashes on 0-dim
  parameters at every ZeRO stage. State-dict hooks squeeze it to HF's 0-dim shape on save and
  unsqueeze on load, so checkpoints and exports stay HF-compatible.
- with the SigLIP loss it also owns a shape-[1] `logit_bias` (see trainer/interop/hf_export.py for how it
  leaves the model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPConfig, CLIPModel

# Shape-[1] in training, 0-dim in every saved state dict.
SCALAR_PARAMS = ("logit_scale", "logit_bias")

PRESETS: dict[str, dict] = {
    # The demo / test model: learns the built-in dataset in minutes on 2 CPU cores.
    "tiny": {
        "vision_config": dict(
            image_size=32,
            patch_size=8,
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
        ),
        "text_config": dict(
            hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4
        ),
        "projection_dim": 64,
    },
}


def _openclip_vit(
    embed: int, image: int, patch: int, v_width: int, v_layers: int, v_heads: int,
    t_width: int, t_layers: int, t_heads: int, act: str,
) -> dict:  # fmt: skip
    """An OpenCLIP ViT config (open_clip/model_configs/*.json) as HF CLIPConfig fields: MLP ratio
    4, context 77 and vocab 49408 (build_clip_config sets both from data.context_length and the
    tokenizer), `act` quick_gelu (OpenAI's weights, OpenCLIP's *-quickgelu) or gelu."""
    return {
        "vision_config": dict(
            image_size=image,
            patch_size=patch,
            hidden_size=v_width,
            intermediate_size=4 * v_width,
            num_hidden_layers=v_layers,
            num_attention_heads=v_heads,
            hidden_act=act,
        ),
        "text_config": dict(
            hidden_size=t_width,
            intermediate_size=4 * t_width,
            num_hidden_layers=t_layers,
            num_attention_heads=t_heads,
            max_position_embeddings=77,
            vocab_size=49408,
            hidden_act=act,
        ),
        "projection_dim": embed,
    }


# OpenCLIP's ViT family. Unsuffixed B/L presets are OpenAI's models (quick_gelu, as HF's
# openai/clip-vit-* and OpenCLIP's ViT-*-quickgelu); `_gelu` = OpenCLIP's plain ViT-* configs
# (e.g. the LAION-2B B/32 and L/14). ViT-H-14 exists only in OpenCLIP: gelu, with head width 80.
_VITS = {
    # name: embed, image, patch, vision width/layers/heads, text width/layers/heads
    "vit_b32": (512, 224, 32, 768, 12, 12, 512, 12, 8),  # the paper's model
    "vit_b16": (512, 224, 16, 768, 12, 12, 512, 12, 8),
    "vit_l14": (768, 224, 14, 1024, 24, 16, 768, 12, 12),
    "vit_l14_336": (768, 336, 14, 1024, 24, 16, 768, 12, 12),
}
for _name, _shape in _VITS.items():
    PRESETS[_name] = _openclip_vit(*_shape, act="quick_gelu")
    PRESETS[_name + "_gelu"] = _openclip_vit(*_shape, act="gelu")
PRESETS["vit_h14"] = _openclip_vit(1024, 224, 14, 1280, 32, 16, 1024, 24, 16, act="gelu")
PRESETS["vit_h14_quickgelu"] = _openclip_vit(
    1024, 224, 14, 1280, 32, 16, 1024, 24, 16, act="quick_gelu"
)


# The demo model: "tiny" with 4-px patches (64 tokens at 32 px) and narrower MLPs. 8-px patches
# left the shapes within a colour confused for hundreds of steps; 4-px ones reach 80% zero-shot
# on the built-in dataset in about 400 steps at batch 128 (bench/learnability.py --patch 4).
PRESETS["demo"] = {
    "vision_config": dict(PRESETS["tiny"]["vision_config"], patch_size=4, intermediate_size=128),
    "text_config": dict(PRESETS["tiny"]["text_config"], intermediate_size=128),
    "projection_dim": 64,
}


@dataclass
class ModelConfig:
    preset: str = "tiny"
    """Architecture preset: one of PRESETS (tiny, demo, vit_b32, vit_b16, vit_l14, vit_l14_336,
    vit_h14; `_gelu`/`_quickgelu` variants). Ignored with pretrained_dir."""
    pretrained_dir: str = ""
    """A local Hugging Face CLIP directory (config.json + model.safetensors) to start from."""
    image_size: int = 0
    """Input resolution; 0 keeps the preset's."""
    attention_dropout: float = 0.0
    """Dropout inside both towers' attention (CLIP's only dropout)."""
    logit_scale_init: float = math.log(1 / 0.07)
    """Initial log of the contrastive temperature's inverse (CLIP: ln(1/0.07))."""
    logit_bias_init: float = -10.0
    """Initial SigLIP bias (only used with loss.name=siglip)."""
    gradient_checkpointing: bool = False
    """Recompute tower activations in backward (HF gradient checkpointing)."""
    lock_image: bool = False
    """Freeze the vision tower and its projection (LiT); see lock_image_unlocked_groups."""
    lock_image_unlocked_groups: int = 0
    """With lock_image: keep the last k vision encoder layers trainable, and with k >= 1 also
    post_layernorm and visual_projection (0: the whole tower is frozen)."""
    lock_text: bool = False
    """Freeze the text tower and its projection; see lock_text_unlocked_layers."""
    lock_text_unlocked_layers: int = 0
    """With lock_text: keep the last k text encoder layers trainable, and with k >= 1 also
    final_layer_norm and text_projection (0: the whole tower is frozen)."""
    patch_dropout: float = 0.0
    """FLIP: share of image patch tokens dropped in training (class token kept); never in
    eval or export."""
    compile: bool = False
    """torch.compile the vision and text towers (in place: state-dict keys unchanged)."""
    compile_backend: str = "inductor"
    """torch.compile backend with model.compile (inductor; aot_eager compiles faster)."""

    def validate(self) -> None:
        if not self.pretrained_dir and self.preset not in PRESETS:
            raise ValueError(f"preset: unknown {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if self.pretrained_dir and not (Path(self.pretrained_dir) / "config.json").is_file():
            raise ValueError(
                f"pretrained_dir: {self.pretrained_dir} has no config.json; "
                "point it at a Hugging Face CLIP directory"
            )
        if self.image_size < 0:
            raise ValueError(f"image_size must be >= 0 (0 = preset's), got {self.image_size}")
        if not 0.0 <= self.attention_dropout < 1.0:
            raise ValueError(f"attention_dropout must be in [0, 1), got {self.attention_dropout}")
        if not 0.0 <= self.patch_dropout < 1.0:
            raise ValueError(f"patch_dropout must be in [0, 1), got {self.patch_dropout}")
        for name in ("lock_image_unlocked_groups", "lock_text_unlocked_layers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class TokenIds:
    vocab_size: int
    bos: int
    eos: int
    pad: int


def build_clip_config(cfg: ModelConfig, tokens: TokenIds, context_length: int) -> CLIPConfig:
    """The CLIPConfig for `cfg`, with the tokenizer's special ids wired in.

    The text tower pools at the first eos token; a wrong eos_token_id silently pools at the
    wrong position (CPU_NOTES: the default 2 means "argmax id").
    """
    if cfg.pretrained_dir:
        config = CLIPConfig.from_pretrained(cfg.pretrained_dir)
    else:
        preset = PRESETS[cfg.preset]
        config = CLIPConfig(
            text_config=dict(preset["text_config"], projection_dim=preset["projection_dim"]),
            vision_config=dict(preset["vision_config"], projection_dim=preset["projection_dim"]),
            projection_dim=preset["projection_dim"],
        )
        config.text_config.max_position_embeddings = context_length
        config.text_config.vocab_size = tokens.vocab_size
    config.logit_scale_init_value = cfg.logit_scale_init
    text = config.text_config
    text.bos_token_id, text.eos_token_id, text.pad_token_id = tokens.bos, tokens.eos, tokens.pad
    if cfg.image_size:
        config.vision_config.image_size = cfg.image_size
    config.text_config.attention_dropout = cfg.attention_dropout
    config.vision_config.attention_dropout = cfg.attention_dropout
    return config


def _squeeze_scalars(module, state_dict, prefix, local_metadata) -> None:
    for name in SCALAR_PARAMS:
        key = prefix + name
        # numel check: under ZeRO-3 the module's own state dict holds empty placeholders
        # (DeepSpeed saves the real values in its partition files); leave those alone.
        if key in state_dict and state_dict[key].dim() == 1 and state_dict[key].numel() == 1:
            state_dict[key] = state_dict[key].reshape(())


def _unsqueeze_scalars(module, state_dict, prefix, *args) -> None:
    for name in SCALAR_PARAMS:
        key = prefix + name
        if key in state_dict and state_dict[key].dim() == 0:
            state_dict[key] = state_dict[key].reshape(1)


class TrainableCLIP(CLIPModel):
    """CLIPModel whose forward returns (image_features, text_features, logit_scale)."""

    def __init__(
        self,
        config: CLIPConfig,
        *,
        with_bias: bool = False,
        bias_init: float = -10.0,
        patch_dropout: float = 0.0,
    ):
        super().__init__(config)
        self.patch_dropout = patch_dropout  # a float, not a module: exports carry no trace of it
        self.logit_scale = nn.Parameter(torch.full((1,), float(config.logit_scale_init_value)))
        self.logit_bias = nn.Parameter(torch.full((1,), bias_init)) if with_bias else None
        self.register_state_dict_post_hook(_squeeze_scalars)
        self.register_load_state_dict_pre_hook(_unsqueeze_scalars)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.training and self.patch_dropout > 0:
            pooled = self._pooled_with_patch_dropout(pixel_values)
        else:
            pooled = self.vision_model(pixel_values=pixel_values).pooler_output  # (b, hidden)
        return F.normalize(self.visual_projection(pooled), dim=-1)  # (b, d)

    def _pooled_with_patch_dropout(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """CLIPVisionModel.forward's steps, with a random subset of the patch tokens kept after
        the embeddings (FLIP): the same count for every image, the class token always. Draws
        from the global RNG, so gradient caching's RNG restore replays the masks."""
        vision = self.vision_model
        hidden = vision.embeddings(pixel_values)  # (b, 1 + n, h)
        b, tokens, width = hidden.shape
        n = tokens - 1
        keep = n - round(n * self.patch_dropout)
        scores = torch.rand(b, n, device=hidden.device)
        kept = scores.argsort(dim=1)[:, :keep].sort(dim=1).values + 1  # (b, keep) token index
        patches = hidden.gather(1, kept.unsqueeze(-1).expand(b, keep, width))
        hidden = torch.cat([hidden[:, :1], patches], dim=1)  # (b, 1 + keep, h)
        hidden = vision.pre_layrnorm(hidden)
        last = vision.encoder(inputs_embeds=hidden).last_hidden_state
        return vision.post_layernorm(last[:, 0, :])

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pooled = self.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return F.normalize(self.text_projection(pooled), dim=-1)  # (b, d)

    def forward(self, pixel_values, input_ids, attention_mask):  # type: ignore[override]
        # logit_scale/logit_bias are returned from this (root) forward on purpose: under ZeRO-3
        # a module's own parameters are gathered only while its forward runs.
        return (
            self.encode_image(pixel_values),
            self.encode_text(input_ids, attention_mask),
            self.logit_scale,
            self.logit_bias,
        )


def build_model(
    cfg: ModelConfig,
    config: CLIPConfig,
    *,
    with_bias: bool,
    zero3: bool,
    initial_state: dict[str, torch.Tensor] | None = None,
) -> TrainableCLIP:
    """Construct the model (partitioned at construction under ZeRO-3), then load weights:
    `model.pretrained_dir`'s, else `initial_state` (ZeRO-3 only: see trainer/build.py).

    Under ZeRO-3 the caller must hold a live `HfDeepSpeedConfig` so that transformers
    constructs inside `deepspeed.zero.Init`.
    """
    model = TrainableCLIP._from_config(
        config, with_bias=with_bias, bias_init=cfg.logit_bias_init, patch_dropout=cfg.patch_dropout
    )
    if cfg.pretrained_dir:
        load_hf_weights(model, Path(cfg.pretrained_dir), zero3=zero3)
    elif initial_state is not None:
        _load_partitioned(model, initial_state)
    if cfg.gradient_checkpointing:
        # ZeRO-3 replays a recorded order of parameter fetches every step; torch's non-reentrant
        # checkpoint recomputes lazily and in another order from step 2 on, which DeepSpeed
        # 0.19.8 refuses ("tracing error ... expected logit_scale"). The reentrant form
        # recomputes each layer as one unit and keeps the order (its RNG is preserved too).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": zero3})
    for tower in lock_towers(model, cfg):
        _checkpoint_only_trainable_layers(model, tower, reentrant=zero3)
    if cfg.compile:
        compile_towers(model, backend=cfg.compile_backend)
    return model


def lock_towers(model: TrainableCLIP, cfg: ModelConfig) -> list[nn.ModuleList]:
    """LiT: freeze the towers that cfg locks (requires_grad=False, so that parameter_groups
    leaves them out of the optimizer at every ZeRO stage), except the last k encoder layers
    and, with k >= 1, the final layer norm and projection. logit_scale/logit_bias stay
    trainable. Returns the encoder layer lists of the locked towers."""
    towers = []
    for locked, k, tower, norm, projection in (
        (cfg.lock_image, cfg.lock_image_unlocked_groups, model.vision_model,
         model.vision_model.post_layernorm, model.visual_projection),
        (cfg.lock_text, cfg.lock_text_unlocked_layers, model.text_model,
         model.text_model.final_layer_norm, model.text_projection),
    ):  # fmt: skip
        if not locked:
            continue
        layers = tower.encoder.layers
        if k > len(layers):
            name = (
                "lock_image_unlocked_groups"
                if tower is model.vision_model
                else "lock_text_unlocked_layers"
            )
            raise ValueError(f"model.{name}: {k} > the tower's {len(layers)} encoder layers")
        for module in (tower, projection):
            module.requires_grad_(False)
        if k:
            for module in (*layers[len(layers) - k :], norm, projection):
                module.requires_grad_(True)
        towers.append(layers)
    return towers


def _checkpoint_only_trainable_layers(
    model: TrainableCLIP, layers: nn.ModuleList, *, reentrant: bool
) -> None:
    """Gradient checkpointing in a locked tower. HF's gradient_checkpointing_enable makes every
    tower's input embeddings require grad (enable_input_require_grads), which would run a
    backward through the frozen layers; that hook is removed for the locked tower, so its
    frozen layers get no gradient, save no activations and run plain. Reentrant
    checkpointing (ZeRO-3) gives a layer's weights no gradient when its input needs none, as
    at the first unlocked layer, so that layer runs plain too: its output then requires grad
    for the layers after it."""
    tower = next(m for m in (model.vision_model, model.text_model) if m.encoder.layers is layers)
    embeddings = tower.get_input_embeddings()
    for hook in getattr(model, "_require_grads_hooks", []):
        if hook.id in embeddings._forward_hooks:
            hook.remove()
    first_trainable = next(
        (i for i, layer in enumerate(layers) if any(p.requires_grad for p in layer.parameters())),
        len(layers),
    )
    # The embeddings of a locked tower are frozen, so the first trainable layer's input never
    # requires grad.
    plain = min(first_trainable + 1, len(layers)) if reentrant else first_trainable
    for layer in layers[:plain]:
        if getattr(layer, "gradient_checkpointing", False):
            layer.gradient_checkpointing = False


def compile_towers(model: TrainableCLIP, *, backend: str = "inductor") -> None:
    """torch.compile both towers in place (nn.Module.compile: parameter names, state dicts
    and DeepSpeed's hooks see the same modules). With patch dropout the training forward
    calls the vision tower's parts itself, so there the vision encoder is compiled instead."""
    vision = model.vision_model.encoder if model.patch_dropout > 0 else model.vision_model
    vision.compile(backend=backend)
    model.text_model.compile(backend=backend)


def load_hf_weights(model: TrainableCLIP, directory: Path, *, zero3: bool) -> None:
    """Load `model.safetensors` from an HF directory (our own reader: keeps the [1] shapes)."""
    from safetensors.torch import load_file

    path = directory / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pretrained_dir needs safetensors weights")
    state = load_file(str(path))
    check_keys(model, state, path)
    if not zero3:
        model.load_state_dict(state, strict=False)
        return
    _load_partitioned(model, state)


def check_keys(model: TrainableCLIP, state: dict[str, torch.Tensor], path: Path) -> None:
    """Missing or unexpected weights are an error (a checkpoint with other key names would
    otherwise train from scratch without a word); HF's position_ids buffers excepted, and
    logit_bias, which a SigLIP run adds (and HF CLIP checkpoints lack)."""
    expected = {k for k in model.state_dict() if not k.endswith("position_ids")}
    given = {k for k in state if not k.endswith("position_ids")}
    missing = sorted(expected - given - {"logit_bias"})
    unexpected = sorted(given - expected)
    if missing or unexpected:
        parts = [
            f"{len(keys)} {what} ({', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''})"
            for what, keys in (("missing", missing), ("unexpected", unexpected))
            if keys
        ]
        raise ValueError(
            f"model.pretrained_dir: {path} does not match the model: {'; '.join(parts)} "
            "weight names; convert it to HF CLIPModel names"
        )


def _load_partitioned(model: TrainableCLIP, state: dict[str, torch.Tensor]) -> None:
    """Load a full state dict into a ZeRO-3 model: gather, let rank 0 write, re-partition."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
        if torch.distributed.get_rank() == 0:
            model.load_state_dict(state, strict=False)
