"""python -m emit_jax.evaluate on MMAD-format and MVTec-style data, with an HF folder (InternVL or
EMIT) and with an Orbax checkpoint; the tiny tokenizer; Table 1 printed; answers written."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
from flax import nnx

from test_tasks import make_mvtec
from emit_jax import checkpoint, hf
from emit_jax.data.tokenizer import special_ids, train_tiny_tokenizer
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


def test_mvtec_style_with_orbax_checkpoint_and_limit(folders, tmp_path):
    data = make_mvtec(tmp_path / "ds")
    out = tmp_path / "res.json"
    r = run("--checkpoint", folders["emit_ckpt"], "--data", data, "--limit", "7", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["format"] == "mvtec" and res["questions"] == 7
    assert all(a["question_type"] in ("Anomaly Detection", "Defect Classification",
                                      "Defect Localization", "Object Classification")
               for a in res["answers"])


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
