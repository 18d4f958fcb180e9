"""Fuzzing with hypothesis (issue 7 item 6): the rewards, the answer parsers, the JSONL and MMAD
readers, the mask-to-grid rule and the MMAD scoring never raise an undocumented exception, and
their outputs stay inside the documented ranges.

tests/test_rewards.py already checks the rewards against hand-written references on tag soup;
this file adds arbitrary Unicode (control characters, surrogates), nested / unbalanced tags,
huge repeats, arbitrary solutions, lengths and letter sets, every registered reward and
``combine`` with arbitrary weights.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from emit_jax.data import embedded, prompts, tasks
from emit_jax.data.jsonl import read_jsonl
from emit_jax.data.mmad import (OPTION_LETTERS, QUESTION_TYPES, MMADError, iter_prompts,
                                load_domain_knowledge, read_mmad)
from emit_jax.data.mvtec import DataError, Report
from emit_jax.eval import scoring
from emit_jax.rl import rewards as R

# Deterministic (CI), no deadline (2 shared cores), a few hundred examples per property.
FUZZ = settings(max_examples=300, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FUZZ_IO = settings(FUZZ, max_examples=200)  # properties that write a file per example

# ----------------------------------------------------------------------------- text strategies
TAGS = ["<think>", "</think>", "<answer>", "</answer>", "<answer >", "< /answer>", "<ANSWER>",
        "<think", "answer>", "</", "<"]
FRAGMENTS = TAGS + ["A", "B", "c", "d.", "E", "F", " ", "\n", "\r\n", "\t", "\x00", "\x1b",
                    "\u2028", "\u3000", "\u200b", "é", "İ", "ß", "_", ".", "Yes", "word",
                    "\ud800", "🙂", "A B C D"]
any_chars = st.characters(blacklist_categories=())          # every code point, surrogates too
unicode_text = st.text(any_chars, max_size=200)
tag_soup = st.lists(st.sampled_from(FRAGMENTS) | unicode_text, max_size=40).map("".join)


def _wrap(inner: st.SearchStrategy) -> st.SearchStrategy:
    return st.tuples(st.sampled_from(["think", "answer"]), inner,
                     st.sampled_from(["open", "close", "both", "none"])).map(
        lambda t: ((f"<{t[0]}>" if t[2] in ("open", "both") else "") + t[1]
                   + (f"</{t[0]}>" if t[2] in ("close", "both") else "")))


nested_tags = st.recursive(st.one_of(tag_soup, st.sampled_from(["A", " b ", "C.", ""])),
                           lambda inner: st.one_of(_wrap(inner),
                                                   st.lists(inner, max_size=3).map("".join)),
                           max_leaves=12)
huge_repeats = st.tuples(st.sampled_from(FRAGMENTS) | st.text(any_chars, max_size=12),
                         st.integers(1, 5000)).map(lambda t: t[0] * t[1])
completions_st = st.one_of(unicode_text, tag_soup, nested_tags, huge_repeats)
solutions_st = st.one_of(st.none(), st.sampled_from(["A", "B", "C", "D", "E", "", " b. ", "a_",
                                                     "Yes", "\nD\n"]), unicode_text)
lengths_st = st.one_of(st.integers(-10**6, 10**6), st.integers(-10**30, 10**30),
                       st.sampled_from([0, 255, 256, 257, 511, 512, 513, 768, 10**400, -10**400]))
letters_st = st.one_of(st.none(), st.lists(st.sampled_from(["A", "b", "C", "d", "E", "x", "",
                                                            " c ", "1"]), max_size=6))

# Rewards defined in emit_jax.rl.rewards itself (names and aliases); other tests may register
# temporary ones in the same session.
BUILTIN_REWARDS = sorted(n for n, f in R.REWARDS.items()
                         if getattr(f, "__module__", None) == R.__name__)
EXACT_VALUES = {"accuracy": {-1.0, 0.0, 1.0}, "external_cls_acc_choice": {-1.0, 0.0, 1.0},
                "format": {0.0, 1.0}}


def test_builtin_registry_is_what_the_module_documents():
    assert set(BUILTIN_REWARDS) == {"accuracy", "external_cls_acc_choice", "cosine",
                                    "external_cosine", "format", "repetition"}
    assert R.reward_range() == (-5.0, 5.0)


# ------------------------------------------------------------------------------------ rewards
@FUZZ
@example(batch=[("<answer>A</answer>", "A", 10**400, None), ("B", "A", 10**30 + 1, None),
                ("x", None, -10**400, [])])
@given(batch=st.lists(st.tuples(completions_st, solutions_st, lengths_st, letters_st),
                      max_size=5))
def test_every_registered_reward_finite_and_in_range(batch):
    comps = [b[0] for b in batch]
    sols = [b[1] for b in batch]
    lens = [b[2] for b in batch]
    vls = [b[3] for b in batch]
    acc = R.accuracy_rewards(comps, solution=sols, valid_letters=vls)
    for name in BUILTIN_REWARDS:
        out = R.get_reward(name)(comps, solution=sols, lengths=lens, valid_letters=vls,
                                 task_type=["x"] * len(comps))
        lo, hi = R.REWARD_RANGES[name]
        assert len(out) == len(comps)
        for v, a in zip(out, acc):
            assert isinstance(v, float) and math.isfinite(v), (name, v)
            assert lo <= v <= hi, (name, v)
            if name in EXACT_VALUES:
                assert v in EXACT_VALUES[name], (name, v)
            if name == "repetition":
                assert -1.0 < v <= 0.0
            if name in ("cosine", "external_cosine"):      # the per-accuracy bands
                band = {1.0: (0.5, 1.0), 0.0: (-0.5, 0.0), -1.0: (-1.0, -1.0)}[a]
                assert band[0] <= v <= band[1], (a, v)


def _sometimes_not_applicable(completions, **kwargs):
    """A TRL-style reward that returns None ("not applicable") for some completions."""
    return [None if len(c) % 2 else 0.5 for c in completions]


@FUZZ
@given(batch=st.lists(st.tuples(completions_st, solutions_st, lengths_st), max_size=5),
       names=st.lists(st.sampled_from(BUILTIN_REWARDS + ["fuzz_none"]), unique=True,
                      max_size=len(BUILTIN_REWARDS) + 1),
       weights=st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=7, max_size=7))
def test_combine_total_inside_reward_range(batch, names, weights):
    comps, sols, lens = ([b[i] for b in batch] for i in range(3))
    w = weights[:len(names)]
    R.register_reward("fuzz_none", low=0.0, high=0.5, overwrite=True)(_sometimes_not_applicable)
    try:
        total, parts = R.combine(names, w, comps, solution=sols, lengths=lens)
        lo, hi = R.reward_range(names, w)
    finally:
        R.unregister_reward("fuzz_none")
    assert total.shape == (len(comps),) and total.dtype == np.float64
    assert np.isfinite(total).all()                          # None -> NaN is skipped by nansum
    assert set(parts) == set(names)
    tol = 1e-9 * (1 + sum(abs(x) for x in w))
    assert (total >= lo - tol).all() and (total <= hi + tol).all()


@FUZZ
@given(c=completions_st, s=solutions_st, v=letters_st)
def test_answer_extraction_and_accuracy(c, s, v):
    ans = R.extract_answer(c)
    assert isinstance(ans, str) and ans == ans.strip() and ans in c
    norm = R.normalize_answer(ans)
    assert not any(ch in norm for ch in R.ANSWER_DELETE_CHARS)
    valid = R.VALID_LETTERS if v is None else tuple(R.normalize_answer(x) for x in v)
    acc = R.accuracy_reward(c, s, v)
    assert acc in (-1.0, 0.0, 1.0)
    assert (acc == -1.0) == (norm not in valid)
    ok = R.is_correct(c, s, v)
    assert isinstance(ok, bool) and ok == (acc == 1.0)
    if ok:
        assert norm in valid and norm == R.normalize_answer("" if s is None else s)


@FUZZ
@example(acc=1.0, length=10**400, max_len=512, soft=256, values=[1.0, 0.5, -0.5, 0.0, -1.0])
@example(acc=0.0, length=-10**400, max_len=512, soft=256, values=[1.0, 0.5, -0.5, 0.0, -1.0])
@given(acc=st.sampled_from([1.0, 0.0, -1.0]), length=lengths_st,
       max_len=st.integers(-5, 2000), soft=st.integers(-5, 2000),
       values=st.lists(st.floats(-10, 10, allow_nan=False), min_size=5, max_size=5))
def test_cosine_any_length_any_constants(acc, length, max_len, soft, values):
    a0c, aTc, a0w, aTw, inv = values
    kw = dict(max_len=max_len, soft_cache_length=soft, min_len_value_correct=a0c,
              max_len_value_correct=aTc, min_len_value_wrong=a0w, max_len_value_wrong=aTw,
              invalid_value=inv)
    if max_len <= soft:
        with pytest.raises(ValueError, match="max_len > soft_cache_length"):
            R.cosine_from_accuracy(acc, length, **kw)
        return
    v = R.cosine_from_accuracy(acc, length, **kw)
    assert isinstance(v, float) and math.isfinite(v)
    a, b = {1.0: (a0c, aTc), 0.0: (a0w, aTw), -1.0: (inv, inv)}[acc]
    assert min(a, b) - 1e-12 <= v <= max(a, b) + 1e-12
    if acc != -1.0 and length <= soft:
        assert v == a                                       # t = 0: the short-completion value


@FUZZ
@given(acc=st.one_of(st.floats(allow_nan=True), st.integers(-3, 3)).filter(
    lambda x: x not in (1.0, 0.0, -1.0)), length=st.integers(0, 1000))
def test_cosine_rejects_other_accuracies(acc, length):
    with pytest.raises(ValueError, match="invalid accuracy reward"):
        R.cosine_from_accuracy(acc, length)


@FUZZ
@given(c=completions_st, n=st.integers(-2, 8))
def test_repetition_penalty_any_ngram_size(c, n):
    v = R.repetition_penalty(c, ngram_size=n)
    assert isinstance(v, float) and math.isfinite(v) and -1.0 < v <= 0.0


# ------------------------------------------------------------------------------ answer parsers
option_keys = st.one_of(st.sampled_from(list("ABCDEFG")), st.text(max_size=3))
options_st = st.one_of(st.none(), st.dictionaries(option_keys, st.text(any_chars, max_size=30),
                                                  max_size=6))
response_st = st.one_of(unicode_text, tag_soup, nested_tags,
                        huge_repeats.map(lambda s: s[:20_000]))


@FUZZ
@given(text=response_st, options=options_st, think=st.booleans(),
       pick=st.sampled_from(["first", "last"]), fallback=st.sampled_from(["fuzzy", "none"]))
def test_parse_answer_returns_none_or_an_offered_letter(text, options, think, pick, fallback):
    got = scoring.parse_answer(text, options, think=think, pick=pick, fallback=fallback)
    span = scoring.extract_answer_span(text) if think else text.strip()
    standalone = re.findall(r"\b([A-E])\b", span)
    if standalone:                                          # a letter written in the response
        assert got == (standalone[0] if pick == "first" else standalone[-1])
    elif fallback == "none":
        assert got is None
    elif options is None:                                   # first character, else "A"
        assert got in scoring.VALID_LETTERS or (got is None and span == "")
    elif options:                                           # fuzzy match: always some option
        assert got in options
    else:
        assert got is None


@FUZZ
@given(text=response_st)
def test_extract_answer_span_is_a_stripped_piece(text):
    span = scoring.extract_answer_span(text)
    assert isinstance(span, str) and span == span.strip() and span in text


# ---------------------------------------------------------------------------------- JSON data
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                         st.text(any_chars, max_size=12))
json_values = st.recursive(json_scalars,
                           lambda c: st.lists(c, max_size=4)
                           | st.dictionaries(st.text(max_size=8), c, max_size=4),
                           max_leaves=12)


def maybe(valid: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly the valid value, sometimes any JSON value (a wrong type)."""
    return st.one_of(valid, valid, valid, json_values)


def _dump_line(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass")


def _node_paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _node_paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _node_paths(v, prefix + (i,))


@st.composite
def mutated(draw, valid: st.SearchStrategy, max_mutations: int = 2):
    """A valid document with 0..max_mutations random edits: some node (at any depth) replaced
    by an arbitrary JSON value, or a key deleted, or a key added."""
    obj = copy.deepcopy(draw(valid))
    for _ in range(draw(st.integers(0, max_mutations))):
        paths = list(_node_paths(obj))[1:]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = obj
        for k in path[:-1]:
            parent = parent[k]
        how = draw(st.sampled_from(["replace", "delete", "add"]))
        if how == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif how == "add" and isinstance(parent, dict):
            parent[draw(st.text(max_size=6))] = draw(json_values)
        else:
            parent[path[-1]] = draw(json_values)
    return obj


JSONL_IMAGES = ["a.png", "b/c.png", "d/e f.jpg", "g.png", "h.png", "../up.png"]


@st.composite
def valid_jsonl_records(draw):
    images = draw(st.lists(st.sampled_from(JSONL_IMAGES), max_size=3))
    options = draw(st.lists(st.text(max_size=6), min_size=2, max_size=4))
    answer = draw(st.sampled_from(prompts.LETTERS[:len(options)]))
    user = {"role": "user", "content": "<image>" * len(images) + draw(st.text(max_size=20))}
    rec = {"id": draw(st.text(max_size=6)), "images": images, "messages": [user],
           "task_type": draw(st.sampled_from(prompts.TASKS)), "options": options}
    if draw(st.booleans()):                                  # stage 1: the answer is a turn
        rec["messages"].append({"role": "assistant", "content": answer})
    else:                                                    # stage 2: the answer is a field
        rec["solution"] = answer
    return rec


jsonl_line = st.one_of(mutated(valid_jsonl_records()).map(_dump_line),
                       mutated(valid_jsonl_records()).map(_dump_line),
                       json_values.map(_dump_line), st.binary(max_size=40),
                       st.sampled_from([b"", b"  ", b"\r", b"[" * 5000, b"\xff\xfe",
                                        b"{\"a\": \"\xc3\"}", b"1" * 5000]))
jsonl_files = st.lists(jsonl_line, max_size=6).map(b"\n".join) | st.binary(max_size=200)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("fuzz"))


def _check_record(rec, data_root):
    assert isinstance(rec, dict)
    msgs, images = rec["messages"], rec.get("images", [])
    assert msgs[0]["role"] == "user" and isinstance(msgs[0]["content"], str)
    assert isinstance(images, list) and all(isinstance(p, str) for p in images)
    assert msgs[0]["content"].count("<image>") == len(images)
    if data_root is not None:
        root = os.path.realpath(data_root)
        assert all(os.path.commonpath([root, os.path.realpath(p)]) == root for p in images)
    assert rec.get("task_type") is None or rec["task_type"] in prompts.TASKS


@FUZZ_IO
@example(data=b"\x80\n" + b"[" * 5000 + b"\n" + b"1" * 5000 + b'\n{"messages": [1]}', with_root=False)
@example(data=b'{"images": ["a\\u0000.png"], "messages": [{"role": "user", "content": "<image>"}]}',
         with_root=True)
@example(data=b'{"id": [], "messages": [{"role": "user", "content": ""}, 5]}', with_root=False)
@given(data=jsonl_files, with_root=st.booleans())
def test_read_jsonl_arbitrary_bytes(fuzz_dir, data, with_root):
    path = os.path.join(fuzz_dir, "data.jsonl")
    with open(path, "wb") as f:
        f.write(data)
    root = fuzz_dir if with_root else None
    n_lines = len(data.split(b"\n"))
    try:
        got = list(read_jsonl(path, data_root=root))
    except DataError as e:
        m = re.match(re.escape(path) + r":(\d+): \S", str(e))
        assert m and 1 <= int(m.group(1)) <= n_lines, str(e)
        assert "\n" not in str(e)
    else:
        for rec in got:
            _check_record(rec, root)
    report = Report("skip")
    got = list(read_jsonl(path, data_root=root, report=report))      # skip: never raises
    for rec in got:
        _check_record(rec, root)
    ids = [r["id"] for r in got if r.get("id") is not None]
    assert len(ids) == len(set(ids))
    assert len(got) + len(report.skipped) <= n_lines
    assert all(s.startswith(path + ":") for s in report.skipped)


def test_read_jsonl_missing_file(fuzz_dir):
    with pytest.raises(DataError, match="no such file"):
        list(read_jsonl(os.path.join(fuzz_dir, "absent.jsonl")))


# ---------------------------------------------------------------------------------- MMAD data
GOOD_KEYS = ["DS-MVTec/bottle/image/good/000.png", "DS-MVTec/bottle/image/broken/001.png",
             "VisA/candle/test/bad/0007.JPG", "MVTec-LOCO/pushpins/test/good/012.png",
             "GoodsAD/drink/test/cap/003.jpg"]
BAD_KEYS = ["a/b", "../x/y/z.png", "/abs/x/y.png", "a//b/c.png", "a/./b/c.png", "C:/x/y.png",
            "a\\b\\c.png", "a/b/c\x00.png", ""]
mmad_keys = st.one_of(st.sampled_from(GOOD_KEYS), st.sampled_from(GOOD_KEYS),
                      st.sampled_from(BAD_KEYS), st.text(max_size=20))


@st.composite
def valid_mmad_questions(draw):
    letters = draw(st.lists(st.sampled_from(OPTION_LETTERS), min_size=1, max_size=5, unique=True))
    q = {"Question": draw(st.text(min_size=1, max_size=12).filter(str.strip)),
         "Answer": draw(st.sampled_from(letters)),
         "Options": {k: draw(st.text(max_size=8)) for k in letters},
         "type": draw(st.sampled_from(sorted(QUESTION_TYPES)))}
    if draw(st.booleans()):
        q["annotation"] = draw(json_values)
    return q


valid_mmad_records = st.fixed_dictionaries(
    {"conversation": st.lists(valid_mmad_questions(), max_size=3),
     "similar_templates": st.lists(st.sampled_from(GOOD_KEYS), min_size=1, max_size=2)},
    optional={"random_templates": st.lists(st.sampled_from(GOOD_KEYS), max_size=2),
              "mask_path": st.sampled_from([None, "", "ground_truth/x.png"])})
mmad_docs = st.one_of(st.dictionaries(mmad_keys, mutated(valid_mmad_records), max_size=4),
                      mutated(st.dictionaries(st.sampled_from(GOOD_KEYS), valid_mmad_records,
                                              max_size=3), max_mutations=3),
                      json_values)


def _write_json(path, doc=None, raw=None):
    with open(path, "wb") as f:
        f.write(raw if raw is not None else _dump_line(doc))


@FUZZ_IO
@example(doc={}, raw=b"[" * 5000)
@example(doc={}, raw=b"1" * 5000)
@example(doc={}, raw=b"\xff{}")
@given(doc=mmad_docs, raw=st.one_of(st.none(), st.none(), st.binary(max_size=60),
                                    st.sampled_from([b"[" * 5000, b"\xff{}", b"1" * 5000])))
def test_read_mmad_arbitrary_structures(fuzz_dir, doc, raw):
    path = os.path.join(fuzz_dir, "mmad.json")
    _write_json(path, doc, raw)
    for policy in ("error", "skip"):
        try:
            records, report = read_mmad(fuzz_dir, policy=policy)
        except MMADError as e:
            assert str(e).startswith(path + ": ") and "\n" not in str(e), str(e)
            if policy == "skip":    # only whole-file problems raise under "skip"
                assert "record" not in str(e).split(": ", 2)[1][:6], str(e)
            continue
        assert report.n_records == len(records)
        assert report.n_questions == sum(len(r.conversation) for r in records)
        assert policy == "skip" or not report.skipped
        assert all(s.startswith(path + ": record ") for s in report.skipped)
        assert not any("_Obj" in s for s in report.skipped)     # JSON objects read "dict"
        for rec in records:
            assert rec.similar_templates and isinstance(rec.image, str)
            for q in rec.conversation:
                assert q.type in QUESTION_TYPES and q.text.strip()
                assert q.options and set(q.options) <= set(OPTION_LETTERS)
                assert q.answer in q.options
        for p in iter_prompts(records, None, think=True):     # every kept question is usable
            assert len(p.images) == (2 if p.question.needs_reference else 1)


dk_docs = st.one_of(
    st.dictionaries(st.text(max_size=6), maybe(st.dictionaries(
        st.text(max_size=6), maybe(st.dictionaries(st.text(max_size=6), maybe(st.text()),
                                                   max_size=3)), max_size=3)), max_size=3),
    json_values)


@FUZZ_IO
@given(doc=dk_docs)
def test_load_domain_knowledge_arbitrary_structures(fuzz_dir, doc):
    path = os.path.join(fuzz_dir, "domain_knowledge.json")
    _write_json(path, doc)
    try:
        dk = load_domain_knowledge(fuzz_dir)
    except MMADError as e:
        assert str(e).startswith(path + ": "), str(e)
        return
    for classes in dk.values():
        for entries in classes.values():
            assert all(isinstance(t, str) for t in entries.values())


# ---------------------------------------------------------------------------- mask-to-grid rule
masks = hnp.arrays(dtype=st.sampled_from([np.bool_, np.uint8]),
                   shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=10))


@FUZZ
@given(mask=masks, seed=st.integers(0, 2**32 - 1))
def test_mask_to_grid_rule(mask, seed):
    try:
        counts = tasks.mask_cell_counts(mask)
    except ValueError as e:
        # documented: a mask must be 2-D, or 3-D with a channel axis that is not empty
        assert mask.ndim not in (2, 3) or (mask.ndim == 3 and mask.shape[0] == 0
                                           and mask.shape[-1] not in (1, 3, 4)), (mask.shape, e)
        assert "mask" in str(e)
        return
    assert mask.ndim in (2, 3)
    assert counts.shape == (9,) and counts.dtype == np.int64 and (counts >= 0).all()
    plane = mask if mask.ndim == 2 else (
        mask[..., 0] if mask.shape[-1] in (1, 3, 4) else mask.max(axis=0))
    assert counts.sum() == np.count_nonzero(plane)           # the bands tile the whole mask
    if mask.ndim == 2:
        assert dict(embedded.grid_cells(mask)) == {           # the embedded dataset's copy agrees
            prompts.REGIONS[i]: int(n) for i, n in enumerate(counts) if n}

    regions = tasks.defect_regions(counts)
    assert len(regions) == len(set(regions)) == np.count_nonzero(counts)
    assert set(regions) <= set(prompts.REGIONS)
    by_name = dict(zip(prompts.REGIONS, counts))
    assert [by_name[r] for r in regions] == sorted((by_name[r] for r in regions), reverse=True)

    loc = tasks.localization_options(counts, random.Random(seed))
    if not regions or len(regions) == 9:
        assert loc is None
        return
    opts, idx = loc
    assert len(opts) == 4 and 0 <= idx < 4
    cell_of = {s: c for c, syns in prompts.REGION_SYNONYMS.items() for s in syns}
    assert cell_of[opts[idx]] == regions[0]
    assert all(cell_of[o] not in regions for k, o in enumerate(opts) if k != idx)


# ------------------------------------------------------------------------------------ scoring
answer_letters = st.one_of(st.sampled_from(list("ABCDE")), st.sampled_from([None, "F", "a", "",
                                                                             "AB", 1]))
answer_rows = st.fixed_dictionaries({
    "image": st.one_of(st.sampled_from(["DS-MVTec/bottle/image/good/000.png",
                                        "DS-MVTec/bottle/image/broken/001.png",
                                        "VisA/candle/test/bad/0007.JPG", "GoodsAD/x/good/1.jpg",
                                        "Other/y/z.png", "", "nofolder"]), st.text(max_size=10)),
    "question_type": st.sampled_from(sorted(QUESTION_TYPES) + ["Unknown", ""]),
    "correct_answer": answer_letters, "gpt_answer": answer_letters})


@FUZZ
@given(rows=st.lists(answer_rows, max_size=25), invalid=st.sampled_from(["emit", "drop", "wrong"]),
       by=st.sampled_from(["sub_dataset", "class"]))
def test_summarize_accuracies_are_percentages(rows, invalid, by):
    s = scoring.summarize(rows, invalid=invalid, by=by)
    assert s.n_rows == len(rows) and 0 <= s.n_scored <= s.n_rows
    assert s.n_scored + s.n_dropped + s.n_skipped == s.n_rows
    assert 0 <= s.n_invalid <= s.n_rows
    for g in s.groups:
        for t, v in s.accuracy[g].items():
            assert math.isfinite(v) and 0.0 <= v <= 100.0, (g, t, v)
        for t in s.tasks:
            c = s.cells[g][t]
            assert 0 <= c.correct <= c.total and 0.0 <= c.accuracy <= 100.0
        d = s.detection[g]
        assert 0.0 <= d.normal_acc <= 1.0 and 0.0 <= d.anomaly_acc <= 1.0
        for v in (d.balanced_accuracy, d.recall, d.precision, d.f1, d.overkill, d.miss):
            assert 0.0 <= v <= 100.0 + 1e-9
    for v in s.average.values():
        assert math.isfinite(v) and 0.0 <= v <= 100.0
    assert 0.0 <= s.score <= 100.0
    assert isinstance(scoring.format_table(s), str)


@FUZZ
@given(rows=st.lists(st.dictionaries(st.sampled_from(["image", "question_type", "correct_answer",
                                                      "gpt_answer", "x"]), json_values),
                     max_size=4))
def test_summarize_malformed_rows_raise_value_error(rows):
    try:
        s = scoring.summarize(rows)
    except ValueError as e:
        assert re.match(r"answer row \d+: ", str(e)), str(e)
        return
    assert 0.0 <= s.score <= 100.0


@FUZZ_IO
@example(doc=[], raw=b"[" * 5000)
@example(doc=[], raw=b"1" * 5000)
@example(doc=[], raw=b"\xff[]")
@example(doc=[{"image": 1, "question_type": "x", "correct_answer": "A", "gpt_answer": "A"}],
         raw=None)
@given(doc=st.one_of(st.lists(maybe(answer_rows), max_size=4), json_values),
       raw=st.one_of(st.none(), st.none(), st.binary(max_size=40),
                     st.sampled_from([b"[" * 5000, b"1" * 5000])))
def test_read_answers_json_arbitrary_content(fuzz_dir, doc, raw):
    path = os.path.join(fuzz_dir, "answers.json")
    _write_json(path, doc, raw)
    try:
        rows = scoring.read_answers_json(path)
    except ValueError as e:
        assert type(e) is ValueError and str(e).startswith(path + ": "), repr(e)
        return
    s = scoring.summarize(rows)                              # a file that reads also scores
    assert 0.0 <= s.score <= 100.0
