"""Eval transform == CLIPImageProcessor; train transform reproducible from its seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor

from data.transforms import eval_transform, sample_seed, train_transform


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
    assert a.shape == (3, 32, 32)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_full_scale_train_crop_is_plain_resize_for_square_input():
    image = _image(32, 32)
    out = train_transform(32, scale=(1.0, 1.0), ratio=(1.0, 1.0))(image, sample_seed(0, 0, "k"))
    assert torch.equal(out, eval_transform(32)(image))
