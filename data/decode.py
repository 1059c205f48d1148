"""Raw sample -> (RGB image, caption): the one place that decides which member is the image,
which the caption, and which RGB picture an image file holds.

Member keys follow webdataset / img2dataset / OpenCLIP: `image_keys` is a list of member
extensions tried in order (first present wins: "jpg", "png", "image.png", "img", ...);
`caption_key` names a member ("txt") or a field of the sample's json ("json:caption"), also as a
';'-separated list tried in order ("txt;json:caption").

What "the picture it holds" means, per PIL mode (see `to_rgb`):

- alpha (RGBA, LA, PA, premultiplied RGBa/La, P or L/RGB with a tRNS transparency: transparent
  PNG/GIF/WebP) is composited over WHITE, the way a browser shows it on the usual page and the
  way img2dataset writes such images into its JPEG shards; the colour stored under fully
  transparent pixels is arbitrary (often black) and is never shown;
- 16-bit grey (I;16*) is scaled by its type's range, 0..65535 -> 0..255 (v / 257, rounded),
  never clipped (clipping turned most 16-bit pictures white);
- 32-bit int (I): values within 0..65535 are 16-bit data (as above); any other range is
  stretched from the image's min..max to 0..255;
- float (F): [0, 1] -> 0..255; already within [0, 255] -> kept; anything else stretched from
  min..max (NaN and -inf -> the lowest finite value, +inf -> the highest);
- CMYK (incl. Adobe-inverted JPEGs), YCbCr, LAB, HSV, 1-bit, palette and grey: PIL's own
  conversion (no ICC colour management: embedded profiles are ignored, as everywhere else here);
- an EXIF orientation tag is applied (the picture as a viewer displays it); a broken EXIF block
  is ignored rather than dropping the image;
- animated GIF / WebP / APNG: the first frame.
"""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
from PIL import Image, ImageOps

from data.shards import RawSample

DEFAULT_IMAGE_KEY = "jpg;png;jpeg;webp;tif;tiff;bmp;gif"
"""OpenCLIP's "jpg;png;jpeg;webp", then the other extensions img2dataset-like tools write."""
DEFAULT_CAPTION_KEY = "txt"
BACKGROUND = (255, 255, 255)  # what transparent pixels become


def parse_keys(spec: str) -> tuple[str, ...]:
    """'jpg; .PNG;' -> ('jpg', 'png'): lower-cased like the member extensions read from a tar,
    a leading dot and blanks dropped."""
    keys = (k.strip().lstrip(".").lower() for k in spec.split(";"))
    return tuple(k for k in keys if k)


DEFAULT_IMAGE_KEYS = parse_keys(DEFAULT_IMAGE_KEY)


def decode(
    sample: RawSample,
    *,
    image_keys: tuple[str, ...] = DEFAULT_IMAGE_KEYS,
    caption_key: str = DEFAULT_CAPTION_KEY,
) -> tuple[Image.Image, str]:
    """Image and caption of a raw sample; raises ValueError saying what is wrong.

    `image_keys`: member extensions tried in order (as `parse_keys` returns them); `caption_key`:
    see `caption_of`."""
    if sample.error:
        raise ValueError(sample.error)
    data = next((sample.members[k] for k in image_keys if k in sample.members), None)
    if data is None:
        raise ValueError(
            f"no image (no member {'/'.join(image_keys)}; the sample has "
            f"{', '.join(sorted(sample.members)) or 'nothing'})"
        )
    text = caption_of(sample.members, caption_key)
    return open_rgb(data), text


def caption_of(members: dict[str, bytes], caption_key: str = DEFAULT_CAPTION_KEY) -> str:
    """The stripped caption: the first present of the ';'-separated keys, each a member
    extension ("txt") or "json:FIELD" (a string field of the sample's .json member). A present
    but empty caption is an error, not a reason to try the next key."""
    keys = [k.strip() for k in caption_key.split(";") if k.strip()]
    meta: dict | None = None
    for key in keys:
        if key.lower().startswith("json:"):
            field = key[5:]
            if "json" not in members:
                continue
            if meta is None:
                meta = _json(members["json"])
            if field not in meta:
                continue
            value = meta[field]
            if not isinstance(value, str):
                raise ValueError(
                    f"caption: json field '{field}' is a {type(value).__name__}, not a string"
                )
            text = value
        elif key.lower().lstrip(".") in members:
            member = key.lower().lstrip(".")
            try:
                text = members[member].decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"caption: .{member} is not UTF-8 ({exc})") from exc
        else:
            continue
        text = text.strip()
        if not text:
            raise ValueError("empty caption")
        return text
    raise ValueError(f"no caption (looked for {'/'.join(keys)})")


def _json(data: bytes) -> dict:
    try:
        meta = json.loads(data)
    except ValueError as exc:
        raise ValueError(f"caption: the sample's .json does not parse ({exc})") from exc
    if not isinstance(meta, dict):
        raise ValueError(f"caption: the sample's .json is a {type(meta).__name__}, not an object")
    return meta


def open_rgb(data: bytes) -> Image.Image:
    """The RGB picture an image file holds (first frame, EXIF orientation applied); raises
    ValueError for bytes PIL cannot decode."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as exc:  # PIL raises many types for bad bytes
        raise ValueError(f"undecodable image ({type(exc).__name__}: {exc})") from exc
    # A malformed EXIF block must not drop a picture whose pixels decoded fine.
    with contextlib.suppress(Exception):
        ImageOps.exif_transpose(image, in_place=True)
    try:
        return to_rgb(image)
    except Exception as exc:
        raise ValueError(f"unconvertible image mode {image.mode} ({exc})") from exc


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB of a decoded PIL image, by mode (the rules are in this module's docstring)."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode.startswith("I;16"):
        return _grey(_scale_16bit(np.asarray(image)))
    if mode == "I":
        values = np.asarray(image)
        if values.size and values.min() >= 0 and values.max() <= 65535:
            return _grey(_scale_16bit(values))
        return _grey(_stretch(values.astype(np.float64)))
    if mode == "F":
        return _grey(_float_to_8bit(np.asarray(image)))
    if mode == "La":
        image, mode = image.convert("LA"), "LA"
    if mode in ("RGBA", "RGBa", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _grey(values: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(values, dtype=np.uint8), mode="L").convert("RGB")


def _scale_16bit(values: np.ndarray) -> np.ndarray:
    """0..65535 -> 0..255, rounded (v / 257: 65535 -> 255, 257 -> 1)."""
    return ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _stretch(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min(initial=0.0)), float(values.max(initial=0.0))
    if high <= low:
        return np.zeros(values.shape, np.uint8)
    return np.round((values - low) * (255.0 / (high - low))).astype(np.uint8)


def _float_to_8bit(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(values.shape, np.uint8)
    low, high = values[finite].min(), values[finite].max()
    values = np.nan_to_num(values, nan=low, posinf=high, neginf=low)
    if low >= 0.0 and high <= 1.0:
        return np.round(values * 255.0).astype(np.uint8)
    if low >= 0.0 and high <= 255.0:
        return np.round(values).astype(np.uint8)
    return _stretch(values)
