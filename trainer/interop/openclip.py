"""OpenCLIP <-> Hugging Face CLIP: `disco-clip convert --from openclip` and `export_openclip`.

`openclip_to_hf` / `hf_to_openclip` are pure key mappings (no OpenCLIP import): OpenCLIP's
ViT CLIP (open_clip.model.CLIP with a VisionTransformer / TextTransformer, the layout of every
open_clip/model_configs/ViT-*.json) against HF's CLIPModel. The fused attention `in_proj`
splits into q/k/v (and back); `visual.proj` / `text_projection` are the transposed
`visual_projection` / `text_projection` Linear weights.

Activation: OpenCLIP has one `quick_gelu` flag for both towers (default false: nn.GELU, erf);
HF's `hidden_act` is "quick_gelu" or "gelu" per tower. OpenAI's weights (and OpenCLIP's
*-quickgelu configs) need quick_gelu, the LAION/DataComp ViT-* ones gelu; the wrong one runs
without a word and changes every output, so the flag is read explicitly, printed by the CLI,
and `--force-quick-gelu` mirrors OpenCLIP's `force_quick_gelu` for checkpoints trained with it.

Text pooling: OpenCLIP's `argmax` pool takes the position of the largest token id (eos =
49407, the vocabulary's last id, for OpenAI's BPE); HF pools at the first `eos_token_id` when it
is not 2. With eos_token_id = vocab_size - 1 the two are the same position for every input
(torch.argmax returns the first maximum). OpenCLIP's `eos` pool maps to eos_token_id = eos_id.

Inputs of `convert`: an OpenCLIP training file (`epoch_N.pt`: {"epoch", "name", "state_dict",
"optimizer", "scaler"}, keys possibly prefixed `module.`), a bare state dict (.pt/.pth/.bin)
or `open_clip_model.safetensors`. Pickles are read with `torch.load(weights_only=True)`: those
files hold only dicts, lists, tuples, tensors, numbers and strings, so no allowlist is needed,
and a pickle that names any other global (e.g. one whose __reduce__ would run code) is refused
with one line before anything in it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from trainer.interop.run_checkpoint import InteropError

EXIT_USAGE = 2
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


# --------------------------------------------------------------------------- files


def _one_line(err: Exception) -> str:
    text = str(err)
    detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)  # torch's own cause
    if detail:
        return detail.group(1).strip()
    return text.strip().splitlines()[0] if text.strip() else type(err).__name__


def load_openclip_state(path: str | Path) -> dict[str, torch.Tensor]:
    """An OpenCLIP state dict from epoch_N.pt / a bare state dict / *.safetensors (module doc)."""
    path = Path(path)
    if not path.is_file():
        raise InteropError(f"--checkpoint: {path} is not a file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        blob = load_file(str(path))
    else:
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except torch.serialization.pickle.UnpicklingError as err:  # the error type only
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
            if found:  # e.g. a __reduce__ payload: refused before anything in it runs
                raise InteropError(
                    f"--checkpoint: {path} holds more than tensors and plain containers (it "
                    f"names {found.group(1)}); refusing to unpickle it (weights_only=True)"
                ) from None
            raise InteropError(
                f"--checkpoint: {path} is not a checkpoint torch.load(weights_only=True) can "
                f"read ({_one_line(err)}); refusing it"
            ) from None
        except (RuntimeError, EOFError) as err:
            raise InteropError(
                f"--checkpoint: {path} is not a torch file ({_one_line(err)})"
            ) from None
    if isinstance(blob, dict) and isinstance(blob.get("state_dict"), dict):
        blob = blob["state_dict"]
    if not isinstance(blob, dict) or not all(isinstance(v, torch.Tensor) for v in blob.values()):
        raise InteropError(f"--checkpoint: {path} holds no state dict (tensors by name)")
    if blob and all(k.startswith("module.") for k in blob):
        blob = {k.removeprefix("module."): v for k, v in blob.items()}
    return blob


def _preprocess(oc_config: dict, image_size: int) -> dict:
    from data.transforms import CLIP_MEAN, CLIP_STD

    given = oc_config.get("preprocess_cfg", {}) if "model_cfg" in oc_config else {}
    return {
        "size": image_size, "mode": "RGB", "mean": list(given.get("mean", CLIP_MEAN)),
        "std": list(given.get("std", CLIP_STD)), "interpolation": "bicubic",
        "resize_mode": "shortest", "fill_color": 0,
    }  # fmt: skip


def _image_processor(pre: dict):
    from transformers import CLIPImageProcessor

    size = pre["size"]
    return CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": size}, resample=3,  # PIL bicubic
        do_center_crop=True, crop_size={"height": size, "width": size},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=pre["mean"], image_std=pre["std"], do_convert_rgb=True,
    )  # fmt: skip


def _write_atomically(out: Path, force: bool, write) -> Path:
    from trainer.interop.hf_export import check_out

    out = Path(out)
    check_out(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def convert_openclip(config_path: str | Path, checkpoint: str | Path, out: str | Path, *,
                     force: bool = False, force_quick_gelu: bool = False):  # fmt: skip
    """OpenCLIP checkpoint + model config -> HF directory (model, OpenAI tokenizer, processor).
    Returns (out, CLIPConfig)."""
    from transformers import CLIPModel, CLIPProcessor

    from trainer.interop.clip_tokenizer import build_tokenizer

    try:
        oc_config = json.loads(Path(config_path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InteropError(f"--config: cannot read {config_path}: {_one_line(err)}") from None
    text = _model_cfg(oc_config)["text_cfg"]
    if text.get("vocab_size", OPENAI_VOCAB) != OPENAI_VOCAB or text.get("hf_tokenizer_name"):
        raise InteropError("--config: only models with OpenAI's BPE tokenizer (vocab 49408) "
                           "convert; this one uses another tokenizer")  # fmt: skip
    state = load_openclip_state(checkpoint)
    config, hf_state = openclip_to_hf(state, oc_config, force_quick_gelu=force_quick_gelu)
    pre = _preprocess(oc_config, config.vision_config.image_size)

    def write(tmp: Path) -> None:
        model = CLIPModel(config)
        model.load_state_dict(hf_state, strict=False)  # all keys checked by _check_shapes
        model.save_pretrained(tmp)
        tokenizer = build_tokenizer()
        tokenizer.model_max_length = config.text_config.max_position_embeddings
        tokenizer.save_pretrained(tmp)
        processor = _image_processor(pre)
        processor.save_pretrained(tmp)
        CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(tmp)

    return _write_atomically(Path(out), force, write), config


def _hf_source(path: Path):
    """(HF state dict, CLIPConfig) of an HF CLIP directory or a disco-clip run checkpoint."""
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        from safetensors.torch import load_file
        from transformers import CLIPConfig

        return load_file(str(path / "model.safetensors")), CLIPConfig.from_pretrained(path)
    from trainer.interop.run_checkpoint import build_hf_model, resolve_checkpoint

    model, tokenizer, _ = build_hf_model(resolve_checkpoint(path))
    if len(tokenizer) != OPENAI_VOCAB or tokenizer.eos_token_id != OPENAI_EOS:
        print("disco-clip: warning: the run's tokenizer is not OpenAI's BPE; open_clip."
              "get_tokenizer() will not give its ids", file=sys.stderr)  # fmt: skip
    return model.state_dict(), model.config


def export_openclip(run_checkpoint_or_hf_dir: str | Path, out: str | Path, *,
                    force: bool = False) -> Path:  # fmt: skip
    """A run checkpoint (any form `disco-clip export` takes) or an HF CLIP directory ->
    open_clip_config.json ({"model_cfg", "preprocess_cfg"}) + open_clip_model.safetensors,
    loadable by open_clip.create_model_and_transforms("local-dir:OUT")."""
    from safetensors.torch import save_file

    state, config = _hf_source(Path(run_checkpoint_or_hf_dir))
    oc_cfg, oc_state = hf_to_openclip(state, config)
    pre = _preprocess({}, config.vision_config.image_size)

    def write(tmp: Path) -> None:
        save_file(oc_state, str(tmp / OC_WEIGHTS))
        doc = {"model_cfg": oc_cfg, "preprocess_cfg": pre}
        (tmp / OC_CONFIG).write_text(json.dumps(doc, indent=2) + "\n")

    return _write_atomically(Path(out), force, write)


# --------------------------------------------------------------------------- CLI


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert", help="OpenCLIP checkpoint -> Hugging Face CLIP directory"
    )
    parser.add_argument("--from", dest="source", required=True, choices=["openclip"],
                        help="format of --checkpoint")  # fmt: skip
    parser.add_argument("--config", required=True, type=Path,
                        help="OpenCLIP model config (model_configs/NAME.json or open_clip_config.json)")  # fmt: skip
    parser.add_argument("--checkpoint", required=True, type=Path,
                        help="epoch_N.pt, a bare state dict, or open_clip_model.safetensors")  # fmt: skip
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--force-quick-gelu", action="store_true",
                        help="use QuickGELU whatever the config says (OpenCLIP's --force-quick-gelu)")  # fmt: skip
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        out, config = convert_openclip(args.config, args.checkpoint, args.out, force=args.force,
                                       force_quick_gelu=args.force_quick_gelu)  # fmt: skip
    except (InteropError, FileNotFoundError) as err:
        print(f"disco-clip convert: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    print(f"converted to {out} (activation {config.vision_config.hidden_act})")
    return 0
