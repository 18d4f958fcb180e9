"""Session 13's findings and the eighteenth reliability probe's cases (issue 30): each failed
before its fix."""

from __future__ import annotations

import os
import subprocess
import sys

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
