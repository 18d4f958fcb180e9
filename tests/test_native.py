"""The native heat-map kernel's build: cached per CPU and source, atomic, and a clean fallback
to the XLA strategies (with the reason) when it cannot be built or is turned off."""

import json
import os
import subprocess
import sys

import pytest

from emit_jax.ops import native

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = r"""
import json, warnings
import jax.numpy as jnp
from emit_jax.ops import heatmap, native
out = {"target": native.load(), "reason": native.unavailable_reason(),
       "auto": heatmap.resolve_strategy("auto", 32, 32, 6)}
x = jnp.ones((1, 1, 4, 4, 16))
out["auto_map"] = float(heatmap.anomaly_map(x, jnp.ones((1, 1, 2, 4, 4, 16)), 1).sum())
try:
    heatmap.anomaly_map(x, jnp.ones((1, 1, 2, 4, 4, 16)), 1, strategy="fused")
    out["fused"] = "ran"
except RuntimeError as e:
    out["fused"] = str(e)
print(json.dumps(out))
"""


def _probe(tmp_path, **env):
    e = dict(os.environ, EMIT_JAX_NATIVE_CACHE=str(tmp_path / "cache"), **env)
    r = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=e, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr


@pytest.mark.skipif(native.compiler() is None, reason="no C++ compiler on this machine")
def test_builds_once_into_the_cache_and_reuses_it(tmp_path):
    out, _ = _probe(tmp_path)
    assert out == {"target": native.TARGET, "reason": None, "auto": "fused", "auto_map": 0.0,
                   "fused": "ran"}
    built = sorted(os.listdir(tmp_path / "cache"))
    assert len(built) == 1 and built[0].startswith("heatmap_cpu-") and built[0].endswith(".so")
    stamp = os.stat(tmp_path / "cache" / built[0]).st_mtime_ns
    out2, _ = _probe(tmp_path)  # a second process loads the cached library, no rebuild
    assert out2 == out and sorted(os.listdir(tmp_path / "cache")) == built
    assert os.stat(tmp_path / "cache" / built[0]).st_mtime_ns == stamp


def test_turned_off_falls_back_and_says_why(tmp_path):
    out, _ = _probe(tmp_path, EMIT_JAX_NATIVE="0")
    assert out["target"] is None and out["reason"] == "EMIT_JAX_NATIVE=0"
    assert out["auto"] == "banded" and out["auto_map"] == 0.0  # the XLA strategy's result
    assert out["fused"] == "heat-map strategy 'fused' unavailable: EMIT_JAX_NATIVE=0"
    assert not (tmp_path / "cache").exists()


def test_a_failing_compiler_falls_back_with_its_error_and_leaves_no_file(tmp_path):
    script = tmp_path / "badcxx"
    script.write_text("#!/bin/sh\necho 'badcxx: cannot compile today' >&2\nexit 3\n")
    script.chmod(0o755)
    out, stderr = _probe(tmp_path, CXX=str(script))
    assert out["target"] is None and out["auto"] == "banded" and out["auto_map"] == 0.0
    assert "could not compile" in out["reason"] and "cannot compile today" in out["reason"]
    assert "exit 3" in out["reason"] and out["fused"].endswith(out["reason"])
    assert "native heat-map kernel unavailable" in stderr  # one warning, not silence
    assert os.listdir(tmp_path / "cache") == []  # no half-written library, no temp file


@pytest.mark.skipif(native.compiler() is None, reason="no C++ compiler on this machine")
@pytest.mark.parametrize("arch", ["-march=x86-64-v2", "-march=x86-64-v3"])
def test_portable_builds_match_the_definition(tmp_path, arch):
    """Without AVX-512 (SSE4.2 / AVX2 targets) the kernel's vectors lower to narrower registers:
    slower, but the same values."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86-64 targets")
    code = r"""
import json, numpy as np, jax.numpy as jnp
from emit_jax.ops import heatmap, native
assert native.load() is not None, native.unavailable_reason()
rs = np.random.RandomState(0)
q = rs.randn(2, 1, 6, 9, 24).astype(np.float32)
r = (0.3 * q[:, :, None] + rs.randn(2, 1, 3, 6, 9, 24)).astype(np.float32)
a = heatmap.anomaly_map(jnp.asarray(q), jnp.asarray(r), 2, True, "fused")
b = heatmap.anomaly_map(jnp.asarray(q), jnp.asarray(r), 2, True, "dense")
print(json.dumps({"diff": float(jnp.abs(a - b).max()), "built": __import__("os").listdir(native.cache_dir())}))
"""
    env = dict(os.environ, EMIT_JAX_NATIVE_CACHE=str(tmp_path), EMIT_JAX_NATIVE_ARCH=arch)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["diff"] < 1e-6 and len(out["built"]) == 1
