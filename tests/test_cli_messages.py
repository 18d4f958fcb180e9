"""Messages that name the user's path and the real cause, and files that follow the umask.

* safetensors written by ``hf`` (export, train's ``hf/``, sharded saves) get the umask's mode,
  like every other file of the folder (they came out 0600);
* a location that cannot be written is said as such, naming the user's path: not the
  temporary file beside it, not a full disk because a pseudo / read-only file system reports 0
  bytes free;
* an output path that is not UTF-8 is refused in one line where Orbax would write it (convert
  ``--out``, demo ``--workdir``) and still accepted where plain Python writes it (export);
* evaluate ``--split`` the data does not have, a file given where a folder is wanted
  (evaluate ``--checkpoint``, convert ``--hf``, demo ``--workdir``).

Each runs the command's ``main`` in-process and expects one ``error:`` line, exit 2.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import tempfile

import pytest

from test_cli_errors import assert_one_error, run_main, tiny_model  # noqa: F401 (a fixture)
from test_bad_inputs import MMAD, ROOT
from test_tasks import make_mvtec

NON_UTF8 = b"out\xff"


@pytest.fixture
def umask():
    """Set the process umask for a test, restored after."""
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# --------------------------------------------------------------------------- 1. umask
@pytest.mark.parametrize("mask,file_mode", [(0o002, 0o664), (0o077, 0o600)])
def test_exported_safetensors_follow_the_umask(umask, tmp_path, tiny_model, mask, file_mode):
    """Every file export writes (config.json and each safetensors shard, the index included)
    gets the umask's mode; the safetensors came out 0600 whatever the umask."""
    umask(mask)
    for shard, out in (("5GB", tmp_path / "single"), ("20KB", tmp_path / "sharded")):
        rc, err, _ = run_main("emit_jax.export", ["--checkpoint", tiny_model["ckpt"], "--out",
                                                  str(out), "--max-shard-size", shard])
        assert rc == 0, err
        names = sorted(os.listdir(out))
        assert any(n.endswith(".safetensors") for n in names), names
        for name in names:
            assert _mode(out / name) == file_mode, (out / name, oct(_mode(out / name)))
    assert any(n.endswith(".index.json") for n in os.listdir(tmp_path / "sharded"))


@pytest.mark.parametrize("mask,file_mode", [(0o002, 0o664), (0o077, 0o600)])
def test_hf_save_files_follow_the_umask(umask, tmp_path, mask, file_mode):
    """hf.write_safetensors (train's hf/ export and sharded saves go through it)."""
    import numpy as np

    from emit_jax import hf

    umask(mask)
    tensors = [(f"t{i}", (lambda i=i: np.full((64,), i, np.float32)), 256) for i in range(3)]
    names = hf.write_safetensors(tensors, str(tmp_path), max_shard_size=300)
    assert len(names) == 3
    for name in os.listdir(tmp_path):
        assert _mode(tmp_path / name) == file_mode, name


# --------------------------------------------------------------------------- 2. the real cause
def _refuse_temp_files_in(monkeypatch, folder, code=errno.EACCES):
    """``tempfile.mkstemp`` in ``folder`` fails as it does where the user cannot create files
    (root in /sys: ``os.access`` says yes, the kernel says no), naming the temporary file."""
    real = tempfile.mkstemp
    folder = os.path.abspath(str(folder))

    def mkstemp(suffix=None, prefix=None, dir=None, text=False):
        if dir is not None and os.path.abspath(os.fspath(dir)) == folder:
            raise OSError(code, os.strerror(code),
                          os.path.join(folder, (prefix or "tmp") + "x1y2z3" + (suffix or "")))
        return real(suffix=suffix, prefix=prefix, dir=dir, text=text)
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


def test_atomic_output_names_the_target_not_the_temporary_file(tmp_path, monkeypatch):
    from emit_jax.fileio import atomic_output

    target = tmp_path / "v6.png"
    _refuse_temp_files_in(monkeypatch, tmp_path)
    with pytest.raises(PermissionError) as e:
        with atomic_output(target, "wb") as f:
            f.write(b"x")
    assert e.value.filename == str(target), e.value
    assert ".tmp-" not in str(e.value)


def test_visualize_unwritable_out_names_the_out_path(tmp_path, monkeypatch):
    """The probe's ``--out /sys/v6.png`` said ``/sys/.tmp-2_pk794b.png: Permission denied``."""
    from test_tasks import _img

    from emit_jax import visualize

    q, r = str(tmp_path / "q.png"), str(tmp_path / "r.png")
    _img(q, (200, 180, 160))
    _img(r, (190, 182, 160))
    out = tmp_path / "ro" / "v6.png"
    out.parent.mkdir()
    monkeypatch.setattr(visualize, "check_writable", lambda path: None)  # as os.access lets by
    _refuse_temp_files_in(monkeypatch, out.parent)
    rc, err, _ = run_main("emit_jax.visualize", ["heatmap", "--query", q, "--reference", r,
                                                 "--arch", "tiny", "--out", str(out)])
    line = assert_one_error(rc, err, f"{out}: Permission denied")
    assert ".tmp-" not in line


def test_free_space_check_says_unwritable_not_full(tmp_path, monkeypatch):
    """A location reporting 0 bytes free that cannot be written at all (/sys, a read-only
    mount) is said as such; a really full one is still a full disk."""
    import shutil

    from emit_jax.fileio import check_free_space

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(0, 0, 0))
    out = tmp_path / "ro" / "ex8"
    out.parent.mkdir()
    with pytest.raises(OSError) as full:
        check_free_space(out, 2**20)
    assert full.value.errno == errno.ENOSPC  # writable but 0 free: a full disk
    _refuse_temp_files_in(monkeypatch, out.parent, errno.EPERM)
    with pytest.raises(OSError) as e:
        check_free_space(out, 2**20)
    assert e.value.errno == errno.EPERM and e.value.filename == str(out), e.value
    assert "No space" not in str(e.value)
    assert not [n for n in os.listdir(out.parent) if n.startswith(".tmp-")]


def test_free_space_check_in_a_read_only_folder(tmp_path, monkeypatch):
    import shutil

    from emit_jax.fileio import check_free_space

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as root: a 0555 folder is writable")
        monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(0, 0, 0))
        with pytest.raises(PermissionError) as e:
            check_free_space(ro / "ex8", 2**20)
        assert e.value.filename == str(ro / "ex8")
    finally:
        ro.chmod(0o755)


def test_export_to_an_unwritable_place_is_not_a_full_disk(tmp_path, tiny_model, monkeypatch):
    """The probe's ``export --out /sys/ex8`` said ``No space left on device (needs 79.6 MiB,
    0.0 MiB free)``."""
    import shutil

    from emit_jax import export

    real_usage = shutil.disk_usage
    out = tmp_path / "ro" / "ex8"
    out.parent.mkdir()
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(0, 0, 0)
                        if os.path.abspath(p) == str(out.parent) else real_usage(p))
    monkeypatch.setattr(export, "check_new_folder", lambda *a, **k: None)  # os.access lets by
    _refuse_temp_files_in(monkeypatch, out.parent, errno.EPERM)
    rc, err, _ = run_main("emit_jax.export", ["--checkpoint", tiny_model["ckpt"], "--out",
                                              str(out)])
    line = assert_one_error(rc, err, f"{out}: Operation not permitted")
    assert "No space" not in line
    assert not out.exists()


# --------------------------------------------------------------------------- 3. non-UTF-8 paths
def test_convert_refuses_a_non_utf8_out_before_any_work(tmp_path, tiny_model):
    """Orbax cannot write it: the probe saw 1,344 lines of thread tracebacks."""
    out = os.fsdecode(os.path.join(os.fsencode(str(tmp_path)), NON_UTF8))
    rc, err, _ = run_main("emit_jax.convert", ["--hf", tiny_model["hf"], "--out", out])
    assert_one_error(rc, err, "--out", repr(os.fsencode(out)), "not valid UTF-8")
    assert os.listdir(tmp_path) == []


def test_demo_refuses_a_non_utf8_workdir_before_any_work(tmp_path):
    work = os.fsdecode(os.path.join(os.fsencode(str(tmp_path)), NON_UTF8))
    rc, err, out = run_main("emit_jax.demo", ["--workdir", work])
    assert_one_error(rc, err, "--workdir", repr(os.fsencode(work)), "not valid UTF-8")
    assert out == "" and os.listdir(tmp_path) == []


def test_demo_refuses_a_workdir_with_a_newline_before_any_work(tmp_path):
    """Twenty-sixth probe DM5: refused only after 30 s of work, the folder made and left."""
    work = str(tmp_path / "dm\nx")
    rc, err, out = run_main("emit_jax.demo", ["--workdir", work])
    assert_one_error(rc, err, repr(work), "a newline or another control character")
    assert out == "" and os.listdir(tmp_path) == []


def test_an_output_named_with_a_stray_blank_is_said(tmp_path, tiny_model, monkeypatch, capsys):
    """Twenty-sixth probe TS3: ``export --out " /tmp/x"`` (a stray space in a script) wrote the
    model under the current folder, at ``./ /tmp/x``, without a word (train says it of its
    --workdir). Every output checked before the work says it once, naming where it goes."""
    from emit_jax import fileio

    monkeypatch.chdir(tmp_path)
    given = " " + str(tmp_path / "x")
    rc, err, _ = run_main("emit_jax.export", ["--checkpoint", tiny_model["ckpt"], "--out", given])
    assert rc == 0, err
    where = os.path.join(str(tmp_path), given)
    notes = [line for line in err.splitlines() if line.startswith("note: ")]
    assert notes == [f"note: {given!r}: a name in it begins or ends with a blank; it is written "
                     f"as it is, at {where!r}"], err
    assert os.path.isfile(os.path.join(where, "config.json"))
    capsys.readouterr()
    for quiet in ("plain.json", "in between.json", given):  # a blank inside is fine; the
        fileio.note_blank_names(quiet)                     # same path is said once
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("module, src", [("emit_jax.export", "--checkpoint"),
                                         ("emit_jax.convert", "--hf")])
def test_an_empty_out_is_refused_not_the_current_folder(module, src, tmp_path, tiny_model,
                                                         monkeypatch):
    """Twenty-seventh probe N6: ``export --out ""`` / ``convert --out ""`` (an unset ``$OUT`` in
    a script) wrote the model into the current folder, exit 0."""
    monkeypatch.chdir(tmp_path)
    source = tiny_model["ckpt"] if module == "emit_jax.export" else tiny_model["hf"]
    rc, err, _ = run_main(module, [src, source, "--out", ""])
    assert_one_error(rc, err, "argument --out: empty path (an unset shell variable?); name the "
                     "new folder to write")
    assert os.listdir(tmp_path) == []


def test_export_still_writes_a_non_utf8_out(tmp_path, tiny_model):
    """Plain Python (and safetensors) write such a name: export keeps accepting it."""
    out = os.fsdecode(os.path.join(os.fsencode(str(tmp_path)), NON_UTF8))
    rc, err, _ = run_main("emit_jax.export", ["--checkpoint", tiny_model["ckpt"], "--out", out])
    assert rc == 0, err
    assert "model.safetensors" in os.listdir(out)


# --------------------------------------------------------------------------- 4. clear messages
def test_evaluate_unknown_split_names_the_flag_and_the_splits(tmp_path, tiny_model):
    data = tmp_path / "data"
    make_mvtec(str(data))
    rc, err, _ = run_main("emit_jax.evaluate", ["--checkpoint", tiny_model["ckpt"], "--data",
                                                str(data), "--split", "nosuch"])
    assert_one_error(rc, err, "--split 'nosuch'", "test, train")


def test_evaluate_checkpoint_that_is_a_file(tmp_path, tiny_model):
    data = tmp_path / "data"
    make_mvtec(str(data))
    f = os.path.join(tiny_model["ckpt"], "emit_jax.json")
    assert os.path.isfile(f)
    rc, err, _ = run_main("emit_jax.evaluate", ["--checkpoint", f, "--data", str(data)])
    line = assert_one_error(rc, err, f"{f}: a file, not a folder", "--checkpoint")
    assert "emit_jax.json/emit_jax.json" not in line


def test_convert_hf_that_is_a_file(tmp_path, tiny_model):
    f = os.path.join(tiny_model["hf"], "config.json")
    rc, err, _ = run_main("emit_jax.convert", ["--hf", f, "--out", str(tmp_path / "ck")])
    line = assert_one_error(rc, err, f"{f}: a file, not a folder", "--hf")
    assert "config.json/config.json" not in line
    assert os.listdir(tmp_path) == []


def test_demo_workdir_that_is_a_file(tmp_path):
    f = tmp_path / "afile"
    f.write_text("keep me")
    rc, err, out = run_main("emit_jax.demo", ["--workdir", str(f)])
    assert_one_error(rc, err, f"--workdir {f}: exists and is not a folder")
    assert out == "" and f.read_text() == "keep me"


# --------------------------------------------------------------------------- 5. evaluate --out,
# checkpoints without a tokenizer, aot --programs
@pytest.mark.parametrize("make", [False, True], ids=["missing", "existing"])
def test_evaluate_out_naming_a_folder_is_refused_before_any_work(tmp_path, tiny_model, make):
    """``--out DIR/`` ran the whole evaluation, then failed ("Is a directory"), leaving
    ``DIR/.partial.jsonl``; an existing folder (with or without the separator) said only
    "Is a directory"."""
    folder = tmp_path / "results"
    if make:
        folder.mkdir()
    for out in (str(folder) + os.sep,) + ((str(folder),) if make else ()):
        rc, err, stdout = run_main("emit_jax.evaluate", ["--checkpoint", tiny_model["hf"],
                                                         "--data", MMAD, "--out", out,
                                                         "--limit", "1"])
        assert_one_error(rc, err, f"--out {out}: names a folder; evaluate writes one JSON file "
                         f"(e.g. {os.path.join(out, 'results.json')})")
        assert stdout == ""
    assert os.listdir(tmp_path) == (["results"] if make else [])
    assert not make or os.listdir(folder) == []


@pytest.mark.parametrize("kind,where", [("hf", "in this checkpoint"), ("ckpt", "in its assets/")])
def test_evaluate_checkpoint_without_tokenizer_files(tmp_path, tiny_model, kind, where):
    """The folders ``python -m emit_jax.demo`` writes (``hf.save`` and ``checkpoint.save_model``
    of a random model, as ``tiny_model`` is made) hold no tokenizer: evaluate said "tokenizer
    lacks EMIT special token(s)" (transformers folder) or "cannot load a tokenizer (ValueError:
    Couldn't instantiate the backend tokenizer ...)" (Orbax). One line naming the checkpoint,
    before the weights are read and before the notice about an existing --out."""
    ckpt = tiny_model[kind]
    out = tmp_path / "res.json"
    out.write_text("keep me")
    rc, err, stdout = run_main("emit_jax.evaluate", ["--checkpoint", ckpt, "--data", MMAD,
                                                     "--out", str(out), "--limit", "1"])
    assert_one_error(rc, err, f"{ckpt}: no tokenizer files (tokenizer.json / "
                     f"tokenizer_config.json ...) {where}", "emit_jax.demo")
    assert stdout == "" and out.read_text() == "keep me"
    assert os.listdir(tmp_path) == ["res.json"]  # no partial answers


def test_aot_unknown_program_names_the_choices(monkeypatch):
    """``--programs nosuch`` said ``--programs nosuch: stage base has train_step`` (after the
    topology was made); now it is refused before, naming the config's programs."""
    from emit_jax.aot import command

    monkeypatch.setattr(command, "require_libtpu", lambda: None)  # the check needs no libtpu
    for config, programs, choices in (
            ("configs/sft.py", "nosuch", "unknown program 'nosuch'; choose from train_step"),
            ("configs/grpo.py", "sampler,nosuch,x",
             "unknown programs 'nosuch', 'x'; choose from sampler, score, train_step")):
        rc, err, out = run_main("emit_jax.aot.command", [
            "--config", os.path.join(ROOT, config), "--topology", "v5e:2x2", "--programs",
            programs], via_cli=False)
        line = assert_one_error(rc, err, prog="emit_jax.aot")
        assert line == f"emit_jax.aot: error: --programs: {choices}", line
        assert out == ""


def test_aot_a_program_the_chosen_stage_lacks_names_its_own(monkeypatch):
    """``--programs sampler`` where the stage planned by default (the config's largest, here
    ``warmup``) has no sampler said ``--programs sampler: stage warmup has train_step``."""
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:
        import pytest

        pytest.skip("the TPU compiler (libtpu) is not installed")
    rc, err, out = run_main("emit_jax.aot.command", [
        "--config", os.path.join(ROOT, "configs/grpo.py:smoke"), "--topology", "v5e:2x2",
        "--programs", "sampler,score"], via_cli=False)
    line = assert_one_error(rc, err, prog="emit_jax.aot")
    assert line == ("emit_jax.aot: error: --programs: stage warmup has no programs 'sampler', "
                    "'score'; choose from train_step (or another --stage)"), line


def test_evaluate_empty_split_is_refused(tmp_path):
    """Before: ``--split ''`` quietly meant the default split."""
    rc, err, out = run_main("emit_jax.evaluate", [
        "--checkpoint", str(tmp_path), "--data", str(tmp_path), "--split", ""])
    line = assert_one_error(rc, err, prog="emit_jax.evaluate")
    assert line == ("emit_jax.evaluate: error: argument --split: empty; give a value or leave "
                    "the flag out"), line
    assert out == "" and os.listdir(tmp_path) == []


def test_a_dataset_path_that_is_a_file_or_a_link_loop_says_so(tmp_path):
    """Before: both said ``no such dataset folder``."""
    from emit_jax.data.mvtec import scan
    from emit_jax.errors import DataError

    f = tmp_path / "000.png"
    f.write_bytes(b"x")
    loop = tmp_path / "l1"
    os.symlink(tmp_path / "l2", loop)
    os.symlink(loop, tmp_path / "l2")
    for path, needle in ((f, "a file, not a dataset folder"),
                         (loop, "a symbolic link to nothing (or a link loop)"),
                         (tmp_path / "none", "no such dataset folder")):
        with pytest.raises(DataError, match=r"^" + re.escape(f"{path}: {needle}")):
            scan(path)


def test_splits_json_naming_a_missing_image_or_one_image_twice(tmp_path):
    """Before: a listed image that does not exist was dropped (``skipped: 0``), and train
    images also listed under ``test`` moved into the test split without a word."""
    import json
    import shutil

    from emit_jax.data.embedded import ensure_cached
    from emit_jax.data.mvtec import Report, scan
    from emit_jax.errors import DataError

    ds = tmp_path / "ds"
    shutil.copytree(ensure_cached(str(tmp_path / "cache"), seed=0), ds)
    splits = json.loads((ds / "splits.json").read_text())
    good = json.dumps(splits)
    splits["test"] += ["nut/test/good/998.png", "nut/test/good/999.png"]
    (ds / "splits.json").write_text(json.dumps(splits))
    with pytest.raises(DataError) as e:
        scan(ds)
    assert str(e.value) == (f"{ds / 'splits.json'}: lists nut/test/good/998.png (test), which "
                            "does not exist (2 such)")
    report = Report("skip")
    assert len(scan(ds, report=report)) == 392 and len(report.skipped) == 2
    splits = json.loads(good)
    splits["test"].append(splits["train"][0])
    (ds / "splits.json").write_text(json.dumps(splits))
    with pytest.raises(DataError, match=r"is listed in two splits \('train' and 'test'\)"):
        scan(ds)


def test_an_emit_export_without_its_extras_file_is_refused(tmp_path):
    """Before: an HF export of an EMIT model with ``emit_extras.safetensors`` deleted loaded
    (and evaluated) as plain InternVL without a word."""
    import dataclasses
    import json

    from flax import nnx

    from emit_jax import hf
    from emit_jax.errors import CheckpointError
    from emit_jax.models import architectures
    from emit_jax.models.emit import EMIT
    from emit_jax.models.internvl import InternVL

    cfg = architectures.tiny()
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=64, num_hidden_layers=1),
                      vision=dataclasses.replace(cfg.vision, num_hidden_layers=1),
                      image_token_id=63)
    emit = EMIT.create(InternVL(cfg, rngs=nnx.Rngs(0)), hint_ids=[1, 2])
    hf.save(emit, str(tmp_path / "emit"))
    hf.save(emit.mllm, str(tmp_path / "plain"))
    assert json.loads((tmp_path / "emit" / "config.json").read_text())["emit_extras"] == \
        hf.EMIT_EXTRAS
    assert "emit_extras" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    assert isinstance(hf.load(str(tmp_path / "plain")), InternVL)
    os.remove(tmp_path / "emit" / hf.EMIT_EXTRAS)
    with pytest.raises(CheckpointError, match=r"emit_extras.safetensors: missing; .* says this "
                                              r"is an EMIT model"):
        hf.load(str(tmp_path / "emit"))


@pytest.mark.parametrize("module,args,needles", [
    # before: the output was made under a name with a newline in it (exit 0)
    ("emit_jax.data.build", ["--source", "SRC", "--out", "OUT/a\nb.jsonl", "--stage", "1"],
     ("a\\nb.jsonl': the path holds a newline or another control character",)),
    ("emit_jax.visualize", ["heatmap", "--query", "Q", "--reference", "Q", "--out",
                            "OUT/heat\t.png"], ("heat\\t.png': the path holds a newline",)),
    # before: "error: /x : no such dataset folder", the space invisible at the end of the path
    ("emit_jax.data.build", ["--source", "/nonexistent/x ", "--out", "OUT/o.jsonl", "--stage", "1"],
     ("'/nonexistent/x ': no such dataset folder",)),
])
def test_paths_a_reader_cannot_see_are_quoted_and_control_characters_refused(
        module, args, needles, tmp_path):
    src = make_mvtec(tmp_path / "ds")
    q = tmp_path / "q.png"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(q)
    args = [a.replace("SRC", src).replace("OUT", str(tmp_path)).replace("Q", str(q))
            if a not in ("--stage",) else a for a in args]
    rc, err, out = run_main(module, args)
    assert_one_error(rc, err, *needles)
    assert sorted(os.listdir(tmp_path)) == ["ds", "q.png"]


def test_a_workdir_with_a_newline_is_refused():
    from emit_jax.errors import ConfigError
    from emit_jax.train import check_workdir_name

    with pytest.raises(ConfigError, match=r"^--workdir 'runs/a\\nb': the path holds a newline"):
        check_workdir_name("runs/a\nb")
    check_workdir_name("runs/a b")  # a space is a name like any other


@pytest.mark.parametrize("damage", ["truncated_array", "empty_metadata"])
def test_a_damaged_orbax_checkpoint_is_one_short_line(damage, tiny_model, tmp_path):  # noqa: F811
    """Before: one array file cut short gave a 1,651-character line (Orbax appends the store's
    whole spec) followed, in most runs, by hundreds of lines from the reads left running; an
    empty ``params/_METADATA`` an absl WARNING line before the error."""
    import shutil
    import subprocess
    import sys

    from conftest import subprocess_env

    ck = tmp_path / "ckpt"
    shutil.copytree(tiny_model["ckpt"], ck)
    if damage == "empty_metadata":
        (ck / "params" / "_METADATA").write_bytes(b"")
        needle = "cannot restore (JSONDecodeError"
    else:
        data = max((os.path.join(d, f) for d, _, fs in os.walk(ck / "params") for f in fs),
                   key=os.path.getsize)
        os.truncate(data, os.path.getsize(data) // 2)
        needle = "cannot restore (ValueError: OUT_OF_RANGE: Error reading \""
    for _ in range(2):  # the left-over reads' noise came in most runs, not all
        r = subprocess.run([sys.executable, "-m", "emit_jax.export", "--checkpoint", str(ck),
                            "--out", str(tmp_path / "hf")], cwd=ROOT, capture_output=True,
                           text=True, timeout=300, env=subprocess_env(JAX_PLATFORMS="cpu"))
        lines = [l for l in r.stderr.splitlines() if l.strip() and "TPU" not in l]
        assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
        assert lines[0].startswith(f"emit_jax.export: error: {ck}/params: {needle}"), lines[0]
        assert len(lines[0]) < 500, lines[0]
        assert not os.path.exists(tmp_path / "hf")


def _keep_one_normal(root, cls):
    import glob

    normals = sorted(glob.glob(f"{root}/{cls}/train/good/*.png") +
                     glob.glob(f"{root}/{cls}/test/good/*.png"))
    for p in normals[1:]:
        os.remove(p)


def test_build_without_references_is_refused_or_said(tmp_path):
    """Before: a class with one normal image got no reference, so none of its two-image
    questions were built; with every class so (--max-per-type 1) data.build wrote an empty
    JSONL with exit 0 and no word."""
    import json

    src = make_mvtec(tmp_path / "ds")
    _keep_one_normal(src, "bolt")
    out = tmp_path / "s1.jsonl"
    rc, err, stdout = run_main("emit_jax.data.build", ["--source", src, "--out", str(out),
                                                        "--stage", "1"])
    assert rc == 0, err
    notes = [l for l in err.splitlines() if l.startswith("note:")]
    # two notes: the class without a reference, and its emptied train/good folder
    assert len(notes) == 2 and "class(es) 'bolt' of" in notes[0], err
    assert "two-image questions are left out" in notes[0]
    assert "1 image folder(s) hold no image" in notes[1] and "bolt/train/good" in notes[1]
    assert json.loads(stdout)["records"] > 0
    _keep_one_normal(src, "widget")
    rc, err, _ = run_main("emit_jax.data.build", ["--source", src, "--out", str(tmp_path / "x.jsonl"),
                                                  "--stage", "1"])
    assert_one_error(rc, err, "no questions to build: class(es) 'bolt', 'widget'",
                     "fewer than two normal images")
    assert not os.path.exists(tmp_path / "x.jsonl")


def test_build_onto_an_existing_output_says_so(tmp_path):
    src = make_mvtec(tmp_path / "ds")
    out = tmp_path / "s1.jsonl"
    old = '{"id": "x", "messages": []}\n'  # an earlier build's records
    out.write_text(old)
    rc, err, _ = run_main("emit_jax.data.build", ["--source", src, "--out", str(out),
                                                   "--stage", "1"])
    assert rc == 0, err
    assert err.strip() == f"note: --out {out} exists; it is replaced when the build finishes"
    assert out.read_text() != old
    # a file that is no records (fifteenth probe D1: replaced, with the note) is refused
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    rc, err, _ = run_main("emit_jax.data.build", ["--source", src, "--out", str(notes),
                                                   "--stage", "1"])
    assert_one_error(rc, err, f"--out {notes}: exists and is not a records file (its first line "
                     "is no record); data.build replaces only its own output: choose another "
                     "path, or move the file away")
    assert notes.read_text() == "my notes\n"


def test_two_builds_of_one_output_the_second_is_refused(tmp_path):
    """Before: two ``data.build`` runs on one ``--out`` at once both exited 0, and the later
    rename silently replaced the other's records. The lock is a real ``flock``, taken here as a
    running build would hold it; the refused run leaves the first one's file alone."""
    from emit_jax.fileio import output_lock

    src = make_mvtec(tmp_path / "ds")
    out = tmp_path / "new" / "s1.jsonl"
    with output_lock(out, what="held by this test", hint="-"):
        rc, err, _ = run_main("emit_jax.data.build", ["--source", src, "--out", str(out),
                                                       "--stage", "1"])
        assert_one_error(rc, err, f"--out {out}: another data.build is writing it (pid "
                         f"{os.getpid()} on ", "wait for it to end, or choose another --out")
        assert os.listdir(out.parent) == [".s1.jsonl.lock"]
    assert os.listdir(out.parent) == []  # the holder's lock file goes when it lets go
    rc, err, _ = run_main("emit_jax.data.build", ["--source", src, "--out", str(out),
                                                   "--stage", "1"])
    assert rc == 0, err
    assert os.listdir(out.parent) == ["s1.jsonl"]  # no lock file left


def test_plan_takes_overrides_as_train_does():
    """Before: ``--config.grpo.G=-2`` was 'unrecognized arguments' (plan took only --set)."""
    rc, err, _ = run_main("emit_jax.plan.command", ["--config", "configs/grpo.py:smoke",
                                            "--config.grpo.G=-2"], via_cli=False)
    assert_one_error(rc, err, "config grpo.G: -2 is below 2")
    rc, err, out = run_main("emit_jax.plan.command", ["--config", "configs/grpo.py:smoke",
                                              "--config.grpo.G=2", "--json"], via_cli=False)
    assert rc == 0 and '"stage"' in out, err


def test_visualize_says_when_the_map_cannot_say_anything(tmp_path):
    from PIL import Image

    q = tmp_path / "q.png"
    Image.new("RGB", (64, 64), (90, 90, 90)).save(q)
    rc, err, _ = run_main("emit_jax.visualize", ["heatmap", "--query", str(q), "--reference",
                                                 str(q), "--window", "100000", "--out",
                                                 str(tmp_path / "h.png")])
    assert rc == 0, err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 2, err
    assert lines[0].startswith("warning: --query and --reference are the same image")
    assert lines[1].startswith("note: --window 100000 reaches past the")


def test_train_workdir_that_is_a_file_is_named_so(tmp_path):
    """Before: "error: in/img.png: File exists"."""
    from emit_jax.errors import ConfigError
    from emit_jax.train import check_workdir_name

    f = tmp_path / "img.png"
    f.write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"--workdir .*img.png: a file, not a folder"):
        check_workdir_name(str(f))


def test_flags_that_would_be_ignored_are_refused(tmp_path, tiny_model):  # noqa: F811
    """Before, each was accepted and had no effect: data.build's --checkpoint with --embedding
    pixels, convert's --bn-mode on a transformers folder, evaluate's --split / --seed on an MMAD
    folder; aot's --json_out onto its --config file replaced the config (data lost)."""
    import shutil

    src = make_mvtec(tmp_path / "ds")
    rc, err, _ = run_main("emit_jax.data.build", [
        "--source", src, "--out", str(tmp_path / "o.jsonl"), "--stage", "1", "--embedding",
        "pixels", "--checkpoint", tiny_model["ckpt"]])
    assert_one_error(rc, err, "--checkpoint: only read with --embedding vit or auto")
    rc, err, _ = run_main("emit_jax.convert", ["--hf", tiny_model["hf"], "--out",
                                               str(tmp_path / "cv"), "--bn-mode", "standard"])
    assert_one_error(rc, err, "--window / --ce-layers / --bn-mode apply to internvl_chat folders")
    for flag, value in (("--split", "test"), ("--seed", "3")):
        rc, err, _ = run_main("emit_jax.evaluate", ["--checkpoint", tiny_model["ckpt"], "--data",
                                                    MMAD, flag, value])
        assert_one_error(rc, err, f"{flag} {value}: only for an MVTec-style folder")
    cfg = tmp_path / "cfg.py"
    shutil.copy(os.path.join(ROOT, "emit_jax", "configs", "grpo.py"), cfg)
    before = cfg.read_bytes()
    rc, err, _ = run_main("emit_jax.aot.command", ["--config", f"{cfg}:smoke", "--topology",
                                                   "v5e:2x2", "--json_out", str(cfg)],
                          via_cli=False)
    assert_one_error(rc, err, "--config")
    assert cfg.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["cfg.py", "ds"]


def test_demo_refuses_a_folder_it_did_not_write(tmp_path):
    """Before: ``--workdir`` onto a dataset or a checkpoint wrote three demo folders into it."""
    (tmp_path / "x.png").write_bytes(b"x")
    rc, err, _ = run_main("emit_jax.demo", ["--workdir", str(tmp_path), "--new-tokens", "1"])
    assert_one_error(rc, err, "holds 'x.png', which the demo did not write")
    assert os.listdir(tmp_path) == ["x.png"]
    from emit_jax.demo import DEMO_ENTRY

    assert all(DEMO_ENTRY.match(n) for n in ("hf-20261204-134500", "ckpt-20261204-134500",
                                             "hf-export-20261204-134500"))


def test_convert_refuses_a_tokenizer_file_that_is_not_json(tmp_path, tiny_model):  # noqa: F811
    """Before: the broken tokenizer.json was copied into the checkpoint's assets (exit 0) and
    evaluate failed on it later."""
    import shutil

    src = tmp_path / "hf"
    shutil.copytree(tiny_model["hf"], src)
    (src / "tokenizer.json").write_text("garbage")
    rc, err, _ = run_main("emit_jax.convert", ["--hf", str(src), "--out", str(tmp_path / "cv")])
    assert_one_error(rc, err, "tokenizer.json: not a readable tokenizer file (malformed JSON")
    assert not os.path.exists(tmp_path / "cv")


def test_copied_tokenizer_files_follow_the_umask(umask, tmp_path, tiny_model):
    """Twenty-second probe U01 / U03: under ``umask 077`` (or 027) ``export`` and ``convert``
    wrote their weights 0600 but copied tokenizer.json, tokenizer_config.json and
    chat_template.jinja with their source's mode (0644)."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(tiny_model["hf"], src)
    for name in ("tokenizer.json", "chat_template.jinja"):
        (src / name).write_text("{}" if name.endswith(".json") else "{{ messages }}")
        os.chmod(src / name, 0o644)
    umask(0o077)
    rc, err, _ = run_main("emit_jax.convert", ["--hf", str(src), "--out", str(tmp_path / "ck")])
    assert rc == 0, err
    rc, err, _ = run_main("emit_jax.export", ["--checkpoint", str(tmp_path / "ck"), "--out",
                                              str(tmp_path / "ex")])
    assert rc == 0, err
    for top in (tmp_path / "ck", tmp_path / "ex"):
        files = [os.path.join(d, f) for d, _, fs in os.walk(top) for f in fs]
        assert any(f.endswith("chat_template.jinja") for f in files), files
        for f in files:
            assert _mode(f) == 0o600, (f, oct(_mode(f)))
