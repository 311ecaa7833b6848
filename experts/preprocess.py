"""Decoded images -> model input tensors. Shared by training, the offline evaluator and the expert hosts.

Training and serving must preprocess identically, so both call `to_pixel_values` (decoding and resizing are
`experts.images`', which needs no torch: the ingress and the station use it without importing torch).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from expertmesh.experts.image_processing import ImageProcessing
from expertmesh.experts.images import resize_to

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


def to_pixel_values(images: list[Image.Image] | np.ndarray, size_px: int,
                    processing: ImageProcessing | None = None) -> torch.Tensor:
    """RGB images (PIL, or uint8 arrays [N, H, W, 3]) -> normalised float tensor [N, 3, size, size].

    `processing`: a brought checkpoint's own settings (its preprocessor_config.json: resize, centre crop, rescale,
    normalise), applied to each image as it arrives; None: today's resize to the input size and mean/std 0.5."""
    if processing is not None:
        shaped = [resize_to(a, size_px) for a in (processing.geometry(img) for img in images)]  # no-op at the size
        return torch.from_numpy(processing.to_float(np.stack(shaped)))
    if isinstance(images, np.ndarray) and images.ndim == 4 and images.shape[1:3] == (size_px, size_px):
        stacked = images  # already at the input size (the ingress resized it): no copy through PIL
    else:
        stacked = np.stack([resize_to(img, size_px) for img in images])
    batch = torch.from_numpy(np.ascontiguousarray(stacked)).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (batch - mean) / std
