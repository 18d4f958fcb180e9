"""``python -m emit_jax.data.embedded``: an interrupt (SIGINT, SIGTERM) is one line, exit 130, and
leaves nothing half-written (the rerun works); an unwritable --out is one ``error:`` line naming
it, exit 2; --overwrite replaces the generator's files and keeps the user's."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import interruptible
from test_embedded import _files

from emit_jax.data import embedded as E

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROG = "emit_jax.data.embedded"


def _env() -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu",
                PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _cli(*args: str, cwd: str = REPO, prog: str = PROG) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", prog, *args], capture_output=True, text=True,
                          env=_env(), cwd=cwd, timeout=300)


def _one_error(proc: subprocess.CompletedProcess, prog: str = PROG) -> str:
    """The one ``error:`` line of a refused command (exit 2, nothing on stdout), less its
    ``prog: error: `` prefix."""
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(err) == 1 and err[0].startswith(f"{prog}: error: "), err
    assert proc.stdout == ""
    return err[0][len(f"{prog}: error: "):]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    """One generated dataset (seed 0), shared by the tests that only read it."""
    out = str(tmp_path_factory.mktemp("embedded") / "em")
    E.generate(out, 0)
    return out


def _count_files(paths: list[str]) -> int:
    return sum(len(fs) for p in paths for _, _, fs in os.walk(p))


def _interrupt(out: str, sig: int, *extra: str) -> subprocess.CompletedProcess:
    """Start the generator into ``out``; once some of its files exist (in the temporary folder
    beside ``out`` or in ``out``), send ``sig``; return the finished process."""
    parent, base = os.path.split(out)
    proc = subprocess.Popen([sys.executable, "-m", PROG, "--out", out, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(), cwd=REPO, preexec_fn=interruptible)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            where = glob.glob(os.path.join(parent, f".tmp-{base}-*")) + [out]
            if _count_files(where) >= 20:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"generation ended before the signal: {proc.communicate()}"
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _no_temporaries(parent: str) -> None:
    assert [n for n in os.listdir(parent) if n.startswith((".tmp-", ".old-"))] == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP],
                         ids=["SIGINT", "SIGTERM", "SIGHUP"])
def test_interrupt_leaves_nothing_and_rerun_works(tmp_path, sig):
    out = str(tmp_path / "em")
    proc = _interrupt(out, sig)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 130, proc.stderr
    assert len(err) == 1 and "interrupted" in err[0] and err[0].startswith(f"{PROG}: "), err
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(out)
    _no_temporaries(str(tmp_path))
    again = _cli("--out", out)
    assert again.returncode == 0, again.stderr
    with open(os.path.join(out, "manifest.json"), encoding="utf-8") as f:
        assert json.load(f)["seed"] == 0
    _no_temporaries(str(tmp_path))


def test_interrupted_overwrite_leaves_the_folder_unchanged(tmp_path):
    out = tmp_path / "em"
    os.makedirs(out / "pill")
    (out / "pill" / "keep.txt").write_text("mine")
    (out / "manifest.json").write_text('{"dataset": "Embedded"}')  # an earlier output's
    before = _files(str(out))
    proc = _interrupt(str(out), signal.SIGTERM, "--overwrite")
    assert proc.returncode == 130, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "interrupted" in proc.stderr
    assert _files(str(out)) == before
    _no_temporaries(str(tmp_path))


@pytest.mark.parametrize("where", ["below_a_file", "sys"])
def test_unwritable_out_is_one_line(tmp_path, where):
    if where == "sys":
        if not os.path.isdir("/sys/kernel"):
            pytest.skip("no /sys")
        out = "/sys/emit_jax_embedded_test"
    else:
        (tmp_path / "file").write_text("x")
        out = str(tmp_path / "file" / "em")
    proc = _cli("--out", out)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(err) == 1 and err[0].startswith(f"{PROG}: error: {out}: "), err
    assert "Errno" not in err[0] and ".tmp-" not in err[0]
    assert proc.stdout == ""


def test_bad_seed_is_one_line(tmp_path):
    proc = _cli("--out", str(tmp_path / "em"), "--seed", "-1")
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and err[0].startswith(f"{PROG}: error: "), err
    assert not os.path.exists(tmp_path / "em")


def test_overwrite_keeps_user_files_and_replaces_generated_ones(tmp_path):
    out = tmp_path / "em"
    os.makedirs(out / "pill" / "train" / "good")
    os.makedirs(out / "descriptions" / "pill")
    os.makedirs(out / "mine" / "empty")
    (out / "pill" / "keep.txt").write_text("mine")
    (out / "pill" / "train" / "good" / "notes.txt").write_text("mine too")
    (out / "pill" / "train" / "good" / "000.png").write_bytes(b"old image")
    (out / "pill" / "train" / "good" / "999.png").write_bytes(b"stale-looking image")
    (out / "mine" / "big.bin").write_bytes(b"\0" * 5_000_000)
    (out / "descriptions" / "pill" / "train_good_000.txt").write_text("old")
    (out / "README.md").write_text("old readme")
    (out / "manifest.json").write_text('{"dataset": "Embedded"}')  # an earlier output's
    proc = _cli("--out", str(out), "--seed", "2", "--overwrite")
    assert proc.returncode == 0, proc.stderr
    # the size reported is the generated dataset's, not counting the user's kept files
    user = {"pill/keep.txt", "pill/train/good/notes.txt", "pill/train/good/999.png",
            "mine/big.bin"}
    generated = sum(len(b) for rel, b in _files(str(out)).items() if rel not in user)
    assert f", {generated / 1e6:.1f} MB " in proc.stdout, proc.stdout
    assert (out / "pill" / "keep.txt").read_text() == "mine"
    assert (out / "pill" / "train" / "good" / "notes.txt").read_text() == "mine too"
    assert os.path.isdir(out / "mine" / "empty")
    # a file named like a generated one that this generation does not write is the user's
    assert (out / "pill" / "train" / "good" / "999.png").read_bytes() == b"stale-looking image"
    assert (out / "mine" / "big.bin").stat().st_size == 5_000_000
    assert (out / "pill" / "train" / "good" / "000.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "descriptions" / "pill" / "train_good_000.txt").read_text() != "old"
    assert (out / "README.md").read_text() != "old readme"
    with open(out / "manifest.json", encoding="utf-8") as f:
        assert json.load(f)["seed"] == 2
    _no_temporaries(str(tmp_path))


def test_overwrite_refuses_a_file_where_the_dataset_has_a_folder(tmp_path):
    out = tmp_path / "em"
    os.makedirs(out)
    (out / "pill").write_text("a file, not a folder")
    (out / "manifest.json").write_text('{"dataset": "Embedded"}')
    proc = _cli("--out", str(out), "--overwrite")
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr
    assert err[0].startswith(f"{PROG}: error: {out / 'pill'}: "), err
    assert sorted(os.listdir(out)) == ["manifest.json", "pill"]
    assert (out / "pill").read_text() == "a file, not a folder"
    _no_temporaries(str(tmp_path))


def test_user_entries_lists_only_what_the_generator_does_not_write(tmp_path):
    from emit_jax.data.embedded.writer import _user_entries

    root = tmp_path / "d"
    os.makedirs(root / "nut" / "test" / "good")
    os.makedirs(root / "nut" / "ground_truth" / E.CLASS_DEFECTS["nut"][0])
    (root / "nut" / "test" / "good" / "012.png").write_bytes(b"")
    (root / "nut" / "test" / "good" / "a.png").write_bytes(b"")
    (root / "nut" / "ground_truth" / E.CLASS_DEFECTS["nut"][0] / "001_mask.png").write_bytes(b"")
    (root / "nut" / "ground_truth" / E.CLASS_DEFECTS["nut"][0] / "001.png").write_bytes(b"")
    (root / "splits.json").write_text("{}")
    (root / "x.json").write_text("{}")
    (root / "nut" / "test" / "good" / "011.png").write_bytes(b"")
    (root / "nut" / "test" / "good" / "0011.png").write_bytes(b"")
    # only the exact names a generation writes are the generator's: test/good holds 000..011
    assert _user_entries(str(root), str(root)) == [
        f"nut/ground_truth/{E.CLASS_DEFECTS['nut'][0]}/001.png", "nut/test/good/0011.png",
        "nut/test/good/012.png", "nut/test/good/a.png", "x.json"]


def test_dataset_bytes_counts_only_generated_files(dataset, tmp_path):
    import shutil

    from emit_jax.data.embedded.writer import dataset_bytes

    total = sum(len(b) for b in _files(dataset).values())
    assert dataset_bytes(dataset) == total
    copy = tmp_path / "em"
    shutil.copytree(dataset, copy)
    (copy / "pill" / "train" / "good" / "999.png").write_bytes(b"x" * 1000)
    (copy / "notes.txt").write_text("mine")
    assert dataset_bytes(copy) == total


# ------------------------------------------------------------------ refused up front
def test_non_utf8_out_is_refused(tmp_path):
    out = os.fsdecode(os.fsencode(str(tmp_path)) + b"/em\xff")
    msg = _one_error(_cli("--out", out))
    assert msg.startswith("--out b'") and "em\\xff" in msg and "not valid UTF-8" in msg, msg
    assert os.listdir(tmp_path) == []


def test_empty_out_is_refused(tmp_path):
    assert _one_error(_cli("--out", "", cwd=str(tmp_path))) == \
        "--out: empty path; name the folder to write"
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("out, overwrite", [(".", False), (".", True), ("..", True)],
                         ids=["dot", "dot-overwrite", "parent-overwrite"])
def test_out_is_or_contains_the_cwd_is_refused(tmp_path, out, overwrite):
    cwd = tmp_path / "a" / "b"
    os.makedirs(cwd)
    if overwrite:
        (cwd / "mine.txt").write_text("mine")
    before = sorted(os.walk(tmp_path))
    inode = os.stat(cwd).st_ino
    msg = _one_error(_cli("--out", out, *(["--overwrite"] if overwrite else []), cwd=str(cwd)))
    assert msg == f"{out}: is the current directory (or contains it); run from elsewhere or " \
                  "choose another folder"
    assert sorted(os.walk(tmp_path)) == before and os.stat(cwd).st_ino == inode
    _no_temporaries(str(cwd.parent))


@pytest.mark.parametrize("overwrite", [True, False], ids=["overwrite", "plain"])
@pytest.mark.parametrize("marker", ["results.json", "grpo/settings.json", "sft/metrics.jsonl"])
def test_overwrite_refuses_a_training_workdir(tmp_path, marker, overwrite):
    """Without --overwrite too (twelfth probe EM1: "pass --overwrite", then refused with it)."""
    out = tmp_path / "run"
    os.makedirs((out / marker).parent, exist_ok=True)
    (out / marker).write_text("{}")
    before = _files(str(out))
    msg = _one_error(_cli("--out", str(out), *(["--overwrite"] if overwrite else [])))
    assert msg == f"{out}: looks like a training workdir (it holds {marker}); choose a " \
                  "dataset folder"
    assert _files(str(out)) == before
    _no_temporaries(str(tmp_path))


# ------------------------------------------------------------------ data.build --out
BUILD = "emit_jax.data.build"


@pytest.mark.parametrize("kind", ["trailing-separator", "existing-folder"])
def test_build_out_naming_a_folder_is_refused(dataset, tmp_path, kind):
    out = str(tmp_path / "somedir") + os.sep
    if kind == "existing-folder":
        out = out.rstrip(os.sep)
        os.makedirs(out)
    proc = _cli("--source", dataset, "--out", out, "--stage", "1", "--max-per-type", "1",
                prog=BUILD)
    assert _one_error(proc, BUILD) == (f"--out {out}: names a folder; data.build writes one "
                                       f"JSONL file (e.g. {os.path.join(out, 'train.jsonl')})")
    assert os.listdir(tmp_path) == (["somedir"] if kind == "existing-folder" else [])


def test_build_empty_out_is_refused(dataset, tmp_path):
    proc = _cli("--source", dataset, "--out", "", "--stage", "1", prog=BUILD, cwd=str(tmp_path))
    assert _one_error(proc, BUILD) == "--out: empty path; name the JSONL file to write"
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("split,needle", [
    ("", "--split: empty; name a split (train, validation, test) or 'all'"),
    ("nosuch", "has no such split; choose from test, train, validation, all")])
def test_build_split_empty_or_unknown_names_the_choices(dataset, tmp_path, split, needle):
    """Before: ``--split ''`` built every split (test included) without a word, and an unknown
    split said ``no images in split 'nosuch'``."""
    out = tmp_path / "o.jsonl"
    line = _one_error(_cli("--source", str(dataset), "--out", str(out), "--stage", "1",
                           "--split", split, prog=BUILD), prog=BUILD)
    assert needle in line, line
    assert not out.exists()


def test_leftovers_of_a_killed_run_are_removed_and_said(tmp_path):
    """``kill -9`` leaves the temporary copy (no handler runs). Before: the rerun succeeded and
    left the earlier run's 20 MB hidden folder beside the dataset without a word. Now the rerun
    (holding the folder's lock, so no live run owns it) removes it with a ``note:`` line; a
    folder of another name is left alone."""
    out = str(tmp_path / "em")
    proc = subprocess.Popen([sys.executable, "-m", PROG, "--out", out], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(), cwd=REPO)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if _count_files(glob.glob(os.path.join(str(tmp_path), ".tmp-em-*"))) >= 20:
            break
        time.sleep(0.05)
    proc.kill()
    proc.communicate(timeout=60)
    left = [n for n in os.listdir(tmp_path) if n.startswith(".tmp-em-")]
    assert len(left) == 1, os.listdir(tmp_path)
    os.mkdir(tmp_path / ".tmp-emx-12345678")  # another dataset's: not this run's to remove
    again = _cli("--out", out)
    assert again.returncode == 0, again.stderr
    assert f"note: removed 1 unfinished copy of {out}" in again.stderr and left[0] in again.stderr
    assert sorted(os.listdir(tmp_path)) == [".tmp-emx-12345678", "em"]


def test_two_generators_onto_one_folder_the_second_is_refused(tmp_path):
    from emit_jax.fileio import _lock_name, hold_lock

    out = str(tmp_path / "em")
    with hold_lock(_lock_name(out), what="x", hint="y", remove=True):  # as a running one holds it
        r = _cli("--out", out)
    assert r.returncode == 2, r.stderr
    assert "another data.embedded is writing it" in r.stderr
    assert os.listdir(tmp_path) == []
