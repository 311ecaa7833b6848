"""Image bytes -> validated RGB images -> the sizes the experts take. No torch (the ingress and stations use it).

Decoding validates the bytes against the spec's `ImageLimits` and fails with `InvalidArgument` /
`PayloadTooLarge` naming the field and the fix; it never lets a decoder exception escape. `resize_for`
gives a decoded image at every expert input size, once each: what the ingress ships instead of the image.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterable

import numpy as np
from PIL import Image, UnidentifiedImageError

from expertmesh.errors import InvalidArgument, PayloadTooLarge
from expertmesh.experts.spec import ImageLimits

ACCEPTED_FORMATS = ("PNG", "JPEG")


def decode_image(data: bytes, limits: ImageLimits, field: str = "image") -> Image.Image:
    """Decode PNG/JPEG bytes into an RGB image, or raise a clear error naming `field`."""
    if not data:
        raise InvalidArgument("image is empty (0 bytes)", field=field, fix="send the PNG or JPEG bytes of the component image")
    if len(data) > limits.max_bytes:
        raise PayloadTooLarge(f"image is {len(data)} bytes, over the limit of {limits.max_bytes}", field=field,
                              fix="send a smaller crop, or raise image.max_bytes in the spec")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt = img.format
            if fmt not in ACCEPTED_FORMATS:
                raise InvalidArgument(f"image format {fmt!r} is not accepted", field=field,
                                      fix=f"encode the image as one of {list(ACCEPTED_FORMATS)}")
            w, h = img.size
            _check_size(w, h, limits, field)
            img.load()
    except InvalidArgument:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombWarning,
            Image.DecompressionBombError) as exc:
        raise InvalidArgument(f"image bytes could not be decoded ({type(exc).__name__})", field=field,
                              fix="send a complete, valid PNG or JPEG file") from None
    return img.convert("RGB")


def _check_size(w: int, h: int, limits: ImageLimits, field: str) -> None:
    if min(w, h) < limits.min_side_px or max(w, h) > limits.max_side_px:
        raise InvalidArgument(f"image is {w}x{h} px; each side must be {limits.min_side_px}..{limits.max_side_px} px",
                              field=field, fix="send a crop of the single component at a supported size")
    if max(w, h) / min(w, h) > limits.max_aspect_ratio:
        raise InvalidArgument(f"image is {w}x{h} px, aspect ratio {max(w, h) / min(w, h):.2f} over {limits.max_aspect_ratio}",
                              field=field, fix="send a near-square crop centred on one component")


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
