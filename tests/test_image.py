"""Image preprocessing: InternVL's dynamic tiling (docs/reference/emit.md 3.1), the tile transform (3.2)."""

import numpy as np
import pytest
from PIL import Image

from emit_jax.data.image import (ImageError, closest_ratio, dynamic_tiles, load_image, preprocess,
                                 target_ratios, to_display, to_tile)


def reference_target_ratios(min_num, max_num):
    # InternVL's published expression, verbatim semantics
    r = set((i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1)
            for j in range(1, n + 1) if i * j <= max_num and i * j >= min_num)
    return sorted(r, key=lambda x: x[0] * x[1])


def test_candidate_grids():
    assert target_ratios(1, 6) == reference_target_ratios(1, 6)
    assert all(1 <= a * b <= 6 for a, b in target_ratios(1, 6))
    assert len(target_ratios(1, 6)) == 14


@pytest.mark.parametrize("w,h,want", [
    (448, 448, (1, 1)),     # exact 1:1, not larger than half of 2x2's area
    (700, 700, (2, 2)),     # square above ~634 px: 2x2 (docs/reference/emit.md 3.1)
    (630, 630, (1, 1)),
    (896, 448, (2, 1)),
    (448, 1344, (1, 3)),
    (1000, 300, (3, 1)),
])
def test_grid_choice(w, h, want):
    assert closest_ratio(w, h, target_ratios(1, 6), 448) == want


def test_tiles_and_thumbnail():
    im = Image.fromarray(np.random.RandomState(0).randint(0, 255, (300, 900, 3), np.uint8))
    tiles = dynamic_tiles(im, 448, 6)
    assert len(tiles) == 3 + 1 and all(t.size == (448, 448) for t in tiles)
    single = dynamic_tiles(Image.new("RGB", (448, 448)), 448, 6)
    assert len(single) == 1  # no thumbnail for one tile
    x = preprocess(im, 448, 6)
    assert x.shape == (4, 3, 448, 448) and x.dtype == np.float32
    np.testing.assert_allclose(x[-1], to_tile(im, 448), atol=1e-6)  # the CE view is the thumbnail


def test_normalisation_and_display_round_trip():
    im = Image.new("RGB", (32, 32), (255, 0, 128))
    t = to_tile(im, 32)
    np.testing.assert_allclose(t[:, 0, 0], [(1 - 0.485) / 0.229, (0 - 0.456) / 0.224,
                                            (128 / 255 - 0.406) / 0.225], atol=1e-5)
    np.testing.assert_allclose(to_display(t)[0, 0], [1.0, 0.0, 128 / 255], atol=1e-5)


def test_jpeg_augmentation_only_in_training():
    im = Image.fromarray(np.random.RandomState(1).randint(0, 255, (64, 64, 3), np.uint8))
    clean = preprocess(im, 64, 1)
    aug = preprocess(im, 64, 1, train=True, rng=np.random.default_rng(0))
    aug2 = preprocess(im, 64, 1, train=True, rng=np.random.default_rng(0))
    assert not np.allclose(clean, aug) and np.array_equal(aug, aug2)


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16", "P"])
def test_odd_image_modes_become_rgb(tmp_path, mode):
    p = tmp_path / f"x_{mode.replace(';', '')}.png"
    arr = np.random.RandomState(2).randint(0, 255, (20, 20)).astype(np.uint8)
    im = Image.fromarray(arr).convert(mode) if mode != "I;16" else \
        Image.fromarray(arr.astype(np.uint16) * 257)
    im.save(p)
    out = load_image(p)
    assert out.mode == "RGB" and out.size == (20, 20)
    if mode in ("L", "I;16"):  # grey levels survive (16-bit scaled to 8 bits, not clipped)
        np.testing.assert_array_equal(np.asarray(out)[..., 0], arr)


def test_corrupt_and_missing_images(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ImageError, match="bad.png: not a readable image"):
        load_image(bad)
    with pytest.raises(ImageError, match="nope.png: no such file"):
        load_image(tmp_path / "nope.png")


def test_an_image_path_that_is_a_pipe_or_folder_is_refused_not_read(tmp_path):
    """Before: ``visualize heatmap --query FIFO`` blocked forever on the read."""
    import os

    import pytest

    from emit_jax.data.image import load_image
    from emit_jax.errors import ImageError

    fifo = tmp_path / "q.png"
    os.mkfifo(fifo)
    for path in (fifo, tmp_path):
        with pytest.raises(ImageError, match="not a regular file"):
            load_image(str(path))


def test_images_of_more_than_8_bits_keep_their_grey_levels(tmp_path):
    """Seventh probe. Before: a float TIFF in [0, 1] (a normalised image) was rounded to 0 / 1,
    all black; 32-bit integers beyond 16 bits were divided by 257 and clipped, nearly all white;
    NaN pixels were cast to arbitrary values with two lines of ``RuntimeWarning``."""
    ramp = np.linspace(0.0, 1.0, 64, dtype=np.float32).reshape(8, 8)
    Image.fromarray(ramp, "F").save(tmp_path / "unit.tif")
    got = np.asarray(load_image(str(tmp_path / "unit.tif")))[..., 0]
    np.testing.assert_array_equal(got, np.rint(ramp * 255).astype(np.uint8))
    Image.fromarray((ramp * 200).astype(np.float32), "F").save(tmp_path / "grey.tif")  # 0..200
    got = np.asarray(load_image(str(tmp_path / "grey.tif")))[..., 0]
    np.testing.assert_array_equal(got, np.rint(ramp * 200).astype(np.uint8))
    big = (ramp * 25_500_000).astype(np.int32)
    Image.fromarray(big, "I").save(tmp_path / "int32.tif")
    got = np.asarray(load_image(str(tmp_path / "int32.tif")))[..., 0]
    np.testing.assert_array_equal(got, np.rint(big * (255.0 / big.max())).astype(np.uint8))
    nan = ramp.copy()
    nan[2, 3] = np.nan
    Image.fromarray(nan, "F").save(tmp_path / "nan.tif")
    with pytest.raises(ImageError, match=r"nan.tif: not a usable image \(1 of its 64 pixels are "
                                         r"NaN or infinite\)"):
        load_image(str(tmp_path / "nan.tif"))


def test_a_huge_image_is_one_warning_line_naming_it(tmp_path):
    """Before: Pillow's ``DecompressionBombWarning`` as Python's two-line dump, no file name
    (a 12,000 x 12,000 PNG; here the limit is lowered instead). In a fresh interpreter: pytest
    resets the warning filters a module sets while it is collected."""
    import subprocess
    import sys

    Image.new("RGB", (20, 10)).save(tmp_path / "big.png")
    code = ("import sys; from PIL import Image; from emit_jax.data.image import load_image; "
            "Image.MAX_IMAGE_PIXELS = 150; assert load_image(sys.argv[1]).size == (20, 10)")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "big.png")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines() == [
        f"warning: {tmp_path / 'big.png'}: 20 x 10 = 200 pixels, over Pillow's 150-pixel "
        "warning limit (read anyway; it refuses twice that)"]
