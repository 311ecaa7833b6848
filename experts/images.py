"""Image bytes -> validated RGB images -> the sizes the experts take. No torch (the ingress and stations use it).

Decoding validates the bytes against the spec's `ImageLimits` and fails with `InvalidArgument` /
`PayloadTooLarge` naming the field and the fix; it never lets a decoder exception escape. Every limit is
checked from the bytes and the header before any pixel is decoded, in this order: `max_bytes` (413), the
format (PNG or JPEG, 400), `max_pixels` (413; a header over Pillow's own decompression-bomb limit is refused
the same way, by `Image.open`), the sides and aspect ratio (400), a single still frame (an animated PNG is
400), `max_jpeg_scans` (400).
The pixel, side and aspect checks do not change under rotation, so they hold for the EXIF-oriented image.

A decoded image is EXIF-oriented first (`ImageOps.exif_transpose`), then made 8-bit RGB:

    =====================================  ==================================================================
    mode Pillow opens                      becomes
    =====================================  ==================================================================
    RGB (8-bit PNG, JPEG incl. YCbCr)      as is
    RGB from a 16-bit-per-channel PNG      as is: Pillow keeps the high byte (v >> 8, within 1 of v/257)
    1 (1-bit PNG)                          0 -> black, 1 -> white
    L (greyscale PNG 1/2/4/8-bit, JPEG)    grey copied to R, G and B
    I;16, I;16B, I;16L (16-bit grey PNG)   round(v / 257): the full 0..65535 range onto 0..255, not clipped
    I (32-bit, older Pillow's 16-bit PNG)  clipped to 0..65535, then as I;16
    P (palette)                            the palette's colours
    CMYK (JPEG; Adobe-inverted handled)    Pillow's CMYK -> RGB
    RGBA, LA, PA                           composited onto `alpha_background` by their alpha
    P / L / RGB / 1 / I;16 with a tRNS     composited onto `alpha_background`: the palette's alpha, or the
      transparency (palette or colour key)   key colour fully transparent
    =====================================  ==================================================================

(A 16-bit RGB PNG's tRNS key cannot match Pillow's 8-bit pixels, so such an image reads as opaque.)

Compositing: out = round((c * a + background * (255 - a)) / 255) per channel, alpha a in 0..255. An animated
PNG (APNG of more than one frame) is refused; a single-frame APNG is a PNG. An MPO (a JPEG with more images
appended, as some cameras write; Pillow names its format "MPO") is decoded as the JPEG it starts with.

`resize_for` gives a decoded image at every expert input size, once each: what the ingress ships instead of
the image.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterable

import numpy as np
from PIL import Image, ImageOps

from expertmesh.errors import ExpertMeshError, InvalidArgument, PayloadTooLarge
from expertmesh.experts.spec import ImageLimits

ACCEPTED_FORMATS = ("PNG", "JPEG")
#: Formats Pillow names for a file that is a JPEG: MPO is a JPEG with more images appended after it.
_JPEG_FORMATS = ("JPEG", "MPO")
_SOS = b"\xff\xda"  # JPEG start-of-scan marker
_ORIENTATION = 0x0112  # EXIF tag
_SIXTEEN_BIT_GREY = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def decode_image(data: bytes, limits: ImageLimits, field: str = "image") -> Image.Image:
    """Decode PNG/JPEG bytes into an 8-bit RGB image (EXIF-oriented, alpha composited onto
    `limits.alpha_background`), or raise a clear error naming `field`. See the module docstring for the order
    of the checks and what each mode becomes."""
    if not data:
        raise InvalidArgument("image is empty (0 bytes)", field=field, fix="send the PNG or JPEG bytes of the component image")
    if len(data) > limits.max_bytes:
        raise PayloadTooLarge(f"image is {len(data)} bytes, over the limit of {limits.max_bytes}", field=field,
                              fix="send a smaller crop, or raise image.max_bytes in the spec")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # reads the header only
            fmt = "JPEG" if img.format in _JPEG_FORMATS else img.format
            if fmt not in ACCEPTED_FORMATS:
                raise InvalidArgument(f"image format {img.format!r} is not accepted", field=field,
                                      fix=f"encode the image as one of {list(ACCEPTED_FORMATS)}")
            _check_size(*_oriented_size(img), limits, field)
            if fmt == "PNG" and (getattr(img, "is_animated", False) or getattr(img, "n_frames", 1) > 1):
                raise InvalidArgument(f"image is an animated PNG of {img.n_frames} frames", field=field,
                                      fix="send a single still frame as PNG or JPEG")
            if fmt == "JPEG":
                _check_scans(data, limits, field)
            img.load()
            ImageOps.exif_transpose(img, in_place=True)
            return _to_rgb(img, limits.alpha_background)
    except ExpertMeshError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise PayloadTooLarge(f"image declares more pixels than the decoder's safety limit ({exc})", field=field,
                              fix=f"send a smaller crop: at most image.max_pixels = {limits.max_pixels} pixels") from None
    except Exception as exc:  # noqa: BLE001 - whatever a decoder raises on hostile bytes is the client's bad input
        raise InvalidArgument(f"image bytes could not be decoded ({type(exc).__name__})", field=field,
                              fix="send a complete, valid PNG or JPEG file") from None


def _oriented_size(img: Image.Image) -> tuple[int, int]:
    """Width and height after EXIF orientation, read without decoding pixels: a JPEG's EXIF is in its header, a
    PNG's only when its eXIf chunk comes before the image data (else the stored size: the checks are the same)."""
    w, h = img.size
    if img.format == "PNG" and "exif" not in img.info:
        return w, h
    return (h, w) if img.getexif().get(_ORIENTATION) in (5, 6, 7, 8) else (w, h)


def _check_size(w: int, h: int, limits: ImageLimits, field: str) -> None:
    if w * h > limits.max_pixels:
        raise PayloadTooLarge(f"image is {w}x{h} = {w * h} pixels, over the limit of {limits.max_pixels}", field=field,
                              fix="send a smaller crop, or raise image.max_pixels in the spec")
    if min(w, h) < limits.min_side_px or max(w, h) > limits.max_side_px:
        raise InvalidArgument(f"image is {w}x{h} px; each side must be {limits.min_side_px}..{limits.max_side_px} px",
                              field=field, fix="send a crop of the single component at a supported size")
    if max(w, h) / min(w, h) > limits.max_aspect_ratio:
        raise InvalidArgument(f"image is {w}x{h} px, aspect ratio {max(w, h) / min(w, h):.2f} over {limits.max_aspect_ratio}",
                              field=field, fix="send a near-square crop centred on one component")


def _check_scans(data: bytes, limits: ImageLimits, field: str) -> None:
    """Each scan of a progressive JPEG is another pass over the whole image. Entropy-coded data byte-stuffs 0xFF,
    so an SOS marker's bytes only appear as markers; the count is high only by an embedded thumbnail's scans."""
    scans = data.count(_SOS)
    if scans > limits.max_jpeg_scans:
        raise InvalidArgument(f"JPEG has {scans} scans, over the limit of {limits.max_jpeg_scans}", field=field,
                              fix="re-encode the image as a baseline (non-progressive) JPEG or as PNG")


def _to_rgb(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Any mode Pillow gives a PNG or JPEG -> 8-bit RGB, alpha composited onto `background` (the module table)."""
    transparency = img.info.get("transparency")
    if img.mode in _SIXTEEN_BIT_GREY:
        raw = np.asarray(img).astype(np.int64)  # I;16B arrives big-endian: astype gives native values
        grey = ((np.clip(raw, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)  # round(v / 257)
        rgb = np.repeat(grey[:, :, None], 3, axis=2)
        if isinstance(transparency, int):
            alpha = np.where(raw == transparency, 0, 255).astype(np.uint8)
            return Image.fromarray(_composite(rgb, alpha, background))
        return Image.fromarray(rgb)
    if img.mode in ("RGBA", "LA", "PA") or transparency is not None:
        rgba = np.asarray(img.convert("RGBA"))
        return Image.fromarray(_composite(rgba[:, :, :3], rgba[:, :, 3], background))
    return img.convert("RGB")  # a copy when already RGB: the result holds no file or frames


def _composite(rgb: np.ndarray, alpha: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """uint8 [h, w, 3] over `background` by uint8 [h, w] alpha: round((c*a + bg*(255-a)) / 255)."""
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha.astype(np.uint32)[:, :, None]
    bg = np.asarray(background, dtype=np.uint32)
    return ((rgb.astype(np.uint32) * a + bg * (255 - a) + 127) // 255).astype(np.uint8)


def resize_to(img: Image.Image | np.ndarray, size_px: int) -> np.ndarray:
    """One RGB image at an expert's input size: uint8 [size, size, 3] (bilinear; a no-op at that size already)."""
    if isinstance(img, np.ndarray):
        if img.shape[:2] == (size_px, size_px):
            return img
        img = Image.fromarray(img)
    if img.size != (size_px, size_px):
        img = img.resize((size_px, size_px), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def resize_for(img: Image.Image, sizes_px: Iterable[int]) -> dict[int, np.ndarray]:
    """A decoded image at every input size the experts need, each resized once from the original - the very pixels
    `to_pixel_values` would give each expert, in a few KB instead of the full image."""
    return {size: resize_to(img, size) for size in sorted(set(sizes_px))}


def encode_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
