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

from conftest import subprocess_env
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

    def test_subcommand_usage_errors_are_one_line(self):
        """A sub-command's parser raises the parent's error type, not ``ValueError``."""
        from emit_jax import cli
        from emit_jax.errors import ConfigError

        p = cli.Parser(prog="x", error_type=ConfigError)
        sub = p.add_subparsers(dest="what", required=True)
        sub.add_parser("go").add_argument("--n", type=cli.positive_int)
        with pytest.raises(ConfigError, match="argument --n: must be >= 1, got 0"):
            p.parse_args(["go", "--n", "0"])


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

    @pytest.mark.parametrize("flag,value,needle", [
        ("--seed", "-1", "must be >= 0, got -1"),
        ("--max-per-type", "0", "must be >= 1, got 0"),
        ("--max-per-type", "-2", "must be >= 1, got -2"),
        ("--max-per-type", "nan", "expected a whole number"),
        ("--adfm-frame", "0", "must be >= 1, got 0"),
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

    @pytest.mark.parametrize("flag,value,needle", [
        ("--limit", "0", "must be >= 1, got 0"),
        ("--limit", "-1", "must be >= 1, got -1"),
        ("--max-tiles", "0", "must be >= 1, got 0"),
        ("--max-new-tokens", "0", "must be >= 1, got 0"),
        ("--max-new-tokens", "inf", "expected a whole number"),
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
        (("--layers", "0", "2"), ("argument --layers", "must be >= 1, got 0")),
        (("--layers", "2", "99"), ("--layers 2 99", "blocks 1..")),
        (("--arch", "internvl9"), ("argument --arch", "invalid choice: 'internvl9'")),
    ])
    def test_flags(self, tmp_path, dataset, nothing_written, extra, needles):
        nothing_written()
        rc, err, _ = run_main(VISUALIZE, self.heatmap(dataset, tmp_path, *extra))
        assert_one_error(rc, err, *needles, prog=VISUALIZE)

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
    ])
    def test_plan_flags(self, flag, value, needle):
        rc, err, out = run_main("emit_jax.plan.command", ["--config", SMOKE, flag, value],
                                via_cli=False)
        assert_one_error(rc, err, f"argument {flag}", needle, prog="emit_jax.plan")
        assert out == ""

    @pytest.mark.parametrize("flag,value,needle", [
        ("--hbm", "inf", "expected a finite number"),
        ("--hbm", "0", "must be > 0"),
        ("--headroom", "-1", "must be >= 0"),
        ("--jobs", "0", "must be >= 1, got 0"),
        ("--prompt_len", "0", "must be >= 1, got 0"),
        ("--label_tokens", "-1", "must be >= 1, got -1"),
    ])
    def test_aot_flags(self, tmp_path, nothing_written, flag, value, needle):
        nothing_written()
        rc, err, _ = run_main("emit_jax.aot.command", [
            "--config", SMOKE, "--topology", "v5e:2x2", "--json_out", str(tmp_path / "aot.json"),
            flag, value], via_cli=False)
        assert_one_error(rc, err, f"argument {flag}", needle, prog="emit_jax.aot")


# ------------------------------------------------------------------------------- benchmarks
class TestBench:
    @pytest.mark.parametrize("args,needles", [
        (["matmul", "--n", "-5"], ("argument --n", "must be >= 1, got -5")),
        (["matmul", "--repeats", "0"], ("argument --repeats", "must be >= 1, got 0")),
        (["heatmap", "--batch", "0"], ("argument --batch", "must be >= 1")),
        (["heatmap", "--window", "-1"], ("argument --window", "must be >= 0")),
        (["heatmap", "--grid", "0"], ("argument --grid", "must be >= 1")),
        (["heatmap", "--arch", "huge"], ("argument --arch", "invalid choice: 'huge'")),
        (["rollout", "--batch", "0"], ("argument --batch", "must be >= 1")),
        (["rollout", "--lora", "-8"], ("argument --lora", "must be >= 0")),
        (["grpo_step", "--G", "1"], ("argument --G", "must be >= 2, got 1")),
        (["train_step", "--peak-gflops", "nan"], ("argument --peak-gflops", "finite number")),
        (["compile_time", "--text-layers", "0"], ("argument --text-layers", "must be >= 1")),
        (["compare", "--rounds", "0"], ("argument --rounds", "must be >= 1")),
        (["gpu", "--steps", "0"], ("argument --steps", "must be >= 1")),
        (["gpu", "--peak-tflops", "inf"], ("argument --peak-tflops", "finite number")),
        (["gpu", "--micro", "-1"], ("argument --micro", "must be >= 0")),
        (["gpu", "--rounds", "-1"], ("argument --rounds", "must be >= 1")),
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
    ])
    def test_flags_and_overrides(self, tmp_path, env, args, needles):
        before = snapshot(tmp_path)
        rc, err = train(env, "--config", SMOKE, "--workdir", str(tmp_path / "run"), *args)
        assert_one_error(rc, err, *needles, prog=TRAIN)
        assert snapshot(tmp_path) == before

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
        stops while it reads the data, its error the last line (after the ``[data]`` progress
        line), and no record file is written."""
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
        for n in needles:
            assert n in lines[-1], (n, lines[-1])
        assert not os.path.isdir(tmp_path / "run" / "data"), os.listdir(tmp_path / "run")

    @pytest.mark.parametrize("spec,key,value,needle", [
        (SMOKE, "seed", -1, "config seed: -1 is below 0"),
        (SMOKE, "data.seed", -2, "config data.seed: -2 is below 0"),
        (SMOKE, "data.dk_sentences", -1, "config data.dk_sentences: -1 is below 0"),
        ("configs/adfm.py:smoke", "eval_adfm", -1, "config eval_adfm: -1 is below 0"),
    ])
    def test_validate_config_ranges(self, spec, key, value, needle):
        """The ``--config.`` values train's config check lacked (directly, no subprocess)."""
        from emit_jax import configs
        from emit_jax.errors import ConfigError
        from emit_jax.training.validate import validate_config

        cfg = configs.load(os.path.join(ROOT, spec), {key: value})
        with pytest.raises(ConfigError, match=re.escape(needle)):
            validate_config(cfg, num_devices=1)
