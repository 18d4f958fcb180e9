"""EMIT stage-2 rewards (docs/reference/emit.md §11.4): exact values, the registry, and property tests."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emit_jax.rl import rewards as R

FAST = settings(max_examples=200, deadline=None)


# ------------------------------------------------------------------------------------------
# Independent reference implementations (no regex)
# ------------------------------------------------------------------------------------------


def ref_format(s: str) -> float:
    """§11.4(3) by hand: starts with <think>, some </think> followed by whitespace then <answer>,
    and the string ends with </answer> after that <answer>."""
    if not (s.startswith("<think>") and s.endswith("</answer>")):
        return 0.0
    end_close = len(s) - len("</answer>")
    p = s.find("</think>", len("<think>"))
    while p != -1:
        q = p + len("</think>")
        while q < len(s) and s[q].isspace():
            q += 1
        if s.startswith("<answer>", q) and q + len("<answer>") <= end_close:
            return 1.0
        p = s.find("</think>", p + 1)
    return 0.0


def ref_extract(s: str) -> str:
    """§11.4(1) step 1 by hand: the leftmost <answer> whose nearest </answer> has no newline
    in between; else the whole text."""
    i = s.find("<answer>")
    while i != -1:
        j = s.find("</answer>", i + len("<answer>"))
        if j == -1:
            break
        inner = s[i + len("<answer>"):j]
        if "\n" not in inner:
            return inner.strip()
        i = s.find("<answer>", i + 1)
    return s.strip()


def ref_accuracy(s: str, sol: str) -> float:
    def norm(x):
        x = x.strip()
        for ch in (" ", "_", ".", "\n"):
            x = x.replace(ch, "")
        return x.lower()

    a, g = norm(ref_extract(s)), norm(sol)
    if a not in ("a", "b", "c", "d"):
        return -1.0
    return 1.0 if a == g else 0.0


def ref_cosine(acc: float, L: int) -> float:
    """§11.4(2) in NumPy, the spec's form a_T + (a_0 - a_T)(1 + cos(pi t / T)) / 2."""
    if acc == -1:
        return -1.0
    a0, aT = (1.0, 0.5) if acc == 1 else (-0.5, 0.0)
    t, T = max(0, L - 256), 512 - 256
    return float(aT + (a0 - aT) * (1 + np.cos(np.pi * t / T)) / 2)


def ref_repetition(s: str, n: int = 4, max_penalty: float = -1.0) -> float:
    words = s.lower().split()
    if len(words) < n:
        return 0.0
    grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    total = sum(grams.values())
    return max_penalty * (1 - len(grams) / total)


# ------------------------------------------------------------------------------------------
# Constants and defaults
# ------------------------------------------------------------------------------------------


def test_defaults_follow_spec_order():
    assert R.DEFAULT_REWARDS == ("accuracy", "cosine", "format", "repetition")
    assert R.DEFAULT_WEIGHTS == (3.0, 1.0, 1.0, 1.0)       # accuracy gets 3 (§11.4, §13)
    assert R.reward_range() == (-5.0, 5.0)
    assert (R.COSINE_MAX_LEN, R.SOFT_CACHE_LENGTH) == (512, 256)
    assert (R.REPETITION_NGRAM_SIZE, R.REPETITION_MAX_PENALTY) == (4, -1.0)
    assert R.get_reward("external_cls_acc_choice") is R.get_reward("accuracy")
    assert R.get_reward("external_cosine") is R.get_reward("cosine")


# ------------------------------------------------------------------------------------------
# Format (§11.4(3))
# ------------------------------------------------------------------------------------------

FORMAT_CASES = [
    ("<think>x</think><answer>A</answer>", 1.0),
    ("<think>\nline 1\nline 2\n</think>\n<answer>B</answer>", 1.0),
    ("<think>a</think>  \n\t <answer>\nA\n</answer>", 1.0),       # answer spans lines (DOTALL)
    ("<think></think><answer></answer>", 1.0),                      # empty contents are fine
    ("<think>a</think>\u3000<answer>A</answer>", 1.0),              # Unicode whitespace (\s)
    ("<think><think>a</think></think><answer>A</answer>", 1.0),     # nested: .*? backtracks
    ("<think>a</think><answer>A</answer><answer>B</answer>", 1.0),  # repeated answer tags
    ("<think>a</think></think><answer>x</answer>", 1.0),
    (" <think>a</think><answer>A</answer>", 0.0),                   # leading space
    ("\n<think>a</think><answer>A</answer>", 0.0),                  # leading newline
    ("<think>a</think><answer>A</answer>\n", 0.0),                  # trailing newline
    ("<think>a</think><answer>A</answer> ", 0.0),                   # trailing space
    ("<think>a</think><answer>A</answer>.", 0.0),                   # trailing text
    ("Sure! <think>a</think><answer>A</answer>", 0.0),              # text before
    ("<think>a</think> so <answer>A</answer>", 0.0),                # text between
    ("<answer>A</answer>", 0.0),                                    # missing think
    ("<think>a</think>", 0.0),                                      # missing answer
    ("<think>a</think><answer>A", 0.0),                             # unclosed answer
    ("<think>a<answer>A</answer>", 0.0),                            # unclosed think
    ("<THINK>a</THINK><ANSWER>A</ANSWER>", 0.0),                    # case-sensitive
    ("<answer>A</answer><think>a</think>", 0.0),                    # wrong order
    ("", 0.0),
    ("A", 0.0),
]


@pytest.mark.parametrize("text,expected", FORMAT_CASES)
def test_format_exact(text, expected):
    assert R.format_reward(text) == expected
    assert ref_format(text) == expected
    assert R.format_rewards([text]) == [expected]


# ------------------------------------------------------------------------------------------
# Accuracy (§11.4(1))
# ------------------------------------------------------------------------------------------

ACC_CASES = [
    ("<think>x</think><answer>B</answer>", "B", 1.0),
    ("<answer>B.</answer>", "B", 1.0),               # spec example: "b", valid
    ("<answer>B. Yes</answer>", "B", -1.0),          # spec example: "byes", invalid
    ("B", "B", 1.0),                                 # bare letter, no tags
    ("  b.\n", "B", 1.0),
    ("<answer> b </answer>", " B. ", 1.0),
    ("<answer>a_</answer>", "A", 1.0),               # underscores deleted
    ("<answer>C</answer>", "B", 0.0),                # wrong but valid
    ("<answer>D</answer>", "A", 0.0),
    ("<answer>E</answer>", "E", -1.0),               # E is never valid
    ("<answer>A</answer><answer>B</answer>", "B", 0.0),   # first match wins
    ("<answer>\nB\n</answer>", "B", -1.0),           # no DOTALL -> fallback to whole text
    ("<answer>x\n</answer><answer>C</answer>", "C", 1.0),  # first *matching* tag
    ("The answer is B", "B", -1.0),
    ("", "A", -1.0),
    ("", "", -1.0),                                  # equal but invalid -> -1 overrides
    ("<answer></answer>", "A", -1.0),
    ("<answer>A\tB</answer>", "A", -1.0),            # tabs are not deleted
    ("<think>I pick A</think><answer>a</answer>", "A", 1.0),
]


@pytest.mark.parametrize("text,sol,expected", ACC_CASES)
def test_accuracy_exact(text, sol, expected):
    assert R.accuracy_reward(text, sol) == expected
    assert ref_accuracy(text, sol) == expected
    assert R.accuracy_rewards([text], solution=[sol]) == [expected]
    assert R.is_correct(text, sol) == (expected == 1.0)


def test_accuracy_helpers_and_valid_letters():
    assert R.extract_answer("<think>t</think><answer> B. </answer>") == "B."
    assert R.extract_answer("  no tags here ") == "no tags here"
    assert R.normalize_answer(" B._\n") == "b"
    # faithful default: a-d valid for every question (two-option AD questions included)
    assert R.accuracy_reward("<answer>C</answer>", "A") == 0.0
    assert R.accuracy_reward("<answer>C</answer>", "A", valid_letters=("A", "B")) == -1.0
    with pytest.raises(TypeError):
        R.accuracy_reward("<answer>E</answer>", "E", valid_letters="ABCDE")
    assert R.accuracy_reward("<answer>E</answer>", "E", valid_letters=list("ABCDE")) == 1.0
    out = R.accuracy_rewards(["<answer>C</answer>"] * 2, solution=["A", "A"],
                             valid_letters=[("A", "B"), None])
    assert out == [-1.0, 0.0]
    # the record's ``options`` field (option texts) does not change the faithful reward
    assert R.accuracy_rewards(["<answer>C</answer>"], solution=["A"],
                              options=[["Yes", "No"]]) == [0.0]
    assert R.accuracy_reward("<answer>A</answer>", None) == 0.0


# ------------------------------------------------------------------------------------------
# Cosine (§11.4(2))
# ------------------------------------------------------------------------------------------

SPEC_TABLE = [(0, 1.0, -0.5), (256, 1.0, -0.5), (300, 0.9644, -0.4644), (384, 0.75, -0.25),
              (450, 0.5689, -0.0689), (512, 0.5, 0.0)]


@pytest.mark.parametrize("L,correct,wrong", SPEC_TABLE)
def test_cosine_spec_table(L, correct, wrong):
    assert R.cosine_from_accuracy(1.0, L) == pytest.approx(correct, abs=5e-5)
    assert R.cosine_from_accuracy(0.0, L) == pytest.approx(wrong, abs=5e-5)
    assert R.cosine_from_accuracy(-1.0, L) == -1.0


@pytest.mark.parametrize("L", [0, 1, 100, 255, 256, 257, 300, 384, 450, 511, 512, 513, 640, 768,
                               1000, 10_000])
def test_cosine_matches_numpy_formula(L):
    for acc in (1.0, 0.0, -1.0):
        assert R.cosine_from_accuracy(acc, L) == pytest.approx(ref_cosine(acc, L), abs=1e-12)
    # exact ends and middle of the curve
    if L <= 256:
        assert (R.cosine_from_accuracy(1.0, L), R.cosine_from_accuracy(0.0, L)) == (1.0, -0.5)
    if L == 512:
        assert R.cosine_from_accuracy(1.0, L) == pytest.approx(0.5, abs=1e-15)
        assert R.cosine_from_accuracy(0.0, L) == pytest.approx(0.0, abs=1e-15)
    if L == 384:  # t = T/2
        assert R.cosine_from_accuracy(1.0, L) == pytest.approx(0.75, abs=1e-15)
        assert R.cosine_from_accuracy(0.0, L) == pytest.approx(-0.25, abs=1e-15)
    if L == 768:  # t = 2T: not clipped, the curve is back at a_0 (§15 #16)
        assert R.cosine_from_accuracy(1.0, L) == pytest.approx(1.0, abs=1e-15)


def test_cosine_batched_and_length_sources():
    comps = ["<think>x</think><answer>B</answer>", "<answer>C</answer>", "<answer>nope</answer>"]
    sols = ["B", "B", "B"]
    out = R.cosine_rewards(comps, solution=sols, lengths=[300, 384, 10])
    assert out == pytest.approx([ref_cosine(1, 300), ref_cosine(0, 384), -1.0], abs=1e-12)
    assert R.cosine_reward(comps[0], "B", 300) == pytest.approx(ref_cosine(1, 300), abs=1e-12)
    # length_fn / tokenizer (.encode, like the reference's len(tokenizer.encode(text)))
    by_len = R.cosine_rewards(comps, solution=sols, length_fn=lambda s: 300)
    assert by_len[0] == pytest.approx(ref_cosine(1, 300))

    class WordTokenizer:
        def encode(self, text):
            return text.split() * 100

    tok = R.cosine_rewards(["<answer>A</answer> " + "w " * 3], solution=["A"],
                           tokenizer=WordTokenizer())
    assert tok == pytest.approx([ref_cosine(1, 400)])
    with pytest.raises(ValueError, match="lengths"):
        R.cosine_rewards(comps, solution=sols)
    with pytest.raises(ValueError):
        R.cosine_rewards(comps, solution=sols, lengths=[1, 2])
    with pytest.raises(ValueError):
        R.cosine_from_accuracy(0.5, 10)
    with pytest.raises(ValueError):
        R.cosine_from_accuracy(1.0, 10, max_len=256)
    # overriding the §13 constants
    assert R.cosine_from_accuracy(1.0, 0, min_len_value_correct=2.0) == 2.0


# ------------------------------------------------------------------------------------------
# Repetition (§11.4(4))
# ------------------------------------------------------------------------------------------

REP_CASES = [
    ("a b c d a b c d", -0.2),                        # spec example: 5 four-grams, 4 unique
    ("A b C d a B c D", -0.2),                        # lower-cased
    ("a\tb\nc  d\u3000a b c d", -0.2),                 # any whitespace separates words
    ("one two three four five six", 0.0),             # fresh text
    ("a b c", 0.0),                                   # fewer than 4 words
    ("", 0.0),
    ("   ", 0.0),
    ("x " * 100, -(1 - 1 / 97)),                      # 97 four-grams, 1 unique
    ("the cat sat on the cat sat on", -0.2),
    ("<think>the cat sat on the cat sat on</think>", 0.0),   # tags stick to the edge words
]


@pytest.mark.parametrize("text,expected", REP_CASES)
def test_repetition_exact(text, expected):
    assert R.repetition_penalty(text) == pytest.approx(expected, abs=1e-12)
    assert R.repetition_penalty(text) == pytest.approx(ref_repetition(text), abs=1e-12)
    assert R.repetition_rewards([text]) == [R.repetition_penalty(text)]


def test_repetition_repeated_vs_fresh():
    fresh = " ".join(f"w{i}" for i in range(300))
    repeated = " ".join(["the product looks normal"] * 75)
    assert R.repetition_penalty(fresh) == 0.0
    assert R.repetition_penalty(repeated) == pytest.approx(ref_repetition(repeated))
    assert R.repetition_penalty(repeated) < -0.98
    assert R.repetition_penalty("a b c d e", ngram_size=2, max_penalty=-0.5) == 0.0


# ------------------------------------------------------------------------------------------
# Registry and combine
# ------------------------------------------------------------------------------------------


def test_combine_defaults_exact():
    comps = ["<think>x</think><answer>B</answer>",      # correct, formatted, short
             "B",                                        # correct, unformatted, 300 tokens
             "<think>x</think><answer>C</answer>",       # wrong, formatted, 384 tokens
             "<answer>B. Yes</answer> " + "go " * 10]    # invalid, repetitive
    lengths = [10, 300, 384, 40]
    total, parts = R.combine(R.DEFAULT_REWARDS, R.DEFAULT_WEIGHTS, comps,
                             solution=["B"] * 4, lengths=lengths, task_type=["AD"] * 4)
    assert list(parts) == list(R.DEFAULT_REWARDS)
    np.testing.assert_array_equal(parts["accuracy"], [1, 1, 0, -1])
    np.testing.assert_array_equal(parts["format"], [1, 0, 1, 0])
    np.testing.assert_allclose(parts["cosine"], [1.0, ref_cosine(1, 300), -0.25, -1.0], atol=1e-12)
    rep = ref_repetition(comps[3])
    np.testing.assert_allclose(parts["repetition"], [0, 0, 0, rep], atol=1e-12)
    want = [3 + 1 + 1, 3 + ref_cosine(1, 300), -0.25 + 1, -3 - 1 + rep]
    np.testing.assert_allclose(total, want, atol=1e-12)
    assert total.dtype == np.float64 and total.shape == (4,)


def test_register_user_reward_and_combine():
    name = "test_user_char_budget"

    @R.register_reward(name, low=0.0, high=1.0)
    def char_budget(completions, *, solution=None, budget=None, **kwargs):
        return [1.0 if len(c) <= b else 0.0 for c, b in zip(completions, budget)]

    try:
        assert R.get_reward(name) is char_budget
        assert R.REWARD_RANGES[name] == (0.0, 1.0)
        with pytest.raises(ValueError, match="already registered"):
            R.register_reward(name)(lambda completions, **kw: [0.0] * len(completions))
        comps = ["<think>a</think><answer>A</answer>", "A"]
        total, parts = R.combine(["format", name], [0.5, 2.0], comps, solution=["A", "A"],
                                 budget=[5, 5])
        np.testing.assert_array_equal(parts[name], [0.0, 1.0])
        np.testing.assert_array_equal(total, [0.5, 2.0])
        assert R.reward_range(["format", name], [0.5, 2.0]) == (0.0, 2.5)
        assert R.reward_range(["format", name], [-1.0, 2.0]) == (-1.0, 2.0)
    finally:
        R.unregister_reward(name)
    with pytest.raises(KeyError, match="unknown reward"):
        R.get_reward(name)


def test_adfm_style_reward_reads_record_fields():
    """An AD-FM-like reward (ground truth in ``answer``/``bbox_answer``, no ``solution``)."""
    name = "test_adfm_cls"

    @R.register_reward(name, low=0.0, high=1.0)
    def cls(completions, *, answer, bbox_answer, **kwargs):
        return [1.0 if R.extract_answer(c).lower() == a else 0.0
                for c, a in zip(completions, answer)]

    try:
        total, parts = R.combine([name, "format"], [1.0, 1.0],
                                 ["<think>[1,2,3,4]</think><answer>a</answer>", "b"],
                                 answer=["a", "a"], bbox_answer=[[[1, 2, 3, 4]], []])
        np.testing.assert_array_equal(total, [2.0, 0.0])
    finally:
        R.unregister_reward(name)


def test_combine_none_is_nan_and_skipped():
    name = "test_sometimes_none"
    R.register_reward(name, low=0.0, high=1.0)(
        lambda completions, **kw: [None if c == "skip" else 1.0 for c in completions])
    try:
        total, parts = R.combine([name, "format"], [2.0, 1.0], ["skip", "x"])
        assert math.isnan(parts[name][0]) and parts[name][1] == 1.0
        np.testing.assert_array_equal(total, [0.0, 2.0])
    finally:
        R.unregister_reward(name)


def test_combine_errors():
    with pytest.raises(ValueError):
        R.combine(["format"], [1.0, 2.0], ["x"])
    with pytest.raises(ValueError):
        R.combine(["format", "format"], [1.0, 1.0], ["x"])
    with pytest.raises(TypeError):
        R.combine(["accuracy"], [1.0], ["x"], solution="A")      # a string, not a list
    with pytest.raises(ValueError):
        R.combine(["accuracy"], [1.0], ["x", "y"], solution=["A"])
    with pytest.raises(KeyError):
        R.combine(["nope"], [1.0], ["x"])
    with pytest.raises(TypeError):
        R.combine(["format"], [1.0], "x")
    total, parts = R.combine(R.DEFAULT_REWARDS, R.DEFAULT_WEIGHTS, [], solution=[], lengths=[])
    assert total.shape == (0,) and all(v.shape == (0,) for v in parts.values())


# ------------------------------------------------------------------------------------------
# Property tests
# ------------------------------------------------------------------------------------------

FRAGMENTS = ["<think>", "</think>", "<answer>", "</answer>", "A", "b", "C.", "D", "E", " ", "\n",
             "\t", "\u3000", "word", "é", "_", ".", "<", ">", "answer", "think", "Yes"]
tagged = st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join)
repeated = st.tuples(st.text(max_size=20), st.integers(1, 2000)).map(lambda t: t[0] * t[1])
texts = st.one_of(st.text(), tagged, repeated)
solutions = st.sampled_from(["A", "B", "C", "D", "E", "", "b.", " a ", "Yes"])

BUILTIN = {"accuracy": (-1.0, 1.0), "cosine": (-1.0, 1.0), "format": (0.0, 1.0),
           "repetition": (-1.0, 0.0)}


@FAST
@given(text=texts, sol=solutions, length=st.integers(0, 100_000))
def test_any_string_gives_finite_reward_in_range(text, sol, length):
    for name, (lo, hi) in BUILTIN.items():
        assert R.REWARD_RANGES[name] == (lo, hi)
        (v,) = R.get_reward(name)([text], solution=[sol], lengths=[length])
        assert isinstance(v, float) and math.isfinite(v)
        assert lo <= v <= hi, (name, v)
    assert R.accuracy_reward(text, sol) in (-1.0, 0.0, 1.0)
    assert R.format_reward(text) in (0.0, 1.0)
    assert R.repetition_penalty(text) > -1.0


@FAST
@given(text=st.one_of(tagged, st.text()), sol=solutions)
def test_regex_rules_match_hand_written_reference(text, sol):
    assert R.format_reward(text) == ref_format(text)
    assert R.extract_answer(text) == ref_extract(text)
    assert R.accuracy_reward(text, sol) == ref_accuracy(text, sol)
    assert R.is_correct(text, sol) == (ref_accuracy(text, sol) == 1.0)


@FAST
@given(text=st.one_of(texts, st.lists(st.sampled_from(["a", "b", "c", "A", "x y"]),
                                      max_size=300).map(" ".join)))
def test_repetition_matches_reference(text):
    assert R.repetition_penalty(text) == pytest.approx(ref_repetition(text), abs=1e-12)


@FAST
@given(acc=st.sampled_from([1.0, 0.0, -1.0]), length=st.integers(0, 1_000_000))
def test_cosine_matches_formula_everywhere(acc, length):
    assert R.cosine_from_accuracy(acc, length) == pytest.approx(ref_cosine(acc, length), abs=1e-9)


@FAST
@given(batch=st.lists(st.tuples(texts, solutions, st.integers(0, 5000)), min_size=1, max_size=8),
       weights=st.lists(st.floats(-5, 5, allow_nan=False), min_size=4, max_size=4))
def test_combine_totals_within_documented_range(batch, weights):
    comps, sols, lens = map(list, zip(*batch))
    total, parts = R.combine(R.DEFAULT_REWARDS, R.DEFAULT_WEIGHTS, comps, solution=sols,
                             lengths=lens)
    assert total.shape == (len(comps),) and np.isfinite(total).all()
    assert (total >= -5.0).all() and (total <= 5.0).all()
    want = sum(w * parts[n] for n, w in zip(R.DEFAULT_REWARDS, R.DEFAULT_WEIGHTS))
    np.testing.assert_allclose(total, want, atol=1e-12)
    lo, hi = R.reward_range(R.DEFAULT_REWARDS, weights)
    total_w, _ = R.combine(R.DEFAULT_REWARDS, weights, comps, solution=sols, lengths=lens)
    assert np.isfinite(total_w).all()
    assert (total_w >= lo - 1e-9).all() and (total_w <= hi + 1e-9).all()
