"""The eighth reliability probe's cases (issue 30): each failed before its fix.

* a ``JAX_*`` variable with a value JAX refuses as it is imported
  (``JAX_DEFAULT_MATMUL_PRECISION=bogus``, ``JAX_ENABLE_X64=abc``): the import's traceback in
  every command that imports jax at the top of its module (train, plan, aot, bench);
* ``MPLBACKEND`` naming a backend Matplotlib does not know: a ``ValueError`` traceback where
  a plot is drawn (visualize, train's curves).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("command,prog", [
    (["-m", "emit_jax.train", "--config", "configs/grpo.py:smoke"], "emit_jax.train"),
    (["-m", "emit_jax.plan", "--config", "configs/grpo.py"], "emit_jax.plan"),
    (["-m", "emit_jax.aot", "--config", "configs/grpo.py:smoke"], "emit_jax.aot"),
    (["-m", "bench", "rollout"], "python -m bench"),
])
@pytest.mark.parametrize("env,value", [("JAX_DEFAULT_MATMUL_PRECISION", "bogus"),
                                       ("JAX_ENABLE_X64", "abc")])
def test_a_jax_variable_jax_refuses_is_one_line(tmp_path, command, prog, env, value):
    r = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, **{env: value}))
    assert r.returncode == 2
    assert _lines(r.stderr) == [f"{prog}: error: {env}={value}: JAX does not know that value; "
                                "unset it or give one JAX accepts"], r.stderr


def test_an_unknown_matplotlib_backend_is_not_read(tmp_path):
    out = tmp_path / "t.png"
    r = subprocess.run([sys.executable, "-c",
                        "import os\nfrom emit_jax.training.metrics import plot_table\n"
                        f"plot_table([['1', '2']], ['a', 'b'], {str(out)!r})\n"
                        "print(os.environ['MPLBACKEND'])"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, MPLBACKEND="bogus"))
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout.strip() == "bogus"  # left as the user set it
    assert out.stat().st_size > 0


def test_xla_flags_read_as_a_missing_file_is_one_line():
    """Before: XLA's fatal log line (``F1204 ... Could not open file "garbage" to read flags
    ...``), exit 1."""
    r = subprocess.run([sys.executable, "-m", "emit_jax.plan", "--config", "configs/grpo.py"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, XLA_FLAGS="garbage"))
    assert r.returncode == 2
    assert _lines(r.stderr) == [
        "emit_jax.plan: error: XLA_FLAGS=garbage: XLA reads a value that does not start with "
        "-- as the name of a file of flags, and garbage is no file; give flags as "
        "--name=value"], r.stderr


@pytest.mark.parametrize("signame,status,tail", [
    ("SIGTERM", 0, "it had finished, and what it wrote is complete"),
    ("SIGHUP", 2, "it was ending with exit status 2"),
])
def test_a_signal_as_a_command_ends_is_one_line(signame, status, tail):
    """Before: a signal after the work (``data.build`` had printed its summary, ``evaluate``
    its table) and before the process was gone killed it without a word: exit 143, 129 or 138,
    and a caller could not tell whether the outputs were complete."""
    code = ("import os, signal, time\nfrom emit_jax import cli\n"
            f"cli.finishing('emit_jax.x', {status})\n"
            f"os.kill(os.getpid(), signal.{signame})\ntime.sleep(30)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 130
    assert _lines(r.stderr) == [f"emit_jax.x: interrupted ({signame}) as it ended; {tail}"]


def test_paths_no_shell_read_are_taken_as_the_user_meant(tmp_path, monkeypatch):
    """Before: ``--workdir '~/wd'`` trained into ``./~/wd``; ``--config=~/my.py``,
    ``--checkpoint '~/x'`` were not found; ``--source LINK/../ds`` was read beside the link
    (``os.path.abspath``), a folder the user never named, where ``ls`` finds the dataset."""
    from emit_jax import cli, configs
    from emit_jax.fileio import user_path

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "target" / "ds").mkdir(parents=True)
    (tmp_path / "target" / "sub").mkdir()
    (tmp_path / "links").mkdir()
    os.symlink(tmp_path / "target" / "sub", tmp_path / "links" / "L")
    through = str(tmp_path / "links" / "L" / ".." / "ds")
    assert os.path.isdir(through) and not os.path.isdir(os.path.abspath(through))
    assert user_path("~/wd") == str(tmp_path / "home" / "wd")
    assert user_path(through) == str(tmp_path / "target" / "ds")
    assert user_path("runs/x") == "runs/x" and user_path("") == ""

    p = cli.Parser(prog="x")
    p.add_argument("--source")
    p.add_argument("--rows", default="base model")
    a = p.parse_args(["--source", through])
    assert a.source == str(tmp_path / "target" / "ds") and a.rows == "base model"

    cfg = tmp_path / "home" / "my.py"
    cfg.write_text("from emit_jax.configs.grpo import get_config  # noqa: F401\n")
    assert configs.resolve("~/my.py:smoke") == (str(cfg), "smoke")


def test_train_workdir_with_a_quoted_home_is_the_home_folder(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    from emit_jax.data.embedded import ensure_cached

    cache = os.path.dirname(ensure_cached())  # the dataset as built, not a new HOME's copy
    r = subprocess.run([sys.executable, "-m", "emit_jax.train", "--config",
                        os.path.join(ROOT, "configs", "grpo.py") + ":smoke",
                        "--workdir", "~/wd", "--config.stages=('base',)", "--config.base.steps=1",
                        "--config.eval_limit=0", "--config.eval_unseen=0",
                        "--config.export_hf=False"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, HOME=str(home),
                                                        PYTHONPATH=ROOT, EMIT_JAX_CACHE=cache))
    assert r.returncode == 0, r.stderr[-2000:]
    assert (home / "wd" / "results.json").is_file()
    assert not (tmp_path / "~").exists()


def test_a_lock_file_that_is_a_folder_a_socket_or_cannot_be_reopened_is_named(tmp_path):
    """Before: ``.<out>.lock`` a folder said ``<out>: Is a directory``, a socket ``No such
    device or address`` (of the output, which did not exist, or of the lock), an immutable
    one left by a dead run ``<out>: Operation not permitted``."""
    import socket

    from emit_jax.fileio import LockPathError, output_lock

    (tmp_path / ".a.jsonl.lock").mkdir()
    with pytest.raises(LockPathError, match=r"\.a\.jsonl\.lock: a folder where this command "
                                            r"keeps its lock file"):
        with output_lock(tmp_path / "a.jsonl", what="w", hint="h"):
            pass
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(tmp_path / ".b.jsonl.lock"))
        with pytest.raises(LockPathError, match=r"\.b\.jsonl\.lock: a socket where"):
            with output_lock(tmp_path / "b.jsonl", what="w", hint="h"):
                pass
    finally:
        s.close()
    lock = tmp_path / ".c.jsonl.lock"
    lock.write_text("")
    if subprocess.run(["chattr", "+i", str(lock)], capture_output=True).returncode != 0:
        return  # no chattr here: the first two cases stand
    try:
        with pytest.raises(LockPathError, match=r"\.c\.jsonl\.lock: Operation not permitted: "
                                                r"the lock file of an earlier run"):
            with output_lock(tmp_path / "c.jsonl", what="w", hint="h"):
                pass
    finally:
        subprocess.run(["chattr", "-i", str(lock)])


def test_a_platform_xla_flags_stop_names_xla_flags():
    """Before: ``XLA_FLAGS=--xla_force_host_platform_device_count=0`` failed the CPU platform
    and the line blamed ``JAX_PLATFORMS=cpu``, advising cpu."""
    r = subprocess.run([sys.executable, "-m", "emit_jax.demo", "--new-tokens", "1"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, JAX_PLATFORMS="cpu",
                                XLA_FLAGS="--xla_force_host_platform_device_count=0"))
    assert r.returncode == 2
    lines = _lines(r.stderr)
    assert len(lines) == 1 and lines[0].startswith(
        "emit_jax.demo: error: JAX cannot start the platform JAX_PLATFORMS=cpu names on this "
        "host (") and lines[0].endswith(
        "check XLA_FLAGS=--xla_force_host_platform_device_count=0, which it reads as it starts"), \
        lines


def test_aot_stops_within_seconds_of_a_signal_during_a_compilation():
    """Before: a SIGUSR1 (or SIGTERM) 6 s into ``aot`` ended it 35-70 s later, when XLA's
    compilation returned to Python."""
    import importlib.util
    import signal
    import time

    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("aot needs libtpu (the test extra)")
    p = subprocess.Popen([sys.executable, "-m", "emit_jax.aot", "--config",
                          "configs/grpo.py:smoke", "--topology", "v5e:2x2", "--stage", "sft"],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    time.sleep(12)  # the model is built; its programs compile
    sent = time.monotonic()
    p.send_signal(signal.SIGUSR1)
    out, err = p.communicate(timeout=300)
    waited = time.monotonic() - sent
    assert p.returncode == 130, err[-2000:]
    assert _lines(err) == ["emit_jax.aot: interrupted (SIGUSR1); nothing half-written is left"]
    assert waited < 15, waited


def test_a_resume_whose_metrics_were_emptied_says_where_the_curves_start(tmp_path):
    """Before: ``metrics.jsonl`` emptied in an interrupted workdir; the rerun resumed at step 8
    and the curves lost steps 1-7 without a word."""
    import io

    from emit_jax.training.metrics import MetricWriter

    (tmp_path / "metrics.jsonl").write_text("")
    err = io.StringIO()
    w = MetricWriter(str(tmp_path), stage="base", total_steps=10, start_step=7,
                     tensorboard=False, progress=False, stream=err)
    w.close()
    assert err.getvalue().strip() == (
        f"note: base resumes at step 8, and {tmp_path / 'metrics.jsonl'} holds no row of the "
        "steps before it (emptied or removed since): its curves start there")
    (tmp_path / "metrics.jsonl").write_text('{"stage": "base", "step": 5, "loss": 1.0}\n')
    err = io.StringIO()
    MetricWriter(str(tmp_path), stage="base", total_steps=10, start_step=7, tensorboard=False,
                 progress=False, stream=err).close()
    assert err.getvalue() == ""


def test_adfm_records_in_a_frame_too_small_for_their_boxes_are_noted(tmp_path, capsys):
    from emit_jax.data import records
    from emit_jax.data.embedded import ensure_cached

    summary = records.build(ensure_cached(), str(tmp_path / "a.jsonl"), 1, adfm_frame=1,
                            max_per_type=3)
    err = _lines(capsys.readouterr().err)
    import json

    recs = [json.loads(line) for line in open(tmp_path / "a.jsonl")]
    lost = sum(r["solution"] == "A" and not r["bbox_answer"] for r in recs)
    assert lost > 0 and err[-1] == (
        f"note: {lost} of {summary['anomalous']} anomalous images have no box in a 1 x 1 frame "
        "(their defects shrink to nothing there; the model's input size, e.g. 448, keeps them)")
    records.build(ensure_cached(), str(tmp_path / "b.jsonl"), 1, adfm_frame=448, max_per_type=3)
    assert "no box" not in capsys.readouterr().err


def test_a_checkpoint_folder_that_does_not_exist_is_said_so(tmp_path):
    """Before: ``<path>/emit_jax.json: not found; <path> is not an emit_jax model checkpoint``
    for a folder that is not there at all."""
    from emit_jax import checkpoint
    from emit_jax.errors import CheckpointError

    with pytest.raises(CheckpointError, match=rf"^{tmp_path / 'nope'}: no such folder \(an "
                                              r"emit_jax model checkpoint is a folder holding "
                                              r"emit_jax.json\)$"):
        checkpoint.read_meta(tmp_path / "nope")


@pytest.mark.parametrize("override,needle", [
    ("grpo.eps_low=1.5", "config grpo.eps_low: 1.5 must be < 1.0"),
    ("grpo.reward_weights=(0.0,0.0,0.0,0.0)", "config grpo.reward_weights: (0.0, 0.0, 0.0, "
     "0.0) are all zero: every completion would get the same reward"),
    ("grpo.weight_decay=1e30", "config grpo.weight_decay: 1e+30 must be <= 1.0"),
    ("base.weight_decay=2.0", "config base.weight_decay: 2.0 must be <= 1.0"),
])
def test_settings_that_make_training_meaningless_are_refused(override, needle):
    """Before: accepted, and the run trained (a lower clip below zero, no advantage at all, or
    every weight decayed to nothing in one step)."""
    from emit_jax import configs
    from emit_jax.errors import ConfigError
    from emit_jax.training.validate import validate_config

    cfg = configs.load(os.path.join(ROOT, "configs", "grpo.py") + ":smoke", [override])
    with pytest.raises(ConfigError) as e:
        validate_config(cfg)
    assert str(e.value).startswith(needle), str(e.value)


def test_the_prompt_room_advice_is_a_value_that_passes(tmp_path):
    """Ninth probe. Before: the scan stopped at the first prompt too long, so the advised
    ``grpo.max_new_tokens`` was refused in turn (8100 -> "at most 7,836" -> "at most 7,775")."""
    import re

    from emit_jax import configs
    from emit_jax.data.tokenizer import train_tiny_tokenizer
    from emit_jax.errors import ConfigError
    from emit_jax.training import stages

    cfg = configs.load(os.path.join(ROOT, "configs", "grpo.py") + ":smoke",
                       ["grpo.max_new_tokens=8100"])
    tok = train_tiny_tokenizer(None, tmp_path / "tok")
    user = "Image-1: <image>\\nImage-2: <image>\\nQuestion: " + "a b " * 80
    two = "Image-1: <image>\\nImage-2: <image>\\n"
    recs = {"grpo": [{"images": ["a", "b"], "messages": [{"role": "user", "content": u}]}
                     for u in (two + "Q?", user, two + "Q? " * 5)]}
    with pytest.raises(ConfigError) as e:
        stages.check_prompt_room(cfg, tok, recs)
    most = int(re.search(r"use at most ([\d,]+)", str(e.value)).group(1).replace(",", ""))
    cfg = configs.load(os.path.join(ROOT, "configs", "grpo.py") + ":smoke",
                       [f"grpo.max_new_tokens={most}"])
    stages.check_prompt_room(cfg, tok, recs)  # the advice passes
