"""Shared fixtures: tiny random transformers InternVL models saved as real HF folders."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def hf_config(*, heads=4, kv_heads=2, hidden=64, tied=False, vit="layer_norm", image_size=56,
              vision_layers=2, text_layers=2, vocab=320, image_token_id=317, mean_pool=True,
              rope_theta=10000.0, rope_parameters=None):
    """A transformers InternVLConfig at toy size. ``vit``: 'layer_norm' (InternViT-300M style,
    qkv bias) or 'rms_norm' (InternViT-6B style, qk-norm, no qkv bias)."""
    text = dict(model_type="qwen2", hidden_size=hidden, intermediate_size=2 * hidden + 8,
                num_hidden_layers=text_layers, num_attention_heads=heads,
                num_key_value_heads=kv_heads, vocab_size=vocab, rope_theta=rope_theta,
                max_position_embeddings=512, tie_word_embeddings=tied)
    if rope_parameters is not None:
        text["rope_parameters"] = dict(rope_parameters, rope_theta=rope_theta)
    vision = dict(hidden_size=32, intermediate_size=80, num_hidden_layers=vision_layers,
                  num_attention_heads=4, image_size=image_size, patch_size=14,
                  norm_type=vit, use_qk_norm=(vit == "rms_norm"),
                  attention_bias=(vit == "layer_norm"), use_mean_pooling=mean_pool)
    return transformers.InternVLConfig(text_config=text, vision_config=vision,
                                       image_token_id=image_token_id, tie_word_embeddings=tied)


def randomize_(model, seed=0, scale=0.15):
    """Give every parameter a non-trivial random value (HF initialises cls/pos to 0, norms to
    1, layer scale to 0.1, which would hide mapping mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "lambda" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif "embed_tokens" in name or "lm_head" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def make_hf_model(cfg, seed=0, dtype=None):
    torch.manual_seed(seed)
    model = transformers.InternVLForConditionalGeneration(cfg).eval()
    randomize_(model, seed)
    if dtype is not None:
        model = model.to(dtype)
    return model


@pytest.fixture
def save_hf(tmp_path):
    """save_hf(model, name, **save_pretrained kwargs) -> folder path."""
    def _save(model, name="hf", **kw):
        path = tmp_path / name
        model.save_pretrained(path, **kw)
        return str(path)
    return _save


def token_batch(vocab, image_token_id, n_image_tokens_per_row, *, batch=2, length=24, pad=(0, 5),
                seed=0):
    """Left-padded ids/mask with ``n_image_tokens_per_row[i]`` image tokens after 2 text tokens.
    ``pad[i]`` leading padding slots in row i."""
    rs = np.random.RandomState(seed)
    ids = rs.randint(0, image_token_id - 1, (batch, length))
    mask = np.ones((batch, length), np.int64)
    for i in range(batch):
        p = pad[i] if i < len(pad) else 0
        mask[i, :p] = 0
        ids[i, :p] = 0
        n = n_image_tokens_per_row[i] if i < len(n_image_tokens_per_row) else 0
        ids[i, p + 2:p + 2 + n] = image_token_id
    return ids, mask


def hf_positions(mask):
    """Positions as transformers' generate builds them for left padding."""
    pos = np.cumsum(mask, -1) - 1
    return np.where(mask == 0, 1, pos)


# ------------------------------------------------------------------ the main job, smoke size
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_XLA_CACHE: list[str] = []


def interruptible() -> None:
    """``preexec_fn`` of a subprocess a test sends SIGINT: SIGINT back to its default in the
    child, as a terminal's Ctrl-C finds a command. A child inherits an *ignored* SIGINT (a
    suite started as a background job, ``pytest &``, runs with SIGINT ignored), and Python
    then never raises KeyboardInterrupt: such a child ran to completion with exit 0 while its
    SIGTERM twin stopped as it should. SIGHUP likewise (``nohup`` ignores it)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def subprocess_env(**extra) -> dict:
    """The environment for a training subprocess: JAX's persistent compilation cache in one
    folder for the whole test session (a resumed run loads the steps an earlier one compiled;
    the executables are the same, so results are too) and nothing in the user's home."""
    import tempfile

    if not _XLA_CACHE:
        _XLA_CACHE.append(tempfile.mkdtemp(prefix="emit-jax-xla-"))
    return dict(os.environ, JAX_COMPILATION_CACHE_DIR=_XLA_CACHE[0],
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", **extra)


def train_script(patch: str) -> str:
    """A ``python -c`` script that runs ``patch`` (Python that patches a library, with ``os``
    and ``signal`` imported), then ``python -m emit_jax.train`` with the script's arguments."""
    return ("import os, runpy, signal, sys\n" + patch.strip() + "\n"
            "sys.argv = ['emit_jax.train', *sys.argv[1:]]\n"
            "runpy.run_module('emit_jax.train', run_name='__main__')\n")


def in_model_save(action: str) -> str:
    """A :func:`train_script` patch: ``action`` runs once Orbax's ``StandardCheckpointer`` has
    begun writing a finished stage's model (a ``.tmp-model`` folder)."""
    return ("import orbax.checkpoint as ocp\n"
            "save = ocp.StandardCheckpointer.save\n"
            "def save_then_act(self, path, *a, **k):\n"
            "    out = save(self, path, *a, **k)\n"
            "    if 'tmp-model' in str(path):\n"
            f"        {action}\n"
            "    return out\n"
            "ocp.StandardCheckpointer.save = save_then_act\n")


def train(*args, env=None, timeout=1500):
    """``python -m emit_jax.train ARGS`` from the repository root; the CompletedProcess."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "emit_jax.train", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env=subprocess_env(**(env or {})))


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """One uninterrupted ``configs/grpo.py:smoke`` run (every stage, eval, export):
    (workdir, data cache, CompletedProcess)."""
    d = tmp_path_factory.mktemp("run")
    cache = tmp_path_factory.mktemp("cache")
    r = train("--config", "configs/grpo.py:smoke", "--workdir", str(d),
              env={"EMIT_JAX_CACHE": str(cache)})
    assert r.returncode == 0, r.stderr[-4000:]
    return d, cache, r


def drop_digests(workdir) -> None:
    """Remove the records' digests from ``WORKDIR/data/options.json``: the workdir then reads
    as one whose records were written before digests were kept (each record still checked)."""
    import json

    path = os.path.join(os.fspath(workdir), "data", "options.json")
    with open(path, encoding="utf-8") as f:
        options = json.load(f)
    options.pop("digests", None)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(options, f)


def pytest_sessionfinish(session, exitstatus):
    """Remove the session's compilation-cache folder (``subprocess_env``): each test session
    (each xdist worker) made one under the temp folder and left it there, ~20 MB apiece."""
    import shutil

    while _XLA_CACHE:
        shutil.rmtree(_XLA_CACHE.pop(), ignore_errors=True)
