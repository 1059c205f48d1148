"""CLIP image preprocessing with PIL + torch (torchvision does not import beside torch 2.13).

The eval transform reproduces `CLIPImageProcessor(size={"shortest_edge": S},
crop_size={"height": S, "width": S})`: resize the short side to S with PIL bicubic, centre
crop, scale to [0, 1], normalise with CLIP's mean/std (tests/unit/test_data_transforms.py
measures the agreement).

The train transform stops before the scaling: it returns the crop's uint8 RGB pixels, which the
loader workers batch and hand over (4x smaller than fp32 in host memory and over PCIe), and the
trainer calls `normalize_pixels` on the device. Same fp32 arithmetic in the same order as the
eval transform, so the result is bit-identical to normalising in the worker.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

_MEAN = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
_STD = torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1)


def to_normalised_tensor(image: Image.Image) -> torch.Tensor:
    """(H, W) RGB PIL image -> (3, H, W) float32 normalised with CLIP's mean/std."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
    tensor = torch.from_numpy(array).permute(2, 0, 1)  # (3, H, W)
    return (tensor - _MEAN) / _STD


def to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """(H, W) RGB PIL image -> (3, H, W) uint8, its pixels unchanged (contiguous, writable)."""
    array = np.array(image.convert("RGB"), dtype=np.uint8)  # (H, W, 3), a copy
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()  # (3, H, W)


def normalize_pixels(pixels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 (n, 3, S, S) on any device -> ((pixels / 255) - mean) / std in `dtype`.

    Computed in fp32 on the tensor's own device, in the order `to_normalised_tensor` uses, so
    the fp32 result is bit-identical to what a loader worker used to hand over. The divisors
    are tensors on the device on purpose: CUDA divides by a CPU scalar as a multiplication by
    its reciprocal, which can differ from the division by one ulp. In place after the first
    cast: one fp32 copy of the batch at a time (plus the `dtype` copy when dtype is not fp32).
    """
    if pixels.dtype != torch.uint8:
        raise TypeError(f"normalize_pixels: expected uint8 pixels, got {pixels.dtype}")
    device = pixels.device
    out = pixels.to(torch.float32)
    out.div_(torch.tensor(255.0, dtype=torch.float32, device=device))
    out.sub_(_MEAN.to(device))
    out.div_(_STD.to(device))
    return out.to(dtype)


def _resize_short_side(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    short, long = min(width, height), max(width, height)
    # Same rounding as transformers' get_resize_output_image_size (int of the scaled long side).
    new_long = int(size * long / short)
    new_size = (size, new_long) if width <= height else (new_long, size)
    if new_size == image.size:
        return image
    return image.resize(new_size, resample=Image.Resampling.BICUBIC)


def _centre_crop(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    # Same offsets as transformers' center_crop: floor((dim - size) / 2).
    left = (width - size) // 2
    top = (height - size) // 2
    return image.crop((left, top, left + size, top + size))


def eval_crop(image: Image.Image, image_size: int) -> Image.Image:
    """The eval geometry: short side to S (bicubic), then the centre S x S crop, in RGB."""
    image = image.convert("RGB")
    return _centre_crop(_resize_short_side(image, image_size), image_size)


def eval_transform(image_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> (3, S, S) float32, matching CLIPImageProcessor for the same size."""

    def apply(image: Image.Image) -> torch.Tensor:
        return to_normalised_tensor(eval_crop(image, image_size))

    return apply


def sample_seed(seed: int, epoch: int, key: str) -> np.random.SeedSequence:
    """Randomness for one training sample, a pure function of (seed, epoch, key) so that a
    resumed run draws exactly the crops an uninterrupted one would have."""
    key_bytes = key.encode("utf-8") or b"\0"
    if not (0 <= seed < 2**32 and 0 <= epoch < 2**32):  # words of their own: the general form
        return np.random.SeedSequence([seed, epoch, len(key_bytes), *key_bytes])
    # The same entropy as the list above, built as one uint32 array: SeedSequence turns each
    # int of a list into words one by one in Python, 7x slower for a ~25-byte key (a loader
    # worker seeds every sample it crops).
    words = np.empty(3 + len(key_bytes), dtype=np.uint32)
    words[:3] = (seed, epoch, len(key_bytes))
    words[3:] = np.frombuffer(key_bytes, dtype=np.uint8)
    return np.random.SeedSequence(words)


def train_transform(
    image_size: int,
    scale: tuple[float, float] = (0.9, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Callable[[Image.Image, np.random.SeedSequence], torch.Tensor]:
    """Random resized crop (bicubic) to S x S, as uint8 (3, S, S) RGB pixels; the CLIP
    normalisation is `normalize_pixels`, applied by the trainer on the device.

    The returned callable takes the image and a `SeedSequence` (see `sample_seed`); it never
    touches global RNG state, so worker processes and resumed runs agree bit for bit.
    """

    log_ratio = (float(np.log(ratio[0])), float(np.log(ratio[1])))

    def apply(image: Image.Image, seed: np.random.SeedSequence) -> torch.Tensor:
        if image.mode != "RGB":  # convert() copies the whole picture even when it is RGB
            image = image.convert("RGB")
        rng = np.random.default_rng(seed)
        box = _random_box(image.size, scale, log_ratio, rng)
        crop = image.resize((image_size, image_size), resample=Image.Resampling.BICUBIC, box=box)
        # (3, S, S) as a view: the loader's torch.stack makes the batch contiguous in one copy.
        return torch.from_numpy(np.array(crop, dtype=np.uint8)).permute(2, 0, 1)

    return apply


def _random_box(
    size: tuple[int, int],
    scale: tuple[float, float],
    log_ratio: tuple[float, float],
    rng: np.random.Generator,
) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a crop covering a random area fraction and aspect ratio
    (its log drawn uniformly from `log_ratio`); the whole image if ten tries fail (the usual
    RandomResizedCrop recipe). math.sqrt is IEEE-exact like np.sqrt, and the exponential
    stays numpy's: the boxes are the same as ever, bit for bit."""
    width, height = size
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = float(np.exp(rng.uniform(*log_ratio)))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return (left, top, left + w, top + h)
    return (0, 0, width, height)
