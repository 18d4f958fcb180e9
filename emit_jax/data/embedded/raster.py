"""Small image helpers on ``IMAGE_SIZE`` x ``IMAGE_SIZE`` rasters (numpy / PIL): pixel grid,
binary morphology, smooth noise and textured colour fields, masks from PIL drawings, and the
3x3 grid of docs/reference/emit.md 9.5."""

from __future__ import annotations

import functools
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from emit_jax.data.embedded.catalogue import GRID_CELLS, IMAGE_SIZE


@functools.lru_cache(maxsize=1)
def _pixel_grid() -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(y, x)``, each ``[H, W]`` float32."""
    y, x = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) + 0.5
    return y, x


def _erode(mask: np.ndarray, steps: int) -> np.ndarray:
    """Binary erosion by a 4-neighbour cross, ``steps`` times (outside the image counts as 0)."""
    out = mask.copy()
    for _ in range(steps):
        e = out.copy()
        e[1:] &= out[:-1]
        e[:-1] &= out[1:]
        e[:, 1:] &= out[:, :-1]
        e[:, :-1] &= out[:, 1:]
        e[0, :] = e[-1, :] = False
        e[:, 0] = e[:, -1] = False
        out = e
    return out


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(steps):
        d = out.copy()
        d[1:] |= out[:-1]
        d[:-1] |= out[1:]
        d[:, 1:] |= out[:, :-1]
        d[:, :-1] |= out[:, 1:]
        out = d
    return out


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` plus every 0-region not connected to the image border."""
    free = ~mask
    outside = np.zeros_like(mask)
    outside[0, :], outside[-1, :], outside[:, 0], outside[:, -1] = (
        free[0, :], free[-1, :], free[:, 0], free[:, -1])
    while True:
        grown = _dilate(outside, 4) & free
        if np.array_equal(grown, outside):
            return ~outside
        outside = grown


def _upsampled_noise(rng: np.random.Generator, cells: int, std: float) -> np.ndarray:
    """Smooth low-frequency noise ``[H, W]``: a ``cells`` x ``cells`` grid, bicubic-upsampled."""
    low = rng.normal(0.0, std, (cells, cells)).astype(np.float32)
    up = Image.fromarray(low).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
    return np.asarray(up, np.float32)


def _jitter(rng: np.random.Generator, rgb: tuple[float, float, float], amount: float) -> np.ndarray:
    """``rgb`` with a random brightness offset (+-amount) and a small hue shift (+-amount/4)."""
    offset = rng.uniform(-amount, amount) + rng.uniform(-amount / 4, amount / 4, 3)
    return (np.asarray(rgb, np.float32) + offset).astype(np.float32)


def _textured(rng: np.random.Generator, rgb: tuple[float, float, float], *, jitter: float,
              smooth: float, grain: float) -> np.ndarray:
    """A colour field ``[H, W, 3]`` float32: jittered colour + smooth variation + grey grain."""
    base = _jitter(rng, rgb, jitter)
    field = _upsampled_noise(rng, 9, smooth) + rng.normal(0.0, grain, (IMAGE_SIZE, IMAGE_SIZE))
    return base[None, None, :] + field[..., None].astype(np.float32)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _mask_from_drawing(draw: Callable[[ImageDraw.ImageDraw], None]) -> np.ndarray:
    canvas = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw(ImageDraw.Draw(canvas))
    return np.asarray(canvas) > 0


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def grid_cells(mask: np.ndarray) -> list[tuple[str, int]]:
    """Cells of the 3x3 grid holding defect pixels, largest count first (docs/reference/emit.md 9.5)."""
    h, w = mask.shape[:2]
    rows = (0, h // 3, 2 * h // 3, h)
    cols = (0, w // 3, 2 * w // 3, w)
    counts = []
    for i in range(3):
        for j in range(3):
            n = int(np.count_nonzero(mask[rows[i]:rows[i + 1], cols[j]:cols[j + 1]]))
            if n > 0:
                counts.append((GRID_CELLS[3 * i + j], n))
    return sorted(counts, key=lambda c: -c[1])


def _cell_mask(cell: str) -> np.ndarray:
    i, j = divmod(GRID_CELLS.index(cell), 3)
    h = w = IMAGE_SIZE
    rows = (0, h // 3, 2 * h // 3, h)
    cols = (0, w // 3, 2 * w // 3, w)
    m = np.zeros((h, w), bool)
    m[rows[i]:rows[i + 1], cols[j]:cols[j + 1]] = True
    return m
