"""The eleventh reliability probe's cases (issue 30): each failed before its fix."""

from __future__ import annotations

import os

from conftest import train
from emit_jax import cli
from test_cli_errors import tiny_model  # noqa: F401 (a fixture)

QUIET = ["--config.eval_limit=0", "--config.eval_unseen=0", "--config.export_hf=False"]


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_a_killed_conversion_leaves_nothing_for_ever(tmp_path, tiny_model, capsys):  # noqa: F811
    """K2: the ``.tmp-<name>-*`` checkpoint of a killed ``convert`` (GBs for a real model) was
    kept for ever without a word; the rerun now removes it under the output's lock, as
    data.embedded does. The same for export."""
    from emit_jax import convert, export

    for prog, main, args, name in (
            ("emit_jax.convert", convert.main, ["--hf", tiny_model["hf"]], "ckpt"),
            ("emit_jax.export", export.main, ["--checkpoint", tiny_model["ckpt"]], "hf")):
        out = tmp_path / name
        left = tmp_path / f".tmp-{name}-abcd1234"
        (left / "params").mkdir(parents=True)
        (left / "params" / "part").write_bytes(b"x" * 1000)
        assert cli.run(main, args + ["--out", str(out)], prog=prog) == 0
        err = _lines(capsys.readouterr().err)
        assert err[0] == (f"note: removed 1 unfinished copy of {out} left beside it by an "
                          f"earlier run that was killed (.tmp-{name}-abcd1234)"), err
        assert all("tokenizer" in line for line in err[1:]), err  # (the tiny model has none)
        assert not left.exists() and out.is_dir()
        assert not (tmp_path / f".{name}.lock").exists()


def test_arch_beside_init_from_is_neither_used_nor_compared(tmp_path):
    """A11: after the warning that ``--config.arch`` is not used with ``init_from``, dropping
    it on the rerun was refused as an architecture change (settings.json had stored it)."""
    r = train("--config", "configs/grpo.py:smoke", "--workdir", str(tmp_path / "src"),
              "--config.stages=('base',)", "--config.base.steps=1", *QUIET, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    init = str(tmp_path / "src" / "base" / "model")
    args = ["--config", "configs/grpo.py:smoke", "--workdir", str(tmp_path / "wd"),
            "--config.stages=('base',)", f"--config.init_from={init}", *QUIET]
    r = train(*args, "--config.base.steps=2", "--config.arch=small", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "warning: --config.arch=small: not used" in r.stderr
    r = train(*args, "--config.base.steps=2", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "differ" not in r.stderr and "'small'" not in r.stderr, r.stderr[-3000:]

    # P4w: a finished stage asked for more steps resumes; the run-wide notice no longer calls it
    # kept as trained
    from emit_jax import configs
    from emit_jax.training import stages

    cfg = configs.load("configs/grpo.py:smoke", ["stages=('base',)", f"init_from={init}",
                                                 "base.steps=4", "seed=7"])
    line = stages.run_notice(cfg, str(tmp_path / "wd"))
    assert line is not None and "seed 0 -> 7" in line and "kept as trained" not in line, line


def test_compile_cache_beside_the_variable_is_said_unused(tmp_path):
    """B3: ``--config.compile_cache`` with ``$JAX_COMPILATION_CACHE_DIR`` set was ignored without
    a word."""
    r = train("--config", "configs/grpo.py:smoke", "--workdir", str(tmp_path / "wd"),
              "--config.stages=('base',)", "--config.base.steps=1", *QUIET,
              f"--config.compile_cache={tmp_path / 'mine'}", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert ("note: --config.compile_cache not used: $JAX_COMPILATION_CACHE_DIR="
            in r.stderr), r.stderr[-2000:]
    assert not (tmp_path / "mine").exists()


def test_a_native_cache_that_is_a_file_is_said_so(tmp_path):
    """N2: "File exists" (mkdir's errno) for a path that is a file."""
    import subprocess
    import sys

    from conftest import ROOT

    f = tmp_path / "nf"
    f.write_text("x")
    r = subprocess.run([sys.executable, "-c", "from emit_jax.ops import native\n"
                        "print(native.load())"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, EMIT_JAX_NATIVE_CACHE=str(f)))
    assert r.stdout.strip() == "None"
    assert _lines(r.stderr) == [
        f"warning: native heat-map kernel unavailable, using the XLA strategies: {f}: a file, "
        "where the kernel's build folder should be (set $EMIT_JAX_NATIVE_CACHE to a writable "
        "folder, or EMIT_JAX_NATIVE=0)"], r.stderr


def test_an_embedded_cache_folder_holding_another_dataset_is_replaced_with_a_note(tmp_path,
                                                                                 capsys):
    """O2: a seed-0 cache folder holding another seed's dataset was generated again (24 MB
    rewritten) without a word."""
    import json

    from emit_jax.data.embedded.cache import cache_path, ensure_cached

    target = cache_path(tmp_path, 0)
    os.makedirs(target)
    with open(os.path.join(target, "manifest.json"), "w") as f:
        json.dump({"version": 2, "seed": 1}, f)
    assert ensure_cached(tmp_path, 0) == target
    err = _lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith(f"note: {target} did not hold the embedded "
                                               "dataset of seed 0"), err
    assert json.load(open(os.path.join(target, "manifest.json")))["seed"] == 0


def test_a_signal_after_evaluate_showed_its_results_says_it_had_finished():
    """SG3: a signal right after evaluate's last line (its results file complete) said
    "interrupted (SIGHUP); nothing half-written is left"."""
    import subprocess
    import sys

    from conftest import ROOT

    code = ("import os, signal, time\nfrom emit_jax.evaluate import Signals\n"
            "s = Signals()\ns.done = True\nos.kill(os.getpid(), signal.SIGHUP)\ntime.sleep(30)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 130
    assert _lines(r.stderr) == ["emit_jax.evaluate: interrupted (SIGHUP) as it ended; it had "
                                "finished, and what it wrote is complete"], r.stderr
