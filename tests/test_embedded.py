"""The embedded default dataset (emit_jax.data.embedded): layout, masks, determinism, splits,
texts, cache and CLI. Three full generations (about 5 s each on 2 cores) are shared by the tests."""

from __future__ import annotations

import importlib.resources
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from emit_jax.data import embedded as E

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOP_LEVEL = {"domain_knowledge.json", "splits.json", "manifest.json", "README.md",
             "LICENSE_NOTES.md", "descriptions", *E.CLASSES}


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "emit_jax.data.embedded", *args],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=120)


def _files(root: str) -> dict[str, bytes]:
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = f.read()
    return out


def _load(path: str) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def _all_images(root: str) -> list[str]:
    out = []
    for cls in E.CLASSES:
        for split in ("train", "test"):
            for sub in sorted(os.listdir(os.path.join(root, cls, split))):
                for n in sorted(os.listdir(os.path.join(root, cls, split, sub))):
                    out.append(f"{cls}/{split}/{sub}/{n}")
    return out


@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> tuple[str, dict]:
    """Seed 0, written through the API."""
    root = str(tmp_path_factory.mktemp("embedded") / "seed0")
    return root, E.generate(root, seed=0)


@pytest.fixture(scope="module")
def cached(tmp_path_factory) -> str:
    """Seed 0 again, built by ensure_cached into a fresh cache root."""
    return E.ensure_cached(str(tmp_path_factory.mktemp("cache")), seed=0)


@pytest.fixture(scope="module")
def cli_seed1(tmp_path_factory) -> tuple[str, subprocess.CompletedProcess]:
    """Seed 1, written by the CLI with --overwrite over a folder holding a stale-looking image
    (``999.png``, which the generation does not write) and an unrelated file."""
    root = tmp_path_factory.mktemp("cli") / "seed1"
    os.makedirs(root / "pill" / "train" / "good")
    (root / "pill" / "train" / "good" / "999.png").write_bytes(b"stale")
    (root / "keep.txt").write_text("not ours")
    (root / "manifest.json").write_text('{"dataset": "Embedded"}')  # an earlier output's
    return str(root), _cli("--out", str(root), "--seed", "1", "--overwrite")


def test_layout_is_mvtec_ad(ds):
    root, manifest = ds
    assert set(os.listdir(root)) == TOP_LEVEL
    for cls, defects in E.CLASS_DEFECTS.items():
        cdir = os.path.join(root, cls)
        assert set(os.listdir(cdir)) == {"train", "test", "ground_truth"}
        assert os.listdir(os.path.join(cdir, "train")) == ["good"]
        assert set(os.listdir(os.path.join(cdir, "test"))) == {"good", *defects}
        assert set(os.listdir(os.path.join(cdir, "ground_truth"))) == set(defects)
        expected = {"train/good": E.N_TRAIN_GOOD, "test/good": E.N_TEST_GOOD,
                    **{f"test/{d}": E.N_PER_DEFECT for d in defects}}
        assert manifest["classes"][cls]["folders"] == expected
        for folder, n in expected.items():
            names = sorted(os.listdir(os.path.join(cdir, folder)))
            assert names == [f"{i:03d}.png" for i in range(n)], (cls, folder)
            for name in names:
                with Image.open(os.path.join(cdir, folder, name)) as im:
                    assert (im.format, im.mode, im.size) == ("PNG", "RGB", (E.IMAGE_SIZE, E.IMAGE_SIZE))
        for d in defects:
            masks = sorted(os.listdir(os.path.join(cdir, "ground_truth", d)))
            assert masks == [f"{i:03d}_mask.png" for i in range(E.N_PER_DEFECT)]
    assert len(E.CLASSES) >= 6 and "pill" in E.CLASSES
    assert {d for ds_ in E.CLASS_DEFECTS.values() for d in ds_} == set(E.DEFECTS)
    assert all(len(v) >= 3 for v in E.CLASS_DEFECTS.values())


def test_masks_are_exactly_the_painted_pixels(ds):
    root, _ = ds
    for cls, defects in E.CLASS_DEFECTS.items():
        for d in defects:
            for i in range(E.N_PER_DEFECT):
                path = os.path.join(root, cls, "ground_truth", d, f"{i:03d}_mask.png")
                with Image.open(path) as im:
                    assert (im.mode, im.size) == ("L", (E.IMAGE_SIZE, E.IMAGE_SIZE))
                    mask = np.asarray(im)
                assert set(np.unique(mask)) == {0, 255}
                assert np.count_nonzero(mask) >= E.MIN_DEFECT_PIXELS
                image = _load(os.path.join(root, cls, "test", d, f"{i:03d}.png"))
                s = E.render_sample(cls, "test", d, i, seed=0)
                # the file is the rendered sample, and the mask is exactly where it differs
                # from the same scene before the defect, all of it on the object
                np.testing.assert_array_equal(image, s.image)
                np.testing.assert_array_equal(mask > 0, s.mask)
                np.testing.assert_array_equal(s.mask, np.any(s.image != s.clean, axis=-1))
                assert not np.any(s.mask & ~s.silhouette), (cls, d, i)


def test_normal_images_differ_and_objects_fill_part_of_the_frame(ds):
    root, _ = ds
    for cls in E.CLASSES:
        imgs = [_load(os.path.join(root, cls, "train", "good", f"{i:03d}.png"))
                for i in range(E.N_TRAIN_GOOD)]
        flat = {im.tobytes() for im in imgs}
        assert len(flat) == len(imgs), cls
        s = E.render_sample(cls, "train", "good", 0)
        assert s.mask is None and 0.02 < s.silhouette.mean() <= 1.0


def test_defects_land_in_different_grid_cells(ds):
    root, _ = ds
    seen_all = set()
    for cls, defects in E.CLASS_DEFECTS.items():
        seen = set()
        for d in defects:
            for i in range(E.N_PER_DEFECT):
                mask = _load(os.path.join(root, cls, "ground_truth", d, f"{i:03d}_mask.png"))
                cells = E.grid_cells(mask)
                assert cells and cells[0][0] in E.GRID_CELLS
                seen.add(cells[0][0])
        assert len(seen) >= 3, (cls, seen)
        seen_all |= seen
    assert seen_all == set(E.GRID_CELLS)


def test_grid_cells_follow_the_spec():
    m = np.zeros((9, 9), np.uint8)
    m[0:3, 6:9] = 255  # top right, 9 pixels
    m[4, 4] = 1  # center, 1 pixel
    assert E.grid_cells(m) == [("top right", 9), ("center", 1)]
    assert E.grid_cells(np.zeros((9, 9))) == []


def test_splits_are_disjoint_covering_and_complete(ds):
    root, manifest = ds
    with open(os.path.join(root, "splits.json"), encoding="utf-8") as f:
        splits = json.load(f)
    assert set(splits) == {"train", "validation", "test"}
    sets = {k: set(v) for k, v in splits.items()}
    assert all(len(sets[k]) == len(splits[k]) for k in splits)  # no duplicates
    assert not (sets["train"] & sets["validation"]) and not (sets["train"] & sets["test"])
    assert not (sets["validation"] & sets["test"])
    everything = set(_all_images(root))
    assert sets["train"] | sets["validation"] | sets["test"] == everything
    assert {p for p in everything if "/train/good/" in p} <= sets["train"]
    for k in ("train", "validation", "test"):
        for cls, defects in E.CLASS_DEFECTS.items():
            subs = {p.split("/")[2] for p in sets[k] if p.startswith(cls + "/") and "/test/" in p}
            assert subs == {"good", *defects}, (k, cls)  # anomalies of every type in every split
    for k in ("validation", "test"):
        assert all(p.split("/")[1] == "test" for p in sets[k])
    assert {k: manifest["totals"][k] for k in splits} == {k: len(v) for k, v in splits.items()}


def test_domain_knowledge_covers_every_class_and_defect(ds):
    root, _ = ds
    with open(os.path.join(root, "domain_knowledge.json"), encoding="utf-8") as f:
        dk = json.load(f)
    assert list(dk) == [E.DATASET_NAME]
    assert set(dk[E.DATASET_NAME]) == set(E.CLASSES)
    for cls, defects in E.CLASS_DEFECTS.items():
        entries = dk[E.DATASET_NAME][cls]
        assert set(entries) == {*defects, "good"}
        assert entries["good"].startswith("<Normal Characteristics>\n Description: ")
        for d in defects:
            title = d.replace("_", " ").title()
            assert entries[d].startswith(f"<{title} Defect>\n Description: "), entries[d]
            assert f'"{cls}"' in entries[d] and len(entries[d]) > 120
    assert dk == E.domain_knowledge()


def test_every_image_has_a_description(ds):
    root, _ = ds
    for rel in _all_images(root):
        cls, split, sub, name = rel.split("/")
        path = os.path.join(root, "descriptions", cls, f"{split}_{sub}_{name[:-4]}.txt")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        assert len(text) > 200, path
        if sub != "good":
            mask = _load(os.path.join(root, cls, "ground_truth", sub, f"{name[:-4]}_mask.png"))
            where = E.LOCATION_PHRASE[E.grid_cells(mask)[0][0]]
            assert sub.replace("_", " ") in text and f"{where} " in text, path
        elif cls == "pill":  # the EMIT authors' text for the real image it was made from
            base = E.render_sample(cls, split, sub, int(name[:3])).base
            packaged = importlib.resources.files("emit_jax.data").joinpath(
                "embedded_assets", "pill", f"{base}.txt").read_text(encoding="utf-8")
            assert text.strip() == packaged.strip(), path
        else:
            assert "shows no defects" in text, path
    n_desc = sum(len(os.listdir(os.path.join(root, "descriptions", c))) for c in E.CLASSES)
    assert n_desc == len(_all_images(root))


def test_manifest_readme_and_licence_notes(ds):
    root, manifest = ds
    with open(os.path.join(root, "manifest.json"), encoding="utf-8") as f:
        assert json.load(f) == manifest
    assert manifest["seed"] == 0 and manifest["version"] == E.GENERATOR_VERSION
    n = len(_all_images(root))
    assert manifest["totals"]["images"] == n == 392
    for name in ("README.md", "LICENSE_NOTES.md"):
        with open(os.path.join(root, name), encoding="utf-8") as f:
            text = f.read()
        assert "seed 0" in text and f"version {E.GENERATOR_VERSION}" in text
    with open(os.path.join(root, "LICENSE_NOTES.md"), encoding="utf-8") as f:
        notes = f.read()
    assert "CC BY-NC-SA 4.0" in notes and "MVTec Software GmbH" in notes
    assert re.search(r"procedural", notes)
    size = sum(len(b) for b in _files(root).values())
    assert size < 25e6


def test_packaged_pill_assets():
    folder = importlib.resources.files("emit_jax.data").joinpath("embedded_assets", "pill")
    names = sorted(p.name for p in folder.iterdir())
    pngs = [n for n in names if n.endswith(".png")]
    assert len(pngs) == 17 and "LICENSE.md" in names
    assert {n[:-4] + ".txt" for n in pngs} <= set(names)
    assert "CC BY-NC-SA 4.0" in folder.joinpath("LICENSE.md").read_text(encoding="utf-8")
    with folder.joinpath(pngs[0]).open("rb") as f, Image.open(f) as im:
        assert (im.mode, im.size) == ("RGB", (256, 256))


def test_same_seed_is_byte_identical_and_cache_is_reused(ds, cached):
    root, _ = ds
    assert os.path.basename(cached) == f"embedded-v{E.GENERATOR_VERSION}-seed0"
    assert _files(root) == _files(cached)
    # nothing else left beside it, and a second call returns it without rebuilding
    assert os.listdir(os.path.dirname(cached)) == [os.path.basename(cached)]
    stamp = os.stat(os.path.join(cached, "manifest.json")).st_mtime_ns
    assert E.ensure_cached(os.path.dirname(cached), seed=0) == cached
    assert os.stat(os.path.join(cached, "manifest.json")).st_mtime_ns == stamp


def test_many_seeds_built_side_by_side_are_the_same_datasets(ds, cached, tmp_path):
    """``ensure_cached_many``: the missing seeds built in child processes, byte for byte what
    ``generate`` writes, in the seeds' order, the cached ones reused; a cache root that is a
    file is the one-line error before any child starts."""
    from emit_jax.data.embedded.cache import ensure_cached_many
    from emit_jax.errors import DataError

    root, _ = ds
    cache = os.path.dirname(cached)  # seed 0 is there already
    stamp = os.stat(os.path.join(cached, "manifest.json")).st_mtime_ns
    paths = ensure_cached_many([2, 0, 1], cache, workers=2)
    assert paths == [E.cache_path(cache, s) for s in (2, 0, 1)]
    assert os.stat(os.path.join(cached, "manifest.json")).st_mtime_ns == stamp  # reused
    one = E.generate(str(tmp_path / "seed1"), seed=1)
    assert _files(paths[2]) == _files(str(tmp_path / "seed1")) and one["seed"] == 1
    assert sorted(os.listdir(cache)) == sorted(os.path.basename(p) for p in paths)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="not a folder"):
        ensure_cached_many([5, 6], str(tmp_path / "file"), workers=2)


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("EMIT_JAX_CACHE", str(tmp_path))
    assert E.cache_path(seed=3) == os.path.join(str(tmp_path),
                                                f"embedded-v{E.GENERATOR_VERSION}-seed3")
    monkeypatch.delenv("EMIT_JAX_CACHE")
    assert E.cache_path().startswith(os.path.join(os.path.expanduser("~"), ".cache", "emit_jax"))
    with pytest.raises(ValueError):
        E.cache_path(seed=-1)


def test_cli_other_seed_differs_and_overwrite_replaces_only_ours(ds, cli_seed1):
    root0, _ = ds
    root1, proc = cli_seed1
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip().splitlines()) == 1 and "392 images" in proc.stdout
    with open(os.path.join(root1, "manifest.json"), encoding="utf-8") as f:
        assert json.load(f)["seed"] == 1
    assert (open(os.path.join(root1, "keep.txt")).read()) == "not ours"
    # a file the generation does not write is the user's, whatever its name: kept
    with open(os.path.join(root1, "pill", "train", "good", "999.png"), "rb") as f:
        assert f.read() == b"stale"
    assert set(_all_images(root1)) - {"pill/train/good/999.png"} == set(_all_images(root0))
    a, b = _files(root0), _files(root1)
    pngs = [k for k in a if k.endswith(".png")]
    differing = [k for k in pngs if a[k] != b[k]]
    assert len(differing) == len(pngs)  # every image and mask changes with the seed


def test_cli_refuses_a_non_empty_folder(tmp_path, cli_seed1):
    """A user's folder: refused without advising --overwrite (twenty-fifth probe DE1: advised,
    then refused with it); an earlier embedded dataset: --overwrite is advised."""
    (tmp_path / "something.txt").write_text("x")
    proc = _cli("--out", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stdout == ""
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in proc.stderr
    assert err[0].endswith(f"{tmp_path}: directory is not empty, and not a dataset "
                           "data.embedded wrote; choose an empty or new folder"), err
    assert os.listdir(tmp_path) == ["something.txt"]
    root, _ = cli_seed1  # an earlier generation's folder
    err = _cli("--out", root).stderr.strip().splitlines()
    assert len(err) == 1 and err[0].endswith(f"{root}: directory is not empty (pass "
                                             "--overwrite)"), err


def test_generate_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "x").write_text("x")
    with pytest.raises(FileExistsError):
        E.generate(tmp_path)
    with pytest.raises(ValueError):
        E.generate(tmp_path / "new", seed=-2)


def test_render_rejects_unknown_folders():
    with pytest.raises(ValueError):
        E.render_sample("bottle", "test", "good", 0)
    with pytest.raises(ValueError):
        E.render_sample("capsule", "test", "missing_piece", 0)
    with pytest.raises(ValueError):
        E.render_sample("capsule", "train", "crack", 0)


def test_scanned_by_the_mvtec_loader(ds):
    mvtec = pytest.importorskip("emit_jax.data.mvtec")
    root, manifest = ds
    items = mvtec.scan(root, dataset=E.DATASET_NAME)
    assert len(items) == manifest["totals"]["images"]
    assert {it.object_type for it in items} == set(E.CLASSES)
    assert sum(it.is_anomalous for it in items) == manifest["totals"]["masks"]
    assert all(it.mask_path for it in items if it.is_anomalous)
    counts = {k: sum(it.split == k for it in items) for k in ("train", "validation", "test")}
    assert counts == {k: manifest["totals"][k] for k in counts}
