"""Can a tiny CLIP learn the synthetic dataset on CPU? Plain single-process loop, measured.

    .venv/bin/python -m bench.learnability --data DIR --steps 700 --eval-every 350

Trains a tiny HF CLIPModel (towers + projections, plain CLIP loss, AdamW) on DIR/train with the
data package's loader, then reports zero-shot top-1 on DIR/val with the prompt
"a photo of a {}." and the wall time. The model config printed is the one the demo adopts.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPConfig, CLIPModel

from data.config import DataConfig
from data.eval_sets import imagefolder_samples, load_classnames
from data.loader import build_train_loader
from data.tokenizer import load_tokenizer, tokenize
from data.transforms import eval_transform, normalize_pixels


def tiny_clip_config(
    tokenizer,
    image_size: int,
    context_length: int,
    width: int = 128,
    layers: int = 3,
    patch: int = 8,
) -> CLIPConfig:
    text = dict(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=context_length,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    vision = dict(image_size=image_size, patch_size=patch, hidden_size=width, intermediate_size=2 * width,
                  num_hidden_layers=layers, num_attention_heads=4)  # fmt: skip
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=width)


def encode(model: CLIPModel, pixels, ids, mask) -> tuple[torch.Tensor, torch.Tensor]:
    image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
    text = model.text_projection(model.text_model(input_ids=ids, attention_mask=mask).pooler_output)
    return F.normalize(image, dim=-1), F.normalize(text, dim=-1)  # (b, d), (b, d)


@torch.no_grad()
def zero_shot(model, tokenizer, data_dir: str, image_size: int, context_length: int) -> float:
    model.eval()
    names = load_classnames(f"{data_dir}/classnames.txt")
    ids, mask = tokenize(tokenizer, [f"a photo of a {n}." for n in names], context_length)
    _, text = encode(model, torch.zeros(1, 3, image_size, image_size), ids, mask)
    samples = imagefolder_samples(f"{data_dir}/val", names)
    transform = eval_transform(image_size)
    pixels = torch.stack([transform(Image.open(p)) for p, _ in samples])
    labels = torch.tensor([label for _, label in samples])
    image = F.normalize(
        model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output), dim=-1
    )
    model.train()
    return ((image @ text.T).argmax(-1) == labels).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--seconds", type=float, default=150, help="stop after this much training")
    parser.add_argument("--steps", type=int, default=10**9, help="or after this many steps")
    parser.add_argument("--eval-every", type=int, default=0, help="also report top-1 every N steps")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--context-length", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=20, help="linear warmup steps")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--patch", type=int, default=8)
    parser.add_argument("--crop-min", type=float, default=0.9, help="random resized crop scale min")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the model")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cfg = DataConfig(train_shards=f"{args.data}/train", tokenizer=f"{args.data}/tokenizer",
                     image_size=args.image_size, context_length=args.context_length,
                     workers=args.workers,
                     random_resized_crop_scale=(args.crop_min, 1.0))  # fmt: skip
    cfg.validate()
    tokenizer = load_tokenizer(cfg.tokenizer)
    config = tiny_clip_config(
        tokenizer, args.image_size, args.context_length, args.width, args.layers, args.patch
    )
    model = CLIPModel(config)
    print(config.vision_config.to_diff_dict(), config.text_config.to_diff_dict(), sep="\n")
    print(f"params: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    loader = iter(build_train_loader(cfg, rank=0, world_size=1, local_batch_size=args.batch,
                                     tokenizer=tokenizer, seed=0))  # fmt: skip
    start, step = time.time(), 0
    eval_time = 0.0
    while time.time() - start - eval_time < args.seconds and step < args.steps:
        batch = next(loader)
        for group in opt.param_groups:  # without warmup, lr 3e-3 collapsed to log(b) loss
            group["lr"] = args.lr * min(1.0, (step + 1) / args.warmup)
        pixels = normalize_pixels(batch["pixel_values"], torch.float32)  # loader: uint8
        image, text = encode(model, pixels, batch["input_ids"], batch["attention_mask"])
        logits = model.logit_scale.exp().clamp(max=100) * image @ text.T  # (b, b)
        target = torch.arange(len(logits))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 100 == 0:
            print(
                f"step {step} loss {loss.item():.3f} t={time.time() - start - eval_time:.0f}s",
                flush=True,
            )
        if args.eval_every and step % args.eval_every == 0:
            tick = time.time()
            acc = zero_shot(model, tokenizer, args.data, args.image_size, args.context_length)
            eval_time += time.time() - tick
            print(f"step {step} zero-shot top-1 {acc:.3f}", flush=True)
    train_time = time.time() - start - eval_time
    acc = zero_shot(model, tokenizer, args.data, args.image_size, args.context_length)
    print(f"steps {step} batch {args.batch} train {train_time:.0f}s zero-shot top-1 {acc:.3f}")


if __name__ == "__main__":
    main()
