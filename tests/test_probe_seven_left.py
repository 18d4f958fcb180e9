"""What the seventh reliability probe found that the first round of fixes left (issue 30); each
test failed before its fix.

* standard output that fails (``> /dev/full``, a pipe whose reader left): a bare ``[Errno 28] No
  space left on device`` and the command stopped there (a training's results.json, a build's
  summary); now the command finishes and ends with one line saying standard output failed;
* a weights file that may not be read said "No such file or directory";
* Matplotlib's two lines and the native kernel's logging-format line when the home folder
  cannot be written; libtpu's five lines under ``JAX_PLATFORMS=tpu`` on a host without a TPU;
* a changed ``data.source`` on a workdir with records: a warning promising the new value, then
  an error asking whether the dataset had moved;
* silent ones: an MMAD answer whose text another option repeats, a question repeated in its
  record, domain knowledge lacking a defect or giving a class twice, weights that are all NaN,
  ``bench compare --peers-dir`` without a peer, ``plan --reference`` for a plan without stage 2.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from emit_jax import cli
from emit_jax.errors import ConfigError, MMADError

from test_cli_errors import tiny_model  # noqa: F401 (a fixture)
from test_probe_seven import _hf_copy, _mmad_with

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


# ------------------------------------------------------------------------- standard output
def test_a_failing_standard_output_lets_the_command_finish_and_ends_with_one_line(
        tmp_path, monkeypatch, capsys):
    """``print`` to a full device, then a file written: before, the first print raised and the
    file was never written."""
    full = open("/dev/full", "w")
    monkeypatch.setattr(sys, "stdout", full)
    out = tmp_path / "results.json"

    def main(argv):
        print("a table " * 1000, flush=True)
        out.write_text("{}")
        print("done")
        return 0

    assert cli.run(main, [], prog="emit_jax.x") == 2
    assert out.read_text() == "{}"
    assert sys.stdout is full  # restored
    assert _lines(capsys.readouterr().err) == [
        "emit_jax.x: error: standard output: No space left on device; what it printed from "
        "there on is lost, and the command went on to the end (the files it writes are "
        "complete)"]
    full.close()


def test_data_build_into_a_full_standard_output_writes_its_file_whole(tmp_path):
    from emit_jax.data.embedded import ensure_cached

    source = ensure_cached()
    args = [sys.executable, "-m", "emit_jax.data.build", "--source", source, "--stage", "1",
            "--max-per-type", "3"]
    good = subprocess.run(args + ["--out", str(tmp_path / "a.jsonl")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert good.returncode == 0, good.stderr
    with open("/dev/full", "w") as full:
        r = subprocess.run(args + ["--out", str(tmp_path / "b.jsonl")], cwd=ROOT, stdout=full,
                           stderr=subprocess.PIPE, text=True, timeout=300)
    assert r.returncode == 2
    assert _lines(r.stderr) == [
        "emit_jax.data.build: error: standard output: No space left on device; what it printed "
        "from there on is lost, and the command went on to the end (the files it writes are "
        "complete)"]
    assert (tmp_path / "b.jsonl").read_bytes() == (tmp_path / "a.jsonl").read_bytes()


def test_train_with_a_full_standard_output_still_writes_its_results(tmp_path):
    """Before (the probe's e05): the held-out table's print failed, so results.json and the
    plots were never written."""
    wd = tmp_path / "wd"
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-m", "emit_jax.train", "--config",
                            "configs/grpo.py:smoke", "--config.stages=('base',)",
                            "--config.base.steps=1", "--config.export_hf=False",
                            "--config.eval_limit=2", "--config.eval_unseen=0",
                            "--workdir", str(wd)], cwd=ROOT, stdout=full,
                           stderr=subprocess.PIPE, text=True, timeout=400)
    assert r.returncode == 2, r.stderr[-2000:]
    assert _lines(r.stderr)[-1] == (
        "emit_jax.train: error: standard output: No space left on device; what it printed from "
        "there on is lost, and the command went on to the end (the files it writes are "
        "complete)")
    results = json.loads((wd / "results.json").read_text())
    assert "test_average" in results


# ------------------------------------------------------------------------- the environment
def test_a_weights_file_that_may_not_be_read_says_permission_denied(tmp_path, tiny_model):
    from emit_jax import hf
    from emit_jax.errors import CheckpointError

    if os.geteuid() == 0:  # root reads any file: read as nobody, from a folder it can reach
        import tempfile

        top = tempfile.mkdtemp(prefix="emit-unreadable-")
        os.chmod(top, 0o755)
        d = os.path.join(top, "hf")
        shutil.copytree(tiny_model["hf"], d)
        os.chmod(d, 0o755)
        os.chmod(os.path.join(d, "model.safetensors"), 0)
        if shutil.which("setpriv") is None:
            pytest.skip("root without setpriv: no user who cannot read the file")
        r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                            sys.executable, "-c",
                            "from emit_jax import hf\ntry:\n    hf.SafetensorsReader("
                            f"{d!r})\nexcept Exception as e:\n    print(e)"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, HOME="/nonexistent"))
        if "Permission denied" in r.stderr or "No module named" in r.stderr:
            pytest.skip(f"nobody cannot run this checkout: {r.stderr[-300:]}")
        shutil.rmtree(top)
        assert r.stdout.strip() == (f"{d}/model.safetensors: cannot be read (Permission "
                                    "denied)"), r.stdout + r.stderr
        return
    d = _hf_copy(tiny_model, tmp_path)
    os.chmod(os.path.join(d, "model.safetensors"), 0)
    with pytest.raises(CheckpointError, match=r"model.safetensors: cannot be read \(Permission "
                                              r"denied\)"):
        hf.SafetensorsReader(d)


def test_plots_with_an_unusable_config_folder_print_nothing(tmp_path):
    """Before: Matplotlib's "mkdir -p failed for path ..." and "it is highly recommended to set
    the MPLCONFIGDIR" lines (absl-formatted in train) when the home folder is read-only."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    out = tmp_path / "t.png"
    env = {k: v for k, v in os.environ.items() if k != "MPLCONFIGDIR"}
    env["XDG_CONFIG_HOME"] = str(blocker)
    r = subprocess.run([sys.executable, "-c",
                        "from emit_jax.training.metrics import plot_table\n"
                        f"plot_table([['1', '2']], ['a', 'b'], {str(out)!r})"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert out.stat().st_size > 0
    assert not any(n.startswith("emit-jax-matplotlib-") for n in os.listdir(tmp_path))


def test_the_native_kernel_without_a_build_folder_is_one_warning_line(tmp_path):
    """Before: ``WARNING:emit_jax.ops.native:native heat-map kernel unavailable, ...:
    PermissionError: [Errno 13] Permission denied: '/nonexistent'`` (Python's logging format,
    the folder's role unsaid)."""
    if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        pytest.skip("no C++ compiler: the kernel is not built at all")
    blocker = tmp_path / "file"
    blocker.write_text("")
    env = dict(os.environ, EMIT_JAX_NATIVE_CACHE=str(blocker / "native"))
    r = subprocess.run([sys.executable, "-c", "from emit_jax.ops import native\n"
                        "print(native.load())"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "None"
    lines = _lines(r.stderr)
    assert len(lines) == 1 and lines[0].startswith(
        "warning: native heat-map kernel unavailable, using the XLA strategies: "
        f"{blocker / 'native'}: Not a directory (its build folder is"), lines
    assert "$EMIT_JAX_NATIVE_CACHE" in lines[0]


def test_jax_platforms_tpu_on_a_host_without_one_is_one_line():
    """Before (with libtpu installed): five libtpu lines (``=== Source Location Trace: ===``
    ...) before the error line."""
    from jax._src import hardware_utils

    if hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0:
        pytest.skip("this host has a TPU")
    r = subprocess.run([sys.executable, "-m", "emit_jax.demo", "--new-tokens", "1"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300,
                       env={**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
                            "JAX_PLATFORMS": "tpu"})
    assert r.returncode == 2
    lines = _lines(r.stderr)
    assert len(lines) == 1 and lines[0].startswith(
        "emit_jax.demo: error: JAX_PLATFORMS=tpu: JAX cannot start that platform on this host"), \
        lines


# ------------------------------------------------------------------------- the workdir
def test_a_changed_data_source_on_a_workdir_with_records_is_one_line(tmp_path):
    from emit_jax import configs
    from emit_jax.training import stages

    cfg = configs.load(os.path.join(ROOT, "configs", "grpo.py") + ":smoke")
    wd = tmp_path / "wd"
    (wd / "data").mkdir(parents=True)
    (wd / "results.json").write_text(json.dumps({"config": stages.config_json(cfg)}))
    stages.check_data_source(cfg, str(wd))  # unchanged
    ds = tmp_path / "ds"
    ds.mkdir()
    with cfg.unlocked() if hasattr(cfg, "unlocked") else _nothing():
        cfg.data.source = str(ds)
    with pytest.raises(ConfigError, match=rf"config data.source: '{ds}', but {wd}/data holds "
                                          r"the records built from 'embedded'"):
        stages.check_data_source(cfg, str(wd))
    (wd / "results.json").write_text(json.dumps({"config": stages.config_json(cfg)}))
    cfg.data.source = str(tmp_path / "." / "ds")  # the same folder spelled another way
    stages.check_data_source(cfg, str(wd))


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


# ------------------------------------------------------------------------- silent inputs
def test_an_answer_whose_text_another_option_repeats_is_refused(tmp_path):
    from emit_jax.data.mmad import read_mmad

    def edit(q):
        q["Options"] = {"A": "Yes.", "B": " yes. "}
        q["Answer"] = "A"

    root = _mmad_with(tmp_path, edit)
    with pytest.raises(MMADError, match=r"question 0: options 'A' \(the answer\) and 'B' have "
                                        r"the same text 'Yes.': no answer can be told right"):
        read_mmad(root)


def test_a_question_repeated_in_its_record_is_noted(tmp_path, capsys):
    from emit_jax.data.mmad import load_mmad

    def edit(q):
        pass

    root = _mmad_with(tmp_path, edit)
    path = os.path.join(root, "mmad.json")
    data = json.loads(open(path).read())
    first = next(iter(data))
    conv = data[first]["conversation"]
    data[first]["conversation"] = conv + [dict(conv[0]), dict(conv[0])]
    open(path, "w").write(json.dumps(data))
    records = load_mmad(root)
    assert len(records[0].conversation) == len(conv) + 2  # still asked
    assert _lines(capsys.readouterr().err) == [
        f"note: 2 questions repeat an earlier one of the same record (same text and options), "
        f"e.g. {path}: record {first!r}: question {len(conv)} repeats question 0; each is asked "
        "and scored"]


def test_domain_knowledge_without_a_defect_or_with_a_class_twice_is_noted(tmp_path, capsys):
    from emit_jax.data import records
    from emit_jax.data.mvtec import ImageItem  # noqa: F401 (the items' type)

    path = tmp_path / "dk.json"
    path.write_text(json.dumps({"Mine": {"pill": {"good": "Round.", "crack": "A line."}},
                                "Other": {"pill": {"good": "Square."}}}))
    dk = records.load_domain_knowledge(str(path), "Mine")
    assert dk["pill"]["good"] == "Round."
    assert _lines(capsys.readouterr().err) == [
        f"note: {path}: class 'pill' is under 'Mine' and 'Other'; the entry of 'Mine' is used"]

    class It:
        def __init__(self, defect):
            self.object_type, self.defect = "pill", defect

    records.note_missing_defects(dk, [It("crack"), It(None), It("faulty_imprint"),
                                      It("faulty_imprint")], str(path))
    assert _lines(capsys.readouterr().err) == [
        f"note: {path}: no entry for defect(s) of the images (class 'pill': 'faulty_imprint'); "
        "their prompts give the class's knowledge without them"]
    records.note_missing_defects(dk, [It("crack")], str(path))
    assert capsys.readouterr().err == ""


def test_converting_weights_that_are_all_nan_warns(tmp_path, tiny_model, capsys):
    import numpy as np
    from safetensors.numpy import load_file, save_file

    from emit_jax import convert

    d = _hf_copy(tiny_model, tmp_path)
    path = os.path.join(d, "model.safetensors")
    tensors = {k: np.full_like(v, np.nan) if v.dtype.kind == "f" else v
               for k, v in load_file(path).items()}
    save_file(tensors, path)
    assert cli.run(convert.main, ["--hf", d, "--out", str(tmp_path / "out")],
                   prog="emit_jax.convert") == 0
    err = _lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith(
        f"emit_jax.convert: warning: {d}: {len(tensors)} of {len(tensors)} weight arrays hold "
        "NaN or infinite values (first: "), err
    assert cli.run(convert.main, ["--hf", tiny_model["hf"], "--out", str(tmp_path / "ok")],
                   prog="emit_jax.convert") == 0
    assert capsys.readouterr().err == ""


def test_bench_compare_peers_dir_without_a_peer_and_plan_reference_without_stage_two(capsys):
    r = subprocess.run([sys.executable, "-m", "bench", "compare", "--peers-dir", "/nonexistent"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and _lines(r.stderr) == [
        "python -m bench: error: --peers-dir /nonexistent: the peers run only with --python-hf "
        "or --python-tunix (their interpreters); give one"], r.stderr
    from emit_jax.plan.command import main

    assert main(["--config", os.path.join(ROOT, "configs", "sft.py"), "--reference",
                 "copy"]) == 2
    assert _lines(capsys.readouterr().err) == [
        "emit_jax.plan: error: --reference copy: the reference model is stage 2's (grpo, "
        "sft2); this plan covers base, sft"]
    assert main(["--config", os.path.join(ROOT, "configs", "grpo.py"), "--stage", "grpo",
                 "--reference", "copy"]) == 0


@pytest.mark.parametrize("script", ["fresh_images", "heatmap_auroc", "adfm_compare",
                                    "heatmap_parts", "eval_batch", "dl_ceiling",
                                    "zoom_crops"])
def test_the_lab_scripts_say_a_bad_flag_in_one_line(script):
    """Before: argparse's usage block then the error (two to four lines), and no handling of
    signals or of a failing standard output (they did not run under ``cli``)."""
    r = subprocess.run([sys.executable, "-m", f"emit_jax.experiments.{script}", "--bogus"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert _lines(r.stderr) == [f"python -m emit_jax.experiments.{script}: error: "
                                + ("the following arguments are required: --workdir"
                                   if script in ("fresh_images", "eval_batch") else
                                   "the following arguments are required: --checkpoint"
                                   if script == "dl_ceiling" else
                                   "unrecognized arguments: --bogus")], r.stderr
