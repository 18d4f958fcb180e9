"""The ninth reliability probe's cases (issue 30): each failed before its fix.

* a stopping signal while Python tore the process down after a command's last line (the
  default handlers back, modules being freed: 0.2-0.8 s with jax loaded) killed the finished
  command without a line (exit 143);
* ``data.source`` spelled through a link to the folder a workdir's records were built from was
  refused as a dataset that moved;
* ``--out '~nosuchuser/x'`` wrote under ``./~nosuchuser``;
* ``MPLCONFIGDIR`` naming a file: Matplotlib's two warning lines;
* transformers' "PyTorch was not found" line in the default install's main job.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, in_model_save, train, train_script

SMOKE_BASE = ["--config", "configs/grpo.py:smoke", "--config.stages=('base',)",
              "--config.base.steps=1", "--config.eval_limit=0", "--config.eval_unseen=0",
              "--config.export_hf=False"]


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_a_signal_while_python_tears_down_a_finished_command_is_not_a_silent_kill(tmp_path):
    """The command's module holds an object whose teardown takes a second (as freeing jax's
    modules takes 0.2-0.8 s); SIGTERM comes 0.3 s after the last line. Before: Python had put
    the default handler back, and the process died by SIGTERM (-15) with no line. Now nothing
    of the command waits for the teardown: it exits 0 (or, had the signal come during the
    exit steps, 130 with the line that it had finished)."""
    script = tmp_path / "cmd.py"
    script.write_text(
        "import time\nfrom emit_jax import cli\n\n"
        "class Slow:\n    def __del__(self):\n        time.sleep(1.5)\n\n"
        "SLOW = Slow()\n\n"
        "def main(argv):\n    print('done', flush=True)\n    return 0\n\n"
        "if __name__ == '__main__':\n    cli.command(main, prog='emit_jax.x')\n")
    p = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    assert p.stdout.readline().strip() == "done"
    time.sleep(0.3)
    try:
        p.send_signal(signal.SIGTERM)
    except ProcessLookupError:
        pass
    _, err = p.communicate(timeout=60)
    assert p.returncode in (0, 130), (p.returncode, err)
    if p.returncode == 130:
        assert _lines(err) == ["emit_jax.x: interrupted (SIGTERM) as it ended; it had "
                               "finished, and what it wrote is complete"]
    else:
        assert err == ""


def test_cli_end_runs_the_exit_steps_with_the_handler_in_place(tmp_path):
    """``cli.end`` runs the ``atexit`` functions (a temporary folder removed, a log flushed)
    before it leaves, and a signal during them gets the finishing line."""
    flag = tmp_path / "atexit-ran"
    code = ("import atexit, os, signal, time\nfrom emit_jax import cli\n"
            f"atexit.register(lambda: open({str(flag)!r}, 'w').close())\n"
            "cli.finishing('emit_jax.x', 0)\ncli.end(0)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stderr == "" and flag.exists()
    code = ("import atexit, os, signal, time\nfrom emit_jax import cli\n"
            "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(30)))\n"
            "cli.finishing('emit_jax.x', 0)\ncli.end(0)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 130
    assert _lines(r.stderr) == ["emit_jax.x: interrupted (SIGTERM) as it ended; it had "
                                "finished, and what it wrote is complete"]


def test_resolve_inside_reads_both_spellings_of_the_root(tmp_path):
    from emit_jax.data.jsonl import OutsideRootError, resolve_inside

    real = tmp_path / "real" / "ds"
    (real / "c").mkdir(parents=True)
    (real / "c" / "a.png").write_bytes(b"x")
    link = tmp_path / "link"
    os.symlink(real, link)
    for links in (False, True):
        assert resolve_inside(link, str(real / "c" / "a.png"), links=links)  # built via real
        assert resolve_inside(real, str(link / "c" / "a.png"), links=links)  # built via link
        with pytest.raises(OutsideRootError):
            resolve_inside(link, str(tmp_path / "elsewhere.png"), links=links)


def test_a_data_source_spelled_through_a_link_is_the_same_dataset_and_old_records_get_digests(
        tmp_path):
    """Before: ``data.source`` given through a link to the folder the workdir's records came
    from was refused: "image path ... resolves outside the data root ... (moved since?)"."""
    from emit_jax.data.embedded import ensure_cached

    real = os.path.realpath(ensure_cached())
    link = tmp_path / "ds-link"
    os.symlink(real, link)
    wd = tmp_path / "wd"
    r = train(*SMOKE_BASE, "--workdir", str(wd), f"--config.data.source={real}", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    # eval_limit=0 draws no results.png (tenth probe T1: the line named it all the same)
    assert f"[plots] {wd}/curves.png\n" in r.stderr and "results.png" not in r.stderr
    r = train(*SMOKE_BASE, "--workdir", str(wd), f"--config.data.source={link}", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "data.source" not in r.stderr and "moved" not in r.stderr, r.stderr[-3000:]

    # a workdir whose records were written before digests were kept gets them on its next run
    # (before: it stayed unguarded, f04/f08), and from then on a changed record is refused
    import json

    from conftest import drop_digests

    drop_digests(wd)
    r = train(*SMOKE_BASE, "--workdir", str(wd), f"--config.data.source={real}", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"note: {wd / 'data'}: the records' digests are kept from now on" in r.stderr
    options = json.loads((wd / "data" / "options.json").read_text())
    assert set(options["digests"]) >= {"base", "grpo", "test"}
    lines = (wd / "data" / "grpo.jsonl").read_text().splitlines(keepends=True)
    (wd / "data" / "grpo.jsonl").write_text("".join(lines[:-1]))  # still valid records
    r = train(*SMOKE_BASE, "--workdir", str(wd), f"--config.data.source={real}", timeout=600)
    assert r.returncode == 2
    assert "grpo.jsonl: changed since this workdir built it" in r.stderr, r.stderr[-2000:]
    # the way back the line gives (tenth probe L04: it said to delete the trained stages too)
    assert f"restore it, or delete {wd / 'data'}: the next run builds the records again" \
        in r.stderr
    import shutil

    shutil.rmtree(wd / "data")
    r = train(*SMOKE_BASE, "--workdir", str(wd), f"--config.data.source={real}", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[base] already finished" in r.stderr


def test_a_home_folder_of_no_user_is_one_line(tmp_path):
    """Before: ``--out '~nosuchuser/x'`` (quoted: no shell read it) wrote ``./~nosuchuser/x``."""
    from emit_jax.errors import ConfigError
    from emit_jax.fileio import user_path

    with pytest.raises(ConfigError, match="~nosuchuser names no user of this machine"):
        user_path("~nosuchuser/x")
    r = subprocess.run([sys.executable, "-m", "emit_jax.data.build", "--source",
                        str(tmp_path), "--out", "~nosuchuser/x.jsonl", "--stage", "1"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 2
    assert _lines(r.stderr) == [
        "emit_jax.data.build: error: --out: '~nosuchuser/x.jsonl': ~nosuchuser names no user of "
        "this machine (no home folder to put in its place); write ./~nosuchuser/x.jsonl for a "
        "folder of that name"], r.stderr
    assert not (tmp_path / "~nosuchuser").exists()


def test_an_mplconfigdir_that_is_a_file_gets_no_matplotlib_lines(tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    out = tmp_path / "t.png"
    r = subprocess.run([sys.executable, "-c",
                        "from emit_jax.training.metrics import plot_table\n"
                        f"plot_table([['1', '2']], ['a', 'b'], {str(out)!r})\n"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, MPLCONFIGDIR=str(not_a_folder)))
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert out.stat().st_size > 0 and not_a_folder.read_text() == "x"


def test_transformers_advice_is_not_printed():
    """Without torch (the default install) importing transformers printed "PyTorch was not
    found. Models won't be available ..." in the main job; emit_jax only uses its tokenizers.
    (The test extra has torch, so the advisory channel itself is checked.)"""
    code = ("import logging, sys\n"
            "from emit_jax.data import tokenizer\n"
            "tokenizer._quiet_transformers()\n"
            "from transformers.utils import logging as tl\n"
            "tl.get_logger('transformers').warning_advice('ADVICE')\n"
            "tl.get_logger('transformers').warning('WARNING')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env={k: v for k, v in os.environ.items()
                                         if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"})
    assert "ADVICE" not in r.stderr and "WARNING" in r.stderr, r.stderr


def test_an_omp_num_threads_that_is_no_count_is_one_warning():
    """Before: libgomp's own line ("libgomp: Invalid value for environment variable
    OMP_NUM_THREADS") where a library loaded it."""
    r = subprocess.run([sys.executable, "-m", "emit_jax.plan", "--config", "configs/grpo.py"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="0"))
    assert r.returncode == 0, r.stderr
    assert _lines(r.stderr) == ["warning: OMP_NUM_THREADS='0': not a thread count (a positive "
                                "whole number, or several comma-separated); left unset for "
                                "this run"], r.stderr
    r = subprocess.run([sys.executable, "-c", "from emit_jax import cli\n"
                        "import os\ncli.check_jax_environment('x')\n"
                        "print(os.environ.get('OMP_NUM_THREADS'))"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="4,2"))
    assert r.stdout.strip() == "4,2" and r.stderr == ""


def test_a_signal_as_the_summary_line_is_printed_says_the_work_was_done(tmp_path):
    """Tenth probe F1c: SIGTERM right after ``data.build``'s summary line ended it, in 2 of 6
    tries, with "interrupted (SIGTERM); nothing half-written is left" although its records
    were complete and kept: the signal came before ``main`` returned. Now a command says its
    work is done once its outputs are written (``cli.finished``)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_tasks import make_mvtec

    src = make_mvtec(tmp_path / "ds", classes=("widget",))
    for i in range(8):
        out = tmp_path / f"o{i}.jsonl"
        p = subprocess.Popen([sys.executable, "-m", "emit_jax.data.build", "--source", src,
                              "--out", str(out), "--stage", "2"], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert p.stdout.readline().startswith("{")
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=120)
        lines = [x for x in _lines(err) if not x.startswith("note: ")]  # one class: a note
        assert (p.returncode, lines) in [
            (0, []), (130, ["emit_jax.data.build: interrupted (SIGTERM) as it ended; it had "
                            "finished, and what it wrote is complete"])], (p.returncode, err)
        assert len(out.read_text().splitlines()) > 10


@pytest.mark.parametrize("how", ["config", "env"])
def test_a_compile_cache_under_no_users_home_is_one_line(tmp_path, how):
    """Tenth probe F2h/F2i: ``compile_cache='~nosuchuser/xla'`` (or the same in
    ``JAX_COMPILATION_CACHE_DIR``) made ``./~nosuchuser/xla`` and used it, without a word."""
    env = dict(os.environ)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    args = [sys.executable, "-m", "emit_jax.train", "--workdir", str(tmp_path / "wd"),
            *SMOKE_BASE[2:], "--config", os.path.join(ROOT, "configs", "grpo.py") + ":smoke"]
    if how == "config":
        args.append("--config.compile_cache=~nosuchuser/xla")
        name = "config compile_cache"
    else:
        env["JAX_COMPILATION_CACHE_DIR"] = "~nosuchuser/xla"
        name = "JAX_COMPILATION_CACHE_DIR"
    r = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env=dict(env, PYTHONPATH=ROOT))
    assert r.returncode == 2
    assert _lines(r.stderr) == [
        f"emit_jax.train: error: {name}: '~nosuchuser/xla': ~nosuchuser names no user of this "
        "machine (no home folder to put in its place); write ./~nosuchuser/xla for a folder "
        "of that name"], r.stderr
    assert not (tmp_path / "~nosuchuser").exists() and not (tmp_path / "wd").exists()


def test_a_finished_stage_whose_model_was_removed_says_the_way_back(tmp_path):
    """Tenth probe R01: only "WD/base/model: no such folder"; the stage's checkpoint was still
    there. Now the line says how to get the model back, and that way works."""
    import shutil

    wd = tmp_path / "wd"
    r = train(*SMOKE_BASE, "--workdir", str(wd), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    shutil.rmtree(wd / "base" / "model")
    r = train(*SMOKE_BASE, "--workdir", str(wd), timeout=600)
    assert r.returncode == 2
    d = wd / "base"
    assert _lines(r.stderr)[-1] == (
        f"emit_jax.train: error: {d}/model: no such folder, though {d}/done.json says base "
        f"finished (its model was removed); move {d}/done.json away and rerun: the stage "
        f"resumes from its last checkpoint in {d}/ckpt and saves its model again"), r.stderr
    os.rename(d / "done.json", tmp_path / "done.json")
    r = train(*SMOKE_BASE, "--workdir", str(wd), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (d / "model" / "emit_jax.json").is_file() and (d / "done.json").is_file()


def test_a_finished_stage_whose_model_is_damaged_says_the_way_back(tmp_path):
    """Twenty-sixth probe WT1: a finished stage's model with a torn parameter file was only
    "base/model/params: cannot restore (...)", and ``--config.restart=True`` (nothing changed)
    did nothing. The line now says the way back, and that way works (the stage's model saved
    again over the damaged one)."""
    wd = tmp_path / "wd"
    r = train(*SMOKE_BASE, "--workdir", str(wd), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    d = wd / "base"
    files = [os.path.join(root, f) for root, _, fs in os.walk(d / "model" / "params") for f in fs]
    biggest = max(files, key=os.path.getsize)
    with open(biggest, "r+b") as f:
        f.truncate(os.path.getsize(biggest) // 3)
    r = train(*SMOKE_BASE, "--workdir", str(wd), timeout=600)
    assert r.returncode == 2
    last = _lines(r.stderr)[-1]
    assert last.startswith(f"emit_jax.train: error: {d}/model/params: cannot restore ("), last
    assert last.endswith(f"; move {d}/done.json away and rerun: the stage resumes from its last "
                         f"checkpoint in {d}/ckpt and saves its model again"), last
    os.rename(d / "done.json", tmp_path / "done.json")
    r = train(*SMOKE_BASE, "--workdir", str(wd), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    r = train(*SMOKE_BASE, "--workdir", str(wd), timeout=600)  # the model restores again
    assert r.returncode == 0 and "[base] already finished" in r.stderr, r.stderr[-3000:]


def test_a_workdir_inside_the_embedded_dataset_is_refused(tmp_path):
    """Tenth probe W01: ``--workdir`` inside the embedded dataset's cached folder (the default
    source) wrote the run into the dataset; an explicit ``data.source`` was refused."""
    from emit_jax.data.embedded import ensure_cached

    ds = ensure_cached()
    r = train(*SMOKE_BASE, "--workdir", os.path.join(ds, "wd"), timeout=600)
    assert r.returncode == 2
    assert _lines(r.stderr) == [
        f"emit_jax.train: error: {ds}/wd: the output lies inside the input config data.source "
        f"(the embedded dataset, cached in) {ds}; choose a path outside it"], r.stderr
    assert not os.path.exists(os.path.join(ds, "wd"))


# a SIGTERM that arrives as a finished stage's last checkpoint is awaited (after the loop)
SIGNAL_IN_CLOSE = train_script("""
from emit_jax.training import state
close = state.StageCheckpoints.close
def close_with_a_signal(self):
    os.kill(os.getpid(), signal.SIGTERM)
    close(self)
state.StageCheckpoints.close = close_with_a_signal
""")


def test_a_signal_as_the_last_checkpoint_is_awaited_keeps_it_and_says_one_line(tmp_path):
    """Twenty-sixth probe ST8 / MB6: a SIGTERM 0.4 s after the last step began (its checkpoint
    written by Orbax's threads, awaited after the loop) was raised inside Orbax's wait: three
    tracebacks of its threads, and the step's checkpoint left unfinished (the rerun trained it
    again). The write is now awaited, then the line; the rerun finds the stage complete."""
    import subprocess
    import sys

    from conftest import subprocess_env

    wd = tmp_path / "wd"
    args = [*SMOKE_BASE[:-4], "--config.base.steps=2", "--config.checkpoint_every=1",
            *SMOKE_BASE[-3:], "--workdir", str(wd)]
    r = subprocess.run([sys.executable, "-c", SIGNAL_IN_CLOSE, *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=600,
                       env=dict(subprocess_env(), PYTHONPATH=ROOT))
    assert r.returncode == 130, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert _lines(r.stderr)[-1] == (
        "emit_jax.train: interrupted (SIGTERM as the stage's last checkpoint was written; it is "
        "complete); rerun the same command to resume from the last checkpoint"), r.stderr
    assert sorted(os.listdir(wd / "base" / "ckpt")) == ["1", "2"]
    r = train(*args, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert ("[base] resumes from its checkpoint at step 2 of 2: no step is left to run, its "
            "model is saved from that checkpoint") in r.stderr, r.stderr[-3000:]


# a SIGHUP once results.json is written (in the run's last barrier)
SIGNAL_AT_THE_END = train_script("""
from emit_jax import parallel
barrier = parallel.barrier
def barrier_with_a_signal(name, *a, **k):
    if name == "run_done":
        os.kill(os.getpid(), signal.SIGHUP)
    return barrier(name, *a, **k)
parallel.barrier = barrier_with_a_signal
""")


def test_a_signal_once_the_run_wrote_everything_says_it_had_finished(tmp_path):
    """Twenty-sixth probe ST6: a SIGHUP after hf/, results.json and the plots were written said
    "interrupted (SIGHUP); rerun the same command to resume from the last checkpoint", of a
    complete run."""
    import subprocess
    import sys

    from conftest import subprocess_env

    wd = tmp_path / "wd"
    r = subprocess.run([sys.executable, "-c", SIGNAL_AT_THE_END, *SMOKE_BASE, "--workdir",
                        str(wd)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=dict(subprocess_env(), PYTHONPATH=ROOT))
    assert r.returncode == 130, r.stderr[-3000:]
    assert _lines(r.stderr)[-1] == (
        "emit_jax.train: interrupted (SIGHUP) as it ended; it had finished, and what it wrote "
        "is complete"), r.stderr[-3000:]
    assert (wd / "results.json").is_file()


def test_a_failed_restore_prints_no_closed_loop_traceback(capsys):
    """Twenty-sixth probe WT1 (1 run of 8): the callbacks of a failed restore that fired as
    Orbax closed its event loop, before the failure reached the command, printed fragments of
    three "Event loop is closed" tracebacks ahead of the error line. Such errors are not
    printed while a restore runs; after a successful one, the hook is as it was."""
    import sys

    import pytest

    from emit_jax.checkpoint import _loop_closed_unprinted

    before = sys.excepthook
    closed = RuntimeError("Event loop is closed")
    with _loop_closed_unprinted():
        sys.excepthook(RuntimeError, closed, None)
        assert capsys.readouterr().err == ""
        sys.excepthook(ValueError, ValueError("another"), None)
        assert "ValueError: another" in capsys.readouterr().err
    assert sys.excepthook is before
    with pytest.raises(OSError):
        with _loop_closed_unprinted():
            raise OSError("the restore failed")
    try:
        sys.excepthook(RuntimeError, closed, None)  # the reads it left: still unprinted
        assert capsys.readouterr().err == ""
    finally:
        sys.excepthook = before


# two SIGINTs as a finished stage's model is written (save_model)
TWO_SIGNALS_IN_A_MODEL_SAVE = train_script(in_model_save(
    "os.kill(os.getpid(), signal.SIGINT); os.kill(os.getpid(), signal.SIGINT)"))


def test_a_second_ctrl_c_while_a_model_is_written_is_one_line_and_the_rerun_cleans_up(tmp_path):
    """Twenty-seventh probe N1: a second Ctrl-C while a finished stage's model was written was
    raised inside Orbax's wait: the line, then two tracebacks of Orbax's threads, and the
    unfinished copy (``base/.tmp-model-*``) stayed in the stage folder for good."""
    import subprocess
    import sys

    from conftest import subprocess_env

    wd = tmp_path / "wd"
    args = [*SMOKE_BASE, "--workdir", str(wd)]
    r = subprocess.run([sys.executable, "-c", TWO_SIGNALS_IN_A_MODEL_SAVE, *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=600,
                       env=dict(subprocess_env(), PYTHONPATH=ROOT))
    assert r.returncode == 130, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "E1" not in r.stderr, r.stderr[-3000:]
    # (the program's name is "emit_jax" here: the command runs through python -c)
    assert _lines(r.stderr)[-1] == (
        "emit_jax: interrupted (SIGINT while a model was written): stopped at "
        "once; rerun the same command (it removes the unfinished copy)"), r.stderr
    left = [n for n in os.listdir(wd / "base") if n.startswith(".tmp-model-")]
    assert left, os.listdir(wd / "base")
    r = train(*args, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"note: removed 1 unfinished copy of {wd / 'base' / 'model'}" in r.stderr, r.stderr
    assert not [n for n in os.listdir(wd / "base") if n.startswith(".tmp-")]
    assert (wd / "base" / "model" / "emit_jax.json").is_file()
