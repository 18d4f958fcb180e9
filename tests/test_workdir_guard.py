"""The workdir as a user meets it (issue 30, items 1, 3, 5 and 7): a rerun with a setting the
stored stages depend on (the LoRA rank) is refused in one line and ``--config.restart=True``
moves the old output aside; harmless changes continue; a checkpoint of other shapes is not taken
for an unreadable one; one trainer per workdir (a killed holder never blocks); a stage with no
trained weights says so; a full disk during training is one error line.

Real training runs at the smallest size (1-3 steps of the warm-up or sft2 stage, batch 2-4);
the session's compilation cache makes the reruns cheap."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest
from flax import nnx

from conftest import ROOT, subprocess_env, train

SMOKE = ["--config", "configs/grpo.py:smoke", "--config.eval_limit=0", "--config.export_hf=False",
         "--config.checkpoint_every=1"]
WARMUP = [*SMOKE, "--config.stages=('warmup',)", "--config.warmup.batch_size=4"]
SFT2 = [*SMOKE, "--config.stages=('sft2',)", "--config.sft2.batch_size=2"]
AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The embedded dataset's cache, shared by this file's runs."""
    return {"EMIT_JAX_CACHE": str(tmp_path_factory.mktemp("cache"))}


def _lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def _error_line(r) -> str:
    """The run's last stderr line, which must be its one error line (exit 2, no traceback)."""
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    last = _lines(r.stderr)[-1]
    assert last.startswith("emit_jax.train: error: "), r.stderr[-3000:]
    assert sum("error:" in line for line in _lines(r.stderr)) == 1, r.stderr[-3000:]
    return last


def _steps(ckpt_dir) -> list[int]:
    return sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit()) \
        if os.path.isdir(ckpt_dir) else []


# ------------------------------------------------------------------ stored settings, restart
@pytest.fixture(scope="module")
def sft2_run(tmp_path_factory, cache):
    """One step of the LoRA stage sft2 alone (LoRA rank 8, the config's)."""
    w = tmp_path_factory.mktemp("sft2")
    r = train(*SFT2, "--workdir", str(w), "--config.sft2.steps=1", env=cache)
    assert r.returncode == 0, r.stderr[-4000:]
    return w, r


def test_a_stage_with_no_trained_weights_says_so(sft2_run):
    w, r = sft2_run
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning: sft2")]
    assert len(warnings) == 1, r.stderr[-3000:]
    assert "starts from randomly initialised weights" in warnings[0]
    assert "--config.init_from=" in warnings[0] and "--config.stages=" in warnings[0]
    assert "'sft'" in warnings[0]  # the earlier stage to include
    stored = json.loads((w / "sft2" / "settings.json").read_text())
    assert stored["config"]["grpo"]["lora"]["rank"] == 8


def test_a_changed_lora_rank_is_refused_in_one_line(sft2_run, cache):
    """Before: every checkpoint was labelled unreadable (moved to ckpt-unreadable/), hundreds
    of traceback lines, and the stage restarted from step 0 with exit 0."""
    w, _ = sft2_run
    settings = (w / "sft2" / "settings.json").read_text()
    r = train(*SFT2, "--workdir", str(w), "--config.sft2.steps=2", "--config.grpo.lora.rank=4",
              env=cache)
    line = _error_line(r)
    assert "sft2: grpo.lora.rank 8 -> 4" in line and str(w) in line
    assert "--config.restart=True" in line and "not deleted" in line
    assert _steps(w / "sft2" / "ckpt") == [1]  # kept, where it was
    assert not (w / "sft2" / "ckpt-unreadable").exists()
    assert (w / "sft2" / "settings.json").read_text() == settings


def test_restart_moves_the_stage_aside_and_trains_it_again(sft2_run, cache, tmp_path):
    """``--config.restart=True`` with another ``init_from`` (the first run's model, copied: the
    same shapes, so the compiled step is reused): the old sft2 folder is moved, not deleted."""
    w, _ = sft2_run
    init = tmp_path / "init"
    shutil.copytree(w / "sft2" / "model", init)
    r = train(*SFT2, "--workdir", str(w), "--config.sft2.steps=1", f"--config.init_from={init}",
              "--config.restart=True", env=cache)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "[restart] settings changed (sft2: init_from '' -> " in r.stderr
    assert "warning: sft2" not in r.stderr  # init_from gives it weights
    aside = [n for n in os.listdir(w) if n.startswith("replaced-")]
    assert len(aside) == 1, os.listdir(w)
    assert _steps(w / aside[0] / "sft2" / "ckpt") == [1]  # the old output, kept
    assert (w / aside[0] / "sft2" / "done.json").is_file()
    assert (w / "sft2" / "done.json").is_file() and _steps(w / "sft2" / "ckpt") == [1]
    stored = json.loads((w / "sft2" / "settings.json").read_text())
    assert stored["config"]["init_from"] == str(init)


def test_only_the_settings_a_stage_depends_on_are_compared(tmp_path):
    """Step counts, learning rates, batch sizes, evaluation, logging, checkpointing, the compile
    cache, the data options and scan_layers may change; the model, the LoRA shape, a stage's
    trained set and the stage before it may not."""
    from emit_jax import configs
    from emit_jax.training import stages

    def cfg(**overrides):
        return configs.load("grpo", {"stages": ("base", "sft", "grpo"), **overrides})

    for stage in ("base", "sft", "grpo"):
        stages.save_settings(cfg(), str(tmp_path), stage)
    # a stage that stopped before its first checkpoint (settings only) is never compared
    assert stages.changed_settings(cfg(**{"grpo.lora.rank": 4}), str(tmp_path)) == {}
    for stage in ("base", "sft", "grpo"):  # each with output now
        open(os.path.join(tmp_path, stage, "done.json"), "w").close()
    harmless = {"grpo.steps": 400, "sft.steps": 7, "grpo.lr": 1e-3, "sft.batch_size": 4,
                "log_every": 3, "checkpoint_every": 9, "compile_cache": "", "eval_limit": 0,
                "eval_unseen": 0, "eval_think": False, "export_hf": False, "nonfinite": "stop",
                "grpo.G": 8, "grpo.lora.dropout": 0.1, "kernels.scan_layers": True,
                "memory.remat": True, "data.dk_sentences": 2, "seed": 3}
    assert stages.changed_settings(cfg(**harmless), str(tmp_path)) == {}
    assert stages.changed_settings(cfg(**{"grpo.lora.rank": 4}), str(tmp_path)) == {
        "grpo": [("grpo.lora.rank", 8, 4)]}
    changed = stages.changed_settings(cfg(**{"base.train_vision": True,
                                             "emit.num_soft_tokens": 4}), str(tmp_path))
    assert changed == {"base": [("base.train_vision", False, True)],
                       "sft": [("emit.num_soft_tokens", 9, 4)]}
    changed = stages.changed_settings(cfg(arch="small", stages=("sft", "grpo")), str(tmp_path))
    assert changed["sft"] == [("arch", "tiny", "small"), ("the stage before sft", "base", None)]
    assert changed["grpo"] == [("arch", "tiny", "small")]
    assert "base" not in changed  # not in this run: not compared


# ------------------------------------------------------------------ a checkpoint of other shapes
def _linear(n_out):
    from emit_jax.training.config import OptimConfig
    from emit_jax.training.optim import make_optimizer

    model = nnx.Linear(3, n_out, rngs=nnx.Rngs(0))
    return model, nnx.Optimizer(model, make_optimizer(OptimConfig(steps=4, lr=1e-2)),
                                wrt=nnx.Param)


def test_a_checkpoint_of_other_shapes_is_not_set_aside_as_unreadable(tmp_path):
    from emit_jax.errors import CheckpointError
    from emit_jax.training.state import StageCheckpoints

    d = tmp_path / "grpo" / "ckpt"
    ck = StageCheckpoints(str(d), every=1, async_save=False, name="grpo")
    ck.save(1, *_linear(4), {"step": 1, "data": {}})
    ck.close()
    ck = StageCheckpoints(str(d), every=1, async_save=False, name="grpo")
    with pytest.raises(CheckpointError) as e:
        ck.restore(*_linear(5))  # a LoRA rank 4 run meeting rank 8 factors, in small
    msg = str(e.value)
    assert msg.startswith(f"{d / '1'}: the grpo checkpoint holds other arrays than this run")
    assert "stored (4,), this run (5,)" in msg and "\n" not in msg
    assert _steps(d) == [1] and not (tmp_path / "grpo" / "ckpt-unreadable").exists()
    assert ck.restore(*_linear(4))["step"] == 1  # the right settings still restore it
    ck.close()


# ------------------------------------------------------------------ one writer per workdir
def test_a_second_trainer_on_a_workdir_is_refused_and_a_killed_one_never_blocks(tmp_path, cache):
    w = tmp_path / "w"
    holder = subprocess.Popen(
        [sys.executable, "-m", "emit_jax.train", *WARMUP, "--config.warmup.steps=100",
         "--workdir", str(w)], cwd=ROOT, env=subprocess_env(PYTHONUNBUFFERED="1", **cache),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        seen = []
        for line in holder.stderr:  # the holder has the lock once it prepares the data
            seen.append(line)
            if line.startswith("[data]"):
                break
        else:
            raise AssertionError("".join(seen)[-3000:])
        r = train(*WARMUP, "--config.warmup.steps=100", "--workdir", str(w), env=cache,
                  timeout=300)  # refused at once (before: it trained beside the holder)
        line = _error_line(r)
        assert line == (f"emit_jax.train: error: {w}: in use by another trainer (pid "
                        f"{holder.pid} on {socket.gethostname()}, since " + line.split(", since ")[1])
        assert line.endswith("wait for it to end or stop it, or choose another --workdir")
        for line in holder.stderr:
            seen.append(line)
            if line.startswith("[warmup] step 1/"):
                break
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding the lock
        holder.wait(timeout=60)
        holder.stderr.close()
    # the same workdir again, with settings that change nothing stored: not locked, not refused,
    # and it continues from the killed run's last checkpoint
    last = _steps(w / "warmup" / "ckpt")[-1:] or [0]
    warmup = [a for a in WARMUP if a != "--config.checkpoint_every=1"]  # given once: 7
    r = train(*warmup, "--workdir", str(w), f"--config.warmup.steps={last[0] + 1}",
              "--config.log_every=5", "--config.checkpoint_every=7", "--config.compile_cache=",
              "--config.warmup.lr=0.001", "--config.eval_think=False",
              "--config.eval_max_new_tokens=4", "--config.nonfinite=stop", env=cache)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "error:" not in r.stderr and f"[warmup] step {last[0] + 1}/{last[0] + 1}" in r.stderr
    if last[0]:
        assert "[warmup] step 1/" not in r.stderr


# ------------------------------------------------------------------ a full disk
@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of ``size`` bytes at ``tmp_path/disk``; skipped where it cannot be mounted."""
    mounted = []

    def mount(size: str) -> str:
        d = tmp_path / "disk"
        d.mkdir()
        if not AS_ROOT or shutil.which("mount") is None:
            pytest.skip("mounting a small tmpfs needs root")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)],
                           capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounted.append(d)
        return str(d)

    yield mount
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def test_a_full_disk_during_training_is_one_error_line(small_disk, cache):
    """16 MiB: the data and the tokenizer fit, the warm-up's first checkpoint does not. Before:
    ~90 Orbax tracebacks from its writer threads, exit 1 and no error line."""
    disk = small_disk("16m")
    r = train(*WARMUP, "--workdir", os.path.join(disk, "w"), "--config.warmup.steps=2", env=cache)
    line = _error_line(r)
    assert line.startswith(f"emit_jax.train: error: {disk}/w/warmup/ckpt/1: No space left on "
                           "device (needs "), line
    assert "MiB free)" in line
    assert "orbax" not in r.stderr.lower()
    assert _steps(os.path.join(disk, "w", "warmup", "ckpt")) == []


# TensorStore's late callbacks into the failed write's closed event loop: the trainer's hook
# drops them (checkpoint.DiskFullLogs), pytest puts its own hook in place during a test
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_disk_that_fills_during_a_checkpoint_write_is_one_oserror(small_disk, monkeypatch,
                                                                    capfd, caplog):
    """Past the free-space check (the disk filled by someone else meanwhile, here: no check),
    Orbax fails in its writer threads: the save ends with one ``OSError`` naming the checkpoint
    folder, Orbax's error logs about it are dropped and its temporary folder is removed."""
    from emit_jax.training import state
    from emit_jax.training.config import OptimConfig
    from emit_jax.training.optim import make_optimizer

    monkeypatch.setattr(state, "check_free_space", lambda *a, **k: None)
    d = os.path.join(small_disk("1m"), "ckpt")
    model = nnx.Linear(1024, 1024, rngs=nnx.Rngs(0))  # 4 MiB of parameters
    opt = nnx.Optimizer(model, make_optimizer(OptimConfig(steps=4, lr=1e-2)), wrt=nnx.Param)
    ck = state.StageCheckpoints(d, every=1, name="sft")
    with pytest.raises(OSError) as e:
        ck.save(1, model, opt, {"step": 1, "data": {}})
        ck.close()
    assert e.value.errno == errno.ENOSPC and e.value.filename == d
    assert "while writing a sft checkpoint (needs" in e.value.strerror
    assert os.listdir(d) == []  # no temporary folder left
    err = capfd.readouterr().err
    assert "Traceback" not in err and "No space left" not in err, err[-3000:]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors[:3]  # Orbax's error logs (each with a traceback) are dropped


# ------------------------------------------------------------------ reruns of a finished workdir
@pytest.fixture(scope="module")
def finished_rerun(smoke_run, tmp_path_factory):
    """The finished smoke run's workdir (a copy) run again with another grpo lr and beta and
    another seed:
    (the copy, its results.json before the rerun, CompletedProcess)."""
    src, data_cache, _ = smoke_run
    w = tmp_path_factory.mktemp("rerun") / "w"
    shutil.copytree(src, w, symlinks=True)
    before = json.loads((w / "results.json").read_text())
    r = train("--config", "configs/grpo.py:smoke", "--workdir", str(w), "--config.grpo.lr=0.5",
              "--config.grpo.beta=3.0", "--config.seed=1",
              env={"EMIT_JAX_CACHE": str(data_cache)})
    assert r.returncode == 0, r.stderr[-4000:]
    return w, before, r


def test_a_rerun_of_a_finished_workdir_keeps_its_results(finished_rerun):
    """Before: every stage "already finished", exit 0, and results.json's ``stages`` was {} (each
    stage's step history and seconds gone), its ``seconds`` the no-op rerun's."""
    w, before, r = finished_rerun
    after = json.loads((w / "results.json").read_text())
    assert list(before["stages"]) == ["warmup", "base", "sft", "grpo"]
    assert after["stages"] == before["stages"]  # history, steps and seconds as trained
    assert after["seconds"] == before["seconds"]  # the training time, not the rerun's
    assert 0 < after["rerun_seconds"]
    for stage in ("warmup", "base", "sft", "grpo"):
        assert r.stderr.count(f"[{stage}] already finished") == 1, r.stderr[-3000:]


def test_a_rerun_whose_metrics_are_torn_says_the_curves_stay(smoke_run, tmp_path):
    """Seventh probe. Before: every stage's metrics.jsonl torn (a damaged copy), the rerun drew
    no curves and said nothing (no ``[plots]`` line, curves.png as an earlier run drew it)."""
    src, data_cache, _ = smoke_run
    w = tmp_path / "w"
    shutil.copytree(src, w, symlinks=True)
    for stage in ("warmup", "base", "sft", "grpo"):
        (w / stage / "metrics.jsonl").write_text('{"stage": "x", "st')
    r = train("--config", "configs/grpo.py:smoke", "--workdir", str(w),
              env={"EMIT_JAX_CACHE": str(data_cache)})
    assert r.returncode == 0, r.stderr[-4000:]
    assert f"note: no training curves to draw (every stage's metrics.jsonl is empty or torn); " \
           f"{w}/curves.png is left as an earlier run drew it" in r.stderr, r.stderr[-3000:]


def test_a_finished_stage_with_changed_settings_says_it_is_kept_as_trained(finished_rerun):
    """Before: "[grpo] already finished" and exit 0, nothing said about grpo.lr / grpo.beta."""
    w, _, r = finished_rerun
    notes = [line for line in r.stderr.splitlines() if line.startswith("warning: grpo")]
    assert notes == [
        "warning: grpo is already finished and kept as trained; this run's changed settings are "
        "not used for it: grpo.beta 0.005 -> 3.0, grpo.lr 0.0001 -> 0.5. To train grpo again "
        f"with them, add --config.restart=True (its output is moved to {w}/replaced-<time>/, "
        "not deleted)"], r.stderr[-3000:]
    assert not [line for line in r.stderr.splitlines()
                if line.startswith(("warning: warmup", "warning: base", "warning: sft"))]
    stored = json.loads((w / "grpo" / "settings.json").read_text())
    assert stored["config"]["grpo"]["lr"] == 0.0001  # what it was trained with, still


def test_a_rerun_with_changed_run_wide_settings_says_so(finished_rerun):
    """Before: a changed seed (or eval_limit, whose evaluation replaced results.json) on a
    finished workdir was not mentioned."""
    w, _, r = finished_rerun
    notes = [line for line in r.stderr.splitlines()
             if line.startswith("warning: settings changed since this workdir's last run")]
    assert notes == [
        "warning: settings changed since this workdir's last run: seed 0 -> 1; the finished "
        "stages warmup, base, sft, grpo are kept as trained (not retrained for these); this run "
        f"continues with the new values, and its evaluation replaces {w}/results.json"], \
        r.stderr[-3000:]
    after = json.loads((w / "results.json").read_text())
    assert after["config"]["seed"] == 1  # what the next run compares with


def test_run_wide_changes_are_compared_with_the_last_run(tmp_path):
    """Only settings outside the stage sections and the structural ones; the last run is the
    one results.json records, else the newest stage's settings."""
    from emit_jax import configs
    from emit_jax.training import stages

    def cfg(**overrides):
        return configs.load("grpo", {"stages": ("sft", "grpo"), **overrides})

    w = str(tmp_path)
    assert stages.run_changes(cfg(seed=2), w) == []  # nothing stored
    for stage in ("sft", "grpo"):
        stages.save_settings(cfg(), w, stage)
        open(os.path.join(w, stage, "done.json"), "w").close()
    now = cfg(seed=2, eval_limit=5, arch="small", **{"grpo.lr": 0.5, "data.dk_sentences": 3,
                                                      "emit.num_soft_tokens": 4})
    assert stages.run_changes(now, w) == [("data.dk_sentences", 1, 3), ("eval_limit", 200, 5),
                                          ("seed", 0, 2)]
    assert stages.run_notice(cfg(), w) is None
    with open(os.path.join(w, "results.json"), "w") as f:
        json.dump({"config": stages.config_json(cfg(seed=2, eval_limit=5))}, f)
    assert stages.run_changes(cfg(seed=2, eval_limit=5), w) == []
    assert stages.run_changes(cfg(), w) == [("eval_limit", 5, 200), ("seed", 2, 0)]
    # a run that ended before its results (interrupted) wrote a stage's settings after them:
    # the next run is compared with that run (twenty-seventh probe RS1r)
    t = os.path.getmtime(os.path.join(w, "results.json"))
    os.utime(os.path.join(w, "results.json"), (t - 60, t - 60))
    stages.save_settings(cfg(seed=3), w, "grpo")
    assert stages.run_changes(cfg(seed=3), w) == []
    assert stages.run_changes(cfg(seed=2, eval_limit=5), w) == [("eval_limit", 200, 5),
                                                                ("seed", 3, 2)]


def test_a_resumed_stage_names_the_settings_changed_since_its_checkpoint(tmp_path):
    """Learning rate and beta may change on a resume (docs/reliability.md), but the stage then
    mixes two settings: one warning line names them; a longer step count alone says nothing;
    ``restart`` counts the changed section as a reason to train the stage again."""
    from emit_jax import configs
    from emit_jax.training import stages

    def cfg(**overrides):
        return configs.load("grpo", {"stages": ("sft", "grpo"), **overrides})

    w = str(tmp_path)
    for stage in ("sft", "grpo"):
        stages.save_settings(cfg(), w, stage)
        os.makedirs(os.path.join(w, stage, "ckpt", "1"))  # a checkpoint: output to compare
    now = cfg(**{"grpo.lr": 0.5, "grpo.beta": 3.0, "grpo.steps": 400})
    assert stages.settings_notice(now, w, "grpo", finished=False) == (
        "warning: grpo resumes with settings changed since its checkpoint: grpo.beta 0.005 -> "
        "3.0, grpo.lr 0.0001 -> 0.5")
    assert stages.settings_notice(now, w, "sft", finished=False) is None
    assert stages.settings_notice(cfg(**{"grpo.steps": 400}), w, "grpo", finished=False) is None
    # the structural settings are refused (check_settings), not warned about twice
    assert stages.settings_notice(cfg(**{"grpo.lora.rank": 4}), w, "grpo", finished=False) is None
    assert stages.changed_settings(now, w) == {}
    assert stages.changed_settings(now, w, sections=True) == {
        "grpo": [("grpo.beta", 0.005, 3.0), ("grpo.lr", 0.0001, 0.5)]}


def test_restart_refuses_to_move_the_init_from_it_reads(smoke_run, tmp_path):
    """Before: grpo, hf and tokenizer were moved to replaced-*/, then the run failed on the
    init_from it had just moved away (exit 2, the stage and the export gone from the workdir)."""
    src, data_cache, _ = smoke_run
    w = tmp_path / "w"
    shutil.copytree(src, w, symlinks=True)
    listing = sorted(os.listdir(w))
    init = w / "grpo" / "model"
    r = train("--config", "configs/grpo.py:smoke", "--workdir", str(w),
              "--config.stages=('grpo',)", f"--config.init_from={init}", "--config.restart=True",
              env={"EMIT_JAX_CACHE": str(data_cache)}, timeout=600)
    line = _error_line(r)
    assert line.startswith(f"emit_jax.train: error: config init_from {init} is inside "
                           f"{w / 'grpo'}, which --config.restart=True would move"), line
    assert sorted(os.listdir(w)) == listing  # nothing moved
    assert (init / "emit_jax.json").is_file()


def test_a_workdir_path_that_is_not_utf8_is_refused_before_anything_is_made(tmp_path):
    """Before: a 36-line UnicodeEncodeError traceback from the tokenizer save and a half-made
    workdir."""
    w = os.path.join(str(tmp_path), os.fsdecode(b"w\xff"))
    r = train(*SMOKE, "--workdir", w, timeout=600)
    line = _error_line(r)
    assert line == (f"emit_jax.train: error: {os.fsencode(w)!r}: the workdir's path is not valid "
                    "UTF-8 (choose another --workdir)")
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------ refused before any stage runs
def _nothing_in(tmp_path):
    return [n for n in os.listdir(tmp_path) if n != "cache"]


def test_a_compile_cache_path_that_is_not_utf8_is_refused_before_anything_is_made(tmp_path):
    """Before: an 85-line TypeError traceback from JAX's cache at the first compilation, and a
    half-made workdir."""
    bad = os.path.join(str(tmp_path), os.fsdecode(b"xla\xff"))
    env = {k: v for k, v in subprocess_env().items() if k != "JAX_COMPILATION_CACHE_DIR"}
    r = subprocess.run([sys.executable, "-m", "emit_jax.train", *WARMUP, "--workdir",
                        str(tmp_path / "w"), f"--config.compile_cache={bad}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    line = _error_line(r)
    assert line == (f"emit_jax.train: error: config compile_cache {os.fsencode(bad)!r}: the path "
                    "is not valid UTF-8 and JAX's compilation cache cannot use it; choose a "
                    "UTF-8 path")
    assert os.listdir(tmp_path) == []


def test_an_unusable_compile_cache_is_one_warning_line(tmp_path, monkeypatch, capsys):
    """Before: JAX's two-line UserWarning at each compilation. Nothing is made: the run compiles
    without a persistent cache."""
    import jax
    import ml_collections

    from emit_jax import train as train_module

    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    updates = []
    monkeypatch.setattr(jax.config, "update", lambda k, v: updates.append((k, v)))
    (tmp_path / "file").write_text("x")
    for path, why in ((tmp_path / "file" / "xla", f"Not a directory ({tmp_path / 'file'})"),):
        cfg = ml_collections.ConfigDict({"compile_cache": str(path)})
        train_module._compile_cache(cfg)
        err = capsys.readouterr().err
        assert err == (f"warning: config compile_cache {path}: {why}; compiling without a "
                       "persistent cache (--config.compile_cache= to say so, or choose a "
                       "writable folder)\n")
    assert updates == []
    good = tmp_path / "cache" / "xla"
    train_module._compile_cache(ml_collections.ConfigDict({"compile_cache": str(good)}))
    assert updates == [("jax_compilation_cache_dir", str(good))]
    assert capsys.readouterr().err == "" and not good.exists()  # JAX makes it when it writes


def test_a_step_too_large_for_the_host_is_refused_before_anything_is_made(tmp_path):
    """Before: prompts_per_step=1e8 was accepted; the run built the data and trained the
    warm-up, base and sft stages before the GRPO stage ran out of memory."""
    r = train(*SMOKE, "--workdir", str(tmp_path / "w"), "--config.grpo.prompts_per_step=100000000",
              timeout=300)
    line = _error_line(r)
    assert line.startswith("emit_jax.train: error: config grpo.prompts_per_step: 100000000 "
                           "prompts need at least "), line
    assert "GiB of memory; use fewer rows" in line
    assert os.listdir(tmp_path) == []


def test_the_step_memory_floor_counts_each_stage(tmp_path):
    from emit_jax import configs
    from emit_jax.errors import ConfigError
    from emit_jax.training.validate import _batch_fits_host

    cfg = configs.load("grpo", {"stages": ("sft", "grpo"), "sft.batch_size": 64})
    tile = 3 * 448 * 448 * 2
    _batch_fits_host(cfg, ("sft", "grpo"), 448, memory=64 * 2 * tile)  # fits exactly
    with pytest.raises(ConfigError, match=r"^config sft.batch_size: 64 rows need at least"):
        _batch_fits_host(cfg, ("sft", "grpo"), 448, memory=64 * 2 * tile - 1)
    _batch_fits_host(cfg, ("grpo",), 448, memory=2 * 2 * tile)  # 2 prompts, G 4: 4 images


def test_a_top_k_beyond_the_vocabulary_is_refused_before_any_stage_trains(tmp_path, cache):
    """Before: accepted until the GRPO stage, after the warm-up, base and sft stages."""
    w = tmp_path / "w"
    r = train(*SMOKE, "--workdir", str(w), "--config.grpo.top_k=100000", env=cache, timeout=600)
    line = _error_line(r)
    assert line.startswith("emit_jax.train: error: config grpo.top_k: 100000 is more than the "), line
    assert line.endswith(" tokens of the tokenizer's vocabulary; use at most that, or 0 to "
                         "sample from all")
    assert not [s for s in ("warmup", "base", "sft", "grpo") if (w / s).exists()]


# ------------------------------------------------------------------ the third probe's findings
def test_a_damaged_done_json_is_one_line(tmp_path):
    """Before: a JSONDecodeError (or AttributeError for a list) traceback on the rerun."""
    from emit_jax.errors import ConfigError
    from emit_jax.training import stages

    d = tmp_path / "warmup"
    d.mkdir()
    for text, needle in (('{"steps": 3, "hist', "malformed JSON"), ("[1, 2]", "no step count"),
                         ('{"steps": "3"}', "no step count")):
        (d / "done.json").write_text(text)
        with pytest.raises(ConfigError) as e:
            stages.stage_done(str(tmp_path), "warmup", 3)
        assert str(e.value).startswith(f"{d / 'done.json'}: not a stage's done.json ("), e.value
        assert needle in str(e.value) and "\n" not in str(e.value)
    (d / "done.json").write_text('{"steps": 3}')
    assert stages.stage_done(str(tmp_path), "warmup", 3)
    assert not stages.stage_done(str(tmp_path), "warmup", 4)


def test_a_config_that_is_not_a_python_file_or_is_a_folder_is_one_line(tmp_path):
    """Before: ``AttributeError: 'NoneType' object has no attribute 'loader'``."""
    from emit_jax import configs
    from emit_jax.errors import ConfigError

    md = tmp_path / "notes.md"
    md.write_text("# not a config\n")
    with pytest.raises(ConfigError, match=r"^config file .*notes.md: not a Python file \(.py\)"):
        configs.load(str(md))
    with pytest.raises(ConfigError, match=r"^config file .*: is a folder; name a config file"):
        configs.load(str(tmp_path))
    r = train("--config", str(md), "--workdir", str(tmp_path / "w"), timeout=300)
    assert _error_line(r) == (f"emit_jax.train: error: config file {md}: not a Python file "
                              "(.py) with get_config(); e.g. configs/grpo.py")
    assert not (tmp_path / "w").exists()


def test_an_empty_workdir_flag_is_refused(tmp_path):
    """Before: ``--workdir ""`` trained into runs/grpo under the current directory."""
    args = [os.path.join(ROOT, a) if a.startswith("configs/") else a for a in WARMUP]
    r = subprocess.run([sys.executable, "-m", "emit_jax.train", *args, "--workdir", ""],
                       cwd=tmp_path, env=subprocess_env(PYTHONPATH=ROOT), capture_output=True,
                       text=True, timeout=300)
    assert _error_line(r).startswith("emit_jax.train: error: --workdir: empty path;")
    assert os.listdir(tmp_path) == []


def test_a_run_refused_on_its_data_leaves_no_half_made_workdir(tmp_path):
    """Before: an empty data.source left the new workdir with its .lock and tokenizer/."""
    empty = tmp_path / "empty"
    empty.mkdir()
    r = train(*WARMUP, "--workdir", str(tmp_path / "w"), f"--config.data.source={empty}",
              timeout=300)
    assert str(empty) in _error_line(r)
    assert os.listdir(tmp_path) == ["empty"]


def test_a_folder_that_is_not_a_workdir_is_refused(tmp_path):
    """Before: a user's folder holding a results.json of their own was trained into and the
    file replaced."""
    w = tmp_path / "mine"
    w.mkdir()
    (w / "results.json").write_text('{"mine": 1}')
    r = train(*WARMUP, "--workdir", str(w), timeout=300)
    assert _error_line(r) == (
        f"emit_jax.train: error: {w}: not a training workdir and not empty (it holds "
        "results.json); a run writes results.json, curves.png and its stage folders there: "
        "choose a new or empty --workdir")
    assert os.listdir(w) == ["results.json"] and (w / "results.json").read_text() == '{"mine": 1}'


@pytest.mark.parametrize("platform", ["bogus", "cuda"])
def test_a_platform_jax_cannot_start_is_one_line(tmp_path, platform):
    """Before: ``JAX_PLATFORMS=cuda`` on a host without CUDA ended in ``AssertionError: assert
    _default_backend is not None``; an unknown name in a 71-line RuntimeError traceback."""
    import importlib.util

    if platform == "cuda" and importlib.util.find_spec("jax_cuda12_plugin") is not None:
        pytest.skip("this host has the CUDA plugin")
    r = train(*WARMUP, "--workdir", str(tmp_path / "w"), env={"JAX_PLATFORMS": platform},
              timeout=300)
    line = _error_line(r)
    assert line.startswith(f"emit_jax.train: error: JAX_PLATFORMS={platform}: JAX cannot start "
                           "that platform on this host"), line
    assert line.endswith("unset JAX_PLATFORMS or name one this host has (e.g. cpu)")
    assert not (tmp_path / "w").exists()


def test_a_rerun_asking_for_fewer_steps_than_its_checkpoint_says_so(tmp_path, cache):
    """Before: the stage ``finished`` with no step run and nothing said."""
    w = tmp_path / "w"
    r = train(*WARMUP, "--workdir", str(w), "--config.warmup.steps=2", env=cache)
    assert r.returncode == 0, r.stderr[-3000:]
    os.remove(w / "warmup" / "done.json")  # as if stopped after its checkpoint of step 2
    shutil.rmtree(w / "warmup" / "model")
    r = train(*WARMUP, "--workdir", str(w), "--config.warmup.steps=1", env=cache)
    assert r.returncode == 0, r.stderr[-3000:]
    notes = [line for line in r.stderr.splitlines() if line.startswith("warning: warmup resumes")]
    assert notes == ["warning: warmup resumes from its checkpoint at step 2, past "
                     "warmup.steps=1: no step runs, and the stage is finished with the 2 steps "
                     "it has (a new --workdir trains 1)"], r.stderr[-3000:]


def test_stages_out_of_order_are_refused():
    """Before: ``stages=('grpo','warmup')`` ran GRPO on random weights, then the warm-up."""
    from emit_jax import configs
    from emit_jax.errors import ConfigError
    from emit_jax.training.validate import validate_config

    with pytest.raises(ConfigError) as e:
        validate_config(configs.load("grpo", {"stages": ("grpo", "warmup")}), num_devices=1)
    assert str(e.value) == ("config stages: ('grpo', 'warmup') is out of order: each stage "
                            "builds on the one before, in the order warmup, base, sft, sft2, "
                            "grpo")
    for ok in (("base", "sft", "grpo"), ("warmup", "base", "sft", "sft2"), ("sft", "grpo")):
        validate_config(configs.load("grpo", {"stages": ok}), num_devices=1)


def test_a_learning_rate_that_diverges_is_warned_about():
    """Before: ``--config.warmup.lr=1e3`` (a lost minus sign) trained without a word."""
    from emit_jax import configs
    from emit_jax.training.validate import validate_config

    cfg = configs.load("grpo", {"stages": ("warmup", "base", "sft", "grpo"), "warmup.lr": 1e3,
                                "grpo.lr": 0.5})
    lines = validate_config(cfg).warnings()
    assert lines == [
        "warning: config warmup.lr=1000 is above 0.1: each AdamW step moves every weight by about "
        "that much and training diverges (did you mean 1e-3?)",
        "warning: config grpo.lr=0.5 is above 0.1: each AdamW step moves every weight by about "
        "that much and training diverges"]
    assert validate_config(configs.load("grpo")).warnings() == []  # the defaults: silent


def test_a_micro_batch_larger_than_the_step_is_warned_about():
    """Before: ``--config.sft.micro_batch_size=999`` (8 rows a step) trained without a word."""
    from emit_jax import configs
    from emit_jax.training.validate import validate_config

    lines = validate_config(configs.load("grpo:smoke", {"sft.micro_batch_size": 999})).warnings()
    assert lines == ["warning: config sft.micro_batch_size=999 is larger than a step's 8 rows "
                     "(sft.batch_size): the whole batch is one micro-batch, as with 0"]


def test_a_stage_resumed_at_its_last_step_says_so_and_keeps_its_history(tmp_path, cache):
    """Twenty-second probe W2b: ``done.json`` moved away (as the error on a missing model
    advises) and rerun: the model was saved again from the last checkpoint, but only
    "[warmup] finished in 1s" was said, and done.json / results.json held an empty history (the
    curve of the stage lost); a stage resumed mid-way kept only the last run's steps."""
    import json

    w = tmp_path / "w"
    args = [*WARMUP, "--workdir", str(w), "--config.log_every=1", "--config.checkpoint_every=1"]
    r = train(*args, "--config.warmup.steps=2", env=cache)
    assert r.returncode == 0, r.stderr[-3000:]
    first = json.loads((w / "warmup" / "done.json").read_text())["history"]
    assert [h["step"] for h in first] == [1, 2]
    os.remove(w / "warmup" / "done.json")
    shutil.rmtree(w / "warmup" / "model")
    r = train(*args, "--config.warmup.steps=2", env=cache)
    assert r.returncode == 0, r.stderr[-3000:]
    assert ("[warmup] resumes from its checkpoint at step 2 of 2: no step is left to run, its "
            "model is saved from that checkpoint") in r.stderr.splitlines(), r.stderr[-3000:]
    assert json.loads((w / "warmup" / "done.json").read_text())["history"] == first
    r = train(*args, "--config.warmup.steps=3", env=cache)  # continued: the whole history
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[warmup] resumes from its checkpoint at step 2 of 3" in r.stderr.splitlines()
    history = json.loads((w / "warmup" / "done.json").read_text())["history"]
    assert [h["step"] for h in history] == [1, 2, 3] and history[:2] == first
    results = json.loads((w / "results.json").read_text())
    assert [h["step"] for h in results["stages"]["warmup"]["history"]] == [1, 2, 3]


def test_only_what_a_run_wrote_makes_a_folder_a_training_workdir(tmp_path):
    """Twenty-third probe N05-N07 (data lost): a user's folder holding an empty ``base/`` (or a
    ``data/`` or ``tokenizer/`` of their own notes) beside their ``hf/``, ``results.json`` and
    ``curves.png`` was taken for a training workdir, and the run replaced all three. A folder
    is one when it holds what a run writes: its lock, its records' options, a stage's files."""
    import json

    from emit_jax.errors import ConfigError
    from emit_jax.train import check_is_workdir, is_training_workdir

    def folder(name, **files):
        w = tmp_path / name
        w.mkdir()
        (w / "results.json").write_text('{"my": "notes"}')
        for rel, text in files.items():
            path = w / rel.replace("__", "/").replace("X", ".")
            path.parent.mkdir(parents=True, exist_ok=True)
            if text is None:
                path.mkdir()
            else:
                path.write_text(text)
        return w

    for w in (folder("empty_stage", base=None, hf__configXjson="{}"),
              folder("notes_in_data", data__notesXtxt="user notes"),
              folder("notes_in_tokenizer", tokenizer__notesXtxt="user notes"),
              folder("another_lock", **{".lock": "not ours"}),  # a file: not the tool's
              # N11 / N10: a user's HF model in base/model, another workdir named base
              folder("a_model_named_base", base__model__configXjson="{}", base__notesXtxt="n"),
              folder("a_workdir_named_base", base__data__optionsXjson="{}",
                     base__base__settingsXjson="{}", base__ckpt__notes=None)):
        assert not is_training_workdir(str(w)), w
        with pytest.raises(ConfigError, match="not a training workdir and not empty"):
            check_is_workdir(str(w))
        assert (w / "results.json").read_text() == '{"my": "notes"}'
    lock = json.dumps({"pid": 1, "host": "h", "since": "t"})
    for w in (folder("interrupted_first_run", **{".lock": lock}),
              folder("just_locked", **{".lock": ""}),
              folder("records", data__optionsXjson="{}"),
              folder("a_stage", base__settingsXjson="{}"),
              folder("old_checkpoints", warmup__ckpt__3=None),
              folder("a_finished_stage", sft__model__emit_jaxXjson="{}")):
        assert is_training_workdir(str(w)), w
        check_is_workdir(str(w))


def test_a_workdir_renamed_while_it_trains_stops_in_one_line(tmp_path, cache):
    """Twenty-fourth probe RN1: ``mv WORKDIR WORKDIR2`` while the run trained printed two
    Orbax tracebacks (its writer threads' FileNotFoundError), an error line naming a missing
    temporary file, and made WORKDIR/base/ckpt again at the old path. One line now, nothing
    made at the old path, and the run resumes where the workdir is now."""
    import subprocess
    import sys
    import time

    w, moved = tmp_path / "w", tmp_path / "w2"
    args = [*WARMUP, "--config.warmup.steps=6", "--config.log_every=1"]
    p = subprocess.Popen([sys.executable, "-m", "emit_jax.train", *args, "--workdir", str(w)],
                         cwd=ROOT, env=subprocess_env(**cache), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    err = []
    for line in p.stderr:
        err.append(line)
        if line.startswith("[warmup] step 1/"):
            os.rename(w, moved)
            break
    err.append(p.stderr.read())
    p.wait(timeout=600)
    text = "".join(err)
    assert p.returncode == 2, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert _lines(text)[-1].startswith(
        f"emit_jax.train: error: {w / 'warmup' / 'ckpt'}: moved or deleted while the run wrote "
        "its checkpoints there; the run stops (rerun the same command on the workdir where it "
        "is now: it resumes from its last complete checkpoint)"), text[-3000:]
    time.sleep(1)  # Orbax's threads are gone with the process: nothing more comes
    if w.exists():  # the step in flight as it moved, made again by Orbax's writer: said so
        made = os.listdir(w / "warmup" / "ckpt")
        assert os.listdir(w) == ["warmup"] and os.listdir(w / "warmup") == ["ckpt"], made
        assert _lines(text)[-1].endswith(
            f"; the step {max(int(n) for n in made)} checkpoint being written as it moved was "
            "made at this path again: move it into the ckpt folder where the workdir is now to "
            "resume from it"), text[-2000:]
    r = train(*args, "--workdir", str(moved), env=cache)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (moved / "warmup" / "done.json").is_file()
