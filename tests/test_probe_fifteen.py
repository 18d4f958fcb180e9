"""The fourteenth probe's leftovers and the fifteenth and sixteenth reliability probes' cases
(issue 30): each failed before its fix."""

from __future__ import annotations

import os

import pytest
from conftest import train


@pytest.mark.parametrize("raw, line", [
    ("(1.0,nan,1.0,1.0)", "config grpo.reward_weights[1]: nan is not a finite number"),
    ("(1.0,1.0,-inf,1.0)", "config grpo.reward_weights[2]: -inf is not a finite number"),
    ("(1.0,1.0,1.0,Infinity)", "config grpo.reward_weights[3]: inf is not a finite number"),
])
def test_a_non_finite_tuple_entry_is_named_as_such(raw, line):
    """RW (fourteenth probe): ``grpo.reward_weights=(1.0,nan,1.0,1.0)`` was refused as
    "expected a tuple value": the bare name ``nan`` made the whole value no literal, so the
    entry and its problem went unnamed."""
    from emit_jax import configs
    from emit_jax.errors import ConfigError
    from emit_jax.training.validate import validate_config

    with pytest.raises(ConfigError) as e:
        validate_config(configs.load("configs/grpo.py:smoke", [f"grpo.reward_weights={raw}"]))
    assert str(e.value) == line


def test_nan_spelled_for_a_scalar_reaches_its_range_check_and_a_name_stays_refused():
    from emit_jax import configs
    from emit_jax.errors import ConfigError
    from emit_jax.training.validate import validate_config

    with pytest.raises(ConfigError) as e:
        validate_config(configs.load("configs/grpo.py:smoke", ["base.lr=NaN"]))
    assert str(e.value) == "config base.lr: nan is not a finite number"
    with pytest.raises(ConfigError) as e:
        configs.load("configs/grpo.py:smoke", ["grpo.reward_weights=(1.0,x,1.0,1.0)"])
    assert "expected a tuple value" in str(e.value)
    with pytest.raises(ConfigError) as e:
        configs.load("configs/grpo.py:smoke", ["base.batch_size=nan"])
    assert "expected an int value" in str(e.value)
    # a string field keeps the text as it is
    cfg = configs.load("configs/grpo.py:smoke", ["data.source=nan"])
    assert cfg.data.source == "nan"


def test_the_decode_bucket_is_bounded_where_it_is_read(capsys):
    """``kernels.decode_bucket`` took any positive size (2**40 accepted by train, plan and
    bench): bounded by the longest generation a setting may ask (``limits.MAX_TOKENS``)."""
    from emit_jax import cli, configs
    from emit_jax.plan.command import main
    from emit_jax.errors import ConfigError
    from emit_jax.limits import MAX_TOKENS
    from emit_jax.ops.kernels import KernelOptions
    from emit_jax.training.validate import validate_config

    big = MAX_TOKENS + 1
    with pytest.raises(ConfigError) as e:
        KernelOptions("einsum", "bucketed", big)
    assert str(e.value) == f"kernels.decode_bucket must be in [1, {MAX_TOKENS}], got {big}"
    KernelOptions("einsum", "bucketed", MAX_TOKENS)  # the bound itself is fine
    with pytest.raises(ConfigError) as e:
        validate_config(configs.load("configs/grpo.py:smoke", [f"kernels.decode_bucket={big}"]))
    assert str(e.value) == f"config kernels.decode_bucket: {big} is above {MAX_TOKENS}"
    assert cli.run(main, ["--config", "configs/grpo.py:smoke", "--set",
                          f"kernels.decode_bucket={big}"], prog="emit_jax.plan") == 2
    assert capsys.readouterr().err.strip() == (
        f"emit_jax.plan: error: config kernels.decode_bucket: {big} is above {MAX_TOKENS}")


@pytest.mark.parametrize("module", ["emit_jax.train", "emit_jax.plan", "emit_jax.aot"])
def test_a_param_dtype_no_model_takes_is_one_line(tmp_path, module):
    """T11: ``--config.param_dtype=float64`` (or ``nosuch``) ended in a 30-line ValueError
    traceback, exit 1, in train, plan and aot: the model's config was built (to check the
    context) before the dtype was checked."""
    import subprocess
    import sys

    from conftest import ROOT

    args = {"emit_jax.train": ["--workdir", str(tmp_path / "w"), "--config.param_dtype=float64"],
            "emit_jax.plan": ["--set", "param_dtype=float64"],
            "emit_jax.aot": ["--topology", "v5e:2x2", "--set", "param_dtype=float64"]}[module]
    r = subprocess.run([sys.executable, "-m", module, "--config", "configs/grpo.py:smoke", *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [
        f"{module}: error: config param_dtype: 'float64' is not one of ('float32', 'bfloat16', "
        "'float16') (or '' for the stored dtypes)"], r.stderr[-2000:]
    assert not (tmp_path / "w").exists()


def test_an_unsupported_dtype_name_is_a_config_error():
    from emit_jax.errors import ConfigError
    from emit_jax.models.config import dtype_from_name

    with pytest.raises(ConfigError, match="unsupported dtype 'float64'"):
        dtype_from_name("float64")


@pytest.mark.parametrize("raw, want", [
    ("grpo", ("grpo",)), ("base,sft", ("base", "sft")), ("warmup, base,", ("warmup", "base")),
    ("'grpo'", ("grpo",)), ("('base','sft')", ("base", "sft")),
])
def test_a_tuple_of_names_may_be_spelled_bare(raw, want):
    """T2: ``--config.stages=grpo``, the spelling docs/reliability.md gives, was refused as
    "expected a tuple value": a bare word is no Python literal. Tuples of names take bare
    words, comma-separated; tuples of numbers keep the literal form."""
    from emit_jax import configs
    from emit_jax.errors import ConfigError

    assert configs.load("configs/grpo.py:smoke", [f"stages={raw}"]).stages == want
    for bad in ("data.length_buckets=8,x", "stages=(grpo", "stages=a b"):
        with pytest.raises(ConfigError, match="expected a tuple value"):
            configs.load("configs/grpo.py:smoke", [bad])


def test_a_continued_stage_replaces_the_stale_export(tmp_path):
    """RR9: continuing a finished run with more steps trained them, wrote the new stage model
    and results.json, and left ``WORKDIR/hf`` as the earlier run's model without a word (70
    of 168 tensors differed from the model the run ended with)."""
    import json

    import numpy as np
    from flax import nnx

    from emit_jax import checkpoint, hf

    cache = tmp_path / "cache"  # the embedded dataset, made once for the three runs
    d = tmp_path / "w"
    common = ["--config", "configs/grpo.py:smoke", "--workdir", str(d),
              "--config.stages=('warmup',)"]
    env = {"EMIT_JAX_CACHE": str(cache)}
    r = train(*common, "--config.warmup.steps=2", "--config.eval_limit=2", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"[export] {d}/hf\n" in r.stderr
    first = json.loads((d / "results.json").read_text())
    assert first["export"] == {"stage": "warmup", "steps": 2}
    # nothing new: the export stays; and (EV0) a rerun that evaluates nothing keeps the
    # earlier evaluation in results.json (before: rewritten without it)
    common.append("--config.eval_limit=0")
    r = train(*common, "--config.warmup.steps=2", env=env)
    assert r.returncode == 0 and "[export]" not in r.stderr, r.stderr[-3000:]
    assert (f"note: this run evaluated nothing; {d}/results.json keeps the held-out results of "
            "the run before") in r.stderr
    kept = json.loads((d / "results.json").read_text())
    assert kept["test_average"] == first["test_average"] and kept["answers"] == first["answers"]
    # sixteenth probe U1: the warning said "its evaluation replaces results.json", the note
    # that results.json keeps the earlier one; and the file named only this run's eval_limit 0
    assert ("eval_limit 2 -> 0; the finished stage warmup is kept as trained (not retrained for "
            "these); this run continues with the new values (it evaluates nothing)") in r.stderr
    assert kept["config"]["eval_limit"] == 0 and kept["evaluation_config"]["eval_limit"] == 2
    r = train(*common, "--config.warmup.steps=3", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (f"[export] {d}/hf (warmup after 3 steps; it held warmup after 2 steps)"
            in r.stderr), r.stderr[-3000:]
    assert json.loads((d / "results.json").read_text())["export"] == {"stage": "warmup",
                                                                     "steps": 3}
    assert sorted(n for n in os.listdir(d) if n.startswith(".")) == [".lock"]  # no leftovers
    # RR7: checkpoints after the finished model (a continuation that did not finish) are said
    (d / "warmup" / "ckpt" / "9").mkdir()
    import shutil

    shutil.rmtree(d / "hf")  # (sixteenth probe S2: an emptied hf/ was left empty)
    (d / "hf").mkdir()
    r = train(*common, "--config.warmup.steps=3", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"[export] {d}/hf\n" in r.stderr and (d / "hf" / "config.json").is_file()
    assert ("note: warmup also holds checkpoints after its finished model (step 9, from a "
            "continuation that did not finish); --config.warmup.steps=9 or more continues from "
            "them") in r.stderr, r.stderr[-3000:]
    (d / "warmup" / "ckpt" / "9").rmdir()
    got = nnx.to_flat_state(nnx.state(hf.load(d / "hf"), nnx.Param))
    want = nnx.to_flat_state(nnx.state(checkpoint.load_model(d / "warmup" / "model")[0],
                                       nnx.Param))
    assert len(got) == len(want)
    for (k, a), (k2, b) in zip(sorted(got, key=lambda kv: kv[0]), sorted(want, key=lambda kv: kv[0])):
        assert k == k2 and np.array_equal(np.asarray(a.value), np.asarray(b.value)), k


@pytest.mark.parametrize("manifest", [None, "{}", '{"dataset": "MVTec AD"}', "not json"])
def test_overwrite_never_replaces_a_users_own_dataset(tmp_path, manifest):
    """X3 (data lost): ``data.embedded --out MY_MVTEC_DATASET --overwrite`` replaced the user's
    real ``pill/train/good/000.png`` and ``pill/test/crack/000.png`` with synthetic images (the
    generator's classes and numbering are MVTec AD's) and added a splits.json that then
    governed the real classes, exit 0. Only a folder an earlier generation wrote (its
    manifest.json) is overwritten."""
    import shutil
    import subprocess
    import sys

    from conftest import ROOT

    pills = os.path.join(os.path.dirname(ROOT), "shared", "data")
    real = next((os.path.join(r, f) for r, _, fs in os.walk(pills) for f in sorted(fs)
                 if f.endswith(".png")), None)
    out = tmp_path / "mvtec"
    for rel in ("pill/train/good/000.png", "pill/test/crack/000.png"):
        os.makedirs(out / os.path.dirname(rel), exist_ok=True)
        if real:
            shutil.copy(real, out / rel)
        else:
            (out / rel).write_bytes(b"\x89PNG a real image")
    if manifest is not None:
        (out / "manifest.json").write_text(manifest)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    r = subprocess.run([sys.executable, "-m", "emit_jax.data.embedded", "--out", str(out),
                        "--overwrite"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"emit_jax.data.embedded: error: {out}: not a dataset data.embedded wrote (no "
        "manifest.json of its own); --overwrite replaces only an earlier embedded dataset's "
        "files: choose an empty or new folder"]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(os.listdir(tmp_path)) == ["mvtec"]  # no temporaries


def test_pointer_words_beyond_the_tokenizer_is_one_line(capsys):
    """FP4: ``experiments.pointer --words 400`` ended in a 20-line ValueError traceback, exit 1
    (its message right, its class not a user error)."""
    from emit_jax import cli
    from emit_jax.experiments.pointer import main

    assert cli.run(main, ["--steps", "1", "--words", "100000"],
                   prog="python -m emit_jax.experiments.pointer") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "python -m emit_jax.experiments.pointer: error: --words 100000: needs 200000 "
        "single-token words; the tokenizer has "), err


def test_restart_trains_a_stage_asked_for_fewer_steps_as_the_warning_promises(tmp_path):
    """RS1: on a workdir whose grpo finished 5 steps, ``--config.restart=True`` with
    ``grpo.steps=2`` said "[restart] ... nothing to restart", then warned that the finished
    stage kept its 5 steps and told the user to add ``--config.restart=True``, given already.
    Under restart, fewer steps than a finished stage trained is a change that trains it again;
    without restart it stays a warning (more steps continue a stage)."""
    import json

    from emit_jax import configs
    from emit_jax.training import stages

    cfg = configs.load("configs/grpo.py:smoke", ["grpo.steps=2"])
    d = tmp_path / "w"
    (d / "grpo").mkdir(parents=True)
    stages.save_settings(cfg, str(d), "grpo")
    (d / "grpo" / "done.json").write_text(json.dumps({"steps": 5}))
    assert stages.changed_settings(cfg, str(d)) == {}
    assert stages.changed_settings(cfg, str(d), sections=True) == {
        "grpo": [("grpo.steps", 5, 2)]}
    more = configs.load("configs/grpo.py:smoke", ["grpo.steps=7"])  # continues: no change
    assert stages.changed_settings(more, str(d), sections=True) == {}
    restart = configs.load("configs/grpo.py:smoke", ["grpo.steps=2", "restart=True"])
    stages.check_settings(restart, str(d))
    assert not (d / "grpo").exists()  # moved aside, to be trained again
    (aside,) = [p for p in d.iterdir() if p.name.startswith("replaced-")]
    assert json.loads((aside / "grpo" / "done.json").read_text()) == {"steps": 5}


def test_a_tables_stored_row_answers_only_for_its_own_settings(tmp_path, capsys):
    """TB2 / AC1: ``table1 --set base.steps=3 --set base.lr=0.5`` on a workdir holding the
    1-step table ran nothing (2 s) and reported the 1-step results under the new overrides;
    adfm_compare likewise (``--smoke`` or not). A stored row now answers only when it was made
    with the same resolved config; otherwise a note names what changed and the row runs."""
    import json

    from emit_jax import configs
    from emit_jax.experiments.table1 import cached_row, train_row
    from emit_jax.errors import ConfigError
    from emit_jax.training.stages import config_json

    one = config_json(configs.load("configs/grpo.py:smoke", ["base.steps=1"]))
    three = config_json(configs.load("configs/grpo.py:smoke", ["base.steps=3", "base.lr=0.5"]))
    cached = tmp_path / "table1_warmup_base.json"
    assert cached_row(str(cached), one) is None and capsys.readouterr().err == ""  # none yet
    cached.write_text(json.dumps({"row": "base model", "average": 40.0, "config": one}))
    assert cached_row(str(cached), one)["average"] == 40.0
    assert cached_row(str(cached), three) is None
    assert capsys.readouterr().err.strip() == (
        f"note: {cached}: made with other settings: base.lr 0.002 -> 0.5, base.steps 1 -> 3; "
        "running the row again")
    cached.write_text(json.dumps({"row": "base model", "average": 40.0}))  # an older table's
    assert cached_row(str(cached), one) is None
    assert "no settings recorded; running the row again" in capsys.readouterr().err
    # train's advice in the experiments' spelling (TB3)
    wd = tmp_path / "w"
    (wd / "base").mkdir(parents=True)
    from emit_jax.training import stages

    stages.save_settings(configs.load("configs/grpo.py:smoke", ["arch=tiny"]), str(wd), "base")
    (wd / "base" / "done.json").write_text(json.dumps({"steps": 1}))
    other = configs.load("configs/grpo.py:smoke", ["base.train_vision=True",
                                                   "stages=('base',)"])
    with pytest.raises(ConfigError) as e:
        train_row(other, str(wd))
    assert "add --set restart=True" in str(e.value) and "--config." not in str(e.value)


def test_fresh_images_is_one_writer_of_its_workdir(tmp_path, capsys):
    """FI2: with the workdir's lock held (a trainer running there), fresh_images ran to the end
    and wrote its folders (and the workdir's data/ and tokenizer/) beside it, exit 0."""
    from emit_jax import cli
    from emit_jax.experiments.fresh_images import main
    from emit_jax.training import stages

    wd = tmp_path / "w"
    wd.mkdir()
    with stages.workdir_lock(str(wd)):
        assert cli.run(lambda argv: (main(argv), 0)[1],
                       ["--workdir", str(wd), "--config", "configs/grpo.py:smoke", "--stage",
                        "base", "--seeds", "0", "--steps", "1", "--ad-order", "yes_no"],
                       prog="python -m emit_jax.experiments.fresh_images") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"python -m emit_jax.experiments.fresh_images: error: {wd}: in use "
                              f"by another trainer (pid {os.getpid()} on "), err
    assert sorted(os.listdir(wd)) == [".lock"]  # nothing written


def test_non_finite_figures_are_written_as_json_null(tmp_path):
    """HA1 / NF1: an AUROC over a split with no anomalous image (heatmap_auroc --json), and a
    skipped non-finite step's loss (results.json, done.json), were written as bare ``NaN``,
    which is not JSON (strict readers, jq and JavaScript refuse the file)."""
    import json

    import numpy as np

    from emit_jax.fileio import finite_json
    from emit_jax.experiments.heatmap_auroc import auroc

    out = {"auroc_max": auroc([0.1, 0.2], [0, 0]), "loss": float("inf"),
           "x": [np.float32("nan"), np.float64(2.5), 3, "nan", None, (float("-inf"), 1.0)]}
    assert out["auroc_max"] != out["auroc_max"]  # undefined: no anomalous image
    text = json.dumps(finite_json(out), allow_nan=False)  # raises on any NaN left
    assert json.loads(text) == {"auroc_max": None, "loss": None,
                                "x": [None, 2.5, 3, "nan", None, [None, 1.0]]}


def test_a_training_checkpoint_read_as_a_model_names_the_stages_model(tmp_path):
    """E8 / IF1: ``evaluate --checkpoint W/grpo/ckpt/5`` (or ``init_from``) said only "not an
    emit_jax model checkpoint", where a stage folder and a workdir name their models."""
    from emit_jax import checkpoint
    from emit_jax.errors import CheckpointError

    step = tmp_path / "w" / "grpo" / "ckpt" / "5"
    step.mkdir(parents=True)
    with pytest.raises(CheckpointError) as e:
        checkpoint.read_meta(step)
    model = tmp_path / "w" / "grpo" / "model"
    assert str(e.value).endswith(
        f"{step} is not an emit_jax model checkpoint but a training checkpoint of stage grpo "
        f"(step 5), which has not finished: rerun the training command to finish it (its model "
        f"is then {model})")
    model.mkdir()
    (model / "emit_jax.json").write_text("{}")
    with pytest.raises(CheckpointError) as e:
        checkpoint.read_meta(str(step) + "/")
    assert str(e.value).endswith(
        f"but a training checkpoint of stage grpo (step 5): its model is {model}")
    other = tmp_path / "ckpt" / "5"  # a folder named ckpt outside a stage: no such hint
    other.mkdir(parents=True)
    with pytest.raises(CheckpointError) as e:
        checkpoint.read_meta(other)
    assert str(e.value).endswith(f"{other} is not an emit_jax model checkpoint")


@pytest.mark.parametrize("module", ["emit_jax.plan", "emit_jax.aot"])
@pytest.mark.parametrize("stages, line", [
    ("('grpo','grpo')", "config stages: ('grpo', 'grpo') repeats a stage"),
    ("('grpo','warmup')", "config stages: ('grpo', 'warmup') is out of order: each stage builds "
                          "on the one before, in the order warmup, base, sft, sft2, grpo"),
])
def test_plan_and_aot_take_the_stage_lists_train_takes(module, stages, line, capsys):
    """A stage list train refuses (a stage twice, out of order) was planned and compiled with
    exit 0."""
    import importlib

    from emit_jax import cli

    main = importlib.import_module(module + ".command").main
    extra = ["--topology", "v5e:2x2"] if module == "emit_jax.aot" else []
    assert cli.run(main, [*extra, "--config", "configs/grpo.py:smoke", "--set",
                          f"stages={stages}"], prog=module) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"{module}: error: {line}"]


def test_convert_of_an_emit_jax_checkpoint_says_it_is_one(tmp_path, capsys):
    """C6: ``convert --hf W/grpo/model`` (already converted) said only that config.json was not
    found, "expected a Hugging Face model folder"."""
    from emit_jax import cli
    from emit_jax.convert import main

    ckpt = tmp_path / "model"
    ckpt.mkdir()
    (ckpt / "emit_jax.json").write_text("{}")
    assert cli.run(main, ["--hf", str(ckpt), "--out", str(tmp_path / "out")],
                   prog="emit_jax.convert") == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"emit_jax.convert: error: {ckpt}: already an emit_jax model checkpoint, which evaluate, "
        "visualize and --config.init_from read as it is; for a Hugging Face folder, python -m "
        f"emit_jax.export --checkpoint {ckpt} --out DIR"]
    assert not (tmp_path / "out").exists()


def test_a_mask_no_image_uses_is_noted(tmp_path):
    """B12: a mask with no image (``ground_truth/dent/007_mask.png``, no ``test/dent/007.png``:
    usually a missing or misnamed test image) was ignored without a word, exit 0."""
    import shutil
    import subprocess
    import sys

    from conftest import ROOT
    from test_tasks import make_mvtec

    from emit_jax.data import mvtec

    src = make_mvtec(tmp_path / "ds")
    report = mvtec.Report()
    mvtec.scan(src, report=report)
    assert report.stray_note() is None  # every mask has its image
    stray = os.path.join(src, "widget", "ground_truth", "dent", "007_mask.png")
    shutil.copy(os.path.join(src, "widget", "ground_truth", "dent", "000_mask.png"), stray)
    os.rename(os.path.join(src, "bolt", "test", "smear", "001.png"),
              os.path.join(src, "bolt", "test", "smear", "001.PNG.bak"))  # misnamed
    r = subprocess.run([sys.executable, "-m", "emit_jax.data.build", "--source", src, "--out",
                        str(tmp_path / "s1.jsonl"), "--stage", "1"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    notes = [l for l in r.stderr.splitlines() if "belong to no image" in l]
    assert notes == [
        "note: 2 mask(s) in ground_truth/ belong to no image (a missing or misnamed test "
        f"image?) and are not used (first: {os.path.join(src, 'bolt', 'ground_truth', 'smear', '001_mask.png')})"
    ], r.stderr


def test_the_embedded_dataset_is_never_written_inside_another(tmp_path):
    """X8: ``data.embedded --out DATASET/bottle`` wrote a whole dataset as one more class
    folder of an existing embedded dataset, exit 0."""
    from emit_jax.data.embedded.writer import check_not_inside_a_dataset
    from emit_jax.errors import DataError

    outer = tmp_path / "e1"
    outer.mkdir()
    (outer / "manifest.json").write_text('{"dataset": "Embedded"}')
    for inner in (outer / "bottle", outer / "pill" / "x"):
        with pytest.raises(DataError) as e:
            check_not_inside_a_dataset(str(inner))
        assert str(e.value) == (f"{inner}: inside the embedded dataset {outer}; choose a folder "
                                "outside it")
        assert not inner.exists()


def test_plan_of_a_stage_the_config_does_not_run_is_noted(capsys):
    """PL6: ``plan --stage sft2`` on a config without sft2 planned it without a word."""
    from emit_jax import cli
    from emit_jax.plan.command import main

    assert cli.run(main, ["--config", "configs/grpo.py:smoke", "--stage", "sft2"],
                   prog="emit_jax.plan") == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["note: --stage sft2: not among the config's stages (warmup, base, sft, grpo); "
                   "planned as if it ran"]
    assert cli.run(main, ["--config", "configs/grpo.py:smoke", "--stage", "grpo"],
                   prog="emit_jax.plan") == 0
    assert capsys.readouterr().err == ""
    # sixteenth probe U5: an unknown stage drew the note, then the error
    assert cli.run(main, ["--config", "configs/grpo.py:smoke", "--stage", "nosuch"],
                   prog="emit_jax.plan") == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "emit_jax.plan: error: unknown stage 'nosuch'; known: warmup, base, sft, sft2, grpo"]


def test_the_workdirs_output_names_are_checked_before_the_run(tmp_path, capsys):
    """WF1 / WF2: ``WORKDIR/results.json`` a link to a user's file (or ``curves.png`` a folder)
    was found only as the run ended, after its evaluation, with "choose another path", which
    no flag allows. Checked up front now, with what to do."""
    from emit_jax import train
    from emit_jax.errors import ConfigError

    wd = tmp_path / "w"
    wd.mkdir()
    (tmp_path / "mine.txt").write_text("mine")
    train.check_workdir_outputs(str(wd))  # nothing there: fine
    os.symlink(tmp_path / "mine.txt", wd / "results.json")
    with pytest.raises(ConfigError) as e:
        train.check_workdir_outputs(str(wd))
    assert str(e.value) == (f"{wd}/results.json: a symbolic link, where the run writes its "
                            "results.json (replacing what is there); move it out of the workdir")
    os.remove(wd / "results.json")
    (wd / "curves.png").mkdir()
    (wd / "hf").write_text("x")
    with pytest.raises(ConfigError, match="curves.png: a folder, where the run writes"):
        train.check_workdir_outputs(str(wd))
    (wd / "curves.png").rmdir()
    with pytest.raises(ConfigError, match="hf: a file, where the run writes its export"):
        train.check_workdir_outputs(str(wd))
    # sixteenth probe S2: an hf/ that is not an export was kept silently as if it were
    (wd / "hf").unlink()
    (wd / "hf").mkdir()
    train.check_workdir_outputs(str(wd))  # empty: the run exports into it
    (wd / "hf" / "mine.txt").write_text("x")
    with pytest.raises(ConfigError) as e:
        train.check_workdir_outputs(str(wd))
    assert str(e.value) == (f"{wd}/hf: a folder that is not the run's export (no config.json), "
                            "where the run writes its export; move it out of the workdir")
    assert (tmp_path / "mine.txt").read_text() == "mine"


@pytest.mark.parametrize("ext", ["png", "pdf", "svg"])
def test_visualize_replaces_only_its_own_figure(tmp_path, capsys, ext):
    """Sixteenth probe D2: ``visualize heatmap --out EXISTING.png`` replaced the file without
    a word; then (twenty-second probe V14) with a note, a user's photo too. A figure it wrote
    (its metadata names the command) is replaced, with the note; any other file is refused."""
    from PIL import Image

    from emit_jax import cli
    from emit_jax.visualize import main

    q, r, out = tmp_path / "q.png", tmp_path / "r.png", tmp_path / f"old.{ext}"
    Image.new("RGB", (64, 64), (200, 180, 160)).save(q)
    Image.new("RGB", (64, 64), (190, 180, 160)).save(r)
    if ext == "png":
        Image.new("RGB", (8, 8), (0, 0, 0)).save(out)  # the user's photo
    else:
        out.write_bytes(b"%PDF-1.4 a user's document" if ext == "pdf" else b"<svg/>")
    before = out.read_bytes()
    args = ["heatmap", "--query", str(q), "--reference", str(r), "--out", str(out),
            "--arch", "tiny"]
    assert cli.run(main, args, prog="emit_jax.visualize") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"emit_jax.visualize: error: --out {out}: exists and is not a figure of "
                   "emit_jax.visualize (it replaces only its own); choose another --out, or "
                   "remove the file first"], err
    assert out.read_bytes() == before
    out.unlink()
    assert cli.run(main, args, prog="emit_jax.visualize") == 0  # its own figure
    first = out.read_bytes()
    capsys.readouterr()
    assert cli.run(main, args, prog="emit_jax.visualize") == 0  # ... is replaced
    err = capsys.readouterr().err.strip().splitlines()
    assert f"note: --out {out} exists; it is replaced when the figure is drawn" in err, err
    assert out.stat().st_size > 1000 and len(first) > 1000
    if ext == "png":
        with Image.open(out) as im:
            assert im.size[0] > 8


def test_the_embedded_dataset_is_never_written_inside_a_workdir(tmp_path):
    """Sixteenth probe U3: ``data.embedded --out WORKDIR/x`` wrote a dataset into a training
    workdir (one a trainer was writing), exit 0."""
    from emit_jax.data.embedded.writer import check_not_inside_a_dataset
    from emit_jax.errors import DataError

    wd = tmp_path / "w"
    (wd / "base").mkdir(parents=True)
    (wd / "base" / "done.json").write_text('{"steps": 1}')
    with pytest.raises(DataError) as e:
        check_not_inside_a_dataset(str(wd / "x"))
    assert str(e.value) == (f"{wd / 'x'}: inside the training workdir {wd} (it holds "
                            "base/done.json); choose a folder outside it")
    assert not (wd / "x").exists()


def test_convert_of_a_training_checkpoint_names_the_stages_model(tmp_path, capsys):
    """Sixteenth probe R12b: ``convert --hf W/grpo/ckpt/2`` said only that config.json was not
    found, where evaluate and export name the stage's model."""
    from emit_jax import cli
    from emit_jax.convert import main

    step = tmp_path / "w" / "grpo" / "ckpt" / "2"
    step.mkdir(parents=True)
    model = tmp_path / "w" / "grpo" / "model"
    model.mkdir()
    (model / "emit_jax.json").write_text("{}")
    assert cli.run(main, ["--hf", str(step), "--out", str(tmp_path / "out")],
                   prog="emit_jax.convert") == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"emit_jax.convert: error: {step}: not a Hugging Face model folder but a training "
        f"checkpoint of stage grpo (step 2): its model is {model} (an emit_jax checkpoint: no "
        "conversion needed)"]


def test_aot_replaces_only_its_own_report(tmp_path, capsys):
    """Sixteenth probe D3: ``aot --json_out RESULTS.json`` (an evaluate result) replaced it with
    the report without a word."""
    from emit_jax import cli
    from emit_jax.aot.command import main

    mine = tmp_path / "results.json"
    mine.write_text('{"results": 1}')
    assert cli.run(main, ["--topology", "v5e:2x2", "--config", "configs/grpo.py:smoke",
                          "--json_out", str(mine)], prog="emit_jax.aot") == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"emit_jax.aot: error: --json_out {mine}: exists and is not an aot report; aot replaces "
        "only its own report: choose another path, or move the file away"]
    assert mine.read_text() == '{"results": 1}'
    # seventeenth probe AO3: an empty --json_out compiled, wrote nothing and said nothing
    assert cli.run(main, ["--topology", "v5e:2x2", "--config", "configs/grpo.py:smoke",
                          "--json_out", ""], prog="emit_jax.aot") == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "emit_jax.aot: error: --json_out: empty path (an unset shell variable?); name the file "
        "to write"]


@pytest.mark.parametrize("module, name", [("table1", "table1"), ("adfm_compare", "adfm_compare")])
def test_a_table_never_trains_into_a_users_folder(tmp_path, capsys, module, name):
    """Sixteenth probe S3: ``table1 --workdir MY_DATASET`` trained inside the dataset for ten
    minutes, leaving 49 MB of checkpoints in it (train refuses such a folder)."""
    import importlib

    from emit_jax import cli

    ds = tmp_path / "pill1"
    (ds / "pill" / "train" / "good").mkdir(parents=True)
    main = importlib.import_module(f"emit_jax.experiments.{module}").main
    prog = f"python -m emit_jax.experiments.{module}"
    assert cli.run(main, ["--workdir", str(ds), "--seeds", "1"], prog=prog) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"{prog}: error: --workdir {ds}: not empty and holds no {name} run (no seed<N>/ or "
        f"{name}.json in it); choose a new or empty folder"]
    assert sorted(os.listdir(ds)) == ["pill"]


def test_the_structure_tool_names_a_file_it_cannot_parse(tmp_path):
    """Seventeenth probe ST1-ST4: ``tools/structure.py`` on a tree holding a file with a syntax
    error, one not UTF-8, a dangling link or a folder named ``*.py`` ended in a traceback (the
    syntax error's naming ``<unknown>``)."""
    import shutil
    import subprocess
    import sys

    from conftest import ROOT

    (tmp_path / "tools").mkdir()
    shutil.copy(os.path.join(ROOT, "tools", "structure.py"), tmp_path / "tools")
    (tmp_path / "README.md").write_text("x\n")
    pkg = tmp_path / "emit_jax"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "weird.py").mkdir()  # a folder with a .py name: not a module, left out
    run = lambda: subprocess.run([sys.executable, str(tmp_path / "tools" / "structure.py")],  # noqa: E731
                                 capture_output=True, text=True, timeout=120)
    r = run()
    assert r.returncode == 0 and r.stdout.startswith("upward imports: 0"), r.stderr
    for name, content, why in [("scratch.py", b"def f(:\n", "line 1: invalid syntax"),
                               ("bad.py", b'x = "\xff"\n', "'utf-8' codec can't decode")]:
        (pkg / name).write_bytes(content)
        r = run()
        assert r.returncode == 1 and r.stderr.strip().splitlines() == [
            f"structure.py: error: {pkg / name}: cannot read it as Python ({why}" +
            r.stderr.strip().split(why, 1)[1]], r.stderr
        (pkg / name).unlink()


def test_text_samples_without_descriptions_is_noted(tmp_path):
    """Seventeenth probe DB7: ``data.build --text-samples`` on a dataset with no object
    description added nothing, exit 0, without a word."""
    import subprocess
    import sys

    from conftest import ROOT
    from test_tasks import make_mvtec

    src = make_mvtec(tmp_path / "ds")
    r = subprocess.run([sys.executable, "-m", "emit_jax.data.build", "--source", src, "--out",
                        str(tmp_path / "s1.jsonl"), "--stage", "1", "--text-samples"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (f"note: --text-samples: no image of {src} has an object description (a .txt beside "
            "it), so no text-as-query question was added") in r.stderr.splitlines(), r.stderr


def test_evaluate_out_named_as_a_partial_answers_file_is_refused():
    """Seventeenth probe E12: ``evaluate --out D/e1.json.partial.jsonl`` was accepted, and then
    blocked ``--out D/e1.json`` (its partial-answers file no longer evaluate's)."""
    from emit_jax.errors import ConfigError
    from emit_jax.evaluate import check_out_is_a_file

    with pytest.raises(ConfigError) as e:
        check_out_is_a_file("d/e1.json.partial.jsonl")
    assert str(e.value) == ("--out d/e1.json.partial.jsonl: the name of another --out's "
                            "partial-answers file (<out>.partial.jsonl); choose a name that "
                            "does not end so")
    check_out_is_a_file("d/e1.json")  # fine


def test_table1_checks_its_rows_and_settings_before_making_a_folder(tmp_path, capsys):
    """Seventeenth probe EX6b: ``table1 --rows "+ GRPO,+ GRPO"`` was accepted, and ``--set
    grpo.steps=0`` was refused only after ``seed0/grpo_plain/`` had been made."""
    from emit_jax import cli
    from emit_jax.experiments.table1 import main

    prog = "python -m emit_jax.experiments.table1"
    wd = tmp_path / "t1"
    assert cli.run(main, ["--rows", "+ GRPO,+ GRPO", "--workdir", str(wd), "--seeds", "1"],
                   prog=prog) == 2
    assert capsys.readouterr().err.strip() == f"{prog}: error: --rows: '+ GRPO' named twice"
    assert cli.run(main, ["--rows", "+ GRPO", "--workdir", str(wd), "--seeds", "1", "--set",
                          "grpo.steps=0"], prog=prog) == 2
    assert capsys.readouterr().err.strip() == f"{prog}: error: config grpo.steps: 0 is below 1"
    assert not wd.exists()


def test_fresh_images_says_seeds_0_and_the_base_stage_it_trains_first(tmp_path, capsys):
    """Twentieth probe C95: ``--seeds 0`` on a workdir without a base model started a base
    training and then a run on no fresh data, neither said. (The workdir's lock, held here,
    stops it once both notes are out.)"""
    from emit_jax import cli
    from emit_jax.experiments.fresh_images import main
    from emit_jax.training import stages

    wd = tmp_path / "w"
    wd.mkdir()
    prog = "python -m emit_jax.experiments.fresh_images"
    with stages.workdir_lock(str(wd)):
        assert cli.run(lambda argv: (main(argv), 0)[1],
                       ["--workdir", str(wd), "--config", "configs/grpo.py:smoke", "--seeds",
                        "0", "--steps", "1"], prog=prog) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[:2] == [
        "note: --seeds 0: no fresh datasets; the run trains on the workdir's own AD questions "
        "only (a control for the fresh-image runs)",
        f"note: {wd} has no base model (base/model): a base stage is trained there first, as "
        "train would"], err
    assert err[-1].startswith(f"{prog}: error: {wd}: in use by another trainer"), err


def test_the_experiments_refuse_a_users_folder(tmp_path, capsys):
    """Twenty-fourth probe FI1 / TB1 (data lost): ``fresh_images --stage base`` trained into a
    user's folder (its data/test.jsonl replaced by the records), and ``table1`` took a folder
    holding the user's own table1.md for a table run (the file replaced). Both refuse it now,
    before any work; a real table run's folder is still theirs."""
    import json

    from emit_jax import cli
    from emit_jax.experiments.fresh_images import main as fresh
    from emit_jax.experiments.table1 import check_table_folder
    from emit_jax.errors import ConfigError

    uf = tmp_path / "uf"
    (uf / "data").mkdir(parents=True)
    (uf / "data" / "test.jsonl").write_text('{"mine": 1}\n')
    prog = "python -m emit_jax.experiments.fresh_images"
    assert cli.run(lambda argv: (fresh(argv), 0)[1],
                   ["--workdir", str(uf), "--config", "configs/grpo.py:smoke", "--stage", "base",
                    "--seeds", "0", "--steps", "1", "--set", "eval_limit=2"], prog=prog) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == ("note: --set eval_limit: not used, fresh_images asks every AD question of "
                      "the test split (and --unseen N's) and exports nothing"), err
    assert err[-1].startswith(f"{prog}: error: {uf}: not a training workdir and not empty"), err
    assert sorted(os.listdir(uf)) == ["data"] and \
        (uf / "data" / "test.jsonl").read_text() == '{"mine": 1}\n'
    tb = tmp_path / "tb"
    tb.mkdir()
    (tb / "table1.md").write_text("# my table\n")
    with pytest.raises(ConfigError, match="not empty and holds no table1 run"):
        check_table_folder(str(tb), "table1")
    (tb / "seed0").mkdir()  # a folder named like a seed's, of nothing a run wrote
    with pytest.raises(ConfigError, match="not empty and holds no table1 run"):
        check_table_folder(str(tb), "table1")
    (tb / "table1.json").write_text(json.dumps({"rows": {}, "runs": []}))
    check_table_folder(str(tb), "table1")  # the table's own record
    (tb / "table1.json").unlink()
    (tb / "seed0" / "common" / "data").mkdir(parents=True)
    (tb / "seed0" / "common" / "data" / "options.json").write_text("{}")
    check_table_folder(str(tb), "table1")  # a seed folder holding a training workdir
