"""python -m emit_jax.evaluate ends cleanly and keeps what it did (issue 30, item 5): every input
is checked before the first question; answers go to ``<out>.partial.jsonl`` as they are made;
SIGINT / SIGTERM end with one line and exit 130; a rerun resumes from the kept answers (same
settings only; ``--restart`` starts over) and its results equal an uninterrupted run's; a line
torn by a kill is dropped. The real evaluator on the tiny EMIT model and the MMAD fixture."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from flax import nnx

from conftest import interruptible, subprocess_env
from test_evaluate import tiny_for
from emit_jax import hf
from emit_jax.data.tokenizer import train_tiny_tokenizer
from emit_jax.eval import partial
from emit_jax.models.emit import EMIT
from emit_jax.models.internvl import InternVL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MMAD = os.path.join(ROOT, "tests", "fixtures", "mmad")
N_QUESTIONS = sum(len(r["conversation"]) for r in
                  json.load(open(os.path.join(MMAD, "mmad.json"), encoding="utf-8")).values())
FLAGS = ("--max-tiles", "1", "--max-new-tokens", "4")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    tok = train_tiny_tokenizer(None, d / "tok")
    emit = EMIT.create(InternVL(tiny_for(tok, len(tok) - 1), rngs=nnx.Rngs(1)), tokenizer=tok)
    hf.save(emit, d / "emit")
    tok.save_pretrained(d / "emit")
    return str(d / "emit")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return subprocess_env(JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false")


def command(ckpt, out, *extra, data=MMAD, flags=FLAGS):
    return [sys.executable, "-m", "emit_jax.evaluate", "--checkpoint", ckpt, "--data", data,
            "--out", str(out), *flags, *extra]


def run(env, *args, **kw):
    return subprocess.run(command(*args, **kw), cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def lines_of(text):
    return [line for line in text.splitlines() if line.strip()]


def complete_lines(path):
    return open(path, "rb").read().count(b"\n") if os.path.exists(path) else 0


def without_timing(res):
    return {k: v for k, v in res.items() if k not in ("seconds", "resumed", "checkpoint")}


@pytest.fixture(scope="module")
def baseline(model, env, tmp_path_factory):
    """One uninterrupted run's results."""
    out = tmp_path_factory.mktemp("baseline") / "res.json"
    r = run(env, model, out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not os.path.exists(partial.path_for(str(out))), "the partial file outlives success"
    res = json.loads(out.read_text())
    assert res["questions"] == N_QUESTIONS and res["resumed"] == 0
    return res


@pytest.fixture(scope="module")
def interrupted(model, env, tmp_path_factory):
    """A run sent SIGINT once its partial-answers file holds an answer: (out, process, stderr,
    the partial file's bytes right after the exit)."""
    out = tmp_path_factory.mktemp("interrupted") / "res.json"
    part = partial.path_for(str(out))
    p = subprocess.Popen(command(model, out), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, preexec_fn=interruptible)
    deadline = time.time() + 500
    while complete_lines(part) < 2 and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=300)
    return out, p, err, open(part, "rb").read() if os.path.exists(part) else None


# --------------------------------------------------------------------- checks before any answer
def test_a_generation_longer_than_the_context_is_refused_before_any_answer(model, env, tmp_path):
    """Before: ``--max-new-tokens`` beyond the model's context generated until its cache could
    not be allocated. Now one line once the model is loaded, no partial-answers file."""
    out = tmp_path / "res.json"
    r = run(env, model, out, flags=("--max-tiles", "1", "--max-new-tokens", "100000"))
    assert r.returncode == 2, r.stderr[-3000:]
    assert lines_of(r.stderr)[-1].startswith("emit_jax.evaluate: error: --max-new-tokens 100000: "
                                             "does not fit the model's context"), r.stderr
    assert "Traceback" not in r.stderr
    assert os.listdir(tmp_path) == []


def test_a_prompt_longer_than_the_context_is_one_line(model, env, tmp_path):
    """Seventh probe. Before: transformers' "Token indices sequence length is longer than the
    specified maximum" (naming the tokenizer's limit, not the model's), then an out-of-memory
    line blaming the batch settings."""
    root = tmp_path / "mmad"
    shutil.copytree(MMAD, root)
    data = json.loads((root / "mmad.json").read_text())
    first = next(iter(data))
    data[first]["conversation"][0]["Question"] = "Is there any defect? " + "look " * 9000
    (root / "mmad.json").write_text(json.dumps(data))
    r = run(env, model, tmp_path / "res.json", data=str(root))
    assert r.returncode == 2, r.stderr[-3000:]
    lines = lines_of(r.stderr)
    assert re.match(r"emit_jax\.evaluate: error: the question on \S+: its prompt is [\d,]+ "
                    r"tokens, which with --max-new-tokens 4 passes the model's context of 8,192 "
                    r"positions \(max_position_embeddings\); shorten the question", lines[-1]), lines
    assert not any("Token indices" in line or "Traceback" in line for line in lines), lines


def test_new_tokens_past_the_context_name_the_query_and_the_flag(model, env, tmp_path):
    """Eighth probe. Before: ``--max-new-tokens 8191`` named the reference image (the first
    of the question's images) and advised shortening a twenty-word question."""
    r = subprocess.run(command(model, tmp_path / "res.json", "--limit", "1",
                               "--max-new-tokens", "8191", flags=("--max-tiles", "1")),
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, r.stderr[-3000:]
    lines = lines_of(r.stderr)
    assert re.fullmatch(r"emit_jax\.evaluate: error: the question on \S+: its prompt "
                        r"is [\d,]+ tokens, which with --max-new-tokens 8,191 passes the model's "
                        r"context of 8,192 positions \(max_position_embeddings\); give "
                        r"--max-new-tokens [\d,]+ or fewer", lines[-1]), lines


def test_jax_environment_settings_are_one_line(model, env, tmp_path):
    """Seventh probe. Before: ``JAX_ENABLE_X64=1`` (a shell profile kept for other work) was a
    ``TypeError`` traceback in the sampler (int64 against int32 indices), and a value JAX does
    not know (``JAX_DEFAULT_MATMUL_PRECISION=bogus``) a ``ValueError`` traceback at import."""
    r = subprocess.run(command(model, tmp_path / "res.json", "--limit", "1"), cwd=ROOT,
                       env={**env, "JAX_ENABLE_X64": "1"}, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert lines_of(r.stderr)[0] == ("emit_jax.evaluate: warning: JAX_ENABLE_X64=1: ignored; "
                                     "emit_jax runs in 32-bit mode"), r.stderr
    r = subprocess.run(command(model, tmp_path / "res2.json", "--limit", "1"), cwd=ROOT,
                       env={**env, "JAX_DEFAULT_MATMUL_PRECISION": "bogus"},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and lines_of(r.stderr) == [
        "emit_jax.evaluate: error: JAX_DEFAULT_MATMUL_PRECISION=bogus: JAX does not know that "
        "value; unset it or give one JAX accepts"], r.stderr
    assert not (tmp_path / "res2.json").exists()


def test_an_image_replaced_under_its_name_is_not_answered_from_the_kept_file(
        baseline, model, env, tmp_path):
    """Seventh probe. Before: an answered question's image replaced by another under the same
    name kept its old answer on resume (only the paths were fingerprinted). Now the kept
    answers do not match the question any more: one line, as for a changed prompt."""
    from PIL import Image

    from emit_jax.evaluate import MMAD_MIN_NEW_TOKENS, mmad_queries

    root = tmp_path / "mmad"
    shutil.copytree(MMAD, root)
    queries = mmad_queries(str(root), False, None)
    fps = [partial.fingerprint(text, [os.path.relpath(p, root) for p in images], comp,
                               [partial.file_digest(p) for p in images])
           for text, images, comp, _, _ in queries]
    settings = partial.settings(checkpoint=model, think=False, max_new_tokens=4,
                                min_new_tokens=min(MMAD_MIN_NEW_TOKENS, 4), decoding="greedy",
                                max_tiles=1)
    out = tmp_path / "res.json"
    with partial.Writer(partial.path_for(str(out)), partial.header(model, str(root), settings),
                        0) as w:
        for k in (0, 1):
            row = baseline["answers"][k]
            w.write(k, fps[k], row["response"], row)
    Image.new("RGB", (32, 32), (200, 30, 30)).save(queries[0][1][1])  # the query, replaced
    r = run(env, model, out, "--limit", "2", data=str(root))
    assert r.returncode == 2, r.stderr[-3000:]
    assert "the answer to question 0 was made for another question (the data or the prompt " \
           "changed)" in lines_of(r.stderr)[-1], r.stderr


def test_restart_never_deletes_a_file_that_is_not_a_partial_answers_file(model, env, tmp_path):
    """Seventh probe. Before: ``--out A.json`` beside another evaluation's results saved as
    ``A.json.partial.jsonl`` said "rerun with --restart", and ``--restart`` deleted them."""
    other = tmp_path / "A.json.partial.jsonl"
    other.write_text('{"results": "of another evaluation"}\n')
    for extra in ((), ("--restart",)):
        r = run(env, model, tmp_path / "A.json", *extra)
        assert r.returncode == 2, r.stderr[-3000:]
        assert lines_of(r.stderr)[-1].endswith("not an emit_jax.evaluate partial-answers file, "
                                               "and this run keeps its answers there; move it, "
                                               "or choose another --out"), r.stderr
        assert other.read_text() == '{"results": "of another evaluation"}\n'


def test_bad_images_late_in_the_file_fail_before_any_model_work(model, env, tmp_path):
    """The last record's query image is missing and its reference unreadable: the run used to
    answer the 28 questions before them, then fail and drop those answers."""
    data = tmp_path / "mmad"
    shutil.copytree(MMAD, data)
    missing = data / "GoodsAD" / "drink_bottle" / "test" / "good" / "020.jpg"
    os.remove(missing)
    corrupt = data / "GoodsAD" / "drink_bottle" / "train" / "good" / "105.jpg"
    corrupt.write_bytes(b"not an image at all")
    out = tmp_path / "res.json"
    r = run(env, model, out, data=str(data))
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    [line] = lines_of(r.stderr)
    # the first bad file in question order (the reference comes before the query), the count
    assert line.startswith(f"emit_jax.evaluate: error: {corrupt}: not a readable image"), line
    assert "2 of the" in line and "images are bad" in line, line
    assert not r.stdout.strip()  # no table: nothing was answered
    assert sorted(os.listdir(tmp_path)) == ["mmad"]  # no results, no partial answers
    # the data is checked before the model is touched: a missing checkpoint is not reached
    r = run(env, str(tmp_path / "no_such_model"), out, data=str(data))
    assert r.returncode == 2 and lines_of(r.stderr) == [line], r.stderr[-3000:]


def test_last_class_missing_from_the_domain_knowledge_fails_before_any_answer(model, env,
                                                                              tmp_path):
    """Every prompt is made before the first question: the last record's class has no domain
    knowledge (its 1-shot questions need it)."""
    data = tmp_path / "mmad"
    shutil.copytree(MMAD, data)
    dk = json.loads((data / "domain_knowledge.json").read_text())
    del dk["GoodsAD"]["drink_bottle"]
    (data / "domain_knowledge.json").write_text(json.dumps(dk))
    r = run(env, model, tmp_path / "res.json", data=str(data))
    assert r.returncode == 2, r.stderr[-3000:]
    [line] = lines_of(r.stderr)
    assert line.startswith(f"emit_jax.evaluate: error: {data / 'domain_knowledge.json'}: "
                           "domain knowledge has no entry 'GoodsAD'/'drink_bottle'"), line
    assert not r.stdout.strip() and sorted(os.listdir(tmp_path)) == ["mmad"]


# --------------------------------------------------------------------- interrupt, keep, resume
def test_sigint_ends_with_one_line_and_keeps_the_answers(interrupted):
    out, p, err, kept = interrupted
    assert p.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    [line] = lines_of(err)
    m = re.fullmatch(r"emit_jax\.evaluate: interrupted after (\d+) of (\d+) questions; answers "
                     r"kept in (.+); rerun the same command to resume", line)
    assert m, line
    n = int(m[1])
    assert 1 <= n < N_QUESTIONS and int(m[2]) == N_QUESTIONS
    assert m[3] == partial.path_for(str(out))
    assert not os.path.exists(out)
    rows = [json.loads(x) for x in kept.decode().splitlines()]
    assert rows[0]["emit_jax.evaluate"] == "partial answers"
    assert [r["id"] for r in rows[1:]] == list(range(n))
    assert all(isinstance(r["response"], str) and r["row"]["response"] == r["response"]
               for r in rows[1:])


def test_rerun_resumes_drops_a_torn_line_and_equals_an_uninterrupted_run(
        interrupted, baseline, model, env, tmp_path):
    _, _, _, kept = interrupted
    n = kept.count(b"\n") - 1
    out = tmp_path / "res.json"
    part = partial.path_for(str(out))
    # a kill in the middle of a write leaves a torn last line
    open(part, "wb").write(kept + b'{"id": ' + str(n).encode() + b', "fingerprint": "3f')
    r = run(env, model, out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming from {part}: {n} of {N_QUESTIONS} questions answered already, " \
           f"{N_QUESTIONS - n} to go" in r.stdout
    # said (28th probe: the torn answer was dropped without a word)
    assert f"note: {part}: its last line was cut off (an interrupted write); that answer is " \
           "asked again" in r.stdout
    res = json.loads(out.read_text())
    assert res["resumed"] == n
    assert without_timing(res) == without_timing(baseline)
    assert not os.path.exists(part)  # the results hold every answer: the partial file goes


def test_changed_settings_or_questions_are_refused(interrupted, model, env, tmp_path):
    _, _, _, kept = interrupted
    out = tmp_path / "res.json"
    part = partial.path_for(str(out))
    open(part, "wb").write(kept)
    r = run(env, model, out, "--think", flags=("--max-tiles", "1", "--max-new-tokens", "5"))
    assert r.returncode == 2, r.stderr[-3000:]
    [line] = lines_of(r.stderr)
    assert line.startswith(f"emit_jax.evaluate: error: {part}: its answers were made with other "
                           "settings"), line
    assert "think false, now true" in line and "max_new_tokens 4, now 5" in line, line
    assert "--restart" in line
    # the data changed under the kept answers: the first question's text
    data = tmp_path / "mmad"
    shutil.copytree(MMAD, data)
    recs = json.loads((data / "mmad.json").read_text())
    first = next(iter(recs.values()))["conversation"][0]
    first["Question"] = first["Question"] + " Look closely."
    (data / "mmad.json").write_text(json.dumps(recs))
    r = run(env, model, out, data=str(data))
    assert r.returncode == 2, r.stderr[-3000:]
    [line] = lines_of(r.stderr)
    assert f"{part}: line 2: the answer to question 0 was made for another question" in line
    assert open(part, "rb").read() == kept  # refused: nothing was changed
    assert not os.path.exists(out)


def test_kept_answers_are_not_asked_again_and_restart_starts_over(
        interrupted, baseline, model, env, tmp_path):
    _, _, _, kept = interrupted
    out = tmp_path / "res.json"
    part = partial.path_for(str(out))
    lines = kept.decode().splitlines(keepends=True)
    first = json.loads(lines[1])
    assert first["id"] == 0
    first["response"] = "Z: a response no model gave"
    tampered = "".join([lines[0], json.dumps(first) + "\n", *lines[2:]]).encode()
    open(part, "wb").write(tampered)
    # every question of --limit 1 is answered already: the kept response is used as it is
    r = run(env, model, out, "--limit", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["resumed"] == 1 and res["answers"][0]["response"] == first["response"]
    # --restart: the kept answers are ignored and the question is asked again
    open(part, "wb").write(tampered)
    r = run(env, model, out, "--limit", "1", "--restart")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming" not in r.stdout
    res = json.loads(out.read_text())
    assert res["resumed"] == 0 and res["answers"] == baseline["answers"][:1]
    assert not os.path.exists(part)


# ------------------------------------------------------------------------- the file itself
def test_partial_file_torn_and_malformed_lines(tmp_path):
    fps = ["a" * 16, "b" * 16, "c" * 16]
    settings = {"checkpoint_files": "x", "think": False, "max_new_tokens": 4,
                "min_new_tokens": 1, "decoding": "greedy", "max_tiles": 1}
    path = str(tmp_path / "res.json.partial.jsonl")
    assert partial.read(path, settings, fps) == ({}, 0)  # no file yet
    w = partial.Writer(path, partial.header("ckpt", "data", settings), 0)
    w.write(0, fps[0], "A", {})
    w.write(1, fps[1], "B", {})
    w.close()
    good = open(path, "rb").read()
    assert partial.read(path, settings, fps) == ({0: "A", 1: "B"}, len(good))
    open(path, "ab").write(b'{"id": 2, "finger')  # torn: dropped, and cut off by the writer
    assert partial.read(path, settings, fps) == ({0: "A", 1: "B"}, len(good))
    w = partial.Writer(path, partial.header("ckpt", "data", settings), len(good))
    w.write(2, fps[2], "C", {})
    w.close()
    assert partial.read(path, settings, fps)[0] == {0: "A", 1: "B", 2: "C"}
    open(path, "wb").write(b'{"emit_jax.evalu')  # a torn header: nothing kept, start over
    assert partial.read(path, settings, fps) == ({}, 0)
    lines = good.splitlines(keepends=True)
    open(path, "wb").write(lines[0] + b"garbage\n" + lines[2])  # malformed, not last: refused
    with pytest.raises(ValueError, match=r"line 2: malformed JSON.*--restart"):
        partial.read(path, settings, fps)
    open(path, "wb").write(b'{"some": "other file"}\n')
    with pytest.raises(ValueError, match="not the header"):
        partial.read(path, settings, fps)


# ------------------------------------------------------------------ an --out that exists already
def test_existing_results_are_announced_then_replaced_whole(baseline, model, env, tmp_path):
    """A rerun onto a finished evaluation's --out replaced it without a word: one ``note:`` line
    on stderr says so before the first question; the new results replace the file at the end."""
    out = tmp_path / "res.json"
    out.write_text(json.dumps(baseline))
    r = run(env, model, out, "--limit", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert lines_of(r.stderr) == [
        f"emit_jax.evaluate: note: --out {out} exists (a finished evaluation, {N_QUESTIONS} "
        "questions); it will be replaced when this run finishes (it stays as it is until then)"]
    res = json.loads(out.read_text())
    assert res["questions"] == 1 and res["answers"] == baseline["answers"][:1]
    assert sorted(os.listdir(tmp_path)) == ["res.json"]


def test_replaced_results_says_what_the_existing_file_is(tmp_path):
    from emit_jax.evaluate import replaced_results

    out = tmp_path / "res.json"
    row = {"image": "a/b.png", "question": {"type": "text", "text": "A. Yes.\nB. No."},
           "options": {"A": "Yes.", "B": "No."}, "response": "A"}
    out.write_text(json.dumps({"checkpoint": "ck", "data": "mmad", "questions": 1,
                               "answers": [row]}))
    asked = [dict(row, response="")]
    assert "(a finished evaluation, 1 question, same checkpoint, data and questions);" in \
        replaced_results(str(out), "ck", "mmad", asked)
    assert "(a finished evaluation, 1 question);" in replaced_results(str(out), "ck2", "mmad", asked)
    # before: "same ... questions" whenever the count matched, options swapped or not
    swapped = [dict(row, question={"type": "text", "text": "A. No.\nB. Yes."})]
    assert "(a finished evaluation, 1 question);" in replaced_results(str(out), "ck", "mmad", swapped)
    out.write_text("not json")
    assert replaced_results(str(out), "ck", "mmad", asked) == (
        f"--out {out} exists (not an evaluate results file); it will be replaced when this run "
        "finishes (it stays as it is until then)")


# ------------------------------------------------- answers beyond a smaller --limit are kept
def _partial_file(path, model, baseline, ids):
    """A partial-answers file for the fixture's questions as the run with FLAGS writes it,
    holding the baseline's answers to ``ids`` (in that order)."""
    from emit_jax.evaluate import MMAD_MIN_NEW_TOKENS, mmad_queries

    fps = [partial.fingerprint(text, [os.path.relpath(p, MMAD) for p in images], comp,
                               [partial.file_digest(p) for p in images])
           for text, images, comp, _, _ in mmad_queries(MMAD, False, None)]
    assert len(fps) == N_QUESTIONS
    settings = partial.settings(checkpoint=model, think=False, max_new_tokens=4,
                                min_new_tokens=min(MMAD_MIN_NEW_TOKENS, 4), decoding="greedy",
                                max_tiles=1)
    with partial.Writer(str(path), partial.header(model, MMAD, settings), 0) as w:
        for k in ids:
            row = baseline["answers"][k]
            w.write(k, fps[k], row["response"], row)
    return open(path, "rb").read()


def test_answers_beyond_a_smaller_limit_are_kept_for_a_later_run(baseline, model, env, tmp_path):
    """A run interrupted with many answers kept, rerun with a smaller --limit, finished with
    that many answers and deleted the partial file holding the others, silently: the file now
    stays (with the extra answers) and one ``note:`` line says so; a later run uses them."""
    out = tmp_path / "res.json"
    part = partial.path_for(str(out))
    beyond = list(range(10, N_QUESTIONS))
    before = _partial_file(part, model, baseline, [0, 1, 2, 3, 4, *beyond])
    # every question of --limit 3 is answered already: no model work, the file is untouched
    r = run(env, model, out, "--limit", "3")
    assert r.returncode == 0, r.stderr[-3000:]
    assert lines_of(r.stderr) == [f"emit_jax.evaluate: note: {2 + len(beyond)} answers beyond "
                                  f"--limit are kept in {part} for a later run"]
    res = json.loads(out.read_text())
    assert res["resumed"] == 3 and res["answers"] == baseline["answers"][:3]
    assert open(part, "rb").read() == before
    # --limit 8: questions 5-7 are asked and appended; the answers beyond stay
    r = run(env, model, out, "--limit", "8")
    assert r.returncode == 0, r.stderr[-3000:]
    assert lines_of(r.stderr)[-1] == (f"emit_jax.evaluate: note: {len(beyond)} answers beyond "
                                      f"--limit are kept in {part} for a later run")
    res = json.loads(out.read_text())
    assert res["resumed"] == 5 and res["answers"] == baseline["answers"][:8]
    kept = [json.loads(x) for x in open(part, "rb").read().decode().splitlines()[1:]]
    assert [x["id"] for x in kept] == [0, 1, 2, 3, 4, *beyond, 5, 6, 7]
    # the whole run: only questions 8 and 9 are asked; the partial file goes
    r = run(env, model, out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert lines_of(r.stderr) == [
        f"emit_jax.evaluate: note: --out {out} exists (a finished evaluation, 8 questions); it "
        "will be replaced when this run finishes (it stays as it is until then)"]
    res = json.loads(out.read_text())
    assert res["resumed"] == N_QUESTIONS - 2
    assert without_timing(res) == without_timing(baseline)
    assert sorted(os.listdir(tmp_path)) == ["res.json"]


# ----------------------------------------------- an --out that is not evaluate's is refused
def test_out_that_is_not_an_evaluate_results_file_is_refused(model, env, tmp_path):
    """``--out W/results.json`` (a training workdir's) was announced with a ``note:`` and then
    replaced: refused now in one line, before the model is loaded, the file untouched."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    contents = {"results.json": json.dumps({"config": {"stages": ["stage1"]},
                                            "stage1": {"average": 0.5}}),
                "other.json": "[1, 2, 3]", "notes.txt": "not json", "empty.json": ""}
    for name, text in contents.items():
        (workdir / name).write_text(text)
    for name, text in contents.items():
        out = workdir / name
        r = run(env, model, out, "--limit", "1")
        assert r.returncode == 2, r.stderr[-3000:]
        assert lines_of(r.stderr) == [
            f"emit_jax.evaluate: error: --out {out}: exists and is not an evaluate results "
            "file; choose another path (or remove it)"], r.stderr[-3000:]
        assert not r.stdout.strip()
        assert out.read_text() == text
    assert sorted(os.listdir(workdir)) == sorted(contents)  # no partial file either


def test_check_out_replaceable(baseline, tmp_path):
    from emit_jax.errors import ConfigError
    from emit_jax.evaluate import check_out_replaceable

    out = tmp_path / "res.json"
    check_out_replaceable(str(out))  # missing: fine
    out.write_text(json.dumps(baseline))
    check_out_replaceable(str(out))  # a finished evaluation: replaced (announced)
    out.write_text(json.dumps({"stage1": {"average": 0.5}}))
    with pytest.raises(ConfigError, match="exists and is not an evaluate results file"):
        check_out_replaceable(str(out))


def test_out_or_its_partial_file_that_is_not_a_regular_file_is_refused(baseline, model, env,
                                                                      tmp_path):
    """A device, a pipe, a symbolic link (even to a results file) or a link loop as --out (or as
    its partial file) is refused in one line naming --out, before any work."""
    results = tmp_path / "real.json"
    results.write_text(json.dumps(baseline))
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    link = tmp_path / "link.json"
    link.symlink_to(results)
    loop = tmp_path / "loop.json"
    loop.symlink_to(loop)
    for out, what in (("/dev/null", "a device"), (fifo, "a pipe"), (link, "a symbolic link"),
                      (loop, "a symbolic link")):
        r = run(env, model, out, "--limit", "1")
        assert r.returncode == 2, r.stderr[-3000:]
        assert lines_of(r.stderr) == [f"emit_jax.evaluate: error: --out {out}: exists and is not "
                                      f"a regular file ({what}); choose another path"]
    # the partial-answers file beside a fresh --out
    out = tmp_path / "res.json"
    part = partial.path_for(str(out))
    os.mkfifo(part)
    r = run(env, model, out, "--limit", "1")
    assert r.returncode == 2, r.stderr[-3000:]
    assert lines_of(r.stderr) == [f"emit_jax.evaluate: error: --out {out}: its partial-answers "
                                  f"file {part} exists and is not a regular file (a pipe); "
                                  "choose another --out"]
    assert results.read_text() == json.dumps(baseline) and os.path.islink(link)
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["real.json", "fifo.json", "link.json", "loop.json", "res.json.partial.jsonl"])
    assert not os.path.isfile(fifo) and os.path.exists("/dev/null")
