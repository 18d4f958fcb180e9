"""AD-FM rewards (docs/reference/adfm.md §2.3-§2.5, §5.3): multi-stage reasoning + fine-grained reward.

AD-FM (Liao et al., AAAI 2026, arXiv 2508.04175) trains a multimodal LLM with GRPO on the binary
anomaly-discrimination decision. The policy sees a normal reference image and a query image and
reasons in three stages (§2.3)::

    <think> region identification, one or more boxes [x1, y1, x2, y2] </think>
    <rethink> defect analysis of those regions </rethink>        (optional, rewarded)
    <answer> a | b </answer>                                     (a = anomalous, b = normal)

Boxes are absolute pixel coordinates in the model's input frame (~512x512; the format reward
wants every coordinate < 505). The official reward plugin (``hanawall/AD-FM``,
``scripts/grpo/plugin_adfm.py``) sums three rewards with weight 1 each; this module reproduces
them on decoded completion strings (plain Python + NumPy + SciPy, no JAX):

=========  =====================  ===========  ===============================================
name       reference name         range        summary
=========  =====================  ===========  ===============================================
adfm_cls   anomaly_cls_reward     [0, 1]       {0, 0.8, 1}: exact / partial / wrong answer
adfm_loc   anomaly_loc_reward     [-0.1, 1]    Hungarian GIoU + 0.3 * count term, or the
                                               "focus" term {0, 0.5, -0.1} for normal samples
adfm_fmt   anomaly_cot_format     [0, 1.2]     tags + box presence + coordinates < 505
=========  =====================  ===========  ===============================================

Total ``R = R_cls + R_loc + R_fmt`` in [-0.1, 3.2] (``reward_range(ADFM_REWARDS,
ADFM_WEIGHTS)``); 3.2 needs an anomalous sample with perfect localisation.

Rules (docs/reference/adfm.md §2.4; every tag regex is ``<tag>(.*?)</tag>``, case-insensitive, DOTALL, and
the *first* match is used):

* ground truth ``gt``: ``'a'`` iff ``str(gt).strip().lower() == 'a'``, else ``'b'`` (so the
  option letters ``'A'``/``'B'`` work; AD-FM records put "Yes." as option A). The reference
  strips before comparing; ``None`` or any other value means normal.
* R_cls: p = content of the first ``<answer>`` (else the whole completion), stripped and
  lower-cased. 1.0 if p == gt; else 0.8 if the letter gt occurs in p and len(p) <= 10; else 0.
  **Quirk kept:** for gt = a the answer "normal" scores 0.8 (it contains an "a").
* R_loc (alpha = 0.3): P = boxes parsed from the first ``<think>`` block, m = |P|, n = |G|.
  Normal sample, or anomalous with n = 0 -> the *focus* term 0 / 0.5 / -0.1 for m = 0 / 1 /
  >= 2, returned as-is (not normalised). Anomalous with n > 0, m = 0 -> 0. Otherwise
  r_count = 1 (m = n), 0.5 (|m - n| = 1), -0.1 (else); one-to-one Hungarian matching on GIoU;
  mean_GIoU = (sum of matched GIoUs) / m (unmatched predictions count 0);
  r_raw = mean_GIoU + alpha * r_count in [-1.03, 1.3]; then ``normalized`` (the current
  ``.py``, default): clip((r_raw + 0.5) / 1.5, 0, 1), or ``clipped`` (the older compiled
  "paper-faithful" version): clip(r_raw, 0, 1).
* R_fmt: +0.3 if the stripped think content is non-empty, +0.1 more if it is > 10 chars;
  +0.2 if a ``<rethink>`` has non-empty stripped content, +0.1 more if > 10 chars; +0.2 if the
  stripped, lower-cased answer content is exactly ``a`` or ``b``, else +0.1 if it contains ``a``
  or ``b`` (nothing without an answer tag); when the think content is non-empty: +0.2 if it
  contains a box, +0.1 more if every parsed coordinate is < ``coord_limit`` (505), else +0.1 if
  it contains both ``[`` and ``]``. **Quirk kept:** the box bonus is paid for normal samples too
  (the reference computes "has GT boxes" and never uses it).
* strict mode (§5.3 PROPOSAL, ``strict=True``): R_cls partial credit only when p with all
  whitespace and periods removed equals gt (so "A." still gets 0.8, "normal" gets 0); the
  R_fmt box section (box +0.2/+0.1 and the bracket hint +0.1) only when gt = a.

Boxes (``parse_boxes``): ``[x1, y1, x2, y2]`` with four non-negative integers or decimals
(``\\d+(\\.\\d+)?``: no sign, no exponent, no leading dot), optional whitespace around numbers and
commas. Like the reference, *every* such quadruple counts as a box, including degenerate or
inverted ones (x1 >= x2 or y1 >= y2): they have zero area, so their IoU is 0 and their GIoU is
<= 0; the spec's "x1 < x2 and y1 < y2" describes the convention, not a filter in the verified
code. ``parse_boxes(text, ordered_only=True)`` keeps only x1 < x2 and y1 < y2 boxes for other
uses (evaluation); the rewards never pass it.

Deliberate numerical differences from the reference (values agree to ~1e-7):

* GIoU is computed in float64 (the reference rounds the cost matrix to float32).
* R_fmt is rounded to 10 decimals, so it is exactly a multiple of 0.1 (1.2, not
  1.2000000000000002) and never leaves [0, 1.2].
* Robustness: GIoU/IoU are scale-invariant, so boxes with coordinates beyond 1e100 (or all below
  1e-100) are rescaled before computing areas, which keeps the value finite where the reference
  overflows to NaN; a parsed box whose number overflows float (> ~1.8e308, i.e. 309+ digits) is
  dropped from R_loc's P (the reference would give NaN), but still fails R_fmt's coordinate test.

Shapes and types: a box is any length-4 sequence of real numbers (returned as a tuple of 4
Python floats); GT boxes ``bbox_answer`` per sample are ``None``, ``[]`` or a ``[k, 4]``
nested list / array of finite numbers (a flat ``[x1, y1, x2, y2]`` is rejected: wrap it).

Batched rewards (registered in ``emit_jax.rl.rewards`` on import of this module) follow the
registry convention ``fn(completions: list[str], *, solution: list[str], **kwargs) ->
list[float]``; unknown keyword arguments are ignored. Keyword arguments:

* ``solution``: one gt per completion (``'a'``/``'b'``/``'A'``/``'B'``); required by
  ``adfm_cls`` and ``adfm_loc``, and by ``adfm_fmt`` in strict mode (checked if given).
* ``bbox_answer``: one GT box list (or None / []) per completion; required by ``adfm_loc``.
* ``loc_variant``: ``"normalized"`` (default) or ``"clipped"``, for all completions.
* ``coord_limit``: a number or one number per completion (default 505), ``adfm_fmt`` only.
* ``strict``: a bool (default False), ``adfm_cls`` and ``adfm_fmt``.

Public API::

    parse_boxes(text, *, ordered_only=False) -> list[tuple[float, float, float, float]]
    think_content(c) / rethink_content(c) / answer_content(c) -> str | None
    iou(p, g) -> float;  giou(p, g) -> float
    match_boxes(pred, gt, score="giou") -> (pairs: list[(i, j)], scores: list[float])
    normalize_gt(gt) -> 'a' | 'b'
    cls_reward(c, gt, *, strict=False) -> float
    loc_reward(c, gt_boxes, gt, *, variant="normalized", alpha=0.3) -> float
    fmt_reward(c, gt=None, *, coord_limit=505, strict=False) -> float
    adfm_reward(c, gt, gt_boxes, *, variant=..., coord_limit=..., strict=...) -> float (sum)
    is_correct(c, solution) -> bool;  localization_iou(pred_boxes, gt_boxes) -> float
    batched (registered): adfm_cls_rewards ("adfm_cls", "anomaly_cls_reward"),
        adfm_loc_rewards ("adfm_loc", "anomaly_loc_reward"),
        adfm_fmt_rewards ("adfm_fmt", "anomaly_cot_format")
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from emit_jax.rl.rewards import _per_sample, register_reward

Box = tuple[float, float, float, float]

# ------------------------------------------------------------------------------------------
# Constants (docs/reference/adfm.md §2.4)
# ------------------------------------------------------------------------------------------

#: Answer labels: ``a`` = anomalous, ``b`` = normal (§2.3).
ANOMALOUS = "a"
NORMAL = "b"

#: Tag regexes: first match, case-insensitive, spanning newlines.
TAG_FLAGS = re.DOTALL | re.IGNORECASE
THINK_PATTERN = r"<think>(.*?)</think>"
RETHINK_PATTERN = r"<rethink>(.*?)</rethink>"
ANSWER_PATTERN = r"<answer>(.*?)</answer>"
_THINK_RE = re.compile(THINK_PATTERN, TAG_FLAGS)
_RETHINK_RE = re.compile(RETHINK_PATTERN, TAG_FLAGS)
_ANSWER_RE = re.compile(ANSWER_PATTERN, TAG_FLAGS)

#: A box: four non-negative integers or decimals in brackets, optional whitespace.
_NUM = r"(\d+(?:\.\d+)?)"
BOX_PATTERN = r"\[\s*" + r"\s*,\s*".join([_NUM] * 4) + r"\s*\]"
_BOX_RE = re.compile(BOX_PATTERN)

#: R_cls.
CLS_CORRECT = 1.0
CLS_PARTIAL = 0.8
CLS_WRONG = 0.0
CLS_PARTIAL_MAX_LEN = 10          # partial credit needs len(p) <= 10

#: R_loc.
ALPHA = 0.3                        # weight of the count term
FOCUS_NONE, FOCUS_ONE, FOCUS_MANY = 0.0, 0.5, -0.1    # m = 0, m = 1, m >= 2
COUNT_EXACT, COUNT_OFF_BY_ONE, COUNT_OTHER = 1.0, 0.5, -0.1
LOC_NORM_MIN, LOC_NORM_MAX = -0.5, 1.0                 # "normalized": (r - min) / (max - min)
LOC_VARIANTS = ("normalized", "clipped")
DEFAULT_LOC_VARIANT = "normalized"

#: R_fmt.
COORD_LIMIT = 505.0                # every coordinate must be < 505 (512x512 input)
FMT_THINK, FMT_THINK_LONG = 0.3, 0.1
FMT_RETHINK, FMT_RETHINK_LONG = 0.2, 0.1
FMT_ANSWER_EXACT, FMT_ANSWER_PARTIAL = 0.2, 0.1
FMT_BOX, FMT_BOX_IN_RANGE, FMT_BRACKETS = 0.2, 0.1, 0.1
FMT_LONG_LEN = 10                  # "longer than 10 characters"

#: Registered ranges and the default combination (weights 1, 1, 1: plain sum, §2.1).
CLS_RANGE = (0.0, 1.0)
LOC_RANGE = (FOCUS_MANY, 1.0)
FMT_RANGE = (0.0, 1.2)
ADFM_REWARDS: tuple[str, ...] = ("adfm_cls", "adfm_loc", "adfm_fmt")
ADFM_WEIGHTS: tuple[float, ...] = (1.0, 1.0, 1.0)

# ------------------------------------------------------------------------------------------
# Parsing
# ------------------------------------------------------------------------------------------


def _first(regex: re.Pattern, completion: str) -> str | None:
    m = regex.search(completion)
    return m.group(1) if m else None


def think_content(completion: str) -> str | None:
    """Raw (unstripped) content of the first ``<think>...</think>`` (case-insensitive,
    across newlines), or None when there is none."""
    return _first(_THINK_RE, completion)


def rethink_content(completion: str) -> str | None:
    """Raw content of the first ``<rethink>...</rethink>``, or None."""
    return _first(_RETHINK_RE, completion)


def answer_content(completion: str) -> str | None:
    """Raw content of the first ``<answer>...</answer>``, or None."""
    return _first(_ANSWER_RE, completion)


def _raw_boxes(text: str) -> list[Box]:
    """Every ``[n, n, n, n]`` in ``text`` as floats (may contain inf for 309+ digit numbers)."""
    return [tuple(float(v) for v in m) for m in _BOX_RE.findall(text)]  # type: ignore[misc]


def parse_boxes(text: str, *, ordered_only: bool = False) -> list[Box]:
    """Boxes ``[x1, y1, x2, y2]`` in ``text``, in order of appearance, as float 4-tuples.

    Numbers are non-negative integers or decimals (``12``, ``12.5``; not ``-1``, ``.5``,
    ``1e3``); whitespace is allowed around numbers and commas. As in the reference, every such
    quadruple is a box, degenerate or inverted ones included; ``ordered_only=True`` keeps only
    boxes with x1 < x2 and y1 < y2. Boxes with a coordinate that overflows float are dropped.
    """
    out = []
    for b in _raw_boxes(text):
        if not all(math.isfinite(v) for v in b):
            continue
        if ordered_only and not (b[0] < b[2] and b[1] < b[3]):
            continue
        out.append(b)
    return out


def _as_box(b: Any, name: str = "box") -> Box:
    if isinstance(b, (str, bytes)):
        raise TypeError(f"{name} must be 4 numbers [x1, y1, x2, y2], not a string")
    vals = tuple(float(v) for v in b)
    if len(vals) != 4:
        raise ValueError(f"{name} must have 4 numbers [x1, y1, x2, y2], got {len(vals)}")
    if not all(math.isfinite(v) for v in vals):
        raise ValueError(f"{name} has a non-finite coordinate: {vals}")
    return vals  # type: ignore[return-value]


def _as_boxes(boxes: Any, name: str = "boxes") -> list[Box]:
    """None / [] / a [k, 4] nested sequence or array -> list of float 4-tuples."""
    if boxes is None:
        return []
    if isinstance(boxes, (str, bytes)):
        raise TypeError(f"{name} must be a list of [x1, y1, x2, y2] boxes, not a string")
    if isinstance(boxes, np.ndarray):
        if boxes.size == 0:
            return []
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"{name} must have shape [k, 4], got {boxes.shape}")
        boxes = boxes.tolist()
    boxes = list(boxes)
    if len(boxes) == 4 and all(isinstance(v, (int, float, np.number)) for v in boxes):
        raise ValueError(f"{name} must be a list of boxes; got one flat box {boxes!r} "
                         "(wrap it: [[x1, y1, x2, y2]])")
    return [_as_box(b, f"{name}[{i}]") for i, b in enumerate(boxes)]


# ------------------------------------------------------------------------------------------
# IoU, GIoU, matching
# ------------------------------------------------------------------------------------------


def _rescaled(p: Box, g: Box) -> tuple[Box, Box]:
    """IoU and GIoU are scale-invariant; bring extreme coordinates to ~1 so areas stay finite
    (a no-op for ordinary boxes, so ordinary values are bit-identical to the reference)."""
    s = max(abs(v) for v in (*p, *g))
    if s > 1e100 or 0.0 < s < 1e-100:
        p = tuple(v / s for v in p)  # type: ignore[assignment]
        g = tuple(v / s for v in g)  # type: ignore[assignment]
    return p, g


def _iou_parts(p: Box, g: Box) -> tuple[float, float]:
    """(IoU, union). Areas use max(0, .) so degenerate/inverted boxes have area 0."""
    x11, y11, x12, y12 = p
    x21, y21, x22, y22 = g
    inter = max(0.0, min(x12, x22) - max(x11, x21)) * max(0.0, min(y12, y22) - max(y11, y21))
    a1 = max(0.0, x12 - x11) * max(0.0, y12 - y11)
    a2 = max(0.0, x22 - x21) * max(0.0, y22 - y21)
    union = a1 + a2 - inter
    return (0.0 if union <= 0 else inter / union), union


def iou(p: Sequence[float], g: Sequence[float]) -> float:
    """Intersection over union of two ``[x1, y1, x2, y2]`` boxes, in [0, 1]; 0 when the union
    is empty (both boxes degenerate)."""
    p, g = _rescaled(_as_box(p, "p"), _as_box(g, "g"))
    return float(_iou_parts(p, g)[0])


def giou(p: Sequence[float], g: Sequence[float]) -> float:
    """Generalised IoU ``IoU - (C - U) / C`` (C: area of the smallest enclosing box, U: union
    area), in [-1, 1]; falls back to IoU when C <= 0 (the enclosing box is degenerate)."""
    p, g = _rescaled(_as_box(p, "p"), _as_box(g, "g"))
    v, union = _iou_parts(p, g)
    enc = (max(0.0, max(p[2], g[2]) - min(p[0], g[0]))
           * max(0.0, max(p[3], g[3]) - min(p[1], g[1])))
    if enc <= 0:
        return float(v)
    return float(v - (enc - union) / enc)


_SCORES = {"giou": giou, "iou": iou}


def match_boxes(pred: Any, gt: Any,
                score: str = "giou") -> tuple[list[tuple[int, int]], list[float]]:
    """One-to-one matching of ``pred`` [m] to ``gt`` [n] boxes maximising the summed ``score``
    (``"giou"`` or ``"iou"``): ``scipy.optimize.linear_sum_assignment`` on cost = -score.

    Returns ``(pairs, scores)``: min(m, n) pairs ``(pred index, gt index)`` sorted by prediction
    index, and the score of each pair. Empty lists when m = 0 or n = 0. Among equally good
    matchings, which one is returned is up to SciPy; the total is always the maximum.
    """
    try:
        fn = _SCORES[score]
    except KeyError:
        raise ValueError(f"score must be one of {sorted(_SCORES)}, got {score!r}") from None
    P, G = _as_boxes(pred, "pred"), _as_boxes(gt, "gt")
    if not P or not G:
        return [], []
    S = np.array([[fn(p, g) for g in G] for p in P], dtype=np.float64)     # [m, n]
    rows, cols = linear_sum_assignment(-S)
    pairs = [(int(i), int(j)) for i, j in zip(rows, cols)]
    return pairs, [float(S[i, j]) for i, j in pairs]


# ------------------------------------------------------------------------------------------
# Single-completion rewards
# ------------------------------------------------------------------------------------------


def normalize_gt(gt: Any) -> str:
    """``'a'`` (anomalous) iff ``str(gt).strip().lower() == 'a'``, else ``'b'`` (normal)."""
    return ANOMALOUS if str(gt).strip().lower() == ANOMALOUS else NORMAL


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def cls_reward(completion: str, gt: Any, *, strict: bool = False) -> float:
    """R_cls (``anomaly_cls_reward``), values {0, 0.8, 1}.

    p = first ``<answer>`` content (else the whole completion), stripped, lower-cased.
    1.0 if p == gt; else 0.8 if gt's letter is in p and len(p) <= 10 (so for gt = a, "normal"
    scores 0.8 -- the reference's quirk); else 0. ``strict=True`` (§5.3): the 0.8 only when p
    without whitespace and periods equals gt.
    """
    strict = _check_bool("strict", strict)
    g = normalize_gt(gt)
    ans = answer_content(completion)
    p = (completion if ans is None else ans).strip().lower()
    if p == g:
        return CLS_CORRECT
    if strict:
        return CLS_PARTIAL if "".join(p.split()).replace(".", "") == g else CLS_WRONG
    return CLS_PARTIAL if (g in p and len(p) <= CLS_PARTIAL_MAX_LEN) else CLS_WRONG


def _count_term(m: int, n: int) -> float:
    if m == n:
        return COUNT_EXACT
    return COUNT_OFF_BY_ONE if abs(m - n) == 1 else COUNT_OTHER


def loc_reward(completion: str, gt_boxes: Any, gt: Any, *,
               variant: str = DEFAULT_LOC_VARIANT, alpha: float = ALPHA) -> float:
    """R_loc (``anomaly_loc_reward``), in [-0.1, 1] for both variants.

    P = ``parse_boxes`` of the first ``<think>`` content (none without a think tag), m = |P|,
    n = |gt_boxes|. Normal sample (gt != a) or n = 0: focus term 0 / 0.5 / -0.1 for
    m = 0 / 1 / >= 2, as-is. Anomalous, n > 0, m = 0: 0. Otherwise
    r_raw = (sum of Hungarian-matched GIoUs) / m + alpha * r_count(m, n), then
    ``"normalized"``: clip((r_raw + 0.5) / 1.5, 0, 1); ``"clipped"``: clip(r_raw, 0, 1).
    """
    if variant not in LOC_VARIANTS:
        raise ValueError(f"loc variant must be one of {LOC_VARIANTS}, got {variant!r}")
    G = _as_boxes(gt_boxes, "gt_boxes")
    P = parse_boxes(think_content(completion) or "")
    m, n = len(P), len(G)
    if normalize_gt(gt) != ANOMALOUS or n == 0:
        return FOCUS_NONE if m == 0 else (FOCUS_ONE if m == 1 else FOCUS_MANY)
    if m == 0:
        return 0.0
    _, scores = match_boxes(P, G, "giou")
    r_raw = sum(scores) / m + float(alpha) * _count_term(m, n)
    if variant == "normalized":
        r_raw = (r_raw - LOC_NORM_MIN) / (LOC_NORM_MAX - LOC_NORM_MIN)
    return float(min(1.0, max(0.0, r_raw)))


def fmt_reward(completion: str, gt: Any = None, *, coord_limit: float = COORD_LIMIT,
               strict: bool = False) -> float:
    """R_fmt (``anomaly_cot_format``), a multiple of 0.1 in [0, 1.2].

    think (stripped) non-empty +0.3, > 10 chars +0.1; rethink present with non-empty stripped
    content +0.2, > 10 chars +0.1; answer content (stripped, lower-cased) exactly a/b +0.2, else
    containing a or b +0.1; if the think content is non-empty: a box in it +0.2 and, if every
    parsed coordinate is < ``coord_limit``, +0.1; else both ``[`` and ``]`` in it +0.1.
    ``gt`` is not used (the box bonus is paid for normal samples too) unless ``strict=True``
    (§5.3), where the box section is scored only for gt = a (``gt=None`` means normal, as
    everywhere, so strict mode then pays no box bonus).
    """
    strict = _check_bool("strict", strict)
    limit = float(coord_limit)
    r = 0.0
    think = (think_content(completion) or "").strip()
    if think:
        r += FMT_THINK + (FMT_THINK_LONG if len(think) > FMT_LONG_LEN else 0.0)
    rethink = (rethink_content(completion) or "").strip()
    if rethink:
        r += FMT_RETHINK + (FMT_RETHINK_LONG if len(rethink) > FMT_LONG_LEN else 0.0)
    ans = (answer_content(completion) or "").strip().lower()
    if ans in (ANOMALOUS, NORMAL):
        r += FMT_ANSWER_EXACT
    elif ANOMALOUS in ans or NORMAL in ans:
        r += FMT_ANSWER_PARTIAL
    if think and (not strict or normalize_gt(gt) == ANOMALOUS):
        boxes = _raw_boxes(think)
        if boxes:
            r += FMT_BOX
            if all(v < limit for b in boxes for v in b):
                r += FMT_BOX_IN_RANGE
        elif "[" in think and "]" in think:
            r += FMT_BRACKETS
    return round(r, 10)


def adfm_reward(completion: str, gt: Any, gt_boxes: Any, *,
                variant: str = DEFAULT_LOC_VARIANT, coord_limit: float = COORD_LIMIT,
                strict: bool = False) -> float:
    """Total R = R_cls + R_loc + R_fmt (weights 1, 1, 1), in [-0.1, 3.2]."""
    return (cls_reward(completion, gt, strict=strict)
            + loc_reward(completion, gt_boxes, gt, variant=variant)
            + fmt_reward(completion, gt, coord_limit=coord_limit, strict=strict))


def is_correct(completion: str, solution: Any) -> bool:
    """"Correct" for difficulty-aware resampling (AD-FM + EMIT): R_cls == 1, i.e. the answer
    equals the ground-truth letter exactly (partial credit 0.8 is not correct)."""
    return cls_reward(completion, solution) == CLS_CORRECT


def localization_iou(pred_boxes: Any, gt_boxes: Any) -> float:
    """Evaluation metric: mean IoU of predicted boxes against the ground truth, in [0, 1].

    One-to-one Hungarian matching on IoU (``match_boxes(..., score="iou")``), then
    ``sum(matched IoUs) / max(m, n)``: unmatched predictions (false alarms) and missed GT boxes
    both count 0, so over- and under-prediction are penalised alike. m = 0 < n -> 0;
    m > 0 = n -> 0; both empty (nothing to find and nothing predicted) -> 1.0 by definition
    (perfect agreement, like the Jaccard index of two empty sets). Inputs are box lists
    (``[k, 4]``), e.g. ``parse_boxes(think_content(c) or "")`` and a sample's ``bbox_answer``.
    """
    P, G = _as_boxes(pred_boxes, "pred_boxes"), _as_boxes(gt_boxes, "gt_boxes")
    if not P and not G:
        return 1.0
    _, scores = match_boxes(P, G, "iou")
    return float(sum(scores) / max(len(P), len(G)))


# ------------------------------------------------------------------------------------------
# Batched, registered rewards
# ------------------------------------------------------------------------------------------


def _coord_limits(coord_limit: Any, n: int) -> list[float]:
    if coord_limit is None:
        return [COORD_LIMIT] * n
    if isinstance(coord_limit, (bool, np.bool_)):
        raise TypeError("coord_limit must be a number or one number per completion, not a bool")
    if isinstance(coord_limit, (int, float, np.number)) and not isinstance(coord_limit, bool):
        return [float(coord_limit)] * n
    return [float(v) for v in _per_sample("coord_limit", coord_limit, n)]


@register_reward("adfm_cls", low=CLS_RANGE[0], high=CLS_RANGE[1],
                 aliases=("anomaly_cls_reward",))
def adfm_cls_rewards(completions: Sequence[str], *, solution: Sequence[Any],
                     strict: bool = False, **kwargs: Any) -> list[float]:
    """Batched ``cls_reward``: values {0, 0.8, 1}. ``solution``: one 'a'/'b' (or 'A'/'B')
    per completion."""
    strict = _check_bool("strict", strict)
    sols = _per_sample("solution", solution, len(completions))
    return [cls_reward(c, s, strict=strict) for c, s in zip(completions, sols)]


@register_reward("adfm_loc", low=LOC_RANGE[0], high=LOC_RANGE[1],
                 aliases=("anomaly_loc_reward",))
def adfm_loc_rewards(completions: Sequence[str], *, solution: Sequence[Any],
                     bbox_answer: Sequence[Any] | None = None,
                     loc_variant: str = DEFAULT_LOC_VARIANT, **kwargs: Any) -> list[float]:
    """Batched ``loc_reward``: values in [-0.1, 1]. ``bbox_answer``: one GT box list (None or
    [] for normal images) per completion; ``loc_variant``: "normalized" or "clipped"."""
    if not isinstance(loc_variant, str):
        raise TypeError(f"loc_variant must be a string, got {type(loc_variant).__name__}")
    if loc_variant not in LOC_VARIANTS:
        raise ValueError(f"loc_variant must be one of {LOC_VARIANTS}, got {loc_variant!r}")
    n = len(completions)
    sols = _per_sample("solution", solution, n)
    boxes = _per_sample("bbox_answer", bbox_answer, n)
    return [loc_reward(c, b, s, variant=loc_variant)
            for c, s, b in zip(completions, sols, boxes)]


@register_reward("adfm_fmt", low=FMT_RANGE[0], high=FMT_RANGE[1],
                 aliases=("anomaly_cot_format",))
def adfm_fmt_rewards(completions: Sequence[str], *, solution: Sequence[Any] | None = None,
                     coord_limit: Any = COORD_LIMIT, strict: bool = False,
                     **kwargs: Any) -> list[float]:
    """Batched ``fmt_reward``: multiples of 0.1 in [0, 1.2]. ``coord_limit``: a number or one
    per completion; ``solution`` is only needed with ``strict=True`` (checked if given)."""
    strict = _check_bool("strict", strict)
    n = len(completions)
    if solution is None and not strict:
        sols: list[Any] = [None] * n
    else:
        sols = _per_sample("solution", solution, n)
    lims = _coord_limits(coord_limit, n)
    return [fmt_reward(c, s, coord_limit=lim, strict=strict)
            for c, s, lim in zip(completions, sols, lims)]


__all__ = [
    "Box", "parse_boxes", "think_content", "rethink_content", "answer_content",
    "iou", "giou", "match_boxes", "normalize_gt", "cls_reward", "loc_reward", "fmt_reward",
    "adfm_reward", "is_correct", "localization_iou",
    "adfm_cls_rewards", "adfm_loc_rewards", "adfm_fmt_rewards",
    "ANOMALOUS", "NORMAL", "TAG_FLAGS", "THINK_PATTERN", "RETHINK_PATTERN", "ANSWER_PATTERN",
    "BOX_PATTERN", "CLS_CORRECT", "CLS_PARTIAL", "CLS_WRONG", "CLS_PARTIAL_MAX_LEN", "ALPHA",
    "FOCUS_NONE", "FOCUS_ONE", "FOCUS_MANY", "COUNT_EXACT", "COUNT_OFF_BY_ONE", "COUNT_OTHER",
    "LOC_NORM_MIN", "LOC_NORM_MAX", "LOC_VARIANTS", "DEFAULT_LOC_VARIANT", "COORD_LIMIT",
    "FMT_THINK", "FMT_THINK_LONG", "FMT_RETHINK", "FMT_RETHINK_LONG", "FMT_ANSWER_EXACT",
    "FMT_ANSWER_PARTIAL", "FMT_BOX", "FMT_BOX_IN_RANGE", "FMT_BRACKETS", "FMT_LONG_LEN",
    "CLS_RANGE", "LOC_RANGE", "FMT_RANGE", "ADFM_REWARDS", "ADFM_WEIGHTS",
]
