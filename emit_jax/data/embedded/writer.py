"""Writing the dataset: every image, mask and description in the MVTec AD layout, the fixed
splits, the domain knowledge, the notes and (last) the manifest."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
from PIL import Image

from emit_jax.data.embedded.catalogue import (
    CLASS_DEFECTS, CLASSES, DATASET_NAME, DEFECTS, GENERATOR_VERSION, IMAGE_SIZE, N_PER_DEFECT,
    N_TEST_GOOD, N_TRAIN_GOOD,
)
from emit_jax.data.embedded.notes import _license_notes, _readme
from emit_jax.data.embedded.sample import render_sample
from emit_jax.data.embedded.seeding import _check_seed, _rng
from emit_jax.data.embedded.text import description, domain_knowledge

_TOP_FILES = ("domain_knowledge.json", "splits.json", "manifest.json", "README.md",
              "LICENSE_NOTES.md")


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
