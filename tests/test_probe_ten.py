"""The tenth reliability probe's cases (issue 30): each failed before its fix. (Its first
findings, the signal as a summary line prints, ``[plots]``, ``compile_cache='~nosuchuser'``, a
removed stage model and a workdir inside the embedded dataset, are in test_probe_nine.py.)
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import tempfile

from conftest import ROOT

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_tasks import make_mvtec  # noqa: E402


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _run(*args, env=None, cwd=ROOT, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, PYTHONPATH=ROOT, **(env or {})))


def test_a_utf8_name_under_a_non_utf8_file_system_encoding_names_the_cause(tmp_path):
    """N07: with ``PYTHONUTF8=0 LC_ALL=C`` Python reads file names as ASCII, and a valid UTF-8
    name (``-écrou``) was called "not valid UTF-8 (rename it)"."""
    src = make_mvtec(tmp_path / "ds", classes=("widget",))
    os.rename(os.path.join(src, "widget"), os.path.join(src, "écrou"))
    r = _run("-m", "emit_jax.data.build", "--source", src, "--out", str(tmp_path / "o.jsonl"),
             "--stage", "1", env={"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0"})
    assert r.returncode == 2
    assert _lines(r.stderr) == [
        f"emit_jax.data.build: error: {src}: name b'\\xc3\\xa9crou' cannot be read here: it is "
        "UTF-8, and Python reads file names as ascii in this environment (PYTHONUTF8=0, or the "
        "locale); run with PYTHONUTF8=1 or a UTF-8 locale"], r.stderr
    # a name that really is not UTF-8 is still said so, in any environment
    from emit_jax.errors import not_utf8

    assert not_utf8(b"\xff", "rename it") == "is not valid UTF-8 (rename it)"


def test_data_build_into_a_training_workdir_is_refused(tmp_path):
    """L03: ``--out WD/data/base.jsonl`` replaced a workdir's records with one note; the next
    run then refused them as changed."""
    src = make_mvtec(tmp_path / "ds", classes=("widget",))
    wd = tmp_path / "wd"
    (wd / "data").mkdir(parents=True)
    (wd / "data" / "options.json").write_text("{}")
    (wd / "data" / "base.jsonl").write_text("")
    for out in (wd / "data" / "base.jsonl", wd / "data" / "new.jsonl", wd / "records.jsonl"):
        r = _run("-m", "emit_jax.data.build", "--source", src, "--out", str(out), "--stage", "1")
        assert r.returncode == 2
        assert _lines(r.stderr) == [
            f"emit_jax.data.build: error: --out {out}: inside the training workdir {wd}, whose "
            "records (data/) its stages train and resume on; write the records outside it"]
    assert (wd / "data" / "base.jsonl").read_text() == ""
    # a folder that merely holds a results.json (an evaluate output) is not a workdir
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "results.json").write_text("{}")
    r = _run("-m", "emit_jax.data.build", "--source", src, "--out",
             str(tmp_path / "plain" / "r.jsonl"), "--stage", "1")
    assert r.returncode == 0, r.stderr


def test_the_demo_leaves_no_temporary_folder(tmp_path):
    """D04: every run without --workdir left its HF folder, checkpoint and re-export (231 MB)
    in the temporary folder, without a word."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    r = _run("-m", "emit_jax.demo", "--new-tokens", "2", env={"TMPDIR": str(tmp)}, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "removed at the end (--workdir DIR keeps them)" in r.stdout
    assert glob.glob(os.path.join(str(tmp), "emit_jax_demo_*")) == []
    assert tempfile.gettempdir() != str(tmp)  # (the test's own temp folder is not the demo's)


def test_bench_heatmap_grid_is_bounded_where_it_is_read():
    """B05: ``--grid 100000`` compiled for 49 s, printed JAX's two-line constants warning, and
    ended in an out-of-memory line whose advice named training settings."""
    r = _run("-m", "bench", "heatmap", "--arch", "tiny", "--grid", "100000")
    assert r.returncode == 2
    assert _lines(r.stderr) == ["python -m bench: error: argument --grid: must be <= 1024, got "
                                "100000"], r.stderr
    from emit_jax import cli

    line = cli.out_of_memory(MemoryError(), "python -m bench")
    assert "--grid" in line and "prompts_per_step" not in line


def test_a_second_ctrl_c_stops_at_once_in_one_line_and_the_rerun_resumes(tmp_path):
    """S06/S07/S08: a second SIGINT while the step's checkpoint was being written printed
    40-140 lines of Orbax's thread tracebacks (once an error naming a bare ``d``), left a
    ``<step>.orbax-checkpoint-tmp`` folder that the rerun's Orbax logged about; one after the
    interrupted line gave a traceback from jax's atexit ``clean_up``."""
    import signal
    import time

    from conftest import interruptible, subprocess_env

    wd = tmp_path / "wd"
    args = [sys.executable, "-m", "emit_jax.train", "--config", "configs/grpo.py:smoke",
            "--workdir", str(wd), "--config.stages=('base',)", "--config.base.steps=400",
            "--config.checkpoint_every=1", "--config.eval_limit=0", "--config.eval_unseen=0",
            "--config.export_hf=False"]
    p = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=subprocess_env(), preexec_fn=interruptible)
    deadline = time.time() + 400
    while time.time() < deadline and not list((wd / "base" / "ckpt").glob("[0-9]*")):
        time.sleep(0.2)  # training (and checkpointing every step)
    p.send_signal(signal.SIGINT)
    time.sleep(0.3)
    if p.poll() is None:
        p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "E1" not in err and "Exception ignored" not in err, err
    last = _lines(err)[-1]
    assert last.startswith("emit_jax.train: interrupted ("), err
    # the rerun resumes from the last complete checkpoint, removing an unfinished one with a note
    r = subprocess.run(args[:8] + ["--config.base.steps=1", *args[9:]], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, env=subprocess_env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert "atomicity.py" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not list((wd / "base" / "ckpt").glob("*orbax-checkpoint-tmp*"))


def test_cache_variables_read_a_home_as_flags_do(tmp_path):
    """T10/T11/T13: ``EMIT_JAX_CACHE='~nosuchuser/c'`` generated the dataset into
    ``./~nosuchuser/c``, ``'~/c'`` into a folder named ``~`` under ./, and
    ``EMIT_JAX_NATIVE_CACHE='~/nat'`` built the kernel there."""
    from emit_jax.data.embedded.cache import cache_path
    from emit_jax.ops import native

    r = _run("-m", "emit_jax.train", "--config", os.path.join(ROOT, "configs", "grpo.py:smoke"),
             "--workdir", str(tmp_path / "wd"), env={"EMIT_JAX_CACHE": "~nosuchuser/c"},
             cwd=tmp_path)
    assert r.returncode == 2
    assert _lines(r.stderr) == [
        "emit_jax.train: error: $EMIT_JAX_CACHE: '~nosuchuser/c': ~nosuchuser names no user of "
        "this machine (no home folder to put in its place); write ./~nosuchuser/c for a folder "
        "of that name"], r.stderr
    assert not (tmp_path / "~nosuchuser").exists() and not (tmp_path / "wd").exists()
    home = os.path.expanduser("~")
    old = {k: os.environ.get(k) for k in ("EMIT_JAX_CACHE", "EMIT_JAX_NATIVE_CACHE")}
    try:
        os.environ["EMIT_JAX_CACHE"] = "~/c"
        os.environ["EMIT_JAX_NATIVE_CACHE"] = "~/nat"
        assert cache_path().startswith(os.path.join(home, "c") + os.sep)
        assert str(native.cache_dir()) == os.path.join(home, "nat")
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_a_config_file_without_get_config_says_so(tmp_path):
    """CF2: the line named an internal module (``_emit_config__tmp_..._py``)."""
    cfg = tmp_path / "c.py"
    cfg.write_text("x = 1\n")
    r = _run("-m", "emit_jax.train", "--config", str(cfg))
    assert r.returncode == 2
    assert _lines(r.stderr) == [
        f"emit_jax.train: error: config {cfg}: defines no get_config() (a recipe is a Python "
        "file whose get_config(arg=None) returns its ConfigDict)"], r.stderr


def test_closed_standard_streams(tmp_path):
    """O01: ``plan >&-`` exited 0 having shown nothing; O02: with ``2>&-`` an error line went
    to standard output."""
    r = subprocess.run(f"{sys.executable} -m emit_jax.plan --config configs/grpo.py >&-",
                       shell=True, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert _lines(r.stderr) == [
        "emit_jax.plan: error: standard output: closed (the command was started with >&-); "
        "what it printed from there on is lost, and the command went on to the end (the files "
        "it writes are complete)"], r.stderr
    for cmd in ("-m emit_jax.data.build --source /nonexistent --out x.jsonl --stage 1",
                "-m bench heatmap --grid 0"):
        r = subprocess.run(f"{sys.executable} {cmd} 2>&-", shell=True, cwd=tmp_path,
                           capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, PYTHONPATH=ROOT))
        assert r.returncode == 2 and r.stdout == "", r.stdout


def test_a_missing_subcommand_names_the_choices():
    """Z04: "the following arguments are required: what"."""
    r = _run("-m", "emit_jax.visualize")
    assert _lines(r.stderr) == ["emit_jax.visualize: error: the following arguments are "
                                "required: {heatmap}"]
    r = _run("-m", "bench")
    assert "required: {heatmap,rollout," in r.stderr and r.returncode == 2


def test_a_compiler_in_cxx_that_is_missing_is_named(tmp_path):
    """T15: ``CXX=/nonexistent/g++`` was reported with advice about the build folder."""
    code = ("from emit_jax.ops import native\nprint(native.load())\n")
    r = _run("-c", code, env={"CXX": "/nonexistent/g++",
                              "EMIT_JAX_NATIVE_CACHE": str(tmp_path / "nat")})
    assert r.stdout.strip() == "None"
    assert _lines(r.stderr) == [
        "warning: native heat-map kernel unavailable, using the XLA strategies: "
        "$CXX=/nonexistent/g++: No such file or directory (set $CXX to a C++ compiler, or unset "
        "it to use c++, g++ or clang++; EMIT_JAX_NATIVE=0 to build none)"], r.stderr


def test_train_says_what_it_does_not_use(tmp_path):
    """U03: a dataset without splits.json asked its validation and test questions of the same
    images without a word; R04: a finished stage rerun with fewer steps was kept without a
    word (a changed learning rate got a warning); I02: ``--config.arch`` beside ``init_from``
    was ignored without a word."""
    from conftest import train

    src = make_mvtec(tmp_path / "ds")
    base = ["--config", "configs/grpo.py:smoke", "--workdir", str(tmp_path / "wd"),
            "--config.stages=('base',)", f"--config.data.source={src}",
            "--config.eval_limit=0", "--config.eval_unseen=0", "--config.export_hf=False"]
    r = train(*base, "--config.base.steps=2", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (f"note: {src} has no splits.json: the validation and the test questions are both "
            "asked of its test/ images (a splits.json holds a validation split apart)"
            in r.stderr), r.stderr
    r = train(*base, "--config.base.steps=1", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert ("warning: base is already finished and kept as trained; this run's changed "
            "settings are not used for it: base.steps 2 -> 1." in r.stderr), r.stderr
    r = train("--config", "configs/grpo.py:smoke", "--workdir", str(tmp_path / "wd2"),
              f"--config.init_from={tmp_path / 'wd' / 'base' / 'model'}", "--config.arch=small",
              "--config.stages=('base',)", "--config.base.steps=1", "--config.eval_limit=0",
              "--config.eval_unseen=0", "--config.export_hf=False", timeout=600)
    assert (f"warning: --config.arch=small: not used, the model (its architecture included) "
            f"comes from init_from {tmp_path / 'wd' / 'base' / 'model'}"
            in r.stderr), r.stderr[-3000:]
