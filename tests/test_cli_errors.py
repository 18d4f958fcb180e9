"""Input a user can get wrong, CLI by CLI (issue 30, item 4): images Pillow refuses (a PNG whose
header declares 20000 x 20000 pixels: ``DecompressionBombError``, no ``OSError``), file names
that are not valid UTF-8, config files and ``--config.`` overrides that cannot be used, and
numeric flags out of range (negative, zero, NaN, inf where meaningless).

Every case runs the command's real entry point — in-process through ``main`` (and
``emit_jax.cli.run`` where ``python -m`` uses it), or, for ``emit_jax.train`` (absl), as a
subprocess — and must end with exit status 2, exactly one line on stderr, ``<prog>: error:
<message>`` naming the flag or file, no traceback, and nothing written. Each check happens
before a model is loaded, so the file runs in well under a minute apart from the train
subprocesses. ``--policy skip`` cases check the skipped input is counted instead.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import re
import struct
import subprocess
import sys
import zlib

import pytest

from conftest import interruptible, subprocess_env
from test_bad_inputs import MMAD, ROOT, copy_mmad, snapshot
from test_tasks import make_mvtec

ERROR_LINE = re.compile(r"^(python -m )?(emit_jax(\.\w+)+|bench): error: \S")
SMOKE = "configs/grpo.py:smoke"
BAD_NAME = b"\xff.png"  # not UTF-8: os.listdir hands it over as '\udcff.png'

if ROOT not in sys.path:  # the benchmarks live in the repository's bench/, not in the package
    sys.path.insert(0, ROOT)


def bomb_png(path) -> str:
    """A PNG whose header declares 20000 x 20000 pixels (400 M, over Pillow's 2 x
    ``MAX_IMAGE_PIXELS``): ``Image.open`` raises ``DecompressionBombError``. 60 bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + \
            struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))
    return str(path)


def non_utf8_file(folder, like: str) -> str:
    """A copy of the image ``like`` named ``b'\\xff.png'`` in ``folder``; its str path."""
    target = os.path.join(os.fsencode(str(folder)), BAD_NAME)
    with open(like, "rb") as src, open(target, "wb") as dst:
        dst.write(src.read())
    return os.fsdecode(target)


def run_main(module: str, args, *, prog: str | None = None, via_cli: bool = True):
    """``python -m module args`` in-process: ``cli.run(main)`` (the commands whose ``__main__``
    uses it) or ``main`` itself (plan, aot, bench handle their errors in ``main``)."""
    from emit_jax import cli

    main = importlib.import_module(module).main
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            rc = cli.run(main, list(args), prog=prog or module) if via_cli else main(list(args))
        except SystemExit as e:
            rc = e.code
        except KeyboardInterrupt as e:  # escaped the command: a failure of the test, not its end
            rc = f"KeyboardInterrupt({e}) escaped"
    return rc, err.getvalue(), out.getvalue()


def assert_one_error(rc, err: str, *needles: str, prog: str | None = None) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, (rc, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    assert len(lines) == 1, err[-3000:]
    assert ERROR_LINE.match(lines[0]), lines[0]
    if prog:
        assert lines[0].startswith(f"{prog}: error: "), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def assert_interrupted(rc, err: str, prog: str, signame: str = "SIGINT") -> None:
    """Ctrl-C / SIGTERM: exit 130, one line ``<prog>: interrupted (<signal>); ...``, no
    traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 130, (rc, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    assert lines == [f"{prog}: interrupted ({signame}); nothing half-written is left"], err[-3000:]


def left_behind(folder) -> list[str]:
    """Temporary files and folders of atomic writes under ``folder``."""
    return [os.path.join(d, n) for d, dirs, files in os.walk(folder) for n in dirs + files
            if n.startswith(".tmp-")]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny random InternVL as a transformers folder (``hf``) and an Orbax model checkpoint
    (``ckpt``), for convert / export."""
    import dataclasses

    from flax import nnx

    from emit_jax import checkpoint, hf
    from emit_jax.models import architectures
    from emit_jax.models.internvl import InternVL

    cfg = architectures.tiny()
    cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, image_size=56, num_hidden_layers=1),
                      text=dataclasses.replace(cfg.text, vocab_size=64, num_hidden_layers=1),
                      image_token_id=63)
    model = InternVL(cfg, rngs=nnx.Rngs(0))
    d = tmp_path_factory.mktemp("tiny_model")
    hf.save(model, d / "hf")
    checkpoint.save_model(model, d / "ckpt")
    return {"hf": str(d / "hf"), "ckpt": str(d / "ckpt")}


@pytest.fixture
def nothing_written(tmp_path):
    """Fails the test when anything under ``tmp_path`` changed after the inputs were made
    (call the fixture's value once they are)."""
    state = {}

    def mark():
        state["before"] = snapshot(tmp_path)
    yield mark
    if "before" in state:
        assert snapshot(tmp_path) == state["before"], "output left behind"


@pytest.fixture
def dataset(tmp_path):
    return make_mvtec(tmp_path / "ds", classes=("widget",))


# ------------------------------------------------------------------------------- cli helpers
class TestNumericTypes:
    @pytest.mark.parametrize("helper,text,needle", [
        ("positive_int", "0", "must be >= 1, got 0"),
        ("positive_int", "-3", "must be >= 1, got -3"),
        ("positive_int", "1.5", "expected a whole number, got '1.5'"),
        ("positive_int", "nan", "expected a whole number"),
        ("nonneg_int", "-1", "must be >= 0, got -1"),
        # before: accepted, an OverflowError traceback in jitted code
        ("positive_int", "99999999999999999999", "must be <= 2147483647, got 99999999999999999999"),
        ("nonneg_int", "2147483648", "must be <= 2147483647"),
        ("positive_float", "0", "must be > 0, got 0"),
        ("positive_float", "nan", "expected a finite number, got 'nan'"),
        ("positive_float", "-inf", "expected a finite number"),
        ("nonneg_float", "-0.5", "must be >= 0"),
        ("unit_float", "1.5", "must be <= 1"),
        ("percent", "100", "must be < 100"),
        ("percent", "inf", "expected a finite number"),
    ])
    def test_rejects(self, helper, text, needle):
        import argparse

        from emit_jax import cli

        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(needle)):
            getattr(cli, helper)(text)

    def test_accepts(self):
        from emit_jax import cli

        assert cli.positive_int("3") == 3 and cli.nonneg_int("0") == 0
        assert cli.int_at_least(2)("2") == 2 and cli.percent("0") == 0.0
        assert cli.unit_float("1") == 1.0 and cli.positive_float("1e-3") == 1e-3

    def test_an_option_given_twice_with_different_values_is_refused(self):
        """Before: the last one silently won (``--stage 1 --stage 2`` built stage 2, ``--out a
        --out b`` wrote b)."""
        from emit_jax import cli
        from emit_jax.errors import ConfigError

        p = cli.Parser(prog="x", error_type=ConfigError)
        p.add_argument("--n", type=cli.positive_int)
        p.add_argument("--layers", type=cli.positive_int, nargs="+")
        with pytest.raises(ConfigError, match=re.escape("argument --n: given twice ('1', then "
                                                        "'2'); give it once")):
            p.parse_args(["--n", "1", "--n", "2"])
        with pytest.raises(ConfigError, match="argument --layers: given twice"):
            p.parse_args(["--layers", "1", "2", "--layers", "3"])
        assert p.parse_args(["--n", "3", "--n", "3"]).n == 3  # the same value twice: fine
        assert p.parse_args(["--n", "4"]).n == 4  # a new parse starts afresh

    def test_subcommand_usage_errors_are_one_line(self):
        """A sub-command's parser raises the parent's error type, not ``ValueError``."""
        from emit_jax import cli
        from emit_jax.errors import ConfigError

        p = cli.Parser(prog="x", error_type=ConfigError)
        sub = p.add_subparsers(dest="what", required=True)
        sub.add_parser("go").add_argument("--n", type=cli.positive_int)
        with pytest.raises(ConfigError, match="argument --n: must be >= 1, got 0"):
            p.parse_args(["go", "--n", "0"])


# ------------------------------------------------------------------------------- interrupts
def start(args, **kw):
    """``python ARGS`` from the repository root (stdout, stderr piped; SIGINT not ignored)."""
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=interruptible, **kw)


def run_script(code: str, timeout: float = 120):
    """``python -c code`` to its end: (status, stdout, stderr)."""
    p = start(["-c", code], env=subprocess_env(PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"))
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


class TestInterrupts:
    """Ctrl-C / SIGTERM, every command (``emit_jax.cli``): one line, exit 130, whenever it
    lands (real signals, in subprocesses)."""

    @pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM", "SIGHUP"])
    def test_a_signal_while_the_modules_load(self, tmp_path, dataset, signame):
        """Half a second in, ``import jax`` runs. Before: Python's ``KeyboardInterrupt`` was
        swallowed by jax's gc callback ("Exception ignored in _xla_gc_callback") and the command
        ran on to exit 0, or became an ``ImportError`` traceback, or a segfault; SIGTERM
        killed it (exit -15)."""
        import signal
        import time

        before = snapshot(tmp_path)
        p = start(["-m", BUILD, *build_args(dataset, tmp_path)],
                  env=subprocess_env(PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"))
        time.sleep(0.5)
        p.send_signal(getattr(signal, signame))
        _, err = p.communicate(timeout=120)
        assert_interrupted(p.returncode, err, BUILD, signame)
        assert snapshot(tmp_path) == before

    def test_a_keyboard_interrupt_lost_in_a_gc_callback_still_stops(self):
        """The signal handled while a gc callback runs (jax's runs at every collection): Python
        drops the ``KeyboardInterrupt`` raised there. Before: "Exception ignored in", then the
        command finished, exit 0."""
        rc, out, err = run_script(
            "import gc, os, signal, sys, time\n"
            "from emit_jax import cli\n"
            "def main(argv):\n"
            "    sent = []\n"
            "    def callback(phase, info):\n"
            "        if phase == 'start' and not sent:\n"
            "            sent.append(1)\n"
            "            os.kill(os.getpid(), signal.SIGINT)\n"
            "            for _ in range(10000): pass\n"
            "    gc.callbacks.append(callback)\n"
            "    gc.collect()\n"
            "    assert sent\n"
            "    for _ in range(500): time.sleep(0.01)\n"
            "    print('finished')\n"
            "sys.exit(cli.run(main, [], prog='x'))\n")
        assert_interrupted(rc, err, "x")
        assert "finished" not in out

    def test_a_signal_inside_an_import_waits_for_its_end(self, tmp_path):
        """A lazy import inside ``main`` (raised into a C extension's initialisation, the
        ``KeyboardInterrupt`` crashes it or becomes an ``ImportError``): the interrupt comes
        once the import is complete. Before: raised in the middle of the module."""
        (tmp_path / "slow_module.py").write_text(
            "import os, signal\n"
            "os.kill(os.getpid(), signal.SIGINT)\n"
            "for _ in range(10**6): pass\n"
            "print('imported in full')\n")
        rc, out, err = run_script(
            "import importlib, sys, time\n"
            f"sys.path.insert(0, {str(tmp_path)!r})\n"
            "from emit_jax import cli\n"
            "def main(argv):\n"
            "    importlib.import_module('slow_module')\n"
            "    for _ in range(500): time.sleep(0.01)\n"
            "    print('finished')\n"
            "sys.exit(cli.run(main, [], prog='x'))\n")
        assert_interrupted(rc, err, "x")
        assert out.splitlines() == ["imported in full"]

    def test_nothing_after_the_line_from_threads_shutting_down(self, tmp_path):
        """A SIGTERM during an Orbax checkpoint read (``export``): TensorStore's callbacks into
        Orbax's closed asyncio loops raise ``RuntimeError: Event loop is closed`` (reported as
        unraisable) in threads the exit waits for. Before: a screen of tracebacks after the
        line."""
        rc, _, err = run_patched(
            "emit_jax.export", ["--checkpoint", str(tmp_path / "ckpt"), "--out",
                                str(tmp_path / "hf")], "emit_jax.checkpoint.read_meta",
            "class Late:\n"
            "    def __del__(self):\n"
            "        raise RuntimeError('Event loop is closed')\n"
            "def shutting_down():\n"
            "    time.sleep(0.1)\n"
            "    for _ in range(40):\n"
            "        Late()\n"
            "        time.sleep(0.005)\n"
            "    raise RuntimeError('Event loop is closed')\n"
            "def work(*a, **k):\n"
            "    threading.Thread(target=shutting_down).start()\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(60)\n")
        assert_interrupted(rc, err, "emit_jax.export", "SIGTERM")
        assert not os.path.exists(tmp_path / "hf")

    @pytest.mark.parametrize("module,args,target", [
        ("emit_jax.plan", ["--config", SMOKE], "emit_jax.plan.command.make_report"),
        ("emit_jax.aot", ["--config", SMOKE, "--topology", "v5e:2x2"],
         "emit_jax.aot.command.require_libtpu"),
        ("bench", ["matmul", "--n", "8"], "bench.steps.bench_matmul"),
    ])
    def test_plan_aot_bench(self, module, args, target):
        """Ctrl-C while their ``main`` works. Before: a ``KeyboardInterrupt`` traceback (they
        did not go through ``cli.run``)."""
        rc, out, err = run_patched(module, args, target,
                                   "def work(*a, **k):\n"
                                   "    os.kill(os.getpid(), signal.SIGINT)\n"
                                   "    time.sleep(60)\n")
        assert_interrupted(rc, err, "python -m bench" if module == "bench" else module)
        assert out == ""


def run_patched(module: str, args, target: str, work: str):
    """``python -m module args``, its ``__main__`` run as it is (``runpy``) with the function
    ``target`` (``package.module.name``) replaced by ``work`` (code defining ``work``; ``os``,
    ``signal``, ``threading``, ``time`` imported): (status, stdout, stderr)."""
    owner, attr = target.rsplit(".", 1)
    return run_script(
        "import importlib, os, runpy, signal, sys, threading, time\n" + work +
        f"setattr(importlib.import_module({owner!r}), {attr!r}, work)\n"
        f"sys.argv = [{module!r}, *{list(args)!r}]\n"
        f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n")


# ------------------------------------------------------------------------------- data.build
BUILD = "emit_jax.data.build"


def build_args(src, tmp_path, *extra):
    return ["--source", str(src), "--out", str(tmp_path / "train.jsonl"), "--stage", "1", *extra]


class TestDataBuild:
    def test_bomb_image_is_one_line(self, tmp_path, dataset, nothing_written):
        bad = bomb_png(os.path.join(dataset, "widget", "train", "good", "000.png"))
        nothing_written()
        rc, err, _ = run_main(BUILD, build_args(dataset, tmp_path))
        assert_one_error(rc, err, bad, "not a readable image", "exceeds limit", prog=BUILD)

    def test_bomb_mask_is_one_line(self, tmp_path, dataset, nothing_written):
        bad = bomb_png(os.path.join(dataset, "widget", "ground_truth", "dent", "000_mask.png"))
        nothing_written()
        rc, err, _ = run_main(BUILD, build_args(dataset, tmp_path))
        assert_one_error(rc, err, bad, "not a readable mask", prog=BUILD)

    def test_non_utf8_file_name_is_one_line(self, tmp_path, dataset, nothing_written):
        folder = os.path.join(dataset, "widget", "train", "good")
        non_utf8_file(folder, os.path.join(folder, "000.png"))
        nothing_written()
        rc, err, _ = run_main(BUILD, build_args(dataset, tmp_path))
        assert_one_error(rc, err, folder, repr(BAD_NAME), "not valid UTF-8", prog=BUILD)

    def test_non_utf8_class_folder_is_one_line(self, tmp_path, dataset, nothing_written):
        root = os.fsencode(dataset)
        os.rename(os.path.join(root, b"widget"), os.path.join(root, b"w\xe9"))  # latin-1 'wé'
        make_mvtec(tmp_path / "ds", classes=("bolt",))
        nothing_written()
        rc, err, _ = run_main(BUILD, build_args(dataset, tmp_path))
        assert_one_error(rc, err, repr(b"w\xe9"), "not valid UTF-8", prog=BUILD)

    @pytest.mark.parametrize("where", ["image", "mask", "name", "corrupt"])
    def test_policy_skip_skips_and_counts(self, tmp_path, dataset, where):
        good = os.path.join(dataset, "widget", "train", "good")
        if where == "image":
            bad = bomb_png(os.path.join(good, "000.png"))
        elif where == "mask":
            bomb_png(os.path.join(dataset, "widget", "ground_truth", "dent", "000_mask.png"))
            bad = os.path.join(dataset, "widget", "test", "dent", "000.png")
        elif where == "name":
            bad = non_utf8_file(good, os.path.join(good, "000.png"))
        else:  # not an image at all: skipped too, where it used to stop the reference search
            bad = os.path.join(good, "001.png")
            with open(bad, "wb") as f:
                f.write(b"this is not a PNG file")
        rc, err, out = run_main(BUILD, build_args(dataset, tmp_path, "--policy", "skip"))
        assert rc == 0 and "Traceback" not in err, err[-3000:]
        summary = json.loads(out.strip().splitlines()[-1])
        assert summary["skipped"] == 1 and summary["records"] > 0, summary
        text = (tmp_path / "train.jsonl").read_text(encoding="utf-8")
        assert os.path.relpath(bad, dataset) not in text and "\\udcff" not in text

    @pytest.mark.parametrize("policy", ["error", "skip"])
    @pytest.mark.parametrize("entry", ["train", "train/good"])
    def test_a_split_that_is_a_file(self, tmp_path, dataset, nothing_written, policy, entry):
        """``<class>/train`` a regular file, or ``<class>/train/good`` inside the split. Before:
        their images silently dropped, exit 0 with ``"skipped": 0``. (A hidden file inside a
        split, such as ``.DS_Store``, is no problem.)"""
        import shutil

        train_dir = os.path.join(dataset, "widget", *entry.split("/"))
        shutil.rmtree(train_dir)
        with open(train_dir, "w") as f:
            f.write("not a folder")
        with open(os.path.join(dataset, "widget", "test", ".DS_Store"), "w") as f:
            f.write("Finder's own")
        if policy == "error":
            nothing_written()
            rc, err, _ = run_main(BUILD, build_args(dataset, tmp_path))
            assert_one_error(rc, err, f"{train_dir}: not a folder", prog=BUILD)
            return
        rc, err, out = run_main(BUILD, build_args(dataset, tmp_path, "--policy", "skip"))
        assert rc == 0 and "Traceback" not in err, err[-3000:]
        summary = json.loads(out.strip().splitlines()[-1])
        assert summary["skipped"] == 1 and summary["records"] > 0, summary

    @pytest.mark.parametrize("flag,value,needle", [
        ("--seed", "-1", "must be >= 0, got -1"),
        ("--max-per-type", "0", "must be >= 1, got 0"),
        ("--max-per-type", "-2", "must be >= 1, got -2"),
        ("--max-per-type", "nan", "expected a whole number"),
        ("--adfm-frame", "0", "must be >= 14, got 0"),
        # nineteenth probe BB08: a 3 x 3 frame made every box [[1, 1, 2, 2]] without a word
        ("--adfm-frame", "3", "must be >= 14, got 3"),
        # before: a mask resized to 2**31-1 squared: killed for memory at 23 GB, no line
        ("--adfm-frame", "2147483647", "must be <= 8192"),
        ("--stage", "3", "invalid choice"),
    ])
    def test_numeric_flags(self, tmp_path, dataset, nothing_written, flag, value, needle):
        nothing_written()
        args = build_args(dataset, tmp_path)
        if flag == "--stage":
            args[args.index("--stage") + 1] = value
        else:
            args += [flag, value]
        rc, err, _ = run_main(BUILD, args)
        assert_one_error(rc, err, f"argument {flag}", needle, prog=BUILD)


    @pytest.mark.parametrize("dk,has", [({}, "none"), ({"ds": {"bolt": {"good": "Bolts."}}},
                                                       "'bolt'")])
    def test_domain_knowledge_without_the_dataset_classes(self, tmp_path, dataset,
                                                          nothing_written, dk, has):
        """Before: exit 0, every prompt silently without domain knowledge."""
        path = tmp_path / "dk.json"
        path.write_text(json.dumps(dk))
        nothing_written()
        rc, err, _ = run_main(BUILD, build_args(dataset, tmp_path, "--domain-knowledge",
                                                str(path)))
        assert_one_error(rc, err, str(path), "no domain knowledge for class(es) 'widget'",
                         f"(it has {has})", prog=BUILD)

    def test_an_option_given_twice(self, tmp_path, dataset, nothing_written):
        """Before: ``--stage 1 --stage 2`` wrote stage-2 records, exit 0."""
        nothing_written()
        rc, err, _ = run_main(BUILD, build_args(dataset, tmp_path, "--stage", "2"))
        assert_one_error(rc, err, "argument --stage: given twice ('1', then '2')", prog=BUILD)

    def test_out_name_too_long_is_found_before_the_work(self, tmp_path, dataset, monkeypatch,
                                                        nothing_written):
        """Before: the records were built (every image read and compared), then the rename to
        ``--out`` failed."""
        from emit_jax.data import tasks

        def no_work(*a, **k):
            raise AssertionError("the records were built before --out was checked")
        monkeypatch.setattr(tasks, "select_references", no_work)
        nothing_written()
        out = str(tmp_path / ("t" * 256 + ".jsonl"))
        rc, err, _ = run_main(BUILD, ["--source", dataset, "--out", out, "--stage", "1"])
        assert_one_error(rc, err, f"{out}: File name too long", prog=BUILD)

    def test_out_path_too_long_leaves_no_folders(self, tmp_path, dataset, nothing_written):
        """25 folder names of 200 characters: each fits, the path does not. Before: the records
        were built, then ``makedirs`` failed half-way, leaving 20 empty nested folders."""
        nothing_written()
        out = os.path.join(str(tmp_path), *["d" * 200] * 25, "train.jsonl")
        rc, err, _ = run_main(BUILD, ["--source", dataset, "--out", out, "--stage", "1"])
        assert_one_error(rc, err, f"{out}: File name too long", prog=BUILD)

    def test_ctrl_c_while_writing_is_one_line_and_leaves_nothing(self, tmp_path, dataset,
                                                                  monkeypatch, nothing_written):
        """Before: a KeyboardInterrupt traceback (tens of lines)."""
        from emit_jax.data import jsonl

        real = jsonl.records

        def records(*a, **k):  # Ctrl-C after the first record is written
            for i, rec in enumerate(real(*a, **k)):
                if i == 1:
                    raise KeyboardInterrupt
                yield rec
        monkeypatch.setattr(jsonl, "records", records)
        nothing_written()
        rc, err, _ = run_main(BUILD, build_args(dataset, tmp_path))
        assert_interrupted(rc, err, BUILD)

    def test_sigterm_while_writing_is_one_line_and_leaves_nothing(self, tmp_path, dataset):
        """Before: killed by the signal (exit -15), its ``.tmp-*.jsonl`` left behind."""
        script = (
            "import os, signal, sys\n"
            "from emit_jax import cli\n"
            "from emit_jax.data import build, jsonl\n"
            "real = jsonl.records\n"
            "def records(*a, **k):\n"
            "    for i, rec in enumerate(real(*a, **k)):\n"
            "        if i == 1:\n"
            "            os.kill(os.getpid(), signal.SIGTERM)\n"
            "        yield rec\n"
            "jsonl.records = records\n"
            f"sys.exit(cli.run(build.main, {build_args(dataset, tmp_path)!r}, prog={BUILD!r}))\n")
        before = snapshot(tmp_path)
        r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, text=True,
                           capture_output=True, timeout=300,
                           env=subprocess_env(PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"))
        assert_interrupted(r.returncode, r.stderr, BUILD, "SIGTERM")
        assert not left_behind(tmp_path) and snapshot(tmp_path) == before


# ------------------------------------------------------------------------------- evaluate
EVALUATE = "emit_jax.evaluate"


def evaluate_args(data, tmp_path, *extra):
    # the checkpoint is never reached: every case fails on the flags or the data first
    return ["--checkpoint", str(tmp_path / "no-checkpoint"), "--data", str(data),
            "--out", str(tmp_path / "results.json"), *extra]


class TestEvaluate:
    def test_non_utf8_file_name_in_dataset(self, tmp_path, dataset, nothing_written):
        folder = os.path.join(dataset, "widget", "test", "good")
        non_utf8_file(folder, os.path.join(folder, "000.png"))
        nothing_written()
        rc, err, _ = run_main(EVALUATE, evaluate_args(dataset, tmp_path))
        assert_one_error(rc, err, folder, repr(BAD_NAME), "not valid UTF-8", prog=EVALUATE)

    def test_non_utf8_path_in_mmad_json(self, tmp_path, nothing_written):
        holder = {}

        def edit(data):
            key = holder["key"] = next(iter(data))
            ref = data[key]["similar_templates"][0]
            data[key]["similar_templates"][0] = ref.rsplit("/", 1)[0] + "/\udcff.png"
        data = copy_mmad(tmp_path, edit)  # json.dumps writes the escape "\udcff"
        nothing_written()
        rc, err, _ = run_main(EVALUATE, evaluate_args(data, tmp_path))
        assert_one_error(rc, err, "mmad.json", holder["key"], "similar_templates[0]",
                         "\\udcff.png", "not valid UTF-8", prog=EVALUATE)

    def test_bomb_image_in_mmad(self, tmp_path, nothing_written):
        data = copy_mmad(tmp_path, lambda d: None)
        with open(os.path.join(data, "mmad.json"), encoding="utf-8") as f:
            key = next(iter(json.load(f)))
        bad = bomb_png(os.path.join(data, *key.split("/")))
        nothing_written()
        rc, err, _ = run_main(EVALUATE, evaluate_args(data, tmp_path))
        assert_one_error(rc, err, bad, "not a readable image", prog=EVALUATE)

    def test_bomb_image_in_dataset(self, tmp_path, dataset, nothing_written):
        bad = bomb_png(os.path.join(dataset, "widget", "train", "good", "002.png"))
        nothing_written()
        rc, err, _ = run_main(EVALUATE, evaluate_args(dataset, tmp_path))
        assert_one_error(rc, err, bad, "not a readable image", prog=EVALUATE)

    def test_mmad_json_that_is_a_folder(self, tmp_path, nothing_written):
        """Before: taken for an MVTec-style folder: ``no class folders with train/ or test/``."""
        data = copy_mmad(tmp_path, lambda d: None)
        os.remove(os.path.join(data, "mmad.json"))
        os.mkdir(os.path.join(data, "mmad.json"))
        nothing_written()
        rc, err, _ = run_main(EVALUATE, evaluate_args(data, tmp_path))
        assert_one_error(rc, err, os.path.join(data, "mmad.json"), "a folder",
                         prog=EVALUATE)

    def test_a_run_answering_into_the_same_out_is_refused_first(self, tmp_path,
                                                                nothing_written):
        """Another run holds ``<out>.partial.jsonl``. Before: this run read its answers, loaded
        the model and was refused only then, or (the other run finished meanwhile) answered
        every question again into a file it cut to the other's length."""
        import fcntl

        from emit_jax.eval import partial

        out = tmp_path / "results.json"
        part = partial.path_for(str(out))
        run = partial.settings(checkpoint=str(tmp_path / "no-checkpoint"), think=False,
                               max_new_tokens=1024, min_new_tokens=1, decoding="greedy",
                               max_tiles=6)
        with open(part, "w", encoding="utf-8") as f:
            f.write(json.dumps(partial.header("ckpt", MMAD, run)) + "\n")
        nothing_written()
        with open(part, "rb") as held:
            fcntl.flock(held, fcntl.LOCK_EX)  # as the running evaluate holds it
            rc, err, _ = run_main(EVALUATE, evaluate_args(MMAD, tmp_path))
        assert_one_error(rc, err, part, "another emit_jax.evaluate run is writing it",
                         prog=EVALUATE)

    def test_answers_file_changed_after_it_was_read_is_not_cut(self, tmp_path):
        """The file a run read is replaced (another run finished and a third started) or
        appears (another run started) before the run opens it to write. Before: the run cut the
        new file to the old one's length (a zero-filled header when it had vanished) or
        started it over, losing the other run's answers."""
        from emit_jax.errors import DataError
        from emit_jax.eval import partial

        path = str(tmp_path / "r.json.partial.jsonl")
        head = partial.header("ckpt", "data", {"think": False})
        w = partial.Writer(path, head, 0)
        w.write(0, "f" * 16, "A", {})
        w.close()
        seen, kept = partial.identity(path), os.path.getsize(path)
        os.replace(path, path + ".old")  # another run's file takes its place
        with open(path, "w", encoding="utf-8") as f:
            f.write("another run's answers\n")
        other = open(path, "rb").read()
        with pytest.raises(DataError, match="another emit_jax.evaluate run changed it"):
            partial.Writer(path, head, kept, expect=seen)
        with pytest.raises(DataError, match="another emit_jax.evaluate run changed it"):
            partial.Writer(path, head, 0, expect=None)  # there was none when this run read
        assert open(path, "rb").read() == other
        os.remove(path)
        with pytest.raises(DataError, match="another emit_jax.evaluate run changed it"):
            partial.Writer(path, head, kept, expect=seen)  # gone: another run finished
        assert not os.path.exists(path)
        os.replace(path + ".old", path)
        w = partial.Writer(path, head, kept, expect=seen)  # unchanged: resumed
        w.close()
        assert os.path.getsize(path) == kept

    @pytest.mark.parametrize("flag,value,needle", [
        ("--limit", "0", "must be >= 1, got 0"),
        ("--limit", "-1", "must be >= 1, got -1"),
        ("--max-tiles", "0", "must be >= 1, got 0"),
        ("--max-new-tokens", "0", "must be >= 1, got 0"),
        ("--max-new-tokens", "inf", "expected a whole number"),
        # before: an OverflowError traceback in generation
        ("--max-new-tokens", "99999999999999999999", "must be <= 1048576"),
        # before: a hang in data/image.py target_ratios (candidate grids grow with its cube)
        ("--max-tiles", "1000000000000", "must be <= 40, got 1000000000000"),
        ("--seed", "-7", "must be >= 0, got -7"),
    ])
    def test_numeric_flags(self, tmp_path, nothing_written, flag, value, needle):
        nothing_written()
        rc, err, _ = run_main(EVALUATE, evaluate_args(MMAD, tmp_path, flag, value))
        assert_one_error(rc, err, f"argument {flag}", needle, prog=EVALUATE)


# ------------------------------------------------------------------------------- convert / export
class TestConvertExport:
    @pytest.mark.parametrize("flag,value,needle", [
        ("--window", "-1", "must be >= 0, got -1"),
        ("--window", "x", "expected a whole number of patches"),
        ("--ce-layers", "0,4", "block numbers start at 1"),
        ("--dtype", "float8", "invalid choice"),
    ])
    def test_convert_flags(self, tmp_path, nothing_written, flag, value, needle):
        nothing_written()
        rc, err, _ = run_main("emit_jax.convert", ["--hf", str(tmp_path / "no-hf"), "--out",
                                                   str(tmp_path / "ckpt"), flag, value])
        assert_one_error(rc, err, f"argument {flag}", needle, prog="emit_jax.convert")

    @pytest.mark.parametrize("extra", [["--window", "3"], ["--ce-layers", "1,2"]])
    def test_convert_missing_folder_with_chat_flags(self, tmp_path, nothing_written, extra):
        """Before: "--window / --ce-layers apply to internvl_chat folders only", not that the
        folder is missing."""
        nothing_written()
        missing = str(tmp_path / "no-hf")
        rc, err, _ = run_main("emit_jax.convert", ["--hf", missing, "--out",
                                                   str(tmp_path / "ckpt"), *extra])
        line = assert_one_error(rc, err, missing, prog="emit_jax.convert")
        assert "apply to internvl_chat folders only" not in line, line

    @pytest.mark.parametrize("value,needle", [
        ("0", "must be at least 1 byte"),
        ("0.0001KB", "must be at least 1 byte"),
        ("-5GB", "bad shard size '-5GB'"),
        ("nanGB", "bad shard size 'nanGB'"),
    ])
    def test_export_shard_size(self, tmp_path, nothing_written, value, needle):
        nothing_written()
        rc, err, _ = run_main("emit_jax.export", [
            "--checkpoint", str(tmp_path / "no-ckpt"), "--out", str(tmp_path / "hf"),
            f"--max-shard-size={value}"])
        assert_one_error(rc, err, "argument --max-shard-size", needle, prog="emit_jax.export")


    @pytest.mark.parametrize("command", ["emit_jax.convert", "emit_jax.export"])
    def test_out_below_a_file_is_named_before_the_model_loads(self, tmp_path, tiny_model,
                                                              nothing_written, monkeypatch,
                                                              command):
        """Before: the model was loaded, then ``<file>: File exists`` (the parent, from
        ``makedirs``), not the path asked for."""
        from emit_jax import checkpoint, hf

        (tmp_path / "a_file").write_text("not a folder")
        out = str(tmp_path / "a_file" / "model")
        src = ["--hf", tiny_model["hf"]] if command.endswith("convert") else \
            ["--checkpoint", tiny_model["ckpt"]]

        def no_load(*a, **k):
            raise AssertionError("the model was loaded before the output path was checked")
        monkeypatch.setattr(hf, "load", no_load)
        monkeypatch.setattr(checkpoint, "load_model", no_load)
        nothing_written()
        rc, err, _ = run_main(command, [*src, "--out", out])
        assert_one_error(rc, err, f"{out}: Not a directory", prog=command)

    @pytest.mark.parametrize("command", ["emit_jax.convert", EVALUATE])
    @pytest.mark.parametrize("field,value,needle", [
        ("hidden_size", "64", "text hidden_size is '64', expected a whole number"),
        ("num_hidden_layers", None, "text num_hidden_layers is None, expected a whole number"),
    ])
    def test_config_json_with_a_wrongly_typed_field(self, tmp_path, tiny_model, nothing_written,
                                                    command, field, value, needle):
        """Before: a TypeError traceback (models/config.py validate, or building the model)."""
        import shutil

        hf_dir = tmp_path / "hf"
        shutil.copytree(tiny_model["hf"], hf_dir)
        raw = json.loads((hf_dir / "config.json").read_text())
        raw["text_config"][field] = value
        (hf_dir / "config.json").write_text(json.dumps(raw))
        nothing_written()
        args = ["--hf", str(hf_dir), "--out", str(tmp_path / "ckpt")] \
            if command.endswith("convert") else ["--checkpoint", str(hf_dir), "--data", MMAD,
                                                 "--out", str(tmp_path / "results.json")]
        rc, err, _ = run_main(command, args)
        assert_one_error(rc, err, os.path.join(str(hf_dir), "config.json"), needle, prog=command)

    def test_export_without_a_tokenizer_says_so(self, tmp_path, tiny_model):
        """A checkpoint with no tokenizer files in its ``assets/``. Before: the folder was
        written without one, and nothing said so."""
        from emit_jax import checkpoint

        assert not os.listdir(checkpoint.assets_dir(tiny_model["ckpt"]))
        out = tmp_path / "hf"
        rc, err, stdout = run_main("emit_jax.export", ["--checkpoint", tiny_model["ckpt"],
                                                       "--out", str(out)])
        lines = [line for line in err.splitlines() if line.strip()]
        assert rc == 0 and len(lines) == 1, err[-3000:]
        assert lines[0].startswith("emit_jax.export: warning: "), lines[0]
        assert "no tokenizer" in lines[0], lines[0]
        assert "the exported folder has no tokenizer files" in lines[0], lines[0]
        assert os.path.isfile(out / "config.json") and not os.path.exists(out / "tokenizer.json")
        assert stdout.startswith("exported ")

    def test_ctrl_c_during_the_checkpoint_write_leaves_nothing(self, tmp_path, tiny_model,
                                                               monkeypatch, nothing_written):
        """Ctrl-C while Orbax writes ``--out``. Before: a KeyboardInterrupt traceback, Orbax's
        writer threads writing on into the temporary folder being removed (``.tmp-<out>-*``
        left behind, a screen of their errors)."""
        import signal

        import orbax.checkpoint as ocp

        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            pytest.skip("SIGINT is ignored in this process")
        real = ocp.StandardCheckpointer.save

        def save(self, *a, **k):  # Ctrl-C once the write has started
            real(self, *a, **k)
            os.kill(os.getpid(), signal.SIGINT)
        monkeypatch.setattr(ocp.StandardCheckpointer, "save", save)
        nothing_written()
        rc, err, _ = run_main("emit_jax.convert", ["--hf", tiny_model["hf"], "--out",
                                                   str(tmp_path / "ckpt")])
        assert_interrupted(rc, err, "emit_jax.convert")
        assert not left_behind(tmp_path)

    def test_ctrl_c_during_the_checkpoint_read_is_not_a_damaged_checkpoint(
            self, tmp_path, tiny_model, monkeypatch, nothing_written):
        """Ctrl-C while TensorStore reads comes back wrapped in its own ``Exception``. Before:
        ``error: .../params: cannot restore (Exception: Encountered error while reading ...)``,
        exit 2: a good checkpoint reported damaged."""
        import orbax.checkpoint as ocp

        def restore(self, *a, **k):
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt:
                raise Exception("Encountered error while reading array index: (slice(0, 64, 1),)")
        monkeypatch.setattr(ocp.StandardCheckpointer, "restore", restore)
        nothing_written()
        rc, err, _ = run_main("emit_jax.export", ["--checkpoint", tiny_model["ckpt"], "--out",
                                                  str(tmp_path / "hf")])
        assert rc == 130 and "cannot restore" not in err and "Traceback" not in err, err
        assert err.startswith("emit_jax.export: interrupted ("), err


# ------------------------------------------------------------------------------- visualize
VISUALIZE = "emit_jax.visualize"


class TestVisualize:
    def heatmap(self, dataset, tmp_path, *extra, query=None):
        return ["heatmap", "--query", query or os.path.join(dataset, "widget", "test", "good",
                                                            "000.png"),
                "--reference", os.path.join(dataset, "widget", "train", "good", "000.png"),
                "--out", str(tmp_path / "heat.png"), *extra]

    def test_bomb_query(self, tmp_path, dataset, nothing_written):
        bad = bomb_png(tmp_path / "bomb.png")
        nothing_written()
        rc, err, _ = run_main(VISUALIZE, self.heatmap(dataset, tmp_path, query=bad))
        assert_one_error(rc, err, bad, "not a readable image", prog=VISUALIZE)

    @pytest.mark.parametrize("extra,needles", [
        (("--window", "-1"), ("argument --window", "must be >= 0, got -1")),
        # before: an OverflowError traceback in ops/heatmap.py
        (("--window", "99999999999999999999"), ("argument --window", "must be <= 2147483647")),
        (("--layers", "0", "2"), ("argument --layers", "must be >= 1, got 0")),
        (("--layers", "2", "99"), ("--layers 2 99", "blocks 1..")),
        (("--layers", "2", "2"), ("--layers 2 2", "a block is named twice")),
        (("--arch", "internvl9"), ("argument --arch", "invalid choice: 'internvl9'")),
    ])
    def test_flags(self, tmp_path, dataset, nothing_written, extra, needles):
        nothing_written()
        rc, err, _ = run_main(VISUALIZE, self.heatmap(dataset, tmp_path, *extra))
        assert_one_error(rc, err, *needles, prog=VISUALIZE)

    @pytest.mark.parametrize("name,needle", [
        ("heat.txt", "unknown image file extension '.txt'"),  # before: a matplotlib traceback
        ("heat", "no image file extension"),  # before: wrote heat.png, exit 0
        ("adir", "no image file extension"),  # a folder; before: wrote adir.png, exit 0
        ("a_file/heat.png", "a_file/heat.png: Not a directory"),  # before: "a_file: File exists"
    ])
    def test_out_that_cannot_be_an_image(self, tmp_path, dataset, nothing_written, name,
                                         needle):
        (tmp_path / "adir").mkdir()
        (tmp_path / "a_file").write_text("not a folder")
        nothing_written()
        args = self.heatmap(dataset, tmp_path)
        args[args.index("--out") + 1] = str(tmp_path / name)
        rc, err, _ = run_main(VISUALIZE, args)
        assert_one_error(rc, err, needle, prog=VISUALIZE)

    def test_unknown_subcommand(self, tmp_path, nothing_written):
        nothing_written()
        rc, err, _ = run_main(VISUALIZE, ["heatmapp"])
        assert_one_error(rc, err, "invalid choice: 'heatmapp'", prog=VISUALIZE)


# ------------------------------------------------------------------------------- plan / aot
class TestPlanAot:
    @pytest.mark.parametrize("flag,value,needle", [
        ("--devices", "0", "must be >= 1, got 0"),
        ("--headroom", "nan", "expected a finite number"),
        ("--headroom", "100", "must be < 100"),
        ("--prompt_len", "-4", "must be >= 1, got -4"),
        ("--label_tokens", "0", "must be >= 1, got 0"),
        ("--images_per_sample", "-1", "must be >= 0, got -1"),
        # before: planned, printing absurd GiB
        ("--prompt_len", "99999999999999999999", "must be <= 1048576"),
        ("--label_tokens", "2147483648", "must be <= 1048576"),
    ])
    def test_plan_flags(self, flag, value, needle):
        rc, err, out = run_main("emit_jax.plan.command", ["--config", SMOKE, flag, value],
                                via_cli=False)
        assert_one_error(rc, err, f"argument {flag}", needle, prog="emit_jax.plan")
        assert out == ""

    @pytest.mark.parametrize("value,needle", [("100000", "is above 40"), ("0", "is below 1")])
    def test_plan_max_tiles_is_bounded(self, value, needle):
        """Before: ``--set data.max_tiles=100000`` hung in the tile-grid search."""
        rc, err, out = run_main("emit_jax.plan.command",
                                ["--config", SMOKE, "--stage", "grpo", "--set",
                                 f"data.max_tiles={value}"], via_cli=False)
        assert_one_error(rc, err, f"config data.max_tiles: {value} {needle}",
                         prog="emit_jax.plan")

    def test_a_set_given_twice_with_two_values(self):
        """Before: the last ``--set`` won without a word (train refuses the same)."""
        rc, err, out = run_main("emit_jax.plan.command",
                                ["--config", SMOKE, "--set", "grpo.G=3", "--set", "grpo.G=4"],
                                via_cli=False)
        assert_one_error(rc, err, "config grpo.G: given twice, as '3' and '4'",
                         prog="emit_jax.plan")
        rc, _, out = run_main("emit_jax.plan.command", ["--config", SMOKE, "--set", "grpo.G=4",
                                                        "--set", "grpo.G=4"], via_cli=False)
        assert rc == 0 and out

    @pytest.mark.parametrize("args,needle", [
        # before: planned "32 sequences" for 4,611,686,014,132,420,609 devices
        (["--mesh", "fsdp=2147483647,data=2147483647"], "spans 4611686014132420609 devices; "
         "at most 1048576"),
        (["--devices", "2097152", "--mesh", "fsdp=-1"], "argument --devices: must be <= 1048576"),
    ])
    def test_plan_device_count_is_bounded(self, args, needle):
        rc, err, _ = run_main("emit_jax.plan.command", ["--config", SMOKE, *args], via_cli=False)
        assert_one_error(rc, err, needle, prog="emit_jax.plan")

    def test_a_mesh_axis_given_twice(self):
        """Before: accepted, the last size silently won (planned fsdp=2)."""
        rc, err, out = run_main("emit_jax.plan.command", ["--config", SMOKE, "--mesh",
                                                          "fsdp=1,fsdp=2"], via_cli=False)
        assert_one_error(rc, err, "--mesh 'fsdp=1,fsdp=2'", "axis 'fsdp' is given twice",
                         prog="emit_jax.plan")
        assert out == ""

    def test_misspelt_config_variant(self):
        """Before: ``configs/grpo.py:smok`` planned the full recipe, exit 0 (and ``train`` ran
        it: hours instead of the smoke run's minute)."""
        rc, err, out = run_main("emit_jax.plan.command", ["--config", "configs/grpo.py:smok"],
                                via_cli=False)
        assert_one_error(rc, err, "config configs/grpo.py:smok: unknown variant 'smok'",
                         "'smoke', 'plain'", prog="emit_jax.plan")
        assert out == ""

    @pytest.mark.parametrize("flag,value,needle", [
        ("--hbm", "inf", "expected a finite number"),
        ("--hbm", "0", "must be > 0"),
        ("--headroom", "-1", "must be >= 0"),
        ("--jobs", "0", "must be >= 1, got 0"),
        ("--prompt_len", "0", "must be >= 1, got 0"),
        ("--label_tokens", "-1", "must be >= 1, got -1"),
        # before: compiled every program, then an OverflowError
        ("--prompt_len", "99999999999999999999", "must be <= 1048576"),
    ])
    def test_aot_flags(self, tmp_path, nothing_written, flag, value, needle):
        nothing_written()
        rc, err, _ = run_main("emit_jax.aot.command", [
            "--config", SMOKE, "--topology", "v5e:2x2", "--json_out", str(tmp_path / "aot.json"),
            flag, value], via_cli=False)
        assert_one_error(rc, err, f"argument {flag}", needle, prog="emit_jax.aot")


    @pytest.mark.parametrize("name,needle", [
        ("adir", "names a folder; aot writes one JSON file"),
        ("a_file/aot.json", "Not a directory")])
    def test_aot_json_out_is_checked_before_compiling(self, tmp_path, monkeypatch, name, needle):
        """Before: checked only after every program compiled (93 s), then ``open`` failed."""
        from emit_jax.aot import command

        (tmp_path / "adir").mkdir()
        (tmp_path / "a_file").write_text("not a folder")

        def no_compile(*a, **k):
            raise AssertionError("the programs compiled before --json_out was checked")
        monkeypatch.setattr(command, "make_report", no_compile)
        monkeypatch.setattr(command, "require_libtpu", lambda: None)
        before = snapshot(tmp_path)
        out = str(tmp_path / name)
        rc, err, _ = run_main("emit_jax.aot.command", [
            "--config", SMOKE, "--topology", "v5e:2x2", "--json_out", out], via_cli=False)
        assert_one_error(rc, err, f"--json_out {out}: {needle}", prog="emit_jax.aot")
        assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------- benchmarks
class TestBench:
    @pytest.mark.parametrize("args,needles", [
        (["matmul", "--n", "-5"], ("argument --n", "must be >= 1, got -5")),
        # before: a C++ abort (exit 134), "overflow in static extent product"
        (["matmul", "--n", "2147483647"], ("argument --n", "must be <= 65536")),
        (["matmul", "--repeats", "0"], ("argument --repeats", "must be >= 1, got 0")),
        (["heatmap", "--batch", "0"], ("argument --batch", "must be >= 1")),
        (["heatmap", "--window", "-1"], ("argument --window", "must be >= 0")),
        (["heatmap", "--grid", "0"], ("argument --grid", "must be >= 1")),
        (["heatmap", "--arch", "huge"], ("argument --arch", "invalid choice: 'huge'")),
        (["rollout", "--batch", "0"], ("argument --batch", "must be >= 1")),
        (["rollout", "--lora", "-8"], ("argument --lora", "must be >= 0")),
        # before: an OverflowError traceback / a run that never ends
        (["rollout", "--new-tokens", "99999999999999999999"],
         ("argument --new-tokens", "must be <= 1048576")),
        (["heatmap", "--repeats", "100000000000000000000"],
         ("argument --repeats", "must be <= 10000")),
        # before: accepted; failed only when the first peer started, after our own runs
        (["compare", "--python-hf", "/nonexistent/python"],
         ("argument --python-hf", "/nonexistent/python: no such interpreter")),
        (["compare", "--python-tunix", os.path.join(ROOT, "setup.py")],
         ("argument --python-tunix", "setup.py: not executable")),
        (["grpo_step", "--G", "1"], ("argument --G", "must be >= 2, got 1")),
        (["train_step", "--peak-gflops", "nan"], ("argument --peak-gflops", "finite number")),
        (["compile_time", "--text-layers", "0"], ("argument --text-layers", "must be >= 1")),
        (["compare", "--rounds", "0"], ("argument --rounds", "must be >= 1")),
        (["gpu", "--steps", "0"], ("argument --steps", "must be >= 1")),
        (["gpu", "--peak-tflops", "inf"], ("argument --peak-tflops", "finite number")),
        (["gpu", "--micro", "-1"], ("argument --micro", "must be >= 0")),
        (["gpu", "--rounds", "-1"], ("argument --rounds", "must be >= 1")),
        # before: the right line, but exit status 1
        (["rollout", "--arch", "tiny", "--kernels", "attention=bogus"],
         ("--kernels: kernels.attention must be one of",)),
        (["rollout", "--arch", "tiny", "--kernels", "attention"], ("--kernels 'attention'",)),
        # thirteenth probe: an unknown key was ignored (BR7); a bad --config was said as a
        # --kernels error (BU1); sizes without a bound ran silently towards memory (BK3, P2)
        (["rollout", "--arch", "tiny", "--kernels", "nosuch=1"],
         ("--kernels 'nosuch=1': no kernel setting 'nosuch'; known: attention, decode, "
          "decode_bucket",)),
        (["rollout", "--arch", "tiny", "--kernels", "decode_bucket=x"],
         ("decode_bucket must be a whole number",)),
        (["gpu", "--config", "/nonexistent/c.py"],
         ("--config: config file not found: /nonexistent/c.py",)),
        # sixteenth probe TB1 / TB2: ValueError tracebacks after the model was built
        (["gpu", "--arch", "tiny", "--tiles", "100000"], ("argument --tiles: must be <= 40",)),
        (["gpu", "--arch", "tiny", "--prompt-len", "1"],
         ("--prompt-len 1 is too short for 128 image tokens (two images of --tiles 1 tiles)",)),
        (["compile_time", "--vit-layers", "100000"], ("argument --vit-layers",
                                                      "must be <= 1024, got 100000")),
        (["rollout", "--batch", "100000000"], ("argument --batch", "must be <= 65536")),
        (["gpu", "--text-layers", "5000"], ("argument --text-layers", "must be <= 1024")),
        # fourteenth probe BX6: ran for minutes with rank-100000 adapters on a 128-wide model
        (["rollout", "--arch", "tiny", "--lora", "100000"],
         ("--lora 100000: above the tiny LLM's width (128)",)),
        (["grpo_step", "--arch", "tiny", "--lora", "129"], ("choose a rank of at most 128",)),
        # before: ignored, the plain model timed as if it were the asked-for LoRA variant
        (["rollout", "--arch", "tiny", "--merge-lora", "never"],
         ("--merge-lora: only with --lora RANK",)),
        (["rollout", "--arch", "tiny", "--compare"], ("--compare: only with --lora RANK",)),
        # before: our own runs, then the peers silently missing from the table
        (["compare", "--python-hf", sys.executable, "--peers-dir", "/nonexistent/peers"],
         ("--peers-dir /nonexistent/peers: no peer_hf_generate.py",)),
        (["compare", "--workloads", "rollout,bogus"], ("--workloads 'rollout,bogus'",
                                                       "choose from rollout, grpo_step, heatmap")),
    ])
    def test_flags(self, args, needles):
        rc, err, out = run_main("bench.__main__", args, via_cli=False)
        assert_one_error(rc, err, *needles, prog="python -m bench")
        assert out == ""


# ------------------------------------------------------------------------------- train
TRAIN = "emit_jax.train"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return subprocess_env(PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false",
                          EMIT_JAX_CACHE=str(tmp_path_factory.mktemp("cache")))


def train(env, *args):
    r = subprocess.run([sys.executable, "-m", TRAIN, *args], cwd=ROOT, text=True,
                       capture_output=True, timeout=300, env=env)
    return r.returncode, r.stderr


class TestTrain:
    """``python -m emit_jax.train`` (absl flags; a subprocess each, about 8 s)."""

    @pytest.mark.parametrize("args,needles", [
        (["--config.grpo.nope=1"], ("config grpo.nope: no such field",)),
        (["--config.sft.steps=1.5"], ("config sft.steps=1.5", "expected an int value")),
        (["--config.sft.lr=fast"], ("config sft.lr=fast", "expected a float value")),
        (["--config.data.seed=-1"], ("config data.seed: -1 is below 0",)),
        (["--num_processes=-3"], ("--num_processes=-3", "not a non-negative integer")),
        # before: ignored, and the whole run trained
        (["extra"], ("unexpected argument(s) 'extra': train takes only flags",)),
        # before: a ValueError traceback ("warmup: no training records") after the data was built
        (["--config.warmup.tasks=('nope',)"], ("config warmup.tasks: ('nope',) must be a tuple",)),
        (["--config.sft.tasks=('nope',)"], ("config sft.tasks: ('nope',) must be a tuple",)),
    ])
    def test_flags_and_overrides(self, tmp_path, env, args, needles):
        before = snapshot(tmp_path)
        rc, err = train(env, "--config", SMOKE, "--workdir", str(tmp_path / "run"), *args)
        assert_one_error(rc, err, *needles, prog=TRAIN)
        assert snapshot(tmp_path) == before

    @pytest.mark.parametrize("args,needle", [
        (["--config", "configs/sft.py"],
         "--config: given twice ('configs/grpo.py:smoke', then 'configs/sft.py'); give it once"),
        (["--config.sft.steps=2", "--config.sft.steps", "3"],
         "--config.sft.steps: given twice ('2', then '3'); give it once"),
    ])
    def test_a_flag_given_twice(self, tmp_path, env, args, needle):
        """Before: the last one silently won (trained configs/sft.py; 3 steps)."""
        before = snapshot(tmp_path)
        rc, err = train(env, "--config", SMOKE, "--workdir", str(tmp_path / "run"), *args)
        assert_one_error(rc, err, needle, prog=TRAIN)
        assert snapshot(tmp_path) == before

    def test_flags_given_twice_in_every_form(self):
        """absl's forms (``--f=v``, ``--f v``, ``-f v``, ``--nof``) without a subprocess; the same
        value twice is accepted."""
        from emit_jax.errors import ConfigError
        from emit_jax.train import check_given_once

        for argv, overrides in ((["t", "--workdir=a", "-workdir", "b"], []),
                                (["t", "--logtostderr", "--nologtostderr"], []),
                                (["t"], ["seed=1", "seed=2"])):
            with pytest.raises(ConfigError, match="given twice"):
                check_given_once(argv, overrides)
        check_given_once(["t", "--config=a", "--config", "a", "--num_processes=2",
                          "--", "--config", "b"], ["seed=1", "seed=1", "sft.steps=2"])

    def test_config_files(self, tmp_path, env):
        """A missing file, a syntax error, a failing import: the same format, in one process
        each (the flags are read before anything else)."""
        (tmp_path / "syntax.py").write_text("def get_config(:\n")
        (tmp_path / "imports.py").write_text("import no_such_module_xyz\n")
        for spec, needles in ((tmp_path / "missing.py", ("config file not found", "missing.py")),
                              (tmp_path / "syntax.py", ("syntax.py", "SyntaxError")),
                              (tmp_path / "imports.py", ("imports.py", "no_such_module_xyz"))):
            before = snapshot(tmp_path)
            rc, err = train(env, "--config", str(spec), "--workdir", str(tmp_path / "run"))
            assert_one_error(rc, err, *needles, prog=TRAIN)
            assert snapshot(tmp_path) == before

    @pytest.mark.parametrize("what", ["bomb", "name"])
    def test_bad_dataset(self, tmp_path, env, what):
        """An image Pillow refuses / a file name that is not UTF-8 in ``data.source``: the run
        stops while it reads the data, its error the only line (no ``[data]`` progress line
        first, as before), and no record file is written."""
        ds = make_mvtec(tmp_path / "ds", classes=("widget",))
        folder = os.path.join(ds, "widget", "train", "good")
        if what == "bomb":
            needles = (bomb_png(os.path.join(folder, "001.png")), "not a readable image")
        else:
            non_utf8_file(folder, os.path.join(folder, "000.png"))
            needles = (folder, repr(BAD_NAME), "not valid UTF-8")
        rc, err = train(env, "--config", SMOKE, "--workdir", str(tmp_path / "run"),
                        f"--config.data.source={ds}")
        lines = [line for line in err.splitlines() if line.strip()]
        assert rc == 2 and "Traceback" not in err, err[-3000:]
        errors = [line for line in lines if ": error: " in line]
        assert errors == lines[-1:] and ERROR_LINE.match(lines[-1]), err[-3000:]
        assert not any(line.startswith("[data]") for line in lines), err[-3000:]
        for n in needles:
            assert n in lines[-1], (n, lines[-1])
        assert not os.path.isdir(tmp_path / "run" / "data"), os.listdir(tmp_path / "run")

    def test_a_tokenizer_folder_without_files_or_an_empty_source(self, tmp_path, env):
        """Before: a ``[data]`` progress line, then transformers' own text ("Couldn't
        instantiate the backend tokenizer ...") once the data was loaded; an empty
        ``data.source`` folder likewise after the progress line. Now each is the only line,
        and the tokenizer folder is checked before the workdir or the data exist."""
        empty = tmp_path / "empty"
        empty.mkdir()
        for override, needles in (
                (f"--config.tokenizer={empty}", (f"{empty}: no tokenizer files",
                                                 "tokenizer.json")),
                (f"--config.data.source={empty}", (str(empty), "no class folders"))):
            rc, err = train(env, "--config", SMOKE, "--workdir", str(tmp_path / "run"), override)
            assert_one_error(rc, err, *needles, prog=TRAIN)
            assert not os.path.exists(tmp_path / "run")

    def test_a_truncated_init_from_leaves_no_workdir(self, tmp_path, env, tiny_model):
        """Before: data/ and tokenizer/ were written, then the model's header failed."""
        import shutil

        hf_dir = tmp_path / "hf"
        shutil.copytree(tiny_model["hf"], hf_dir)
        weights = hf_dir / "model.safetensors"
        with open(weights, "r+b") as f:
            f.truncate(os.path.getsize(weights) // 2)
        before = snapshot(tmp_path)
        rc, err = train(env, "--config", SMOKE, "--workdir", str(tmp_path / "run"),
                        f"--config.init_from={hf_dir}")
        assert_one_error(rc, err, str(weights), "not a readable safetensors file", prog=TRAIN)
        assert snapshot(tmp_path) == before

    def test_cache_variable_naming_a_file(self, tmp_path, env):
        """Before: ``File exists`` (from makedirs), naming neither the variable nor the value,
        after the workdir was made."""
        (tmp_path / "a_file").write_text("not a folder")
        before = snapshot(tmp_path)
        rc, err = train({**env, "EMIT_JAX_CACHE": str(tmp_path / "a_file")}, "--config", SMOKE,
                        "--workdir", str(tmp_path / "run"))
        assert_one_error(rc, err, f"$EMIT_JAX_CACHE={tmp_path / 'a_file'}", "not a folder",
                         prog=TRAIN)
        assert snapshot(tmp_path) == before

    @pytest.mark.parametrize("inside", ["is", "lies inside", "link"])
    def test_workdir_in_the_dataset_is_refused(self, tmp_path, env, inside):
        """Before: accepted; the run wrote data/, tokenizer/ and checkpoints into its dataset."""
        ds = make_mvtec(tmp_path / "ds", classes=("widget",))
        workdir = {"is": ds, "lies inside": os.path.join(ds, "run")}.get(inside)
        if inside == "link":
            os.symlink(ds, tmp_path / "link")
            workdir = str(tmp_path / "link" / "run")
        before = snapshot(tmp_path)
        rc, err = train(env, "--config", SMOKE, "--workdir", workdir,
                        f"--config.data.source={ds}")
        where = "is" if inside == "is" else "lies inside"
        assert_one_error(rc, err, f"{workdir}: the output {where} the input config data.source",
                         prog=TRAIN)
        assert snapshot(tmp_path) == before

    @pytest.mark.parametrize("spec,key,value,needle", [
        (SMOKE, "seed", -1, "config seed: -1 is below 0"),
        (SMOKE, "data.seed", -2, "config data.seed: -2 is below 0"),
        (SMOKE, "data.dk_sentences", -1, "config data.dk_sentences: -1 is below 0"),
        ("configs/adfm.py:smoke", "eval_adfm", -1, "config eval_adfm: -1 is below 0"),
        # before: accepted; an OverflowError traceback in optax when the stage began
        (SMOKE, "grpo.steps", 10**26, "config grpo.steps: 100000000000000000000000000 is above "
         "2147483647"),
        ("configs/sft.py", "base.steps", 10**26, "config base.steps: 100000000000000000000000000 "
         "is above 2147483647"),
        (SMOKE, "seed", 2**31, "config seed: 2147483648 is above 2147483647"),
        # before: a hang building the tile grids (data/image.py target_ratios)
        (SMOKE, "data.max_tiles", 10**12, "config data.max_tiles: 1000000000000 is above 40"),
        # products of settings each within its bound: before, an overflow or a 175 TiB array
        (SMOKE, "grpo.G", 2**30, "config grpo.G: 1073741824 is above 65536"),
        (SMOKE, "grpo.prompts_per_step", 2**30, "config grpo.prompts_per_step x grpo.G: "),
        (SMOKE, "grpo.iterations", 2**30, "config grpo.steps x grpo.iterations: "),
        (SMOKE, "grpo.prompts_per_step", 3 * 10**8, "config grpo.prompts_per_step x grpo.G x 2 x "
         "data.max_tiles: "),
        (SMOKE, "grpo.max_new_tokens", 2**21, "config grpo.max_new_tokens: 2097152 is above "
         "1048576"),
        (SMOKE, "data.length_buckets", (64, 2**21), "config data.length_buckets: (64, 2097152) "
         "reaches above 1048576 tokens"),
        # before: rewards of -inf, overflow warnings and NaN in TensorBoard, exit 0
        (SMOKE, "grpo.reward_weights", (1e308, 1e308, 1.0, 1.0),
         "config grpo.reward_weights[0]: 1e+308 must be <= 1000000.0"),
    ])
    def test_validate_config_ranges(self, spec, key, value, needle):
        """The ``--config.`` values train's config check lacked (directly, no subprocess)."""
        from emit_jax import configs
        from emit_jax.errors import ConfigError
        from emit_jax.training.validate import validate_config

        cfg = configs.load(os.path.join(ROOT, spec), {key: value})
        with pytest.raises(ConfigError, match=re.escape(needle)):
            validate_config(cfg, num_devices=1)

    @pytest.mark.parametrize("spec,overrides,needle", [
        # before: a re.error traceback when the LoRA stage began, after the earlier stages
        (SMOKE, {"grpo.lora.targets": "("}, "config grpo.lora.targets: '(' is not a regular "
         "expression"),
        (SMOKE, {"grpo.lora.targets": ""}, "config grpo.lora.targets: '' must be a regular "
         "expression"),
        # before: "TypeError: data type 'bogus' not understood" from qwix, in the GRPO stage
        (SMOKE, {"grpo.lora.weight_qtype": "bogus"}, "config grpo.lora.weight_qtype: 'bogus' "
         "is not a quantization type"),
        (SMOKE, {"grpo.lora.weight_qtype": "bfloat16"}, "'bfloat16' is not a quantization type"),
        # before: the full recipe ran instead of the misspelt variant
        ("configs/grpo.py:smok", {}, "configs/grpo.py:smok: unknown variant 'smok'"),
        ("configs/sft.py:plain", {}, "unknown variant 'plain'; this recipe has 'smoke'"),
        ("configs/internvl3_8b_grpo.py:smoke", {}, "unknown variant 'smoke'; this recipe takes "
         "none"),
    ])
    def test_validate_lora_and_variants(self, spec, overrides, needle):
        from emit_jax import configs
        from emit_jax.errors import ConfigError
        from emit_jax.training.validate import validate_config

        with pytest.raises(ConfigError, match=re.escape(needle)):
            validate_config(configs.load(os.path.join(ROOT, spec), overrides), num_devices=1)

    def test_lora_targets_matching_no_layer(self):
        """Before: the LoRA stage trained without a single adapter (only the soft prompt and
        projectors), exit 0."""
        from emit_jax.errors import ConfigError
        from emit_jax.training.config import LoRAConfig
        from emit_jax.training.lora import apply_lora
        from test_lora import inputs, small_emit

        ref = small_emit()
        ids, pix, mask, ce = inputs(ref)
        sample = {"input_ids": ids, "pixel_values": pix, "attention_mask": mask,
                  "ce_pixels": ce, "num_ce": 1}
        with pytest.raises(ConfigError, match=r"config grpo\.lora\.targets: 'q_proj' matches "
                           r"none of the model's \d+ linear layers \(their paths look like "
                           r"'mllm/"):
            apply_lora(ref, sample, LoRAConfig(rank=4, alpha=16.0, targets="q_proj"))

    def test_ctrl_c_during_a_resume_does_not_set_the_checkpoint_aside(self, tmp_path,
                                                                      monkeypatch):
        """Ctrl-C or SIGTERM (preemption) while a stage's checkpoint is read comes back wrapped
        in TensorStore's ``Exception``. Before: the readable checkpoint was moved to
        ``ckpt-unreadable/`` as damaged, so the rerun resumed from an older step (or step 0)."""
        from flax import nnx

        from emit_jax.training.config import OptimConfig
        from emit_jax.training.optim import make_optimizer
        from emit_jax.training.state import StageCheckpoints

        model = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
        opt = nnx.Optimizer(model, make_optimizer(OptimConfig(steps=4, lr=1e-2)), wrt=nnx.Param)
        d = tmp_path / "sft" / "ckpt"
        ck = StageCheckpoints(str(d), every=1, async_save=False, name="sft")
        ck.save(1, model, opt, {"step": 1, "data": {}})
        ck.close()

        def interrupted_read(self, *a, **k):
            try:
                raise KeyboardInterrupt("SIGTERM")
            except KeyboardInterrupt:
                raise Exception("Encountered error while reading array index")
        monkeypatch.setattr(StageCheckpoints, "_restore", interrupted_read)
        ck = StageCheckpoints(str(d), every=1, async_save=False, name="sft")
        try:
            with pytest.raises(KeyboardInterrupt):
                ck.restore(model, opt)
        finally:
            ck.close()
        assert [n for n in os.listdir(d) if n.isdigit()] == ["1"]
        assert not (tmp_path / "sft" / "ckpt-unreadable").exists()


# ------------------------------------------------- libtpu installed on a host without a TPU
def _no_tpu_host_env() -> dict:
    """The user's environment on this host: no ``JAX_PLATFORMS`` (the tests' conftest sets it
    to cpu, which hid libtpu's start-up lines from every other test)."""
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed (the test extra installs it)")
    from jax._src import hardware_utils

    if hardware_utils.num_available_tpu_chips_and_device_id()[0]:
        pytest.skip("this host has a TPU: the TPU runtime is meant to start")
    env = subprocess_env(PYTHONPATH=ROOT)
    env.pop("JAX_PLATFORMS", None)
    env.pop("JAX_FORCE_TPU_INIT", None)
    return env


@pytest.mark.parametrize("where", ["host", "device"])
def test_settings_asking_for_too_much_memory_are_one_line(where):
    """An allocation that fails is a user error (settings beyond the machine), not a crash:
    NumPy's ``MemoryError`` for a batch too large (seen: 175 TiB of GRPO tile buffers), and
    XLA's ``RESOURCE_EXHAUSTED``."""
    import jax
    import numpy as np

    from emit_jax import cli

    def main(argv):
        if where == "host":
            np.zeros((1 << 40, 1 << 10), np.float32)  # 4 PiB
        else:
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying "
                                             "to allocate 80.00GiB.")

    # the hint names the command's own settings (evaluate's flags; train's config keys)
    for prog, hint in (("emit_jax.evaluate", "a smaller --max-tiles or --max-new-tokens"),
                       ("emit_jax.train", "python -m emit_jax.plan")):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = cli.run(main, [], prog=prog)
        assert_one_error(rc, err.getvalue(), f"out of {where} memory", hint, prog=prog)


def test_backend_start_writes_nothing_without_a_tpu():
    """With libtpu installed and no TPU chip, starting jax's backend wrote five libtpu lines
    (TPU_ACCELERATOR_TYPE, InitGoogle, TPU_WORKER_HOSTNAMES) to stderr; after
    ``cli.skip_absent_tpu`` it writes none, and the CPU is the backend."""
    # flax and pallas, imported after the skip (as evaluate imports the models late), register
    # TPU lowerings: the platform must stay known (a NotImplementedError traceback otherwise)
    code = ("from emit_jax import cli; cli.skip_absent_tpu(); import jax; "
            "jax.numpy.zeros(2).block_until_ready(); import emit_jax.models, flax.nnx; "
            "from jax.experimental import pallas; print(jax.default_backend())")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=_no_tpu_host_env(), timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "cpu"
    assert p.stderr == ""


def test_error_after_the_backend_starts_is_one_line_without_a_tpu(tmp_path):
    """``train`` checks the mesh against the devices, after the backend started: the error is
    still exactly one line when libtpu is installed on a host without a TPU (it was six)."""
    p = subprocess.run([sys.executable, "-m", "emit_jax.train", "--config", SMOKE,
                        "--workdir", str(tmp_path / "w"), "--config.mesh.fsdp=3"],
                       cwd=ROOT, capture_output=True, text=True, env=_no_tpu_host_env(),
                       timeout=300)
    assert_one_error(p.returncode, p.stderr, "mesh", "needs 3 devices")
    assert not (tmp_path / "w").exists()
