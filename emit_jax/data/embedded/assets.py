"""The packaged pill assets (``emit_jax/data/embedded_assets/pill``): the real MVTec AD pill
images with their silhouettes, and the EMIT authors' description of each."""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources

import numpy as np
from PIL import Image

from emit_jax.data.embedded.catalogue import IMAGE_SIZE
from emit_jax.data.embedded.raster import _dilate, _erode, _fill_holes, _luminance

_ASSET_PACKAGE = "emit_jax.data"
_ASSET_DIR = "embedded_assets"


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
