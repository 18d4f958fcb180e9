"""The twelfth reliability probe's cases and the leftovers of the tenth (issue 30): each failed
before its fix."""

from __future__ import annotations

import os

import pytest
from conftest import train


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_a_workdir_whose_name_ends_with_a_blank_is_noted(tmp_path):
    """SP5 (tenth probe): ``--workdir 'w '`` (a copy-paste accident) ran with its progress lines
    naming ``w /curves.png``, the blank unseen, and nothing said it."""
    source = tmp_path / "src"
    source.mkdir()  # no images: the run stops at the data, after the note
    wd = tmp_path / "w "
    r = train("--config", "configs/grpo.py:smoke", f"--config.data.source={source}",
              "--workdir", str(wd), timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    err = _lines(r.stderr)
    assert err[0] == (f"note: --workdir {str(wd)!r}: a folder name in it begins or ends with "
                      "a blank; the lines below show the path as it is"), err
    assert err[-1].startswith(f"emit_jax.train: error: {source}: no class folders"), err
    assert not wd.exists()  # a run that trained nothing leaves no workdir


def test_the_compile_cache_is_no_changed_setting(tmp_path):
    """B3w: a rerun with another ``--config.compile_cache`` (or one ``$JAX_COMPILATION_CACHE_DIR``
    overrode) was said to "continue with the new values" in the settings-changed warning: where
    compiled code is cached changes nothing trained."""
    import json

    from emit_jax import configs
    from emit_jax.training import stages

    before = configs.load("configs/grpo.py:smoke", ["compile_cache=/tmp/a"])
    (tmp_path / "results.json").write_text(json.dumps({"config": stages.config_json(before)}))
    now = configs.load("configs/grpo.py:smoke", ["compile_cache=~nosuchuser/x"])
    assert stages.run_changes(now, str(tmp_path)) == []
    seeded = configs.load("configs/grpo.py:smoke", ["compile_cache=/tmp/b", "seed=3"])
    assert stages.run_changes(seeded, str(tmp_path)) == [("seed", 0, 3)]


@pytest.mark.parametrize("key", ["base.lr", "grpo.lr", "warmup.lr"])
def test_a_learning_rate_infinite_in_float32_is_refused(key):
    """TC26: ``base.lr=1e39`` (finite in Python) trained a NaN model with exit 0: infinite in the
    float32 update, its first step counted finite; numpy's overflow line came with it."""
    from emit_jax import configs
    from emit_jax.errors import ConfigError
    from emit_jax.training.validate import validate_config

    with pytest.raises(ConfigError) as e:
        validate_config(configs.load("configs/grpo.py:smoke", [f"{key}=1e39"]))
    assert str(e.value) == (f"config {key}: 1e+39 is infinite in float32, the precision of the "
                            "update (the largest float32 is 3.4e38)")
    validate_config(configs.load("configs/grpo.py:smoke", [f"{key}=3e38"]))  # warned, not refused


def test_a_non_finite_scalar_draws_no_tensorboard_line(tmp_path):
    """TC26: each skipped non-finite step (already one warning of ours) drew tensorboardX's
    ``NaN or Inf found in input tensor`` line through absl's logging."""
    import subprocess
    import sys

    from conftest import ROOT

    code = ("import io, math\n"
            "from emit_jax.training.metrics import MetricWriter\n"
            f"w = MetricWriter({str(tmp_path)!r}, stage='base', total_steps=2, stream=io.StringIO())\n"
            "w.write(1, {'loss': math.nan}); w.write(2, {'loss': 1.0}); w.close()\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "NaN or Inf" not in r.stderr and r.stderr.strip() == "", r.stderr


@pytest.mark.parametrize("override, line", [
    ("base.batch_size=-1", "config base.batch_size: -1 is below 1"),
    ("grpo.lr=-0.5", "config grpo.lr: -0.5 must be > 0.0"),
    ("sft.micro_batch_size=3", "config sft.micro_batch_size: 3 does not divide sft.batch_size "
                               "(8 rows)"),
    # fourteenth probe PL7: a 49-line ValueError traceback; PL4: planned without a word
    ("emit.num_soft_tokens=-3", "config emit.num_soft_tokens: -3 is below 0"),
    ("kernels.attention=flash3", "config kernels.attention: 'flash3' must be one of einsum, "
                                 "dot_product, splash, auto"),
    ("mesh.fsdp=0", "config mesh: mesh axis fsdp=0: sizes are positive, or -1 for the rest"),
])
def test_plan_checks_the_stages_it_plans_as_train_does(override, line, capsys):
    """PN10: ``plan --set base.batch_size=-1`` printed a plan (the stage planned as if it had no
    activations), where train refuses the value."""
    from emit_jax import cli
    from emit_jax.plan.command import main

    assert cli.run(main, ["--config", "configs/grpo.py", "--set", override],
                   prog="emit_jax.plan") == 2
    assert _lines(capsys.readouterr().err) == [f"emit_jax.plan: error: {line}"]


def test_a_device_or_a_pipe_is_named_as_what_it_is(tmp_path):
    """CN9: ``convert --out /dev/null`` said "exists and is not empty"; TC9: ``train --config``
    naming a pipe said "config file not found"."""
    from emit_jax import configs
    from emit_jax.errors import ConfigError
    from emit_jax.fileio import check_new_folder

    with pytest.raises(FileExistsError) as e:
        check_new_folder("/dev/null", hint="choose a new checkpoint path")
    assert str(e.value) == ("/dev/null: exists and is a device, not a folder; choose a new "
                            "checkpoint path")
    fifo = tmp_path / "fifo.py"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError) as e:
        configs.load(str(fifo))  # (no hang)
    assert str(e.value) == (f"config file {fifo}: not a regular file (a pipe); name a config "
                            "file such as configs/grpo.py")


def test_a_lora_rank_no_adapted_layer_can_use_is_refused():
    """TC22: ``grpo.lora.rank=100000`` on the tiny model (layers 32-256 wide) ran its first GRPO
    step for minutes without a word."""
    import re

    from flax import nnx

    from emit_jax.errors import ConfigError
    from emit_jax.training.config import LoRAConfig
    from emit_jax.training.lora import check_rank
    from test_lora import TARGETS, small_emit

    model = small_emit()
    widest = max(min(m.kernel.shape[-2:]) for p, m in nnx.iter_modules(model)
                 if isinstance(m, nnx.Linear) and re.fullmatch(TARGETS, "/".join(map(str, p))))
    check_rank(model, LoRAConfig(rank=widest, alpha=16.0, dropout=0.0, targets=TARGETS))
    with pytest.raises(ConfigError) as e:
        check_rank(model, LoRAConfig(rank=100000, alpha=16.0, dropout=0.0, targets=TARGETS))
    assert str(e.value).startswith("config grpo.lora.rank: 100000 is above every adapted "
                                   "layer's width (the widest, "), e.value
    assert str(e.value).endswith(f"choose a rank of at most {widest} (low-rank adapters are "
                                 "usually 4-64)"), e.value


def test_evaluate_names_how_many_images_of_an_mvtec_folder_are_bad(tmp_path):
    """EV2: two bad test images of an MVTec-style folder: the line named the first the task
    builder met, and not that there were more (the MMAD path said how many)."""
    from emit_jax.errors import ImageError
    from emit_jax.evaluate import mvtec_queries
    from test_tasks import make_mvtec

    data = make_mvtec(tmp_path / "ds")
    tests = sorted(os.path.join(d, f) for d, _, fs in os.walk(data) for f in fs
                   if f.endswith(".png") and f"{os.sep}test{os.sep}" in d
                   and f"{os.sep}ground_truth" not in d)
    for path in tests[:2]:
        with open(path, "r+b") as f:
            f.truncate(60)
    with pytest.raises(ImageError) as e:
        mvtec_queries(data, False, None, None, 0, "all")
    assert str(e.value).startswith(f"{tests[0]}: ") and str(e.value).endswith(
        " images are bad; this is the first)"), e.value
    assert "(2 of the " in str(e.value), e.value


def test_a_resumed_evaluation_names_a_changed_question_flag(tmp_path):
    """EV6: ``--seed 3`` on a rerun of an MVTec-style folder's evaluation said the answers were
    made "for another question (the data or the prompt changed)"; the flag is named now. A
    file written before these flags were recorded is still read."""
    import json

    from emit_jax.errors import DataError
    from emit_jax.eval import partial

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")

    def run_settings(seed):
        return partial.settings(checkpoint=str(ckpt), think=False, max_new_tokens=8,
                                min_new_tokens=0, decoding="greedy", max_tiles=1,
                                questions={"split": None, "seed": seed,
                                           "domain_knowledge": "all", "ad_order": "shuffled"})

    path = tmp_path / "r.json.partial.jsonl"
    # one answer (a file with none holds nothing to keep: any settings start it over)
    answer = json.dumps({"id": 0, "fingerprint": "f", "response": "A"}) + "\n"
    path.write_text(json.dumps(partial.header(str(ckpt), "ds", run_settings(0))) + "\n" + answer)
    assert partial.read_all(str(path), run_settings(0), ["f"])[0] == {0: "A"}
    with pytest.raises(DataError) as e:
        partial.read_all(str(path), run_settings(3), ["f"])
    assert "its answers were made with other settings (seed 0, now 3)" in str(e.value)
    old = {k: v for k, v in run_settings(0).items() if k in partial.BASE_SETTINGS}
    path.write_text(json.dumps(partial.header(str(ckpt), "ds", old)) + "\n" + answer)
    assert partial.read_all(str(path), run_settings(3), ["f"])[0] == {0: "A"}


def test_the_default_split_is_recorded_as_the_split_it_asks(tmp_path):
    """Thirteenth probe R9c: ``--split test`` on a rerun of a run without ``--split`` (the same
    questions: test is the default where the folder has splits.json) was refused as "split
    null, now test"."""
    from emit_jax.evaluate import mvtec_split

    assert mvtec_split(str(tmp_path), None) == "all"
    (tmp_path / "splits.json").write_text("{}")
    assert mvtec_split(str(tmp_path), None) == "test" == mvtec_split(str(tmp_path), "test")
    assert mvtec_split(str(tmp_path), "validation") == "validation"


@pytest.mark.parametrize("module, args, line", [
    ("fresh_images", ["--workdir", "w", "--steps", "-1"], "argument --steps: must be >= 1, got -1"),
    ("fresh_images", ["--workdir", "w", "--lr", "nan"], "argument --lr: expected a finite number, got 'nan'"),
    ("fresh_images", ["--workdir", "w", "--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    ("heatmap_parts", ["--grid", "0"], "argument --grid: must be >= 1, got 0"),
    ("heatmap_parts", ["--dim", "-1"], "argument --dim: must be >= 1, got -1"),
    ("heatmap_parts", ["--repeats", "0"], "argument --repeats: must be >= 1, got 0"),
    ("heatmap_parts", ["--chunk-rows", "0"], "argument --chunk-rows: must be >= 1, got 0"),
    ("heatmap_auroc", ["--window", "-2"], "argument --window: must be >= 0, got -2"),
    ("heatmap_auroc", ["--arch", "nosuch"], "argument --arch: invalid choice: 'nosuch'"),
    ("heatmap_auroc", ["--layers", "0,99"], "--layers 0,99: "),
    ("heatmap_auroc", ["--layers", "a"], "--layers a: expected comma-separated ViT block "
                                         "numbers, e.g. 2,4,6"),
    ("heatmap_parts", ["--grid", "8", "--chunk-rows", "5"], "--chunk-rows 5: must divide the "
                                                            "8-row grid (--grid)"),
    ("fresh_images", ["--workdir", "w", "--set", "base.batch_size=-1"],
     "config base.batch_size: -1 is below 1"),
    ("fresh_images", ["--workdir", "w", "--batch-size", "6", "--set", "sft.micro_batch_size=4"],
     "config sft.micro_batch_size: 4 does not divide sft.batch_size (6 rows)"),
    ("pointer", ["--batch", "100000000"], "argument --batch: must be <= 65536, got 100000000"),
    ("pointer", ["--layers", "5000"], "argument --layers: must be <= 1024, got 5000"),
    ("pointer", ["--tokenizer", "/dev/null"], "/dev/null: a device, not a tokenizer folder"),
    ("adfm_compare", ["--seeds", "0"], "argument --seeds: must be >= 1, got 0"),
])
def test_the_experiments_check_their_numbers_where_they_are_read(module, args, line, capsys):
    """XP5, XP11, XP14: ``fresh_images --steps -1`` (or ``--lr nan``) started a run;
    ``heatmap_parts --grid 0`` and ``heatmap_auroc --layers 0,99`` were tracebacks."""
    import importlib

    from emit_jax import cli

    main = importlib.import_module(f"emit_jax.experiments.{module}").main
    prog = f"python -m emit_jax.experiments.{module}"
    assert cli.run(main, args, prog=prog) == 2
    err = _lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith(f"{prog}: error: {line}"), err


def test_adfm_compare_configs_and_their_keys(tmp_path, capsys):
    """Thirteenth probe A2: ``--configs FILE`` said "config file not found: FILE/adfm.py"; A8:
    every row warned "config eval_adfm_tokens: no such setting", a key it sets and train
    reads."""
    from emit_jax import cli
    from emit_jax.experiments.adfm_compare import ROWS, main, row_config
    from emit_jax.training.validate import unknown_keys

    for row in ROWS:
        assert unknown_keys(row_config(row, {}, 0)) == (), row
    f = tmp_path / "afile"
    f.write_text("")
    prog = "python -m emit_jax.experiments.adfm_compare"
    for path, what in ((f, "a file, not a folder"), (tmp_path / "none", "no such folder")):
        assert cli.run(main, ["--configs", str(path)], prog=prog) == 2
        assert _lines(capsys.readouterr().err) == [
            f"{prog}: error: --configs {path}: {what}; name the folder holding grpo.py, "
            "adfm.py and adfm_emit.py"]


def test_a_class_with_masks_but_no_images_and_a_stopping_error_say_so(tmp_path):
    """Thirteenth probe DS1: a class folder holding only ``ground_truth/`` was passed over
    without a word ("skipped": 0); DS5: under ``--policy error`` a line ended in "; skipped"
    while the run stopped."""
    from emit_jax.data.mvtec import DataError, Report, scan
    from test_tasks import make_mvtec

    data = make_mvtec(tmp_path / "ds")
    (tmp_path / "ds" / "nut" / "ground_truth" / "crack").mkdir(parents=True)
    report = Report(policy="skip")
    items = scan(data, report=report)
    assert items and report.skipped == [
        f"{tmp_path / 'ds' / 'nut'}: a class folder with ground_truth/ but no train/ or test/ "
        "image folders; skipped"]
    with pytest.raises(DataError) as e:
        scan(data)
    assert str(e.value) == (f"{tmp_path / 'ds' / 'nut'}: a class folder with ground_truth/ but "
                            "no train/ or test/ image folders")


def test_plan_refuses_a_lora_rank_train_refuses(capsys):
    """Thirteenth probe Q8: ``plan --stage grpo --set grpo.lora.rank=100000`` planned 1.66 B
    trainable parameters for a 20.6 M model, where train refuses the rank."""
    from emit_jax import cli
    from emit_jax.plan.command import main

    assert cli.run(main, ["--config", "configs/grpo.py", "--stage", "grpo", "--set",
                          "grpo.lora.rank=100000"], prog="emit_jax.plan") == 2
    err = _lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith(
        "emit_jax.plan: error: config grpo.lora.rank: 100000 is above every adapted layer's "
        "width (the widest, "), err


def test_python_m_emit_jax_lists_the_commands(capsys):
    """Thirteenth probe O1: ``python -m emit_jax --help`` was Python's "No module named
    emit_jax.__main__"."""
    import importlib

    from emit_jax.__main__ import COMMANDS, main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, _ in COMMANDS:
        assert f"python -m {name} " in out
        if "<" not in name and name != "bench":
            assert importlib.util.find_spec(name) is not None, name
    assert main(["train"]) == 2
    assert _lines(capsys.readouterr().err) == [
        "python -m emit_jax: error: 'train': python -m emit_jax takes no command; run python -m "
        "emit_jax.train (python -m emit_jax --help lists the commands)"]


def test_a_workdir_where_a_model_is_read_names_its_models(tmp_path, capsys):
    """Thirteenth probe O2: a training workdir as ``--checkpoint`` was "not an emit_jax model
    checkpoint", nothing said of WD/<stage>/model; H3: ``--arch`` / ``--seed`` beside
    ``--checkpoint`` were ignored without a word."""
    from emit_jax import checkpoint
    from emit_jax.errors import CheckpointError
    from emit_jax.experiments import warn_unused_with_checkpoint

    for stage in ("base", "sft"):
        (tmp_path / stage / "model").mkdir(parents=True)
        (tmp_path / stage / "model" / checkpoint.META_FILE).write_text("{}")
    with pytest.raises(CheckpointError) as e:
        checkpoint.read_meta(tmp_path)
    assert str(e.value).endswith(
        f"is not an emit_jax model checkpoint but a training workdir: its stages' models are "
        f"{tmp_path}/sft/model, {tmp_path}/base/model; the last trained is {tmp_path}/sft/model")
    warn_unused_with_checkpoint(["--checkpoint", "x", "--arch=small", "--seed", "3"],
                                ("--arch", "--seed"))
    warn_unused_with_checkpoint(["--checkpoint", "x"], ("--arch", "--seed"))
    assert _lines(capsys.readouterr().err) == [
        "warning: --arch, --seed: not used, the model (its architecture and weights) comes from "
        "--checkpoint"]


def test_a_stage_folder_names_its_model_and_an_empty_image_folder_is_noted(tmp_path, capsys):
    """Fourteenth probe O2b: ``--checkpoint WD/base`` (the model is WD/base/model) was only
    "not an emit_jax model checkpoint"; DS6: an empty defect folder (or a link up the tree,
    DS5c) was dropped without a word."""
    from emit_jax import checkpoint
    from emit_jax.data.mvtec import Report, scan
    from emit_jax.errors import CheckpointError
    from test_tasks import make_mvtec

    (tmp_path / "wd" / "base" / "model").mkdir(parents=True)
    (tmp_path / "wd" / "base" / "model" / checkpoint.META_FILE).write_text("{}")
    with pytest.raises(CheckpointError) as e:
        checkpoint.read_meta(tmp_path / "wd" / "base")
    assert str(e.value).endswith("but a stage folder of a training workdir: its model is "
                                 f"{tmp_path}/wd/base/model")
    data = make_mvtec(tmp_path / "ds")
    empty = tmp_path / "ds" / "bolt" / "test" / "emptydefect"
    empty.mkdir()
    report = Report()
    scan(data, report=report)
    report.say_notes()
    assert _lines(capsys.readouterr().err) == [
        f"note: 1 image folder(s) hold no image and ask no question (first: {empty})"]


def test_fresh_images_notes_a_set_of_a_stage_it_never_runs(tmp_path, capsys):
    """Fourteenth probe F2c: ``--set grpo.lora.rank=100000`` (no stage of fresh_images reads
    grpo.*) was accepted without a word."""
    from emit_jax import cli
    from emit_jax.experiments.fresh_images import main

    prog = "python -m emit_jax.experiments.fresh_images"
    assert cli.run(lambda argv: (main(argv), 0)[1],
                   ["--workdir", str(tmp_path / "w"), "--set", "grpo.lora.rank=100000",
                    "--set", "base.batch_size=-1"], prog=prog) == 2
    assert _lines(capsys.readouterr().err) == [
        "note: --set grpo.lora.rank: not used, fresh_images trains only the base and sft "
        "settings", f"{prog}: error: config base.batch_size: -1 is below 1"]


def test_the_main_job_script_never_deletes_a_folder_it_did_not_make(tmp_path):
    """Fourteenth probe TL1: ``tools/main_job.sh DIR`` ran ``rm -rf DIR`` on any folder (a
    user's results gone), and went on after a failed ``python3 -m venv``."""
    import subprocess

    from conftest import ROOT

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "results.json").write_text("keep")
    r = subprocess.run(["bash", os.path.join(ROOT, "tools", "main_job.sh"), str(victim)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and _lines(r.stderr) == [
        f"tools/main_job.sh: error: {victim}: exists and was not made by this script; choose a "
        "new folder"], r.stderr
    assert (victim / "results.json").read_text() == "keep" and r.stdout == ""


@pytest.mark.parametrize("overrides, line", [
    (["emit.num_soft_tokens=-3"], "config emit.num_soft_tokens: -3 is below 0"),
    (["emit.num_soft_tokens=0"], "config emit.num_soft_tokens: 0 with use_soft_prompt=True (a "
                                 "soft prompt of no token); set use_soft_prompt=False for none"),
    (["emit.num_soft_tokens=100000"], "config emit.num_soft_tokens: 100000 is longer than the "
                                      "longest prompt (data.length_buckets ends at 4096 tokens)"),
    (["grpo.G=100000000"], "config grpo.G: 100000000 is above 65536"),
    (["grpo.reward_names=()", "grpo.reward_weights=()"],
     "config grpo.reward_names: () is empty: no reward, so no advantage and nothing to learn"),
])
def test_emit_and_reward_settings_are_named_up_front(overrides, line):
    """Fourteenth probe EM3 (a 14-field repr named no field), EM2 / EM4 (0 or 100000 soft
    tokens ran warm-up and base first), RW5 (no reward at all was accepted)."""
    from emit_jax import configs
    from emit_jax.errors import ConfigError
    from emit_jax.training.validate import validate_config

    with pytest.raises(ConfigError) as e:
        validate_config(configs.load("configs/grpo.py:smoke", overrides))
    assert str(e.value) == line
    validate_config(configs.load("configs/grpo.py:smoke", ["emit.num_soft_tokens=0",
                                                           "emit.use_soft_prompt=False"]))


def test_a_hugging_face_folder_read_as_a_checkpoint_says_to_convert_it(tmp_path):
    """Fourteenth probe CV4 / VZ3: ``export --checkpoint HF`` (or visualize's) said only "not an
    emit_jax model checkpoint"."""
    from emit_jax import checkpoint
    from emit_jax.errors import CheckpointError

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError) as e:
        checkpoint.read_meta(tmp_path)
    assert str(e.value).endswith(f"but a Hugging Face model folder; convert it first with python "
                                 f"-m emit_jax.convert --hf {tmp_path} --out CKPT")
    (tmp_path / "config.json").unlink()  # twenty-first probe #29: an export without it
    with pytest.raises(CheckpointError) as e:
        checkpoint.read_meta(tmp_path)
    assert str(e.value).endswith("(it holds .safetensors files as a Hugging Face model folder "
                                 "does, but no config.json: restore that file, then convert the "
                                 "folder with python -m emit_jax.convert)")


@pytest.mark.parametrize("marker", ["model.safetensors", "emit_jax.json"])
def test_the_embedded_dataset_is_never_written_into_a_model_folder(tmp_path, marker):
    """Fourteenth probe DE5: ``data.embedded --out HF_EXPORT --overwrite`` wrote a dataset into
    a model folder (a training workdir was refused, a model folder was not)."""
    from emit_jax.data.embedded.writer import generate
    from emit_jax.errors import DataError

    out = tmp_path / "model"
    out.mkdir()
    (out / marker).write_bytes(b"keep")
    for overwrite in (False, True):
        with pytest.raises(DataError) as e:
            generate(str(out), 0, overwrite=overwrite)
        assert str(e.value) == (f"{out}: looks like a model folder (it holds {marker}); choose a "
                                "dataset folder")
    assert sorted(os.listdir(out)) == [marker] and (out / marker).read_bytes() == b"keep"
