"""The OpenCLIP ViT presets: built from config on the meta device, their parameter counts are
OpenCLIP's published ones (within 0.5%), and `disco-clip plan` knows every one."""

from __future__ import annotations

import pytest

from trainer.cli import main
from trainer.model import PRESETS
from trainer.plan.planner import model_shape

# OpenCLIP's docs/model_profile.csv (params in millions), vocab 49408, context 77.
PUBLISHED_M = {
    "vit_b32": 151.28,
    "vit_b16": 149.62,
    "vit_l14": 427.62,
    "vit_l14_336": 427.94,
    "vit_h14": 986.11,
}
VARIANTS = {**PUBLISHED_M, **{f"{k}_gelu": v for k, v in PUBLISHED_M.items() if k != "vit_h14"}}
VARIANTS["vit_h14_quickgelu"] = PUBLISHED_M["vit_h14"]


def test_every_openclip_preset_is_there():
    assert set(VARIANTS) <= set(PRESETS)
    assert PRESETS["vit_b32"]["vision_config"]["hidden_act"] == "quick_gelu"  # OpenAI's B/32
    assert PRESETS["vit_h14"]["vision_config"]["hidden_act"] == "gelu"  # OpenCLIP's H/14
    assert PRESETS["vit_h14"]["vision_config"]["num_attention_heads"] == 16  # head width 80


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_parameter_count_matches_published(name):
    shape = model_shape(name, 77, 49408)
    assert abs(shape.params / 1e6 - VARIANTS[name]) / VARIANTS[name] < 0.005, shape.params


@pytest.mark.parametrize("name", sorted(PUBLISHED_M))
def test_planner_reports_every_preset(name, capsys):
    assert main(["plan", "--model", name, "--gpus", "8", "--batch", "1024"]) == 0
    out = capsys.readouterr().out
    assert "largest global batch that fits" in out


DEBUG = "trainer/configs/debug.yaml"


@pytest.fixture
def shards(synthetic_dir) -> str:
    return f"data.train_shards={synthetic_dir / 'train'}"


def _load(shards, *overrides):
    from trainer.config import load_config

    return load_config(DEBUG, [shards, *overrides], world_size=1)


def test_large_preset_refuses_the_toy_tokenizer_unless_asked(shards, synthetic_dir, tmp_path):
    from trainer.config_io import ConfigError

    big = ["model.preset=vit_b32", "data.image_size=224"]
    with pytest.raises(ConfigError, match=r"^data\.tokenizer: .* toy 1553-token tokenizer"):
        _load(shards, *big)
    copy = f"data.tokenizer={synthetic_dir / 'tokenizer'}"  # make-synthetic's copy: still toy
    with pytest.raises(ConfigError, match="toy"):
        _load(shards, *big, copy)
    assert _load(shards, *big, "data.allow_toy_tokenizer=true").model.preset == "vit_b32"
    assert main(["make-tokenizer", "--out", str(tmp_path / "tok")]) == 0
    assert _load(shards, *big, f"data.tokenizer={tmp_path / 'tok'}").data.image_size == 224
    _load(shards)  # tiny keeps the toy tokenizer


def test_image_size_must_be_the_models(shards):
    from trainer.config_io import ConfigError

    with pytest.raises(ConfigError, match=r"data\.image_size: 64 is not the model's image size 32"):
        _load(shards, "data.image_size=64")
    assert _load(shards, "data.image_size=48", "model.image_size=48").data.image_size == 48


def test_pretrained_dir_vocab_and_positions(shards, tmp_path):
    from transformers import CLIPConfig

    from trainer.config_io import ConfigError

    def hf_dir(name, **text):
        text = dict(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2), **text)  # fmt: skip
        vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=2)  # fmt: skip
        CLIPConfig(text_config=text, vision_config=vision).save_pretrained(tmp_path / name)
        return f"model.pretrained_dir={tmp_path / name}"

    small = hf_dir("small", vocab_size=1000, max_position_embeddings=77)
    with pytest.raises(ConfigError, match=r"1553 tokens do not fit .* \(1000 embeddings\)"):
        _load(shards, small, "data.allow_toy_tokenizer=true")
    short = hf_dir("short", vocab_size=1553, max_position_embeddings=8)
    with pytest.raises(ConfigError, match=r"context_length: 16 is more than the 8 positions"):
        _load(shards, short, "data.allow_toy_tokenizer=true")
    with pytest.raises(ConfigError, match="toy"):
        _load(shards, hf_dir("ok", vocab_size=1553, max_position_embeddings=16))
