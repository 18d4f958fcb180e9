"""Session 13's findings and the eighteenth and nineteenth reliability probes' cases (issue
30): each failed before its fix."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT


def test_bench_gpu_removes_the_compile_cache_it_made(tmp_path):
    """``bench gpu`` without a compilation cache of the user's made one in the temp folder for
    its compiler figures and left it there (17 ``emit_gpu_xla*`` folders, up to 680 kB each,
    in /tmp after one day of tests)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env.update(TMPDIR=str(tmp_path), PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "bench", "gpu", "--config", "/nonexistent/c.py"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 2 and "--config" in r.stderr
    assert not [n for n in os.listdir(tmp_path) if n.startswith("emit_gpu_xla")]


def test_experiments_pointer_leaves_no_tokenizer_folder(tmp_path, monkeypatch):
    """``experiments.pointer`` trained its tokenizer into a ``pointer-tok-*`` folder it never
    removed (one per run, 18 in /tmp after one day)."""
    import tempfile

    from emit_jax.experiments import pointer

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.setenv("EMIT_JAX_CACHE", str(tmp_path / "cache"))
    os.mkdir(tmp_path / "tmp")
    tok = pointer._tokenizer("")
    assert tok("a scratch on the pill")["input_ids"]  # usable once its folder is gone
    assert os.listdir(tmp_path / "tmp") == []


def test_plan_sizes_the_vocabulary_train_fits_to_the_tokenizer(tmp_path, monkeypatch):
    """``plan`` sized ``tiny``'s full 151,674-row vocabulary where train fits the embedding to
    its tokenizer (``stages.build_initial_model``): 20.6 M planned parameters against the
    1.43 M the smoke run trains. With ``tokenizer`` set the plan is the trained model's count
    exactly; without, the tiny tokenizer's bound (4,096 entries) is planned."""
    import math

    import jax
    from flax import nnx

    from emit_jax import configs
    from emit_jax.data.embedded import ensure_cached
    from emit_jax.plan.variables import TINY_VOCAB, abstract_variables, model_config
    from emit_jax.training.data import tokenizer_for
    from emit_jax.training.stages import build_initial_model

    monkeypatch.setenv("EMIT_JAX_CACHE", str(tmp_path / "cache"))
    tok = tokenizer_for(str(tmp_path), ensure_cached(seed=0))
    cfg = configs.load("configs/grpo.py:smoke")
    model = build_initial_model(cfg, tok)
    trained = sum(math.prod(v.shape) for v in jax.tree_util.tree_leaves(nnx.state(model,
                                                                                   nnx.Param)))

    def planned(c):
        return sum(math.prod(v.shape) for v in abstract_variables(model_config(c, False), False)
                   if v.kind == "Param")

    hidden = model_config(cfg, False).text.hidden_size  # tiny ties its embedding: one matrix
    assert planned(cfg) - trained == (TINY_VOCAB - len(tok)) * hidden
    assert planned(cfg) < 2_000_000  # was 20,607,680
    with_tok = configs.load("configs/grpo.py:smoke", [f"tokenizer={tmp_path / 'tokenizer'}"])
    assert planned(with_tok) == trained



def _warmup_runs(tmp_path):
    """``(workdir, run)``: ``run(*flags)`` trains the smoke config's warm-up alone in
    ``tmp_path/w`` (nothing evaluated), the embedded dataset cached in ``tmp_path``."""
    from conftest import train

    d = tmp_path / "w"
    common = ["--config", "configs/grpo.py:smoke", "--workdir", str(d),
              "--config.stages=('warmup',)", "--config.eval_limit=0"]
    env = {"EMIT_JAX_CACHE": str(tmp_path / "cache")}
    return d, lambda *flags: train(*common, *flags, env=env)


def test_a_run_without_export_says_the_export_is_older_and_keeps_its_record(tmp_path):
    """T2: a run with ``export_hf=False`` that ended with another model than ``WORKDIR/hf``
    holds left the old export without a word and wrote results.json without its ``export``
    key, so nothing recorded which model the folder held."""
    import json

    d, warmup = _warmup_runs(tmp_path)
    r = warmup("--config.warmup.steps=2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((d / "results.json").read_text())["export"] == {"stage": "warmup",
                                                                     "steps": 2}
    r = warmup("--config.warmup.steps=3", "--config.export_hf=False")
    assert r.returncode == 0 and "[export]" not in r.stderr, r.stderr[-3000:]
    assert (f"note: {d}/hf holds warmup after 2 steps, not the model this run ended with "
            "(warmup after 3 steps): export_hf is False; rerun with --config.export_hf=True to "
            "replace it") in r.stderr, r.stderr[-3000:]
    assert json.loads((d / "results.json").read_text())["export"] == {"stage": "warmup",
                                                                     "steps": 2}
    r = warmup("--config.warmup.steps=3", "--config.export_hf=False")
    assert r.returncode == 0 and "note: " + str(d / "hf") in r.stderr  # said each time
    r = warmup("--config.warmup.steps=3")
    assert (f"[export] {d}/hf (warmup after 3 steps; it held warmup after 2 steps)"
            in r.stderr), r.stderr[-3000:]
    # T8: an export results.json does not record (an older run's, or a results.json lost) was
    # kept as the run's when nothing trained; it is replaced
    results = json.loads((d / "results.json").read_text())
    del results["export"]
    (d / "results.json").write_text(json.dumps(results))
    r = warmup("--config.warmup.steps=3")
    assert (f"[export] {d}/hf (warmup after 3 steps; it held a model this workdir's "
            "results.json does not describe)"
            in r.stderr), r.stderr[-3000:]
    assert json.loads((d / "results.json").read_text())["export"] == {"stage": "warmup",
                                                                     "steps": 3}


def test_a_torn_export_is_exported_again(tmp_path):
    """Twenty-sixth probe WT2: with ``hf/model.safetensors`` cut short, the rerun of a finished
    workdir said nothing and kept the torn file as the workdir's export. The export's headers
    are read on each rerun; a damaged one is written again, and said so."""
    import json

    from emit_jax import hf

    d, warmup = _warmup_runs(tmp_path)
    r = warmup("--config.warmup.steps=1")
    assert r.returncode == 0, r.stderr[-3000:]
    weights = d / "hf" / "model.safetensors"
    size = weights.stat().st_size
    assert hf.export_problem(d / "hf") is None
    os.truncate(weights, size // 2)
    problem = hf.export_problem(d / "hf")
    assert problem.startswith(f"{weights}: not a readable safetensors file ("), problem
    r = warmup("--config.warmup.steps=1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (f"[export] {d}/hf (warmup after 1 steps; it held this model, damaged: {problem})"
            in r.stderr), r.stderr[-3000:]
    assert weights.stat().st_size == size and hf.export_problem(d / "hf") is None
    assert json.loads((d / "results.json").read_text())["export"] == {"stage": "warmup",
                                                                     "steps": 1}
    (d / "hf" / "config.json").write_text("[]")
    assert hf.export_problem(d / "hf") == f"{d / 'hf' / 'config.json'}: not a JSON object"
    r = warmup("--config.warmup.steps=1")
    assert r.returncode == 0 and "config.json: not a JSON object)" in r.stderr, r.stderr[-3000:]
    r = warmup("--config.warmup.steps=1")  # nothing said when the export is whole
    assert r.returncode == 0 and "[export]" not in r.stderr, r.stderr[-3000:]


def test_plan_says_when_the_images_asked_do_not_fit_the_prompt(capsys):
    """``plan --images_per_sample 100`` planned as many tiles as the prompt holds (64 of the
    100 asked) without a word."""
    from emit_jax.plan.command import main

    assert main(["--config", "configs/grpo.py:smoke", "--stage", "sft",
                 "--images_per_sample", "100"]) == 0
    err = capsys.readouterr().err
    assert err == ("note: --images_per_sample 100: 100 image tiles of 64 tokens a sequence do "
                   "not fit its 4,096-token prompt; planned with 64\n")
    assert main(["--config", "configs/grpo.py:smoke", "--stage", "sft", "--images_per_sample",
                 "64", "--json"]) == 0
    assert capsys.readouterr().err == ""


def test_each_config_variant_has_its_own_default_workdir():
    """``configs/grpo.py:plain`` (the paper's plain-GRPO row) without ``--workdir`` ran in
    ``runs/grpo``, the default difficulty-aware run's folder, and loaded its finished stages
    (a settings warning, then the other variant's model)."""
    from emit_jax.train import default_workdir

    assert default_workdir("configs/grpo.py") == os.path.join("runs", "grpo")
    assert default_workdir("configs/grpo.py:plain") == os.path.join("runs", "grpo-plain")
    assert default_workdir("/x/configs/sft.py:smoke") == os.path.join("runs", "sft-smoke")


def test_evaluate_says_how_far_it_is_every_half_minute(monkeypatch):
    """E-note: ``evaluate`` printed nothing between its start and its table (an 8B evaluation
    runs for hours). A line every 30 s: questions answered, rate, time left."""
    from emit_jax import evaluate

    clock = iter([0.0] + [10.0 * k for k in range(1, 40)])
    monkeypatch.setattr(evaluate.time, "monotonic", lambda: next(clock))
    lines = []
    progress = evaluate.Progress(1000, lines.append)
    for _ in range(8):  # started at 0 s; question k begins at 10 k s, k - 1 answered by then
        progress.tick()
    # at 30 s: 2 answered, 2 / 30 s, 998 left = 14,970 s; at 60 s: 5 answered, 995 / (5 / 60)
    assert lines == ["emit_jax.evaluate: 2 of 1000 questions answered (0.07/s, about 4 h 9 min "
                     "left)", "emit_jax.evaluate: 5 of 1000 questions answered (0.08/s, about "
                     "3 h 19 min left)"]
    quick = []
    fast = evaluate.Progress(5, quick.append)
    monkeypatch.setattr(evaluate.time, "monotonic", lambda: 1.0)
    for _ in range(5):
        fast.tick()
    assert quick == []


def test_a_config_json_whose_rope_or_eps_makes_nan_is_refused(tmp_path):
    """X17: a config.json with ``rope_theta: -1`` converted without a word, and the model then
    answered every question with token 0 (every logit NaN) in an evaluation that looked
    normal. RoPE's base and factor must be > 0 and the norms' epsilon >= 0."""
    import json

    from conftest import hf_config

    from emit_jax import hf
    from emit_jax.errors import ConfigError

    good = json.loads(hf_config().to_json_string())
    for path, value, line in [
        (("text_config", "rope_theta"), -1.0, "text rope_theta is -1.0, expected a number > 0"),
        (("text_config", "rope_theta"), 0.0, "text rope_theta is 0.0, expected a number > 0"),
        (("text_config", "rms_norm_eps"), -1e-6,
         "text rms_norm_eps is -1e-06, expected a number >= 0"),
        (("vision_config", "layer_norm_eps"), -0.5,
         "vision layer_norm_eps is -0.5, expected a number >= 0"),
    ]:
        raw = json.loads(json.dumps(good))
        raw[path[0]][path[1]] = value
        raw[path[0]].pop("rope_parameters", None)
        folder = tmp_path / f"{path[1]}{value}"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(raw))
        with pytest.raises(ConfigError) as e:
            hf.read_config(folder)
        assert line in str(e.value)
    folder = tmp_path / "fine"
    folder.mkdir()
    raw = json.loads(json.dumps(good))
    raw["text_config"]["rms_norm_eps"] = 0.0  # transformers takes 0; so does the port
    (folder / "config.json").write_text(json.dumps(raw))
    assert hf.read_config(folder)[0].text.rms_norm_eps == 0.0


def test_evaluate_refuses_nan_answers(tmp_path):
    """X12: a model whose logits are NaN (a broken config.json; NaN weights alike) answered
    every question with token 0, and the table looked like any other. ``Runner.answer`` now
    stops on a non-finite log-probability, naming the question; a sound model answers."""
    import jax.numpy as jnp

    from emit_jax import configs
    from emit_jax.data import tokenizer as T
    from emit_jax.errors import CheckpointError
    from emit_jax.evaluate import Runner
    from emit_jax.training.stages import build_initial_model

    tok = T.train_tiny_tokenizer(T.default_corpus(), tmp_path / "tok")
    model = build_initial_model(configs.load("configs/grpo.py:smoke"), tok)
    model.eval()
    runner = Runner(model, tok, max_tiles=1, max_new_tokens=3)
    assert isinstance(runner.answer("Is there a defect?", [], False), str)
    norm = model.language_model.norm
    norm.weight.value = jnp.full_like(norm.weight.value, jnp.nan)
    with pytest.raises(CheckpointError) as e:
        runner.answer("Is there a defect?", [], False)
    assert "the model's output is not a number (NaN logits) on the question on no image" \
        in str(e.value)


@pytest.mark.parametrize("args, line", [
    (["--layers", "1,1"], "--layers 1,1: ce_layers (1, 1): a block is named twice"),
    (["--layers", ""], "argument --layers: '' is empty; leave the flag out for EMIT's blocks"),
])
def test_heatmap_auroc_layers_as_visualize_takes_them(args, line, capsys):
    """Q4 / Q5: ``heatmap_auroc --layers 1,1`` counted a block twice (visualize refuses it) and
    ``--layers ''`` ran EMIT's blocks without a word."""
    from emit_jax import cli
    from emit_jax.experiments.heatmap_auroc import main

    prog = "python -m emit_jax.experiments.heatmap_auroc"
    assert cli.run(main, args, prog=prog) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert err == [f"{prog}: error: {line}"]


def test_heatmap_auroc_says_a_window_past_the_grid(capsys, tmp_path):
    """Q19: ``--window 100`` on the 16 x 16 grid ran without the note visualize gives."""
    from emit_jax import cli
    from emit_jax.experiments.heatmap_auroc import main

    prog = "python -m emit_jax.experiments.heatmap_auroc"
    assert cli.run(main, ["--window", "100", "--data", str(tmp_path / "none")], prog=prog) == 2
    err = capsys.readouterr().err
    assert err.startswith("note: --window 100 reaches past the 16x16 heat-map grid: each patch "
                          "is compared with every reference patch (the same map as --window 15)")



@pytest.mark.parametrize("name", ["new/", "existing"])
def test_aot_json_out_naming_a_folder_is_refused(tmp_path, capsys, name):
    """A7: ``aot --json_out DIR/`` compiled for 40 s and wrote the report as the file ``DIR``
    (data.build and evaluate refuse an output that names a folder)."""
    from emit_jax import cli
    from emit_jax.aot.command import main

    (tmp_path / "existing").mkdir()
    out = os.path.join(str(tmp_path), name)  # (pathlib would drop the slash)
    assert cli.run(main, ["--topology", "v5e:2x2", "--config", "configs/grpo.py:smoke",
                          "--json_out", out], prog="emit_jax.aot") == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"emit_jax.aot: error: --json_out {out}: names a folder; aot writes one JSON file (e.g. "
        f"{os.path.join(out, 'aot.json')})"]
    assert not (tmp_path / "new").exists()


def test_the_run_wide_warning_names_a_stage_that_resumes_with_a_changed_seed(tmp_path):
    """T11: a rerun with another seed resumed the unfinished stage from its checkpoint, said
    only "this run continues with the new values", and the stage's settings.json then named
    the new seed for steps the old one trained."""
    from conftest import train

    from emit_jax import configs
    from emit_jax.training.stages import run_notice

    d = tmp_path / "w"
    common = ["--config.stages=('warmup',)", "--config.eval_limit=0", "--config.export_hf=False"]
    r = train("--config", "configs/grpo.py:smoke", "--workdir", str(d), *common,
              "--config.warmup.steps=2", env={"EMIT_JAX_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr[-3000:]
    more = [c.removeprefix("--config.") for c in common] + ["warmup.steps=4"]
    assert run_notice(configs.load("configs/grpo.py:smoke", more), str(d)) is None
    line = run_notice(configs.load("configs/grpo.py:smoke", more + ["seed=1"]), str(d))
    assert line == ("warning: settings changed since this workdir's last run: seed 0 -> 1; this "
                    "run continues with the new values (it evaluates nothing); the unfinished "
                    "stage warmup resumes from its checkpoint with them, the steps trained so far "
                    "having used the old ones")
    line = run_notice(configs.load("configs/grpo.py:smoke", more[:-1] + ["seed=1"]), str(d))
    assert "the finished stage warmup is kept as trained" in line and "unfinished" not in line


@pytest.mark.parametrize("buckets", ["()", "(0,)", "(1024,512)", "(512,512)", "(512.5,)"])
def test_plan_and_aot_take_the_length_buckets_train_takes(buckets, capsys):
    """K2-K6: ``plan --set data.length_buckets=(1024,512)`` (or ``(512,512)``, ``(512.5,)``)
    planned, and said it fits, a config train refuses; ``(0,)`` was said to have no buckets."""
    from emit_jax import cli
    from emit_jax.aot.command import main as aot
    from emit_jax.plan.command import main as plan

    line = (f"config data.length_buckets: {buckets.replace(',', ', ').replace(', )', ',)')} "
            "must be increasing positive integers")
    args = ["--config", "configs/grpo.py:smoke", f"--config.data.length_buckets={buckets}"]
    for main, prog, more in ((plan, "emit_jax.plan", []),
                             (aot, "emit_jax.aot", ["--topology", "v5e:2x2"])):
        assert cli.run(main, args + more, prog=prog) == 2
        assert capsys.readouterr().err.strip().splitlines() == [f"{prog}: error: {line}"]


def test_a_tuple_of_names_in_parentheses_needs_no_quotes():
    """K7 / K8: ``grpo.reward_names=(accuracy,accuracy)`` was "expected a tuple value" where
    the bare ``accuracy,accuracy`` reached the check that names the problem."""
    from emit_jax import configs

    cfg = configs.load("configs/grpo.py:smoke", ["grpo.reward_names=(accuracy, format)",
                                                 "stages=(base,sft)"])
    assert cfg.grpo.reward_names == ("accuracy", "format") and cfg.stages == ("base", "sft")


def test_a_users_file_in_the_export_survives_its_replacement(tmp_path):
    """T13 (data lost): ``evaluate --out WORKDIR/hf/myresults.json`` was accepted, and the next
    run that replaced the export removed the old ``hf/`` whole, the user's file with it."""
    import json

    d, warmup = _warmup_runs(tmp_path)
    r = warmup("--config.warmup.steps=2")
    assert r.returncode == 0, r.stderr[-3000:]
    (d / "hf" / "myresults.json").write_text('{"mine": 1}')
    r = warmup("--config.warmup.steps=3")
    assert r.returncode == 0, r.stderr[-3000:]
    kept = [p for p in d.glob("replaced-*/hf/myresults.json")]
    assert len(kept) == 1 and json.loads(kept[0].read_text()) == {"mine": 1}
    assert (f"note: the replaced export held 1 file the export does not write (myresults.json): "
            f"it is kept whole in {kept[0].parent}") in r.stderr
    assert not (d / "hf" / "myresults.json").exists() and (d / "hf" / "config.json").is_file()
    assert sorted(n for n in os.listdir(d) if n.startswith(".")) == [".lock"]


@pytest.mark.parametrize("module, args", [
    ("emit_jax.evaluate", ["--checkpoint", "{ck}", "--data", "{ds}", "--out", "{out}.json"]),
    ("emit_jax.visualize", ["heatmap", "--query", "{img}", "--reference", "{img}", "--out",
                            "{out}.png"]),
    ("emit_jax.export", ["--checkpoint", "{ck}", "--out", "{out}"]),
    ("emit_jax.convert", ["--hf", "{ck}", "--out", "{out}"]),
])
def test_an_output_inside_a_workdirs_export_is_refused(tmp_path, capsys, module, args):
    """E15 / F2 / F3: ``evaluate --out``, ``visualize --out`` and ``export --out`` inside
    ``WORKDIR/hf`` were written without a word, and the next run that exported removed them
    with the old export (T19). One line now, before any work."""
    import importlib

    from PIL import Image

    from emit_jax import cli

    wd = tmp_path / "w"
    (wd / "data").mkdir(parents=True)
    (wd / "data" / "options.json").write_text("{}")
    (wd / "hf").mkdir()
    (tmp_path / "ck").mkdir()
    (tmp_path / "ds").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    out = wd / "hf" / "mine"
    argv = [a.format(ck=tmp_path / "ck", ds=tmp_path / "ds", img=tmp_path / "a.png", out=out)
            for a in args]
    prog = "python -m " + module
    assert cli.run(importlib.import_module(module).main, argv, prog=prog) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith(
        f"the output lies inside {wd / 'hf'}, the model export of the training workdir {wd}, "
        "which its runs replace or delete; choose a path outside it (or a new name in the "
        "workdir itself)"), err
    assert os.listdir(wd / "hf") == []


def test_a_users_files_in_the_embedded_cache_folder_are_kept(tmp_path, capsys):
    """Z1 (data lost): train regenerated ``EMIT_JAX_CACHE/embedded-v2-seed0`` over a folder of
    the user's files (no manifest.json) and deleted them, with a note; ``data.embedded
    --overwrite`` refuses such a folder. They are moved aside now; a folder an earlier
    generation wrote (its manifest names the dataset) is still replaced."""
    import json

    from emit_jax.data.embedded.cache import cache_path, ensure_cached
    from emit_jax.data.embedded.writer import DATASET_NAME

    target = cache_path(tmp_path, 0)
    os.makedirs(os.path.join(target, "sub"))
    with open(os.path.join(target, "notes.txt"), "w") as f:
        f.write("mine")
    with open(os.path.join(target, "sub", "a.txt"), "w") as f:
        f.write("x")
    assert ensure_cached(tmp_path, 0) == target
    err = capsys.readouterr().err.strip().splitlines()
    kept = [n for n in os.listdir(tmp_path) if ".replaced-" in n]
    assert len(kept) == 1 and err == [
        f"note: {target} did not hold the embedded dataset of seed 0 (no manifest.json of the "
        f"generator); it is moved to {tmp_path / kept[0]}, and the dataset generated in its place"]
    assert (tmp_path / kept[0] / "notes.txt").read_text() == "mine"
    assert (tmp_path / kept[0] / "sub" / "a.txt").read_text() == "x"
    # an older generation's folder (its manifest names the dataset): replaced, nothing kept
    other = cache_path(tmp_path, 1)
    os.makedirs(other)
    with open(os.path.join(other, "manifest.json"), "w") as f:
        json.dump({"dataset": DATASET_NAME, "version": 1, "seed": 1}, f)
    assert ensure_cached(tmp_path, 1) == other
    assert capsys.readouterr().err.strip().splitlines() == [
        f"note: {other} held the embedded dataset of another generator version or seed (its "
        "manifest.json); generated again in its place"]
    assert len([n for n in os.listdir(tmp_path) if ".replaced-" in n]) == 1
    assert not [n for n in os.listdir(tmp_path) if ".stale-" in n or ".tmp-" in n]


def test_the_embedded_cache_folder_named_as_the_source_is_said_as_such(tmp_path, monkeypatch):
    """T14: a workdir built from ``data.source=embedded`` rerun with the cache folder itself
    was told to choose another workdir "for another dataset" or move "a dataset that moved"
    back: it is the same folder."""
    from emit_jax import configs
    from emit_jax.data.embedded.cache import cache_path
    from emit_jax.errors import ConfigError
    from emit_jax.training.stages import check_data_source

    monkeypatch.setenv("EMIT_JAX_CACHE", str(tmp_path / "cache"))
    wd = tmp_path / "w"
    (wd / "data").mkdir(parents=True)
    (wd / "results.json").write_text(json_config(configs.load("configs/grpo.py:smoke")))
    folder = cache_path(None, 0)
    with pytest.raises(ConfigError) as e:
        check_data_source(configs.load("configs/grpo.py:smoke", [f"data.source={folder}"]),
                          str(wd))
    assert str(e.value) == (
        f"config data.source: {folder!r} is the embedded dataset's cache folder, which this "
        f"workdir's records ({wd / 'data'}) were built from as 'embedded'; rerun with "
        "--config.data.source=embedded (named as a folder it is a dataset of its own: the "
        "further datasets the embedded source draws are not drawn)")
    with pytest.raises(ConfigError, match="choose another --workdir for another dataset"):
        check_data_source(configs.load("configs/grpo.py:smoke", [f"data.source={tmp_path}"]),
                          str(wd))


def json_config(cfg) -> str:
    import json

    from emit_jax.training.stages import config_json

    return json.dumps({"config": config_json(cfg)})


def test_visualize_quotes_an_out_with_a_blank_at_its_end():
    """F5: ``--out 'trail .png '`` was shown as ``--out trail .png :``, the blank unseen."""
    from emit_jax.errors import ConfigError
    from emit_jax.visualize import image_format

    with pytest.raises(ConfigError) as e:
        image_format("/tmp/x/trail .png ")
    assert str(e.value).startswith("--out '/tmp/x/trail .png ': unknown image file extension "
                                   "'.png '")


def test_visualize_says_which_side_of_a_thin_image_is_short(tmp_path, capsys):
    """V12: a 3 x 40000 image was "3x40000 pixels, fewer than the heat map's 16x16 cells"."""
    from PIL import Image

    from emit_jax import cli
    from emit_jax.visualize import main

    Image.new("RGB", (3, 400), (90, 90, 90)).save(tmp_path / "thin.png")
    Image.new("RGB", (224, 224), (90, 90, 90)).save(tmp_path / "ref.png")
    assert cli.run(main, ["heatmap", "--query", str(tmp_path / "thin.png"), "--reference",
                          str(tmp_path / "ref.png"), "--out", str(tmp_path / "h.png")],
                   prog="python -m emit_jax.visualize") == 0
    err = capsys.readouterr().err
    assert (f"note: --query {tmp_path / 'thin.png'} is 3x400 pixels, 3 (its width) fewer than "
            "the heat map's 16 cells a side; it is resized to 224x224 and its map says little"
            in err), err


def test_a_stage_whose_settings_file_is_gone_is_not_compared_silently(tmp_path):
    """Nineteenth probe D02: with ``sft/settings.json`` deleted, a rerun with a setting that
    its model depends on (``emit.peak_location=True``) loaded every stage as finished and
    recorded the new value in results.json; the intact workdir refuses it."""
    import json

    from emit_jax import configs
    from emit_jax.errors import ConfigError
    from emit_jax.training import stages

    cfg = configs.load("configs/grpo.py:smoke")
    d = tmp_path / "w"
    (d / "sft").mkdir(parents=True)
    stages.save_settings(cfg, str(d), "sft")
    (d / "sft" / "done.json").write_text(json.dumps({"steps": 1}))
    changed = configs.load("configs/grpo.py:smoke", ["emit.peak_location=True"])
    assert stages.changed_settings(changed, str(d)) == {
        "sft": [("emit.peak_location", False, True)]}
    os.remove(d / "sft" / "settings.json")
    with pytest.raises(ConfigError) as e:
        stages.changed_settings(changed, str(d))
    assert str(e.value) == (
        f"{d / 'sft' / 'settings.json'}: missing, so the settings sft was trained with cannot be "
        "compared with this run's (its checkpoints and model depend on them); restore the file, "
        "or rerun with --config.restart=True to train sft again (its output is moved to "
        f"{d / 'replaced-<time>'}/, not deleted)")
    assert stages.changed_settings(changed, str(d), sections=True) == {
        "sft": [("settings.json", "missing", "this run's")]}
    (d / "base").mkdir()  # a stage that left no output yet (no checkpoint): not compared
    assert "base" not in stages.changed_settings(changed, str(d), sections=True)


def test_records_without_their_options_file_are_said_once(tmp_path):
    """Nineteenth probe D04: with ``data/options.json`` deleted the rerun printed, twice, that
    the records "were built with ad_order='shuffled'" (the defaults of records older than the
    file) and advised deleting the data and every stage trained on it."""
    d, warmup = _warmup_runs(tmp_path)
    r = warmup("--config.warmup.steps=1", "--config.export_hf=False")
    assert r.returncode == 0, r.stderr[-3000:]
    os.remove(d / "data" / "options.json")
    r = warmup("--config.warmup.steps=1", "--config.export_hf=False")
    assert r.returncode == 2
    errors = [x for x in r.stderr.splitlines() if "error" in x]
    assert errors == [
        f"emit_jax.train: error: {d / 'data' / 'options.json'}: missing, so how the records "
        "beside it were built (ad_order, rationale) cannot be told; restore the file, or move "
        f"{d / 'data'} out of the workdir to build the records again (its stages are kept; a "
        "rerun compares their settings)"], r.stderr[-3000:]


def test_data_build_says_why_a_stage_2_task_has_no_question(tmp_path, capsys):
    """Nineteenth probe B03: ``data.build --stage 2`` on one class with one defect type wrote
    anomaly discrimination and localization questions only, without a word for the other two
    of the four tasks."""
    from test_tasks import make_mvtec

    from emit_jax.data.records import build

    src = make_mvtec(tmp_path / "ds", classes=("widget",))
    summary = build(src, str(tmp_path / "r.jsonl"), 2)
    assert "object_classification" not in summary["tasks"]
    err = capsys.readouterr().err
    assert (f"note: no object classification question: {src} has 1 class ('widget'), and its "
            "questions pick among at least two") in err, err


def test_evaluate_on_a_folder_with_neither_layout_names_both(tmp_path, capsys):
    """Nineteenth probe N11: an MMAD folder whose mmad.json was missing was told only of the
    MVTec layout."""
    from emit_jax import cli
    from emit_jax.evaluate import main

    (tmp_path / "d" / "images").mkdir(parents=True)
    (tmp_path / "ck").mkdir()
    prog = "python -m emit_jax.evaluate"
    assert cli.run(main, ["--checkpoint", str(tmp_path / "ck"), "--data", str(tmp_path / "d")],
                   prog=prog) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"{prog}: error: {tmp_path / 'd'}: no class folders with train/ or test/ (expected "
        "MVTec AD layout), nor an mmad.json (an MMAD folder has one at its top)"]


def test_an_mmad_folder_given_for_training_data_is_named_as_such(tmp_path):
    """Nineteenth probe TR: ``data.source`` (or ``data.build --source``) an MMAD folder was
    told "no class folders with train/ or test/ (expected MVTec AD layout)"."""
    from conftest import ROOT

    from emit_jax.data.mvtec import scan
    from emit_jax.errors import DataError

    mmad = os.path.join(ROOT, "tests", "fixtures", "mmad")
    with pytest.raises(DataError) as e:
        scan(mmad)
    assert str(e.value) == (f"{mmad}: an MMAD benchmark folder (mmad.json), which evaluate "
                            "takes; training and data.build take an MVTec AD-style folder "
                            "(CLASS/train/good/, CLASS/test/DEFECT/)")


def test_a_partial_answers_file_without_answers_does_not_block_other_settings(tmp_path):
    """Nineteenth probe NA3: evaluate stopped before its first answer (NaN logits) said
    "nothing to keep" but left the header of ``<out>.partial.jsonl``, and the corrected run
    (another checkpoint) was refused: "its answers were made with other settings"."""
    from emit_jax.errors import DataError
    from emit_jax.eval import partial

    path = str(tmp_path / "r.json.partial.jsonl")
    before = {"checkpoint_files": "aaa", "max_new_tokens": 2}
    now = {"checkpoint_files": "bbb", "max_new_tokens": 2}
    with partial.Writer(path, partial.header("nan_ck", "d", before), 0):
        pass
    assert partial.read_all(path, now, ["f0"]) == ({}, 0, 0)
    with partial.Writer(path, partial.header("nan_ck", "d", before), 0) as w:
        w.write(0, "f0", "A", {"id": 0})
    with pytest.raises(DataError, match="its answers were made with other settings"):
        partial.read_all(path, now, ["f0"])  # an answer: kept, --restart to drop it


def test_the_untrained_start_warning_gives_the_recipes_own_stages(tmp_path, capsys):
    """Nineteenth probe AF09: ``configs/adfm.py --config.stages=grpo`` was advised
    ``stages=('base', 'sft', 'grpo')``: EMIT's recipe, where AD-FM's is base then grpo."""
    from emit_jax import configs
    from emit_jax.training.stages import warn_untrained_start

    for config, stages in (("configs/adfm.py:smoke", "('base', 'grpo')"),
                           ("configs/grpo.py:smoke", "('base', 'sft', 'grpo')")):
        warn_untrained_start(configs.load(config, ["stages=grpo"]), str(tmp_path), "grpo")
        err = capsys.readouterr().err
        assert f'or run the earlier stages too (--config.stages="{stages}")' in err, err


@pytest.mark.parametrize("sig, line", [
    ("SIGINT", "interrupted (second SIGINT): stopped at once, without finishing the step or "
               "checkpoint in progress"),
    ("SIGTERM", "interrupted (SIGTERM while the stopping step's checkpoint was written): "
                "stopped at once"),
])
def test_a_signal_while_the_stopping_checkpoint_is_written_ends_in_one_line(sig, line):
    """Full suite, session 13 (a loaded host): the second Ctrl-C came while the stopping
    step's checkpoint was awaited, after the loop's guard had given the signals back: it was
    raised inside Orbax's wait, which logged its threads' tracebacks (``E1205 ...
    Save Finalize thread failed``) before the line. That wait now stops at once."""
    code = ("import os, signal, time\n"
            "from emit_jax.training.loop import signals_stop_at_once\n"
            "with signals_stop_at_once():\n"
            f"    os.kill(os.getpid(), signal.{sig})\n"
            "    time.sleep(30)\n"
            "print('not reached')\n")
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 130 and r.stdout == "", r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and line in lines[0], r.stderr


def test_plan_reads_init_from_as_train_does(tmp_path, capsys):
    """Twentieth probe C64 / C65: ``plan --set init_from=X`` planned the config's ``arch`` (its
    full 151,674-row vocabulary) whatever X was: a training checkpoint, a broken config.json, a
    missing folder (train refuses each). An HF folder's config.json is planned now."""
    from conftest import hf_config

    from emit_jax import cli
    from emit_jax.plan.command import main
    from emit_jax.plan.variables import model_config
    from emit_jax import configs

    good = tmp_path / "hf"
    hf_config().save_pretrained(good)
    assert model_config(configs.load("configs/grpo.py:smoke", [f"init_from={good}"]),
                        False).text.vocab_size == 320
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    prog = "emit_jax.plan"
    for init_from, line in [
        (tmp_path / "nosuch", f"config init_from: '{tmp_path / 'nosuch'}' is not a folder (an HF "
                              "folder or an emit_jax checkpoint)"),
        (broken, f"config init_from: {broken / 'config.json'}: model_type is None, expected "
                 "'internvl'"),
        (tmp_path, f"config init_from: {tmp_path / 'emit_jax.json'}: not found; {tmp_path} is "
                   "not an emit_jax model checkpoint"),
    ]:
        assert cli.run(main, ["--config", "configs/grpo.py:smoke", "--set",
                              f"init_from={init_from}"], prog=prog) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"{prog}: error: {line}"), err


def test_restart_with_another_seed_trains_again(tmp_path):
    """Twentieth probe C81: ``--config.seed=1 --config.restart=True`` on a workdir trained with
    seed 0 said "nothing to restart" and kept every stage (results.json then named seed 1)."""
    import json

    from emit_jax import configs
    from emit_jax.training import stages

    d = tmp_path / "w"
    (d / "base").mkdir(parents=True)
    stages.save_settings(configs.load("configs/grpo.py:smoke"), str(d), "base")
    (d / "base" / "done.json").write_text(json.dumps({"steps": 2}))
    other = configs.load("configs/grpo.py:smoke", ["seed=1", "base.steps=2"])
    assert stages.changed_settings(other, str(d)) == {}  # a rerun: kept, with a warning
    assert stages.changed_settings(other, str(d), sections=True) == {"base": [("seed", 0, 1)]}


def test_a_restart_that_only_adds_steps_says_the_stage_continues(tmp_path):
    """Twenty-first probe #13: ``--config.restart=True --config.base.steps=2`` on a workdir
    whose base finished with 1 step said "[restart] ... nothing to restart" and then trained
    base step 2/2 without a word why."""
    import json

    from emit_jax import configs
    from emit_jax.training.stages import restart_note

    cfg = configs.load("configs/grpo.py:smoke")
    cfg.stages = ("base", "sft")
    cfg.base.steps, cfg.sft.steps = 2, 3
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "done.json").write_text(json.dumps({"steps": 1}))
    assert restart_note(cfg, str(tmp_path)) == (
        "[restart] the stored stages were trained with these settings: nothing to train again "
        "(base continues from step 1 to 2: more steps resume a stage, fewer train it again)")
    cfg.base.steps = 1
    assert restart_note(cfg, str(tmp_path)) == (
        "[restart] the stored stages were trained with these settings: nothing to train again")


def test_a_run_without_workdir_names_the_folder_it_uses(tmp_path):
    """Twenty-first probe: a run without ``--workdir`` trained into runs/<config>-<variant>
    without naming it; the folder is said once the settings are valid (and a run that names
    its workdir has no such line)."""
    args = [sys.executable, "-m", "emit_jax.train", "--config",
            os.path.join(ROOT, "configs", "grpo.py") + ":smoke", "--config.stages=base",
            "--config.base.steps=1", "--config.eval_limit=0", "--config.eval_unseen=0",
            "--config.export_hf=False", "--config.image_size=56", "--config.compile_cache="]
    env = dict(os.environ, PYTHONPATH=ROOT, EMIT_JAX_CACHE=str(tmp_path / "cache"))
    r = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    folder = os.path.join("runs", "grpo-smoke")
    assert f"[workdir] {folder} (a new folder; no --workdir given: runs/<config name>" \
           "[-<variant>] under the current folder)" in r.stderr.splitlines()
    assert (tmp_path / folder / "base" / "done.json").is_file()
    r = subprocess.run(args + ["--workdir", folder], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "[workdir]" not in r.stderr, r.stderr[-2000:]


def test_an_output_in_what_a_training_workdir_writes_is_refused(tmp_path, capsys):
    """Twenty-second probe X34 (data lost): ``export --out WORKDIR/base/ckpt/1/myexport`` and
    ``evaluate --out WORKDIR/base/ckpt/1/myeval.json`` were written, and the next run of the
    stage deleted checkpoint 1 with them; T03b: ``evaluate --out WORKDIR/results.json`` (the
    workdir named through a link) was replaced by the run's results. Only ``hf/`` was guarded.
    Every entry the workdir's runs write is now; a new name in the workdir itself is not."""
    from emit_jax import cli, fileio
    from emit_jax.evaluate import main as evaluate

    wd = tmp_path / "w"
    (wd / "data").mkdir(parents=True)
    (wd / "data" / "options.json").write_text("{}")
    (wd / "base" / "ckpt" / "1").mkdir(parents=True)
    (tmp_path / "link").symlink_to(wd)
    for out, entry, what in [
            (wd / "base" / "ckpt" / "1" / "myexport", wd / "base", "a stage folder"),
            (tmp_path / "link" / "results.json", wd / "results.json", "the results"),
            (wd / "tokenizer", wd / "tokenizer", "the tokenizer"),
            (wd / "replaced-20261205" / "x.json", wd / "replaced-20261205",
             "a restart's moved output"),
            (wd / "fresh_sft_all" / "e.json", wd / "fresh_sft_all", "a fresh_images run's folder")]:
        with pytest.raises(fileio.InputOverwriteError) as e:
            fileio.check_not_input(out, {})
        where = "is" if out.name == entry.name else "lies inside"
        # (twenty-sixth probe OW4: a restart's moved outputs are never deleted)
        why = ("which the tool keeps as the restart left it" if entry.name.startswith("replaced-")
               else "which its runs replace or delete")
        assert str(e.value) == (
            f"{out}: the output {where} {entry}, {what} of the training workdir {wd}, {why}; "
            "choose a path outside it (or a new name in the workdir itself)")
    fileio.check_not_input(wd / "myeval.json", {})  # the user's own name: theirs
    fileio.check_not_input(tmp_path / "base" / "x", {})  # no workdir above: nothing to guard
    (tmp_path / "ds").mkdir()
    prog = "python -m emit_jax.evaluate"
    assert cli.run(evaluate, ["--checkpoint", str(tmp_path / "ck"), "--data",
                              str(tmp_path / "ds"), "--out", str(tmp_path / "link" /
                                                                  "results.json")],
                   prog=prog) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the output is " + str(wd / "results.json") in err[0], err
    assert not (wd / "results.json").exists()


def test_a_setting_only_the_new_config_file_has_is_said(tmp_path):
    """Twenty-third probe CS1/CS3: base trained with ``configs/grpo.py:smoke`` and continued
    with ``configs/adfm.py:smoke`` (``base.adfm=True``, a key grpo.py's config does not have)
    went on with AD-FM records without a word: a key one side lacks was skipped. The notices
    name a key that is set on one side only; restart still compares only the keys both have."""
    import json

    from emit_jax import configs
    from emit_jax.training import stages

    old = configs.load("configs/grpo.py:smoke")
    assert "adfm" not in old.base
    (tmp_path / "base" / "ckpt" / "1").mkdir(parents=True)
    (tmp_path / "base" / "settings.json").write_text(json.dumps(
        {"stage": "base", "config": stages.config_json(old)}))
    new = configs.load("configs/adfm.py:smoke")
    new.stages = ("base",)
    line = stages.settings_notice(new, str(tmp_path), "base", finished=False)
    assert line is not None and line.startswith(
        "warning: base resumes with settings changed since its checkpoint: ") and \
        "base.adfm none -> True" in line, line
    assert ("base.adfm", None, True) not in stages.section_changes(new, str(tmp_path), "base")
    assert ("data.adfm", None, True) in stages.run_changes(new, str(tmp_path))
    assert stages.settings_notice(old, str(tmp_path), "base", finished=False) is None


def test_heatmap_auroc_without_anomalous_questions_says_n_a(tmp_path, capsys):
    """Twenty-fourth probe EX1: a folder with no anomalous test image printed "AUROC max nan"
    for every reduction; an AUROC needs both kinds."""
    import shutil

    from emit_jax import cli
    from emit_jax.experiments.heatmap_auroc import main
    from test_tasks import make_mvtec

    ds = make_mvtec(tmp_path / "ds", classes=("widget",))
    for name in os.listdir(os.path.join(ds, "widget", "test")):
        if name != "good":
            shutil.rmtree(os.path.join(ds, "widget", "test", name))
    shutil.rmtree(os.path.join(ds, "widget", "ground_truth"), ignore_errors=True)
    prog = "python -m emit_jax.experiments.heatmap_auroc"
    assert cli.run(main, ["--data", ds], prog=prog) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if "questions" in x]
    assert lines and all(x.endswith("(0 anomalous)  AUROC n/a (it needs normal and anomalous "
                                    "questions)") for x in lines), lines


def test_the_output_guard_knows_every_name_a_workdir_run_writes():
    """``fileio`` sits below the trainer, so its list of what a workdir's runs write
    (``WORKDIR_OWN``) restates the stage names, the lock and the result files: kept equal to
    the trainer's own here."""
    from emit_jax import fileio, train
    from emit_jax.training import stages
    from emit_jax.training.config import STAGES

    own = fileio.WORKDIR_OWN
    assert {n for n, what in own.items() if what == "a stage folder"} == set(STAGES)
    assert set(STAGES) == set(stages.REGISTRY)
    assert {stages.LOCK_FILE, "hf", "data", "tokenizer", *train.WORKDIR_OUTPUTS} <= set(own)
