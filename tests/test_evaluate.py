"""python -m emit_jax.evaluate on MMAD-format and MVTec-style data, with an HF folder (InternVL or
EMIT) and with an Orbax checkpoint; the tiny tokenizer; Table 1 printed; answers written; the
authors' MMAD protocol (prompt ids as their batch_chat builds them, 1,024 new tokens) and both
papers' answer parsing (--parse emit|mmad)."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest
from flax import nnx
from PIL import Image

from test_tasks import make_mvtec
from emit_jax import checkpoint, hf
from emit_jax.data.tokenizer import special_ids, train_tiny_tokenizer
from emit_jax.eval.scoring import parse_response
from emit_jax.models import architectures
from emit_jax.models.emit import EMIT
from emit_jax.models.internvl import InternVL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MMAD = os.path.join(ROOT, "tests", "fixtures", "mmad")


def tiny_for(tok, vocab, image_size=56):
    cfg = architectures.tiny()
    return cfg.replace(
        vision=dataclasses.replace(cfg.vision, image_size=image_size, num_hidden_layers=2),
        text=dataclasses.replace(cfg.text, vocab_size=vocab, num_hidden_layers=2),
        image_token_id=special_ids(tok)["<IMG_CONTEXT>"])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    tok = train_tiny_tokenizer(None, d / "tok")
    plain = InternVL(tiny_for(tok, len(tok)), rngs=nnx.Rngs(0))
    hf.save(plain, d / "plain")
    tok.save_pretrained(d / "plain")
    emit = EMIT.create(InternVL(tiny_for(tok, len(tok) - 1), rngs=nnx.Rngs(1)), tokenizer=tok)
    hf.save(emit, d / "emit")
    tok.save_pretrained(d / "emit")
    checkpoint.save_model(emit, d / "emit_ckpt", assets_from=d / "emit")
    return {k: str(d / k) for k in ("plain", "emit", "emit_ckpt")}


def run(*args):
    return subprocess.run([sys.executable, "-m", "emit_jax.evaluate", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)


def test_mmad_fixture_with_emit_model(folders, tmp_path):
    out = tmp_path / "res.json"
    r = run("--checkpoint", folders["emit"], "--data", MMAD, "--out", str(out), "--max-tiles", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Anomaly Detection" in r.stdout or "Anomaly" in r.stdout
    assert "Average" in r.stdout and "Questions" in r.stdout
    res = json.loads(out.read_text())
    n_questions = sum(len(rec["conversation"]) for rec in
                      json.load(open(os.path.join(MMAD, "mmad.json"))).values())
    assert res["format"] == "mmad" and res["questions"] == n_questions
    row = res["answers"][0]
    assert {"image", "question", "question_type", "correct_answer", "gpt_answer", "response"} <= set(row)
    # the authors' protocol by default: 1,024 new tokens (at least 1), EMIT's answer parsing
    assert (res["parse"], res["max_new_tokens"], res["min_new_tokens"]) == ("emit", 1024, 1)
    assert "EMIT's answer parsing" in r.stdout
    assert all(a["gpt_answer"] == parse_response(a["response"], a["options"], parse="emit")
               for a in res["answers"])


def test_mvtec_style_with_orbax_checkpoint_and_limit(folders, tmp_path):
    data = make_mvtec(tmp_path / "ds")
    out = tmp_path / "res.json"
    r = run("--checkpoint", folders["emit_ckpt"], "--data", data, "--limit", "7", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["format"] == "mvtec" and res["questions"] == 7
    # the fast default off MMAD: 8 new tokens, EOS allowed first
    assert (res["parse"], res["max_new_tokens"], res["min_new_tokens"]) == ("emit", 8, 0)
    assert all(a["question_type"] in ("Anomaly Detection", "Defect Classification",
                                      "Defect Localization", "Object Classification")
               for a in res["answers"])
    # seventeenth probe S3: a folder without splits.json asks every image, train/ included
    # (scored without a word before); said once the answers are in
    asked_train = any("/train/" in a["image"] for a in res["answers"])
    note = (f"note: {data} has no splits.json: every image was asked, train/ included; --split "
            "test asks only its test/ images")
    assert asked_train and note in r.stderr.splitlines(), r.stderr[-2000:]
    r = run("--checkpoint", folders["emit_ckpt"], "--data", data, "--limit", "7", "--split",
            "test")
    assert r.returncode == 0 and "no splits.json" not in r.stderr, r.stderr[-3000:]


def test_plain_internvl_think_mode(folders, tmp_path):
    data = make_mvtec(tmp_path / "ds")
    r = run("--checkpoint", folders["plain"], "--data", data, "--limit", "3", "--think",
            "--max-new-tokens", "6")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Average" in r.stdout


def test_bad_checkpoint_is_one_line_error(tmp_path):
    r = run("--checkpoint", str(tmp_path / "missing"), "--data", MMAD)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing" in lines[0]


# ----------------------------------------------------------------- --parse emit | mmad
def test_parse_modes_pick_different_letters():
    options = {"A": "Yes.", "B": "No."}
    text = "A crack would show at the rim; there is none, so the answer is B."
    assert parse_response(text, options, parse="emit") == "A"  # EMIT: the first letter
    assert parse_response(text, options, parse="mmad") == "B"  # MMAD: the last letter
    # think mode: EMIT reads the last <answer> only, MMAD the whole response
    think = "<think>B looks likely.</think><answer>A</answer> (not B)"
    assert parse_response(think, options, parse="emit", think=True) == "A"
    assert parse_response(think, options, parse="mmad", think=True) == "B"
    # no letter at all: both take the closest option text
    assert parse_response("no", options, parse="emit") == \
        parse_response("no", options, parse="mmad") == "B"
    with pytest.raises(ValueError, match="parse"):
        parse_response(text, options, parse="gpt")


def test_parse_mmad_end_to_end(folders, tmp_path):
    out = tmp_path / "res.json"
    r = run("--checkpoint", folders["emit"], "--data", MMAD, "--out", str(out), "--parse", "mmad",
            "--limit", "3", "--max-new-tokens", "4", "--max-tiles", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "MMAD's answer parsing" in r.stdout
    res = json.loads(out.read_text())
    assert (res["parse"], res["max_new_tokens"], res["min_new_tokens"]) == ("mmad", 4, 1)
    assert res["questions"] == 3
    for a in res["answers"]:
        assert a["gpt_answer"] == parse_response(a["response"], a["options"], parse="mmad")


def test_bad_parse_value_is_one_line_error():
    r = run("--checkpoint", "unused", "--data", MMAD, "--parse", "gpt4")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--parse" in lines[0] and "invalid choice" in lines[0], r.stderr


# ----------------------------------------------------------------- the authors' MMAD prompt
SYSTEM = "You are an industrial inspector who checks products by images."  # sysprompt.txt


def authors_query(user: str, tiles: list[int], per_tile: int, comp_slots: int) -> str:
    """The prompt string EMIT's ``batch_chat`` builds (docs/reference/emit.md 4, 12.2), written
    out here from the facts: the internvl2_5 (ChatML) template with sysprompt.txt as the system
    message; each ``<image>`` in turn replaced by ``<img>`` + ``<IMG_CONTEXT>`` * per_tile * tiles
    + ``</img>`` and nothing else (no newline at evaluation); with CE, the slots spliced in before
    the last ``<|im_end|>`` of the prompt."""
    query = ("<|im_start|>system\n" + SYSTEM + "<|im_end|>\n<|im_start|>user\n" + user
             + "<|im_end|>\n<|im_start|>assistant\n")
    for n in tiles:
        query = query.replace("<image>", "<img>" + "<IMG_CONTEXT>" * (per_tile * n) + "</img>", 1)
    if comp_slots:
        parts = query.split("<|im_end|>")
        query = ("<|im_end|>".join(parts[:-1]) + "<COMP_CONTEXT>" * comp_slots + "<|im_end|>"
                 + parts[-1])
    return query


@pytest.fixture(scope="module")
def emit_runner(folders, tmp_path_factory):
    """A Runner on the tiny EMIT model and a copy of the MMAD fixture whose bottle reference is
    2:1 (three tiles at max_tiles 6: two and the thumbnail)."""
    from emit_jax.evaluate import Runner, load_for_eval

    root = tmp_path_factory.mktemp("mmad") / "MMAD"
    shutil.copytree(MMAD, root)
    Image.new("RGB", (112, 56), (200, 180, 90)).save(
        root / "MVTec-AD" / "bottle" / "train" / "good" / "017.png")
    model, tok = load_for_eval(folders["emit"])
    model.eval()
    return Runner(model, tok, max_tiles=6, max_new_tokens=4, min_new_tokens=1), str(root)


@pytest.mark.parametrize("image,qtype,comp", [
    ("DS-MVTec/bottle/image/broken_large/000.png", "Anomaly Detection", True),   # CE: MVTec AD
    ("VisA/candle/test/bad/0007.JPG", "Defect Localization", True),             # CE: VisA DL
    ("DS-MVTec/bottle/image/broken_large/000.png", "Defect Classification", False),
    ("MVTec-LOCO/pushpins/test/logical_anomalies/005.png", "Anomaly Detection", False),
    ("DS-MVTec/bottle/image/broken_large/000.png", "Object Classification", False),  # 1 image
])
def test_runner_prompt_ids_equal_authors_batch_chat(emit_runner, image, qtype, comp):
    from emit_jax.data.image import dynamic_tiles
    from emit_jax.data.tokenizer import encode_chat
    from emit_jax.evaluate import mmad_queries

    runner, root = emit_runner
    [(text, images, use_comp, _, _)] = [
        q for q in mmad_queries(root, False, None)
        if (q[3](None, "")["image"], q[3](None, "")["question_type"]) == (image, qtype)]
    assert use_comp == comp and len(images) == (1 if qtype.startswith("Object") else 2)
    ids, tiles, ce = runner.encode(text, images, use_comp)
    size = runner.model.config.vision.image_size
    n_tiles = [len(dynamic_tiles(Image.open(p).convert("RGB"), size, 6)) for p in images]
    assert [len(t) for t in tiles] == n_tiles
    if image.startswith("DS-MVTec") and len(images) == 2:
        assert n_tiles[0] == 3  # the 2:1 reference: the per-image counts are used in order
    slots = runner.model.num_comp_slots if comp else 0
    query = authors_query(text, n_tiles, runner.model.config.tokens_per_tile, slots)
    assert ids == list(runner.tok(query)["input_ids"])
    assert (ce is not None) == comp
    if comp:  # the slots sit after the option list, right before the user turn's <|im_end|>
        assert query.endswith("\n" + "<COMP_CONTEXT>" * slots
                              + "<|im_end|>\n<|im_start|>assistant\n")
    # the image newline quirk is what the ids check: training's encoding differs
    train = encode_chat(runner.tok, text, tiles_per_image=n_tiles,
                        tokens_per_tile=runner.model.config.tokens_per_tile, mode="train",
                        comp_slots=slots,
                        comp_token_id=runner.model.emit_config.comp_token_id if comp else None)
    assert train["input_ids"] != ids


def test_domain_knowledge_is_asked_as_the_model_was_trained(tmp_path):
    """The main job trains its tiny model without the domain-knowledge block
    (data.domain_knowledge=False); evaluate always put the whole of it into every prompt, so
    the CLI asked that model prompts unlike any it was trained on (hundreds of tokens longer)."""
    from emit_jax.evaluate import mvtec_queries

    data = make_mvtec(tmp_path / "ds")
    entry = lambda name: f"{name} first sentence. {name} second sentence."  # noqa: E731
    dk = {"ds": {c: {k: entry(f"{c}-{k}") for k in ("good", "dent", "smear")}
                 for c in ("widget", "bolt")}}
    with open(os.path.join(data, "domain_knowledge.json"), "w") as f:
        json.dump(dk, f)
    texts = {mode: [q[0] for q in mvtec_queries(data, False, None, None, 0, mode)]
             for mode in ("all", "1", "none")}
    assert len({len(t) for t in texts.values()}) == 1  # the same questions, only the prompts differ
    assert any("widget-good second sentence." in t for t in texts["all"])
    assert any("widget-good first sentence." in t for t in texts["1"])
    assert not any("second sentence" in t for t in texts["1"])
    assert not any("first sentence" in t for t in texts["none"])
    shorter = [len(n) < len(a) for n, a in zip(texts["none"], texts["all"])]
    assert sum(shorter) > len(shorter) // 2  # every question that has the block


def test_a_number_of_sentences_without_domain_knowledge_is_said(tmp_path, capsys):
    """Twenty-second probe E10: ``--domain-knowledge 3`` on a folder without
    domain_knowledge.json had no effect, without a word."""
    from emit_jax.evaluate import mvtec_queries

    data = make_mvtec(tmp_path / "ds", classes=("widget",))
    capsys.readouterr()
    mvtec_queries(data, False, 2, None, 0, "all")
    assert "domain" not in capsys.readouterr().err
    mvtec_queries(data, False, 2, None, 0, "3")
    assert capsys.readouterr().err.splitlines()[0] == (
        f"note: --domain-knowledge 3: {data} has no domain_knowledge.json; the questions have "
        "no domain knowledge")


@pytest.mark.parametrize("value,needle", [
    ("0", "'0': expected all, none or a number of sentences >= 1"),
    ("some", "'some': expected all, none or a number"),
])
def test_bad_domain_knowledge_value_is_one_line(value, needle, tmp_path):
    r = run("--checkpoint", str(tmp_path), "--data", MMAD, "--domain-knowledge", value)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and needle in lines[0], r.stderr


@pytest.mark.parametrize("flag,value", [("--domain-knowledge", "none"), ("--ad-order", "yes_no")])
def test_mvtec_prompt_flags_on_an_mmad_folder_are_refused(folders, flag, value):
    r = run("--checkpoint", folders["emit"], "--data", MMAD, flag, value)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert f"{flag} {value}: only for an MVTec-style folder" in lines[0]


def test_ad_order_yes_no_asks_as_mmad_does(tmp_path):
    """The main job trains with data.ad_order=yes_no (MMAD's order); evaluate shuffled them."""
    from emit_jax.evaluate import mvtec_queries

    data = make_mvtec(tmp_path / "ds")
    ad = lambda order: [q for q in mvtec_queries(data, False, None, None, 0, "all", order)  # noqa: E731
                        if "Is there any defect" in q[0]]
    assert ad("yes_no") and all("A. Yes.\nB. No." in q[0] for q in ad("yes_no"))
    assert any("A. No.\nB. Yes." in q[0] for q in ad("shuffled"))


def test_empty_responses_are_said(folders, tmp_path, monkeypatch):
    """Eighteenth probe E22: a model whose every response was empty scored 50 / 25 % under
    "invalid answers: 0" (EMIT's parsing falls back to option A). The count is said. The
    model's responses are replaced by empty strings here: what is tested is the note."""
    from emit_jax import evaluate

    data = make_mvtec(tmp_path / "ds")
    notes = []
    monkeypatch.setattr(evaluate.Runner, "answer", lambda self, text, images, comp: "")
    res = evaluate.evaluate(folders["emit_ckpt"], data, limit=5, split="test", note=notes.append)
    assert res["questions"] == 5 and all(a["response"] == "" for a in res["answers"])
    assert ("note: 5 of 5 responses are empty; EMIT's answer parsing picks an option for each "
            "(its fallback: option A), so the table counts them as answers, not as invalid ones"
            in notes), notes


def test_mmad_json_given_as_data_names_its_folder(tmp_path, capsys):
    """Twenty-fourth probe MM2: ``--data .../mmad.json`` (as MMAD's own scripts take it) was
    refused as "a file, not a dataset folder (MVTec AD layout ...)", not naming the folder."""
    from emit_jax import cli
    from emit_jax.evaluate import main

    path = os.path.join(MMAD, "mmad.json")
    assert cli.run(main, ["--checkpoint", str(tmp_path), "--data", path],
                   prog="emit_jax.evaluate") == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"emit_jax.evaluate: error: {path}: a file; --data takes the MMAD folder that holds it "
        f"(--data {MMAD}), whose image paths mmad.json names"]


def test_batched_answers_equal_one_by_one(emit_runner):
    """``Runner.answer_batch`` (several questions per generation, left-padded to the longest
    one's bucket, the last batch padded with copies) gives each question the answer it gets
    alone, in order, with and without the contrastive pair in one batch; ``_record_answers``
    batches the records by shape and gives them back in their order, within their limit."""
    from emit_jax.evaluate import _record_answers, mmad_queries

    runner, root = emit_runner
    queries = [(t, im, c) for t, im, c, _, _ in mmad_queries(root, False, None)]
    comp = [q for q in queries if q[2]]
    plain = [q for q in queries if not q[2]]
    assert len(comp) >= 2 and len(plain) >= 2
    alone = {id(q): runner.answer(*q) for q in queries}
    assert len(set(alone.values())) > 1  # the order is seen in the answers
    assert runner.answer_batch(comp, rows=len(comp) + 2) == [alone[id(q)] for q in comp]
    assert runner.answer_batch(plain) == [alone[id(q)] for q in plain]
    assert runner.answer_batch(queries) == [alone[id(q)] for q in queries]  # mixed shapes
    assert runner.answer_batch([]) == []

    records = [{"messages": [{"content": t}], "images": im} for t, im, _ in queries]
    one = list(_record_answers(runner, records, None, batch=1))
    three = list(_record_answers(runner, records, None, batch=3))
    assert [a for _, a in three] == [a for _, a in one]
    assert [r for r, _ in three] == records
    assert [r for r, _ in _record_answers(runner, records, 2, batch=3)] == records[:2]
    with pytest.raises(ValueError, match="batch 0"):
        list(_record_answers(runner, records, None, batch=0))
