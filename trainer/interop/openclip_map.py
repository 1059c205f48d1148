"""OpenCLIP <-> Hugging Face CLIP state dicts and configs: pure functions, no I/O, no OpenCLIP.

The key mapping, the fused in_proj split into q/k/v and back, the transposed projections, and
the activation (quick_gelu or gelu) made explicit; see trainer/interop/openclip.py for the
commands and the file formats."""

from __future__ import annotations

import torch

from trainer.interop.run_checkpoint import InteropError

OPENAI_VOCAB, OPENAI_BOS, OPENAI_EOS = 49408, 49406, 49407
OC_CONFIG, OC_WEIGHTS = "open_clip_config.json", "open_clip_model.safetensors"
_LN_EPS = 1e-5  # OpenCLIP's LayerNorm default, HF CLIP's layer_norm_eps default
_ACTS = {True: "quick_gelu", False: "gelu"}
_IGNORED = ("attn_mask", "position_ids")  # non-persistent buffers, rebuilt by constructors

# Vision/text config fields whose non-default values have no HF CLIPModel equivalent.
_VISION_DEFAULTS = {
    "ls_init_value": None, "attentional_pool": False, "no_ln_pre": False,
    "pos_embed_type": "learnable", "final_ln_after_pool": False, "pool_type": "tok",
    "norm_kwargs": None, "act_kwargs": None, "block_type": None, "qk_norm": False,
    "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False,
    "scale_attn": False, "scale_fc": False, "timm_model_name": None,
}  # fmt: skip
_TEXT_DEFAULTS = {
    "ls_init_value": None, "embed_cls": False, "no_causal_mask": False,
    "final_ln_after_pool": False, "proj_bias": False, "proj_type": "linear",
    "norm_kwargs": None, "act_kwargs": None, "block_type": None, "qk_norm": False,
    "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False,
    "scale_attn": False, "scale_fc": False, "hf_model_name": None, "hf_tokenizer_name": None,
}  # fmt: skip


# --------------------------------------------------------------------------- key mapping


def _block_pairs(oc: str, hf: str) -> list[tuple[str, str]]:
    """(OpenCLIP key, HF key) of one residual block, except the fused in_proj."""
    return [
        (f"{oc}ln_1.weight", f"{hf}layer_norm1.weight"),
        (f"{oc}ln_1.bias", f"{hf}layer_norm1.bias"),
        (f"{oc}attn.out_proj.weight", f"{hf}self_attn.out_proj.weight"),
        (f"{oc}attn.out_proj.bias", f"{hf}self_attn.out_proj.bias"),
        (f"{oc}ln_2.weight", f"{hf}layer_norm2.weight"),
        (f"{oc}ln_2.bias", f"{hf}layer_norm2.bias"),
        (f"{oc}mlp.c_fc.weight", f"{hf}mlp.fc1.weight"),
        (f"{oc}mlp.c_fc.bias", f"{hf}mlp.fc1.bias"),
        (f"{oc}mlp.c_proj.weight", f"{hf}mlp.fc2.weight"),
        (f"{oc}mlp.c_proj.bias", f"{hf}mlp.fc2.bias"),
    ]


def _plain_pairs() -> list[tuple[str, str]]:
    """(OpenCLIP key, HF key) copied as they are (projections and fused attention apart)."""
    v, t = "vision_model.", "text_model."
    return [
        ("visual.conv1.weight", f"{v}embeddings.patch_embedding.weight"),
        ("visual.class_embedding", f"{v}embeddings.class_embedding"),
        ("visual.positional_embedding", f"{v}embeddings.position_embedding.weight"),
        ("visual.ln_pre.weight", f"{v}pre_layrnorm.weight"),  # sic: HF's name
        ("visual.ln_pre.bias", f"{v}pre_layrnorm.bias"),
        ("visual.ln_post.weight", f"{v}post_layernorm.weight"),
        ("visual.ln_post.bias", f"{v}post_layernorm.bias"),
        ("token_embedding.weight", f"{t}embeddings.token_embedding.weight"),
        ("positional_embedding", f"{t}embeddings.position_embedding.weight"),
        ("ln_final.weight", f"{t}final_layer_norm.weight"),
        ("ln_final.bias", f"{t}final_layer_norm.bias"),
    ]


def _towers(n_vision: int, n_text: int) -> list[tuple[str, str]]:
    """(OpenCLIP block prefix, HF layer prefix) of every block of both towers."""
    return [
        (f"visual.transformer.resblocks.{i}.", f"vision_model.encoder.layers.{i}.")
        for i in range(n_vision)
    ] + [(f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}.") for i in range(n_text)]


_PROJECTIONS = (("visual.proj", "visual_projection.weight"), ("text_projection", "text_projection.weight"))  # fmt: skip


def _take(state: dict, key: str, where: str) -> torch.Tensor:
    if key not in state:
        raise InteropError(
            f"{where}: weight {key!r} is missing; is this a ViT CLIP of that config?"
        )
    return state.pop(key)


def _leftover(state: dict, where: str) -> None:
    rest = sorted(k for k in state if not k.endswith(_IGNORED))
    if rest:
        more = ", ..." if len(rest) > 5 else ""
        raise InteropError(f"{where}: {len(rest)} weights have no counterpart "
                           f"({', '.join(rest[:5])}{more}); is the config the checkpoint's?")  # fmt: skip


def _check_shapes(config, hf_state: dict[str, torch.Tensor]) -> None:
    """Every HF weight present with the shape CLIPModel(config) expects (built on meta)."""
    from transformers import CLIPModel

    with torch.device("meta"):
        expected = {k: v.shape for k, v in CLIPModel(config).state_dict().items()}
    for key, shape in expected.items():
        if key.endswith(_IGNORED):
            continue
        if key not in hf_state:
            raise InteropError(f"converted weights lack {key!r}; the config does not match")
        if hf_state[key].shape != shape:
            raise InteropError(f"weight {key!r} has shape {tuple(hf_state[key].shape)}, the "
                               f"config implies {tuple(shape)}: is the config the checkpoint's?")  # fmt: skip


# --------------------------------------------------------------------------- OpenCLIP -> HF


def _model_cfg(oc_config: dict) -> dict:
    """A model config from open_clip/model_configs/*.json or an open_clip_config.json."""
    cfg = oc_config.get("model_cfg", oc_config)
    if not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise InteropError("--config: not an OpenCLIP model config (needs embed_dim, "
                           "vision_cfg and text_cfg, or model_cfg holding them)")  # fmt: skip
    return cfg


def _check_supported(cfg: dict) -> None:
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    if isinstance(vision.get("layers", 12), (list, tuple)):
        raise InteropError("--config: ModifiedResNet towers (RN50...) have no HF CLIPModel form")
    if "multimodal_cfg" in cfg:
        raise InteropError("--config: CoCa models have no HF CLIPModel form")
    for tower, given, defaults in (("vision_cfg", vision, _VISION_DEFAULTS),
                                   ("text_cfg", text, _TEXT_DEFAULTS)):  # fmt: skip
        for key, default in defaults.items():
            if given.get(key, default) != default:
                raise InteropError(f"--config: {tower}.{key}={given[key]!r} has no HF CLIPModel "
                                   f"equivalent (only {default!r} converts)")  # fmt: skip
    if text.get("pool_type", "argmax") not in ("argmax", "eos"):
        raise InteropError(f"--config: text_cfg.pool_type={text['pool_type']!r} has no HF "
                           "CLIPModel equivalent (argmax or eos convert)")  # fmt: skip


def _mlp_width(width: int, ratio: float) -> int:
    return int(width * ratio)  # as OpenCLIP's ResidualAttentionBlock


def openclip_to_hf(state_dict: dict[str, torch.Tensor], oc_config: dict, *,
                   force_quick_gelu: bool = False):  # fmt: skip
    """(transformers.CLIPConfig, HF CLIPModel state dict) of an OpenCLIP ViT CLIP.

    `oc_config`: a model config ({embed_dim, vision_cfg, text_cfg, quick_gelu?}) or an
    open_clip_config.json ({model_cfg, preprocess_cfg}). The activation is `quick_gelu`'s
    (absent = false = gelu), or quick_gelu with force_quick_gelu.
    """
    from transformers import CLIPConfig

    cfg = _model_cfg(oc_config)
    _check_supported(cfg)
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    quick_gelu = bool(cfg.get("quick_gelu", False)) or force_quick_gelu
    act = _ACTS[quick_gelu]
    v_width, t_width = int(vision.get("width", 768)), int(text.get("width", 512))
    v_layers, t_layers = int(vision.get("layers", 12)), int(text.get("layers", 12))
    head_width = int(vision.get("head_width", 64))
    vocab = int(text.get("vocab_size", OPENAI_VOCAB))
    eos = vocab - 1  # argmax == the first eos when eos is the largest id (module doc)
    if text.get("pool_type", "argmax") == "eos":
        eos = int(text.get("eos_id", 2))
    if eos == 2:
        raise InteropError("--config: eos_id 2 means argmax pooling to HF CLIP; cannot convert")
    bos = OPENAI_BOS if vocab == OPENAI_VOCAB else 0
    embed = int(cfg["embed_dim"])
    config = CLIPConfig(
        vision_config=dict(
            image_size=int(vision.get("image_size", 224)), patch_size=int(vision.get("patch_size", 16)),
            hidden_size=v_width, intermediate_size=_mlp_width(v_width, vision.get("mlp_ratio", 4.0)),
            num_hidden_layers=v_layers, num_attention_heads=v_width // head_width,
            hidden_act=act, layer_norm_eps=_LN_EPS, projection_dim=embed,
        ),
        text_config=dict(
            vocab_size=vocab, max_position_embeddings=int(text.get("context_length", 77)),
            hidden_size=t_width, intermediate_size=_mlp_width(t_width, text.get("mlp_ratio", 4.0)),
            num_hidden_layers=t_layers, num_attention_heads=int(text.get("heads", 8)),
            hidden_act=act, layer_norm_eps=_LN_EPS, projection_dim=embed,
            bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
        ),
        projection_dim=embed,
    )  # fmt: skip

    where = "--checkpoint"
    state = {k: v for k, v in state_dict.items() if not k.endswith(_IGNORED)}
    if any(k.startswith("text.") for k in state):  # CustomTextCLIP's layout (custom_text: true)
        state = {k.removeprefix("text."): v for k, v in state.items()}
    hf: dict[str, torch.Tensor] = {}
    for oc_key, hf_key in _plain_pairs():
        hf[hf_key] = _take(state, oc_key, where)
    for oc, h in _towers(v_layers, t_layers):
        for oc_key, hf_key in _block_pairs(oc, h):
            hf[hf_key] = _take(state, oc_key, where)
        for kind in ("weight", "bias"):
            q, k, v = _take(state, f"{oc}attn.in_proj_{kind}", where).chunk(3, dim=0)
            hf[f"{h}self_attn.q_proj.{kind}"] = q
            hf[f"{h}self_attn.k_proj.{kind}"] = k
            hf[f"{h}self_attn.v_proj.{kind}"] = v
    for oc_key, hf_key in _PROJECTIONS:
        hf[hf_key] = _take(state, oc_key, where).t()
    scale = _take(state, "logit_scale", where).reshape(())
    hf["logit_scale"] = scale
    config.logit_scale_init_value = float(scale)
    bias = state.pop("logit_bias", None)
    if bias is not None:  # SigLIP-trained: as trainer/interop/hf_export.py stores it
        config.logit_bias = float(bias.reshape(()))
        config.disco_clip_loss = "siglip"
    _leftover(state, where)
    hf = {k: v.detach().float().contiguous() for k, v in hf.items()}
    _check_shapes(config, hf)
    return config, hf


# --------------------------------------------------------------------------- HF -> OpenCLIP


def hf_to_openclip(clip_model_or_state, hf_config):
    """(OpenCLIP model config, OpenCLIP CLIP state dict) of an HF CLIPModel (or its state dict,
    e.g. TrainableCLIP's: 0-dim logit_scale; a logit_bias key or config.logit_bias becomes
    OpenCLIP's logit_bias)."""
    if isinstance(clip_model_or_state, torch.nn.Module):
        state = dict(clip_model_or_state.state_dict())
    else:
        state = dict(clip_model_or_state)
    state = {k: v for k, v in state.items() if not k.endswith(_IGNORED)}
    vc, tc = hf_config.vision_config, hf_config.text_config
    acts = {vc.hidden_act, tc.hidden_act}
    if len(acts) != 1 or not acts <= set(_ACTS.values()):
        raise InteropError(f"hidden_act vision={vc.hidden_act!r}, text={tc.hidden_act!r}: OpenCLIP "
                           "needs one of quick_gelu / gelu for both towers")  # fmt: skip
    for tower in (vc, tc):
        if abs(tower.layer_norm_eps - _LN_EPS) > 1e-12:
            raise InteropError(f"layer_norm_eps={tower.layer_norm_eps}: OpenCLIP's is {_LN_EPS}")
        if tower.hidden_size % tower.num_attention_heads:
            raise InteropError("hidden_size is not a multiple of num_attention_heads")
    if vc.num_channels != 3:
        raise InteropError(f"num_channels={vc.num_channels}: OpenCLIP's ViT takes RGB (3)")
    vision = dict(
        image_size=vc.image_size, layers=vc.num_hidden_layers, width=vc.hidden_size,
        head_width=vc.hidden_size // vc.num_attention_heads,
        mlp_ratio=vc.intermediate_size / vc.hidden_size, patch_size=vc.patch_size,
    )  # fmt: skip
    text = dict(
        context_length=tc.max_position_embeddings, vocab_size=tc.vocab_size,
        width=tc.hidden_size, heads=tc.num_attention_heads, layers=tc.num_hidden_layers,
        mlp_ratio=tc.intermediate_size / tc.hidden_size,
    )  # fmt: skip
    for cfg, width, inter in ((vision, vc.hidden_size, vc.intermediate_size),
                              (text, tc.hidden_size, tc.intermediate_size)):  # fmt: skip
        if cfg["mlp_ratio"] == int(cfg["mlp_ratio"]):
            cfg["mlp_ratio"] = int(cfg["mlp_ratio"])
        if _mlp_width(width, cfg["mlp_ratio"]) != inter:
            raise InteropError(f"intermediate_size {inter} is not int(width * ratio) for OpenCLIP")
    eos = tc.eos_token_id
    if eos not in (2, tc.vocab_size - 1):  # HF: 2 = argmax; the last id = argmax too
        text.update(pool_type="eos", eos_id=int(eos))
    oc_cfg: dict = {"embed_dim": hf_config.projection_dim,
                    "quick_gelu": vc.hidden_act == "quick_gelu",
                    "vision_cfg": vision, "text_cfg": text}  # fmt: skip

    where = "HF weights"
    oc: dict[str, torch.Tensor] = {}
    for oc_key, hf_key in _plain_pairs():
        oc[oc_key] = _take(state, hf_key, where)
    for o, h in _towers(vc.num_hidden_layers, tc.num_hidden_layers):
        for oc_key, hf_key in _block_pairs(o, h):
            oc[oc_key] = _take(state, hf_key, where)
        for kind in ("weight", "bias"):
            parts = [_take(state, f"{h}self_attn.{p}_proj.{kind}", where) for p in "qkv"]
            oc[f"{o}attn.in_proj_{kind}"] = torch.cat(parts, dim=0)
    for oc_key, hf_key in _PROJECTIONS:
        oc[oc_key] = _take(state, hf_key, where).t()
    oc["logit_scale"] = _take(state, "logit_scale", where).reshape(())
    bias = state.pop("logit_bias", None)
    if bias is None and getattr(hf_config, "logit_bias", None) is not None:
        bias = torch.tensor(float(hf_config.logit_bias))
    if bias is not None:
        oc["logit_bias"] = bias.reshape(())
        oc_cfg["init_logit_bias"] = float(oc["logit_bias"])
    _leftover(state, where)
    return oc_cfg, {k: v.detach().float().contiguous() for k, v in oc.items()}
