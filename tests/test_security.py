"""Security: only safetensors and Orbax are ever loaded (no pickle, no ``torch.load``, no remote
code, no ``eval``/``exec`` of data, no unsafe YAML), and dataset paths resolve inside the data
root.

The source checks read ``emit_jax/`` with the ``ast`` module (imports and calls, not strings in
comments or docstrings); a runtime check then loads an HF folder, an Orbax checkpoint, a
tokenizer and the packaged ``.npy`` asset in a fresh process in which every unpickling entry
point raises.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

import pytest

from emit_jax.data import jsonl, mmad
from emit_jax.data.mvtec import DataError

from conftest import drop_digests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "emit_jax")

#: modules whose loaders run arbitrary code (or that exist to do so)
BANNED_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "cloudpickle", "shelve",
                  "marshal", "torch", "yaml", "flax.serialization", "safetensors.torch"}


def sources():
    for dirpath, _, files in os.walk(PKG):
        for f in sorted(files):
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                with open(path, encoding="utf-8") as fh:
                    yield os.path.relpath(path, ROOT), ast.parse(fh.read(), path)


def dotted(node) -> str:
    """``a.b.c`` for a Name/Attribute chain, else ''."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def kwarg(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value
    return None


def is_const(node, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def calls(tree):
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)]


def test_the_scanner_sees_the_package():
    files = dict(sources())
    assert "emit_jax/hf.py" in files and "emit_jax/checkpoint.py" in files and len(files) > 30


def test_no_pickle_based_module_is_imported():
    bad = []
    for path, tree in sources():
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for n in names:
                if any(n == m or n.startswith(m + ".") for m in BANNED_MODULES):
                    bad.append(f"{path}:{node.lineno}: import {n}")
    assert not bad, bad


def test_no_eval_exec_or_unsafe_loader_calls():
    bad = []
    for path, tree in sources():
        for c in calls(tree):
            name = dotted(c.func)
            where = f"{path}:{c.lineno}: {name}"
            if name in ("eval", "exec", "compile"):
                bad.append(where)  # ast.literal_eval is an attribute call: allowed
            if name.endswith(("pickle.load", "pickle.loads", "torch.load", "marshal.loads")):
                bad.append(where)
            if name in ("np.load", "numpy.load", "jnp.load") \
                    and not is_const(kwarg(c, "allow_pickle"), False):
                bad.append(where + " without allow_pickle=False")
            if name.endswith("yaml.load") or name.endswith("yaml.load_all"):
                bad.append(where + " (use yaml.safe_load)")
            trust = kwarg(c, "trust_remote_code")
            if trust is not None and not is_const(trust, False):
                bad.append(where + " with trust_remote_code not False")
            if name.endswith("from_pretrained") and not (
                    is_const(kwarg(c, "trust_remote_code"), False)
                    and is_const(kwarg(c, "local_files_only"), True)):
                bad.append(where + " needs trust_remote_code=False, local_files_only=True")
    assert not bad, bad


def test_weights_are_read_by_safetensors_and_orbax_only():
    """Every call that reads arrays from a file is one of: safetensors' ``safe_open`` /
    ``load_file`` (numpy), an Orbax ``restore``, ``np.load(..., allow_pickle=False)``."""
    readers: dict[str, set[str]] = {}
    for path, tree in sources():
        for c in calls(tree):
            name = dotted(c.func)
            last = name.rsplit(".", 1)[-1]
            if last in ("safe_open", "load_file", "restore", "load", "from_bytes",
                        "msgpack_restore"):
                if last == "load" and name.split(".")[0] not in ("np", "numpy", "jnp"):
                    continue  # json.load, hf.load and the like read through the others
                readers.setdefault(last if last != "load" else "np.load", set()).add(path)
    assert set(readers) <= {"safe_open", "load_file", "restore", "np.load"}, readers
    assert "emit_jax/hf.py" in readers["safe_open"]
    assert "emit_jax/checkpoint.py" in readers["restore"]
    for path, tree in sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("orbax"):
                assert node.module.startswith("orbax.checkpoint"), (path, node.module)


PROBE = r"""
import pickle, _pickle, sys
def refuse(*a, **k):
    raise AssertionError("something unpickled")
for m in (pickle, _pickle):
    m.load = m.loads = refuse
class NoUnpickler:
    def __init__(self, *a, **k):
        refuse()
pickle.Unpickler = _pickle.Unpickler = NoUnpickler
try:
    import torch
    torch.load = torch.serialization.load = refuse
except ImportError:
    pass
import numpy as np
_load = np.load
def np_load(*a, allow_pickle=False, **k):
    assert allow_pickle is False, "np.load with allow_pickle"
    return _load(*a, allow_pickle=False, **k)
np.load = np_load

from emit_jax import checkpoint, hf
from emit_jax.data.tokenizer import load_tokenizer
from emit_jax.models.emit import official_soft_prompt
base = sys.argv[1]
hf.load(base + "/hf")
checkpoint.load_model(base + "/ckpt")
load_tokenizer(base + "/hf")
assert official_soft_prompt().shape == (9, 3584)
print("ok")
"""


def test_loading_never_unpickles(tmp_path):
    from flax import nnx

    from emit_jax import checkpoint, hf
    from emit_jax.data.tokenizer import train_tiny_tokenizer
    from emit_jax.models.emit import EMIT
    from emit_jax.models.internvl import InternVL
    from test_evaluate import tiny_for

    import dataclasses

    tok = train_tiny_tokenizer(None, tmp_path / "tok")
    cfg = tiny_for(tok, len(tok) - 1)
    cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, num_hidden_layers=1),
                      text=dataclasses.replace(cfg.text, num_hidden_layers=1))
    model = EMIT.create(InternVL(cfg, rngs=nnx.Rngs(0)), tokenizer=tok)  # + emit_extras
    hf.save(model, tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    checkpoint.save_model(model, tmp_path / "ckpt", assets_from=tmp_path / "hf")
    r = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path)], cwd=ROOT, text=True,
                       capture_output=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"))
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


# ------------------------------------------------------------------ paths stay in the data root
def _record(rid: str, image: str) -> str:
    return json.dumps({"id": rid, "images": [image], "solution": "A",
                       "messages": [{"role": "user", "content": "<image> Is it OK?"}]})


@pytest.mark.parametrize("image", ["../../etc/passwd", "/etc/passwd", "sub/../../outside.png",
                                   "link/secret.png"])
def test_jsonl_record_outside_the_data_root_is_refused(tmp_path, image):
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", root / "link")  # a symlink leading out of the root
    path = tmp_path / "train.jsonl"
    path.write_text(_record("ok-1", "sub/fine.png") + "\n" + _record("evil-2", image) + "\n")
    with pytest.raises(DataError) as e:
        list(jsonl.read_jsonl(path, data_root=str(root)))
    msg = str(e.value)
    assert "train.jsonl:2" in msg and "'evil-2'" in msg and repr(image) in msg \
        and "outside the data root" in msg, msg


def test_jsonl_paths_inside_the_root_resolve_to_it(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    path = tmp_path / "train.jsonl"
    inside = str(root / "a" / "b.png")
    path.write_text(_record("r1", "a/b.png") + "\n" + _record("r2", inside) + "\n")
    recs = list(jsonl.read_jsonl(path, data_root=str(root)))
    assert [r["images"] for r in recs] == [[inside], [inside]]


def test_training_cache_records_are_checked_against_the_dataset(tmp_path):
    """A workdir's cached stage files are read with the dataset folder as data root."""
    from emit_jax.training.data import stage_records
    from test_tasks import make_mvtec

    ds = make_mvtec(tmp_path / "ds", classes=("widget",))
    work = tmp_path / "work"
    stage_records(ds, str(work), text_samples=False)
    path = work / "data" / "test.jsonl"
    recs = [json.loads(l) for l in path.read_text().splitlines()]
    recs[0]["images"][-1] = "../../../../etc/hostname"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(DataError, match=r"test\.jsonl: changed since this workdir built it"):
        stage_records(ds, str(work), text_samples=False)
    drop_digests(work)  # records kept before their digests were: each record is checked
    with pytest.raises(DataError, match=r"test\.jsonl:1: record .*outside the data root"):
        stage_records(ds, str(work), text_samples=False)


@pytest.mark.parametrize("rel,needle", [("../x.png", "escapes the data root"),
                                        ("/etc/passwd", "is absolute"),
                                        ("a\\..\\..\\x.png", "backslash")])
def test_mmad_paths_stay_in_the_root(tmp_path, rel, needle):
    with pytest.raises(mmad.MMADError, match=needle):
        mmad.resolve_path(tmp_path, rel)
