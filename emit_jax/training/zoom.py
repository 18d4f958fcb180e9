"""The zoom image (``data.zoom``; not in EMIT): defect-classification questions also show the
query cropped where the contrastive heat map peaks.

A linear probe reads the defect's type from the pooled visual tokens of the whole query in 41 %
of the embedded default's anomalous test images, and from those of a crop at the heat map's
maximum in 62.5 % (as from a crop at the true mask's centre; docs/training.md, "The crop
probe"). So each defect-classification question (reference, query) gets a third image: the
square of ``share`` of the query's side centred on the maximum of EMIT's heat map of the pair
(:func:`emit_jax.models.emit.config_heatmap`, the run's ``emit`` settings), moved inside the
image where it would leave it. The user turn names it on a line after the query's::

    Image-2: <image>
    Image-3 (Image-2 enlarged where it differs most from Image-1): <image>

The crop uses no label: it is cut the same way for training, held-out and unseen questions,
with one fixed ViT (:class:`Zoomer`; the trainer passes the ViT the run starts from), and
written once as a PNG into a folder, named by the pair, the share and a digest of the ViT's
weights. Other tasks are left as they are: anomaly discrimination and defect localization keep
their two images (EMIT's contrastive tokens need exactly two), object classification has one.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

import numpy as np

#: the questions that get the zoom image
ZOOM_TASKS = ("defect_classification",)
#: the query's line in the two-image template, and the line added after it
QUERY_LINE = "Image-2: <image>\n"
ZOOM_LINE = "Image-3 (Image-2 enlarged where it differs most from Image-1): <image>\n"


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


def zoom_text(user: str) -> str:
    """The user turn with :data:`ZOOM_LINE` after the query's line; ``ValueError`` when it has
    no :data:`QUERY_LINE` (not the two-image template)."""
    if user.count(QUERY_LINE) != 1:
        raise ValueError(f"a zoomed question needs one {QUERY_LINE!r} line in its user turn")
    return user.replace(QUERY_LINE, QUERY_LINE + ZOOM_LINE)


def wants_zoom(record: dict) -> bool:
    """A question :class:`Zoomer` adds the crop to: a :data:`ZOOM_TASKS` task asked of a
    (reference, query) pair in the two-image template."""
    return (record.get("task_type") in ZOOM_TASKS and len(record.get("images", ())) == 2
            and record["messages"][0]["content"].count(QUERY_LINE) == 1)


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
    """Adds the crop to the :func:`wants_zoom` questions: :meth:`plan` one record (its crop's
    path named, not cut), :meth:`lazy` a sequence whose crops are cut as its records are read
    (the trainer's: a stage cuts only the questions it reads), ``zoomer(records)`` a list with
    every crop cut (a batch at a time). Each crop is a PNG written once into ``folder``.

    ``vit``: the InternViT whose heat map places the crops (kept as given: pass one no stage
    trains); ``emit_cfg``: the :class:`emit_jax.models.emit.EMITConfig` the map follows (its
    CE layers, window and rotations); ``share`` in (0, 1]: the crop's side as a share of the
    query's shorter side."""

    def __init__(self, vit, emit_cfg, folder: str, share: float, *, batch: int = 16):
        if not 0.0 < share <= 1.0:
            raise ValueError(f"zoom share {share!r}: must be in (0, 1]")
        import threading

        from flax import nnx

        from emit_jax.models.emit import config_heatmap

        self.vit, self.folder, self.share, self.batch = vit, folder, float(share), batch
        self.size = vit.cfg.image_size
        self.tag = f"{vit_digest(vit)}:{self.share}:{emit_cfg.to_json_dict()}"
        self._heat = nnx.jit(lambda v, ce: config_heatmap(v, ce, emit_cfg))
        self._lock = threading.Lock()  # a lazy sequence is read from the pipeline's threads

    def path(self, reference: str, query: str) -> str:
        key = hashlib.sha1(f"{self.tag}|{reference}|{query}".encode()).hexdigest()[:24]
        return os.path.join(self.folder, f"{key}.png")

    def plan(self, rec: dict) -> dict:
        """``rec`` zoomed: the crop's path as its third image, :func:`zoom_text`, ``query``
        (a new dict; the crop not cut); ``rec`` itself when it does not take the zoom."""
        if not wants_zoom(rec):
            return rec
        ref, query = rec["images"]
        msgs = [dict(m) for m in rec["messages"]]
        msgs[0]["content"] = zoom_text(msgs[0]["content"])
        return dict(rec, images=[ref, query, self.path(ref, query)], messages=msgs, query=query)

    def cut(self, planned: list[dict]) -> None:
        """Write the missing crops of planned records (:meth:`plan`), a batch at a time."""
        import jax.numpy as jnp

        from emit_jax.data.image import load_image, to_tile
        from emit_jax.fileio import atomic_output

        with self._lock:
            todo = sorted({r["images"][2]: r["images"] for r in planned if len(r["images"]) == 3
                           and not os.path.isfile(r["images"][2])}.values(), key=lambda t: t[2])
            if todo:
                os.makedirs(self.folder, exist_ok=True)
            rows = min(self.batch, len(todo))  # one compiled shape per zoomer (and a lone one)
            for i in range(0, len(todo), rows or 1):
                chunk = todo[i:i + rows]
                query = [load_image(q) for _, q, _ in chunk]
                ce = np.stack([np.stack([to_tile(load_image(r), self.size),
                                         to_tile(im, self.size)])
                               for (r, _, _), im in zip(chunk, query)])
                if len(chunk) < rows:
                    ce = np.concatenate([ce, np.repeat(ce[-1:], rows - len(chunk), 0)])
                heat = np.asarray(self._heat(self.vit, jnp.asarray(ce)))[:len(chunk)]
                for (_, _, out), im, h in zip(chunk, query, heat):
                    with atomic_output(out, "wb") as f:
                        hot_crop(im, h, self.share).save(f, format="PNG")

    def __call__(self, records) -> list[dict]:
        out = [self.plan(r) for r in records]
        self.cut(out)
        return out

    def lazy(self, records) -> "Zoomed":
        return Zoomed(self, records)


class Zoomed(Sequence):
    """``records`` (a sequence) as :meth:`Zoomer.plan` gives them, each crop cut when its
    record is first read (one at a time): what a stage hands its data pipeline."""

    def __init__(self, zoomer: Zoomer, records):
        self.zoomer, self.records = zoomer, records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        rec = self.zoomer.plan(self.records[i])
        if len(rec["images"]) == 3 and rec is not self.records[i] and \
                not os.path.isfile(rec["images"][2]):
            self.zoomer.cut([rec])
        return rec
