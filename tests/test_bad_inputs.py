"""Bad input corpus: the train, data-build, evaluate, convert and export commands each meet bad
input (corrupt or truncated images and safetensors, configs of other architectures, tokenizers
without EMIT's tokens, empty datasets, duplicate ids, answers outside the options, paths leaving
the data root, meshes and batches that do not fit, bad hyper-parameters, unwritable or full
output locations) and must answer with

- a non-zero exit,
- stderr whose last non-empty line is ``<prog>: error: <message>`` naming the problem, with no
  Python traceback,
- nothing new left behind (the whole test folder is unchanged: no output, no ``.tmp-*``).

Each case is a function building its input under ``tmp_path`` and returning a :class:`Case`.
``sub`` cases run ``python -m <command>`` as a subprocess; the others call the command's
``main`` through ``emit_jax.cli.run`` in-process, which is exactly what ``python -m`` does (the
train command's config checks are also tested directly on ``validate_config``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from typing import Callable

import numpy as np
import pytest

from conftest import drop_digests, subprocess_env
from test_tasks import make_mvtec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MMAD = os.path.join(ROOT, "tests", "fixtures", "mmad")
SMOKE = "configs/grpo.py:smoke"
ERROR_LINE = re.compile(r"^(python -m )?emit_jax(\.\w+)+: error: \S")
AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@dataclasses.dataclass
class Case:
    command: str  # module run with -m
    args: list[str]
    needles: tuple[str, ...]  # all in the error line
    env: dict = dataclasses.field(default_factory=dict)  # subprocess environment additions


#: name -> (case function, run as a real subprocess)
CASES: dict[str, tuple[Callable, bool]] = {}


def case(fn=None, *, sub: bool = False):
    """Register ``fn(tmp_path, assets, request) -> Case``; ``@case(sub=True)``: a subprocess."""
    def register(f):
        CASES[f.__name__] = (f, sub)
        return f
    return register(fn) if fn is not None else register


# ------------------------------------------------------------------------------------ helpers
def snapshot(folder) -> dict:
    """Every file and folder below ``folder`` -> (size, mtime) (folders: None)."""
    out = {}
    for dirpath, dirs, files in os.walk(folder):
        for d in dirs:
            out[os.path.relpath(os.path.join(dirpath, d), folder)] = None
        for f in files:
            if f == ".lock":  # the trainer's workdir lock file stays (the lock itself is released)
                continue
            st = os.lstat(os.path.join(dirpath, f))
            out[os.path.relpath(os.path.join(dirpath, f), folder)] = (st.st_size, st.st_mtime_ns)
    return out


def blocked_dir(tmp_path) -> str:
    """A folder nobody can write into: a read-only folder, or (as root, who ignores permissions)
    a path below a regular file."""
    if AS_ROOT:
        f = tmp_path / "a_file"
        f.write_text("not a folder")
        return str(f / "sub")
    d = tmp_path / "readonly"
    d.mkdir()
    d.chmod(0o500)
    return str(d / "sub")


def blocked_needle() -> str:
    return "Not a directory" if AS_ROOT else "Permission denied"


def run_command(c: Case, sub: bool, env: dict) -> tuple[int, str]:
    if sub:
        r = subprocess.run([sys.executable, "-m", c.command, *c.args], cwd=ROOT, text=True,
                           capture_output=True, timeout=300, env=dict(env, **c.env))
        return r.returncode, r.stderr
    from emit_jax import cli

    mod = importlib.import_module(c.command)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = cli.run(mod.main, c.args, prog=c.command)
        except SystemExit as e:  # argparse
            rc = e.code
    return rc, err.getvalue()


def copy_mmad(tmp_path, edit=None, text=None) -> str:
    """A copy of the MMAD fixture whose mmad.json is ``edit(data)`` (or the raw ``text``)."""
    d = tmp_path / "mmad"
    shutil.copytree(MMAD, d)
    if text is None:
        data = json.loads((d / "mmad.json").read_text())
        edit(data)
        text = json.dumps(data)
    (d / "mmad.json").write_text(text)
    return str(d)


def first_key(data: dict) -> str:
    return next(iter(data))


def copy_hf(tmp_path, assets, name="hf") -> str:
    d = tmp_path / name
    shutil.copytree(assets["hf"], d)
    return str(d)


def write_plain_tokenizer(folder) -> None:
    """A working fast tokenizer without EMIT's special tokens (<img>, <IMG_CONTEXT>, ...)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    for name in os.listdir(folder):
        if name.startswith(("tokenizer", "special_tokens", "added_tokens", "chat_template")):
            os.remove(os.path.join(folder, name))
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["a bottle with a crack", "a screw with a scratch"] * 10,
                            trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(folder)


def edit_jsonl(path, fn) -> None:
    """Rewrite a JSONL file with ``fn(records)``."""
    recs = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    recs = fn(recs)
    with open(path, "w", encoding="utf-8") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Shared, read-only inputs: a tiny HF folder (zero weights, the tiny tokenizer), the same as
    an Orbax checkpoint, an MVTec-style dataset, and a training workdir prepared on it (tokenizer
    + the six stage JSONL files, as a first run leaves them)."""
    from flax import nnx

    from emit_jax import checkpoint, hf
    from emit_jax.data.tokenizer import train_tiny_tokenizer
    from emit_jax.training.data import stage_records
    from test_evaluate import tiny_for

    d = tmp_path_factory.mktemp("assets")
    tok = train_tiny_tokenizer(None, d / "tok")
    cfg = tiny_for(tok, len(tok))
    cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, num_hidden_layers=1),
                      text=dataclasses.replace(cfg.text, num_hidden_layers=1))
    folder = d / "hf"
    folder.mkdir()
    _, state = hf._abstract_model(cfg)
    hf.write_safetensors(
        [(hf.hf_key(p), (lambda p=p, v=v: hf.to_hf_layout(p, np.zeros(v.shape, v.dtype))),
          int(np.prod(v.shape)) * 4) for p, v in nnx.to_flat_state(state)], str(folder))
    (folder / "config.json").write_text(json.dumps(cfg.to_hf_dict(None)))
    tok.save_pretrained(folder)
    checkpoint.save_model(hf.load(folder), d / "ckpt", assets_from=folder)
    ds = make_mvtec(d / "ds", classes=("widget",))
    work = d / "work"
    shutil.copytree(d / "tok", work / "tokenizer")
    stage_records(ds, str(work), seed=0, text_samples=False, ad_order="yes_no")  # as configs/grpo.py
    return {"hf": str(folder), "ckpt": str(d / "ckpt"), "ds": ds, "work": str(work)}


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs at ``tmp_path/full``, filled up; skipped where it cannot be mounted."""
    d = tmp_path / "full"
    d.mkdir()
    if not AS_ROOT or shutil.which("mount") is None:
        pytest.skip("mounting a tiny tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(d)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        with open(d / "filler", "wb", buffering=0) as f:
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * 4096)
        yield str(d)
    finally:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return subprocess_env(PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false",
                          EMIT_JAX_CACHE=str(tmp_path_factory.mktemp("cache")))


# ------------------------------------------------------------------------------- data.build
def _build(src, out, *needles, extra=()):
    return Case("emit_jax.data.build", ["--source", str(src), "--out", str(out), "--stage", "1",
                                        *extra], needles)


@case(sub=True)
def build_corrupt_png(tmp_path, a, request):
    ds = make_mvtec(tmp_path / "ds", classes=("widget",))
    bad = os.path.join(ds, "widget", "test", "good", "000.png")
    open(bad, "wb").write(b"this is not a PNG file")
    return _build(ds, tmp_path / "train.jsonl", bad, "not a readable image")


@case
def build_truncated_png(tmp_path, a, request):
    ds = make_mvtec(tmp_path / "ds", classes=("widget",))
    bad = os.path.join(ds, "widget", "train", "good", "001.png")
    data = open(bad, "rb").read()
    open(bad, "wb").write(data[:len(data) // 2])
    return _build(ds, tmp_path / "train.jsonl", bad, "not a readable image")


@case
def build_empty_dataset(tmp_path, a, request):
    for sub in ("train/good", "test/good"):
        (tmp_path / "ds" / "widget" / sub).mkdir(parents=True)
    return _build(tmp_path / "ds", tmp_path / "train.jsonl", "ds", "no images")


@case
def build_missing_mask(tmp_path, a, request):
    ds = make_mvtec(tmp_path / "ds", classes=("widget",))
    os.remove(os.path.join(ds, "widget", "ground_truth", "dent", "001_mask.png"))
    return _build(ds, tmp_path / "train.jsonl", "dent/001.png", "no mask")


@case
def build_bad_domain_knowledge(tmp_path, a, request):
    ds = make_mvtec(tmp_path / "ds", classes=("widget",))
    dk = tmp_path / "dk.json"
    dk.write_text('{"ds": {"widget": ')
    return _build(ds, tmp_path / "train.jsonl", "dk.json", "not a readable domain-knowledge JSON",
                  extra=("--domain-knowledge", str(dk)))


@case(sub=True)
def build_unwritable_output(tmp_path, a, request):
    out = os.path.join(blocked_dir(tmp_path), "train.jsonl")
    return _build(a["ds"], out, "train.jsonl", blocked_needle())


@case(sub=True)
def build_full_disk(tmp_path, a, request):
    full = request.getfixturevalue("full_disk")
    out = os.path.join(full, "train.jsonl")
    return _build(a["ds"], out, out, "No space left on device")


# ------------------------------------------------------------------------------- evaluate
def _evaluate(ckpt, data, tmp_path, *needles):
    return Case("emit_jax.evaluate", ["--checkpoint", str(ckpt), "--data", str(data), "--out",
                                      str(tmp_path / "results.json"), "--max-tiles", "1"], needles)


@case(sub=True)
def evaluate_path_outside_data_root(tmp_path, a, request):
    holder = {}

    def edit(data):
        holder["key"] = first_key(data)
        data[holder["key"]]["similar_templates"][0] = "../../../../etc/passwd"
    data = copy_mmad(tmp_path, edit)
    return _evaluate(a["hf"], data, tmp_path, holder["key"], "../../../../etc/passwd",
                     "escapes the data root")


@case
def evaluate_absolute_path(tmp_path, a, request):
    holder = {}

    def edit(data):
        holder["key"] = first_key(data)
        data[holder["key"]]["random_templates"][1] = "/etc/passwd"
    data = copy_mmad(tmp_path, edit)
    return _evaluate(a["hf"], data, tmp_path, holder["key"], "/etc/passwd", "is absolute")


@case
def evaluate_answer_outside_options(tmp_path, a, request):
    holder = {}

    def edit(data):
        holder["key"] = first_key(data)
        data[holder["key"]]["conversation"][1]["Answer"] = "E"
    data = copy_mmad(tmp_path, edit)
    return _evaluate(a["hf"], data, tmp_path, holder["key"], "question 1",
                     "answer 'E' is not among the options")


@case
def evaluate_duplicate_record_ids(tmp_path, a, request):
    text = open(os.path.join(MMAD, "mmad.json"), encoding="utf-8").read()
    data = json.loads(text)
    key = first_key(data)
    # the same image key twice: json.loads would silently keep the last one
    dup = text.rstrip().rstrip("}") + ", " + json.dumps(key) + ": " + json.dumps(data[key]) + "}"
    return _evaluate(a["hf"], copy_mmad(tmp_path, text=dup), tmp_path, key,
                     "more than once")


@case(sub=True)
def evaluate_tokenizer_without_special_tokens(tmp_path, a, request):
    folder = copy_hf(tmp_path, a)
    write_plain_tokenizer(folder)
    return _evaluate(folder, MMAD, tmp_path, folder, "tokenizer lacks EMIT special token",
                     "<IMG_CONTEXT>")


@case
def evaluate_config_of_another_architecture(tmp_path, a, request):
    folder = copy_hf(tmp_path, a)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                   "hidden_size": 64, "num_hidden_layers": 2}, f)
    return _evaluate(folder, MMAD, tmp_path, "config.json", "llama")


@case
def evaluate_empty_dataset(tmp_path, a, request):
    for sub in ("train/good", "test/good"):
        (tmp_path / "ds" / "widget" / sub).mkdir(parents=True)
    return _evaluate(a["hf"], tmp_path / "ds", tmp_path, "ds", "no questions to evaluate")


@case
def evaluate_corrupt_mask(tmp_path, a, request):
    ds = make_mvtec(tmp_path / "ds", classes=("widget",))
    mask = os.path.join(ds, "widget", "ground_truth", "smear", "000_mask.png")
    open(mask, "wb").write(b"\x89PNG\r\n\x1a\n garbage")
    return _evaluate(a["hf"], ds, tmp_path, mask, "not a readable mask")


@case
def evaluate_unwritable_output(tmp_path, a, request):
    c = _evaluate(a["hf"], MMAD, tmp_path, "results.json", blocked_needle())
    c.args[c.args.index("--out") + 1] = os.path.join(blocked_dir(tmp_path), "results.json")
    return c


# ------------------------------------------------------- outputs that would overwrite inputs
@case
def evaluate_out_is_the_benchmark_file(tmp_path, a, request):
    """``--out DIR/mmad.json`` used to replace the benchmark's own file with results (exit 0)."""
    data = copy_mmad(tmp_path, edit=lambda d: None)
    c = _evaluate(a["ckpt"], data, tmp_path, "mmad.json", "lies inside the input --data")
    c.args[c.args.index("--out") + 1] = os.path.join(data, "mmad.json")
    return c


@case
def evaluate_out_through_a_symlink_into_the_data(tmp_path, a, request):
    data = copy_mmad(tmp_path, edit=lambda d: None)
    os.symlink(data, tmp_path / "alias")
    c = _evaluate(a["ckpt"], data, tmp_path, "--data")
    c.args[c.args.index("--out") + 1] = str(tmp_path / "alias" / "domain_knowledge.json")
    return c


@case
def build_out_is_a_dataset_image(tmp_path, a, request):
    """``data.build --out`` pointed at a dataset image used to replace the image with JSONL."""
    ds = make_mvtec(tmp_path / "ds", classes=("widget",))
    img = os.path.join(ds, "widget", "train", "good", "000.png")
    return _build(ds, img, "000.png", "lies inside the input --source")


@case
def build_out_is_the_domain_knowledge(tmp_path, a, request):
    ds = make_mvtec(tmp_path / "ds", classes=("widget",))
    dk = tmp_path / "dk.json"
    dk.write_text("{}")
    return _build(ds, dk, "is the input --domain-knowledge", extra=("--domain-knowledge", str(dk)))


@case
def visualize_out_is_the_query_image(tmp_path, a, request):
    ds = make_mvtec(tmp_path / "ds", classes=("widget",))
    q = os.path.join(ds, "widget", "test", "good", "000.png")
    r = os.path.join(ds, "widget", "train", "good", "000.png")
    return Case("emit_jax.visualize", ["heatmap", "--query", q, "--reference", r, "--out", q],
                ("is the input --query",))


@case
def convert_out_inside_the_source_folder(tmp_path, a, request):
    return Case("emit_jax.convert", ["--hf", a["hf"], "--out", os.path.join(a["hf"], "ckpt")],
                ("lies inside the input --hf",))


@case
def export_out_inside_the_checkpoint(tmp_path, a, request):
    return Case("emit_jax.export", ["--checkpoint", a["ckpt"], "--out",
                                    os.path.join(a["ckpt"], "hf")],
                ("lies inside the input --checkpoint",))


# ------------------------------------------------------------------------------- convert
def _convert(src, tmp_path, *needles):
    return Case("emit_jax.convert", ["--hf", str(src), "--out", str(tmp_path / "ckpt")], needles)


@case(sub=True)
def convert_truncated_safetensors(tmp_path, a, request):
    folder = copy_hf(tmp_path, a)
    path = os.path.join(folder, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    return _convert(folder, tmp_path, path, "not a readable safetensors file")


@case(sub=True)
def convert_config_of_another_architecture(tmp_path, a, request):
    folder = copy_hf(tmp_path, a)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"model_type": "llama", "hidden_size": 64}, f)
    return _convert(folder, tmp_path, "config.json", "llama")


@case
def convert_pickle_weights_only(tmp_path, a, request):
    folder = copy_hf(tmp_path, a)
    os.remove(os.path.join(folder, "model.safetensors"))
    open(os.path.join(folder, "pytorch_model.bin"), "wb").write(b"\x80\x04 a pickle, never loaded")
    return _convert(folder, tmp_path, "pytorch_model.bin", "never loaded")


@case
def convert_config_not_json(tmp_path, a, request):
    folder = copy_hf(tmp_path, a)
    open(os.path.join(folder, "config.json"), "w").write('{"model_type": "internvl", ')
    return _convert(folder, tmp_path, "config.json", "not valid JSON")


@case
def convert_index_names_missing_shard(tmp_path, a, request):
    folder = copy_hf(tmp_path, a)
    from safetensors import safe_open

    with safe_open(os.path.join(folder, "model.safetensors"), "numpy") as f:
        keys = list(f.keys())
    os.remove(os.path.join(folder, "model.safetensors"))
    shard = "model-00001-of-00001.safetensors"
    json.dump({"weight_map": {k: shard for k in keys}},
              open(os.path.join(folder, "model.safetensors.index.json"), "w"))
    return _convert(folder, tmp_path, shard, "missing")


@case
def convert_index_shard_leaves_folder(tmp_path, a, request):
    folder = copy_hf(tmp_path, a)
    os.remove(os.path.join(folder, "model.safetensors"))  # a single file is read first
    json.dump({"weight_map": {"x.weight": "../../outside.safetensors"}},
              open(os.path.join(folder, "model.safetensors.index.json"), "w"))
    return _convert(folder, tmp_path, "model.safetensors.index.json", "leaves the folder")


@case
def convert_weights_do_not_match_config(tmp_path, a, request):
    folder = copy_hf(tmp_path, a)
    path = os.path.join(folder, "config.json")
    cfg = json.load(open(path))
    cfg["text_config"]["num_hidden_layers"] += 1
    json.dump(cfg, open(path, "w"))
    return _convert(folder, tmp_path, folder, "weights do not match config.json", "missing")


@case
def convert_output_exists(tmp_path, a, request):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "keep.txt").write_text("keep me")
    return _convert(a["hf"], tmp_path, "ckpt", "exists and is not empty")


@case(sub=True)
def convert_full_disk(tmp_path, a, request):
    full = request.getfixturevalue("full_disk")
    return Case("emit_jax.convert", ["--hf", a["hf"], "--out", os.path.join(full, "ckpt")],
                ("No space left on device",))


# ------------------------------------------------------------------------------- export
def _export(ckpt, out, *needles, extra=()):
    return Case("emit_jax.export", ["--checkpoint", str(ckpt), "--out", str(out), *extra], needles)


@case(sub=True)
def export_not_a_checkpoint(tmp_path, a, request):
    (tmp_path / "nope").mkdir()
    return _export(tmp_path / "nope", tmp_path / "hf", "emit_jax.json", "not found")


@case
def export_unsupported_format_version(tmp_path, a, request):
    ck = tmp_path / "ckpt"
    shutil.copytree(a["ckpt"], ck)
    meta = json.load(open(ck / "emit_jax.json"))
    meta["format_version"] = 99
    json.dump(meta, open(ck / "emit_jax.json", "w"))
    return _export(ck, tmp_path / "hf", "emit_jax.json", "unsupported format_version 99")


@case
def export_damaged_parameters(tmp_path, a, request):
    ck = tmp_path / "ckpt"
    shutil.copytree(a["ckpt"], ck)
    for dirpath, _, files in os.walk(ck / "params"):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "r+b") as fh:
                fh.truncate(os.path.getsize(p) // 3)
    return _export(ck, tmp_path / "hf", "params", "cannot restore")


@case
def export_bad_shard_size(tmp_path, a, request):
    return _export(a["ckpt"], tmp_path / "hf", "--max-shard-size", "lots",
                   extra=("--max-shard-size", "lots"))


@case
def export_unwritable_output(tmp_path, a, request):
    return _export(a["ckpt"], os.path.join(blocked_dir(tmp_path), "hf"), blocked_needle())


@case(sub=True)
def export_full_disk(tmp_path, a, request):
    full = request.getfixturevalue("full_disk")
    return _export(a["ckpt"], os.path.join(full, "hf"), "No space left on device")


# ------------------------------------------------------------------------------- train
def _train(workdir, *overrides, needles=(), env=None):
    return Case("emit_jax.train", ["--config", SMOKE, "--workdir", str(workdir), *overrides],
                tuple(needles), env=env or {})


@case(sub=True)
def train_negative_learning_rate(tmp_path, a, request):
    return _train(tmp_path / "run", "--config.sft.lr=-0.001", needles=("sft.lr", "-0.001"))


@case(sub=True)
def train_group_size_below_two(tmp_path, a, request):
    return _train(tmp_path / "run", "--config.grpo.G=1", needles=("grpo.G", "below 2"))


@case(sub=True)
def train_mesh_does_not_divide_devices(tmp_path, a, request):
    return _train(tmp_path / "run", "--config.mesh.data=3", needles=("mesh", "do not divide",
                                                                      "1 devices"))


@case(sub=True)
def train_batch_not_divisible_by_batch_shards(tmp_path, a, request):
    return _train(tmp_path / "run", "--config.grpo.G=3", needles=("grpo.G", "2 x 3 = 6",
                                                                  "4 batch shards"),
                  env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})


@case(sub=True)
def train_missing_data_source(tmp_path, a, request):
    return _train(tmp_path / "run", f"--config.data.source={tmp_path / 'nowhere'}",
                  needles=("data.source", "nowhere", "is not a folder"))


@case(sub=True)
def train_unwritable_workdir(tmp_path, a, request):
    return _train(blocked_dir(tmp_path), f"--config.data.source={a['ds']}",
                  needles=(blocked_needle(),))


def _train_on_workdir(tmp_path, a, stage, edit, *needles):
    """Resume a prepared workdir whose cached ``data/<stage>.jsonl`` was edited, as records
    written before their digests were kept (``data/options.json`` without ``digests``; with
    them, any edit is refused first: tests/test_tasks.py) are read: each record checked."""
    work = tmp_path / "work"
    shutil.copytree(a["work"], work)
    edit_jsonl(work / "data" / f"{stage}.jsonl", edit)
    drop_digests(work)
    return _train(work, f"--config.data.source={a['ds']}", needles=(f"{stage}.jsonl",) + needles)


@case(sub=True)
def train_record_image_outside_data_root(tmp_path, a, request):
    def edit(recs):
        recs[2]["images"][0] = "/etc/passwd"
        return recs
    return _train_on_workdir(tmp_path, a, "sft", edit, "outside the data root", "'/etc/passwd'",
                             "record 'widget-000002'")


@case(sub=True)
def train_duplicate_record_ids(tmp_path, a, request):
    def edit(recs):
        recs[3]["id"] = recs[0]["id"]
        return recs
    return _train_on_workdir(tmp_path, a, "grpo", edit, "duplicate id", "widget-000000")


@case(sub=True)
def train_answer_outside_options(tmp_path, a, request):
    def edit(recs):
        recs[1]["solution"] = "F"
        return recs
    return _train_on_workdir(tmp_path, a, "grpo", edit, "'F'", "is not one of the options")


# ------------------------------------------------------------------------------- the test
def test_corpus_size():
    assert len(CASES) >= 22
    subprocess_cases = [n for n, (_, sub) in CASES.items() if sub and not n.endswith("full_disk")]
    assert len(subprocess_cases) >= 8
    for command in ("build", "evaluate", "convert", "export", "train"):
        assert any(n.startswith(command + "_") for n in CASES), command


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name, tmp_path, assets, env, request):
    fn, sub = CASES[name]
    c = fn(tmp_path, assets, request)
    shared = os.path.dirname(assets["hf"])
    before, shared_before = snapshot(tmp_path), snapshot(shared)
    rc, err = run_command(c, sub, env)
    lines = [l for l in err.splitlines() if l.strip()]
    assert rc == 2, (rc, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    assert lines and ERROR_LINE.match(lines[-1]), err[-3000:]
    for n in c.needles:
        assert n in lines[-1], (n, lines[-1])
    assert snapshot(tmp_path) == before, "output left behind"
    assert snapshot(shared) == shared_before, "the shared inputs changed"


# ------------------------------------------------------------------ train config checks, directly
def smoke_config():
    import importlib.util

    spec = importlib.util.spec_from_file_location("grpo_config", os.path.join(ROOT, "configs", "grpo.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config("smoke")


def test_shipped_configs_pass():
    from emit_jax.training.validate import validate_config

    for n in (1, 8):
        validate_config(smoke_config(), num_devices=n)


@pytest.mark.parametrize("key,value,needle", [
    ("sft.lr", float("nan"), "sft.lr: nan is not a finite number"),
    ("base.lr", 0.0, "base.lr: 0.0 must be > 0.0"),
    ("grpo.lr", float("inf"), "grpo.lr: inf is not a finite number"),
    ("sft.steps", 0, "sft.steps: 0 is below 1"),
    ("base.steps", -5, "base.steps: -5 is below 1"),
    ("sft.batch_size", 0, "sft.batch_size: 0 is below 1"),
    ("warmup.warmup_ratio", 1.5, "warmup.warmup_ratio: 1.5 must be <= 1.0"),
    ("grpo.G", 1, "grpo.G: 1 is below 2"),
    ("grpo.prompts_per_step", 0, "grpo.prompts_per_step: 0 is below 1"),
    ("grpo.beta", -0.1, "grpo.beta: -0.1 must be >= 0.0"),
    ("grpo.eps_low", -0.2, "grpo.eps_low: -0.2 must be >= 0.0"),
    ("grpo.eps_high", float("nan"), "grpo.eps_high: nan is not a finite number"),
    ("grpo.temperature", 0.0, "grpo.temperature: 0.0 must be > 0.0"),
    ("grpo.top_p", 1.5, "grpo.top_p: 1.5 must be <= 1.0"),
    ("grpo.kl", "k9", "grpo.kl: unknown KL estimator 'k9'"),
    ("grpo.agg", "median", "grpo.agg: unknown loss aggregation 'median'"),
    ("grpo.reward_names", ("accuracy", "vibes", "format", "repetition"), "unknown reward(s) ['vibes']"),
    ("grpo.reward_weights", (3.0, 1.0), "has 2 entries for 4 reward_names"),
    ("grpo.lora.rank", 0, "grpo.lora.rank: 0 is below 1"),
    ("stages", ("base", "dpo"), "unknown stage 'dpo'"),
    ("stages", (), "non-empty tuple"),
    ("mesh.tensor", 0, "sizes are positive"),
    ("emit.bn_mode", "weird", "config emit: bn_mode must be"),
    ("arch", "internvl9_1t", "'internvl9_1t' is not a known architecture"),
    ("image_size", 50, "image_size: 50 is not a multiple of the patch size 14"),
    ("data.max_tiles", 0, "data.max_tiles: 0 is below 1"),
    ("data.length_buckets", (1024, 512), "must be increasing positive integers"),
    ("init_from", "/no/such/checkpoint", "init_from: '/no/such/checkpoint' is not a folder"),
    ("memory.attention_chunk", -1, "memory.attention_chunk: -1 is below 0"),
    ("grpo.correct", "vibes", "grpo.correct: 'vibes' must be 'accuracy' or 'adfm_cls'"),
    ("grpo.records", "mmad", "grpo.records: 'mmad' must be 'grpo'"),
    ("grpo.records", "adfm", "data.adfm: False must be True when grpo.records='adfm'"),
    ("eval_adfm", 10, "data.adfm: False must be True"),
    ("warmup.hint", "picture", "warmup.hint: 'picture' must be 'statement' or 'map'"),
    ("data.ad_order", "no_yes", "data.ad_order: 'no_yes' must be one of ('shuffled', 'yes_no')"),
    ("data.rationale", "long", "data.rationale: 'long' must be one of ('brief', 'restate')"),
    ("data.answers", "letters",
     "data.answers: 'letters' must be one of ('letter', 'words', 'all_words')"),
    ("sft.fresh_datasets", -1, "sft.fresh_datasets: -1 is below 0"),
    ("base.fresh_direct", 1.5, "base.fresh_direct: 1.5 must be <= 1.0"),
    ("base.fresh_direct", -0.5, "base.fresh_direct: -0.5 must be >= 0.0"),
    ("grpo.bn", "running", "grpo.bn: 'running' must be 'train' or 'frozen'"),
    ("grpo.instruction", "loud", "grpo.instruction: 'loud' must be 'think' or 'direct'"),
    ("grpo.max_new_tokens", 1 << 20, "grpo.max_new_tokens: 1048576 new tokens do not fit the "
     "model's context: arch 'tiny' holds 8,192 positions"),
    ("eval_max_new_tokens", 8192, "eval_max_new_tokens: 8192 new tokens do not fit"),
    ("eval_batch", 0, "eval_batch: 0 is below 1"),
    ("sft.fresh_shares", (0.5, 0.5), "sft.fresh_shares: (0.5, 0.5) must be a tuple of 1 shares"),
    ("sft.fresh_shares", (1.5,), "sft.fresh_shares: 1.5 must be <= 1.0"),
    ("data.zoom", -0.1, "data.zoom: -0.1 must be >= 0.0"),
    ("data.zoom", 1.5, "data.zoom: 1.5 must be <= 1.0"),
    ("data.zoom_layers", (0, 2), "data.zoom_layers: (0, 2) must be a tuple of ViT block numbers"),
])
def test_validate_config_names_key_and_problem(key, value, needle):
    from emit_jax.models.config import ConfigError
    from emit_jax.training.validate import validate_config

    cfg = smoke_config()
    node, *path = key.split(".")
    target = cfg
    for p in [node] + path[:-1] if path else []:
        target = target[p]
    with cfg.unlocked():
        target[path[-1] if path else node] = value
    with pytest.raises(ConfigError) as e:
        validate_config(cfg, num_devices=1)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("devices,overrides,needle", [
    (4, {"sft.batch_size": 6}, "sft.batch_size: 6 rows do not split over the mesh's 4 batch shards"),
    (8, {"grpo.prompts_per_step": 3}, "3 x 4 = 12 sequences do not split over the mesh's 8"),
    (8, {"mesh.data": 3}, "do not divide the 8 devices"),
    (4, {"mesh.data": 2, "mesh.fsdp": 1, "mesh.tensor": 1}, "needs 2 devices, but 4 are present"),
])
def test_validate_config_mesh_and_batch(devices, overrides, needle):
    from emit_jax.models.config import ConfigError
    from emit_jax.training.validate import validate_config

    cfg = smoke_config()
    with cfg.unlocked():
        for k, v in overrides.items():
            sec, name = k.split(".")
            cfg[sec][name] = v
    with pytest.raises(ConfigError, match=re.escape(needle)):
        validate_config(cfg, num_devices=devices)
    cfg2 = smoke_config()
    with cfg2.unlocked():
        cfg2.mesh.data, cfg2.mesh.fsdp = 2, -1
    validate_config(cfg2, num_devices=8)  # 8 rows over data 2 x fsdp 4: fine


def test_hf_save_filling_the_disk_mid_write_leaves_nothing(full_disk, assets):
    """Past the free-space check: a write that meets a full disk is an OSError naming the file,
    and the temporary folder is gone."""
    from emit_jax import hf

    with pytest.raises(OSError, match="No space left on device") as e:
        hf.save(hf.load(assets["hf"]), os.path.join(full_disk, "out"))
    assert e.value.filename and e.value.filename.startswith(full_disk)
    assert os.listdir(full_disk) == ["filler"]


def test_direct_rollouts_are_refused_for_adfm_records():
    """grpo.instruction='direct' swaps the think instruction for the direct one; AD-FM's prompts
    ask for staged reasoning and a box, so the pair is one config error, not a traceback at
    stage 2."""
    from emit_jax.models.config import ConfigError
    from emit_jax.training.validate import validate_config

    cfg = smoke_config()
    with cfg.unlocked():
        cfg.grpo.records, cfg.data.adfm, cfg.grpo.instruction = "adfm", True, "direct"
    with pytest.raises(ConfigError, match=r"^config grpo.instruction: 'direct' must be 'think' "
                                          r"when grpo.records='adfm'"):
        validate_config(cfg, num_devices=1)
    with cfg.unlocked():
        cfg.grpo.instruction = "think"
    validate_config(cfg, num_devices=1)
