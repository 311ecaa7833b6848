"""decode_image: every PNG/JPEG mode Pillow gives becomes 8-bit RGB (EXIF-oriented, alpha composited onto the
spec's background), and every limit refuses from the header, before decoding, with the field and the fix.

Every file is generated here (Pillow, or a few lines of PNG chunks where Pillow cannot write the mode)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile
from pydantic import ValidationError

from expertmesh.errors import InvalidArgument, PayloadTooLarge
from expertmesh.experts.images import ACCEPTED_FORMATS, decode_image
from expertmesh.experts.spec import ImageLimits

LIMITS = ImageLimits()
BG = (10, 20, 30)  # a background no test image uses, so compositing shows
ON_BG = ImageLimits(alpha_background=BG)
FIELD = "images[2]"


def save(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_chunks(width: int, height: int, bit_depth: int, colour_type: int, idat: bytes) -> bytes:
    """A PNG from its chunks: for modes Pillow cannot write (16 bits per channel) and for lying headers."""
    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def png16(arr: np.ndarray) -> bytes:
    """uint16 [h, w, 3 or 4] -> a 16-bit-per-channel RGB (colour type 2) or RGBA (6) PNG."""
    h, w, c = arr.shape
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in arr)
    return png_chunks(w, h, 16, {3: 2, 4: 6}[c], zlib.compress(rows))


def rgb(data: bytes, limits: ImageLimits = LIMITS) -> np.ndarray:
    img = decode_image(data, limits, field=FIELD)
    assert img.mode == "RGB" and isinstance(img, Image.Image)
    return np.asarray(img)


# --------------------------------------------------------------------------- every mode -> 8-bit RGB
def test_png_greyscale_8_bit():
    out = rgb(save(Image.new("L", (40, 32), 77)))
    assert out.shape == (32, 40, 3) and (out == 77).all()


def test_png_16_bit_greyscale_scales_by_full_range_not_clips():
    arr = np.array([[0, 257, 32768, 65535]], dtype=np.uint16).repeat(32, axis=0).repeat(8, axis=1)  # 32x32
    img = Image.fromarray(arr)
    data = save(img)
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    out = rgb(data)
    assert out[0, 0].tolist() == [0, 0, 0]
    assert out[0, 8].tolist() == [1, 1, 1]
    assert out[0, 16].tolist() == [128, 128, 128]  # mid-grey stays mid-grey (Pillow's convert("L") gives 255)
    assert out[0, 31].tolist() == [255, 255, 255]


def test_png_16_bit_greyscale_key_transparency_shows_background():
    arr = np.full((32, 32), 40000, np.uint16)
    arr[0, 0] = 1234
    out = rgb(save(Image.fromarray(arr), transparency=1234), ON_BG)
    assert out[0, 0].tolist() == list(BG)
    assert out[5, 5].tolist() == [round(40000 / 257)] * 3


def test_png_1_bit():
    img = Image.new("1", (32, 32), 0)
    img.putpixel((3, 4), 1)
    data = save(img)
    assert Image.open(io.BytesIO(data)).mode == "1"
    out = rgb(data)
    assert out[4, 3].tolist() == [255, 255, 255] and out[0, 0].tolist() == [0, 0, 0]


def palette_image() -> Image.Image:
    img = Image.new("P", (32, 32), 1)
    img.putpalette([0, 0, 0, 200, 50, 25, 0, 255, 0] + [0] * (768 - 9))
    img.putpixel((0, 0), 0)
    img.putpixel((1, 0), 2)
    return img


def test_png_palette_without_transparency():
    data = save(palette_image())
    assert Image.open(io.BytesIO(data)).mode == "P"
    out = rgb(data, ON_BG)
    assert out[0, 0].tolist() == [0, 0, 0] and out[0, 1].tolist() == [0, 255, 0] and out[9, 9].tolist() == [200, 50, 25]


def test_png_palette_with_transparent_index_and_partial_alpha():
    data = save(palette_image(), transparency=bytes([0, 255, 128]))  # index 0 clear, 1 opaque, 2 half
    opened = Image.open(io.BytesIO(data))
    assert opened.mode == "P" and "transparency" in opened.info
    out = rgb(data, ON_BG)
    assert out[0, 0].tolist() == list(BG)
    assert out[9, 9].tolist() == [200, 50, 25]
    assert out[0, 1].tolist() == [round((0 * 128 + 10 * 127) / 255), round((255 * 128 + 20 * 127) / 255),
                                  round((0 * 128 + 30 * 127) / 255)]


def test_png_rgba_transparent_pixel_is_background_and_half_alpha_blends():
    arr = np.zeros((32, 32, 4), np.uint8)
    arr[...] = (200, 100, 50, 255)
    arr[0, 0] = (255, 255, 255, 0)  # fully transparent, colour not zeroed: must still be the background
    arr[0, 1] = (200, 100, 50, 128)
    out = rgb(save(Image.fromarray(arr, "RGBA")), ON_BG)
    assert out[0, 0].tolist() == list(BG)
    assert out[0, 1].tolist() == [round((c * 128 + b * 127) / 255) for c, b in zip((200, 100, 50), BG)]
    assert out[5, 5].tolist() == [200, 100, 50]


def test_rgba_default_background_is_black():
    arr = np.full((32, 32, 4), 255, np.uint8)
    arr[0, 0, 3] = 0
    out = rgb(save(Image.fromarray(arr, "RGBA")))
    assert out[0, 0].tolist() == [0, 0, 0] and out[1, 1].tolist() == [255, 255, 255]


def test_png_la():
    img = Image.new("LA", (32, 32), (180, 255))
    img.putpixel((0, 0), (180, 0))
    img.putpixel((1, 0), (180, 51))
    data = save(img)
    assert Image.open(io.BytesIO(data)).mode == "LA"
    out = rgb(data, ON_BG)
    assert out[0, 0].tolist() == list(BG) and out[5, 5].tolist() == [180] * 3
    assert out[0, 1].tolist() == [round((180 * 51 + b * 204) / 255) for b in BG]


def test_png_rgb_key_transparency():
    img = Image.new("RGB", (32, 32), (1, 2, 3))
    img.putpixel((4, 4), (90, 90, 90))
    out = rgb(save(img, transparency=(1, 2, 3)), ON_BG)
    assert out[0, 0].tolist() == list(BG) and out[4, 4].tolist() == [90, 90, 90]


def test_png_16_bit_per_channel_rgb_and_rgba():
    arr = np.zeros((32, 32, 3), np.uint16)
    arr[...] = (65535, 32896, 0)  # 32896 = 128 * 257
    out = rgb(png16(arr))
    assert out[0, 0].tolist() == [255, 128, 0]
    rgba = np.concatenate([arr, np.full((32, 32, 1), 65535, np.uint16)], axis=2)
    rgba[0, 0, 3] = 0
    out = rgb(png16(rgba), ON_BG)
    assert out[0, 0].tolist() == list(BG) and out[1, 1].tolist() == [255, 128, 0]


@pytest.mark.parametrize("mode, colour, expected", [
    ("L", 100, (100, 100, 100)),
    ("RGB", (200, 40, 90), (200, 40, 90)),
    ("CMYK", (0, 255, 0, 0), (255, 0, 255)),  # Pillow's CMYK -> RGB: 255 - C, 255 - M, 255 - Y (K=0)
])
def test_jpeg_modes(mode, colour, expected):
    data = save(Image.new(mode, (48, 40), colour), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == mode
    out = rgb(data)
    assert out.shape == (40, 48, 3)
    assert np.abs(out[20, 20].astype(int) - expected).max() <= 3


def test_mpo_decodes_as_its_first_jpeg():
    first, second = Image.new("RGB", (40, 40), (250, 0, 0)), Image.new("RGB", (40, 40), (0, 0, 250))
    data = save(first, "MPO", save_all=True, append_images=[second])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    out = rgb(data)
    assert out[20, 20, 0] > 200 and out[20, 20, 2] < 50


# --------------------------------------------------------------------------- EXIF orientation
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_6_is_applied(fmt):
    img = Image.new("RGB", (64, 32), (0, 0, 0))  # stored landscape
    img.paste((255, 0, 0), (0, 0, 8, 8))  # stored top-left corner marked red
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    out = rgb(save(img, fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {})))
    assert out.shape == (64, 32, 3)  # portrait: width 32, height 64
    assert out[2, 29, 0] > 200 and out[2, 29, 1:].max() < 60  # stored top-left -> displayed top-right
    assert out[61, 2].max() < 60


def test_size_checks_use_the_oriented_size():
    img = Image.new("RGB", (64, 16), 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    with pytest.raises(InvalidArgument, match="16x64") as info:  # reported as displayed, not as stored
        decode_image(save(img, "JPEG", exif=exif.tobytes()), ImageLimits(max_aspect_ratio=2.0), field=FIELD)
    assert info.value.field == FIELD


# --------------------------------------------------------------------------- refusals
def test_animated_png_is_refused():
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 255, 0))]
    data = save(frames[0], save_all=True, append_images=frames[1:])
    with pytest.raises(InvalidArgument, match="animated PNG of 2 frames") as info:
        decode_image(data, LIMITS, field=FIELD)
    assert info.value.field == FIELD and "single still frame" in info.value.fix


def test_single_frame_apng_is_accepted():
    assert rgb(save(Image.new("RGB", (32, 32), (1, 2, 3)), save_all=True))[0, 0].tolist() == [1, 2, 3]


def test_over_max_pixels_is_refused():
    data = save(Image.new("RGB", (3000, 3000), (40, 40, 40)))
    limits = ImageLimits(max_pixels=1_000_000)
    with pytest.raises(PayloadTooLarge, match="9000000 pixels, over the limit of 1000000") as info:
        decode_image(data, limits, field=FIELD)
    assert info.value.field == FIELD and "image.max_pixels" in info.value.fix


def test_over_max_pixels_is_refused_from_the_header_before_decoding():
    lying = png_chunks(3000, 3000, 8, 2, b"not zlib at all")  # the pixel data could not even be decompressed
    with pytest.raises(PayloadTooLarge, match="3000x3000") as info:
        decode_image(lying, ImageLimits(max_pixels=1_000_000), field=FIELD)
    assert info.value.field == FIELD
    with pytest.raises(InvalidArgument, match="could not be decoded"):  # the same bytes, under the limit, do fail decoding
        decode_image(png_chunks(300, 300, 8, 2, b"not zlib at all"), LIMITS, field=FIELD)


def test_default_max_pixels_and_pillow_bomb_limit_are_payload_too_large():
    with pytest.raises(PayloadTooLarge) as info:  # 4000x4000: sides fine, pixels over 2048x2048
        decode_image(png_chunks(4000, 4000, 8, 0, b""), LIMITS, field=FIELD)
    assert info.value.field == FIELD and "16000000" in info.value.message
    with pytest.raises(PayloadTooLarge) as info:  # over Pillow's own decompression-bomb limit: refused by open()
        decode_image(png_chunks(20000, 20000, 8, 0, b""), LIMITS, field=FIELD)
    assert info.value.field == FIELD


def test_progressive_jpeg_with_too_many_scans_is_refused():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    data = save(img, "JPEG", progressive=True)
    scans = data.count(b"\xff\xda")
    assert scans > 1 and save(img, "JPEG").count(b"\xff\xda") == 1
    assert rgb(data, ImageLimits(max_jpeg_scans=scans)).shape == (64, 64, 3)
    with pytest.raises(InvalidArgument, match=f"{scans} scans, over the limit of {scans - 1}") as info:
        decode_image(data, ImageLimits(max_jpeg_scans=scans - 1), field=FIELD)
    assert info.value.field == FIELD and "baseline" in info.value.fix


def test_pixels_are_not_decoded_for_a_refused_image(monkeypatch):
    def no_load(self):
        raise AssertionError("decoded a refused image")
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_load)
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    for data, limits, error in [(save(img, "JPEG", progressive=True), ImageLimits(max_jpeg_scans=1), InvalidArgument),
                                (save(Image.new("L", (1100, 1000))), ImageLimits(max_pixels=1_000_000), PayloadTooLarge)]:
        with pytest.raises(error) as info:
            decode_image(data, limits, field=FIELD)
        assert info.value.field == FIELD and "could not be decoded" not in info.value.message


@pytest.mark.parametrize("data", [
    b"\x89PNG\r\n\x1a\n" + b"garbage" * 10,
    b"\xff\xd8\xff" + b"\x00" * 50,
    b"hello, not an image",
    save(Image.new("RGB", (64, 64), (5, 5, 5)))[:-40],
    save(Image.fromarray(np.random.default_rng(2).integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")[:400],
    save(Image.fromarray(np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8)))[:3000],
], ids=["png-garbage", "jpeg-garbage", "text", "png-no-iend", "jpeg-truncated", "png-truncated"])
def test_truncated_or_garbage_bytes_are_invalid_argument(data):
    with pytest.raises(InvalidArgument, match="could not be decoded") as info:
        decode_image(data, LIMITS, field=FIELD)
    assert info.value.field == FIELD and "valid PNG or JPEG" in info.value.fix


@pytest.mark.parametrize("fmt", ["GIF", "BMP"])
def test_other_formats_name_the_accepted_ones(fmt):
    with pytest.raises(InvalidArgument, match=f"format '{fmt}' is not accepted") as info:
        decode_image(save(Image.new("RGB", (32, 32)), fmt), LIMITS, field=FIELD)
    assert info.value.field == FIELD and all(f in info.value.fix for f in ACCEPTED_FORMATS)


# --------------------------------------------------------------------------- the ImageLimits fields
def test_image_limits_defaults_and_background_from_a_yaml_list():
    assert (LIMITS.max_pixels, LIMITS.max_jpeg_scans, LIMITS.alpha_background) == (2048 * 2048, 32, (0, 0, 0))
    assert ImageLimits.model_validate({"alpha_background": [255, 255, 255]}).alpha_background == (255, 255, 255)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"alpha_background": (0, 256, 0)}, "[256] outside 0..255"),
    ({"alpha_background": (-1, 0, 0)}, "[-1] outside 0..255"),
    ({"alpha_background": (0, 0)}, "alpha_background"),
    ({"max_pixels": 100}, "max_pixels"),
    ({"max_jpeg_scans": 0}, "max_jpeg_scans"),
    ({"min_side_px": 100, "max_pixels": 5000}, "raise max_pixels or lower min_side_px"),
])
def test_image_limits_refuse_bad_values(kwargs, fragment):
    with pytest.raises(ValidationError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        ImageLimits(**kwargs)
