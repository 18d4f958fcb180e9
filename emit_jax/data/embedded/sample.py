"""One image of the dataset: the object of its class with, for a defect folder, that defect
painted in the grid cell its index picks; a pure function of its seed and position."""

from __future__ import annotations

import dataclasses

import numpy as np

from emit_jax.data.embedded.catalogue import CLASS_DEFECTS, CLASSES, GRID_CELLS
from emit_jax.data.embedded.defects import _paint_defect
from emit_jax.data.embedded.objects import _draw_object
from emit_jax.data.embedded.raster import grid_cells
from emit_jax.data.embedded.seeding import _rng


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
    location: str | None  # the grid cell with the most defect pixels (docs/reference/emit.md 9.5)
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
