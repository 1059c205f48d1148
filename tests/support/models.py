"""Small models and engine stand-ins shared by tests: one definition each."""

from __future__ import annotations

import torch


def tiny_hf_clip():
    """(a random 1-layer HF CLIPModel in eval mode, the shipped tokenizer), seeded."""
    from transformers import CLIPConfig, CLIPModel

    from data.tokenizer import BUILTIN_TOKENIZER_DIR, load_tokenizer

    tok = load_tokenizer(BUILTIN_TOKENIZER_DIR)
    torch.manual_seed(0)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=16, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=1, num_attention_heads=2)  # fmt: skip
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    return model.eval(), tok


def trainable_clip_and_batch(dropout: float):
    """(a seeded tiny TrainableCLIP with attention dropout `dropout`, a 12-row batch)."""
    from trainer.model import ModelConfig, TokenIds, build_clip_config, build_model

    torch.manual_seed(0)
    cfg = ModelConfig(attention_dropout=dropout)
    model = build_model(
        cfg, build_clip_config(cfg, TokenIds(100, 1, 2, 0), 8), with_bias=False, zero3=False
    )
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 100, (12, 8), generator=gen)
    ids[:, 5] = 2  # eos
    batch = {"pixel_values": torch.randn(12, 3, 32, 32, generator=gen), "input_ids": ids,
             "attention_mask": torch.ones(12, 8, dtype=torch.long)}  # fmt: skip
    return model, batch


class RecordingEngine:
    """The four DeepSpeed engine calls train_step makes, around a plain module: gradients
    accumulate between boundaries like DeepSpeed's; `step` records them."""

    def __init__(self, module: torch.nn.Module):
        self.module, self.device = module, next(module.parameters()).device
        self.grads: dict[str, torch.Tensor] | None = None

    def __call__(self, *inputs):
        return self.module(*inputs)

    def backward(self, loss, scale_wrt_gas=True):
        loss.backward()

    def set_gradient_accumulation_boundary(self, is_boundary: bool) -> None:
        pass

    def step(self):
        self.grads = {
            n: p.grad.clone() for n, p in self.module.named_parameters() if p.grad is not None
        }
