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
import re
import sys
from pathlib import Path

import torch

from trainer.interop.hf_export import write_dir_atomically
from trainer.interop.openclip_map import (
    OC_CONFIG,
    OC_WEIGHTS,
    OPENAI_EOS,
    OPENAI_VOCAB,
    _model_cfg,
    hf_to_openclip,
    openclip_to_hf,
)
from trainer.interop.run_checkpoint import InteropError

EXIT_USAGE = 2

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

    return write_dir_atomically(Path(out), force, write), config


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

    return write_dir_atomically(Path(out), force, write)


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
