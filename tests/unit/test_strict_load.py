"""`model.pretrained_dir` is strict: a saved HF CLIPModel loads; renamed or extra keys fail."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPConfig, CLIPModel

from trainer.model import ModelConfig, TokenIds, build_clip_config, build_model

TEXT = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=8)  # fmt: skip
VISION = dict(image_size=16, patch_size=8, hidden_size=32, intermediate_size=64,
              num_hidden_layers=1, num_attention_heads=2)  # fmt: skip


@pytest.fixture
def hf_dir(tmp_path):
    torch.manual_seed(0)
    config = CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=16)
    CLIPModel(config).save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def _build(directory):
    cfg = ModelConfig(pretrained_dir=str(directory))
    config = build_clip_config(cfg, TokenIds(100, 98, 99, 0), 8)
    return build_model(cfg, config, with_bias=False, zero3=False)


def test_saved_hf_model_loads_every_weight(hf_dir):
    model = _build(hf_dir)
    state = load_file(str(hf_dir / "model.safetensors"))
    ours = model.state_dict()
    for key, value in state.items():
        assert torch.equal(ours[key], value), key


def test_renamed_key_is_an_error_naming_it(hf_dir):
    path = hf_dir / "model.safetensors"
    state = load_file(str(path))
    state["text_model.final_norm.weight"] = state.pop("text_model.final_layer_norm.weight")
    save_file(state, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"1 missing \(text_model\.final_layer_norm\.weight\); "
                       r"1 unexpected \(text_model\.final_norm\.weight\)"):  # fmt: skip
        _build(hf_dir)


def test_many_missing_keys_are_listed_first_few(hf_dir):
    path = hf_dir / "model.safetensors"
    state = {k: v for k, v in load_file(str(path)).items() if not k.startswith("vision_model")}
    save_file(state, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing \(vision_model\..*, \.\.\.\) weight names"):
        _build(hf_dir)
