"""Image preprocessing as DeepSeek-VL does it: pad to square with the mean colour, resize, values in [0, 1].

The towers normalise internally (SAM with CLIP mean/std, SigLIP with 0.5/0.5), so the tensor handed to the
model is the padded, resized image in [0, 1]. Resizing runs on uint8 tensors with torch (antialiased bilinear),
which is several times faster than PIL upscaling to 1024.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def load_image(path: str | Path) -> torch.Tensor:
    """(3, H, W) uint8 RGB."""
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def pad_to_square(img: torch.Tensor, fill: tuple[int, int, int]) -> torch.Tensor:
    """Centre ``img`` (3, H, W) on a square canvas of colour ``fill``."""
    _, h, w = img.shape
    side = max(h, w)
    if h == w:
        return img
    canvas = torch.tensor(fill, dtype=img.dtype).view(3, 1, 1).expand(3, side, side).clone()
    top, left = (side - h) // 2, (side - w) // 2
    canvas[:, top:top + h, left:left + w] = img
    return canvas


def preprocess_image(img: torch.Tensor, size: int, mean: list[float]) -> torch.Tensor:
    """uint8 (3, H, W) -> float32 (3, size, size) in [0, 1]."""
    fill = tuple(int(m * 255) for m in mean)
    img = pad_to_square(img, fill)
    if img.shape[-1] != size:
        img = F.interpolate(img.unsqueeze(0), size=(size, size), mode="bilinear", align_corners=False,
                            antialias=True).squeeze(0)
    return img.float().div_(255.0)
