"""A brought checkpoint's own preprocessing, read from its `preprocessor_config.json` (no image-processor class is
imported, so any family's settings work without its extra dependencies; torch is not imported either).

Honoured: `do_resize` with `size` as {shortest_edge} (aspect kept, bilinear) or {height, width} (exact) or an int;
`do_center_crop` with `crop_size`; `do_rescale` with `rescale_factor`; `do_normalize` with `image_mean`/`image_std`.
The processed size (the crop, else the resize) must be the expert's `input_size_px`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

PREPROCESSOR_FILE = "preprocessor_config.json"


@dataclass(frozen=True)
class ImageProcessing:
    resize: tuple[int, int] | None = None  # (height, width), exact
    shortest_edge: int | None = None  # resize so the shorter side is this, keeping the aspect ratio
    crop: tuple[int, int] | None = None  # (height, width), centred
    rescale_factor: float | None = 1 / 255
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of a processed square image; None when it follows the input (no resize, no crop)."""
        if self.crop is not None:
            return self.crop
        if self.resize is not None:
            return self.resize
        if self.shortest_edge is not None:
            return self.shortest_edge, self.shortest_edge
        return None

    def geometry(self, img: Image.Image | np.ndarray) -> np.ndarray:
        """Resize and centre-crop one RGB image: uint8 [H, W, 3]."""
        pil = Image.fromarray(img) if isinstance(img, np.ndarray) else img.convert("RGB")
        w, h = pil.size
        if self.resize is not None:
            target = (self.resize[1], self.resize[0])
        elif self.shortest_edge is not None:
            s = self.shortest_edge
            target = (s, max(1, round(h * s / w))) if w <= h else (max(1, round(w * s / h)), s)
        else:
            target = (w, h)
        if target != (w, h):
            pil = pil.resize(target, Image.BILINEAR)
        arr = np.asarray(pil, dtype=np.uint8)
        if self.crop is not None:
            ch, cw = self.crop
            h, w = arr.shape[:2]
            if ch > h or cw > w:  # as the HF processors do: pad with zeros to the crop size
                padded = np.zeros((max(ch, h), max(cw, w), 3), np.uint8)
                top, left = (padded.shape[0] - h) // 2, (padded.shape[1] - w) // 2
                padded[top:top + h, left:left + w] = arr
                arr, (h, w) = padded, padded.shape[:2]
            top, left = (h - ch) // 2, (w - cw) // 2
            arr = arr[top:top + ch, left:left + cw]
        return np.ascontiguousarray(arr)

    def to_float(self, stacked: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, 3] -> float32 [N, 3, H, W], rescaled and normalised."""
        x = stacked.astype(np.float32).transpose(0, 3, 1, 2)
        if self.rescale_factor is not None:
            x *= np.float32(self.rescale_factor)
        if self.mean is not None:
            x -= np.asarray(self.mean, np.float32).reshape(1, -1, 1, 1)
            x /= np.asarray(self.std, np.float32).reshape(1, -1, 1, 1)
        return np.ascontiguousarray(x)


def _hw(value, field: str) -> tuple[int, int] | int:
    if isinstance(value, int):
        return value, value
    if isinstance(value, dict):
        if "height" in value and "width" in value:
            return int(value["height"]), int(value["width"])
        if "shortest_edge" in value and field == "size":
            return int(value["shortest_edge"])  # an int: the shortest edge
    raise ValueError(f"{field} {value!r} is not understood; give an int, {{height, width}} or {{shortest_edge}}")


def parse_processing(cfg: dict) -> ImageProcessing:
    """The settings of a preprocessor_config.json mapping; ValueError names what is not understood."""
    resize = shortest = crop = None
    if cfg.get("do_resize", True) and cfg.get("size") is not None:
        size = cfg["size"]
        if isinstance(size, dict) and "shortest_edge" in size:
            shortest = int(size["shortest_edge"])
        else:
            resize = _hw(size, "size")
    if cfg.get("do_center_crop", False) and cfg.get("crop_size") is not None:
        crop = _hw(cfg["crop_size"], "crop_size")
    factor = float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else None
    mean = std = None
    if cfg.get("do_normalize", True) and cfg.get("image_mean") is not None:
        mean = tuple(float(v) for v in np.atleast_1d(cfg["image_mean"]))
        std = tuple(float(v) for v in np.atleast_1d(cfg.get("image_std", [1.0, 1.0, 1.0])))
        if len(mean) == 1:
            mean = mean * 3
        if len(std) == 1:
            std = std * 3
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"image_mean {list(mean)} / image_std {list(std)} need 3 values (RGB)")
    return ImageProcessing(resize=resize, shortest_edge=shortest, crop=crop, rescale_factor=factor, mean=mean, std=std)


def read_processing(checkpoint_dir: str | Path) -> ImageProcessing | None:
    """The checkpoint's preprocessing, or None when it has no preprocessor_config.json (today's preprocessing)."""
    path = Path(checkpoint_dir) / PREPROCESSOR_FILE
    if not path.is_file():
        return None
    return parse_processing(json.loads(path.read_text()))
