"""Stage data of the embedded-default recipe: the text-only warm-up and the SFT-instead-of-GRPO
records (emit_jax.training.data)."""

import numpy as np
import pytest
from PIL import Image

from emit_jax.data import prompts
from emit_jax.data.tasks import Question
from emit_jax.models.emit import HINT_TEXT
from emit_jax.training.data import (MAP_CLEAN, MAP_DEFECT, defect_map, rationale,
                                    think_records, warmup_records, with_rationales)


def _q(task, options, answer, **meta):
    base = {"object_type": "metal_nut", "adlabel": 1, "anomaly_type": "color_stain",
            "defect_location": ["top left", "top"], "task_type": task}
    return Question(task, tuple(options), answer, ("ref.png", "q.png"), "user", {**base, **meta})


def test_warmup_letters_follow_the_shuffled_options():
    qs = [_q("defect_classification", ["Crack.", "Color stain.", "Hole.", "Scratch."], "B"),
          _q("anomaly_discrimination", ["Yes.", "No."], "B", adlabel=0, anomaly_type=None,
             defect_location=[])]
    recs = warmup_records(qs, seed=3, shuffles=4, think_every=2)
    assert len(recs) == 8 and all(r["images"] == [] for r in recs)
    orders = set()
    for r in recs:
        gold = "Color stain." if r["task_type"] == "defect_classification" else "No."
        assert r["options"][prompts.LETTERS.index(r["solution"])] == gold
        user, answer = r["messages"][0]["content"], r["messages"][1]["content"]
        assert "<image>" not in user
        # the statement closes the user turn (where the CE slots go) and says what the image shows
        last = user.rstrip().split("\n")[-1]
        assert last == ("The second product is a metal nut with a color stain at the top left."
                        if gold != "No." else "The second product is a metal nut in perfect condition.")
        assert answer == r["solution"] or answer.endswith(f"<answer>{r['solution']}</answer>")
        orders.add(tuple(r["options"]))
    assert len(orders) > 2  # the options really are reshuffled
    assert {r["messages"][1]["content"].startswith("<think>") for r in recs} == {True, False}
    assert warmup_records(qs, seed=3, shuffles=4, think_every=2) == recs
    assert all(not r['messages'][1]['content'].startswith('<') for r in warmup_records(qs))  # deterministic


def test_rationales_for_stage2_records():
    rec = {"messages": [{"role": "user", "content": "u"}], "solution": "C", "object_type": "cable",
           "adlabel": 1, "anomaly_type": "missing_piece", "defect_location": ["right"]}
    out = with_rationales([rec])[0]
    assert out["messages"][0] == rec["messages"][0] and "solution" in out
    assert out["messages"][1]["content"] == (
        "<think>The product is a cable. Compared with the reference there is a missing piece at "
        "the right.</think><answer>C</answer>")
    assert rationale(dict(rec, adlabel=0), "A").startswith(
        "<think>The product is a cable. Compared with the reference it looks normal")
    assert len(rec["messages"]) == 1  # the input record is not modified


def test_restate_rationale_makes_every_letter_a_copy():
    """data.rationale=restate: the options restated word then letter, then the answer's words
    followed by its letter, so the letter follows the same words earlier in the answer."""
    import re

    import pytest

    opts = ["Cable.", "Missing piece.", "Nut.", "Screw."]
    rec = {"task_type": "defect_classification", "object_type": "cable", "adlabel": 1,
           "anomaly_type": "missing_piece", "defect_location": ["right"], "options": opts,
           "solution": "B", "messages": [{"role": "user", "content": "u"}]}
    want = ("<think>A Cable A\nB Missing piece B\nC Nut C\nD Screw D\n"
            "The defect is a Missing piece B</think><answer>B</answer>")
    assert rationale(rec, "B", opts, "restate") == want
    assert with_rationales([rec], "restate")[0]["messages"][1]["content"] == want
    assert rationale(dict(rec, task_type="object_classification"), "C", opts, "restate").endswith(
        "The product is a Nut C</think><answer>C</answer>")
    # localization: each synonym restated with its grid cell; the answer names the cell
    dl = ["Left upper.", "Summit.", "Rightward.", "Below."]
    text = rationale(dict(rec, task_type="defect_localization"), "D", dl, "restate")
    assert text == ("<think>A Left upper, top left A\nB Summit, top B\nC Rightward, right C\n"
                    "D Below, bottom D\nThe defect is at the bottom D</think><answer>D</answer>")
    # every letter of every question follows the same words earlier in the rationale
    for letter in "ABCD":
        body = rationale(dict(rec, task_type="defect_localization"), letter, dl, "restate")
        last = body.split("\n")[-1]
        m = re.match(r"The defect is at the (.+) ([ABCD])</think><answer>([ABCD])</answer>$", last)
        assert m and m.group(2) == m.group(3) == letter
        assert f", {m.group(1)} {letter}\n" in body
    # anomaly discrimination (two fixed options) and "brief" keep the brief rationale
    ad = dict(rec, task_type="anomaly_discrimination")
    assert rationale(ad, "A", ["Yes.", "No."], "restate") == rationale(ad, "A")
    assert rationale(rec, "B", opts) == rationale(rec, "B")
    with pytest.raises(ValueError, match="data.rationale"):
        rationale(rec, "B", opts, "long")


def test_record_files_refuse_another_rationale(tmp_path):
    import json

    import pytest

    from emit_jax.data.embedded import ensure_cached
    from emit_jax.errors import DataError
    from emit_jax.training.data import stage_records

    root = ensure_cached(seed=0)
    recs = stage_records(root, str(tmp_path), domain_knowledge=False, rationale_style="restate")
    assert json.loads((tmp_path / "data" / "options.json").read_text())["rationale"] == "restate"
    oc = [r for r in recs["base"] if r["task_type"] == "object_classification"
          and r["messages"][1]["content"].startswith("<think>")]
    assert oc and all(r["messages"][1]["content"].startswith("<think>A ") for r in oc)
    assert all(r["messages"][1]["content"].startswith("<think>") for r in recs["warmup"])
    with pytest.raises(DataError, match="rationale='restate'.*'brief'"):
        stage_records(root, str(tmp_path), domain_knowledge=False)


def _map_cells(text: str, grid: int) -> np.ndarray:
    assert len(text) == grid * grid and set(text) <= {MAP_DEFECT, MAP_CLEAN}
    return np.array([c == MAP_DEFECT for c in text]).reshape(grid, grid)


def test_defect_map_marks_the_cells_a_mask_touches(tmp_path):
    mask = np.zeros((64, 96), np.uint8)  # H 64, W 96: grid 4 -> cells of 16 x 24 pixels
    mask[0, 0] = 255  # top-left cell, one pixel
    mask[40:50, 70:80] = 255  # row 2 (32..47) and 3 (48..63), column 2 (48..71) and 3 (72..95)
    path = tmp_path / "m.png"
    Image.fromarray(mask).save(path)
    want = np.zeros((4, 4), bool)
    want[0, 0] = True
    want[2:4, 2:4] = True
    np.testing.assert_array_equal(_map_cells(defect_map(str(path), 4), 4), want)
    # the NumPy reference: max-pool of the mask over equal bands
    pooled = mask.reshape(4, 16, 4, 24).max(axis=(1, 3)) > 0
    np.testing.assert_array_equal(_map_cells(defect_map(str(path), 4), 4), pooled)
    assert defect_map(None, 3) == MAP_CLEAN * 9


def test_map_warmup_keeps_ad_and_dl_image_questions_with_their_map(tmp_path):
    mask = np.zeros((32, 32), np.uint8)
    mask[:8, 24:] = 1  # top right
    Image.fromarray(mask).save(tmp_path / "m.png")
    m = str(tmp_path / "m.png")
    qs = [_q("anomaly_discrimination", ["Yes.", "No."], "A", mask_path=m, chat_type="image"),
          _q("anomaly_discrimination", ["Yes.", "No."], "B", adlabel=0, anomaly_type=None,
             defect_location=[], mask_path=None, chat_type="image"),
          _q("defect_localization", ["Top right.", "Left.", "Center.", "Bottom."], "A",
             mask_path=m, chat_type="image"),
          _q("anomaly_discrimination", ["Yes.", "No."], "A", mask_path=m, chat_type="text"),
          _q("defect_classification", ["Crack.", "Color stain.", "Hole.", "Scratch."], "B",
             mask_path=m, chat_type="image")]
    recs = warmup_records(qs, seed=1, shuffles=2, map_grid=4)
    assert [r["task_type"] for r in recs] == ["anomaly_discrimination"] * 4 + \
        ["defect_localization"] * 2
    for r in recs:
        user = r["messages"][0]["content"]
        assert user.endswith("\n" + HINT_TEXT + user[-16:]) and r["id"].startswith("warmup-map-")
        want = np.zeros((4, 4), bool)
        if r["adlabel"]:
            want[0, 3] = True
        np.testing.assert_array_equal(_map_cells(user[-16:], 4), want)
        assert r["messages"][1]["content"] == r["solution"]


def test_warmup_hint_picks_the_map_records_of_the_ce_grid():
    from emit_jax.configs import common
    from emit_jax.training.stages import map_grid as _map_grid
    from emit_jax.training.stages import text_stage_records as _text_stage_records

    cfg = common.base_config()
    recs = {"warmup": [{"task_type": "anomaly_discrimination", "id": "s"}],
            "warmup_map": [{"task_type": "anomaly_discrimination", "id": "m"},
                           {"task_type": "defect_localization", "id": "m2"}],
            "base": [{"task_type": "object_classification", "id": "b"}]}
    assert _map_grid(cfg) == 0 and _text_stage_records(cfg, recs, "warmup") == recs["warmup"]
    cfg.warmup.hint = "map"
    assert _map_grid(cfg) == 8  # tiny: 224 px / 14 px patches = 16, halved by the stride-2 conv
    cfg.warmup.tasks = ("anomaly_discrimination",)
    assert [r["id"] for r in _text_stage_records(cfg, recs, "warmup")] == ["m"]
    cfg.base.statements = True
    assert [r["id"] for r in _text_stage_records(cfg, recs, "base")] == ["b", "m"]


def test_think_records_turn_stage1_records_into_belief_then_letter():
    from emit_jax.data import jsonl

    q = _q("anomaly_discrimination", ["No.", "Yes."], "B")
    user = prompts.render("anomaly_discrimination", ["No.", "Yes."], think=False)
    rec = jsonl.question_to_record(Question(q.task, q.options, "B", q.images, user, q.meta), 1, 0)
    out = think_records([rec])[0]
    assert out["messages"][0]["content"] == prompts.render(
        "anomaly_discrimination", ["No.", "Yes."], think=True)  # the think instruction instead
    assert out["messages"][1]["content"] == (
        "<think>The product is a metal nut. Compared with the reference there is a color stain at "
        "the top left.</think><answer>B</answer>")
    assert rec["messages"][1]["content"] == "B"  # the input record is not modified
    normal = dict(rec, adlabel=0, anomaly_type=None, defect_location=[])
    assert "it looks normal and intact.</think><answer>B</answer>" in \
        think_records([normal])[0]["messages"][1]["content"]
    import pytest

    with pytest.raises(ValueError, match="not a stage-1 record"):
        think_records([dict(rec, messages=[{"role": "user", "content": "no instruction"},
                                           {"role": "assistant", "content": "B"}])])


def test_eval_think_follows_what_a_stage_trained():
    import ml_collections

    from emit_jax.train import eval_think as _eval_think

    cfg = ml_collections.ConfigDict(dict(stages=("base", "sft"), eval_think=True,
                                         sft=ml_collections.ConfigDict(dict(think=False))))
    assert not _eval_think(cfg)
    cfg.sft.think = True
    assert _eval_think(cfg)
    cfg.eval_think = False
    assert not _eval_think(cfg)
    cfg.eval_think, cfg.sft.think, cfg.stages = True, False, ("base", "sft", "grpo")
    assert _eval_think(cfg)


def test_base_fresh_datasets_add_think_questions_on_every_image(tmp_path, monkeypatch):
    """``base.fresh_datasets=1``: the three four-option tasks on every image of the embedded
    dataset of seed data.seed+1, with the think instruction and the restated think answer."""
    from collections import Counter

    from emit_jax.configs import common
    from emit_jax.training.stages import text_stage_records

    monkeypatch.setenv("EMIT_JAX_CACHE", str(tmp_path))
    cfg = common.base_config()
    cfg.data.rationale = "restate"
    recs = {"warmup": [], "base": [{"task_type": "object_classification", "id": "b"}]}
    assert text_stage_records(cfg, recs, "base") == recs["base"]  # off by default
    cfg.base.fresh_datasets = 1
    out = text_stage_records(cfg, recs, "base")
    assert out[0] == recs["base"][0]
    fresh = out[1:]
    assert all(r["id"].startswith("basefresh1-") for r in fresh)
    counts = Counter(r["task_type"] for r in fresh)
    assert set(counts) == {"defect_classification", "defect_localization",
                           "object_classification"}
    # one OC question per image (7 classes x 24 images), DC / DL one per anomalous image
    assert counts["object_classification"] == 168
    assert counts["defect_classification"] == counts["defect_localization"] == 224
    for r in fresh:
        user, answer = r["messages"][0]["content"], r["messages"][1]["content"]
        assert prompts.INSTR_THINK in user and prompts.INSTR_DIRECT not in user
        letter = r["messages"][1]["content"][-len("</answer>") - 1]
        assert answer.endswith(f"</think><answer>{letter}</answer>")
        i = prompts.LETTERS.index(letter)
        assert f"\n{letter} " in answer or answer.startswith(f"<think>{letter} ")
        if r["task_type"] != "defect_localization":  # (a cell's synonyms are restated)
            # the answer's option, named last, with its letter
            assert answer.split("</think>")[0].endswith(f"{r['options'][i].rstrip('.')} {letter}")
        # the query (and, for the defect tasks, its normal reference) from the fresh dataset
        assert len(r["images"]) == (1 if r["task_type"] == "object_classification" else 2)
        assert all("embedded-v2-seed1" in p for p in r["images"])
    cfg.base.fresh_tasks = ("object_classification",)
    assert {r["task_type"] for r in text_stage_records(cfg, recs, "base")[1:]} == \
        {"object_classification"}


def test_base_fresh_direct_asks_that_share_with_the_direct_instruction(tmp_path, monkeypatch):
    """``base.fresh_direct``: that share of the fresh questions keeps the direct instruction and
    the bare answer (the held-out questions' form); the rest are the think records they were,
    the same questions either way, and the same draw for the same seed."""
    from emit_jax.configs import common
    from emit_jax.training.stages import text_stage_records

    monkeypatch.setenv("EMIT_JAX_CACHE", str(tmp_path))
    cfg = common.base_config()
    cfg.base.fresh_datasets = 1
    recs = {"warmup": [], "base": []}
    think = text_stage_records(cfg, recs, "base")
    cfg.base.fresh_direct = 0.5
    mixed = text_stage_records(cfg, recs, "base")
    assert mixed == text_stage_records(cfg, recs, "base")  # the same draw again
    by_id = {r["id"]: r for r in think}
    assert len(mixed) == len(think) == len(by_id) == 616 and set(by_id) == \
        {r["id"] for r in mixed}
    direct = [r for r in mixed if prompts.INSTR_DIRECT in r["messages"][0]["content"]]
    assert 0.4 < len(direct) / len(mixed) < 0.6  # 616 draws of p = 0.5
    for r in mixed:
        t = by_id[r["id"]]
        if r in direct:
            # the think record's question with the direct instruction, its answer the letter
            # the think answer ends with
            assert r["messages"][0]["content"] == t["messages"][0]["content"].replace(
                prompts.INSTR_THINK, prompts.INSTR_DIRECT)
            assert t["messages"][1]["content"].endswith(
                f"<answer>{r['messages'][1]['content']}</answer>")
            assert r["messages"][1]["content"] in prompts.LETTERS
        else:
            assert r == t
    cfg.data.answers = "words"  # the direct ones are answered with the option's words too
    for r in text_stage_records(cfg, recs, "base"):
        if prompts.INSTR_DIRECT in r["messages"][0]["content"]:
            assert r["messages"][1]["content"] in r["options"]
    cfg.base.fresh_direct = 1.0
    assert all(prompts.INSTR_DIRECT in r["messages"][0]["content"]
               for r in text_stage_records(cfg, {"warmup": [], "base": []}, "base"))


def test_held_out_records_asked_to_think_keep_everything_but_the_instruction():
    import pytest

    from emit_jax.configs import common
    from emit_jax.errors import ConfigError
    from emit_jax.training.data import asked_to_think, asked_with
    from emit_jax.training.validate import validate_config

    user = f"Select ... {prompts.INSTR_DIRECT}\n\nQuestion: Q?\nA. x\nB. y\n"
    rec = {"id": "t", "images": ["q.png"], "solution": "B", "options": ["x", "y"],
           "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": "B"}]}
    (out,) = asked_to_think([rec])
    assert out["messages"][0]["content"] == user.replace(prompts.INSTR_DIRECT, prompts.INSTR_THINK)
    assert {k: v for k, v in out.items() if k != "messages"} == \
        {k: v for k, v in rec.items() if k != "messages"}
    assert out["messages"][1] == rec["messages"][1] and rec["messages"][0]["content"] == user
    with pytest.raises(ValueError, match="no direct instruction"):
        asked_to_think([out])
    # and back: stage 2's rollouts asked as the evaluation asks (grpo.instruction='direct')
    (back,) = asked_with([out], "direct")
    assert back == rec
    with pytest.raises(ValueError, match="no think instruction"):
        asked_with([rec], "direct")
    cfg = common.base_config()
    cfg.eval_instruction = "loud"
    with pytest.raises(ConfigError, match="^config eval_instruction: "):
        validate_config(cfg, num_devices=1)
    cfg.eval_instruction, cfg.eval_unseen, cfg.eval_unseen_tasks = "think", 1, ("nope",)
    with pytest.raises(ConfigError, match="^config eval_unseen_tasks: "):
        validate_config(cfg, num_devices=1)


def test_in_words_names_the_option_and_the_parser_reads_it_back():
    """``data.answers='words'``: the four-option tasks' letter becomes the option's words, direct
    and think answers alike; anomaly discrimination keeps its letter; and EMIT's parser reads
    every embedded option text back to its own letter (no standalone A-E in it, and the closest
    option text of an exact option is itself), in any company of other options."""
    import random

    import pytest

    from emit_jax.data import jsonl
    from emit_jax.data.embedded.catalogue import CLASSES, DEFECTS
    from emit_jax.eval.scoring import parse_answer
    from emit_jax.training.data import in_words

    opts = ["Crack.", "Color stain.", "Hole.", "Scratch."]
    q = _q("defect_classification", opts, "B")
    direct = jsonl.question_to_record(q, 1, 0)
    think = dict(direct, messages=[direct["messages"][0], {"role": "assistant", "content": (
        "<think>The product is a metal nut. Compared with the reference there is a color stain "
        "at the top left.</think><answer>B</answer>")}])
    ad = jsonl.question_to_record(_q("anomaly_discrimination", ["Yes.", "No."], "A"), 1, 1)
    out = in_words([direct, think, ad])
    assert out[0]["messages"][1]["content"] == "Color stain."
    assert out[1]["messages"][1]["content"] == think["messages"][1]["content"].replace(
        "<answer>B</answer>", "<answer>Color stain.</answer>")
    assert out[2] is ad and direct["messages"][1]["content"] == "B"  # inputs kept
    # data.answers='all_words': anomaly discrimination's letter too, direct and think
    from emit_jax.training.data import ALL_WORD_TASKS

    ad_think = dict(ad, messages=[ad["messages"][0], {"role": "assistant", "content":
                                                      "<think>A crack.</think><answer>A</answer>"}])
    both = in_words([direct, ad, ad_think], ALL_WORD_TASKS)
    assert [m["messages"][1]["content"] for m in both] == [
        "Color stain.", "Yes.", "<think>A crack.</think><answer>Yes.</answer>"]
    for text, letter in (("Yes.", "A"), ("No.", "B")):  # the parser reads them back
        assert parse_answer(text, {"A": "Yes.", "B": "No."}) == letter
        assert parse_answer(text, {"A": "No.", "B": "Yes."}) == "AB"[letter == "A"]
    with pytest.raises(ValueError, match="names no option letter"):
        in_words([dict(direct, messages=[direct["messages"][0],
                                         {"role": "assistant", "content": "maybe"}])])
    names = [prompts.process_string(n) for n in DEFECTS + tuple(CLASSES)]
    cells = [s for syns in prompts.REGION_SYNONYMS.values() for s in syns]
    rng = random.Random(0)
    for pool in (names, cells):
        for _ in range(400):
            four = rng.sample(pool, 4)
            k = rng.randrange(4)
            options = dict(zip(prompts.LETTERS, four))
            assert parse_answer(four[k], options) == prompts.LETTERS[k]
            assert parse_answer(f"<think>x</think><answer>{four[k]}</answer>", options,
                                think=True) == prompts.LETTERS[k]


def test_task_shares_keep_that_share_of_each_named_task_in_order():
    """``sft.fresh_shares``: of each named task, round(share * n) of its n records are kept
    (the same draw for the same seed), the other tasks' all, in their order."""
    from emit_jax.training.data import task_shares

    recs = [{"id": i, "task_type": t} for i, t in enumerate(
        ["anomaly_discrimination", "defect_classification", "object_classification"] * 10)]
    kept = task_shares(recs, {"defect_classification": 0.2, "object_classification": 0.5}, seed=3)
    count = lambda rs, t: sum(r["task_type"] == t for r in rs)  # noqa: E731
    assert (count(kept, "anomaly_discrimination"), count(kept, "defect_classification"),
            count(kept, "object_classification")) == (10, 2, 5)
    assert [r["id"] for r in kept] == sorted(r["id"] for r in kept)
    assert kept == task_shares(recs, {"defect_classification": 0.2,
                                      "object_classification": 0.5}, seed=3)
    assert kept != task_shares(recs, {"defect_classification": 0.2,
                                      "object_classification": 0.5}, seed=4)
    assert task_shares(recs, {"defect_classification": 1.0}) == recs
    assert count(task_shares(recs, {"defect_classification": 0.0}), "defect_classification") == 0
    with pytest.raises(ValueError, match="defect_classification: 1.5 is not in"):
        task_shares(recs, {"defect_classification": 1.5})
