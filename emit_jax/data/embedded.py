"""The embedded default dataset: a small, deterministic, MVTec-AD-style anomaly-detection set.

The project's default training job needs data that exists without any download. This module
writes one, from a seed, in exactly the MVTec AD layout (MMAD_SPEC 10.1) so the same loaders,
task builders (EMIT_SPEC 9.4, 9.5) and evaluators run on it as on the real datasets::

    OUT/<class>/train/good/NNN.png                 defect-free training images
    OUT/<class>/test/good/NNN.png                  defect-free test images
    OUT/<class>/test/<defect>/NNN.png              defective test images
    OUT/<class>/ground_truth/<defect>/NNN_mask.png single-channel 8-bit masks, 255 = defect
    OUT/domain_knowledge.json                      {"Embedded": {class: {defect: text, "good": ..}}}
    OUT/descriptions/<class>/<split>_<sub>_NNN.txt an object description per image (text-as-query
                                                   samples, EMIT_SPEC 9.7); <split> is train/test,
                                                   <sub> is good or the defect folder
    OUT/splits.json                                {"train": [..], "validation": [..], "test": [..]}
    OUT/manifest.json, OUT/README.md, OUT/LICENSE_NOTES.md

Classes (all 256x256 RGB):

- ``pill``: the 17 real MVTec AD pill images shipped in ``emit_jax/data/embedded_assets/pill``
  (CC BY-NC-SA 4.0, credit MVTec Software GmbH), jittered per image (shift, rotation, exposure).
- ``screw``, ``nut``, ``capsule``, ``tile``, ``cable``, ``washer``: drawn procedurally with numpy
  signed-distance functions (anti-aliased), on a lightly textured background, with per-image
  shifts, rotations, scale, colour jitter and grain, so no two normal images are equal.

Defects (:data:`DEFECTS`) are painted onto the object with exact masks: ``scratch`` (thin curve),
``crack`` (jagged polyline), ``hole`` (dark ellipse), ``contamination`` (blob of a foreign colour
and grain), ``color_stain`` (translucent tint) and ``missing_piece`` (a chunk at the object's edge
replaced by background). The mask is the set of pixels the defect changed, no more and no less,
and it always lies inside the object's silhouette. Defect centres cycle through the nine cells of
the 3x3 grid of EMIT_SPEC 9.5 (a seeded order per class and defect), so localisation answers vary.

Every image is drawn from its own random stream, seeded by ``(seed, class, split, folder,
index)``; the same seed gives byte-identical files, a different seed different images. The
splits are fixed: ``train`` = all of ``train/good`` plus half of every ``test/<folder>`` (the
model must see anomalies to learn); ``validation`` and ``test`` a quarter each, so every split
holds normal images and every defect type of every class.

API: :func:`generate` writes the dataset and returns its manifest; :func:`ensure_cached` builds
it once into a cache directory (atomically) and returns the path. CLI::

    python -m emit_jax.data.embedded --out DIR [--seed 0] [--overwrite]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.resources
import json
import math
import os
import shutil
import sys
import tempfile
import time
import zlib
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

GENERATOR_VERSION = "2"
DATASET_NAME = "Embedded"
IMAGE_SIZE = 224  # the tiny architecture's tile
N_TRAIN_GOOD = 12
N_TEST_GOOD = 12
N_PER_DEFECT = 8
MIN_DEFECT_PIXELS = 250
MAX_DEFECT_TRIES = 200

DEFECTS = ("scratch", "crack", "hole", "contamination", "color_stain", "missing_piece")

#: Defect folders per class (order = folder order in the manifest and domain knowledge).
CLASS_DEFECTS: dict[str, tuple[str, ...]] = {
    "pill": ("crack", "contamination", "color_stain", "scratch", "missing_piece"),
    "screw": ("scratch", "missing_piece", "contamination"),
    "nut": ("scratch", "hole", "color_stain", "missing_piece"),
    "capsule": ("crack", "hole", "color_stain", "scratch"),
    "tile": ("crack", "hole", "contamination", "color_stain"),
    "cable": ("crack", "contamination", "color_stain", "missing_piece"),
    "washer": ("scratch", "crack", "hole", "missing_piece"),
}
CLASSES = tuple(CLASS_DEFECTS)

#: The 3x3 grid cells in EMIT_SPEC 9.5's order, and how descriptions name them.
GRID_CELLS = ("top left", "top", "top right", "left", "center", "right",
              "bottom left", "bottom", "bottom right")
LOCATION_PHRASE = {"top left": "upper left", "top": "top center", "top right": "upper right",
                   "left": "left", "center": "center", "right": "right",
                   "bottom left": "lower left", "bottom": "bottom center",
                   "bottom right": "lower right"}

#: Foreign colours (name, RGB) for contamination and stains; the one farthest from the object wins.
CONTAMINANTS = (("brown", (92, 58, 30)), ("black", (30, 30, 32)), ("greenish", (70, 115, 45)),
                ("yellowish", (205, 185, 70)), ("bluish", (55, 75, 150)))
STAIN_TINTS = (("reddish", (205, 50, 40)), ("amber", (215, 150, 30)), ("bluish", (50, 90, 210)),
               ("brownish", (120, 70, 30)), ("greenish", (60, 160, 60)))

_ASSET_PACKAGE = "emit_jax.data"
_ASSET_DIR = "embedded_assets"
_TOP_FILES = ("domain_knowledge.json", "splits.json", "manifest.json", "README.md",
              "LICENSE_NOTES.md")


# ----------------------------------------------------------------------------------------------
# Per-class facts used for domain knowledge and descriptions
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ClassInfo:
    """Words describing a normal object of a class (templates fill them in)."""

    noun: str
    appearance: str  # "... appears to be {appearance}."
    surface: str
    colour: str
    background: str
    outline: str
    tone: str  # "light" or "dark": which way scratches contrast
    checks: str  # what looks right on a normal one


CLASS_INFO: dict[str, ClassInfo] = {
    "pill": ClassInfo(
        noun="pill",
        appearance=('an oval-shaped pill with a smooth surface, predominantly white with small red '
                    'specks, and the capital letters "FF" embossed in its center'),
        surface="smooth, matte white coating", colour="white with red specks",
        background="a dark, almost black background", outline="a clean, unbroken oval",
        tone="light",
        checks='the oval outline is complete, the "FF" imprint is clear and the red speckles are '
               'evenly spread over a uniform white surface'),
    "screw": ClassInfo(
        noun="screw",
        appearance="a steel screw seen from the side, with a flat head, a threaded shaft and a "
                    "pointed tip, lying at an arbitrary angle",
        surface="grey, metallic, cylindrically shaded surface", colour="metallic grey",
        background="a plain light grey background", outline="a straight head-shaft-tip profile",
        tone="light",
        checks="the head, the regular thread and the pointed tip are all present and the metal "
               "has an even grey sheen"),
    "nut": ClassInfo(
        noun="nut",
        appearance="a hexagonal metal nut seen from above, with a round threaded hole in its "
                    "middle and bevelled outer corners",
        surface="brushed silver-grey metal face", colour="silver-grey",
        background="a dark grey background", outline="a regular hexagon with a round hole",
        tone="light",
        checks="all six sides and corners are intact, the central hole is round and the metal "
               "face shows only its fine brushed pattern"),
    "capsule": ClassInfo(
        noun="capsule",
        appearance="an elongated two-piece capsule lying roughly horizontally, its left half "
                    "dark red and its right half ivory, joined at a thin seam",
        surface="glossy gelatin shell with a soft highlight along its length",
        colour="dark red and ivory", background="a light grey-blue background",
        outline="a smooth, rounded stadium shape", tone="light",
        checks="both halves have uniform colour, the seam is straight and the rounded ends are "
               "complete"),
    "tile": ClassInfo(
        noun="tile",
        appearance="a close-up of a beige-grey ceramic tile surface that fills the whole image, "
                    "sprinkled with small darker and lighter specks",
        surface="finely speckled ceramic surface", colour="beige-grey with speckles",
        background="the tile surface itself", outline="a continuous surface", tone="light",
        checks="the speckle pattern is evenly distributed and the surface is continuous with no "
               "lines, pits or patches"),
    "cable": ClassInfo(
        noun="cable",
        appearance="the cross-section of a round cable: a grey sheath holding three insulated "
                    "wires, green, blue and brown in clockwise order, each with a stranded "
                    "copper core",
        surface="grey sheath filler and coloured wire insulation", colour="grey, green, blue, "
                "brown and copper", background="a plain off-white background",
        outline="a full circle", tone="light",
        checks="the sheath is a complete circle and the three wires have clean insulation and "
               "shiny copper strands"),
    "washer": ClassInfo(
        noun="washer",
        appearance="a flat round metal washer seen from above: a ring with a central hole, "
                    "showing fine concentric brushing marks",
        surface="brushed metallic ring face", colour="metallic grey",
        background="a dark blue-grey background", outline="two clean concentric circles",
        tone="light",
        checks="the inner and outer edges are clean circles and the metal shows only its "
               "concentric brushing"),
}


# ----------------------------------------------------------------------------------------------
# Randomness
# ----------------------------------------------------------------------------------------------

def _key(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


def _rng(seed: int, *keys: str | int) -> np.random.Generator:
    """A random stream for ``keys`` under ``seed``; independent of Python's hash seed."""
    entropy = [int(seed)] + [k if isinstance(k, int) else _key(k) for k in keys]
    return np.random.default_rng(np.random.SeedSequence(entropy))


# ----------------------------------------------------------------------------------------------
# Small image helpers
# ----------------------------------------------------------------------------------------------

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
    """Cells of the 3x3 grid holding defect pixels, largest count first (EMIT_SPEC 9.5)."""
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


# ----------------------------------------------------------------------------------------------
# Objects
# ----------------------------------------------------------------------------------------------

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


@dataclasses.dataclass(frozen=True)
class _PillBase:
    stem: str
    image: np.ndarray  # [H, W, 3] uint8
    silhouette: np.ndarray  # [H, W] bool
    bg_mean: np.ndarray  # [3] float32
    bg_std: float


def _asset_root():
    return importlib.resources.files(_ASSET_PACKAGE).joinpath(_ASSET_DIR)


@functools.lru_cache(maxsize=1)
def _pill_bases() -> tuple[_PillBase, ...]:
    """The packaged pill images with their silhouettes (bright pill on a dark background)."""
    folder = _asset_root().joinpath("pill")
    stems = sorted(p.name[:-4] for p in folder.iterdir() if p.name.endswith(".png"))
    if not stems:
        raise FileNotFoundError(f"no pill images in the package ({folder}); reinstall emit_jax")
    bases = []
    for stem in stems:
        with folder.joinpath(f"{stem}.png").open("rb") as f, Image.open(f) as im:
            rgb = np.asarray(im.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.LANCZOS))
        bright = _luminance(rgb.astype(np.float32)) > 90
        sil = _dilate(_erode(_fill_holes(bright), 2), 2)
        bgpix = rgb[~_dilate(sil, 6)].astype(np.float32)
        bases.append(_PillBase(stem, rgb, sil, bgpix.mean(0), float(_luminance(bgpix).std())))
    return tuple(bases)


def _pill_description(stem: str) -> str:
    path = _asset_root().joinpath("pill", f"{stem}.txt")
    return path.read_text(encoding="utf-8").strip()


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


# ----------------------------------------------------------------------------------------------
# Defects
# ----------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------
# One sample
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Sample:
    """One image of the dataset. ``sub`` is ``good`` or a defect; ``clean`` is the image before
    the defect was painted (equal to ``image`` for good ones); ``mask`` is ``None`` for good."""

    cls: str
    split: str  # "train" | "test" (the MVTec folder)
    sub: str
    index: int
    image: np.ndarray
    clean: np.ndarray
    silhouette: np.ndarray
    mask: np.ndarray | None
    location: str | None  # the grid cell with the most defect pixels (EMIT_SPEC 9.5)
    word: str
    base: str | None


def _cell_order(seed: int, cls: str, defect: str) -> list[str]:
    return [GRID_CELLS[int(i)] for i in _rng(seed, cls, defect, "cells").permutation(9)]


def render_sample(cls: str, split: str, sub: str, index: int, seed: int = 0) -> Sample:
    """Draw image ``index`` of ``<cls>/<split>/<sub>``; a pure function of its arguments."""
    if cls not in CLASS_DEFECTS:
        raise ValueError(f"unknown class {cls!r}; expected one of {CLASSES}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test' (the MVTec folder), got {split!r}")
    if sub != "good" and (split != "test" or sub not in CLASS_DEFECTS[cls]):
        raise ValueError(f"{cls}/{split}/{sub}: no such folder")
    rng = _rng(seed, cls, split, sub, index)
    scene = _draw_object(cls, rng, seed, split)
    if sub == "good":
        return Sample(cls, split, sub, index, scene.image, scene.image, scene.silhouette,
                      None, None, "", scene.base)
    cell = _cell_order(seed, cls, sub)[index % 9]
    image, mask, word = _paint_defect(rng, scene, sub, cell)
    location = grid_cells(mask)[0][0]
    return Sample(cls, split, sub, index, image, scene.image, scene.silhouette, mask,
                  location, word, scene.base)


# ----------------------------------------------------------------------------------------------
# Texts
# ----------------------------------------------------------------------------------------------

def _defect_title(defect: str) -> str:
    return defect.replace("_", " ").title()


def _defect_knowledge(cls: str, defect: str) -> str:
    info = CLASS_INFO[cls]
    contrast = "darker" if info.tone == "light" else "brighter"
    text = {
        "scratch": (f'A "scratch" on the "{cls}" appears as a thin, smooth line or gentle curve, '
                    f"a few pixels wide and many times longer than it is wide, drawn across the "
                    f"{info.surface}. It is clearly {contrast} than the surrounding material, "
                    f"stays on the object and does not follow any edge or pattern of a normal "
                    f"{info.noun}."),
        "crack": (f'A "crack" on the "{cls}" is a dark, jagged line made of short straight '
                  f"segments that change direction, often with a side branch. It is much darker "
                  f"than the {info.colour} material and splits the otherwise continuous "
                  f"{info.surface}."),
        "hole": (f'A "hole" in the "{cls}" is a small, roughly elliptical, very dark spot with a '
                 f"sharp border, about 20 to 35 pixels across, that darkens towards its middle as "
                 f"if the material were pierced. A normal {info.noun} has no dark pits on its "
                 f"{info.surface}."),
        "contamination": (f'"Contamination" on the "{cls}" is a compact, irregular blob of foreign '
                          f"material (brown, black, greenish, yellowish or bluish) with a grainy "
                          f"texture. Its colour does not belong to the {info.colour} {info.noun} "
                          f"and it covers the surface beneath it completely."),
        "color_stain": (f'A "color stain" on the "{cls}" is a rounded, translucent patch where '
                        f"the {info.colour} surface takes on a foreign tint (reddish, amber, "
                        f"bluish, brownish or greenish). The texture underneath stays visible "
                        f"through the tint, and the patch has a soft, smooth boundary."),
        "missing_piece": (f'A "missing piece" of the "{cls}" is a chunk broken away from its '
                          f"edge: the outline is no longer {info.outline}, and "
                          f"{info.background} shows through where material should be. The "
                          f"break has an irregular, roughly rounded border."),
    }[defect]
    return f"<{_defect_title(defect)} Defect>\n Description: {text}"


def _normal_knowledge(cls: str) -> str:
    info = CLASS_INFO[cls]
    text = (f'A standard "{cls}" is {info.appearance}. Its {info.surface} looks uniform '
            f"({info.colour}) and it lies on {info.background}. On a normal {info.noun} "
            f"{info.checks}. Small changes in position, rotation, exposure and fine grain between "
            f"images are normal and are not defects.")
    return f"<Normal Characteristics>\n Description: {text}"


def domain_knowledge() -> dict[str, dict[str, dict[str, str]]]:
    """``{"Embedded": {class: {defect: text, ..., "good": text}}}`` in the released EMIT format."""
    out: dict[str, dict[str, str]] = {}
    for cls, defects in CLASS_DEFECTS.items():
        entries = {d: _defect_knowledge(cls, d) for d in defects}
        entries["good"] = _normal_knowledge(cls)
        out[cls] = entries
    return {DATASET_NAME: out}


def _defect_sentence(sample: Sample) -> str:
    info = CLASS_INFO[sample.cls]
    where = LOCATION_PHRASE[sample.location or "center"]
    phrase = {
        "scratch": f"a thin, {sample.word} scratch running across the {info.surface}",
        "crack": "a dark, jagged crack with a short side branch",
        "hole": "a small, dark, elliptical hole that looks as if the material were pierced",
        "contamination": f"a grainy blob of {sample.word} foreign material stuck to the surface",
        "color_stain": f"a translucent {sample.word} stain discolouring the surface",
        "missing_piece": (f"a missing piece: a chunk of the {info.noun}'s edge is broken away "
                          f"and the background shows through"),
    }[sample.sub]
    return f"Upon closer inspection, there is {phrase}, located in the {where} part of the image."


def description(sample: Sample, rng: np.random.Generator) -> str:
    """An object description paragraph for ``sample`` (a text-as-query sample, EMIT_SPEC 9.7)."""
    info = CLASS_INFO[sample.cls]
    if sample.sub == "good" and sample.base is not None:
        return _pill_description(sample.base)
    opening = rng.choice(["The object in the image appears to be",
                          "The image shows what appears to be",
                          "The object in the query image appears to be"])
    first = f"{opening} {info.appearance}."
    if sample.sub == "good":
        return (f"{first} Upon inspecting the {info.noun} for defects or anomalies, I do not "
                f"observe any deviations from the expected appearance: {info.checks}. There are "
                f"no visible scratches, cracks, holes, foreign particles, stains or missing "
                f"parts.\n\nIn summary, the {info.noun} in the image matches the normal pattern "
                f"of this object type and shows no defects or anomalies.")
    where = LOCATION_PHRASE[sample.location or "center"]
    name = sample.sub.replace("_", " ")
    return (f"{first} {_defect_sentence(sample)} This area deviates from the normal pattern of "
            f"the object, in which {info.checks}. Apart from this region the {info.noun} looks "
            f"normal.\n\nIn summary, the {info.noun} in the image is defective: it shows a "
            f"{name} defect in the {where} region.")


# ----------------------------------------------------------------------------------------------
# Writing the dataset
# ----------------------------------------------------------------------------------------------

def _folders(cls: str) -> list[tuple[str, str, int]]:
    """``(split, sub, count)`` for every image folder of a class."""
    out = [("train", "good", N_TRAIN_GOOD), ("test", "good", N_TEST_GOOD)]
    out += [("test", d, N_PER_DEFECT) for d in CLASS_DEFECTS[cls]]
    return out


def _eval_split(index: int) -> str:
    """Indices 0, 1 (mod 4) of every ``test/<sub>`` folder -> ``train`` (training needs
    anomalies), 2 -> ``validation``, 3 -> ``test``."""
    return ("train", "train", "validation", "test")[index % 4]


def _save_png(array: np.ndarray, path: str) -> None:
    Image.fromarray(array).save(path, format="PNG", compress_level=3)


def _clear_outputs(out_dir: str) -> None:
    """Remove only what :func:`generate` writes (class folders, descriptions, top-level files)."""
    for name in list(CLASSES) + ["descriptions"]:
        path = os.path.join(out_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
    for name in _TOP_FILES:
        path = os.path.join(out_dir, name)
        if os.path.isfile(path):
            os.remove(path)


def _write_class(out_dir: str, cls: str, seed: int, splits: dict[str, list[str]]) -> dict:
    counts: dict[str, int] = {}
    per_split: dict[str, dict[str, int]] = {"train": {}, "validation": {}, "test": {}}
    desc_dir = os.path.join(out_dir, "descriptions", cls)
    os.makedirs(desc_dir, exist_ok=True)
    for split, sub, n in _folders(cls):
        img_dir = os.path.join(out_dir, cls, split, sub)
        os.makedirs(img_dir, exist_ok=True)
        if sub != "good":
            os.makedirs(os.path.join(out_dir, cls, "ground_truth", sub), exist_ok=True)
        for i in range(n):
            s = render_sample(cls, split, sub, i, seed)
            name = f"{i:03d}"
            _save_png(s.image, os.path.join(img_dir, f"{name}.png"))
            if s.mask is not None:
                _save_png(s.mask.astype(np.uint8) * 255,
                          os.path.join(out_dir, cls, "ground_truth", sub, f"{name}_mask.png"))
            text = description(s, _rng(seed, cls, split, sub, i, "description"))
            with open(os.path.join(desc_dir, f"{split}_{sub}_{name}.txt"), "w",
                      encoding="utf-8", newline="\n") as f:
                f.write(text + "\n")
            which = "train" if split == "train" else _eval_split(i)
            splits[which].append(f"{cls}/{split}/{sub}/{name}.png")
            per_split[which][sub] = per_split[which].get(sub, 0) + 1
        counts[f"{split}/{sub}"] = n
    return {"defects": list(CLASS_DEFECTS[cls]), "folders": counts, "splits": per_split}


def _write_json(path: str, data: object) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


def _readme(manifest: dict) -> str:
    rows = []
    for cls, info in manifest["classes"].items():
        f = info["folders"]
        defects = ", ".join(f"{d} ({f['test/' + d]})" for d in info["defects"])
        rows.append(f"| {cls} | {f['train/good']} | {f['test/good']} | {defects} |")
    t = manifest["totals"]
    return "\n".join([
        "# Embedded anomaly-detection dataset (emit_jax)",
        "",
        f"Generated by `emit_jax.data.embedded` (generator version {manifest['version']}, "
        f"seed {manifest['seed']}). Regenerate with",
        "",
        f"    python -m emit_jax.data.embedded --out DIR --seed {manifest['seed']}",
        "",
        "Same seed and version give byte-identical files. Layout is MVTec AD's: "
        "`<class>/train/good`, `<class>/test/<good|defect>`, `<class>/ground_truth/<defect>/"
        "NNN_mask.png` (8-bit, 255 = defect; exactly the pixels the painted defect changed). "
        f"All images are {IMAGE_SIZE}x{IMAGE_SIZE} RGB PNG.",
        "",
        "| class | train/good | test/good | test defects (count) |",
        "| --- | --- | --- | --- |",
        *rows,
        "",
        f"Totals: {t['images']} images, {t['masks']} masks, {t['descriptions']} descriptions; "
        f"splits train {t['train']}, validation {t['validation']}, test {t['test']}.",
        "",
        "- `splits.json`: fixed splits. train = every `train/good` image; validation / test = "
        "odd / even indices of every `test/<folder>`, so both contain normal images and every "
        "defect type of every class.",
        "- `domain_knowledge.json`: `{\"Embedded\": {class: {defect: text, \"good\": text}}}` in "
        "the format of EMIT's released domain knowledge (texts written from templates, not GPT).",
        "- `descriptions/<class>/<split>_<folder>_NNN.txt`: an object description per image, "
        "usable as a text-as-query sample (EMIT_SPEC 9.7). Normal pill images reuse the EMIT "
        "authors' description of the real pill image they were made from; all other texts are "
        "templates naming the object, the defect and its 3x3-grid location.",
        "- `manifest.json`: seed, version and counts per class, folder and split.",
        "",
        "The `pill` class is built from real MVTec AD images (CC BY-NC-SA 4.0, see "
        "LICENSE_NOTES.md) with painted defects; every other class is drawn procedurally.",
        "",
    ])


def _license_notes(manifest: dict) -> str:
    return "\n".join([
        "# Licence and provenance",
        "",
        f"Dataset generated by `emit_jax.data.embedded`, generator version {manifest['version']}, "
        f"seed {manifest['seed']}.",
        "",
        "## pill",
        "",
        "Built from 17 defect-free pill images of the MVTec Anomaly Detection dataset (MVTec AD), "
        "downscaled to 256x256 and shipped in `emit_jax/data/embedded_assets/pill/`. Each image "
        "here is one of them with a small random shift, rotation and exposure change; defects "
        "are painted on by the generator (they are not MVTec AD defect images).",
        "",
        "- Licence: Creative Commons Attribution-NonCommercial-ShareAlike 4.0 International "
        "(CC BY-NC-SA 4.0), https://creativecommons.org/licenses/by-nc-sa/4.0/ . Research and "
        "other non-commercial use only; share derivatives under the same licence.",
        "- Credit: MVTec Software GmbH (https://www.mvtec.com/company/research/datasets/mvtec-ad); "
        "P. Bergmann et al., \"The MVTec Anomaly Detection Dataset\", IJCV 2021 / CVPR 2019.",
        "- The normal-pill descriptions are the EMIT authors' released object descriptions.",
        "",
        "## screw, nut, capsule, tile, cable, washer",
        "",
        "Generated procedurally (numpy/PIL drawing from the seed); no third-party image data. "
        "Their images, masks and texts are covered by the emit_jax project's licence.",
        "",
        "Because the pill class is CC BY-NC-SA 4.0, redistribute the dataset as a whole only "
        "under those terms.",
        "",
    ])


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def generate(out_dir: str | os.PathLike, seed: int = 0, *, overwrite: bool = False) -> dict:
    """Write the embedded dataset for ``seed`` into ``out_dir``; returns the manifest.

    ``out_dir`` must be missing or empty unless ``overwrite`` is true, in which case only the
    files and folders this generator writes are replaced (anything else there is left alone).
    Raises :class:`FileExistsError` for a non-empty ``out_dir`` without ``overwrite``.
    """
    seed = _check_seed(seed)
    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise NotADirectoryError(f"{out_dir}: exists and is not a directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        if not overwrite:
            raise FileExistsError(f"{out_dir}: directory is not empty (use overwrite)")
        _clear_outputs(out_dir)
    os.makedirs(out_dir, exist_ok=True)

    splits: dict[str, list[str]] = {"train": [], "validation": [], "test": []}
    classes = {cls: _write_class(out_dir, cls, seed, splits) for cls in CLASSES}
    n_images = sum(sum(c["folders"].values()) for c in classes.values())
    n_masks = sum(n for c in classes.values() for k, n in c["folders"].items() if k != "train/good"
                  and k != "test/good")
    manifest = {
        "name": "emit_jax embedded anomaly-detection dataset",
        "dataset": DATASET_NAME,
        "version": GENERATOR_VERSION,
        "seed": seed,
        "image_size": [IMAGE_SIZE, IMAGE_SIZE],
        "layout": "MVTec AD",
        "defect_types": list(DEFECTS),
        "classes": classes,
        "totals": {"images": n_images, "masks": n_masks, "descriptions": n_images,
                   **{k: len(v) for k, v in splits.items()}},
    }
    _write_json(os.path.join(out_dir, "splits.json"), splits)
    _write_json(os.path.join(out_dir, "domain_knowledge.json"), domain_knowledge())
    _write_text(os.path.join(out_dir, "README.md"), _readme(manifest))
    _write_text(os.path.join(out_dir, "LICENSE_NOTES.md"), _license_notes(manifest))
    _write_json(os.path.join(out_dir, "manifest.json"), manifest)  # last: marks completion
    return manifest


def cache_path(cache_dir: str | os.PathLike | None = None, seed: int = 0) -> str:
    """Where :func:`ensure_cached` keeps the dataset: ``<root>/embedded-v<version>-seed<seed>``
    with ``root`` = ``cache_dir``, else ``$EMIT_JAX_CACHE``, else ``~/.cache/emit_jax``."""
    root = cache_dir if cache_dir is not None else os.environ.get("EMIT_JAX_CACHE")
    if not root:
        root = os.path.join(os.path.expanduser("~"), ".cache", "emit_jax")
    return os.path.join(os.fspath(root), f"embedded-v{GENERATOR_VERSION}-seed{_check_seed(seed)}")


def _manifest_matches(path: str, seed: int) -> bool:
    try:
        with open(os.path.join(path, "manifest.json"), encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(m, dict) and m.get("version") == GENERATOR_VERSION and m.get("seed") == seed


def ensure_cached(cache_dir: str | os.PathLike | None = None, seed: int = 0) -> str:
    """Path of the dataset for ``seed`` in the cache (see :func:`cache_path`); built on first use.

    The build goes into a temporary sibling directory that is then renamed into place
    (``os.replace``), so a reader never sees a half-written dataset and concurrent builders agree.
    An existing folder at the target without a matching manifest is replaced.
    """
    seed = _check_seed(seed)
    target = cache_path(cache_dir, seed)
    if _manifest_matches(target, seed):
        return target
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(target) + ".tmp-", dir=parent)
    try:
        generate(tmp, seed, overwrite=True)
        if os.path.isdir(target) and not _manifest_matches(target, seed):
            stale = tempfile.mkdtemp(prefix=os.path.basename(target) + ".stale-", dir=parent)
            os.replace(target, os.path.join(stale, "old"))
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            if not _manifest_matches(target, seed):  # not a concurrent builder that won the race
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _tree_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m emit_jax.data.embedded --out DIR [--seed 0] [--overwrite]``."""
    parser = argparse.ArgumentParser(
        prog="python -m emit_jax.data.embedded",
        description="Write the embedded MVTec-AD-style anomaly-detection dataset.")
    parser.add_argument("--out", required=True, help="output directory (missing or empty)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the generator's files in a non-empty --out")
    args = parser.parse_args(argv)
    if args.seed < 0:
        parser.error("--seed must be >= 0")
    t0 = time.perf_counter()
    try:
        manifest = generate(args.out, args.seed, overwrite=args.overwrite)
    except (FileExistsError, NotADirectoryError) as e:
        msg = str(e).replace("(use overwrite)", "(pass --overwrite)")
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    t = manifest["totals"]
    print(f"wrote {t['images']} images ({t['masks']} masks, {len(manifest['classes'])} classes; "
          f"train {t['train']}, validation {t['validation']}, test {t['test']}) to {args.out} "
          f"in {time.perf_counter() - t0:.1f}s, {_tree_bytes(args.out) / 1e6:.1f} MB "
          f"(seed {manifest['seed']}, generator v{manifest['version']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
