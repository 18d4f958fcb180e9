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
