"""The defects: a painter per defect type, each changing a region of a :class:`Scene`, and the
placement that centres a defect in a grid cell and keeps its mask exact (the changed pixels,
inside the silhouette)."""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np
from PIL import ImageDraw

from emit_jax.data.embedded.catalogue import (
    CONTAMINANTS, MAX_DEFECT_TRIES, MIN_DEFECT_PIXELS, STAIN_TINTS,
)
from emit_jax.data.embedded.objects import Scene
from emit_jax.data.embedded.raster import (
    _cell_mask, _erode, _luminance, _mask_from_drawing, _pixel_grid, _to_uint8,
)


@dataclasses.dataclass
class _Paint:
    region: np.ndarray  # [H, W] bool, the pixels to change
    values: np.ndarray  # [H, W, 3] float32, their new colours (used only inside region)
    word: str = ""  # a colour word for descriptions ("brown", "reddish"), if any


def _farthest(palette: tuple[tuple[str, tuple[int, int, int]], ...], ref: np.ndarray,
              rng: np.random.Generator) -> tuple[str, np.ndarray]:
    """A palette entry far from ``ref``: a random one of the two farthest."""
    dist = [float(np.linalg.norm(np.asarray(c, np.float32) - ref)) for _, c in palette]
    order = np.argsort(dist)[::-1]
    name, rgb = palette[int(order[int(rng.integers(2))])]
    return name, np.asarray(rgb, np.float32)


def _polygon(rng: np.random.Generator, cx: float, cy: float, r: float, n: int,
             wobble: float) -> list[tuple[float, float]]:
    phase = rng.uniform(0, 2 * np.pi)
    pts = []
    for k in range(n):
        a = phase + 2 * np.pi * k / n
        rr = r * rng.uniform(1 - wobble, 1 + wobble)
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def _scratch(rng: np.random.Generator, scene: Scene, img: np.ndarray, cy: float,
             cx: float) -> _Paint:
    """A thin curved line (quadratic Bezier, 3-4 px wide), darker on light objects."""
    length = rng.uniform(55, 110)
    a = rng.uniform(0, np.pi)
    du, dv = math.cos(a), math.sin(a)
    bend = rng.uniform(-18, 18)
    width = int(rng.integers(3, 5))
    pts = []
    for t in np.linspace(-0.5, 0.5, 24):
        off = bend * (1 - 4 * t * t)
        pts.append((cx + du * length * t - dv * off, cy + dv * length * t + du * off))
    region = _mask_from_drawing(lambda d: d.line(pts, fill=255, width=width, joint="curve"))
    lum = float(_luminance(img[scene.silhouette]).mean())
    target = 60.0 if lum > 120 else 225.0
    values = img * 0.25 + target * 0.75 + rng.normal(0, 4, img.shape[:2])[..., None]
    return _Paint(region, values, "darker" if target < 128 else "brighter")


def _walk(rng: np.random.Generator, x: float, y: float, steps: int,
          heading: float) -> list[tuple[float, float]]:
    """A polyline of ``steps`` 10-18 px segments whose heading drifts randomly."""
    pts = [(x, y)]
    for _ in range(steps):
        heading += rng.uniform(-0.8, 0.8)
        step = rng.uniform(10, 18)
        x, y = x + step * math.cos(heading), y + step * math.sin(heading)
        pts.append((x, y))
    return pts


def _crack(rng: np.random.Generator, scene: Scene, img: np.ndarray, cy: float,
           cx: float) -> _Paint:
    """A dark jagged polyline through the centre (random walk both ways) plus a side branch."""
    heading = rng.uniform(0, 2 * np.pi)
    fwd = _walk(rng, cx, cy, int(rng.integers(3, 6)), heading)
    back = _walk(rng, cx, cy, int(rng.integers(3, 6)), heading + np.pi)
    main = back[::-1] + fwd[1:]
    width = int(rng.integers(3, 5))
    j = int(rng.integers(1, len(main) - 1))
    branch = _walk(rng, *main[j], int(rng.integers(2, 4)), heading + rng.choice([-1.2, 1.2]))

    def draw(d: ImageDraw.ImageDraw) -> None:
        d.line(main, fill=255, width=width, joint="curve")
        d.line(branch, fill=255, width=max(2, width - 1), joint="curve")

    region = _mask_from_drawing(draw)
    values = img * 0.2 + 10 + rng.normal(0, 3, img.shape[:2])[..., None]
    return _Paint(region, values)


def _hole(rng: np.random.Generator, scene: Scene, img: np.ndarray, cy: float,
          cx: float) -> _Paint:
    """A dark ellipse, darkest in its middle."""
    y, x = _pixel_grid()
    a, b = rng.uniform(11, 18), rng.uniform(9, 15)
    th = rng.uniform(0, np.pi)
    du, dv = (x - cx), (y - cy)
    pu = (math.cos(th) * du + math.sin(th) * dv) / a
    pv = (-math.sin(th) * du + math.cos(th) * dv) / b
    rr = np.sqrt(pu ** 2 + pv ** 2)
    region = rr <= 1.0
    depth = (14 + 48 * rr ** 2)[..., None]
    values = depth + 0.12 * img + rng.normal(0, 2, img.shape[:2])[..., None]
    return _Paint(region, values)


def _contamination(rng: np.random.Generator, scene: Scene, img: np.ndarray, cy: float,
                   cx: float) -> _Paint:
    """A blob of overlapping irregular polygons in a foreign colour with coarse grain."""
    blobs = [(cx, cy, rng.uniform(8, 13))]
    for _ in range(int(rng.integers(2, 6))):
        blobs.append((cx + rng.uniform(-14, 14), cy + rng.uniform(-14, 14), rng.uniform(5, 11)))

    def draw(d: ImageDraw.ImageDraw) -> None:
        for bx, by, r in blobs:
            d.polygon(_polygon(rng, bx, by, r, 10, 0.3), fill=255)

    region = _mask_from_drawing(draw)
    ref = img[scene.silhouette].mean(0)
    name, rgb = _farthest(CONTAMINANTS, ref, rng)
    values = rgb[None, None, :] + rng.normal(0, 14, img.shape).astype(np.float32)
    return _Paint(region, values, name)


def _color_stain(rng: np.random.Generator, scene: Scene, img: np.ndarray, cy: float,
                 cx: float) -> _Paint:
    """A translucent rounded patch tinting the surface with a foreign colour."""
    r = rng.uniform(15, 26)
    pts = _polygon(rng, cx, cy, r, 16, 0.15)
    region = _mask_from_drawing(lambda d: d.polygon(pts, fill=255))
    ref = img[scene.silhouette].mean(0)
    name, tint = _farthest(STAIN_TINTS, ref, rng)
    alpha = rng.uniform(0.42, 0.58) + rng.normal(0, 0.03, img.shape[:2])
    alpha = np.clip(alpha, 0.3, 0.7)[..., None]
    values = img * (1 - alpha) + tint[None, None, :] * alpha
    return _Paint(region, values, name)


def _missing_piece(rng: np.random.Generator, scene: Scene, img: np.ndarray, cy: float,
                   cx: float) -> _Paint:
    """An irregular chunk around an edge point, replaced by the background."""
    pts = _polygon(rng, cx, cy, rng.uniform(17, 28), 12, 0.3)
    region = _mask_from_drawing(lambda d: d.polygon(pts, fill=255))
    return _Paint(region, scene.background.astype(np.float32))


_PAINTERS: dict[str, Callable[..., _Paint]] = {
    "scratch": _scratch, "crack": _crack, "hole": _hole, "contamination": _contamination,
    "color_stain": _color_stain, "missing_piece": _missing_piece,
}


def _centre_candidates(scene: Scene, defect: str) -> np.ndarray:
    """Where a defect may be centred: the object's edge for ``missing_piece``, else its interior."""
    sil = scene.silhouette
    if defect == "missing_piece":
        return sil & ~_erode(sil, 1)
    inner = _erode(sil, 8)
    return inner if inner.any() else sil


def _apply(scene: Scene, paint: _Paint) -> tuple[np.ndarray, np.ndarray]:
    """Paint inside ``region ∩ silhouette``; returns ``(image, mask)`` where ``mask`` is exactly
    the set of changed pixels (a pixel the paint left equal is nudged so that it does change)."""
    region = paint.region & scene.silhouette
    out = scene.image.copy()
    new = _to_uint8(paint.values[region])
    same = np.all(new == scene.image[region], axis=-1)
    if same.any():
        old = scene.image[region][same].astype(np.int16)
        nudge = np.where(old.mean(-1, keepdims=True) > 127, -24, 24)
        new[same] = np.clip(old + nudge, 0, 255).astype(np.uint8)
    out[region] = new
    return out, region


def _paint_defect(rng: np.random.Generator, scene: Scene, defect: str,
                  cell: str) -> tuple[np.ndarray, np.ndarray, str]:
    """Paint ``defect`` centred in ``cell`` when the object reaches it (else anywhere on it);
    retried until the mask has at least :data:`MIN_DEFECT_PIXELS` pixels."""
    allowed = _centre_candidates(scene, defect)
    in_cell = allowed & _cell_mask(cell)
    points = np.argwhere(in_cell if in_cell.any() else allowed)
    img = scene.image.astype(np.float32)
    for _ in range(MAX_DEFECT_TRIES):
        cy, cx = points[int(rng.integers(len(points)))] + 0.5
        paint = _PAINTERS[defect](rng, scene, img, float(cy), float(cx))
        image, mask = _apply(scene, paint)
        if int(mask.sum()) >= MIN_DEFECT_PIXELS:
            return image, mask, paint.word
    raise RuntimeError(f"could not place a {defect} of {MIN_DEFECT_PIXELS}+ pixels")
