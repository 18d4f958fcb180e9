"""Writing the dataset: every image, mask and description in the MVTec AD layout, the fixed
splits, the domain knowledge, the notes and (last) the manifest."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import threading

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
from emit_jax.errors import STOP_SIGNALS, DataError, show_path
from emit_jax.fileio import atomic_folder, output_lock, remove_leftovers, where_written

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

    The dataset is built in a temporary folder beside ``out_dir`` (``.tmp-<name>-*``) and renamed
    into place only when complete: an error or an interrupt (``KeyboardInterrupt``) leaves
    ``out_dir`` as it was and no temporary folder behind.

    ``out_dir`` must be missing or empty unless ``overwrite`` is true; else
    :class:`FileExistsError` (``... directory is not empty (use overwrite)``). ``overwrite``
    takes only a folder an earlier generation wrote (its ``manifest.json``); in it, only the
    files this generation writes are replaced, matched by exact name:
    the top-level files (:data:`_TOP_FILES`) and, in its own folders
    (``<class>/{train,test}/<folder>``, ``<class>/ground_truth/<defect>``,
    ``descriptions/<class>``), the ``NNN.png``, ``NNN_mask.png`` and
    ``<split>_<folder>_NNN.txt`` files it numbers (``000`` up to its count per folder). Every
    other file and folder is the user's and is kept, whatever its name (a ``999.png`` beside the
    generated images included): it is moved into the new dataset (a rename, signals held off)
    just before that replaces the old one. A file where the dataset needs a folder (or the
    reverse) is refused before anything is written, naming it.

    Refused before anything is written (:class:`~emit_jax.errors.DataError`, naming
    ``out_dir``): an empty path; the current directory or a folder that contains it (it would
    be swapped out from under the shell); with ``overwrite``, a folder that looks like a
    training workdir (:func:`_workdir_marker`).
    """
    seed = _check_seed(seed)
    out_dir = os.fspath(out_dir)
    if not out_dir:
        raise DataError("empty path; name the folder to write")
    _check_not_cwd(out_dir)
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise NotADirectoryError(f"{out_dir}: exists and is not a directory")
    target = _target(out_dir)
    keep: list[str] | None = None
    if os.path.isdir(target) and os.listdir(target):
        marker = _workdir_marker(target) or _model_marker(target)  # said first (see below)
        if not overwrite and not marker:
            if not _embedded_manifest(target):  # (twenty-fifth probe DE1: overwrite was advised,
                # then refused for this folder)
                raise FileExistsError(f"{out_dir}: directory is not empty, and not a dataset "
                                      "data.embedded wrote; choose an empty or new folder")
            raise FileExistsError(f"{out_dir}: directory is not empty (use overwrite)")
        if marker:
            what = "a model folder" if marker in _MODEL_FILES else "a training workdir"
            raise DataError(f"{out_dir}: looks like {what} (it holds {marker}); "
                            "choose a dataset folder")
        if not _embedded_manifest(target):  # a user's own MVTec-style data: MVTec's names
            raise DataError(f"{out_dir}: not a dataset data.embedded wrote (no manifest.json of "
                            f"its own); --overwrite replaces only an earlier embedded dataset's "
                            "files: choose an empty or new folder")
        keep = _user_entries(target, out_dir)
    try:
        # one generator per folder; under the lock, temporaries named for this folder are the
        # leftovers of a run that could not clean up (kill -9, a power cut)
        with output_lock(target, what=f"{show_path(out_dir)}: another data.embedded is writing "
                         "it", hint="wait for it to end, or choose another --out"):
            remove_leftovers(target, out_dir)
            if keep is None:
                with atomic_folder(target, hint="pass overwrite") as tmp:
                    manifest = _write_dataset(tmp, seed)
            else:
                manifest = _replace_dataset(target, seed, keep)
    except OSError as e:
        raise _named(e, target, out_dir) from None
    return manifest


# ------------------------------------------------------------------ what the generator owns
#: what a training workdir holds (emit_jax.training.stages / emit_jax.train): top-level files,
#: and files in its stage folders (emit_jax.training.config.STAGES)
_WORKDIR_FILES = ("results.json", ".lock", "curves.png")
_WORKDIR_STAGES = ("warmup", "base", "sft", "sft2", "grpo")
_WORKDIR_STAGE_FILES = ("settings.json", "done.json", "metrics.jsonl")


def _workdir_marker(root: str) -> str | None:
    """The first entry (relative path) of ``root`` that marks it as a training workdir, or
    None: a dataset must not be written into one."""
    for name in _WORKDIR_FILES:
        if os.path.isfile(os.path.join(root, name)):
            return name
    return _stage_marker(root)


def _stage_marker(root: str) -> str | None:
    """The first stage file of ``root`` (``<stage>/settings.json`` and the like), or None: what
    marks a folder above ``--out`` as a training workdir (a ``.lock`` there may be another
    tool's)."""
    for stage in _WORKDIR_STAGES:
        for name in _WORKDIR_STAGE_FILES:
            if os.path.isfile(os.path.join(root, stage, name)):
                return f"{stage}/{name}"
    return None


#: files that mark a model folder (an emit_jax checkpoint, a Hugging Face export): before, a
#: dataset was written into one with --overwrite
_MODEL_FILES = ("emit_jax.json", "model.safetensors", "model.safetensors.index.json")


def _embedded_manifest(root: str) -> bool:
    """Whether ``root/manifest.json`` is one a generation wrote (its ``dataset`` names the
    embedded dataset): only such a folder may be overwritten. Before, any folder was, its
    ``<class>/train/good/000.png`` and the like replaced: a user's own MVTec-style dataset has
    MVTec's names (the generator's classes are MVTec AD's, numbered as MVTec numbers them), so
    real images were swapped for synthetic ones."""
    try:
        with open(os.path.join(root, "manifest.json"), encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("dataset") == DATASET_NAME


def _target(out_dir: str) -> str:
    """The folder ``out_dir`` names: a link's target; ``LINK/../NAME`` as the kernel reads it
    (:func:`emit_jax.fileio.where_written`)."""
    return os.path.realpath(out_dir) if os.path.islink(out_dir) else where_written(out_dir)


def check_not_inside_a_dataset(out_dir: str) -> None:
    """Refuse ``target`` inside an embedded dataset (a folder above it holds its manifest) or a
    training workdir: before, ``--out DATASET/bottle`` wrote a whole dataset as one more
    "class" of it, and ``--out WORKDIR/x`` wrote 24 MB into a workdir a trainer was using.
    The command line's check (the cache builds its datasets where it chooses)."""
    target = _target(out_dir)
    parent = os.path.dirname(os.path.abspath(target))
    while True:
        if _embedded_manifest(parent):
            raise DataError(f"{out_dir}: inside the embedded dataset {show_path(parent)}; "
                            "choose a folder outside it")
        marker = _stage_marker(parent)  # (a stray .lock or results.json above: no workdir)
        if marker:  # (sixteenth probe U3: written into a workdir a trainer was writing)
            raise DataError(f"{out_dir}: inside the training workdir {show_path(parent)} (it "
                            f"holds {marker}); choose a folder outside it")
        up = os.path.dirname(parent)
        if up == parent:
            return
        parent = up


def _model_marker(root: str) -> str | None:
    """The first of :data:`_MODEL_FILES` in ``root``, or None."""
    return next((n for n in _MODEL_FILES if os.path.isfile(os.path.join(root, n))), None)


def _check_not_cwd(out_dir: str) -> None:
    """Refuse ``out_dir`` when it is the current directory or contains it: replacing it (the
    final rename) would swap the shell's working directory out from under it."""
    try:
        cwd = os.path.realpath(os.getcwd())
    except OSError:  # the working directory is gone: nothing to protect
        return
    target = os.path.realpath(out_dir)
    if cwd == target or cwd.startswith(target.rstrip(os.sep) + os.sep):
        raise DataError(f"{out_dir}: is the current directory (or contains it); run from "
                        "elsewhere or choose another folder")


def _layout(rel: str) -> dict[str, str]:
    """For the folder ``rel`` (relative to the dataset root, ``""`` the root) of the generator's
    layout: the sub-entries a generation writes there, ``{name: "dir" | "file"}`` (exact names:
    ``NNN.png`` up to the folder's count, not any number)."""
    parts = rel.split("/") if rel else []
    if not parts:
        return {**{c: "dir" for c in CLASSES}, "descriptions": "dir",
                **{f: "file" for f in _TOP_FILES}}
    if parts[0] == "descriptions":
        if len(parts) == 1:
            return {c: "dir" for c in CLASSES}
        return {f"{split}_{sub}_{i:03d}.txt": "file"
                for split, sub, n in _folders(parts[1]) for i in range(n)}
    cls = parts[0]
    if len(parts) == 1:
        return {"train": "dir", "test": "dir", "ground_truth": "dir"}
    if len(parts) == 2:
        if parts[1] == "ground_truth":
            return {d: "dir" for d in CLASS_DEFECTS[cls]}
        return {sub: "dir" for split, sub, _ in _folders(cls) if split == parts[1]}
    counts = {(split, sub): n for split, sub, n in _folders(cls)}
    if parts[1] == "ground_truth":
        return {f"{i:03d}_mask.png": "file" for i in range(counts[("test", parts[2])])}
    return {f"{i:03d}.png": "file" for i in range(counts[(parts[1], parts[2])])}


def _scan(root: str, shown: str) -> tuple[list[str], list[str]]:
    """``(generated, user)``: the files under ``root`` (paths relative to it, ``/``-separated)
    that a generation writes, and the entries it does not write: the user's files and folders
    (a folder outside the layout counts as one entry). Raises ``FileExistsError`` naming an
    entry that is a file (or link) where the layout has a folder, or a folder where it has a
    file."""
    generated: list[str] = []
    keep: list[str] = []

    def walk(rel: str) -> None:
        owned = _layout(rel)
        for name in sorted(os.listdir(os.path.join(root, rel))):
            sub = f"{rel}/{name}" if rel else name
            path = os.path.join(root, sub)
            is_dir = os.path.isdir(path) and not os.path.islink(path)
            kind = owned.get(name)
            if kind is None:
                keep.append(sub)
            elif (kind == "dir") != is_dir:
                want = "a folder" if kind == "dir" else "a file"
                raise FileExistsError(f"{os.path.join(shown, sub)}: the dataset writes {want} "
                                      "there; move it away to overwrite")
            elif is_dir:
                walk(sub)
            else:
                generated.append(sub)

    walk("")
    return generated, keep


def _user_entries(root: str, shown: str) -> list[str]:
    """The entries under ``root`` that the generator does not write (:func:`_scan`)."""
    return _scan(root, shown)[1]


def dataset_bytes(out_dir: str | os.PathLike) -> int:
    """The size in bytes of the generated files in the dataset folder ``out_dir`` (the user's
    files kept there by an overwrite not counted)."""
    out_dir = os.fspath(out_dir)
    return sum(os.path.getsize(os.path.join(out_dir, rel)) for rel in _scan(out_dir, out_dir)[0])


# ------------------------------------------------------------------ writing it, atomically
def _named(e: OSError, target: str, shown: str) -> OSError:
    """``e`` with a file name inside the temporary folder beside ``target`` (or that folder)
    replaced by the path the user gave: an error names the dataset, not ``.tmp-*``."""
    name = e.filename
    if not isinstance(name, str) or e.strerror is None:
        return e
    parent, base = os.path.split(target)
    prefix = os.path.join(parent, f".tmp-{base}-")
    if name.startswith(prefix):  # the temporary folder, or a file in it
        rest = name[len(prefix):].split(os.sep, 1)
        name = os.path.join(shown, rest[1]) if len(rest) == 2 else shown
    if name == e.filename:
        return e
    return type(e)(e.errno, e.strerror, name)


@contextlib.contextmanager
def _signals_held():
    """SIGINT and SIGTERM wait (blocked) while the block runs, then are delivered: the renames
    that swap the new dataset in are not cut half-way (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, set(STOP_SIGNALS))
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _replace_dataset(target: str, seed: int, keep: list[str]) -> dict:
    """Build the dataset beside the non-empty folder ``target``, move the user's entries
    ``keep`` into it, and swap it in (``target`` renamed away, then removed with what is left in
    it: only generated files). Any failure leaves ``target`` as it was."""
    parent, base = os.path.split(target)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{base}-", dir=parent)
    stale = None
    try:
        os.chmod(tmp, os.stat(target).st_mode & 0o7777)
        manifest = _write_dataset(tmp, seed)
        stale = tempfile.mkdtemp(prefix=f".old-{base}-", dir=parent)
        old = os.path.join(stale, base)
        moved: list[str] = []
        swapped = False
        with _signals_held():
            try:
                for rel in keep:
                    dst = os.path.join(tmp, rel)
                    os.makedirs(os.path.dirname(dst), exist_ok=True)
                    os.rename(os.path.join(target, rel), dst)
                    moved.append(rel)
                os.rename(target, old)
                swapped = True
                os.rename(tmp, target)
            except BaseException:
                try:  # put everything back
                    if swapped:
                        os.rename(old, target)
                    for rel in reversed(moved):
                        os.rename(os.path.join(tmp, rel), os.path.join(target, rel))
                except OSError:  # the user's files may be in tmp or stale: remove neither
                    tmp = stale = None
                raise
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)
        raise
    with _signals_held():  # the old dataset (generated files only): no .old-* left behind
        shutil.rmtree(stale, ignore_errors=True)
    return manifest


def _write_dataset(out_dir: str, seed: int) -> dict:
    """Write every file of the dataset into the existing, empty folder ``out_dir``."""
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
