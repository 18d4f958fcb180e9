"""AD-FM training and evaluation records (docs/reference/adfm.md 5.1-5.2): a normal reference and a query
image, the three-stage prompt, ``solution`` ``A`` (anomalous) / ``B`` (normal) and the ground
truth boxes ``bbox_answer`` in the model's input pixel frame.

Record (the EMIT JSONL format of :mod:`emit_jax.data.jsonl`, plus ``bbox_answer``)::

    {"id", "images": [reference, query], "messages": [{"role": "user", "content": PROMPT}],
     "solution": "A" | "B", "options": ["Yes.", "No."], "task_type": "anomaly_discrimination",
     "bbox_answer": [[x1, y1, x2, y2], ...] ([] for normal images), "frame": [W, H], <meta>}

The prompt (ours; the paper's wording is unreleased, docs/reference/adfm.md 5.2 PROPOSAL) asks for
``<think>`` with the region(s) of Image-2 that differ from Image-1 as ``[x1, y1, x2, y2]``
boxes in Image-2's pixel frame (the frame the model sees: :func:`emit_jax.data.image.to_tile`
squashes the whole image to ``W x H``), ``<rethink>`` judging those regions, then the letter in
``<answer>``. The AD question keeps "Yes." as option A and "No." as B, as AD-FM's a/b labels do
(docs/reference/adfm.md 4), so R_cls reads ``A``/``B`` directly.

:func:`rationale` is the templated answer the base stage learns the format from (the tiny
model has no pretrained box-reading ability): the GT boxes for an anomalous image, the central
third of the frame (the "region examined most closely") for a normal one.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from emit_jax.data import jsonl
from emit_jax.data.boxes import boxes_from_mask, format_boxes
from emit_jax.data.image import ImageError
from emit_jax.data.mvtec import DataError, ImageItem, Report
from emit_jax.data.prompts import Q_ANOMALY, qblock
from emit_jax.data.tasks import read_mask

OPTIONS = ("Yes.", "No.")

TEMPLATE = (
    "Image-1: <image>\nImage-2: <image>\nThe product in Image-1 is a defect-free reference. "
    "Inspect the product in Image-2 in three stages. First, inside <think> </think>, compare it "
    "with Image-1 and give each region of Image-2 that looks different as a box [x1, y1, x2, y2] "
    "in pixels of Image-2 ({w}x{h}); if nothing looks different, give the region you examined "
    "most closely. Then, inside <rethink> </rethink>, decide whether those regions are real "
    "defects. Finally, inside <answer> </answer>, give the letter of the correct option only."
    "\n\nQuestion: {qblock}")


def prompt(frame: tuple[int, int]) -> str:
    """The user turn for a query of model frame ``(W, H)``."""
    return TEMPLATE.format(w=int(frame[0]), h=int(frame[1]), qblock=qblock(Q_ANOMALY, OPTIONS))


def examined_box(frame: tuple[int, int]) -> list[int]:
    """The box a normal image's templated answer names: the central third of the frame."""
    w, h = int(frame[0]), int(frame[1])
    return [w // 3, h // 3, 2 * w // 3, 2 * h // 3]


def rationale(rec: Mapping, letter: str | None = None) -> str:
    """The templated three-stage answer for an AD-FM record."""
    letter = letter or rec["solution"]
    obj = str(rec.get("object_type", "product")).replace("_", " ")
    boxes = rec.get("bbox_answer") or []
    if rec.get("adlabel"):
        kind = str(rec.get("anomaly_type") or "defect").replace("_", " ")
        where = format_boxes(boxes) if boxes else "no clear region"
        return (f"<think>Image-2 differs from Image-1 at {where}.</think><rethink>It is a {kind} "
                f"on the {obj}, a real defect.</rethink><answer>{letter}</answer>")
    box = format_boxes([examined_box(rec["frame"])])
    return (f"<think>I examined {box} most closely; it matches Image-1.</think><rethink>The "
            f"{obj} looks normal and intact.</rethink><answer>{letter}</answer>")


def records(items: Sequence[ImageItem], *, references: Mapping[str, str],
            frame: tuple[int, int], report: Report | None = None, prefix: str = "adfm",
            **box_kw) -> list[dict]:
    """One AD-FM record per item that has a reference. An anomalous image whose mask is empty
    after the resize stays anomalous with ``bbox_answer = []`` (docs/reference/adfm.md 5.1: the focus rule
    then applies). Unreadable masks are reported to ``report`` and skipped (counted)."""
    report = report or Report()
    frame = (int(frame[0]), int(frame[1]))
    text = prompt(frame)
    out = []
    for it in items:
        ref = references.get(it.path)
        if not ref:
            continue
        try:
            boxes = boxes_from_mask(read_mask(it), frame, **box_kw) if it.is_anomalous else []
        except (DataError, ImageError) as e:
            report.problem(str(e))
            continue
        out.append({
            "id": f"{prefix}-{len(out):06d}", "images": [ref, it.path],
            "messages": [{"role": "user", "content": text}],
            "solution": "A" if it.is_anomalous else "B", "options": list(OPTIONS),
            "task_type": "anomaly_discrimination", "bbox_answer": boxes, "frame": list(frame),
            "query": it.path, "object_type": it.object_type, "dataset": it.dataset,
            "adlabel": int(it.is_anomalous), "anomaly_type": it.defect if it.is_anomalous else None,
            "mask_path": it.mask_path, "split": it.split})
    return out


def with_rationales(recs: Sequence[dict]) -> list[dict]:
    """Records with the templated answer as the assistant turn (the base stage's cold start)."""
    return jsonl.with_answers(recs, rationale)


__all__ = ["OPTIONS", "TEMPLATE", "prompt", "examined_box", "rationale", "records",
           "with_rationales"]
