"""OpenCLIP <-> HF CLIP conversion (trainer/interop/openclip.py) against OpenCLIP 3.x itself.

OpenCLIP's models are built by open_clip.model.CLIP with random weights (every parameter
perturbed, so that zero-initialised biases are tested too); the converted HF CLIPModel must give
the same image/text embeddings and logits within 1e-5 (fp32), for quick_gelu and gelu, for a
small config and the real ViT-B/32 one, and the way back must load into OpenCLIP's CLIP with
strict=True and give the same outputs.

torchvision is not installed (PyPI's wheel does not import beside the CPU torch), and
open_clip/utils.py and transform.py import it at import time. The `open_clip` fixture puts a
stub `torchvision` (the names open_clip touches at import) in sys.modules while importing it,
after transformers has cached "torchvision is not available", and restores sys.modules
afterwards. The product (trainer/interop/openclip.py) never imports open_clip.
"""

from __future__ import annotations

import enum
import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from trainer.cli import main
from trainer.interop.openclip import (
    InteropError,
    export_openclip,
    hf_to_openclip,
    load_openclip_state,
    openclip_to_hf,
)

TOL = 1e-5
EOS = 49407
SMALL = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}


def _stub_modules() -> dict[str, types.ModuleType]:
    class _Transform:
        def __init__(self, *args, **kwargs):
            pass

    tv = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")
    ops, misc = types.ModuleType("torchvision.ops"), types.ModuleType("torchvision.ops.misc")
    for name in ("Normalize", "Compose", "RandomResizedCrop", "ToTensor", "Resize", "CenterCrop",
                 "ColorJitter", "Grayscale"):  # fmt: skip
        setattr(transforms, name, type(name, (_Transform,), {}))
    transforms.InterpolationMode = enum.Enum("InterpolationMode", "NEAREST BILINEAR BICUBIC")
    transforms.functional = functional
    misc.FrozenBatchNorm2d = type("FrozenBatchNorm2d", (_Transform,), {})
    tv.transforms, tv.ops, ops.misc = transforms, ops, misc
    stubs = {m.__name__: m for m in (tv, transforms, functional, ops, misc)}
    if importlib.util.find_spec("ftfy") is None:
        ftfy = types.ModuleType("ftfy")
        ftfy.fix_text = lambda text: text
        stubs["ftfy"] = ftfy
    return stubs


@pytest.fixture(scope="module")
def open_clip():
    if importlib.util.find_spec("open_clip") is None:
        pytest.skip("open_clip_torch is not installed")
    import transformers.utils.import_utils as iu

    iu.is_torchvision_available()  # cached False before the stub exists (lru_cache)
    names = ("open_clip", "torchvision", "ftfy")
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] in names}
    sys.modules.update(_stub_modules())
    try:
        yield importlib.import_module("open_clip")
    finally:
        for key in [k for k in sys.modules if k.split(".")[0] in names]:
            del sys.modules[key]
        sys.modules.update(saved)


def _oc_model(open_clip, cfg: dict, quick_gelu: bool, seed: int = 0):
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(
        cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"], quick_gelu=quick_gelu
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        model.logit_scale.fill_(2.7)
    return model.eval()


def _inputs(cfg: dict, batch: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    size, ctx = cfg["vision_cfg"]["image_size"], cfg["text_cfg"]["context_length"]
    images = torch.randn(batch, 3, size, size, generator=g)
    ids = torch.randint(1, EOS - 1, (batch, ctx), generator=g)  # eos is the largest id present
    mask = torch.ones(batch, ctx, dtype=torch.long)
    for row in range(batch):
        pos = [ctx - 1, 3, ctx // 2][row % 3]  # eos last, early, middle
        ids[row, pos] = EOS
        ids[row, pos + 1 :] = 0  # OpenCLIP's padding
        mask[row, pos + 1 :] = 0
    return images, ids, mask


@torch.no_grad()
def _oc_outputs(model, images, ids):
    img, txt, scale = model(images, ids)  # normalised features, exp(logit_scale)
    return img, txt, scale * img @ txt.t()


@torch.no_grad()
def _hf_outputs(model, images, ids, mask):
    out = model(input_ids=ids, pixel_values=images, attention_mask=mask)
    return out.image_embeds, out.text_embeds, out.logits_per_image


def _hf_model(config, state):
    from transformers import CLIPModel

    model = CLIPModel(config).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not [k for k in missing if not k.endswith("position_ids")] and not unexpected
    return model


def _max_diffs(a, b) -> list[float]:
    return [float((x - y).abs().max()) for x, y in zip(a, b, strict=True)]


def _check_both_ways(open_clip, cfg: dict, quick_gelu: bool, batch: int) -> None:
    oc = _oc_model(open_clip, cfg, quick_gelu)
    images, ids, mask = _inputs(cfg, batch)
    want = _oc_outputs(oc, images, ids)

    config, hf_state = openclip_to_hf(oc.state_dict(), dict(cfg, quick_gelu=quick_gelu))
    act = "quick_gelu" if quick_gelu else "gelu"
    assert config.vision_config.hidden_act == config.text_config.hidden_act == act
    assert config.text_config.eos_token_id == EOS
    hf = _hf_model(config, hf_state)
    diffs = _max_diffs(want, _hf_outputs(hf, images, ids, mask))
    print(f"openclip->hf {act}: max abs diff image/text/logits {diffs}")
    assert max(diffs) < TOL

    oc_cfg, oc_state = hf_to_openclip(hf, config)
    assert oc_cfg["quick_gelu"] is quick_gelu
    back = open_clip.model.CLIP(**oc_cfg).eval()
    back.load_state_dict(oc_state, strict=True)
    for key, value in oc.state_dict().items():
        assert torch.equal(value, back.state_dict()[key]), key
    diffs = _max_diffs(want, _oc_outputs(back, images, ids))
    print(f"hf->openclip {act}: max abs diff image/text/logits {diffs}")
    assert max(diffs) < TOL


@pytest.mark.parametrize("quick_gelu", [True, False], ids=["quick_gelu", "gelu"])
def test_small_both_ways(open_clip, quick_gelu):
    _check_both_ways(open_clip, SMALL, quick_gelu, batch=3)


@pytest.mark.parametrize("quick_gelu", [True, False], ids=["quick_gelu", "gelu"])
def test_vit_b32_both_ways(open_clip, quick_gelu):
    path = Path(open_clip.__file__).parent / "model_configs" / "ViT-B-32.json"
    _check_both_ways(open_clip, json.loads(path.read_text()), quick_gelu, batch=2)


def test_wrong_activation_changes_outputs(open_clip):
    """The equality above discriminates: forcing quick_gelu on a gelu model moves the outputs."""
    oc = _oc_model(open_clip, SMALL, quick_gelu=False)
    images, ids, mask = _inputs(SMALL, 3)
    config, state = openclip_to_hf(oc.state_dict(), SMALL, force_quick_gelu=True)
    diffs = _max_diffs(
        _oc_outputs(oc, images, ids), _hf_outputs(_hf_model(config, state), images, ids, mask)
    )
    assert max(diffs) > 1e-3


def _write_checkpoint(oc, tmp_path: Path, form: str) -> Path:
    state = oc.state_dict()
    if form == "safetensors":
        path = tmp_path / "open_clip_model.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        return path
    path = tmp_path / ("epoch_3.pt" if form == "epoch" else "state.pt")
    if form == "epoch":  # what OpenCLIP's training loop saves (DDP: module. prefixes)
        opt = torch.optim.AdamW(oc.parameters(), lr=1e-3, betas=(0.9, 0.98))
        oc.logit_scale.grad = torch.ones_like(oc.logit_scale)
        opt.step()
        blob = {"epoch": 3, "name": "run", "optimizer": opt.state_dict(),
                "state_dict": {f"module.{k}": v for k, v in oc.state_dict().items()}}  # fmt: skip
        torch.save(blob, path)
    else:
        torch.save(state, path)
    return path


@pytest.mark.parametrize("form", ["epoch", "bare", "safetensors"])
def test_cli_convert(open_clip, tmp_path, form, capsys):
    from transformers import CLIPModel, CLIPProcessor

    oc = _oc_model(open_clip, SMALL, quick_gelu=True)
    ckpt = _write_checkpoint(oc, tmp_path, form)
    cfg_path = tmp_path / "model.json"
    cfg_path.write_text(json.dumps(dict(SMALL, quick_gelu=True)))
    out = tmp_path / "hf"
    argv = ["convert", "--from", "openclip", "--config", str(cfg_path), "--checkpoint", str(ckpt)]
    assert main([*argv, "--out", str(out)]) == 0
    assert "activation quick_gelu" in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= {
        p.name for p in out.iterdir()
    }
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hf.tmp-")]
    hf = CLIPModel.from_pretrained(out).eval()
    processor = CLIPProcessor.from_pretrained(out)
    assert processor.tokenizer.eos_token_id == EOS and len(processor.tokenizer) == 49408
    assert processor.image_processor.crop_size["height"] == 32
    images, ids, mask = _inputs(SMALL, 3)
    oc.eval()
    diffs = _max_diffs(_oc_outputs(oc, images, ids), _hf_outputs(hf, images, ids, mask))
    assert max(diffs) < TOL
    # tokenizer ids, padded: OpenCLIP's ids on every unmasked position, eos the pooled one
    batch = processor.tokenizer(["a photo of a dog"], padding="max_length", max_length=16)
    assert batch["input_ids"][0][0] == 49406 and EOS in batch["input_ids"][0]
    assert main([*argv, "--out", str(out)]) == 2  # non-empty without --force


def test_crafted_pickle_refused(tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "epoch_1.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": Evil()}, path)
    cfg_path = tmp_path / "model.json"
    cfg_path.write_text(json.dumps(SMALL))
    argv = ["convert", "--from", "openclip", "--config", str(cfg_path), "--checkpoint", str(path)]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "refusing to unpickle" in err, err
    assert "io.open" in err  # the global it would have called
    assert not marker.exists() and not (tmp_path / "out").exists()
    # control: the same file does run code when unpickled without weights_only
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_unsupported_and_mismatched_configs(open_clip):
    state = _oc_model(open_clip, SMALL, quick_gelu=False).state_dict()
    layer_scale = json.loads(json.dumps(SMALL))
    layer_scale["vision_cfg"]["ls_init_value"] = 1e-5
    with pytest.raises(InteropError, match="ls_init_value"):
        openclip_to_hf(state, layer_scale)
    deeper = json.loads(json.dumps(SMALL))
    deeper["text_cfg"]["layers"] = 3
    with pytest.raises(InteropError, match="missing"):
        openclip_to_hf(state, deeper)
    wider = json.loads(json.dumps(SMALL))
    wider["embed_dim"] = 48
    with pytest.raises(InteropError, match="shape"):
        openclip_to_hf(state, wider)
    with pytest.raises(InteropError, match=r"not a checkpoint .* can read \(Unsupported operand"):
        path = Path(torch.__file__).parent / "__init__.py"  # not a torch file at all
        load_openclip_state(path)


def test_export_loads_in_openclip_local_dir(open_clip, tmp_path):
    oc = _oc_model(open_clip, SMALL, quick_gelu=False)
    config, state = openclip_to_hf(oc.state_dict(), SMALL)
    hf = _hf_model(config, state)
    hf_dir = tmp_path / "hf"
    hf.save_pretrained(hf_dir)
    out = export_openclip(hf_dir, tmp_path / "oc")
    assert sorted(p.name for p in out.iterdir()) == [
        "open_clip_config.json",
        "open_clip_model.safetensors",
    ]
    doc = json.loads((out / "open_clip_config.json").read_text())
    assert doc["model_cfg"]["quick_gelu"] is False and doc["preprocess_cfg"]["size"] == 32
    loaded, _, _preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    loaded.eval()
    images, ids, mask = _inputs(SMALL, 3)
    diffs = _max_diffs(_hf_outputs(hf, images, ids, mask), _oc_outputs(loaded, images, ids))
    print(f"export_openclip -> create_model_and_transforms: max abs diff {diffs}")
    assert max(diffs) < TOL
