"""The zoom image and the peak's region (``data.zoom``, ``data.peak_region``; not in EMIT):
what EMIT's contrastive heat map says, put where the LLM reads images and words.

A linear probe reads the defect's type from the pooled visual tokens of the whole query in 41 %
of the embedded default's anomalous test images, and from those of a crop at the heat map's
maximum in 62.5 % (as from a crop at the true mask's centre; docs/training.md, "Zooming in on
the map's maximum"). So with ``data.zoom`` each defect-classification question (reference,
query) gets a third image: the square of ``share`` of the query's side centred on the maximum
of EMIT's heat map of the pair (:func:`emit_jax.models.emit.config_heatmap`, the run's ``emit``
settings), moved inside the image where it would leave it. The user turn names it on a line
after the query's::

    Image-2: <image>
    Image-3 (Image-2 enlarged where it differs most from Image-1): <image>

With ``data.peak_region`` each defect-localization question gets a line naming the region
(``prompts.REGIONS``, the 3 x 3 grid) of that maximum instead, its two images and EMIT's
contrastive tokens kept::

    Image-2: <image>
    Image-2 differs most from Image-1 at its top left.

Neither uses a label: both come from one fixed ViT's map (:class:`Zoomer`; the trainer passes
the ViT the run starts from), the same way for training, held-out and unseen questions, written
once per pair into a folder (the crop a PNG, the region's cell a JSON file), named by the pair,
the share, the map's settings and a digest of the ViT's weights. Anomaly discrimination keeps
its two images and object classification its one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence

import numpy as np

from emit_jax.data.prompts import REGIONS

#: the query's line in the two-image template, and the lines added after it
QUERY_LINE = "Image-2: <image>\n"
ZOOM_LINE = "Image-3 (Image-2 enlarged where it differs most from Image-1): <image>\n"
REGION_LINE = "Image-2 differs most from Image-1 at its {region}.\n"
#: the cell whose region's name is longest (prompt lengths are checked with it)
LONGEST_CELL = max(range(len(REGIONS)), key=lambda c: len(REGIONS[c]))


def crop_at(image, fy: float, fx: float, share: float):
    """The square of ``share`` of ``image``'s shorter side centred at ``(fy, fx)`` (fractions
    of the height and width), moved inside the image where it would leave it; a PIL image."""
    w, h = image.size
    side = max(1, int(round(share * min(w, h))))
    cx, cy = fx * w, fy * h
    left = int(round(min(max(cx - side / 2, 0), w - side)))
    top = int(round(min(max(cy - side / 2, 0), h - side)))
    return image.crop((left, top, left + side, top + side))


def hot_crop(image, heat: np.ndarray, share: float):
    """:func:`crop_at` the centre of the heat map ``heat [g, g]``'s hottest cell (the map
    spans the whole image, as the CE view squashes it to one tile)."""
    y, x = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return crop_at(image, (y + 0.5) / heat.shape[0], (x + 0.5) / heat.shape[1], share)


def _after_query(user: str, line: str) -> str:
    if user.count(QUERY_LINE) != 1:
        raise ValueError(f"a zoomed question needs one {QUERY_LINE!r} line in its user turn")
    return user.replace(QUERY_LINE, QUERY_LINE + line)


def zoom_text(user: str) -> str:
    """The user turn with :data:`ZOOM_LINE` after the query's line; ``ValueError`` when it has
    no :data:`QUERY_LINE` (not the two-image template)."""
    return _after_query(user, ZOOM_LINE)


def region_text(user: str, cell: int) -> str:
    """The user turn with :data:`REGION_LINE` of the 3 x 3 ``cell`` (row-major, as
    ``prompts.REGIONS``) after the query's line."""
    return _after_query(user, REGION_LINE.format(region=REGIONS[cell]))


def hottest_cell(heat: np.ndarray) -> int:
    """The 3 x 3 grid cell (row-major, 0 = top left) of a heat map's maximum."""
    y, x = np.unravel_index(int(np.argmax(heat)), heat.shape)
    h, w = heat.shape
    return int(min(2, y * 3 // h) * 3 + min(2, x * 3 // w))


def _two_image(record: dict, task: str) -> bool:
    """``task`` asked in the two-image template, with neither line added yet."""
    user = record["messages"][0]["content"] if record.get("messages") else ""
    return (record.get("task_type") == task and len(record.get("images", ())) == 2
            and user.count(QUERY_LINE) == 1 and ZOOM_LINE not in user
            and REGION_LINE.split("{")[0] not in user)


def wants_zoom(record: dict) -> bool:
    """A question the zoom image goes to: defect classification asked of a (reference, query)
    pair in the two-image template."""
    return _two_image(record, "defect_classification")


def wants_region(record: dict) -> bool:
    """A question the peak's region goes to: defect localization in the two-image template."""
    return _two_image(record, "defect_localization")


def vit_digest(vit) -> str:
    """A digest of an nnx module's parameters (names, shapes, dtypes and bytes)."""
    import jax
    from flax import nnx

    h = hashlib.sha1()
    for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(vit, nnx.Param)):
        a = np.asarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)}:{a.shape}:{a.dtype}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


class Zoomer:
    """Adds what the map says to the questions that take it: :meth:`plan` one record,
    :meth:`lazy` a sequence whose pairs are cut as its records are read (the trainer's: a stage
    cuts only the questions it reads), ``zoomer(records)`` a list with every pair cut (a batch
    at a time). Each pair is cut once into ``folder``: its crop (a PNG, when ``share`` > 0) and
    the cell of its map's maximum (a JSON file, written last).

    ``vit``: the InternViT whose heat map places them (kept as given: pass one no stage
    trains); ``emit_cfg``: the :class:`emit_jax.models.emit.EMITConfig` the map follows (its
    CE layers, window and rotations); ``share`` in [0, 1]: the crop's side as a share of the
    query's shorter side (0: no zoom image); ``region``: name the map's region in the
    defect-localization questions."""

    def __init__(self, vit, emit_cfg, folder: str, share: float, *, region: bool = False,
                 batch: int = 16):
        if not 0.0 <= share <= 1.0 or not (share or region):
            raise ValueError(f"zoom share {share!r}: must be in (0, 1] (or 0 with region)")
        import threading

        from flax import nnx

        from emit_jax.models.emit import config_heatmap

        self.vit, self.folder, self.share, self.batch = vit, folder, float(share), batch
        self.region = bool(region)
        self.size = vit.cfg.image_size
        self.tag = f"{vit_digest(vit)}:{self.share}:{emit_cfg.to_json_dict()}"
        self._heat = nnx.jit(lambda v, ce: config_heatmap(v, ce, emit_cfg))
        self._lock = threading.Lock()  # a lazy sequence is read from the pipeline's threads

    def path(self, reference: str, query: str, ext: str = ".png") -> str:
        """Where the pair's crop (``.png``) or cell (``.json``) is kept."""
        key = hashlib.sha1(f"{self.tag}|{reference}|{query}".encode()).hexdigest()[:24]
        return os.path.join(self.folder, key + ext)

    def takes(self, rec: dict) -> bool:
        """Whether ``rec`` gets the zoom image or the region line."""
        return (self.share > 0 and wants_zoom(rec)) or (self.region and wants_region(rec))

    def cell(self, reference: str, query: str) -> int:
        """The pair's cut cell (:func:`hottest_cell`)."""
        with open(self.path(reference, query, ".json"), encoding="utf-8") as f:
            return int(json.load(f)["cell"])

    def plan(self, rec: dict, *, cell: int | None = None) -> dict:
        """``rec`` with the zoom image (its path as the third image, :func:`zoom_text`,
        ``query``) or the region line (:func:`region_text` of ``cell``, else of the pair's cut
        cell); ``rec`` itself when it takes neither."""
        if not self.takes(rec):
            return rec
        ref, query = rec["images"]
        msgs = [dict(m) for m in rec["messages"]]
        if wants_zoom(rec):
            msgs[0]["content"] = zoom_text(msgs[0]["content"])
            return dict(rec, images=[ref, query, self.path(ref, query)], messages=msgs,
                        query=query)
        cell = self.cell(ref, query) if cell is None else cell
        msgs[0]["content"] = region_text(msgs[0]["content"], cell)
        return dict(rec, messages=msgs, query=query)

    def cut(self, pairs) -> None:
        """Cut the ``(reference, query)`` pairs not yet cut, a batch at a time."""
        import jax.numpy as jnp

        from emit_jax.data.image import load_image, to_tile
        from emit_jax.fileio import atomic_output

        with self._lock:
            todo = sorted({p for p in map(tuple, pairs)
                           if not os.path.isfile(self.path(*p, ".json"))})
            if todo:
                os.makedirs(self.folder, exist_ok=True)
            rows = min(self.batch, len(todo))  # one compiled shape per zoomer (and a lone one)
            for i in range(0, len(todo), rows or 1):
                chunk = todo[i:i + rows]
                query = [load_image(q) for _, q in chunk]
                ce = np.stack([np.stack([to_tile(load_image(r), self.size),
                                         to_tile(im, self.size)])
                               for (r, _), im in zip(chunk, query)])
                if len(chunk) < rows:
                    ce = np.concatenate([ce, np.repeat(ce[-1:], rows - len(chunk), 0)])
                heat = np.asarray(self._heat(self.vit, jnp.asarray(ce)))[:len(chunk)]
                for pair, im, h in zip(chunk, query, heat):
                    if self.share:
                        with atomic_output(self.path(*pair), "wb") as f:
                            hot_crop(im, h, self.share).save(f, format="PNG")
                    with atomic_output(self.path(*pair, ".json")) as f:  # last: the pair is cut
                        json.dump({"cell": hottest_cell(h)}, f)

    def __call__(self, records) -> list[dict]:
        records = list(records)
        self.cut([r["images"] for r in records if self.takes(r)])
        return [self.plan(r) for r in records]

    def lazy(self, records) -> "Zoomed":
        return Zoomed(self, records)


class Zoomed(Sequence):
    """``records`` (a sequence) as :meth:`Zoomer.plan` gives them, each pair cut when its
    record is first read (one at a time): what a stage hands its data pipeline."""

    def __init__(self, zoomer: Zoomer, records):
        self.zoomer, self.records = zoomer, records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        rec = self.records[i]
        if self.zoomer.takes(rec):
            self.zoomer.cut([rec["images"]])
        return self.zoomer.plan(rec)
