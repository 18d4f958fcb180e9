"""MMAD data, EMIT's evaluation prompts, answer parsing and scoring (docs/reference/mmad.md, docs/reference/emit.md 12).

The fixture ``tests/fixtures/mmad`` has the exact mmad.json shape of docs/reference/mmad.md 2.5 (4
sub-datasets, every ``type`` string, null / empty / absent ``mask_path``, an extra
``annotation`` field) with 16x16 placeholder images (``make_images.py``).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil

import pytest

from emit_jax.data import mmad
from emit_jax.data.mmad import (MMADError, Question, Record, build_prompt, domain_knowledge_block,
                                emit_dataset, iter_prompts, load_domain_knowledge, load_mmad,
                                object_class, paper_task_name, question_counts, read_mmad,
                                sub_dataset, task_of, use_comp)
from emit_jax.eval import (format_table, parse_answer, read_answers_json, summarize,
                           write_accuracy_csv, write_answers_json)

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "mmad")
BOTTLE = "DS-MVTec/bottle/image/broken_large/000.png"
BOTTLE_GOOD = "DS-MVTec/bottle/image/good/001.png"
CANDLE_GOOD = "VisA/candle/test/good/0042.JPG"
CANDLE_BAD = "VisA/candle/test/bad/0007.JPG"
LOCO_BAD = "MVTec-LOCO/pushpins/test/logical_anomalies/005.png"
LOCO_GOOD = "MVTec-LOCO/pushpins/test/good/012.png"
GOODS_BAD = "GoodsAD/drink_bottle/test/cap_open/003.jpg"
GOODS_GOOD = "GoodsAD/drink_bottle/test/good/020.jpg"

# Exact strings from docs/reference/emit.md 12.2 / docs/reference/mmad.md 5.3 (data, copied by hand, not from the module).
TWO_IMG_HEAD = (
    "Image-1: <image>\nImage-2: <image>\nI have uploaded two images for review, each featuring a "
    "product. The product shown in the first image appears to be in perfect condition, free of any "
    "defects. To answer a multiple-choice question, please inspect the product in the second image. "
    "There is only one correct option.\n")
ONE_IMG_HEAD = (
    "Query image: <image>\nTo answer a multiple-choice question, please inspect the product in the "
    "given image. There is only one correct option.\n")
SELECT = "Select your answer by responding with the letter corresponding to the correct option, such as 'A'. "
DIRECT = "Do not include any text in your response."
THINK = ("Begin by documenting your analysis process within <think> </think> tags. Conclude with "
         "your final answer enclosed in <answer> </answer> tags. The final answer should be either "
         "'A' or 'B' or 'C' or 'D'. The output format should be as follows: "
         "<think>...</think><answer>...</answer>. Please adhere strictly to the prescribed format.")
DK_PREFIX = ("The following provides domain knowledge regarding the characteristics of a normal "
             "product, as well as the various possible types of defects:")
BOTTLE_DK = (DK_PREFIX
             + " <Contamination>\n Description: Foreign material such as dirt or residue visible on the bottle surface."
             + "\n <Large Breakage>\n Description: Significant chips along the rim of the bottle."
             + "\n <Normal Characteristics>\n Description: A clear glass bottle with an intact circular rim."
             + "\n <Small Breakage>\n Description: Small chips or cracks on the rim.")


@pytest.fixture(scope="module")
def records():
    return load_mmad(FIXTURE)


@pytest.fixture(scope="module")
def dk():
    return load_domain_knowledge(FIXTURE)


def by_key(records):
    return {r.image: r for r in records}


# --------------------------------------------------------------------------------------- loading
def test_load_fixture(records):
    recs = by_key(records)
    assert list(recs) == [BOTTLE, BOTTLE_GOOD, CANDLE_GOOD, CANDLE_BAD, LOCO_BAD, LOCO_GOOD,
                          GOODS_BAD, GOODS_GOOD]
    b = recs[BOTTLE]
    assert [q.type for q in b.conversation] == [
        "Anomaly Detection", "Defect Classification", "Defect Localization", "Defect Description",
        "Defect Analysis", "Object Classification", "Object Structure"]
    q = b.conversation[2]
    assert (q.image, q.index, q.answer) == (BOTTLE, 2, "B")
    assert q.text == "There is a defect in the object. Where is the defect?"
    assert list(q.options) == ["A", "B", "C", "D"] and q.options["B"] == "On the rim at the top right."
    assert b.similar_templates[0] == "MVTec-AD/bottle/train/good/017.png"
    assert b.random_templates[0] == "MVTec-AD/bottle/train/good/151.png"
    assert b.mask_path == "mask/broken_large/000_mask.png"
    # null, "" and absent mask_path all mean "normal image"
    assert recs[BOTTLE_GOOD].mask_path is None and recs[CANDLE_GOOD].mask_path is None
    assert recs[LOCO_GOOD].mask_path is None and recs[LOCO_GOOD].mask_file() is None
    # extra question keys are kept, not rejected
    assert recs[CANDLE_BAD].conversation[0].extra == {"annotation": True}
    # files resolve inside the root and exist
    for r in records:
        assert r.root == FIXTURE and os.path.isfile(r.image_file)
        assert r.image_file.startswith(os.path.normpath(FIXTURE) + os.sep)
        if r.mask_path:
            assert os.path.isfile(r.mask_file())
    assert recs[BOTTLE].mask_file() == os.path.join(
        FIXTURE, "DS-MVTec", "bottle", "mask", "broken_large", "000_mask.png")
    # all eight type strings appear; the seven tasks after merging
    types = {q.type for r in records for q in r.conversation}
    assert types == set(mmad.QUESTION_TYPES) - {"Object Analysis"}
    assert {q.task for r in records for q in r.conversation} == set(mmad.TASKS)


def test_read_mmad_report_and_check_files():
    recs, report = read_mmad(FIXTURE, check_files=True)
    assert report.n_records == 8 and report.n_questions == 30 and report.skipped == []
    assert report.path == os.path.join(FIXTURE, "mmad.json")


def test_question_counts(records):
    assert question_counts(records) == {
        "DS-MVTec": {"Anomaly Detection": 2, "Defect Classification": 1, "Defect Localization": 1,
                     "Defect Description": 1, "Defect Analysis": 1, "Object Classification": 2,
                     "Object Analysis": 2},
        "VisA": {"Anomaly Detection": 2, "Object Classification": 1, "Object Analysis": 1,
                 "Defect Localization": 1, "Defect Classification": 1},
        "MVTec-LOCO": {"Anomaly Detection": 2, "Defect Localization": 1, "Defect Description": 1,
                       "Defect Analysis": 1, "Object Classification": 1, "Object Analysis": 1},
        "GoodsAD": {"Anomaly Detection": 2, "Defect Classification": 1, "Defect Localization": 1,
                    "Object Classification": 2, "Object Analysis": 1},
    }


def test_domain_knowledge(dk):
    assert set(dk) == {"MVTec", "MVTec-LOCO", "VisA", "GoodsAD"}
    assert list(dk["MVTec"]["bottle"]) == ["contamination", "broken_large", "good", "broken_small"]
    assert dk["VisA"]["candle"]["bad"].startswith(" <Candle Defects>\n Description:")


def test_names():
    assert sub_dataset(BOTTLE) == "DS-MVTec" and emit_dataset(BOTTLE) == "MVTec"
    assert sub_dataset(LOCO_BAD) == emit_dataset(LOCO_BAD) == "MVTec-LOCO"
    assert object_class(CANDLE_GOOD) == "candle"
    assert task_of("Object Structure") == task_of("Object Details") == "Object Analysis"
    assert task_of("Defect Analysis") == "Defect Analysis"
    assert paper_task_name("Anomaly Detection") == "Anomaly Discrimination"
    assert paper_task_name("Object Details") == "Object Analysis"
    assert [paper_task_name(t) for t in mmad.TASKS] == [
        "Anomaly Discrimination", "Defect Classification", "Defect Localization",
        "Defect Description", "Defect Analysis", "Object Classification", "Object Analysis"]
    # 'good' is case-sensitive: GoodsAD's anomalous images are anomalous
    assert mmad.is_normal_image(GOODS_GOOD) and not mmad.is_normal_image(GOODS_BAD)
    assert mmad.SYSTEM_PROMPT == "You are an industrial inspector who checks products by images."
    assert len(mmad.SYSTEM_PROMPT.encode()) == 62


@pytest.mark.parametrize("path", ["/etc/passwd", "../x.png", "DS-MVTec/../../x.png", "a\\b.png",
                                  "C:/x.png", "", "a/\x00.png"])
def test_check_relpath_rejects(path):
    with pytest.raises(MMADError):
        mmad.check_relpath(path)
    with pytest.raises(MMADError):
        mmad.resolve_path(FIXTURE, path)


def test_mask_fallback(tmp_path):
    root = tmp_path / "data"
    shutil.copytree(FIXTURE, root)
    # move the LOCO mask to generate_metadata.py's convention: <first three components>/<mask_path>
    src = root / "MVTec-LOCO/pushpins/ground_truth/logical_anomalies/005/000.png"
    dst = root / "MVTec-LOCO/pushpins/test/ground_truth/logical_anomalies/005/000.png"
    dst.parent.mkdir(parents=True)
    shutil.move(src, dst)
    rec = by_key(load_mmad(root))[LOCO_BAD]
    assert rec.mask_candidates() == ["MVTec-LOCO/pushpins/ground_truth/logical_anomalies/005/000.png",
                                     "MVTec-LOCO/pushpins/test/ground_truth/logical_anomalies/005/000.png"]
    assert rec.mask_file() == str(dst)


# ---------------------------------------------------------------------------------- bad inputs
def _fixture_data():
    with open(os.path.join(FIXTURE, "mmad.json"), encoding="utf-8") as f:
        return json.load(f)


def _rename(data, old, new):
    return {(new if k == old else k): v for k, v in data.items()}


def _m_missing_conversation(d):
    del d[BOTTLE]["conversation"]


def _m_conversation_not_list(d):
    d[BOTTLE]["conversation"] = {"0": d[BOTTLE]["conversation"][0]}


def _m_missing_similar(d):
    del d[BOTTLE]["similar_templates"]


def _m_empty_similar(d):
    d[BOTTLE]["similar_templates"] = []


def _m_record_not_object(d):
    d[BOTTLE] = ["not", "a", "record"]


def _m_template_escape(d):
    d[BOTTLE]["similar_templates"][0] = "../../outside.png"


def _m_template_absolute(d):
    d[BOTTLE]["random_templates"][1] = "/etc/passwd"


def _m_mask_escape(d):
    d[BOTTLE]["mask_path"] = "../../../../etc/shadow"


def _m_mask_type(d):
    d[BOTTLE]["mask_path"] = 3


def _m_answer_not_option(d):
    d[BOTTLE]["conversation"][2]["Answer"] = "E"


def _m_answer_lowercase(d):
    d[BOTTLE]["conversation"][2]["Answer"] = "b"


def _m_unknown_type(d):
    d[BOTTLE]["conversation"][2]["type"] = "Defect Severity"


def _m_missing_options(d):
    del d[BOTTLE]["conversation"][2]["Options"]


def _m_missing_question(d):
    del d[BOTTLE]["conversation"][2]["Question"]


def _m_bad_option_letter(d):
    d[BOTTLE]["conversation"][2]["Options"] = {"A": "x.", "F": "y."}
    d[BOTTLE]["conversation"][2]["Answer"] = "A"


def _m_option_not_string(d):
    d[BOTTLE]["conversation"][2]["Options"]["C"] = 7


def _m_question_not_object(d):
    d[BOTTLE]["conversation"][2] = "Where is the defect?"


def _m_one_option(d):  # sixteenth probe S1: asked, and every answer scored right
    d[BOTTLE]["conversation"][2]["Options"] = {"A": "only."}
    d[BOTTLE]["conversation"][2]["Answer"] = "A"


RECORD_PROBLEMS = [
    (_m_missing_conversation, "missing key 'conversation'"),
    (_m_conversation_not_list, "'conversation' must be a list"),
    (_m_missing_similar, "missing key 'similar_templates'"),
    (_m_empty_similar, "'similar_templates' is empty"),
    (_m_record_not_object, "must be a JSON object"),
    (_m_template_escape, "escapes the data root"),
    (_m_template_absolute, "is absolute"),
    (_m_mask_escape, "escapes the data root"),
    (_m_mask_type, "'mask_path' must be a string or null"),
]
QUESTION_PROBLEMS = [
    (_m_answer_not_option, "answer 'E' is not among the options"),
    (_m_answer_lowercase, "answer 'b' is not among the options"),
    (_m_unknown_type, "unknown question type 'Defect Severity'"),
    (_m_missing_options, "missing key 'Options'"),
    (_m_missing_question, "missing key 'Question'"),
    (_m_bad_option_letter, "option key 'F'"),
    (_m_option_not_string, "option 'C' must be a string"),
    (_m_question_not_object, "must be a JSON object"),
    (_m_one_option, "'Options' has one option ('A'): a question needs at least two, or every "
                    "answer is right"),
]


def _write_json(root, data, name="mmad.json"):
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, name)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)
    return path


def _one_line(msg):
    assert "\n" not in msg and "\r" not in msg, msg


@pytest.mark.parametrize("mutate,needle", RECORD_PROBLEMS, ids=[m.__name__[3:] for m, _ in RECORD_PROBLEMS])
def test_bad_record(tmp_path, mutate, needle):
    data = _fixture_data()
    mutate(data)
    path = _write_json(tmp_path, data)
    with pytest.raises(MMADError) as e:
        load_mmad(tmp_path)
    msg = str(e.value)
    _one_line(msg)
    assert msg.startswith(f"{path}: record {BOTTLE!r}: ") and needle in msg, msg
    recs, report = read_mmad(tmp_path, policy="skip")
    assert report.skipped == [msg]
    assert BOTTLE not in by_key(recs) and len(recs) == 7
    assert report.n_records == 7 and report.n_questions == 30 - 7


@pytest.mark.parametrize("mutate,needle", QUESTION_PROBLEMS,
                         ids=[m.__name__[3:] for m, _ in QUESTION_PROBLEMS])
def test_bad_question(tmp_path, mutate, needle):
    data = _fixture_data()
    mutate(data)
    path = _write_json(tmp_path, data)
    with pytest.raises(MMADError) as e:
        load_mmad(tmp_path)
    msg = str(e.value)
    _one_line(msg)
    assert msg.startswith(f"{path}: record {BOTTLE!r}: question 2: ") and needle in msg, msg
    recs, report = read_mmad(tmp_path, policy="skip")
    assert report.skipped == [msg]
    # only the bad question goes; the others keep their original index
    b = by_key(recs)[BOTTLE]
    assert [q.index for q in b.conversation] == [0, 1, 3, 4, 5, 6]
    assert report.n_records == 8 and report.n_questions == 29


@pytest.mark.parametrize("bad_key,needle", [
    ("DS-MVTec/../../../etc/passwd", "escapes the data root"),
    ("/abs/DS-MVTec/bottle/x.png", "is absolute"),
    ("DS-MVTec\\bottle\\x.png", "backslash"),
    ("DS-MVTec/bottle//x.png", "not a normalised path"),
    ("DS-MVTec/x.png", "must look like <Dataset>/<class>"),
])
def test_bad_key(tmp_path, bad_key, needle):
    data = _rename(_fixture_data(), CANDLE_GOOD, bad_key)
    path = _write_json(tmp_path, data)
    with pytest.raises(MMADError) as e:
        load_mmad(tmp_path)
    msg = str(e.value)
    _one_line(msg)
    assert msg.startswith(f"{path}: record {bad_key!r}: ") and needle in msg, msg
    recs, report = read_mmad(tmp_path, policy="skip")
    assert len(recs) == 7 and report.n_skipped == 1 and CANDLE_GOOD not in by_key(recs)


def test_skip_counts_every_problem_and_logs(tmp_path, caplog):
    data = _fixture_data()
    _m_answer_not_option(data)
    data[CANDLE_BAD]["conversation"][1]["type"] = "Bogus"
    del data[GOODS_GOOD]["similar_templates"]
    _write_json(tmp_path, data)
    recs, report = read_mmad(tmp_path, policy="skip")
    assert report.n_skipped == 3
    assert f"record {BOTTLE!r}: question 2" in report.skipped[0]
    assert f"record {CANDLE_BAD!r}: question 1" in report.skipped[1]
    assert f"record {GOODS_GOOD!r}: missing key 'similar_templates'" in report.skipped[2]
    assert report.n_records == 7 and report.n_questions == 30 - 1 - 1 - 2
    with caplog.at_level(logging.WARNING, logger="emit_jax.data.mmad"):
        assert len(load_mmad(tmp_path, policy="skip")) == 7
    assert "skipped 3" in caplog.text
    with pytest.raises(ValueError, match="policy"):
        load_mmad(tmp_path, policy="ignore")


def test_file_level_errors(tmp_path):
    path = os.path.join(tmp_path, "mmad.json")
    with pytest.raises(MMADError, match="no such file"):
        load_mmad(tmp_path)
    with open(path, "w") as f:
        f.write('{"DS-MVTec/bottle/image/good/000.png": {"conversation": [}')
    for policy in ("error", "skip"):
        with pytest.raises(MMADError) as e:
            load_mmad(tmp_path, policy=policy)
        assert str(e.value).startswith(f"{path}: malformed JSON") and "line 1" in str(e.value)
        _one_line(str(e.value))
    _write_json(tmp_path, [1, 2])
    with pytest.raises(MMADError, match="top level must be a JSON object"):
        load_mmad(tmp_path, policy="skip")


def test_duplicate_keys(tmp_path):
    rec = json.dumps(_fixture_data()[CANDLE_GOOD])
    path = os.path.join(tmp_path, "mmad.json")
    with open(path, "w") as f:
        f.write("{" + f'"{CANDLE_GOOD}": {rec}, "{GOODS_GOOD}": {rec}, "{CANDLE_GOOD}": {rec}' + "}")
    with pytest.raises(MMADError, match="appears more than once"):
        load_mmad(tmp_path)
    recs, report = read_mmad(tmp_path, policy="skip")
    assert [r.image for r in recs] == [GOODS_GOOD] and report.n_skipped == 1
    q = ('{"Question": "Q?", "Answer": "A", "Options": {"A": "x.", "A": "y."}, '
         '"type": "Anomaly Detection"}')
    with open(path, "w") as f:
        f.write("{" + f'"{CANDLE_GOOD}": {{"conversation": [{q}], "similar_templates": ["a/b/c.png"]}}' + "}")
    with pytest.raises(MMADError, match=r"question 0: duplicate key\(s\) \['A'\] in 'Options'"):
        load_mmad(tmp_path)


def test_check_files(tmp_path):
    root = tmp_path / "data"
    shutil.copytree(FIXTURE, root)
    os.remove(root / "MVTec-AD/bottle/train/good/017.png")
    load_mmad(root)  # file checks are opt-in
    with pytest.raises(MMADError, match=r"similar_templates\[0\] 'MVTec-AD/bottle/train/good/017.png' not found"):
        load_mmad(root, check_files=True)


def test_bad_domain_knowledge(tmp_path):
    path = _write_json(tmp_path, {"MVTec": {"bottle": {"good": 5}}}, "domain_knowledge.json")
    with pytest.raises(MMADError) as e:
        load_domain_knowledge(tmp_path)
    assert str(e.value) == f"{path}: 'MVTec'/'bottle'/'good': must be a string, got int"
    _write_json(tmp_path, {"MVTec": {"bottle": ["x"]}}, "domain_knowledge.json")
    with pytest.raises(MMADError, match="'MVTec'/'bottle': must be a JSON object"):
        load_domain_knowledge(tmp_path)
    with open(path, "w") as f:
        f.write("{")
    with pytest.raises(MMADError, match="malformed JSON"):
        load_domain_knowledge(tmp_path)


# ---------------------------------------------------------------------------------------- prompts
def test_prompt_anomaly_detection_exact(records, dk):
    rec = by_key(records)[BOTTLE]
    p = build_prompt(rec, 0, dk)
    assert p.text == (TWO_IMG_HEAD + BOTTLE_DK + "\n" + SELECT + DIRECT + "\n\n"
                      + "Question: Is there any defect in the object? \nA. Yes.\nB. No.\n")
    assert p.image_keys == ["MVTec-AD/bottle/train/good/017.png", BOTTLE]
    assert p.images == [os.path.join(FIXTURE, "MVTec-AD", "bottle", "train", "good", "017.png"),
                        os.path.join(FIXTURE, "DS-MVTec", "bottle", "image", "broken_large", "000.png")]
    assert p.use_comp and p.text.count("<image>") == 2
    assert p.question_text == "Is there any defect in the object? \nA. Yes.\nB. No.\n"
    # "defects:" is followed directly by the entry's own leading space
    assert "types of defects: <Contamination>\n Description:" in p.text


def test_prompt_defect_think_and_random_template(records, dk):
    rec = by_key(records)[BOTTLE]
    p = build_prompt(rec, 2, dk, think=True, template="random")
    assert p.text == (TWO_IMG_HEAD + BOTTLE_DK + "\n" + SELECT + THINK + "\n\n"
                      + "Question: There is a defect in the object. Where is the defect? \n"
                      + "A. At the bottom of the bottle.\nB. On the rim at the top right.\n"
                      + "C. In the center.\nD. On the left side of the neck.\n")
    assert p.image_keys == ["MVTec-AD/bottle/train/good/151.png", BOTTLE] and p.think


def test_prompt_object_exact(records, dk):
    rec = by_key(records)[BOTTLE]
    p = build_prompt(rec, 6, dk)
    assert p.text == (ONE_IMG_HEAD + "\n" + SELECT + DIRECT + "\n\n"
                      + "Question:What is the shape of the bottle opening? \n"
                      + "A. Square.\nB. Triangular.\nC. Circular.\nD. Hexagonal.\n")
    assert p.image_keys == [BOTTLE] and not p.use_comp and p.text.count("<image>") == 1
    # no domain knowledge for Object* even though it is available
    assert DK_PREFIX not in p.text
    p = build_prompt(rec, rec.conversation[5], dk, think=True)
    assert p.text.startswith(ONE_IMG_HEAD + "\n" + SELECT + THINK + "\n\nQuestion:What kind")


def test_prompt_other_sub_datasets_use_their_knowledge(records, dk):
    recs = by_key(records)
    p = build_prompt(recs[CANDLE_BAD], 1, dk)
    assert (DK_PREFIX + " <Normal Characteristics>\n Description: Four white tea lights arranged in a "
            "2x2 grid.\n <Candle Defects>\n Description: Spots, missing chunks, wick problems.\n"
            + SELECT) in p.text
    assert p.image_keys == ["VisA/candle/train/good/0311.JPG", CANDLE_BAD]
    p = build_prompt(recs[GOODS_BAD], 0, dk)
    assert domain_knowledge_block(dk, GOODS_BAD) in p.text and "<Cap Half Open>" in p.text
    # no DK for the class -> a clear error
    with pytest.raises(MMADError, match=r"no entry 'MVTec'/'bottle'"):
        build_prompt(recs[BOTTLE], 0, {"MVTec": {}})
    # explicit ablation: no DK at all
    p = build_prompt(recs[BOTTLE], 0, None)
    assert TWO_IMG_HEAD + "\n" + SELECT in p.text


USE_COMP = {  # (key, question index) -> expected use_comp
    (BOTTLE, 0): True,    # AD, MVTec
    (BOTTLE, 1): False,   # DC: no trigger phrase
    (BOTTLE, 2): True,    # DL, MVTec
    (BOTTLE, 3): False, (BOTTLE, 4): False,
    (BOTTLE, 5): False,   # Object*: one image
    (BOTTLE, 6): False,
    (BOTTLE_GOOD, 0): True,
    (CANDLE_GOOD, 0): True,  # VisA
    (CANDLE_GOOD, 1): False,
    (CANDLE_BAD, 0): True, (CANDLE_BAD, 1): True, (CANDLE_BAD, 2): False,
    (LOCO_BAD, 0): False, (LOCO_BAD, 1): False,  # MVTec-LOCO never
    (LOCO_GOOD, 0): False,
    (GOODS_BAD, 0): False, (GOODS_BAD, 2): False,  # GoodsAD never
    (GOODS_GOOD, 0): False,
}


def test_use_comp_rule(records, dk):
    recs = by_key(records)
    for (key, i), want in USE_COMP.items():
        assert build_prompt(recs[key], i, dk).use_comp is want, (key, i)
    trig = "Where is the defect?"
    assert use_comp(trig, 2, "DS-MVTec/a/b.png") and use_comp(trig, 2, "VisA/a/b.png")
    assert not use_comp(trig, 1, "DS-MVTec/a/b.png")
    assert not use_comp(trig, 3, "DS-MVTec/a/b.png")
    assert not use_comp(trig, 2, "MVTec-AD/a/b.png")
    assert not use_comp("Is there any defect in the object", 2, "VisA/a/b.png")  # exact phrase


def test_use_comp_agrees_with_model_module(records, dk):
    pytest.importorskip("jax")
    from emit_jax.models import emit as emit_model
    for p in iter_prompts(records, dk):
        want = emit_model.use_comp(len(p.images), p.text, mode="eval", image_path=p.question.image)
        assert p.use_comp is want, p.question


def test_iter_prompts_and_answer_row(records, dk):
    prompts = list(iter_prompts(records, dk))
    assert len(prompts) == 30
    assert [(p.question.image, p.question.index) for p in prompts] == [
        (r.image, q.index) for r in records for q in r.conversation]
    for p in prompts:
        assert p.text.count("<image>") == len(p.images) == len(p.image_keys)
        assert len(p.images) == (2 if p.question.needs_reference else 1)
        assert p.text.endswith(p.question_text)
    p = build_prompt(by_key(records)[CANDLE_GOOD], 0, dk)
    # docs/reference/mmad.md 6.1's example element, field for field
    assert p.answer_row("B") == {
        "image": "VisA/candle/test/good/0042.JPG",
        "question": {"type": "text", "text": "Is there any defect in the object? \nA. Yes.\nB. No.\n"},
        "question_type": "Anomaly Detection", "options": {"A": "Yes.", "B": "No."},
        "correct_answer": "B", "gpt_answer": "B"}
    assert p.answer_row(None, response="maybe")["response"] == "maybe"


def test_build_prompt_in_memory_record():
    q = Question(image="VisA/candle/test/bad/1.JPG", index=0, text="Is there any defect in the object?",
                 options={"A": "Yes.", "B": "No."}, answer="A", type="Anomaly Detection")
    rec = Record(image=q.image, conversation=(q,), similar_templates=("VisA/candle/train/good/2.JPG",))
    p = build_prompt(rec, 0, None)
    assert p.images == p.image_keys == ["VisA/candle/train/good/2.JPG", q.image] and p.use_comp
    with pytest.raises(MMADError, match="no random_templates"):
        build_prompt(rec, 0, None, template="random")
    other = Record(image="VisA/candle/test/bad/9.JPG", conversation=(), similar_templates=("a/b/c",))
    with pytest.raises(ValueError, match="given with record"):
        build_prompt(other, q, None)


def test_training_instructions_match():
    # the evaluation prompt reuses the training module's instruction strings; both must be exact
    from emit_jax.data import prompts
    assert prompts.INSTR_DIRECT == DIRECT and prompts.INSTR_THINK == THINK


# ------------------------------------------------------------------------------------ parsing
YES_NO = {"A": "Yes.", "B": "No."}
FOUR = {"A": "Contamination.", "B": "Scratch.", "C": "Large breakage.", "D": "Discoloration."}


@pytest.mark.parametrize("text,want", [
    ("A", "A"), ("B.", "B"), ("  C \n", "C"), ("A. Yes.", "A"), ("(B)", "B"), ("D:", "D"),
    ("The answer is D.", "D"), ("Answer: B", "B"),            # 'A' of 'Answer' is not standalone
    ("I think B, not A", "B"),                                 # EMIT keeps the first
    ("E", "E"),                                                # A-E even when not an option
    ("<answer>C</answer>", "C"),                               # tags are ignored in direct mode...
    ("<think>It is A</think><answer>B</answer>", "A"),         # ...so the first letter wins
])
def test_parse_direct(text, want):
    assert parse_answer(text, FOUR) == want


def test_parse_pick_last():
    assert parse_answer("I think B, not A", FOUR, pick="last") == "A"


@pytest.mark.parametrize("text,want", [
    ("<think>A crack is visible near B.</think><answer>C</answer>", "C"),
    ("<think>x</think><answer>A</answer> wait <answer>D</answer>", "D"),  # last answer tag
    ("< answer > D </ answer >", "D"),                                    # spaces inside the tags
    ("<think>\nhmm\n</think>\n<answer>\nB. Scratch.\n</answer>", "B"),    # spans lines
    ("<think>The defect is a scratch.</think> So the answer is C", "C"),  # no tag -> whole text
    ("<think>A scratch.</think> C", "A"),                                 # ... first capital letter
    ("<answer>large breakage</answer>", "C"),                             # no letter -> fuzzy
])
def test_parse_think(text, want):
    assert parse_answer(text, FOUR, think=True) == want


def test_parse_fallbacks():
    # no standalone capital A-E: closest option text (difflib, cutoff 0)
    assert parse_answer("yes", YES_NO) == "A"
    assert parse_answer("no", YES_NO) == "B"
    assert parse_answer("it looks like a scratch", FOUR) == "B"
    assert parse_answer("b", YES_NO) in ("A", "B")     # lower case is never a letter match
    assert parse_answer("zzzz", FOUR) in FOUR          # with options, always some letter
    # strict variant
    for garbage in ("", "   ", "zzzz", "b", "Answer: none", "yes"):
        assert parse_answer(garbage, FOUR, fallback="none") is None
    assert parse_answer("<answer></answer>", FOUR, think=True, fallback="none") is None
    # without options: first character upper-cased, else 'A'; empty -> None
    assert parse_answer("b is right") == "B"
    assert parse_answer("yes") == "A"
    assert parse_answer("") is None
    assert parse_answer("", {}) is None
    with pytest.raises(ValueError):
        parse_answer("x", FOUR, fallback="maybe")


# ------------------------------------------------------------------------------------ scoring
def row(image, qtype, correct, got):
    return {"image": image, "question": {"type": "text", "text": "q"}, "question_type": qtype,
            "options": {"A": "a", "B": "b", "C": "c", "D": "d"}, "correct_answer": correct,
            "gpt_answer": got}


AD, DC, DL, OC = "Anomaly Detection", "Defect Classification", "Defect Localization", "Object Classification"
MV = "DS-MVTec/bottle/image/"
HAND_ROWS = [
    row(MV + "good/001.png", AD, "B", "B"),                   # normal: 1 / 2
    row(MV + "good/002.png", AD, "B", "A"),
    row(MV + "broken_large/000.png", AD, "A", "A"),           # anomalous: 3 / 4
    row(MV + "broken_large/001.png", AD, "A", "A"),
    row(MV + "broken_small/000.png", AD, "A", "A"),
    row(MV + "contamination/000.png", AD, "A", "B"),
    row(MV + "broken_large/000.png", DC, "C", "C"),           # DC 1 / 2
    row(MV + "broken_large/001.png", DC, "C", "A"),
    row(MV + "good/001.png", "Object Structure", "C", "C"),   # OA 2 / 3 (merged)
    row(MV + "good/001.png", "Object Details", "D", "A"),
    row(MV + "good/002.png", "Object Details", "D", "D"),
    row("VisA/candle/test/good/0042.JPG", AD, "B", "B"),      # normal 1/1
    row("VisA/candle/test/bad/0007.JPG", AD, "A", "B"),       # anomalous 0/1
    row("VisA/candle/test/bad/0007.JPG", DC, "B", "B"),       # 1/1
    row("VisA/candle/test/good/0042.JPG", "Object Details", "D", "A"),  # 0/1
]


def test_summarize_hand_computed():
    s = summarize(HAND_ROWS)
    assert s.tasks == (AD, DC, "Object Analysis") and s.groups == ("DS-MVTec", "VisA")
    mv, visa = s.accuracy["DS-MVTec"], s.accuracy["VisA"]
    assert mv[AD] == pytest.approx(62.5)                       # balanced, not 4/6 = 66.7
    assert mv[DC] == pytest.approx(50.0)
    assert mv["Object Analysis"] == pytest.approx(200 / 3)
    assert mv["Average"] == pytest.approx((62.5 + 50 + 200 / 3) / 3)   # 59.722
    assert (visa[AD], visa[DC], visa["Object Analysis"], visa["Average"]) == pytest.approx((50, 100, 0, 50))
    assert s.average[AD] == pytest.approx(56.25)
    assert s.average[DC] == pytest.approx(75.0)
    assert s.average["Object Analysis"] == pytest.approx(100 / 3)
    assert s.score == pytest.approx(((62.5 + 50 + 200 / 3) / 3 + 50) / 2)  # 54.861
    # the headline equals the plain mean of the group x task matrix
    cells = [s.accuracy[g][t] for g in s.groups for t in s.tasks]
    assert s.score == pytest.approx(sum(cells) / len(cells))
    # counts
    assert s.cells["DS-MVTec"][AD].total == 6 and s.cells["DS-MVTec"]["Object Analysis"].total == 3
    assert s.task_counts() == {AD: 8, DC: 3, "Object Analysis": 4}
    assert s.group_counts() == {"DS-MVTec": 11, "VisA": 4}
    assert (s.n_rows, s.n_scored, s.n_invalid, s.n_dropped, s.n_skipped) == (15, 15, 0, 0, 0)
    d = s.detection["DS-MVTec"]
    assert (d.normal_acc, d.anomaly_acc) == (0.5, 0.75)
    assert d.recall == pytest.approx(75) and d.precision == pytest.approx(75)   # TP 3, FP 1
    assert d.f1 == pytest.approx(75) and d.overkill == pytest.approx(50) and d.miss == pytest.approx(25)


def test_summarize_by_class_and_group_order():
    rows = HAND_ROWS + [row("GoodsAD/drink_bottle/test/cap_open/003.jpg", AD, "A", "A"),
                        row("MVTec-LOCO/pushpins/test/good/012.png", AD, "B", "B")]
    s = summarize(list(reversed(rows)))
    assert s.groups == ("DS-MVTec", "MVTec-LOCO", "VisA", "GoodsAD")  # MMAD order
    # GoodsAD has only an anomalous AD item: normal side counts 0 -> balanced 50 (as summary.py)
    assert s.accuracy["GoodsAD"][AD] == pytest.approx(50.0)
    assert s.detection["GoodsAD"].normal_total == 0
    f = summarize(HAND_ROWS, by="class")
    assert f.groups == ("DS-MVTec/bottle", "VisA/candle")
    assert f.accuracy["DS-MVTec/bottle"] == summarize(HAND_ROWS).accuracy["DS-MVTec"]


def test_empty_cell_counts_zero_in_average():
    rows = [row(MV + "good/001.png", AD, "B", "B"), row(MV + "broken_large/000.png", AD, "A", "A"),
            row(MV + "broken_large/000.png", DL, "A", "A"),
            row("VisA/candle/test/good/1.JPG", AD, "B", "B"), row("VisA/candle/test/bad/2.JPG", AD, "A", "A")]
    s = summarize(rows)
    assert s.tasks == (AD, DL)
    assert s.cells["VisA"][DL].total == 0 and s.accuracy["VisA"][DL] == 0.0
    assert s.accuracy["VisA"]["Average"] == pytest.approx(50.0)
    assert s.score == pytest.approx(75.0)
    table = format_table(s)
    assert "| VisA " in table and " - |" in table and "no questions" in table


def test_invalid_answer_policies():
    rows = [row(MV + "x/0.png", DC, "A", "A"),    # ok
            row(MV + "x/1.png", DC, "A", None),   # invalid
            row(MV + "x/2.png", DC, "B", "B"),    # ok, but skipped by EMIT's removal bug
            row(MV + "x/3.png", DC, "C", "A"),    # wrong
            row(MV + "x/4.png", DC, "D", "A")]    # wrong
    emit = summarize(rows, invalid="emit")
    assert (emit.cells["DS-MVTec"][DC].correct, emit.cells["DS-MVTec"][DC].total) == (1, 3)
    assert (emit.n_invalid, emit.n_dropped, emit.n_skipped, emit.n_scored) == (1, 1, 1, 3)
    drop = summarize(rows, invalid="drop")
    assert drop.accuracy["DS-MVTec"][DC] == pytest.approx(50.0) and drop.n_skipped == 0
    wrong = summarize(rows, invalid="wrong")
    assert wrong.accuracy["DS-MVTec"][DC] == pytest.approx(40.0) and wrong.n_scored == 5
    # two invalid rows in a row: the second is skipped (not removed), the next one is counted
    rows2 = [row(MV + "x/0.png", DC, "A", "Z"), row(MV + "x/1.png", DC, "A", ""),
             row(MV + "x/2.png", DC, "B", "B")]
    e2 = summarize(rows2, invalid="emit")
    assert (e2.n_dropped, e2.n_skipped, e2.n_scored) == (1, 1, 1)
    assert e2.accuracy["DS-MVTec"][DC] == 100.0
    # an invalid correct_answer is treated like an invalid prediction
    e3 = summarize([row(MV + "x/0.png", DC, "Yes", "A")], invalid="drop")
    assert e3.n_scored == 0 and e3.accuracy["DS-MVTec"][DC] == 0.0
    with pytest.raises(ValueError):
        summarize(rows, invalid="ignore")


def _reference_summary(all_answers_json, normal_flag="good"):
    """A hand transcription of EMIT's summary.py (pandas replaced by dicts), bugs included."""
    dataset_names, type_list = [], []
    for answer in all_answers_json:
        dataset_name = answer["image"].split("/")[0]
        question_type = answer["question_type"]
        if question_type in ["Object Structure", "Object Details"]:
            question_type = "Object Analysis"
        if dataset_name not in dataset_names:
            dataset_names.append(dataset_name)
        type_list.append(question_type)
    qs = {d: {t: {"total": 0, "correct": 0} for t in type_list} for d in dataset_names}
    det = {d: {"normal": {"total": 0, "correct": 0}, "abnormal": {"total": 0, "correct": 0}}
           for d in dataset_names}
    for answer in all_answers_json:
        dataset_name = answer["image"].split("/")[0]
        question_type = answer["question_type"]
        if question_type in ["Object Structure", "Object Details"]:
            question_type = "Object Analysis"
        gpt_answer, correct_answer = answer["gpt_answer"], answer["correct_answer"]
        if correct_answer not in ["A", "B", "C", "D", "E"] or gpt_answer not in ["A", "B", "C", "D", "E"]:
            all_answers_json.remove(answer)
            continue
        qs[dataset_name][question_type]["total"] += 1
        if answer["correct_answer"] == answer["gpt_answer"]:
            qs[dataset_name][question_type]["correct"] += 1
        if question_type == "Anomaly Detection":
            side = "normal" if normal_flag in answer["image"] else "abnormal"
            det[dataset_name][side]["total"] += 1
            if answer["correct_answer"] == answer["gpt_answer"]:
                det[dataset_name][side]["correct"] += 1
    acc = {d: {} for d in dataset_names}
    for d in dataset_names:
        for t in set(type_list):
            tot, cor = qs[d][t]["total"], qs[d][t]["correct"]
            acc[d][t] = (cor / tot if tot else 0) * 100
            if t == "Anomaly Detection":
                n, a = det[d]["normal"], det[d]["abnormal"]
                na = n["correct"] / n["total"] if n["total"] else 0
                aa = a["correct"] / a["total"] if a["total"] else 0
                acc[d][t] = (na + aa) / 2 * 100
        acc[d]["Average"] = sum(acc[d][t] for t in set(type_list)) / len(set(type_list))
    bottom = {c: sum(acc[d][c] for d in dataset_names) / len(dataset_names) for c in acc[dataset_names[0]]}
    return acc, bottom


def test_summarize_matches_reference_transcription():
    rng = random.Random(0)
    images = [BOTTLE, BOTTLE_GOOD, CANDLE_GOOD, CANDLE_BAD, LOCO_BAD, LOCO_GOOD, GOODS_BAD, GOODS_GOOD]
    types = sorted(mmad.QUESTION_TYPES - {"Object Analysis"})
    for trial in range(30):
        rows = []
        for _ in range(rng.randint(5, 60)):
            got = rng.choice(["A", "B", "C", "D", "A", "B", None, "", "X"])  # some invalid
            rows.append({"image": rng.choice(images), "question_type": rng.choice(types),
                         "correct_answer": rng.choice("ABCD"), "gpt_answer": got})
        if trial % 3 == 0:  # equal dicts exercise list.remove's "first equal element" rule
            rows += [dict(rows[0]), dict(rows[0])]
        acc, bottom = _reference_summary([dict(r) for r in rows])
        s = summarize(rows, invalid="emit")
        for g in acc:
            for c, v in acc[g].items():
                assert s.accuracy[g][c] == pytest.approx(v), (trial, g, c)
        for c, v in bottom.items():
            assert s.average[c] == pytest.approx(v), (trial, c)


def test_all_correct_end_to_end(records, dk, tmp_path):
    prompts = list(iter_prompts(records, dk))
    rows = [p.answer_row(parse_answer(f"{p.question.answer}.", p.question.options)) for p in prompts]
    path = tmp_path / "out" / "answers.json"
    write_answers_json(path, rows)
    back = read_answers_json(path)
    assert back == rows
    s = summarize(back)
    assert s.groups == ("DS-MVTec", "MVTec-LOCO", "VisA", "GoodsAD") and s.tasks == mmad.TASKS
    for g in s.groups:
        for t in s.tasks:
            assert s.accuracy[g][t] == (100.0 if s.cells[g][t].total else 0.0)
    # the fixture has 7 / 6 / 5 / 5 of the 7 tasks per sub-dataset; empty cells count 0
    assert s.score == pytest.approx(100 * (7 + 6 + 5 + 5) / 28)
    assert s.group_counts() == {"DS-MVTec": 10, "MVTec-LOCO": 7, "VisA": 6, "GoodsAD": 7}
    assert s.task_counts() == {AD: 8, DC: 3, DL: 4, "Defect Description": 2, "Defect Analysis": 2,
                               OC: 6, "Object Analysis": 5}


# ------------------------------------------------------------------------------------ output
def test_format_table_full():
    s = summarize(HAND_ROWS)
    t = format_table(s)
    lines = t.splitlines()
    header = lines[0]
    assert header.index("Anomaly Discrimination") < header.index("Defect Classification") \
        < header.index("Object Analysis") < header.index("Average") < header.index("Questions")
    assert "Defect Localization" not in header  # data-driven: only tasks present
    assert set(lines[1]) <= {"|", "-", ":"}
    body = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]] for ln in lines[2:6]}
    assert body["DS-MVTec"] == ["62.5", "50.0", "66.7", "59.7", "11"]
    assert body["VisA"] == ["50.0", "100.0", "0.0", "50.0", "4"]
    assert body["Average"] == ["56.2", "75.0", "33.3", "54.9", ""]
    assert body["Questions"] == ["8", "3", "4", "", "15"]
    assert len({len(ln) for ln in lines[:6]}) == 1  # aligned
    assert "balanced accuracy" in t and "15 of 15 questions scored" in t
    # twentieth probe C74: "policy 'emit'" read as the answer parsing; it is the invalid-answer one
    assert "(invalid answers: 0, invalid-answer policy 'emit': 0 dropped, 0 skipped)" in t
    raw = format_table(s, paper_names=False, digits=2)
    assert "Anomaly Detection" in raw.splitlines()[0] and "62.50" in raw
    assert "Anomaly Discrimination" not in raw


def test_format_table_mmad_order_and_mvtec_style_subset(records, dk):
    rows = [p.answer_row(p.question.answer) for p in iter_prompts(records, dk)]
    full = format_table(summarize(rows)).splitlines()[0]
    pos = [full.index(n) for n in ("Anomaly Discrimination", "Defect Classification",
                                   "Defect Localization", "Defect Description", "Defect Analysis",
                                   "Object Classification", "Object Analysis", "Average")]
    assert pos == sorted(pos)
    # an MVTec-style dataset with EMIT's four tasks, given in scrambled order
    four = [r for r in rows if r["question_type"] in (OC, DL, AD, DC)][::-1]
    s = summarize(four)
    assert s.tasks == (AD, DC, DL, OC)
    header = [c.strip() for c in format_table(s).splitlines()[0].split("|")[1:-1]]
    assert header == ["Dataset", "Anomaly Discrimination", "Defect Classification",
                      "Defect Localization", "Object Classification", "Average", "Questions"]


def test_write_answers_atomic(tmp_path):
    path = tmp_path / "answers.json"
    write_answers_json(path, [row(MV + "good/1.png", AD, "B", None)])
    assert json.loads(path.read_text())[0]["gpt_answer"] is None  # null: dropped by MMAD's summary
    before = path.read_text()
    with pytest.raises(TypeError):  # not JSON-serialisable: the old file stays, no temp left
        write_answers_json(path, [dict(row(MV + "good/1.png", AD, "B", "B"), extra=object())])
    assert path.read_text() == before
    assert sorted(os.listdir(tmp_path)) == ["answers.json"]
    with pytest.raises(ValueError, match="missing field"):
        write_answers_json(path, [{"image": "a/b/c"}])
    bad = tmp_path / "bad.json"
    bad.write_text('{"image": 1}')
    with pytest.raises(ValueError, match="must be a JSON list"):
        read_answers_json(bad)


def test_write_accuracy_csv(tmp_path):
    s = summarize(HAND_ROWS)
    path = tmp_path / "answers_accuracy.csv"
    write_accuracy_csv(path, s)
    lines = path.read_text().splitlines()
    assert lines[0] == ",Anomaly Detection,Defect Classification,Object Analysis,Average,normal_acc,anomaly_acc"
    assert [ln.split(",")[0] for ln in lines[1:]] == ["DS-MVTec", "VisA", "Average"]
    mv = [float(x) for x in lines[1].split(",")[1:]]
    assert mv == pytest.approx([62.5, 50.0, 200 / 3, (62.5 + 50 + 200 / 3) / 3, 0.5, 0.75])
    avg = [float(x) for x in lines[3].split(",")[1:]]
    assert avg[-2:] == pytest.approx([0.75, 0.375]) and avg[3] == pytest.approx(s.score)


def test_lettered_puts_the_parsers_letter_in_the_answer_tag():
    from emit_jax.eval.scoring import lettered

    opts = list(FOUR.values())
    text = f"<think>I see a {opts[1].lower()}</think><answer>{opts[1]}</answer>"
    assert lettered(text, opts) == f"<think>I see a {opts[1].lower()}</think><answer>B</answer>"
    # a letter already there stays; the last answer tag is the one read (as parse_answer's)
    assert lettered("<answer>x</answer> <answer>C</answer>", opts) == \
        "<answer>x</answer> <answer>C</answer>"
    assert lettered("no tags here", opts) == "no tags here"
    assert lettered("<answer>Hole.</answer>", None) == "<answer>Hole.</answer>"
