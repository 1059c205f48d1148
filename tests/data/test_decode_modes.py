"""decode: every image PIL reads becomes the RGB picture it holds, under any image key; the
caption comes from the configured member or json field.

Each case builds, in memory, a 16x16 picture whose left half is black (or transparent) and whose
right half is a colour, stores it in one PIL mode / format, decodes it through `decode`, and
compares with the picture a viewer shows: alpha over white, 16-bit scaled by its range, EXIF
orientation applied.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from data.decode import DEFAULT_IMAGE_KEYS, caption_of, decode, open_rgb, parse_keys
from data.shards import RawSample

S = 16
COLOUR = (200, 60, 20)
GREY = 150
WHITE = (255, 255, 255)


def halves(left, right, channels=3, dtype=np.uint8) -> np.ndarray:
    """(S, S, channels) array: columns < S/2 are `left`, the others `right`."""
    out = np.empty((S, S, channels), dtype)
    out[:, : S // 2] = left
    out[:, S // 2 :] = right
    return out


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def grey_halves(left: int, right: int) -> np.ndarray:
    return halves((left,) * 3, (right,) * 3)


def blend(colour, alpha: int) -> tuple[int, ...]:
    """`colour` at opacity alpha/255 over white, rounded."""
    return tuple(round(c * alpha / 255 + 255 * (1 - alpha / 255)) for c in colour)


def _rgb_jpeg():
    return encode(Image.fromarray(halves(0, COLOUR)), "JPEG", quality=95), halves(0, COLOUR), 8


def _grey_png():
    image = Image.fromarray(halves(0, GREY, 1)[..., 0])
    return encode(image, "PNG"), grey_halves(0, GREY), 0


def _one_bit_png():
    image = Image.fromarray(halves(0, 255, 1)[..., 0]).convert("1")
    return encode(image, "PNG"), grey_halves(0, 255), 0


def _palette_png():
    image = Image.fromarray(halves(0, COLOUR)).quantize(colors=2)
    return encode(image, "PNG"), halves(0, COLOUR), 0


def _palette_png_transparent():
    """P + tRNS: palette entry 0 is black and fully transparent (the usual way)."""
    image = Image.fromarray(halves(0, 1, 1)[..., 0], mode="L").convert("P")
    image.putpalette([0, 0, 0, *COLOUR] + [0] * 762)
    return encode(image, "PNG", transparency=0), halves(WHITE, COLOUR), 0


def _gif_transparent():
    image = Image.fromarray(halves(0, 1, 1)[..., 0], mode="L").convert("P")
    image.putpalette([0, 0, 0, *COLOUR] + [0] * 762)
    return encode(image, "GIF", transparency=0), halves(WHITE, COLOUR), 0


def _grey_png_trns():
    """L + tRNS: grey value 0 is the transparent colour."""
    image = Image.fromarray(halves(0, GREY, 1)[..., 0])
    return encode(image, "PNG", transparency=0), halves(WHITE, (GREY,) * 3), 0


def _la_png():
    """Grey + alpha: left transparent black, right opaque grey."""
    image = Image.fromarray(np.concatenate([halves(0, GREY, 1), halves(0, 255, 1)], 2), "LA")
    return encode(image, "PNG"), halves(WHITE, (GREY,) * 3), 0


def _rgba_png():
    """Left: black at alpha 0; right: the colour at alpha 128 (a half-transparent overlay)."""
    rgba = halves((0, 0, 0, 0), (*COLOUR, 128), 4)
    return encode(Image.fromarray(rgba, "RGBA"), "PNG"), halves(WHITE, blend(COLOUR, 128)), 1


def _rgba_webp():
    rgba = halves((0, 0, 0, 0), (*COLOUR, 255), 4)
    data = encode(Image.fromarray(rgba, "RGBA"), "WEBP", lossless=True, exact=True)
    return data, halves(WHITE, COLOUR), 1


def _cmyk_jpeg():
    image = Image.fromarray(halves(0, COLOUR)).convert("CMYK")
    return encode(image, "JPEG", quality=95), halves(0, COLOUR), 8


def _png_16bit():
    """I;16: 0 and 40000 of 65535 -> 0 and 156 (clipping made the right half white)."""
    image = Image.fromarray(halves(0, 40000, 1, np.uint16)[..., 0])
    return encode(image, "PNG"), grey_halves(0, 156), 0


def _png_16bit_full_range():
    image = Image.fromarray(halves(257, 65535, 1, np.uint16)[..., 0])
    return encode(image, "PNG"), grey_halves(1, 255), 0


def _tiff_16bit_big_endian():
    image = Image.fromarray(halves(0, 40000, 1, np.uint16)[..., 0].astype(">u2"))
    assert image.mode == "I;16B"
    return encode(image, "TIFF"), grey_halves(0, 156), 0


def _tiff_int32():
    """I holding 16-bit values: scaled like I;16."""
    image = Image.fromarray(halves(0, 40000, 1, np.int32)[..., 0])
    return encode(image, "TIFF"), grey_halves(0, 156), 0


def _tiff_int32_wide():
    """I outside 0..65535: stretched from min..max."""
    image = Image.fromarray(halves(-1000, 1_000_000, 1, np.int32)[..., 0])
    return encode(image, "TIFF"), grey_halves(0, 255), 0


def _tiff_float_unit():
    """F in [0, 1]: 0.5 -> 128 (PIL's own conversion gave 0: all black)."""
    image = Image.fromarray(halves(0.0, 0.5, 1, np.float32)[..., 0])
    return encode(image, "TIFF"), grey_halves(0, 128), 0


def _tiff_float_255():
    image = Image.fromarray(halves(0.0, 150.0, 1, np.float32)[..., 0])
    return encode(image, "TIFF"), grey_halves(0, 150), 0


def _tiff_float_wide():
    values = halves(-3.0, 7.0, 1, np.float32)[..., 0]
    values[0, 0] = np.nan  # NaN -> the darkest finite value
    return encode(Image.fromarray(values), "TIFF"), grey_halves(0, 255), 0


def _tiff_rgb():
    return encode(Image.fromarray(halves(0, COLOUR)), "TIFF"), halves(0, COLOUR), 0


def _bmp():
    return encode(Image.fromarray(halves(0, COLOUR)), "BMP"), halves(0, COLOUR), 0


def _jpeg_exif_rotated():
    """Orientation 6 ("rotate 90 CW to display"): the stored pixels are the picture turned
    90 degrees counter-clockwise, so a viewer shows the black/colour halves side by side."""
    stored = Image.fromarray(halves(0, COLOUR)).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(stored, "JPEG", quality=95, exif=exif.tobytes()), halves(0, COLOUR), 8


CASES = {
    "jpg": (_rgb_jpeg, "jpg"),
    "L png": (_grey_png, "png"),
    "1-bit png": (_one_bit_png, "png"),
    "P png": (_palette_png, "png"),
    "P png + tRNS": (_palette_png_transparent, "png"),
    "P gif + transparency": (_gif_transparent, "gif"),
    "L png + tRNS": (_grey_png_trns, "png"),
    "LA png": (_la_png, "png"),
    "RGBA png": (_rgba_png, "png"),
    "RGBA webp": (_rgba_webp, "webp"),
    "CMYK jpeg": (_cmyk_jpeg, "jpeg"),
    "I;16 png": (_png_16bit, "png"),
    "I;16 png full range": (_png_16bit_full_range, "png"),
    "I;16B tiff": (_tiff_16bit_big_endian, "tif"),
    "I tiff": (_tiff_int32, "tiff"),
    "I tiff wide range": (_tiff_int32_wide, "tiff"),
    "F tiff [0, 1]": (_tiff_float_unit, "tif"),
    "F tiff [0, 255]": (_tiff_float_255, "tif"),
    "F tiff other range": (_tiff_float_wide, "tif"),
    "RGB tiff": (_tiff_rgb, "tiff"),
    "bmp": (_bmp, "bmp"),
    "jpg + EXIF orientation": (_jpeg_exif_rotated, "jpg"),
}


def _sample(members: dict[str, bytes]) -> RawSample:
    return RawSample(shard="mem.tar", key="000", members={"txt": b" a caption ", **members})


@pytest.mark.parametrize("name", list(CASES))
def test_each_mode_decodes_to_the_picture_it_holds(name):
    make, key = CASES[name]
    data, expected, tolerance = make()
    image, text = decode(_sample({key: data}))  # the default image keys take every format
    assert text == "a caption"
    assert image.mode == "RGB" and image.size == (S, S)
    got = np.asarray(image).astype(int)
    assert not (got >= 250).all(), "decoded to a white picture"
    error = np.abs(got - expected.astype(int))
    # JPEG rings next to the edge between the halves: compare away from it, and on average
    inner = np.r_[0 : S // 2 - 2, S // 2 + 2 : S]
    assert error[:, inner].max() <= tolerance, (name, got[0], expected[0])
    assert error.mean() <= max(tolerance, 1) / 2, name


def test_a_broken_exif_block_does_not_drop_the_picture():
    data = encode(Image.fromarray(halves(0, COLOUR)), "JPEG", quality=95, exif=b"Exif\0\0junk")
    assert np.abs(np.asarray(open_rgb(data)).astype(int) - halves(0, COLOUR)).mean() < 4


def test_undecodable_bytes_are_a_value_error():
    with pytest.raises(ValueError, match=r"^undecodable image"):
        decode(_sample({"jpg": b"not an image"}))


@pytest.mark.parametrize(
    ("member", "keys"),
    [("tif", DEFAULT_IMAGE_KEYS), ("gif", DEFAULT_IMAGE_KEYS), ("bmp", DEFAULT_IMAGE_KEYS),
     ("image.png", ("image.png",)), ("img", ("img",)), ("img", parse_keys("jpg; .IMG"))],
)  # fmt: skip
def test_any_image_key_works_when_named(member, keys):
    data = encode(Image.fromarray(halves(0, COLOUR)), "PNG")
    image, _ = decode(_sample({member: data}), image_keys=keys)
    assert np.array_equal(np.asarray(image), halves(0, COLOUR))


def test_the_first_present_image_key_wins_and_a_missing_one_says_what_is_there():
    png = encode(Image.fromarray(halves(0, COLOUR)), "PNG")
    grey = encode(Image.fromarray(halves(0, GREY, 1)[..., 0]), "PNG")
    image, _ = decode(_sample({"png": png, "jpg.png": grey}), image_keys=("jpg.png", "png"))
    assert np.array_equal(np.asarray(image), grey_halves(0, GREY))
    with pytest.raises(ValueError, match=r"^no image \(no member webp; the sample has png, txt"):
        decode(_sample({"png": png}), image_keys=("webp",))


def test_parse_keys():
    assert parse_keys("jpg;png;jpeg;webp") == ("jpg", "png", "jpeg", "webp")
    assert parse_keys(" JPG ; .png ;; ") == ("jpg", "png")
    assert parse_keys("") == ()


def _members(txt: str | None = None, meta: dict | None = None) -> dict[str, bytes]:
    members = {}
    if txt is not None:
        members["txt"] = txt.encode()
    if meta is not None:
        members["json"] = json.dumps(meta).encode()
    return members


def test_a_caption_only_in_the_json_is_found_when_named():
    only_json = _members(meta={"caption": " a red circle ", "key": "000"})
    assert caption_of(only_json, "json:caption") == "a red circle"
    assert caption_of(only_json, "txt;json:caption") == "a red circle"  # the fallback form
    assert caption_of(_members("from txt", {"caption": "from json"}), "txt;json:caption") == (
        "from txt"
    )
    with pytest.raises(ValueError, match=r"^no caption \(looked for txt"):
        caption_of(only_json, "txt")  # the default: no implicit fallback
    png = encode(Image.fromarray(halves(0, COLOUR)), "PNG")
    sample = RawSample(shard="mem.tar", key="000", members={"png": png, **only_json})
    assert decode(sample, caption_key="json:caption")[1] == "a red circle"


def test_other_caption_members_and_caption_errors():
    assert caption_of({"caption": b"x y"}, "caption") == "x y"
    assert caption_of({"txt": "café".encode()}) == "café"
    with pytest.raises(ValueError, match=r"^empty caption"):
        caption_of(_members("  ", {"caption": "not used"}), "txt;json:caption")
    with pytest.raises(ValueError, match=r"^caption: json field 'caption' is a list"):
        caption_of(_members(meta={"caption": ["a", "b"]}), "json:caption")
    with pytest.raises(ValueError, match=r"^caption: the sample's \.json does not parse"):
        caption_of({"json": b"{"}, "json:caption")
    with pytest.raises(ValueError, match=r"^caption: \.txt is not UTF-8"):
        caption_of({"txt": b"\xff\xfe"})
    with pytest.raises(ValueError, match=r"^no caption \(looked for json:caption"):
        caption_of(_members(meta={"text": "other field"}), "json:caption")
