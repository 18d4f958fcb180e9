"""The sixth reliability probe's cases (issue 30): each failed before its fix.

* a description ``.txt`` that is not UTF-8 (a traceback in ``data.build``, ``evaluate`` and
  ``train``; ``--policy skip`` did not cover it) and a pipe among ``descriptions/`` (``train``
  blocked forever reading it for the tokenizer's corpus);
* ``splits.json`` whose split is a string (iterated per character: "lists p (train)"), a
  split given twice (the last silently won), images it does not list (dropped without a word);
* a mask named ``000_mask.PNG`` ("no mask" while it is there);
* ``train`` on a dataset whose ``domain_knowledge.json`` is malformed or a list (tracebacks,
  and the workdir it made left behind), a workdir whose ``data/options.json`` is damaged;
* ``evaluate --out ''`` (no results, no word) and ``--out -`` (a file named ``-``); an MMAD
  image that is a pipe (the image check blocked);
* ``restated_answers`` on JSON nested too deep (``RecursionError``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from test_cli_errors import ROOT, assert_one_error, run_main, subprocess_env, tiny_model  # noqa: F401
from test_tasks import make_mvtec

LATIN1 = "d\xe9faut".encode("latin-1")


def _items(src, **kw):
    from emit_jax.data.mvtec import Report, scan

    report = Report(**kw)
    return scan(src, report=report), report


def test_a_description_that_is_not_utf8_is_one_line_or_skipped(tmp_path):
    src = make_mvtec(tmp_path / "ds", classes=("widget",))
    bad = os.path.join(src, "widget", "train", "good", "000.txt")
    with open(bad, "wb") as f:
        f.write(LATIN1)
    rc, err, _ = run_main("emit_jax.data.build", ["--source", src, "--out",
                                                   str(tmp_path / "o.jsonl"), "--stage", "1"])
    assert_one_error(rc, err, f"{bad}: not UTF-8 text (invalid continuation byte at byte 1)",
                     "description is left out")
    assert not os.path.exists(tmp_path / "o.jsonl")
    items, report = _items(src, policy="skip")
    assert len(items) == 10 and len(report.skipped) == 1  # the image kept, its text left out
    assert next(i for i in items if i.path == bad[:-4] + ".png").description is None


def test_a_pipe_among_the_descriptions_does_not_block_the_tokenizer_corpus(tmp_path):
    from emit_jax.training.data import tokenizer_for

    src = make_mvtec(tmp_path / "ds", classes=("widget",))
    desc = os.path.join(src, "descriptions", "widget")
    os.makedirs(desc)
    os.mkfifo(os.path.join(desc, "a_fifo.txt"))
    with open(os.path.join(desc, "b.txt"), "w") as f:
        f.write("a widget, seen from above")
    tok = tokenizer_for(str(tmp_path / "w"), src)  # before: open() on the pipe never returned
    assert tok.decode(tok.encode("a widget")) == "a widget"
    with open(os.path.join(desc, "c.txt"), "wb") as f:
        f.write(LATIN1)
    from emit_jax.errors import DataError

    with pytest.raises(DataError, match="c.txt: not UTF-8 text"):
        tokenizer_for(str(tmp_path / "w2"), src)


@pytest.mark.parametrize("content, needle", [
    ('{"train": "widget/train/good/000.png"}', "split 'train' is not a list of image paths"),
    ('{"train": [], "train": ["widget/train/good/000.png"]}', "the key 'train' is given twice"),
    ('["widget/train/good/000.png"]', "a JSON object of split -> list of image paths expected"),
])
def test_a_malformed_splits_file_names_the_problem(tmp_path, content, needle):
    from emit_jax.errors import DataError

    src = make_mvtec(tmp_path / "ds", classes=("widget",))
    with open(os.path.join(src, "splits.json"), "w") as f:
        f.write(content)
    with pytest.raises(DataError) as e:
        _items(src)
    assert str(e.value).startswith(os.path.join(src, "splits.json") + ": ") and needle in \
        str(e.value), str(e.value)


def test_images_a_splits_file_leaves_out_are_said(tmp_path):
    src = make_mvtec(tmp_path / "ds", classes=("widget",))
    listed = {"train": [f"widget/train/good/{i:03d}.png" for i in range(4)],
              "test": ["widget/test/good/000.png", "widget/test/dent/000.png"]}
    with open(os.path.join(src, "splits.json"), "w") as f:
        json.dump(listed, f)
    items, report = _items(src)
    assert sum(i.split == "unlisted" for i in items) == 4 == len(report.unlisted)
    assert report.unlisted_note() == (
        "note: 4 image(s) are not listed in splits.json; they form the split 'unlisted', used "
        "by no stage (first: widget/test/dent/001.png)")
    rc, err, _ = run_main("emit_jax.data.build", ["--source", src, "--out",
                                                   str(tmp_path / "o.jsonl"), "--stage", "1"])
    assert rc == 0 and err.strip() == report.unlisted_note(), err


def test_a_mask_with_an_upper_case_extension_is_found(tmp_path):
    src = make_mvtec(tmp_path / "ds", classes=("widget",))
    gt = os.path.join(src, "widget", "ground_truth", "dent")
    os.rename(os.path.join(gt, "000_mask.png"), os.path.join(gt, "000_mask.PNG"))
    items, _ = _items(src)
    dent = sorted(i.mask_path for i in items if i.defect == "dent")
    assert dent == [os.path.join(gt, "000_mask.PNG"), os.path.join(gt, "001_mask.png")]


def _train(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "emit_jax.train", *args], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("content, needle", [
    ("{bad", "not a readable domain-knowledge JSON (malformed JSON"),
    ("[]", "not a readable domain-knowledge JSON"),
])
def test_train_on_a_bad_domain_knowledge_file_is_one_line_and_leaves_no_workdir(
        tmp_path, content, needle):
    src = make_mvtec(tmp_path / "ds", classes=("widget",))
    with open(os.path.join(src, "domain_knowledge.json"), "w") as f:
        f.write(content)
    r = _train("--config", "configs/grpo.py:smoke", "--workdir", str(tmp_path / "run"),
               f"--config.data.source={src}")
    assert_one_error(r.returncode, r.stderr, os.path.join(src, "domain_knowledge.json"), needle,
                     prog="emit_jax.train")
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("content", ["{bad", '"x"'])
def test_a_damaged_options_file_in_a_workdir_is_one_line(tmp_path, content):
    """The records' ``data/options.json`` (how the questions were built), damaged."""
    from emit_jax.errors import DataError
    from emit_jax.training import data as stage_data

    src = make_mvtec(tmp_path / "ds", classes=("widget",))
    w = tmp_path / "w"
    stage_data.stage_records(src, str(w))
    with open(w / "data" / "options.json", "w") as f:
        f.write(content)
    with pytest.raises(DataError) as e:
        stage_data.stage_records(src, str(w))
    assert str(e.value).startswith(f"{w / 'data' / 'options.json'}: not the records' options "
                                   "file ("), str(e.value)


@pytest.mark.parametrize("out, needle", [
    ("", "--out: empty path; name the results file"),
    (" ", "--out: empty path"),
    ("-", "--out: '-': the results are a JSON file, not standard output"),
])
def test_evaluate_out_empty_or_dash_is_refused(tmp_path, out, needle):
    rc, err, _ = run_main("emit_jax.evaluate", ["--checkpoint", str(tmp_path), "--data",
                                                str(tmp_path), "--out", out])
    assert_one_error(rc, err, needle, prog="emit_jax.evaluate")
    assert os.listdir(tmp_path) == []


def test_an_image_that_is_a_pipe_is_refused_by_the_check_not_read(tmp_path):
    from emit_jax.errors import ImageError
    from emit_jax.evaluate import check_images

    fifo = str(tmp_path / "000.png")
    os.mkfifo(fifo)
    with pytest.raises(ImageError, match="not a regular file"):
        check_images([fifo])  # before: Image.open on the pipe blocked for ever


def test_restated_answers_on_json_nested_too_deep(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100000 + "]" * 100000)
    rc, err, _ = run_main("emit_jax.experiments.restated_answers", [str(deep)])
    assert_one_error(rc, err, f"{deep}: not an emit_jax.evaluate results file (malformed JSON")
    empty = tmp_path / "obj.json"
    empty.write_text("{}")
    rc, err, _ = run_main("emit_jax.experiments.restated_answers", [str(empty)])
    assert_one_error(rc, err, "no 'answers'")


def test_an_output_named_through_a_link_and_dotdot_never_replaces_an_input(tmp_path):
    """``LINK/../NAME`` is ``NAME`` beside the link's target to the kernel and to the input
    check, but the writers used to write ``NAME`` beside the link (``os.path.abspath``): the
    input check passed and the writer replaced another file, an input included. Now the
    writers resolve the folder as the kernel does: the input is refused, and a file that is
    not an input is written where the path points."""
    from emit_jax.fileio import atomic_output, where_written

    src = make_mvtec(tmp_path / "ds", classes=("widget",))
    target = tmp_path / "elsewhere" / "sub"
    target.mkdir(parents=True)
    (tmp_path / "pv").mkdir()
    os.symlink(target, tmp_path / "pv" / "L")
    dk = tmp_path / "pv" / "dk.json"  # beside the link: what abspath would name
    dk.write_text("{}")
    via = str(tmp_path / "pv" / "L" / ".." / "dk.json")
    assert where_written(via) == str(tmp_path / "elsewhere" / "dk.json")
    # the input named through the link: data.build --out onto its own --domain-knowledge
    os.replace(dk, tmp_path / "elsewhere" / "dk.json")
    rc, err, _ = run_main("emit_jax.data.build", ["--source", src, "--domain-knowledge",
                                                   str(tmp_path / "elsewhere" / "dk.json"),
                                                   "--out", via, "--stage", "1"])
    assert_one_error(rc, err, "the output is the input --domain-knowledge")
    assert (tmp_path / "elsewhere" / "dk.json").read_text() == "{}"
    # a file beside the link is not where the path points: left alone
    keep = tmp_path / "pv" / "keep.txt"
    keep.write_text("mine")
    with atomic_output(str(tmp_path / "pv" / "L" / ".." / "keep.txt")) as f:
        f.write("new")
    assert keep.read_text() == "mine"
    assert (tmp_path / "elsewhere" / "keep.txt").read_text() == "new"


def test_weights_and_configs_that_are_there_but_not_files_say_what_they_are(tmp_path,
                                                                               tiny_model):
    """Before: a ``config.json`` that is a pipe was "not found", a ``model.safetensors`` link
    loop "no model.safetensors", a ``convert --out`` that is a link to nothing "exists and is
    not empty", and ``export --max-shard-size`` of 400 digits an ``OverflowError``."""
    hf_dir = tmp_path / "hf"
    shutil.copytree(tiny_model["hf"], hf_dir)
    os.remove(hf_dir / "config.json")
    os.mkfifo(hf_dir / "config.json")
    rc, err, _ = run_main("emit_jax.convert", ["--hf", str(hf_dir), "--out", str(tmp_path / "c")])
    assert_one_error(rc, err, f"{hf_dir / 'config.json'}: a pipe, not a config file")
    os.remove(hf_dir / "config.json")
    shutil.copy(os.path.join(tiny_model["hf"], "config.json"), hf_dir / "config.json")
    os.remove(hf_dir / "model.safetensors")
    os.symlink("model.safetensors", hf_dir / "model.safetensors")  # a loop
    rc, err, _ = run_main("emit_jax.convert", ["--hf", str(hf_dir), "--out", str(tmp_path / "c")])
    assert_one_error(rc, err, f"{hf_dir / 'model.safetensors'}: a symbolic link to nothing "
                     "(or a link loop), not a weights file")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    rc, err, _ = run_main("emit_jax.convert", ["--hf", tiny_model["hf"], "--out",
                                               str(tmp_path / "dangling")])
    assert_one_error(rc, err, f"{tmp_path / 'dangling'}: a symbolic link, which writing the "
                     "folder would replace")
    rc, err, _ = run_main("emit_jax.export", ["--checkpoint", tiny_model["ckpt"], "--out",
                                              str(tmp_path / "x"), "--max-shard-size", "9" * 400])
    assert_one_error(rc, err, "--max-shard-size", "is too large")


def test_a_workdir_named_through_a_link_and_dotdot_is_one_folder(tmp_path):
    """Before: ``train --workdir pv/L/../userdir`` checked and locked the folder beside the
    link's target (the kernel's reading) but wrote data/, the models and results.json beside
    the link (``os.path.abspath``'s), replacing a user's results.json there. Now the run works
    in the kernel's folder only."""
    from emit_jax.fileio import unambiguous
    from emit_jax.train import check_is_workdir
    from emit_jax.training.state import StageCheckpoints

    (tmp_path / "elsewhere" / "sub").mkdir(parents=True)
    (tmp_path / "pv").mkdir()
    os.symlink(tmp_path / "elsewhere" / "sub", tmp_path / "pv" / "L")
    plain = str(tmp_path / "pv" / "run")
    assert unambiguous(plain) == plain and unambiguous("runs/x") == "runs/x"
    via = str(tmp_path / "pv" / "L" / ".." / "userdir")
    assert unambiguous(via) == str(tmp_path / "elsewhere" / "userdir")
    user = tmp_path / "elsewhere" / "userdir"
    user.mkdir()
    (user / "results.json").write_text("{}")
    with pytest.raises(Exception, match="not a training workdir and not empty"):
        check_is_workdir(unambiguous(via))
    # the checkpoints' folder (it used os.path.abspath) is the kernel's too
    store = StageCheckpoints(str(tmp_path / "pv" / "L" / ".." / "w" / "ckpt"), every=1)
    assert store.directory == str(tmp_path / "elsewhere" / "w" / "ckpt")
    assert not (tmp_path / "pv" / "w").exists()


def test_a_typo_inside_a_config_file_is_warned_about(tmp_path):
    """Before: ``c.base.stepz = 500`` in a user's config file was ignored without a word
    (``--config.base.stepz=500`` is refused: no such field). The shipped configs have no key
    a warning would name."""
    from emit_jax import configs
    from emit_jax.training.validate import known_keys, unknown_keys, validate_config

    for name in ("grpo", "sft", "adfm", "adfm_emit", "internvl3_8b_grpo", "internvl3_8b_sft"):
        assert unknown_keys(configs.load(name)) == (), name
    assert {"base.steps", "grpo.lora.rank", "sft.train_llm"} <= known_keys()
    cfg = configs.load("grpo:smoke", lock=False)
    cfg.base.stepz = 500
    settings = validate_config(cfg, num_devices=1)
    assert settings.warnings() == ["warning: config base.stepz: no such setting, nothing reads "
                                   "it (did you mean base.steps?)"]


@pytest.mark.parametrize("spec, needle", [
    (":smoke", "config ':smoke': no config file before the ':'"),
    ("configs/grpo.py:", "config 'configs/grpo.py:': nothing after the ':'"),
    ("LOOP", "a symbolic link to nothing (or a link loop)"),
])
def test_config_specs_said_as_they_are(tmp_path, spec, needle):
    from emit_jax import configs
    from emit_jax.errors import ConfigError

    os.symlink(tmp_path / "loop.py", tmp_path / "loop.py")
    with pytest.raises(ConfigError) as e:
        configs.resolve(spec.replace("LOOP", str(tmp_path / "loop.py")))
    assert needle in str(e.value), str(e.value)


def test_aot_on_a_config_without_the_model_or_the_stage_is_one_line(tmp_path):
    """Before: an ``AttributeError: "'arch'"`` traceback from the model builder."""
    cfg = tmp_path / "empty.py"
    cfg.write_text("import ml_collections\n\ndef get_config(arg=None):\n"
                   "    return ml_collections.ConfigDict({})\n")
    r = subprocess.run([sys.executable, "-m", "emit_jax.aot", "--config", str(cfg),
                        "--topology", "v5e:2x2", "--stage", "sft"], cwd=ROOT,
                       env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert_one_error(r.returncode, r.stderr, "config arch: missing (the model to compile needs "
                     "it)", prog="emit_jax.aot")


@pytest.mark.parametrize("name", ["splits.json", "domain_knowledge.json"])
@pytest.mark.parametrize("kind", ["dangling", "pipe"])
def test_a_side_file_that_is_a_dangling_link_or_a_pipe_is_refused(tmp_path, name, kind):
    """Before: a ``splits.json`` that is a link to nothing or a pipe was ignored as if absent
    (the test images then trained on with the rest), a ``domain_knowledge.json`` so made the
    prompts go without it, without a word; ``--domain-knowledge PIPE`` blocked."""
    src = make_mvtec(tmp_path / "ds", classes=("widget",))
    side = os.path.join(src, name)
    if kind == "dangling":
        os.symlink(tmp_path / "nowhere.json", side)
        needle = "a symbolic link to nothing (or a link loop)"
    else:
        os.mkfifo(side)
        needle = "(a pipe)"
    rc, err, _ = run_main("emit_jax.data.build", ["--source", src, "--out",
                                                   str(tmp_path / "o.jsonl"), "--stage", "1"])
    assert_one_error(rc, err, side, needle)
    assert not os.path.exists(tmp_path / "o.jsonl")
    if name == "domain_knowledge.json" and kind == "pipe":
        rc, err, _ = run_main("emit_jax.data.build", [
            "--source", make_mvtec(tmp_path / "ds2", classes=("widget",)), "--out",
            str(tmp_path / "o.jsonl"), "--stage", "1", "--domain-knowledge", side])
        assert_one_error(rc, err, side, needle)


def test_class_names_that_differ_only_in_unicode_normalisation_are_said_so(tmp_path):
    import unicodedata

    nfd = unicodedata.normalize("NFD", "c\u00e2ble")
    src = make_mvtec(tmp_path / "ds", classes=(nfd,))
    with open(os.path.join(src, "domain_knowledge.json"), "w", encoding="utf-8") as f:
        json.dump({"ds": {"c\u00e2ble": {"good": "a cable", "dent": "a dent",
                                         "smear": "a smear"}}}, f)
    rc, err, _ = run_main("emit_jax.data.build", ["--source", src, "--out",
                                                   str(tmp_path / "o.jsonl"), "--stage", "1"])
    assert_one_error(rc, err, "no domain knowledge for class(es)",
                     "differ(s) from the file's name only in Unicode normalisation")


@pytest.mark.parametrize("module, args, needle", [
    ("bench", ["compile_time", "--remat-policy", "full"], "--remat-policy: only with --remat"),
    ("emit_jax.aot", ["--config", "configs/grpo.py:smoke", "--topology", "v5e:2x2",
                      "--programs", ""], "argument --programs: empty"),
    ("emit_jax.demo", ["--workdir", ""], "argument --workdir: empty"),
    ("bench", ["grpo_step", "--sampler", "today", "--compare"],
     "--sampler: not with --compare"),
    ("bench", ["grpo_step", "--passes", "full", "--compare-passes"],
     "--passes: not with --compare-passes"),
    ("bench", ["grpo_step", "--kernels", "attention=einsum,attention=dot_product"],
     "attention given twice"),
])
def test_flags_given_empty_or_without_their_partner_are_refused(module, args, needle):
    """Before: ``bench compile_time --remat-policy`` without ``--remat`` ran without remat,
    ``aot --programs ''`` compiled every program, ``demo --workdir ''`` wrote to a
    temporary folder."""
    r = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=subprocess_env(),
                       capture_output=True, text=True, timeout=300)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert needle in lines[-1], r.stderr[-2000:]


@pytest.mark.parametrize("args, needle", [
    (["--seeds", "0"], "argument --seeds: must be >= 1"),
    (["--rows", ","], "--rows ',': no row named"),
    (["--rows", "nope"], "--rows: unknown row(s) ['nope']"),
    (["--config", "nope.py", "--rows", "base model"], "config file not found: nope.py"),
    (["--set", "foo", "--rows", "base model"], "'foo': expected KEY=VALUE"),
    (["--workdir", "", "--rows", "base model"], "argument --workdir: empty"),
    (["--workdir", "FILE", "--rows", "base model"], "a file, not a folder"),
])
def test_table1_bad_arguments_are_one_line(tmp_path, args, needle):
    """Before: tracebacks (a missing config, a bad --set, a file as --workdir, after the
    work), argparse's usage block before the error, and ``--rows ,`` replaced an earlier
    table1.md / table1.json with an empty table."""
    (tmp_path / "FILE").write_text("x")
    (tmp_path / "table1.md").write_text("earlier table")
    args = [str(tmp_path / "FILE") if a == "FILE" else a for a in args]
    rc, err, _ = run_main("emit_jax.experiments.table1",
                          args + ([] if "--workdir" in args else ["--workdir", str(tmp_path)]))
    assert_one_error(rc, err, needle)
    assert (tmp_path / "table1.md").read_text() == "earlier table"


@pytest.mark.parametrize("code, needle", [("0", "it called sys.exit(0)"),
                                          ("'boom'", "it called sys.exit('boom')")])
def test_a_config_file_that_exits_is_one_line(tmp_path, code, needle):
    """Before: ``sys.exit(0)`` in a config file ended ``train`` / ``plan`` / ``aot`` with exit 0
    and no output; ``sys.exit('boom')`` printed ``boom`` alone."""
    cfg = tmp_path / "exits.py"
    cfg.write_text(f"import sys\nsys.exit({code})\n")
    rc, err, _ = run_main("emit_jax.plan.command", ["--config", str(cfg)])
    assert_one_error(rc, err, f"config file {cfg} failed to load", needle)


def test_contradictory_build_and_evaluate_flags_are_refused(tmp_path):
    """Before: ``data.build --adfm-frame`` wrote the same records with or without
    ``--text-samples`` / ``--domain-knowledge`` (ignored without a word); ``evaluate
    --restart`` without ``--out`` had nothing to restart."""
    src = make_mvtec(tmp_path / "ds", classes=("widget",))
    for extra in (["--text-samples"], ["--domain-knowledge", str(tmp_path / "dk.json")]):
        rc, err, _ = run_main("emit_jax.data.build", ["--source", src, "--out",
                                                       str(tmp_path / "o.jsonl"), "--stage", "1",
                                                       "--adfm-frame", "448", *extra])
        assert_one_error(rc, err, f"{extra[0]}: not used with --adfm-frame")
    rc, err, _ = run_main("emit_jax.data.build", ["--source", src, "--out",
                                                   str(tmp_path / "o.jsonl"), "--stage", "2",
                                                   "--adfm-frame", "448"])
    assert rc == 0 and err.strip() == ("note: --stage 2 with --adfm-frame: AD-FM records are "
                                       "the same for both stages"), err
    rc, err, _ = run_main("emit_jax.evaluate", ["--checkpoint", str(tmp_path), "--data", src,
                                                "--restart"])
    assert_one_error(rc, err, "--restart: only with --out")


def test_two_visualize_runs_onto_one_figure_the_second_is_refused(tmp_path):
    from emit_jax.fileio import output_lock

    src = make_mvtec(tmp_path / "ds", classes=("widget",))
    out = tmp_path / "map.png"
    with output_lock(out, what="held by this test", hint="-"):
        rc, err, _ = run_main("emit_jax.visualize", [
            "heatmap", "--query", os.path.join(src, "widget", "test", "dent", "000.png"),
            "--reference", os.path.join(src, "widget", "train", "good", "000.png"),
            "--out", str(out)])
        assert_one_error(rc, err, f"--out {out}: another visualize is writing it (pid ")
    assert os.listdir(tmp_path) == ["ds"]


def test_legal_255_byte_output_names(tmp_path, tiny_model):
    """Before: a legal 255-byte ``--out`` was "File name too long" in ``data.build`` (its
    lock file's name) and in ``convert`` / ``export`` (their temporary folder's, which the
    message named); ``evaluate`` said its partial-answers file "exists and is not a regular
    file" where the derived name was too long."""
    src = make_mvtec(tmp_path / "ds", classes=("widget",))
    name = "b" * 249 + ".jsonl"
    rc, err, _ = run_main("emit_jax.data.build", ["--source", src, "--out",
                                                   str(tmp_path / name), "--stage", "1"])
    assert rc == 0, err
    assert sorted(os.listdir(tmp_path)) == sorted(["ds", name])
    out = tmp_path / ("c" * 255)
    rc, err, _ = run_main("emit_jax.convert", ["--hf", tiny_model["hf"], "--out", str(out)])
    assert rc == 0 and os.path.isdir(out), err
    long_json = str(tmp_path / ("a" * 245 + ".json"))
    rc, err, _ = run_main("emit_jax.evaluate", ["--checkpoint", tiny_model["hf"], "--data", src,
                                                "--out", long_json])
    assert_one_error(rc, err, "its partial-answers file's name", "would be longer than the "
                     "file system's 255 bytes; choose a shorter --out")


def test_side_files_that_are_folders_are_said_so(tmp_path, tiny_model):
    """Before: a ``tokenizer.json`` that is a folder was left out of ``convert``'s checkpoint
    without a word and gave transformers' text in ``evaluate``; a ``config.json`` or
    ``emit_jax.json`` that is a folder was "not found"."""
    from emit_jax.data.tokenizer import load_tokenizer
    from emit_jax.errors import TokenizerError

    src = make_mvtec(tmp_path / "ds", classes=("widget",))
    hf_dir = tmp_path / "hf"
    shutil.copytree(tiny_model["hf"], hf_dir)
    if not os.path.exists(hf_dir / "tokenizer.json"):
        (hf_dir / "tokenizer_config.json").write_text("{}")
    else:
        os.remove(hf_dir / "tokenizer.json")
    os.mkdir(hf_dir / "tokenizer.json")
    rc, err, _ = run_main("emit_jax.convert", ["--hf", str(hf_dir), "--out", str(tmp_path / "c")])
    assert_one_error(rc, err, f"{hf_dir / 'tokenizer.json'}: not a readable tokenizer file "
                     "(a folder)")
    with pytest.raises(TokenizerError, match=r"tokenizer.json: a folder, not a tokenizer file"):
        load_tokenizer(hf_dir)
    cfg_dir = tmp_path / "hf2"
    shutil.copytree(tiny_model["hf"], cfg_dir)
    os.remove(cfg_dir / "config.json")
    os.mkdir(cfg_dir / "config.json")
    rc, err, _ = run_main("emit_jax.evaluate", ["--checkpoint", str(cfg_dir), "--data", src])
    assert_one_error(rc, err, f"{cfg_dir / 'config.json'}: a folder, not a config file")
    ck = tmp_path / "ck"
    shutil.copytree(tiny_model["ckpt"], ck)
    os.remove(ck / "emit_jax.json")
    os.mkdir(ck / "emit_jax.json")
    rc, err, _ = run_main("emit_jax.export", ["--checkpoint", str(ck), "--out",
                                              str(tmp_path / "x")])
    assert_one_error(rc, err, f"{ck / 'emit_jax.json'}: a folder, not a checkpoint's metadata")


def test_an_empty_config_spec_and_plan_warns_of_unknown_keys(tmp_path):
    from emit_jax import configs
    from emit_jax.errors import ConfigError

    with pytest.raises(ConfigError, match="config: empty; name a config file"):
        configs.resolve("")
    cfg = tmp_path / "typo.py"
    cfg.write_text("from emit_jax.configs.grpo import get_config as g\n\n"
                   "def get_config(arg=None):\n    c = g('smoke')\n    c.base.stepz = 5\n"
                   "    return c\n")
    rc, err, _ = run_main("emit_jax.plan.command", ["--config", str(cfg)])
    assert rc == 0 and err.splitlines()[0] == ("warning: config base.stepz: no such setting, "
                                               "nothing reads it (did you mean base.steps?)"), err


def test_a_workdir_whose_dataset_links_images_elsewhere_resumes(tmp_path):
    """Before: an image symlinked outside the dataset was accepted by the first run but the
    rerun refused the workdir's own records ("resolves outside the data root"): such a
    workdir could never resume. A moved dataset now says the records hold the old paths."""
    from emit_jax.errors import DataError
    from emit_jax.training import data as stage_data

    src = make_mvtec(tmp_path / "ds", classes=("widget",))
    store = tmp_path / "store"
    store.mkdir()
    img = os.path.join(src, "widget", "train", "good", "000.png")
    shutil.move(img, store / "000.png")
    os.symlink(store / "000.png", img)
    w = str(tmp_path / "w")
    first = stage_data.stage_records(src, w)
    again = stage_data.stage_records(src, w)  # read back from w/data
    assert {k: len(v) for k, v in again.items()} == {k: len(v) for k, v in first.items()}
    moved = str(tmp_path / "moved")
    os.rename(src, moved)
    with pytest.raises(DataError, match=r"holds the records this workdir built, with the paths "
                       r"of the dataset where it was then \(moved since\?\)"):
        stage_data.stage_records(moved, w)
    from emit_jax.data.jsonl import resolve_inside
    with pytest.raises(DataError, match="resolves outside the data root"):  # JSONL a user gives
        resolve_inside(moved, os.path.join("widget", "train", "good", "000.png"))


def test_a_splits_entry_differing_only_in_unicode_normalisation_is_said_so(tmp_path):
    """Before: "lists ..., which does not exist" for a name ``ls`` shows (NFD on disk)."""
    import unicodedata

    from emit_jax.errors import DataError

    src = make_mvtec(tmp_path / "ds", classes=("widget",))
    good = os.path.join(src, "widget", "train", "good")
    nfd = unicodedata.normalize("NFD", "\u00e9t\u00e9.png")
    os.rename(os.path.join(good, "000.png"), os.path.join(good, nfd))
    with open(os.path.join(src, "splits.json"), "w", encoding="utf-8") as f:
        json.dump({"train": ["widget/train/good/\u00e9t\u00e9.png"]}, f)
    with pytest.raises(DataError, match="differs from it only in Unicode normalisation"):
        _items(src)


@pytest.mark.parametrize("where", ["file", "folder"])
def test_an_mmad_image_differing_only_in_unicode_normalisation_is_said_so(tmp_path, where):
    """Before: evaluate's image check and the image loader said "no such file" for a name the
    reader sees on disk (an NFD file or folder name, an NFC name in the MMAD file)."""
    import unicodedata

    from emit_jax.data.image import load_image
    from emit_jax.errors import ImageError
    from emit_jax.evaluate import check_images
    from PIL import Image

    nfc = "c\u00e2ble"
    nfd = unicodedata.normalize("NFD", nfc)
    assert nfd != nfc
    folder = tmp_path / (nfd if where == "folder" else "cls")
    folder.mkdir()
    Image.new("RGB", (4, 4)).save(folder / (nfd + ".png" if where == "file" else "000.png"))
    wanted = str(tmp_path / (nfc if where == "folder" else "cls")
                 / (nfc + ".png" if where == "file" else "000.png"))
    twin = str(folder / nfd) + ".png" if where == "file" else str(folder)
    for check in (lambda: check_images([wanted]), lambda: load_image(wanted)):
        with pytest.raises(ImageError) as e:
            check()
        assert "no such file" in str(e.value)
        assert f"{twin} differs from it only in Unicode normalisation" in str(e.value)
    with pytest.raises(ImageError) as e:  # a name truly missing says no more than that
        check_images([str(tmp_path / "cls" / "nothing.png")])
    assert str(e.value).endswith(": no such file")


def test_a_generation_longer_than_the_context_is_refused_before_any_work(tmp_path):
    """Before: ``train --config.grpo.max_new_tokens=1048576`` made the workdir, built the data and
    printed progress before failing to allocate its cache (evaluate's twin:
    tests/test_evaluate_resume.py)."""
    r = _train("--config", "configs/grpo.py:smoke", "--workdir", str(tmp_path / "w"),
               "--config.grpo.max_new_tokens=1048576")
    assert_one_error(r.returncode, r.stderr, "grpo.max_new_tokens: 1048576 new tokens do not "
                     "fit the model's context", prog="emit_jax.train")
    assert not (tmp_path / "w").exists()
