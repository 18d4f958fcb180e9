"""AD-FM rewards (docs/reference/adfm.md §2.3-§2.5, §5.3): worked examples, GIoU/IoU against independent
references, Hungarian matching against brute force, ranges, strict mode, quirks, the registry,
and ``localization_iou``."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emit_jax.rl import adfm as A
from emit_jax.rl import rewards as R

FAST = settings(derandomize=True, max_examples=120, deadline=None)
GT_BOX = [[100, 100, 200, 200]]
TOL = 1e-5

# ------------------------------------------------------------------------------------------
# Independent references
# ------------------------------------------------------------------------------------------


def raster(box, size):
    """Boolean mask of an integer box [x1, y1, x2, y2] (cells x1 <= x < x2, y1 <= y < y2)."""
    m = np.zeros((size, size), dtype=bool)
    x1, y1, x2, y2 = box
    m[y1:y2, x1:x2] = True
    return m


def raster_giou_iou(p, g, size):
    mp, mg = raster(p, size), raster(g, size)
    inter = int((mp & mg).sum())
    union = int((mp | mg).sum())
    enc = (max(p[2], g[2]) - min(p[0], g[0])) * (max(p[3], g[3]) - min(p[1], g[1]))
    v = inter / union
    return v - (enc - union) / enc, v


def brute_force_best(S):
    """Maximum total score of a one-to-one matching of the rows and columns of S [m, n]."""
    m, n = S.shape
    if m <= n:
        return max(sum(S[i, c] for i, c in enumerate(cols))
                   for cols in itertools.permutations(range(n), m))
    return max(sum(S[r, j] for j, r in enumerate(rows))
               for rows in itertools.permutations(range(m), n))


def ref_first(s, tag):
    """First <tag>...</tag> content by plain string search on the lower-cased text."""
    low = s.lower()
    i = low.find(f"<{tag}>")
    if i < 0:
        return None
    j = low.find(f"</{tag}>", i + len(tag) + 2)
    return None if j < 0 else s[i + len(tag) + 2:j]


@st.composite
def int_box(draw, lo=0, hi=12):
    x1, x2 = sorted(draw(st.lists(st.integers(lo, hi), min_size=2, max_size=2, unique=True)))
    y1, y2 = sorted(draw(st.lists(st.integers(lo, hi), min_size=2, max_size=2, unique=True)))
    return [x1, y1, x2, y2]


# ------------------------------------------------------------------------------------------
# docs/reference/adfm.md §2.5 worked examples
# ------------------------------------------------------------------------------------------

# (id, gt, completion, GT boxes, R_cls, R_loc normalized, R_loc clipped, R_fmt, total .py)
EXAMPLES = [
    ("1-perfect-ish", "a",
     "<think>Stage 1: the region [110,110,210,210] differs from Image-1.</think>"
     "<rethink>A dark scratch crosses this region; it is a real defect.</rethink>"
     "<answer>a</answer>",
     GT_BOX, 1.0, 0.97610, 0.96414, 1.2, 3.17610),
    ("2-normal-focus", "b",
     "<think>Inspecting [0,0,50,50]; it matches the reference.</think><answer>b</answer>",
     [], 1.0, 0.5, 0.5, 0.9, 2.4),
    ("3-two-boxes", "a",
     "<think>Suspicious regions: [110,110,210,210] and [300,300,350,350].</think>"
     "<answer>A.</answer>",
     GT_BOX, 0.8, 0.65471, 0.48207, 0.8, 2.25471),
    ("4-wrong-box", "a",
     "<think>Suspicious region: [300,300,350,350].</think><answer>a</answer>",
     GT_BOX, 1.0, 0.0, 0.0, 0.9, 1.9),
    ("5-three-boxes-normal", "b",
     "<think>Checked [10,10,60,60], [100,100,150,150] and [200,200,250,250].</think>"
     "<answer>b</answer>",
     [], 1.0, -0.1, -0.1, 0.9, 1.8),
    ("6-no-tags-normal-quirk", "a", "normal", GT_BOX, 0.8, 0.0, 0.0, 0.0, 0.8),
]


@pytest.mark.parametrize("letter_case", [str.lower, str.upper], ids=["a/b", "A/B"])
@pytest.mark.parametrize("ex", EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_worked_examples(ex, letter_case):
    _, gt, c, boxes, cls, loc_n, loc_c, fmt, total = ex
    gt = letter_case(gt)
    assert A.cls_reward(c, gt) == pytest.approx(cls, abs=TOL)
    assert A.loc_reward(c, boxes, gt) == pytest.approx(loc_n, abs=TOL)
    assert A.loc_reward(c, boxes, gt, variant="normalized") == pytest.approx(loc_n, abs=TOL)
    assert A.loc_reward(c, boxes, gt, variant="clipped") == pytest.approx(loc_c, abs=TOL)
    assert A.fmt_reward(c) == pytest.approx(fmt, abs=TOL)
    assert A.fmt_reward(c, gt) == pytest.approx(fmt, abs=TOL)
    assert A.adfm_reward(c, gt, boxes) == pytest.approx(total, abs=TOL)
    assert A.adfm_reward(c, gt, boxes, variant="clipped") == pytest.approx(
        cls + loc_c + fmt, abs=TOL)
    # the normal rows' focus term does not depend on the GT boxes
    if gt.lower() == "b":
        assert A.loc_reward(c, GT_BOX, gt) == loc_n


def test_worked_example_intermediates():
    g = A.giou([110, 110, 210, 210], GT_BOX[0])
    assert g == pytest.approx(0.66414, abs=TOL)
    assert g == pytest.approx(8100 / 11900 - 200 / 12100, abs=1e-12)
    assert A.giou([300, 300, 350, 350], GT_BOX[0]) == pytest.approx(-0.8, abs=1e-12)
    pairs, scores = A.match_boxes([[110, 110, 210, 210], [300, 300, 350, 350]], GT_BOX)
    assert pairs == [(0, 0)] and scores == pytest.approx([g])


# ------------------------------------------------------------------------------------------
# IoU / GIoU
# ------------------------------------------------------------------------------------------


@FAST
@given(int_box(), int_box())
def test_giou_iou_match_rasterised_reference(p, g):
    ref_giou, ref_iou = raster_giou_iou(p, g, 13)
    assert A.iou(p, g) == pytest.approx(ref_iou, abs=1e-12)
    assert A.giou(p, g) == pytest.approx(ref_giou, abs=1e-12)
    assert A.iou(p, g) == pytest.approx(A.iou(g, p), abs=1e-12)       # symmetric
    assert A.giou(p, g) == pytest.approx(A.giou(g, p), abs=1e-12)
    assert -1.0 <= A.giou(p, g) <= A.iou(p, g) <= 1.0


@FAST
@given(int_box(hi=40), int_box(hi=40), st.sampled_from([0.37, 1.5, 1e-3, 1e120, 1e-120]))
def test_giou_iou_scale_invariant_and_finite(p, g, k):
    ref_giou, ref_iou = raster_giou_iou(p, g, 41)
    ps, gs = [v * k for v in p], [v * k for v in g]
    assert A.iou(ps, gs) == pytest.approx(ref_iou, abs=1e-9)
    assert A.giou(ps, gs) == pytest.approx(ref_giou, abs=1e-9)


def test_giou_hand_values_and_fallback():
    assert A.iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert A.giou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert A.iou([0, 0, 10, 10], [0, 0, 10, 5]) == 0.5
    # disjoint: IoU 0, GIoU = -(C - U)/C = -(400 - 200)/400
    assert A.iou([0, 0, 10, 10], [10, 10, 20, 20]) == 0.0
    assert A.giou([0, 0, 10, 10], [10, 10, 20, 20]) == -0.5
    # C <= 0 (both boxes on one vertical line): falls back to IoU (0, union empty), no 0/0
    assert A.giou([5, 5, 5, 9], [5, 1, 5, 3]) == 0.0
    assert A.giou([3, 3, 3, 3], [3, 3, 3, 3]) == 0.0
    # C > 0 but both boxes have zero area: IoU 0, GIoU -1
    assert A.iou([0, 0, 0, 0], [1, 1, 1, 1]) == 0.0
    assert A.giou([0, 0, 0, 0], [1, 1, 1, 1]) == -1.0
    # inverted box (x1 > x2): zero area, reference formula -> -(C - U)/C = -(50 - 25)/50
    assert A.giou([10, 0, 0, 10], [0, 0, 5, 5]) == -0.5
    # huge coordinates stay finite (the reference's areas would overflow to inf -> NaN)
    assert A.giou([0, 0, 1e300, 1e300], [0, 0, 5e299, 1e300]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="non-finite"):
        A.giou([0, 0, math.inf, 1], [0, 0, 1, 1])
    with pytest.raises(ValueError, match="4 numbers"):
        A.iou([0, 0, 1], [0, 0, 1, 1])


# ------------------------------------------------------------------------------------------
# Hungarian matching
# ------------------------------------------------------------------------------------------


@FAST
@given(st.lists(int_box(hi=20), min_size=1, max_size=4),
       st.lists(int_box(hi=20), min_size=1, max_size=4), st.sampled_from(["giou", "iou"]))
def test_match_boxes_is_optimal_vs_brute_force(pred, gt, score):
    fn = A.giou if score == "giou" else A.iou
    S = np.array([[fn(p, g) for g in gt] for p in pred])
    pairs, scores = A.match_boxes(pred, gt, score=score)
    assert len(pairs) == min(len(pred), len(gt))
    assert len({i for i, _ in pairs}) == len(pairs) == len({j for _, j in pairs})  # 1-to-1
    assert [i for i, _ in pairs] == sorted(i for i, _ in pairs)
    assert scores == pytest.approx([S[i, j] for i, j in pairs], abs=1e-12)
    assert sum(scores) == pytest.approx(brute_force_best(S), abs=1e-9)


def test_match_boxes_beats_greedy_and_edge_cases():
    gt = [[0, 0, 10, 10], [4, 0, 14, 10]]
    pred = [[1, 0, 12, 10], [0, 0, 6, 10]]      # greedy: P0-G0 (0.75) + P1-G1 (0.14)
    pairs, scores = A.match_boxes(pred, gt, score="iou")
    assert pairs == [(0, 1), (1, 0)]
    assert scores == pytest.approx([80 / 130, 0.6])
    assert A.match_boxes([], gt) == ([], [])
    assert A.match_boxes(pred, None) == ([], [])
    assert A.match_boxes(np.zeros((0, 4)), np.array(gt)) == ([], [])
    with pytest.raises(ValueError, match="score must be"):
        A.match_boxes(pred, gt, score="dice")


# ------------------------------------------------------------------------------------------
# Parsing
# ------------------------------------------------------------------------------------------


def test_parse_boxes_formats():
    text = ("[1,2,3,4] [ 1.5 , 2 ,3,\n4 ] [-1,2,3,4] [1,2,3] [1e3,2,3,4] [.5,1,2,3] "
            "(5,6,7,8) [10, 20, 30, 40.25]")
    assert A.parse_boxes(text) == [(1.0, 2.0, 3.0, 4.0), (1.5, 2.0, 3.0, 4.0),
                                   (10.0, 20.0, 30.0, 40.25)]
    assert A.parse_boxes("no boxes [here]") == []
    # degenerate / inverted boxes count (as in the reference) unless ordered_only
    assert A.parse_boxes("[50,50,10,10] [5,5,5,9] [0,0,1,1]") == [
        (50.0, 50.0, 10.0, 10.0), (5.0, 5.0, 5.0, 9.0), (0.0, 0.0, 1.0, 1.0)]
    assert A.parse_boxes("[50,50,10,10] [5,5,5,9] [0,0,1,1]", ordered_only=True) == [
        (0.0, 0.0, 1.0, 1.0)]
    # a number overflowing float is dropped
    assert A.parse_boxes("[" + "9" * 400 + ",1,2,3] [1,2,3,4]") == [(1.0, 2.0, 3.0, 4.0)]


@FAST
@given(st.lists(st.sampled_from(["<think>", "</think>", "<THINK>", "</Think>", "<answer>",
                                 "</ANSWER>", "<Answer>", "</answer>", "<rethink>",
                                 "</ReThink>", "x", "a", " ", "\n"]), max_size=14).map("".join))
def test_tag_contents_first_match_case_insensitive(s):
    assert A.think_content(s) == ref_first(s, "think")
    assert A.answer_content(s) == ref_first(s, "answer")
    assert A.rethink_content(s) == ref_first(s, "rethink")


def test_tag_contents_examples():
    c = "<THINK> one </think><think>two</think><Answer>\nB\n</ANSWER><answer>a</answer>"
    assert A.think_content(c) == " one "
    assert A.answer_content(c) == "\nB\n"
    assert A.rethink_content(c) is None
    assert A.think_content("<think>unclosed") is None


# ------------------------------------------------------------------------------------------
# R_cls
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("completion, gt, expected, expected_strict", [
    ("<answer>a</answer>", "a", 1.0, 1.0),
    ("<answer> A </answer>", "A", 1.0, 1.0),
    ("  B \n", "b", 1.0, 1.0),                                   # no tag: whole completion
    ("<answer>A.</answer>", "a", 0.8, 0.8),
    ("<answer>a .\n</answer>", "a", 0.8, 0.8),                   # whitespace + period removed
    ("<answer>normal</answer>", "a", 0.8, 0.0),                  # the "normal" quirk
    ("normal", "a", 0.8, 0.0),
    ("normal", "b", 0.0, 0.0),                                   # no "b" in "normal"
    ("<answer>A. Yes.</answer>", "a", 0.8, 0.0),
    ("<answer>(a)</answer>", "a", 0.8, 0.0),
    ("<answer>aaaaaaaaaa</answer>", "a", 0.8, 0.0),              # len 10: partial
    ("<answer>aaaaaaaaaaa</answer>", "a", 0.0, 0.0),             # len 11: nothing
    ("<answer>b</answer>", "a", 0.0, 0.0),
    ("<answer>a</answer>", "b", 0.0, 0.0),
    ("<answer>b</answer><answer>a</answer>", "a", 0.0, 0.0),     # first match only
    ("<ANSWER>a</Answer>", "a", 1.0, 1.0),                       # case-insensitive tags
    ("<answer>a</answer>", "Yes", 0.0, 0.0),                     # gt not 'a' -> 'b'
    ("<answer>b</answer>", None, 1.0, 1.0),                      # None -> 'b'
    ("", "a", 0.0, 0.0),
])
def test_cls_reward_cases(completion, gt, expected, expected_strict):
    assert A.cls_reward(completion, gt) == expected
    assert A.cls_reward(completion, gt, strict=True) == expected_strict
    assert A.is_correct(completion, gt) == (expected == 1.0)


def test_normalize_gt():
    assert [A.normalize_gt(v) for v in ("a", "A", " a\n", "b", "B", "yes", "", None)] == [
        "a", "a", "a", "b", "b", "b", "b", "b"]


# ------------------------------------------------------------------------------------------
# R_loc
# ------------------------------------------------------------------------------------------


def think(*boxes, extra=""):
    return ("<think>Regions " + " ".join(str(list(b)) for b in boxes) + extra
            + "</think><answer>a</answer>")


def test_loc_focus_rule():
    for gt, gt_boxes in (("b", []), ("b", GT_BOX), ("a", []), ("a", None), ("B", None)):
        assert A.loc_reward(think(), gt_boxes, gt) == 0.0
        assert A.loc_reward(think([1, 2, 3, 4]), gt_boxes, gt) == 0.5
        assert A.loc_reward(think([1, 2, 3, 4], [5, 6, 7, 8]), gt_boxes, gt) == -0.1
        assert A.loc_reward(think([1, 2, 3, 4], [5, 6, 7, 8]), gt_boxes, gt,
                            variant="clipped") == -0.1
    # an inverted box still counts as a box (reference parser)
    assert A.loc_reward(think([50, 50, 10, 10]), [], "b") == 0.5


def test_loc_count_term_and_unmatched_predictions():
    exact, far1, far2 = [100, 100, 200, 200], [300, 300, 350, 350], [400, 10, 450, 60]
    # anomalous, n > 0, m = 0 -> 0 (not the focus value)
    assert A.loc_reward(think(), GT_BOX, "a") == 0.0
    # m = 3, n = 1: unmatched predictions score 0 (not their negative GIoU), r_count -0.1
    r_raw = 1.0 / 3 + 0.3 * -0.1
    c = think(exact, far1, far2)
    assert A.loc_reward(c, GT_BOX, "a", variant="clipped") == pytest.approx(r_raw, abs=1e-12)
    assert A.loc_reward(c, GT_BOX, "a") == pytest.approx((r_raw + 0.5) / 1.5, abs=1e-12)
    # m = 1, n = 2: mean over m -> 1.0 + 0.3 * 0.5 = 1.15 -> clipped at 1 in both variants
    two = [[100, 100, 200, 200], [300, 300, 400, 400]]
    assert A.loc_reward(think(exact), two, "a") == 1.0
    assert A.loc_reward(think(exact), two, "a", variant="clipped") == 1.0
    # m = n = 2, both exact: 1 + 0.3 -> 1
    assert A.loc_reward(think(*reversed(two)), two, "A") == 1.0
    # alpha is a parameter
    g = A.giou([110, 110, 210, 210], GT_BOX[0])
    c1 = think([110, 110, 210, 210])
    assert A.loc_reward(c1, GT_BOX, "a", alpha=0.0) == pytest.approx((g + 0.5) / 1.5)
    assert A.loc_reward(c1, GT_BOX, "a", alpha=0.0, variant="clipped") == pytest.approx(g)
    # GT boxes may be an array
    assert A.loc_reward(c1, np.array(GT_BOX, dtype=np.float32), "a") == pytest.approx(0.97610,
                                                                                     abs=TOL)


def test_loc_only_first_think_block_counts():
    box = "[100,100,200,200]"
    outside = [
        f"{box}<think>looking closely here</think><answer>a</answer>",
        f"<think>looking closely here</think><rethink>{box}</rethink><answer>{box} a</answer>",
        f"<think>first pass</think><think>{box}</think><answer>a</answer>",
        f"no tags {box}",
        f"<think>{box}",                                          # unclosed think
    ]
    for c in outside:
        assert A.loc_reward(c, GT_BOX, "a") == 0.0               # m = 0
        assert A.loc_reward(c, [], "b") == 0.0                   # focus with m = 0
    assert A.loc_reward(f"<Think>{box}</THINK>", GT_BOX, "a") == 1.0


def test_loc_errors():
    with pytest.raises(ValueError, match="variant"):
        A.loc_reward(think(), GT_BOX, "a", variant="paper")
    with pytest.raises(ValueError, match="wrap it"):
        A.loc_reward(think(), [100, 100, 200, 200], "a")
    with pytest.raises(ValueError, match="4 numbers"):
        A.loc_reward(think(), [[100, 100, 200]], "a")
    with pytest.raises(TypeError, match="string"):
        A.loc_reward(think(), "[[1,2,3,4]]", "a")
    with pytest.raises(ValueError, match="non-finite"):
        A.loc_reward(think(), [[0, 0, math.nan, 1]], "a")


# ------------------------------------------------------------------------------------------
# R_fmt
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("completion, expected", [
    ("<think>short</think>", 0.3),                                        # <= 10 chars
    ("<think>first pass</think>", 0.3),                                   # exactly 10
    ("<think>first pass!</think>", 0.4),                                  # 11
    ("<think>   </think><rethink> </rethink><answer> </answer>", 0.0),    # empty contents
    ("<rethink>ok</rethink>", 0.2),
    ("<rethink>long enough text</rethink>", 0.3),
    ("<answer> B </answer>", 0.2),
    ("<answer>Yes, (a)</answer>", 0.1),
    ("<answer>no</answer>", 0.0),
    ("<think>[1,2,3,4]</think>", 0.3 + 0.2 + 0.1),
    ("<think>Region [1,2,3,4].</think>", 0.4 + 0.2 + 0.1),
    ("<think>the region [top left] looks odd</think>", 0.4 + 0.1),        # bracket hint
    ("<think>a region ] looks [ odd</think>", 0.4 + 0.1),                 # order irrelevant
    ("<think>a region [1,2,3] looks odd</think>", 0.4 + 0.1),             # not a box
    ("<think>region at [100,100,505,200]</think>", 0.4 + 0.2),            # 505 loses 0.1
    ("<think>region at [100,100,504.99,200]</think>", 0.4 + 0.3),
    ("<think>[1,2,3,4] and [600,2,3,4]</think>", 0.4 + 0.2),              # all coords
    ("<think>x</think>[1,2,3,4]<rethink>[1,2,3,4]</rethink>", 0.3 + 0.2), # outside think
    ("<think>  </think>[1,2,3,4]", 0.0),
    ("<THINK>Region [1,2,3,4].</think><ReThink>Deep scratch found.</RETHINK>"
     "<Answer> A </aNSWER>", 1.2),
    ("<think>A</think><think>[1,2,3,4] longer text</think>", 0.3),        # first think only
])
def test_fmt_reward_cases(completion, expected):
    assert A.fmt_reward(completion) == pytest.approx(expected, abs=1e-12)
    assert A.fmt_reward(completion, "a", strict=True) == pytest.approx(expected, abs=1e-12)
    # the value is exactly a multiple of 0.1 (rounded), never 1.2000000000000002
    assert A.fmt_reward(completion) == round(A.fmt_reward(completion), 1)


def test_fmt_coord_limit_and_overflow():
    c = "<think>region at [100,100,505,200]</think>"
    assert A.fmt_reward(c) == pytest.approx(0.6)
    assert A.fmt_reward(c, coord_limit=505.5) == pytest.approx(0.7)
    assert A.fmt_reward(c, coord_limit=100) == pytest.approx(0.6)
    # an overflowing coordinate is still a box for R_fmt, and fails the < limit test
    big = "<think>[" + "9" * 400 + ",1,2,3]</think>"
    assert A.fmt_reward(big) == pytest.approx(0.4 + 0.2)
    # the coordinate limit does not affect R_loc
    assert A.loc_reward("<think>[100,100,505,200]</think>", [], "b") == 0.5


def test_fmt_strict_box_bonus_only_for_anomalous():
    ex2 = EXAMPLES[1][2]
    assert A.fmt_reward(ex2) == pytest.approx(0.9)                    # quirk: paid for normal
    assert A.fmt_reward(ex2, "b") == pytest.approx(0.9)
    assert A.fmt_reward(ex2, "b", strict=True) == pytest.approx(0.6)
    assert A.fmt_reward(ex2, "B", strict=True) == pytest.approx(0.6)
    assert A.fmt_reward(ex2, "A", strict=True) == pytest.approx(0.9)
    hint = "<think>the region [top left] looks odd</think>"
    assert A.fmt_reward(hint, "b", strict=True) == pytest.approx(0.4)
    assert A.fmt_reward(hint, "a", strict=True) == pytest.approx(0.5)
    ex1 = EXAMPLES[0][2]
    assert A.fmt_reward(ex1, "a", strict=True) == 1.2
    assert A.fmt_reward(ex2, None, strict=True) == pytest.approx(0.6)   # None means normal
    with pytest.raises(TypeError, match="bool"):
        A.fmt_reward(ex2, "a", strict="yes")


# ------------------------------------------------------------------------------------------
# Ranges (property tests)
# ------------------------------------------------------------------------------------------

_NUM = st.one_of(st.integers(0, 1000).map(str),
                 st.floats(0, 1000, allow_nan=False).map(lambda f: f"{f:.2f}"),
                 st.just("9" * 320))
_BOX_STR = st.builds(lambda xs, sep: "[" + sep.join(xs) + "]",
                     st.lists(_NUM, min_size=4, max_size=4), st.sampled_from([",", ", ", " , "]))
_PIECE = st.one_of(
    st.text(max_size=15),
    st.sampled_from(["<think>", "</think>", "<THINK>", "</Think>", "<rethink>", "</rethink>",
                     "<answer>", "</answer>", "<Answer>", "a", "b", "A.", "normal", "[", "]",
                     " ", "\n", "a region that looks different"]),
    _BOX_STR)
_THINK_WITH_BOXES = st.builds(lambda bs, t: "<think>" + " ".join(bs) + "</think>" + t,
                             st.lists(_BOX_STR, min_size=1, max_size=5), st.text(max_size=10))
COMPLETIONS = st.one_of(st.text(max_size=60), st.lists(_PIECE, max_size=12).map("".join),
                        _THINK_WITH_BOXES)
GT_BOXES = st.one_of(st.none(), st.lists(
    st.lists(st.floats(0, 600, allow_nan=False), min_size=4, max_size=4), min_size=1,
    max_size=4), st.just([]))
GTS = st.sampled_from(["a", "b", "A", "B", " a ", "yes", None])


@FAST
@given(COMPLETIONS, GTS, GT_BOXES)
def test_rewards_finite_and_inside_registered_ranges(c, gt, boxes):
    for strict in (False, True):
        r = A.cls_reward(c, gt, strict=strict)
        assert r in (0.0, 0.8, 1.0)
        lo, hi = R.REWARD_RANGES["adfm_cls"]
        assert lo <= r <= hi
        r = A.fmt_reward(c, gt, strict=strict)
        lo, hi = R.REWARD_RANGES["adfm_fmt"]
        assert math.isfinite(r) and lo <= r <= hi and r == round(r, 1)
    for variant, g in itertools.product(A.LOC_VARIANTS, (gt, "a")):   # "a": matching path
        r = A.loc_reward(c, boxes, g, variant=variant)
        lo, hi = R.REWARD_RANGES["adfm_loc"]
        assert math.isfinite(r) and lo <= r <= hi
        if A.normalize_gt(g) == "b" or not boxes:
            assert r in (0.0, 0.5, -0.1)                      # focus values only
        else:
            assert r >= 0.0
    total = A.adfm_reward(c, gt, boxes)
    assert R.reward_range(A.ADFM_REWARDS, A.ADFM_WEIGHTS) == (-0.1, 3.2)
    assert -0.1 <= total <= 3.2


@FAST
@given(st.lists(int_box(hi=600), min_size=1, max_size=4),
       st.lists(int_box(hi=600), min_size=1, max_size=4), st.sampled_from(["a", "A"]))
def test_loc_matches_brute_force_formula(pred, gt_boxes, gt):
    """Anomalous, n > 0, m > 0: R_loc from the spec's formula with a brute-force matching."""
    c = "<think>Regions: " + ", ".join(f"[{a}, {b}, {x}, {y}]" for a, b, x, y in pred)
    c += ".</think><answer>a</answer>"
    m, n = len(pred), len(gt_boxes)
    S = np.array([[raster_giou_iou(p, g, 601)[0] for g in gt_boxes] for p in pred])
    count = 1.0 if m == n else (0.5 if abs(m - n) == 1 else -0.1)
    r_raw = brute_force_best(S) / m + 0.3 * count
    norm = A.loc_reward(c, gt_boxes, gt)
    clipped = A.loc_reward(c, gt_boxes, gt, variant="clipped")
    assert norm == pytest.approx(min(1.0, max(0.0, (r_raw + 0.5) / 1.5)), abs=1e-9)
    assert clipped == pytest.approx(min(1.0, max(0.0, r_raw)), abs=1e-9)
    assert 0.0 <= clipped <= norm <= 1.0


@FAST
@given(_THINK_WITH_BOXES, st.lists(st.lists(st.floats(0, 1e6, allow_nan=False), min_size=4,
                                            max_size=4), min_size=1, max_size=4))
def test_loc_range_on_matching_path(c, boxes):
    """Anomalous with n > 0 and m > 0 (inverted, degenerate and overflowing boxes included)."""
    m = len(A.parse_boxes(A.think_content(c)))
    for variant in A.LOC_VARIANTS:
        r = A.loc_reward(c, boxes, "a", variant=variant)
        assert math.isfinite(r) and 0.0 <= r <= 1.0
        if m == 0:                      # every box overflowed
            assert r == 0.0


# ------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------


def test_registry_names_aliases_and_ranges():
    for name, alias, fn, rng in (("adfm_cls", "anomaly_cls_reward", A.adfm_cls_rewards,
                                  (0.0, 1.0)),
                                 ("adfm_loc", "anomaly_loc_reward", A.adfm_loc_rewards,
                                  (-0.1, 1.0)),
                                 ("adfm_fmt", "anomaly_cot_format", A.adfm_fmt_rewards,
                                  (0.0, 1.2))):
        assert R.get_reward(name) is fn and R.get_reward(alias) is fn
        assert R.REWARD_RANGES[name] == R.REWARD_RANGES[alias] == rng


@pytest.mark.parametrize("variant", A.LOC_VARIANTS)
@pytest.mark.parametrize("strict", [False, True])
def test_combine_equals_sum_of_per_completion_functions(variant, strict):
    comps = [e[2] for e in EXAMPLES] + ["<think>[0,0,600,10]</think><answer>b</answer>"]
    sols = ["A" if e[1] == "a" else "B" for e in EXAMPLES] + ["b"]
    boxes = [e[3] for e in EXAMPLES] + [None]
    limits = [505] * len(EXAMPLES) + [700]
    total, per = R.combine(list(A.ADFM_REWARDS), [1, 1, 1], comps, solution=sols,
                           bbox_answer=boxes, loc_variant=variant, coord_limit=limits,
                           strict=strict, task_type=["x"] * len(comps), lengths=[1] * 7)
    cls = [A.cls_reward(c, s, strict=strict) for c, s in zip(comps, sols)]
    loc = [A.loc_reward(c, b, s, variant=variant) for c, s, b in zip(comps, sols, boxes)]
    fmt = [A.fmt_reward(c, s, coord_limit=lim, strict=strict)
           for c, s, lim in zip(comps, sols, limits)]
    np.testing.assert_array_equal(per["adfm_cls"], cls)
    np.testing.assert_array_equal(per["adfm_loc"], loc)
    np.testing.assert_array_equal(per["adfm_fmt"], fmt)
    np.testing.assert_allclose(total, np.add(np.add(cls, loc), fmt), atol=1e-12)
    assert fmt[-1] == pytest.approx(0.4 + 0.2 + (0.0 if strict else 0.3))   # limit 700
    if variant == "normalized" and not strict:
        np.testing.assert_allclose(total[:6], [e[8] for e in EXAMPLES], atol=TOL)
    # aliases give the same result
    t2, _ = R.combine(["anomaly_cls_reward", "anomaly_loc_reward", "anomaly_cot_format"],
                      [1, 1, 1], comps, solution=sols, bbox_answer=boxes, loc_variant=variant,
                      coord_limit=limits, strict=strict)
    np.testing.assert_array_equal(total, t2)


def test_batched_errors_and_defaults():
    comps = [EXAMPLES[0][2], EXAMPLES[1][2]]
    with pytest.raises(ValueError, match="solution has 1 entries for 2"):
        A.adfm_cls_rewards(comps, solution=["a"])
    with pytest.raises(TypeError, match="not a string"):
        A.adfm_cls_rewards(comps, solution="ab")
    with pytest.raises(ValueError, match="solution is required"):
        A.adfm_loc_rewards(comps, solution=None, bbox_answer=[GT_BOX, []])
    with pytest.raises(ValueError, match="bbox_answer is required"):
        A.adfm_loc_rewards(comps, solution=["a", "b"])
    with pytest.raises(ValueError, match="bbox_answer has 3 entries for 2"):
        A.adfm_loc_rewards(comps, solution=["a", "b"], bbox_answer=[GT_BOX, [], []])
    with pytest.raises(ValueError, match="loc_variant"):
        A.adfm_loc_rewards(comps, solution=["a", "b"], bbox_answer=[GT_BOX, []],
                           loc_variant="old")
    with pytest.raises(TypeError, match="loc_variant"):
        A.adfm_loc_rewards(comps, solution=["a", "b"], bbox_answer=[GT_BOX, []],
                           loc_variant=["clipped", "clipped"])
    with pytest.raises(TypeError, match="not a bool"):
        A.adfm_fmt_rewards(comps, coord_limit=True)
    with pytest.raises(ValueError, match="coord_limit has 3 entries for 2"):
        A.adfm_fmt_rewards(comps, coord_limit=[505, 505, 505])
    with pytest.raises(ValueError, match="solution has 1 entries"):
        A.adfm_fmt_rewards(comps, solution=["a"])
    with pytest.raises(ValueError, match="solution is required"):
        A.adfm_fmt_rewards(comps, strict=True)
    with pytest.raises(TypeError, match="strict must be a bool"):
        A.adfm_cls_rewards(comps, solution=["a", "b"], strict=[True, False])
    with pytest.raises(ValueError, match="reward 'adfm_cls' returned|solution has"):
        R.combine(["adfm_cls"], [1], comps, solution=["a", "b", "a"])
    # solution is optional for the non-strict format reward; unknown kwargs are ignored
    assert A.adfm_fmt_rewards(comps, options=["A. Yes.", "B. No."]) == [1.2, 0.9]
    assert A.adfm_fmt_rewards(comps, coord_limit=10) == pytest.approx([1.1, 0.8])
    assert A.adfm_cls_rewards([], solution=[]) == []
    assert A.adfm_loc_rewards([], solution=[], bbox_answer=[]) == []


# ------------------------------------------------------------------------------------------
# is_correct / localization_iou
# ------------------------------------------------------------------------------------------


def test_is_correct():
    assert A.is_correct("<think>x</think><answer>A</answer>", "A")
    assert A.is_correct("<answer>b</answer>", "B")
    assert not A.is_correct("<answer>A.</answer>", "A")           # partial credit is not correct
    assert not A.is_correct("normal", "a")
    assert not A.is_correct("<answer>b</answer>", "a")


@pytest.mark.parametrize("pred, gt, expected", [
    ([[0, 0, 10, 10]], [[0, 0, 10, 10]], 1.0),
    ([[0, 0, 10, 10]], [[0, 0, 10, 5]], 0.5),
    ([[0, 0, 10, 10]], [[20, 20, 30, 30]], 0.0),
    ([[0, 0, 10, 10], [50, 50, 60, 60]], [[0, 0, 10, 10]], 0.5),   # false alarm counts 0
    ([[0, 0, 10, 10]], [[0, 0, 10, 10], [50, 50, 60, 60]], 0.5),   # missed GT counts 0
    ([[50, 50, 60, 60], [0, 0, 10, 10]], [[0, 0, 10, 10], [50, 50, 60, 60]], 1.0),  # order
    ([[1, 0, 12, 10], [0, 0, 6, 10]], [[0, 0, 10, 10], [4, 0, 14, 10]],
     (80 / 130 + 0.6) / 2),                                         # Hungarian, not greedy
    ([], [], 1.0),                                                  # defined: agreement
    (None, [], 1.0),
    ([], [[0, 0, 10, 10]], 0.0),
    ([[0, 0, 10, 10]], [], 0.0),
    ([[0, 0, 10, 10]], None, 0.0),
])
def test_localization_iou_hand_cases(pred, gt, expected):
    assert A.localization_iou(pred, gt) == pytest.approx(expected, abs=1e-12)


def test_localization_iou_from_completion():
    c = EXAMPLES[2][2]                          # boxes [110,...] and [300,...]; GT one box
    v = A.localization_iou(A.parse_boxes(A.think_content(c)), GT_BOX)
    assert v == pytest.approx((8100 / 11900) / 2, abs=1e-12)
