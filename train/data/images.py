"""Images: decode with Pillow, resize (aspect kept) to a patch budget, cut into patches.

A patch is `p*p*3` uint8 values in (row, column, channel) order; patches are in raster order. The
loader turns them into floats in [-1, 1] when it builds a batch (uint8 keeps the worker -> trainer
transfer four times smaller).
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from train.data.config import ImageConfig

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# Pillow sniffs the format from the bytes, whatever the member's name: without this list a `.png` member
# could be opened as any of its ~40 formats (EPS even runs Ghostscript on it).
FORMATS = ("JPEG", "PNG", "WEBP")


def fit_grid(width: int, height: int, cfg: ImageConfig) -> tuple[int, int]:
    """(rows, cols) of patches for an image: its own resolution rounded to whole patches, scaled down
    (aspect kept) when that would exceed cfg.max_patches; never upscaled beyond rounding."""
    p = cfg.patch_size
    scale = min(1.0, math.sqrt(cfg.max_patches * p * p / (width * height)))
    rows, cols = max(1, round(height * scale / p)), max(1, round(width * scale / p))
    while rows * cols > cfg.max_patches:  # aspect ratios beyond the budget: shrink the long side
        if rows >= cols:
            rows -= 1
        else:
            cols -= 1
    return rows, cols


def decode_image(data: bytes, cfg: ImageConfig) -> tuple[np.ndarray, tuple[int, int]]:
    """Encoded image bytes -> (patches uint8 [rows*cols, p*p*3], (rows, cols)).

    Raises on a corrupt or truncated image, another format than FORMATS, or one past Pillow's
    decompression-bomb limit (`Image.MAX_IMAGE_PIXELS` x 2); the caller skips the sample."""
    p = cfg.patch_size
    with Image.open(io.BytesIO(data), formats=FORMATS) as im:
        rows, cols = fit_grid(im.width, im.height, cfg)  # from the header: nothing decoded yet
        im.draft("RGB", (cols * p, rows * p))  # JPEG: decode at a reduced scale when that suffices
        im.load()  # decode fully now: a truncated file fails here, not later
        im = im.convert("RGB")
        if (cols * p, rows * p) != im.size:
            im = im.resize((cols * p, rows * p), Image.BICUBIC)
        pixels = np.asarray(im, dtype=np.uint8)  # [rows*p, cols*p, 3]
    patches = pixels.reshape(rows, p, cols, p, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, p * p * 3)
    return np.ascontiguousarray(patches), (rows, cols)


def unpatchify(patches: np.ndarray, grid: tuple[int, int], patch_size: int) -> np.ndarray:
    """Inverse of the patch cut: [rows*cols, p*p*3] -> [rows*p, cols*p, 3]."""
    rows, cols = grid
    p = patch_size
    return patches.reshape(rows, cols, p, p, 3).transpose(0, 2, 1, 3, 4).reshape(rows * p, cols * p, 3)
