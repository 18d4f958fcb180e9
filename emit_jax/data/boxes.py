"""Ground-truth boxes from defect masks (docs/reference/adfm.md 5.1 item 3; box format docs/reference/adfm.md 2.3).

A box is ``[x1, y1, x2, y2]``: four Python ints, absolute pixel coordinates in the *model
frame*, half-open (``x1 <= x < x2``, ``y1 <= y < y2``), so ``0 <= x1 < x2 <= W`` and
``0 <= y1 < y2 <= H``. A component's box is ``[min_x, min_y, max_x + 1, max_y + 1]``.

Frame convention. ``frame = (W, H)`` is the size, width first as in PIL, of the image the model
actually sees, and the mask is given at the *original* image size (``[h, w]`` as read by
``tasks.read_mask``). The mask is mapped onto the frame by resizing the whole mask to
``W`` x ``H``, with x and y scaled independently: no crop, no padding. That is the geometry of
``image.to_tile``, which squashes the whole image to ``size`` x ``size`` (so use
``frame=(size, size)``), and of the AD-FM geometry of docs/reference/adfm.md 5.1 item 2 (see
:func:`model_frame`), which also resizes the whole image to its target size.

Nearest-neighbour resizing samples pixel centres: frame pixel ``X`` takes source column
``floor((X + 0.5) * w / W)`` (rows likewise), computed in exact integer arithmetic. This is
PIL's ``Image.NEAREST`` convention; PIL's float arithmetic can pick the lower neighbour where
``(X + 0.5) * w / W`` is exactly an integer, and this module does not copy that.

Steps of :func:`boxes_from_mask` (the spec's, in order):

1. binarise: ``mask > 0``;
2. resize to the frame (nearest neighbour, above);
3. 8-connected components (``scipy.ndimage.label`` with a 3x3 structure of ones);
4. drop components with fewer than ``max(min_pixels, min_fraction * W * H)`` pixels (counted in
   the frame); if that drops all of them, keep the largest (the first in raster order of their
   first pixel on a tie);
5. while more than ``max_boxes`` boxes remain, merge the pair with the smallest *gap* into
   their enclosing box. The gap between boxes ``a`` and ``b`` is the Euclidean distance between
   them as half-open rectangles, ``sqrt(dx**2 + dy**2)`` with
   ``dx = max(0, b.x1 - a.x2, a.x1 - b.x2)`` (the number of empty columns strictly between
   them) and ``dy`` likewise; it is 0 when the boxes overlap or touch. Ties go to the pair
   whose enclosing box has the smaller area, then to the lexicographically smaller pair
   ``(min(a, b), max(a, b))`` of box tuples, so the result does not depend on label order;
6. boxes are returned sorted by area descending, then by ``(y1, x1, y2, x2)``.

A mask with no positive pixel after the resize gives ``[]`` (docs/reference/adfm.md: anomalous images with
an empty mask get ``bbox_answer = []``). Note that a nearest-neighbour *down*-scale can miss a
defect thinner than the scale step, which then also gives ``[]``.

Accepted mask shapes are those of ``tasks.mask_cell_counts``: ``[h, w]``; ``[h, w, C]`` with
``C`` in (1, 3, 4) (the first channel is used); or ``[C, h, w]`` with any other trailing size
(a pixel is positive when any channel is). ``h`` or ``w`` may be 0 (then ``[]``). Any other
shape raises ``ValueError``.
"""

from __future__ import annotations

import heapq
from typing import Sequence

import numpy as np
from scipy import ndimage

__all__ = [
    "boxes_from_mask",
    "format_boxes",
    "mask_plane",
    "model_frame",
    "resize_nearest",
    "scale_boxes",
]

_STRUCTURE_8 = np.ones((3, 3), dtype=bool)


def _check_size(size, what: str) -> tuple[int, int]:
    """``(W, H)`` as two positive Python ints, else ValueError."""
    try:
        w, h = size
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a (width, height) pair, got {size!r}") from None
    out = []
    for v in (w, h):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"{what} must hold two positive ints, got {size!r}")
        if v < 1:
            raise ValueError(f"{what} must hold two positive ints, got {size!r}")
        out.append(int(v))
    return out[0], out[1]


def mask_plane(mask) -> np.ndarray:
    """The mask as a 2-D boolean ``[h, w]`` array of its positive pixels (``> 0``), with the
    shape rules of ``tasks.mask_cell_counts`` (module docstring); ValueError otherwise."""
    m = np.asarray(mask)
    if m.dtype != bool and not (np.issubdtype(m.dtype, np.integer)
                                or np.issubdtype(m.dtype, np.floating)):
        raise ValueError(f"mask must hold real numbers or booleans, got dtype {m.dtype}")
    if m.ndim == 3:
        if m.shape[-1] in (1, 3, 4):
            m = m[..., 0] > 0
        elif m.shape[0] == 0:
            raise ValueError(f"mask of shape {m.shape} has no channels")
        else:
            m = (m > 0).any(axis=0)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D (or 3-D with a channel axis), got shape {m.shape}")
    return m > 0


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each of ``n_out`` output pixels: ``floor((i + 0.5) * n_in / n_out)``."""
    i = np.arange(n_out, dtype=np.int64)
    return ((2 * i + 1) * n_in) // (2 * n_out)


def resize_nearest(plane: np.ndarray, frame: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a 2-D ``[h, w]`` array to ``frame = (W, H)`` -> ``[H, W]``
    (pixel-centre sampling in exact integer arithmetic, see the module docstring)."""
    plane = np.asarray(plane)
    if plane.ndim != 2:
        raise ValueError(f"resize_nearest needs a 2-D array, got shape {plane.shape}")
    fw, fh = _check_size(frame, "frame")
    h, w = plane.shape
    if h == 0 or w == 0:
        raise ValueError(f"cannot resize an empty array of shape {plane.shape}")
    if (h, w) == (fh, fw):
        return plane.copy()
    return plane[_nearest_index(h, fh)[:, None], _nearest_index(w, fw)[None, :]]


def _gap2(a, b) -> int:
    """Squared Euclidean gap between half-open boxes ``a`` and ``b`` (0 if they overlap/touch)."""
    dx = max(0, b[0] - a[2], a[0] - b[2])
    dy = max(0, b[1] - a[3], a[1] - b[3])
    return dx * dx + dy * dy


def _union(a, b) -> tuple[int, int, int, int]:
    return (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))


def _area(b) -> int:
    return (b[2] - b[0]) * (b[3] - b[1])


def _merge_key(a, b) -> tuple:
    lo, hi = (a, b) if a <= b else (b, a)
    return (_gap2(a, b), _area(_union(a, b)), lo, hi)


def _merge_down(boxes: list[tuple[int, int, int, int]], max_boxes: int):
    """Merge the closest pair (module docstring, step 5) until ``max_boxes`` remain. A heap of
    pair keys with lazy deletion: O(n**2 log n) for n boxes."""
    if len(boxes) <= max_boxes:
        return list(boxes)
    alive = dict(enumerate(boxes))
    heap = [(_merge_key(boxes[i], boxes[j]), i, j)
            for i in range(len(boxes)) for j in range(i + 1, len(boxes))]
    heapq.heapify(heap)
    next_id = len(boxes)
    while len(alive) > max_boxes:
        _, i, j = heapq.heappop(heap)
        if i not in alive or j not in alive:
            continue
        merged = _union(alive.pop(i), alive.pop(j))
        for k, b in alive.items():
            heapq.heappush(heap, (_merge_key(b, merged), k, next_id))
        alive[next_id] = merged
        next_id += 1
    return list(alive.values())


def _sort_key(b) -> tuple:
    return (-_area(b), b[1], b[0], b[3], b[2])


def boxes_from_mask(mask, frame: tuple[int, int], *, max_boxes: int = 4, min_pixels: int = 16,
                    min_fraction: float = 0.0005) -> list[list[int]]:
    """GT boxes of ``mask`` (at the original image size) in the model frame ``(W, H)``.

    Implements docs/reference/adfm.md 5.1 item 3; the steps, the gap used for merging, the tie-breaks and
    the output order are in the module docstring. Returns at most ``max_boxes`` boxes
    ``[x1, y1, x2, y2]`` of Python ints with ``0 <= x1 < x2 <= W`` and ``0 <= y1 < y2 <= H``;
    ``[]`` when the mask has no positive pixel in the frame. ``min_pixels=1, min_fraction=0``
    keeps every component."""
    if isinstance(max_boxes, bool) or not isinstance(max_boxes, (int, np.integer)) \
            or max_boxes < 1:
        raise ValueError(f"max_boxes must be an int >= 1, got {max_boxes!r}")
    if not (min_pixels >= 0) or not (min_fraction >= 0):
        raise ValueError(f"min_pixels and min_fraction must be >= 0, got {min_pixels!r}, "
                         f"{min_fraction!r}")
    fw, fh = _check_size(frame, "frame")
    plane = mask_plane(mask)
    if plane.size == 0 or not plane.any():
        return []
    plane = resize_nearest(plane, (fw, fh))
    labels, n = ndimage.label(plane, structure=_STRUCTURE_8)
    if n == 0:
        return []
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    threshold = max(float(min_pixels), float(min_fraction) * fw * fh)
    keep = [k for k in range(n) if sizes[k] >= threshold]
    if not keep:
        keep = [int(np.argmax(sizes))]  # argmax: the first (raster order) on a tie
    slices = ndimage.find_objects(labels)
    boxes = [(int(slices[k][1].start), int(slices[k][0].start),
              int(slices[k][1].stop), int(slices[k][0].stop)) for k in keep]
    boxes = _merge_down(boxes, int(max_boxes))
    return [list(b) for b in sorted(boxes, key=_sort_key)]


def _check_box(box) -> tuple[int, int, int, int]:
    try:
        vals = list(box)
    except TypeError:
        raise ValueError(f"a box must be [x1, y1, x2, y2], got {box!r}") from None
    if len(vals) != 4:
        raise ValueError(f"a box must have 4 coordinates, got {box!r}")
    out = []
    for v in vals:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer, float,
                                                                  np.floating)):
            raise ValueError(f"box coordinates must be integers, got {box!r}")
        if isinstance(v, (float, np.floating)) and not float(v).is_integer():
            raise ValueError(f"box coordinates must be integers, got {box!r}")
        out.append(int(v))
    return out[0], out[1], out[2], out[3]


def scale_boxes(boxes: Sequence[Sequence[int]], from_size: tuple[int, int],
                to_size: tuple[int, int]) -> list[list[int]]:
    """Map boxes from the frame ``from_size = (W0, H0)`` to ``to_size = (W1, H1)`` (x and y
    scaled independently, as the whole-image resize does). Each box becomes the smallest
    integer box enclosing the scaled rectangle: ``x1 -> floor(x1 * W1 / W0)``,
    ``x2 -> ceil(x2 * W1 / W0)`` (y likewise), exact integer arithmetic, clipped to the target
    frame; a valid box stays valid (x1 < x2, y1 < y2). Order is kept."""
    w0, h0 = _check_size(from_size, "from_size")
    w1, h1 = _check_size(to_size, "to_size")
    out = []
    for box in boxes:
        x1, y1, x2, y2 = _check_box(box)
        if not (x1 < x2 and y1 < y2):
            raise ValueError(f"box {list(box)!r} is empty (needs x1 < x2 and y1 < y2)")
        nx1 = min(max((x1 * w1) // w0, 0), w1 - 1)
        ny1 = min(max((y1 * h1) // h0, 0), h1 - 1)
        nx2 = max(min(-((-x2 * w1) // w0), w1), nx1 + 1)
        ny2 = max(min(-((-y2 * h1) // h0), h1), ny1 + 1)
        out.append([nx1, ny1, nx2, ny2])
    return out


def model_frame(width: int, height: int, *, side: int = 504, multiple: int = 28
                ) -> tuple[int, int]:
    """The AD-FM model frame ``(W, H)`` for an image of ``width`` x ``height`` (docs/reference/adfm.md 5.1
    item 2): a square image goes to ``side`` x ``side``; otherwise the longer side becomes
    ``side`` and the shorter is scaled by the same factor and rounded to the nearest multiple
    of ``multiple`` (halves up; at least ``multiple``). For ``image.to_tile``'s squash use
    ``(size, size)`` instead."""
    width, height = _check_size((width, height), "image size")
    side, multiple = _check_size((side, multiple), "(side, multiple)")
    if width == height:
        return side, side
    long_, short = max(width, height), min(width, height)
    # nearest multiple of short * side / long_, halves up, in integers
    k = (2 * short * side + long_ * multiple) // (2 * long_ * multiple)
    other = max(multiple, k * multiple)
    return (side, other) if width > height else (other, side)


def format_boxes(boxes) -> str:
    """Text of boxes as the model writes them (docs/reference/adfm.md 2.3): one box ``[x1, y1, x2, y2]`` ->
    ``"[12, 40, 88, 120]"`` (comma + space, ints); a list of boxes -> those joined by ``", "``,
    e.g. ``"[1, 2, 3, 4], [5, 6, 7, 8]"``; an empty list -> ``""``. Integral floats are printed
    as ints; other values raise ValueError."""
    boxes = list(boxes)
    if len(boxes) == 4 and all(isinstance(v, (int, float, np.integer, np.floating))
                               and not isinstance(v, (bool, np.bool_)) for v in boxes):
        boxes = [boxes]
    return ", ".join("[" + ", ".join(str(v) for v in _check_box(b)) + "]" for b in boxes)
