"""Image loading and the per-tile tensor transform (EMIT_SPEC 3.2, evaluation path)."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


class ImageError(ValueError):
    """An image file that cannot be used; the message names the file."""


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open ``path`` as RGB; a missing, truncated or non-image file raises :class:`ImageError`."""
    path = os.fspath(path)
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ImageError(f"{path}: not a readable image ({e})") from None


def to_tile(image: Image.Image, size: int) -> np.ndarray:
    """Whole image squashed to ``size`` x ``size`` (PIL bicubic), scaled to [0, 1], normalised
    with the ImageNet mean/std -> ``[3, size, size]`` float32 (the CE branch's view, EMIT_SPEC 3.3)."""
    im = image.convert("RGB")
    if im.size != (size, size):
        im = im.resize((size, size), Image.BICUBIC)
    x = np.asarray(im, np.float32) / 255.0
    x = (x - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def to_display(tile: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_tile`'s normalisation -> ``[H, W, 3]`` in [0, 1] for plotting."""
    x = tile.transpose(1, 2, 0) * IMAGENET_STD + IMAGENET_MEAN
    return np.clip(x, 0.0, 1.0)
