"""GT boxes from masks (emit_jax/data/boxes.py; docs/reference/adfm.md 5.1 item 3, 2.3)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image

from emit_jax.data import embedded as E
from emit_jax.data.boxes import (boxes_from_mask, format_boxes, mask_plane, model_frame,
                                 resize_nearest, scale_boxes)
from emit_jax.data.mvtec import ImageItem
from emit_jax.data.tasks import mask_cell_counts, read_mask

KEEP_ALL = dict(min_pixels=1, min_fraction=0.0, max_boxes=10_000)


def _mask(h, w, *rects, value=255, dtype=np.uint8):
    """[h, w] mask with each rect (x1, y1, x2, y2), half-open, set to ``value``."""
    m = np.zeros((h, w), dtype)
    for x1, y1, x2, y2 in rects:
        m[y1:y2, x1:x2] = value
    return m


# ------------------------------------------------------------------------------ reference
def _flood_fill_boxes(plane):
    """Independent reference: 8-connected components by an explicit stack flood fill ->
    (sorted list of boxes [x1, y1, x2, y2], list of component pixel lists)."""
    h, w = len(plane), len(plane[0]) if len(plane) else 0
    seen = [[False] * w for _ in range(h)]
    boxes, comps = [], []
    for y0 in range(h):
        for x0 in range(w):
            if not plane[y0][x0] or seen[y0][x0]:
                continue
            stack, pix = [(y0, x0)], []
            seen[y0][x0] = True
            while stack:
                y, x = stack.pop()
                pix.append((y, x))
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        yy, xx = y + dy, x + dx
                        if 0 <= yy < h and 0 <= xx < w and plane[yy][xx] and not seen[yy][xx]:
                            seen[yy][xx] = True
                            stack.append((yy, xx))
            ys = [p[0] for p in pix]
            xs = [p[1] for p in pix]
            boxes.append([min(xs), min(ys), max(xs) + 1, max(ys) + 1])
            comps.append(pix)
    return sorted(boxes), comps


@st.composite
def _small_masks(draw, max_side=12):
    h = draw(st.integers(1, max_side))
    w = draw(st.integers(1, max_side))
    density = draw(st.sampled_from([0.1, 0.3, 0.5, 0.8]))
    seed = draw(st.integers(0, 2**31 - 1))
    return np.random.default_rng(seed).random((h, w)) < density


def _assert_valid(boxes, frame, max_boxes=4):
    fw, fh = frame
    assert isinstance(boxes, list) and len(boxes) <= max_boxes
    for b in boxes:
        assert isinstance(b, list) and len(b) == 4
        assert all(type(v) is int for v in b), b
        x1, y1, x2, y2 = b
        assert 0 <= x1 < x2 <= fw and 0 <= y1 < y2 <= fh, (b, frame)
    json.dumps(boxes)  # plain ints: serialisable as bbox_answer


# ------------------------------------------------------------------------------ hand-made masks
def test_one_rectangle_gives_exactly_its_box():
    m = _mask(60, 80, (10, 20, 30, 45))
    assert boxes_from_mask(m, (80, 60)) == [[10, 20, 30, 45]]
    # bool / float / negative background values binarise the same way (> 0)
    assert boxes_from_mask(m > 0, (80, 60)) == [[10, 20, 30, 45]]
    f = np.where(m > 0, 0.25, -1.0)
    assert boxes_from_mask(f, (80, 60)) == [[10, 20, 30, 45]]


def test_full_mask_and_edge_pixels():
    assert boxes_from_mask(np.ones((7, 9)), (9, 7), **KEEP_ALL) == [[0, 0, 9, 7]]
    m = _mask(5, 5, (4, 4, 5, 5))  # the last pixel only
    assert boxes_from_mask(m, (5, 5), **KEEP_ALL) == [[4, 4, 5, 5]]


def test_two_separated_blobs_two_boxes_sorted_by_area():
    m = _mask(100, 100, (60, 5, 70, 15), (5, 50, 25, 70))
    # larger box (20x20) first, then the 10x10 one
    assert boxes_from_mask(m, (100, 100)) == [[5, 50, 25, 70], [60, 5, 70, 15]]


def test_equal_areas_sorted_by_row_then_column():
    m = _mask(50, 50, (30, 2, 35, 7), (2, 30, 7, 35), (2, 2, 7, 7))
    assert boxes_from_mask(m, (50, 50)) == [[2, 2, 7, 7], [30, 2, 35, 7], [2, 30, 7, 35]]


def test_diagonal_touching_pixels_are_one_component():
    m = np.zeros((10, 10), np.uint8)
    for i in range(2, 8):
        m[i, i] = 1  # a diagonal line: 4-connectivity would give 6 components
    assert boxes_from_mask(m, (10, 10), **KEEP_ALL) == [[2, 2, 8, 8]]
    # two squares touching only at a corner
    m2 = _mask(20, 20, (2, 2, 6, 6), (6, 6, 10, 10))
    assert boxes_from_mask(m2, (20, 20), **KEEP_ALL) == [[2, 2, 10, 10]]
    # one empty column between them: two components
    m3 = _mask(20, 20, (2, 2, 6, 6), (7, 6, 10, 10))
    assert len(boxes_from_mask(m3, (20, 20), **KEEP_ALL)) == 2


def test_small_components_dropped():
    # frame area 10_000 -> threshold max(16, 5) = 16 px
    m = _mask(100, 100, (10, 10, 15, 15), (50, 50, 53, 53), (80, 80, 84, 84))
    # 25 px kept, 9 px dropped, 16 px (exactly the threshold) kept
    assert boxes_from_mask(m, (100, 100)) == [[10, 10, 15, 15], [80, 80, 84, 84]]
    # min_fraction sets the threshold when it is larger: 1 % of 10_000 = 100 px
    m2 = _mask(100, 100, (10, 10, 22, 22), (50, 50, 59, 59))  # 144 px and 81 px
    assert boxes_from_mask(m2, (100, 100), min_fraction=0.01) == [[10, 10, 22, 22]]
    assert len(boxes_from_mask(m2, (100, 100))) == 2
    # default fraction on a 504 frame: 0.0005 * 504**2 = 127.008 -> 127 px is dropped
    m3 = _mask(504, 504, (0, 0, 127, 1), (200, 200, 216, 208))  # 127 px and 128 px
    assert boxes_from_mask(m3, (504, 504)) == [[200, 200, 216, 208]]


def test_largest_kept_when_all_are_small():
    m = _mask(100, 100, (10, 10, 13, 13), (50, 50, 52, 52), (80, 80, 81, 81))
    assert boxes_from_mask(m, (100, 100)) == [[10, 10, 13, 13]]
    # a tie on size: the first in raster order of the first pixel
    t = _mask(100, 100, (70, 10, 72, 12), (10, 40, 12, 42))
    assert boxes_from_mask(t, (100, 100)) == [[70, 10, 72, 12]]


def test_six_blobs_merged_to_four_by_smallest_gap():
    a, b = (10, 10, 15, 15), (18, 10, 23, 15)      # 3 empty columns apart: gap 3
    c, d = (100, 10, 105, 15), (100, 20, 105, 25)  # 5 empty rows apart: gap 5
    e, f = (10, 100, 15, 105), (150, 150, 155, 155)
    m = _mask(200, 200, a, b, c, d, e, f)
    frame = (200, 200)
    assert len(boxes_from_mask(m, frame, max_boxes=6)) == 6
    # 5 boxes: only a+b (the smallest gap) merged
    assert boxes_from_mask(m, frame, max_boxes=5) == [
        [10, 10, 23, 15], [100, 10, 105, 15], [100, 20, 105, 25], [10, 100, 15, 105],
        [150, 150, 155, 155]]
    # 4 boxes (the default): then c+d
    assert boxes_from_mask(m, frame) == [
        [100, 10, 105, 25], [10, 10, 23, 15], [10, 100, 15, 105], [150, 150, 155, 155]]
    # down to 1: the enclosing box of everything
    assert boxes_from_mask(m, frame, max_boxes=1) == [[10, 10, 155, 155]]


def test_gap_is_euclidean_between_boxes():
    base = (50, 50, 55, 55)
    straight = (59, 50, 64, 55)  # dx = 4, dy = 0: gap 4
    diagonal = (42, 42, 47, 47)  # dx = 3, dy = 3: gap 4.24 (Chebyshev would say 3)
    m = _mask(100, 100, base, straight, diagonal)
    assert boxes_from_mask(m, (100, 100), max_boxes=2) == [[50, 50, 64, 55], [42, 42, 47, 47]]


def test_overlapping_boxes_merge_first():
    ring = np.zeros((60, 60), np.uint8)
    ring[10:40, 10:40] = 1
    ring[12:38, 12:38] = 0  # a square ring, box [10, 10, 40, 40]
    ring[20:25, 20:25] = 1  # a blob inside: gap 0 to the ring
    ring[20:25, 44:49] = 1  # a blob outside: gap 4
    assert boxes_from_mask(ring, (60, 60), max_boxes=2) == [[10, 10, 40, 40], [44, 20, 49, 25]]


def test_merge_tie_breaks_on_enclosing_area_then_boxes():
    a = (0, 0, 5, 5)
    b = (10, 0, 15, 5)   # gap 5 to a, union area 75
    c = (0, 10, 5, 18)   # gap 5 to a, union area 90
    m = _mask(30, 30, a, b, c)
    assert boxes_from_mask(m, (30, 30), max_boxes=2) == [[0, 0, 15, 5], [0, 10, 5, 18]]
    # equal gap and equal union area: the lexicographically smaller pair of boxes, (a, c)
    c2 = (0, 10, 5, 15)
    m2 = _mask(30, 30, a, b, c2)
    assert boxes_from_mask(m2, (30, 30), max_boxes=2) == [[0, 0, 5, 15], [10, 0, 15, 5]]


def test_empty_masks_give_no_boxes():
    assert boxes_from_mask(np.zeros((40, 30), np.uint8), (504, 504)) == []
    assert boxes_from_mask(np.full((4, 4), -3.0), (4, 4)) == []
    assert boxes_from_mask(np.full((4, 4), np.nan), (4, 4)) == []
    assert boxes_from_mask(np.zeros((0, 7)), (504, 504)) == []
    assert boxes_from_mask(np.zeros((5, 0, 3)), (504, 504)) == []


# ------------------------------------------------------------------------------ frames
def test_nearest_upscale_2x_doubles_the_box():
    m = _mask(20, 30, (3, 5, 7, 9))
    assert boxes_from_mask(m, (60, 40)) == [[6, 10, 14, 18]]
    assert boxes_from_mask(m, (90, 60)) == [[9, 15, 21, 27]]  # 3x
    up = resize_nearest(m, (60, 40))
    assert up.shape == (40, 60)
    np.testing.assert_array_equal(up, np.repeat(np.repeat(m, 2, axis=0), 2, axis=1))


def test_non_square_image_to_square_frame_scales_axes_independently():
    m = _mask(50, 100, (20, 10, 40, 20))  # w=100, h=50, as image.to_tile squashes it
    assert boxes_from_mask(m, (100, 100)) == [[20, 20, 40, 40]]  # y doubled, x kept
    assert boxes_from_mask(m, (50, 50)) == [[10, 10, 20, 20]]    # x halved, y kept
    assert boxes_from_mask(m, (200, 200)) == [[40, 40, 80, 80]]
    # the box is contained in the scaled original box, and the frame is (W, H) = width first
    got = boxes_from_mask(m, (504, 504))
    (enc,) = scale_boxes([[20, 10, 40, 20]], (100, 50), (504, 504))
    assert got[0][0] >= enc[0] and got[0][1] >= enc[1]
    assert got[0][2] <= enc[2] and got[0][3] <= enc[3]
    with pytest.raises(AssertionError):  # (H, W) would be a different frame
        assert boxes_from_mask(m, (50, 100)) == boxes_from_mask(m, (100, 50))


def test_nearest_downscale_can_lose_thin_lines():
    m = np.zeros((100, 100), np.uint8)
    m[:, 0] = 255  # a 1-px column; a 4x down-scale samples columns 2, 6, ...
    assert boxes_from_mask(m, (25, 25)) == []
    m[:, 2] = 255
    assert boxes_from_mask(m, (25, 25), **KEEP_ALL) == [[0, 0, 1, 25]]


@settings(derandomize=True, max_examples=60, deadline=None)
@given(st.integers(1, 300), st.integers(1, 300))
def test_resize_nearest_picks_the_nearest_source_centre(n_in, n_out):
    src = np.arange(n_in)[None, :]
    idx = resize_nearest(src, (n_out, 1))[0]
    assert idx.shape == (n_out,)
    assert np.all(np.diff(idx) >= 0) and idx.min() >= 0 and idx.max() < n_in
    centre = (np.arange(n_out) + 0.5) * n_in / n_out  # output centre in source units
    # the source pixel [idx, idx + 1) holds the output centre (ties go up)
    assert np.all(idx <= centre + 1e-9) and np.all(centre < idx + 1 + 1e-9)
    if n_out % n_in == 0:  # integer up-scale: plain repetition
        np.testing.assert_array_equal(idx, np.repeat(np.arange(n_in), n_out // n_in))


def test_resize_nearest_matches_pil_away_from_exact_ties():
    rng = np.random.default_rng(0)
    for w, big_w in ((224, 504), (256, 504), (700, 504), (37, 91)):
        m = (rng.random((3, w)) > 0.5).astype(np.uint8) * 255
        ours = resize_nearest(m, (big_w, 3))
        pil = np.asarray(Image.fromarray(m).resize((big_w, 3), Image.NEAREST))
        x = np.arange(big_w)
        tie = ((2 * x + 1) * w) % (2 * big_w) == 0  # centre exactly on a pixel edge
        np.testing.assert_array_equal(ours[:, ~tie], pil[:, ~tie])


# ------------------------------------------------------------------------------ properties
@settings(derandomize=True, max_examples=80, deadline=None)
@given(_small_masks())
def test_matches_flood_fill_reference(plane):
    h, w = plane.shape
    got = boxes_from_mask(plane.astype(np.uint8) * 255, (w, h), **KEEP_ALL)
    ref, _ = _flood_fill_boxes(plane.tolist())
    assert sorted(got) == ref
    _assert_valid(got, (w, h), max_boxes=10_000)


@settings(derandomize=True, max_examples=60, deadline=None)
@given(_small_masks(max_side=16), st.integers(1, 40), st.integers(1, 40),
       st.integers(1, 5), st.integers(1, 20))
def test_boxes_valid_tight_and_covering(plane, fw, fh, max_boxes, min_pixels):
    got = boxes_from_mask(plane, (fw, fh), max_boxes=max_boxes, min_pixels=min_pixels)
    _assert_valid(got, (fw, fh), max_boxes=max_boxes)
    framed = resize_nearest(plane, (fw, fh))
    _, comps = _flood_fill_boxes(framed.tolist())
    assert (got == []) == (comps == [])
    if not comps:
        return
    assert got == sorted(got, key=lambda b: (-(b[2] - b[0]) * (b[3] - b[1]), b[1], b[0]))
    kept = [c for c in comps if len(c) >= max(min_pixels, 0.0005 * fw * fh)]
    kept = kept or [max(comps, key=len)]
    assert len(got) == min(max_boxes, len(kept))
    for comp in kept:  # every kept component lies inside one box
        assert any(all(b[0] <= x < b[2] and b[1] <= y < b[3] for y, x in comp) for b in got)
    for b in got:  # boxes are tight: mask pixels inside reach all four edges
        ys, xs = np.nonzero(framed[b[1]:b[3], b[0]:b[2]])
        assert xs.min() == 0 and ys.min() == 0
        assert xs.max() == b[2] - b[0] - 1 and ys.max() == b[3] - b[1] - 1


# ------------------------------------------------------------------------------ real masks
@pytest.mark.parametrize("cls,defect", [("pill", "crack"), ("screw", "scratch"),
                                        ("nut", "hole"), ("cable", "contamination")])
def test_embedded_dataset_mask(tmp_path, cls, defect):
    sample = E.render_sample(cls, "test", defect, 0)
    mask = sample.mask
    assert mask is not None and mask.any()
    h, w = mask.shape
    # through the same reader the task builders use
    img_path, mask_path = tmp_path / "000.png", tmp_path / "000_mask.png"
    Image.fromarray(sample.image).save(img_path)
    Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)
    item = ImageItem(str(img_path), "Embedded", cls, "test", defect, True, str(mask_path))
    read = read_mask(item)

    native = boxes_from_mask(read, (w, h))
    ys, xs = np.nonzero(mask)
    # the generator's masks are one component: the box is its exact bounding box
    assert native == [[int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]]

    adfm = boxes_from_mask(read, (504, 504))
    _assert_valid(adfm, (504, 504))
    framed = resize_nearest(mask, (504, 504))
    fy, fx = np.nonzero(framed)
    assert adfm == [[int(fx.min()), int(fy.min()), int(fx.max()) + 1, int(fy.max()) + 1]]
    (enc,) = scale_boxes(native, (w, h), (504, 504))
    b = adfm[0]
    assert enc[0] <= b[0] < b[2] <= enc[2] and enc[1] <= b[1] < b[3] <= enc[3]
    assert b[2] - b[0] >= native[0][2] - native[0][0]  # an up-scale never shrinks it
    # the same mask as RGB [h, w, 3] and channels-first [1, h, w] gives the same boxes
    rgb = np.asarray(Image.open(mask_path).convert("RGB"))
    assert boxes_from_mask(rgb, (504, 504)) == adfm
    assert boxes_from_mask(mask[None].astype(np.uint8), (504, 504)) == adfm
    assert format_boxes(adfm) == "[" + ", ".join(map(str, b)) + "]"


# ------------------------------------------------------------------------------ shapes
@pytest.mark.parametrize("shape", [(5,), (2, 3, 4, 5), (0, 5, 5), ()])
def test_bad_shapes_raise(shape):
    with pytest.raises(ValueError, match="mask"):
        boxes_from_mask(np.zeros(shape), (10, 10))


@pytest.mark.parametrize("shape", [(6, 7), (6, 7, 1), (6, 7, 3), (6, 7, 4), (2, 6, 7),
                                   (5, 6, 7), (0, 7), (6, 0, 3), (5,), (0, 6, 7), (1, 2, 3, 4)])
def test_same_shapes_as_mask_cell_counts(shape):
    m = np.zeros(shape, np.uint8)
    try:
        mask_cell_counts(m)
        accepted = True
    except ValueError:
        accepted = False
    if accepted:
        assert boxes_from_mask(m, (7, 6)) == []
        assert mask_plane(m).ndim == 2
    else:
        with pytest.raises(ValueError):
            boxes_from_mask(m, (7, 6))


def test_channel_rules():
    plane = _mask(6, 7, (1, 1, 3, 4))
    hwc = np.zeros((6, 7, 3), np.uint8)
    hwc[..., 0] = plane
    hwc[0, 6, 1] = 255  # only a non-first channel: ignored for [h, w, C]
    assert boxes_from_mask(hwc, (7, 6), **KEEP_ALL) == [[1, 1, 3, 4]]
    chw = np.zeros((2, 6, 7), np.uint8)
    chw[1] = plane  # any channel counts for [C, h, w]
    assert boxes_from_mask(chw, (7, 6), **KEEP_ALL) == [[1, 1, 3, 4]]


@pytest.mark.parametrize("kwargs", [dict(frame=(0, 10)), dict(frame=(10,)), dict(frame=None),
                                    dict(frame=(10.5, 10)), dict(frame=(10, 10), max_boxes=0),
                                    dict(frame=(10, 10), min_pixels=-1),
                                    dict(frame=(10, 10), min_fraction=float("nan"))])
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        boxes_from_mask(np.ones((4, 4)), **kwargs)


def test_bad_dtype_raises():
    with pytest.raises(ValueError, match="dtype"):
        boxes_from_mask(np.array([["a", "b"], ["c", "d"]]), (2, 2))
    with pytest.raises(ValueError, match="dtype"):
        boxes_from_mask(np.ones((2, 2), complex), (2, 2))


# ------------------------------------------------------------------------------ helpers
def test_format_boxes():
    assert format_boxes([12, 40, 88, 120]) == "[12, 40, 88, 120]"
    assert format_boxes([[12, 40, 88, 120]]) == "[12, 40, 88, 120]"
    assert format_boxes([[1, 2, 3, 4], [5, 6, 7, 8]]) == "[1, 2, 3, 4], [5, 6, 7, 8]"
    assert format_boxes([]) == ""
    assert format_boxes([np.int64(3), 4.0, np.int32(5), 6]) == "[3, 4, 5, 6]"
    with pytest.raises(ValueError):
        format_boxes([[1, 2, 3]])
    with pytest.raises(ValueError):
        format_boxes([[1, 2, 3, 4.5]])


def test_scale_boxes():
    boxes = [[10, 20, 30, 45], [0, 0, 1, 1]]
    assert scale_boxes(boxes, (100, 50), (100, 50)) == boxes
    assert scale_boxes(boxes, (100, 50), (200, 100)) == [[20, 40, 60, 90], [0, 0, 2, 2]]
    # down-scale: floor the low edges, ceil the high ones, never an empty box
    assert scale_boxes([[3, 3, 5, 5]], (10, 10), (4, 4)) == [[1, 1, 2, 2]]
    assert scale_boxes([[9, 9, 10, 10]], (10, 10), (3, 3)) == [[2, 2, 3, 3]]
    # out-of-frame boxes are clipped
    assert scale_boxes([[5, 5, 20, 20]], (10, 10), (10, 10)) == [[5, 5, 10, 10]]
    with pytest.raises(ValueError):
        scale_boxes([[5, 5, 5, 9]], (10, 10), (20, 20))
    with pytest.raises(ValueError):
        scale_boxes([[1, 1, 2, 2]], (0, 10), (20, 20))


@settings(derandomize=True, max_examples=60, deadline=None)
@given(st.integers(1, 60), st.integers(1, 60), st.integers(1, 120), st.integers(1, 120),
       st.data())
def test_scale_boxes_encloses_the_scaled_rectangle(w0, h0, w1, h1, data):
    x1 = data.draw(st.integers(0, w0 - 1))
    x2 = data.draw(st.integers(x1 + 1, w0))
    y1 = data.draw(st.integers(0, h0 - 1))
    y2 = data.draw(st.integers(y1 + 1, h0))
    (b,) = scale_boxes([[x1, y1, x2, y2]], (w0, h0), (w1, h1))
    _assert_valid([b], (w1, h1))
    assert b[0] <= x1 * w1 / w0 + 1e-9 and b[2] >= x2 * w1 / w0 - 1e-9
    assert b[1] <= y1 * h1 / h0 + 1e-9 and b[3] >= y2 * h1 / h0 - 1e-9
    assert b[0] > x1 * w1 / w0 - 1 and b[2] < x2 * w1 / w0 + 1  # the smallest such box
    # the nearest-resized rectangle lies inside the scaled box
    m = _mask(h0, w0, (x1, y1, x2, y2))
    got = boxes_from_mask(m, (w1, h1), **KEEP_ALL)
    for g in got:
        assert b[0] <= g[0] and b[1] <= g[1] and g[2] <= b[2] and g[3] <= b[3]


def test_model_frame():
    assert model_frame(512, 512) == (504, 504)
    assert model_frame(224, 224) == (504, 504)
    assert model_frame(1024, 768) == (504, 392)   # 378 = 13.5 * 28 rounds up to 14 * 28
    assert model_frame(768, 1024) == (392, 504)
    assert model_frame(1000, 500) == (504, 252)   # exactly 9 * 28
    assert model_frame(1000, 10) == (504, 28)     # at least one multiple
    assert model_frame(300, 200, side=448, multiple=14) == (448, 294)
    for w, h in ((640, 480), (1920, 1080), (333, 517)):
        fw, fh = model_frame(w, h)
        assert max(fw, fh) == 504 and fw % 28 == 0 and fh % 28 == 0
        assert abs(min(fw, fh) - min(w, h) * 504 / max(w, h)) <= 14
    with pytest.raises(ValueError):
        model_frame(0, 10)


def _reference_merge(boxes, max_boxes):
    """The documented merge rule, naively: smallest (gap**2, enclosing area, pair) first."""
    boxes = [tuple(b) for b in boxes]
    while len(boxes) > max_boxes:
        def key(p):
            a, b = boxes[p[0]], boxes[p[1]]
            dx = max(0, b[0] - a[2], a[0] - b[2])
            dy = max(0, b[1] - a[3], a[1] - b[3])
            u = (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))
            return (dx * dx + dy * dy, (u[2] - u[0]) * (u[3] - u[1]), min(a, b), max(a, b))
        i, j = min(((i, j) for i in range(len(boxes)) for j in range(i + 1, len(boxes))),
                   key=key)
        a, b = boxes[i], boxes[j]
        boxes = [x for k, x in enumerate(boxes) if k not in (i, j)]
        boxes.append((min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])))
    return sorted(list(b) for b in boxes)


@settings(derandomize=True, max_examples=60, deadline=None)
@given(_small_masks(max_side=24), st.integers(1, 6))
def test_merging_matches_naive_reference(plane, max_boxes):
    h, w = plane.shape
    comps, _ = _flood_fill_boxes(plane.tolist())
    got = boxes_from_mask(plane, (w, h), min_pixels=1, min_fraction=0.0, max_boxes=max_boxes)
    assert sorted(got) == _reference_merge(comps, max_boxes)
