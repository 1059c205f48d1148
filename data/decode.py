"""Raw sample -> (RGB image, caption): the one place that decides which member is which."""

from __future__ import annotations

import io

from PIL import Image

from data.shards import RawSample


def decode(sample: RawSample) -> tuple[Image.Image, str]:
    """Image and caption of a raw sample; raises ValueError saying what is wrong."""
    if sample.error:
        raise ValueError(sample.error)
    if sample.image is None:
        raise ValueError("no image")
    if sample.text is None:
        raise ValueError("no caption")
    text = sample.text.decode("utf-8").strip()
    if not text:
        raise ValueError("empty caption")
    try:
        image = Image.open(io.BytesIO(sample.image))
        image.load()
        return image.convert("RGB"), text
    except Exception as exc:  # PIL raises many types for bad bytes
        raise ValueError(f"undecodable image ({type(exc).__name__}: {exc})") from exc
