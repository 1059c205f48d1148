"""Eval transform == CLIPImageProcessor; train transform reproducible from its seed; the uint8
hand-over normalised by `normalize_pixels` is bit-identical to the old fp32 worker path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor

from data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    eval_transform,
    normalize_pixels,
    sample_seed,
    train_transform,
)


def _image(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    ("size", "width", "height"), [(32, 64, 64), (64, 80, 50), (224, 300, 417), (32, 20, 31)]
)
def test_eval_transform_matches_clip_image_processor(size, width, height):
    image = _image(width, height)
    processor = CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    expected = torch.from_numpy(
        np.asarray(processor(images=image, return_tensors="np")["pixel_values"][0])
    )
    got = eval_transform(size)(image)
    assert got.shape == (3, size, size) and got.dtype == torch.float32
    # Same PIL bicubic resize and crop offsets: measured max difference 0.0.
    assert (got - expected).abs().max().item() <= 1e-5


def test_train_transform_is_a_function_of_its_seed():
    image = _image(64, 48)
    transform = train_transform(32, scale=(0.3, 1.0))
    a = transform(image, sample_seed(0, 1, "000000.tar/000000007"))
    b = transform(image, sample_seed(0, 1, "000000.tar/000000007"))
    c = transform(image, sample_seed(0, 2, "000000.tar/000000007"))
    assert a.shape == (3, 32, 32) and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("seed", [0, 7, 2**31, 2**32 - 1, 2**32, 2**40 + 3])
@pytest.mark.parametrize("key", ["", "k", "000000.tar/000000007", "dir/é-ß/x.y", "x" * 200])
def test_sample_seed_is_the_documented_seed_sequence(seed, key):
    # docs/data_order.md: SeedSequence([seed, epoch, len(key bytes), *key bytes]), one empty
    # key byte standing for an empty key. Old checkpoints resume into the same crops only if
    # the fast array form draws exactly what that list form draws.
    key_words = list(key.encode("utf-8")) or [0]
    for epoch in (0, 3, 2**32 + 1):
        expected = np.random.SeedSequence([seed, epoch, len(key_words), *key_words])
        got = sample_seed(seed, epoch, key)
        assert np.array_equal(got.generate_state(8), expected.generate_state(8))


def test_full_scale_train_crop_is_plain_resize_for_square_input():
    image = _image(32, 32)
    out = train_transform(32, scale=(1.0, 1.0), ratio=(1.0, 1.0))(image, sample_seed(0, 0, "k"))
    assert torch.equal(normalize_pixels(out[None], torch.float32)[0], eval_transform(32)(image))


# The reference: how a loader worker computed pixel_values before the uint8 hand-over (the
# old data/transforms.py, kept here verbatim).
_OLD_MEAN = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
_OLD_STD = torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1)


def _old_to_normalised_tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
    tensor = torch.from_numpy(array).permute(2, 0, 1)  # (3, H, W)
    return (tensor - _OLD_MEAN) / _OLD_STD


def _old_random_box(size, scale, ratio, rng):
    """The crop box as first written (numpy scalars throughout), the reference the faster
    version must reproduce draw for draw."""
    width, height = size
    area = width * height
    log_ratio = (np.log(ratio[0]), np.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = float(np.exp(rng.uniform(*log_ratio)))
        w = round(np.sqrt(target * aspect))
        h = round(np.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return (left, top, left + w, top + h)
    return (0, 0, width, height)


def _old_train_transform(image_size, scale, ratio=(3 / 4, 4 / 3)):
    def apply(image, seed):
        image = image.convert("RGB")
        rng = np.random.default_rng(seed)
        box = _old_random_box(image.size, scale, ratio, rng)
        crop = image.resize((image_size, image_size), resample=Image.Resampling.BICUBIC, box=box)
        return _old_to_normalised_tensor(crop)

    return apply


def test_normalize_pixels_equals_the_old_worker_float_path_bit_for_bit():
    size, scale = 32, (0.5, 1.0)
    images = [_image(64, 48, 1), _image(40, 70, 2), _image(32, 32, 3), _image(300, 200, 4)]
    images += [images[0].convert("L"), images[1].convert("RGBA")]  # not RGB: converted first
    seeds = [sample_seed(0, e, f"000000.tar/{i:09d}") for i, e in enumerate((0, 0, 1, 3, 0, 1))]
    new = train_transform(size, scale)
    old = _old_train_transform(size, scale)
    pixels = torch.stack([new(im, sd) for im, sd in zip(images, seeds, strict=True)])
    expected = torch.stack([old(im, sd) for im, sd in zip(images, seeds, strict=True)])
    assert pixels.dtype == torch.uint8 and pixels.shape == (6, 3, size, size)
    got = normalize_pixels(pixels, torch.float32)
    assert got.dtype == torch.float32 and got.is_contiguous()
    assert torch.equal(got, expected)  # bit-identical, not just close
    assert torch.equal(normalize_pixels(pixels, torch.bfloat16), expected.to(torch.bfloat16))


@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.5, 1.0), (0.9, 1.0), (1.0, 1.0)])
def test_train_crops_are_the_boxes_first_written(scale):
    # Same boxes for many seeds and shapes (including ones where all ten tries fail): a resumed
    # run, or a run on a newer version, draws exactly the crops it always did.
    transform = train_transform(16, scale)
    for i in range(150):
        width, height = 20 + 37 * i % 400, 20 + 53 * i % 300
        image = _image(width, height, i) if i % 10 else _image(400, 20, i)  # a strip: fallback
        seed = sample_seed(i, i % 3, f"{i:06d}.tar/{i:09d}")
        expected = _old_train_transform(16, scale)(image, seed)
        got = normalize_pixels(transform(image, seed)[None], torch.float32)[0]
        assert torch.equal(got, expected), (i, width, height)


def _all_values() -> torch.Tensor:
    """(2, 3, 16, 16) uint8 holding every value 0..255 in every channel."""
    values = torch.arange(256, dtype=torch.uint8).view(16, 16)
    return torch.stack([values.expand(3, 16, 16), values.flip(0).expand(3, 16, 16)])


def test_normalize_pixels_is_exact_for_every_uint8_value():
    pixels = _all_values()
    expected = torch.stack(
        [_old_to_normalised_tensor(Image.fromarray(p.permute(1, 2, 0).numpy())) for p in pixels]
    )
    before = pixels.clone()
    assert torch.equal(normalize_pixels(pixels, torch.float32), expected)
    assert torch.equal(pixels, before)  # the input is not modified


def test_normalize_pixels_refuses_float_input():
    with pytest.raises(TypeError, match="uint8"):
        normalize_pixels(torch.zeros(1, 3, 4, 4), torch.float32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on CPU CI)")
def test_normalize_pixels_on_cuda_equals_cpu_bit_for_bit():
    pixels = _all_values()
    cpu = normalize_pixels(pixels, torch.float32)
    gpu = normalize_pixels(pixels.cuda(), torch.float32)
    assert gpu.device.type == "cuda"
    assert torch.equal(gpu.cpu(), cpu)
    assert torch.equal(normalize_pixels(pixels.cuda(), torch.bfloat16).cpu(), cpu.bfloat16())
