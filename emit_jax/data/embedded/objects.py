"""The normal objects: a drawer per class (signed-distance shapes with per-image jitter, or a
jittered packaged pill image) returning a :class:`Scene`."""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from emit_jax.data.embedded.assets import _pill_bases, _PillBase
from emit_jax.data.embedded.catalogue import IMAGE_SIZE
from emit_jax.data.embedded.raster import (
    _jitter, _pixel_grid, _textured, _to_uint8, _upsampled_noise,
)
from emit_jax.data.embedded.seeding import _rng


@dataclasses.dataclass
class Scene:
    """A rendered normal object: ``image`` and ``background`` ``[H, W, 3]`` uint8 (the scene
    without the object, used by ``missing_piece``), ``silhouette`` ``[H, W]`` bool."""

    image: np.ndarray
    background: np.ndarray
    silhouette: np.ndarray
    base: str | None = None  # pill: the asset stem the image was made from


def _frame(rng: np.random.Generator, *, shift: float, angle_deg: float,
           scale: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Object coordinates ``(u, v)`` of every pixel under a random shift, rotation and scale,
    and the scale (multiply a local distance by it to get pixels)."""
    y, x = _pixel_grid()
    cx = IMAGE_SIZE / 2 + rng.uniform(-shift, shift)
    cy = IMAGE_SIZE / 2 + rng.uniform(-shift, shift)
    th = math.radians(rng.uniform(-angle_deg, angle_deg))
    s = 1.0 + rng.uniform(-scale, scale)
    dx, dy = x - cx, y - cy
    u = (math.cos(th) * dx + math.sin(th) * dy) / s
    v = (-math.sin(th) * dx + math.cos(th) * dy) / s
    return u, v, s


def _coverage(d: np.ndarray, s: float) -> np.ndarray:
    """Anti-aliased coverage of a signed distance (negative inside), about one pixel wide."""
    return np.clip(0.5 - d * s, 0.0, 1.0)


def _sdf_box(u: np.ndarray, v: np.ndarray, hu: float | np.ndarray,
             hv: float | np.ndarray) -> np.ndarray:
    qu, qv = np.abs(u) - hu, np.abs(v) - hv
    outside = np.hypot(np.maximum(qu, 0), np.maximum(qv, 0))
    return outside + np.minimum(np.maximum(qu, qv), 0)


def _sdf_hexagon(u: np.ndarray, v: np.ndarray, inradius: float) -> np.ndarray:
    kx, ky, kz = -0.866025404, 0.5, 0.577350269
    pu, pv = np.abs(u), np.abs(v)
    dot = np.minimum(kx * pu + ky * pv, 0.0)
    pu, pv = pu - 2 * dot * kx, pv - 2 * dot * ky
    pu = pu - np.clip(pu, -kz * inradius, kz * inradius)
    pv = pv - inradius
    return np.hypot(pu, pv) * np.sign(pv)


def _compose(background: np.ndarray, colour: np.ndarray, alpha: np.ndarray,
             base: str | None = None) -> Scene:
    a = alpha[..., None]
    image = background * (1 - a) + colour * a
    return Scene(image=_to_uint8(image), background=_to_uint8(background),
                 silhouette=alpha >= 0.5, base=base)


def _draw_screw(rng: np.random.Generator) -> Scene:
    bg = _textured(rng, (214, 214, 210), jitter=5, smooth=3, grain=1.0)
    u, v, s = _frame(rng, shift=14, angle_deg=180, scale=0.05)
    tri = np.abs((u / 8.0) % 1.0 - 0.5) * 2.0  # thread profile, 0..1
    d_head = _sdf_box(u + 86, v, 12, 33) - 4
    in_shaft = (u > -74) & (u < 72)
    d_shaft = np.maximum(np.abs(u + 1) - 73, np.abs(v) - (16 + 2.5 * tri))
    tip_hw = np.maximum(16 * (1 - (u - 72) / 28), 0)
    d_tip = np.maximum(np.maximum(72 - u, u - 100), np.abs(v) - tip_hw)
    d = np.minimum(np.minimum(d_head, d_shaft), d_tip)
    steel = _jitter(rng, (150, 150, 156), 10)
    hw = np.where(u < -74, 34.0, 18.0)
    shade = (0.7 + 0.45 * np.clip(1 - (v / hw) ** 2, 0, 1)
             + 0.35 * np.exp(-((v + hw * 0.3) / 4) ** 2))  # cylinder shading + highlight
    shade = shade - np.where(in_shaft, 0.22 * tri, 0.0)
    grain = rng.normal(0, 1.2, u.shape)
    colour = steel[None, None, :] * shade[..., None] + grain[..., None]
    return _compose(bg, colour, _coverage(d, s))


def _draw_nut(rng: np.random.Generator) -> Scene:
    bg = _textured(rng, (40, 42, 48), jitter=4, smooth=3, grain=1.0)
    u, v, s = _frame(rng, shift=14, angle_deg=180, scale=0.04)
    r = np.hypot(u, v)
    ang = np.arctan2(v, u)
    d_hex = _sdf_hexagon(u, v, 78)
    d = np.maximum(d_hex, 34 - r)
    metal = _jitter(rng, (178, 175, 166), 10)
    shade = 1.0 + 0.06 * np.sin(3 * ang + rng.uniform(0, 2 * np.pi))
    shade += np.where(-d_hex < 8, 0.15, 0.0)  # chamfer catches light
    thread = (r - 34 < 8)
    shade -= np.where(thread, 0.25 + 0.06 * np.sin(26 * ang), 0.0)
    grain = rng.normal(0, 1.2, u.shape)
    colour = metal[None, None, :] * shade[..., None] + grain[..., None]
    return _compose(bg, colour, _coverage(d, s))


def _draw_capsule(rng: np.random.Generator) -> Scene:
    bg = _textured(rng, (204, 208, 214), jitter=4, smooth=3, grain=1.0)
    u, v, s = _frame(rng, shift=10, angle_deg=5, scale=0.03)
    d = np.hypot(np.maximum(np.abs(u) - 82, 0), v) - 36
    red = _jitter(rng, (158, 36, 42), 8)
    ivory = _jitter(rng, (228, 219, 198), 6)
    colour = np.where((u < 0)[..., None], red[None, None, :], ivory[None, None, :])
    shade = 0.72 + 0.32 * np.sqrt(np.clip(1 - (v / 36) ** 2, 0, 1))
    shade -= np.where(np.abs(u) < 2.0, 0.18, 0.0)  # seam
    highlight = 38 * np.exp(-((v + 15) / 5) ** 2) * (np.abs(u) < 100)
    grain = rng.normal(0, 1.2, u.shape)
    colour = colour * shade[..., None] + (highlight + grain)[..., None]
    return _compose(bg, colour, _coverage(d, s))


def _draw_tile(rng: np.random.Generator) -> Scene:
    base = _textured(rng, (176, 170, 158), jitter=8, smooth=5, grain=2.0)
    canvas = Image.fromarray(_to_uint8(base))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(260, 340))):
        x, y = rng.uniform(0, IMAGE_SIZE, 2)
        r = rng.uniform(0.8, 2.4)
        dark = rng.random() < 0.6
        c = rng.uniform(-8, 8)
        fill = tuple(int(t + c) for t in ((104, 98, 92) if dark else (214, 208, 196)))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    image = np.asarray(canvas)
    grout = _to_uint8(_textured(rng, (70, 68, 66), jitter=3, smooth=2, grain=1.0))
    return Scene(image=image, background=grout,
                 silhouette=np.ones((IMAGE_SIZE, IMAGE_SIZE), bool))


def _draw_cable(rng: np.random.Generator) -> Scene:
    bg = _textured(rng, (232, 232, 227), jitter=4, smooth=3, grain=1.0)
    u, v, s = _frame(rng, shift=8, angle_deg=12, scale=0.03)
    r = np.hypot(u, v)
    d = r - 104
    sheath = _jitter(rng, (98, 100, 103), 8)
    colour = np.broadcast_to(sheath, u.shape + (3,)).copy()
    colour *= np.where(r > 96, 0.82, 1.0)[..., None]
    wires = ((64, 140, 72), (52, 82, 172), (122, 82, 50))  # green, blue, brown, clockwise
    copper = _jitter(rng, (198, 130, 66), 8)
    for k, rgb in enumerate(wires):
        a = math.radians(-90 + 120 * k)
        wu, wv = u - 50 * math.cos(a), v - 50 * math.sin(a)
        wr = np.hypot(wu, wv)
        ins = _jitter(rng, rgb, 8)
        ins_shade = 1.05 - 0.25 * np.clip(wr / 36, 0, 1) ** 2
        colour = np.where((wr < 36)[..., None], ins * ins_shade[..., None], colour)
        strand_r = np.full(u.shape, np.inf, np.float32)
        for j in range(7):
            a_j = j * math.pi / 3
            cu, cv = (0.0, 0.0) if j == 0 else (14 * math.cos(a_j), 14 * math.sin(a_j))
            strand_r = np.minimum(strand_r, np.hypot(wu - cu, wv - cv))
        core = (wr < 22)[..., None]
        strand = copper * (1.1 - 0.45 * np.clip(strand_r / 7, 0, 1.4) ** 2)[..., None]
        colour = np.where(core, strand, colour)
    colour = colour + rng.normal(0, 1.2, u.shape)[..., None]
    return _compose(bg, colour, _coverage(d, s))


def _draw_washer(rng: np.random.Generator) -> Scene:
    bg = _textured(rng, (52, 58, 74), jitter=4, smooth=3, grain=1.0)
    u, v, s = _frame(rng, shift=14, angle_deg=180, scale=0.04)
    r = np.hypot(u, v)
    ang = np.arctan2(v, u)
    d = np.maximum(r - 92, 42 - r)
    metal = _jitter(rng, (170, 170, 175), 10)
    shade = 1.0 + 0.09 * np.sin(2 * ang + rng.uniform(0, 2 * np.pi)) + 0.03 * np.sin(r * 1.7)
    shade -= np.where((r - 42 < 4) | (92 - r < 4), 0.2, 0.0)  # bevels
    grain = rng.normal(0, 1.2, u.shape)
    colour = metal[None, None, :] * shade[..., None] + grain[..., None]
    return _compose(bg, colour, _coverage(d, s))


def _pill_base_order(seed: int) -> tuple[list[int], list[int]]:
    """Disjoint base images for ``train`` and ``test`` (10 / 7 of 17), in a seeded order."""
    n = len(_pill_bases())
    perm = [int(i) for i in _rng(seed, "pill", "bases").permutation(n)]
    n_train = max(1, (n * 10) // 17)
    return perm[:n_train], perm[n_train:]


def _draw_pill(rng: np.random.Generator, base: _PillBase) -> Scene:
    angle = float(rng.uniform(-4, 4))
    dx, dy = (int(t) for t in rng.integers(-8, 9, 2))
    fill = tuple(int(round(c)) for c in base.bg_mean)
    im = Image.fromarray(base.image).rotate(angle, resample=Image.BICUBIC, translate=(dx, dy),
                                            fillcolor=fill)
    sil = Image.fromarray(base.silhouette.astype(np.uint8) * 255).rotate(
        angle, resample=Image.BILINEAR, translate=(dx, dy), fillcolor=0)
    gain = rng.uniform(0.94, 1.06) * rng.uniform(0.985, 1.015, 3)
    image = np.asarray(im, np.float32) * gain[None, None, :].astype(np.float32)
    noise = _upsampled_noise(rng, 9, 1.5) + rng.normal(0, max(base.bg_std, 1.0), image.shape[:2])
    background = base.bg_mean[None, None, :] * gain[None, None, :] + noise[..., None]
    return Scene(image=_to_uint8(image), background=_to_uint8(background),
                 silhouette=np.asarray(sil) >= 128, base=base.stem)


_DRAWERS: dict[str, Callable[[np.random.Generator], Scene]] = {
    "screw": _draw_screw, "nut": _draw_nut, "capsule": _draw_capsule, "tile": _draw_tile,
    "cable": _draw_cable, "washer": _draw_washer,
}


def _draw_object(cls: str, rng: np.random.Generator, seed: int, split: str) -> Scene:
    if cls == "pill":
        train_bases, test_bases = _pill_base_order(seed)
        pool = train_bases if split == "train" else test_bases
        return _draw_pill(rng, _pill_bases()[pool[int(rng.integers(len(pool)))]])
    return _DRAWERS[cls](rng)
