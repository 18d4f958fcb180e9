"""The native CPU heat-map kernel (``heatmap_cpu.cc``): built on first use, loaded, registered.

The kernel is compiled with the host's C++ compiler (``$CXX``, else ``c++``/``g++``/``clang++``)
and ``-march=native`` into a per-user cache (``$EMIT_JAX_NATIVE_CACHE``, default
``~/.cache/emit_jax/native``), keyed by the source, the compiler, the flags, jaxlib's version
(the FFI headers) and this CPU's model and feature flags, so a cache shared between machines
never hands one CPU another's build. The library is written to a temporary name and renamed
into place, so concurrent first uses (test workers, processes of one host) never load a
half-written file. A build takes about 3 s.

``EMIT_JAX_NATIVE_ARCH`` replaces ``-march=native`` (e.g. ``-march=x86-64-v3`` for a build every
AVX2 machine can run; empty for the compiler's default target); the kernel is tuned for
AVX-512's 32 registers and correct on any target GCC or Clang vectorises for.

``EMIT_JAX_NATIVE=0`` turns it off. Without a compiler, or when the build fails, :func:`load`
returns ``None`` and :func:`unavailable_reason` says why; ``strategy="auto"`` then uses the XLA
strategies, and ``strategy="fused"`` raises with that reason.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from emit_jax.fileio import atomic_path, env_path

SOURCE = Path(__file__).with_name("heatmap_cpu.cc")
TARGET = "emit_jax_heatmap_cpu"
_SYMBOL = "EmitJaxHeatmapCpu"
# tried in order: the first set the compiler accepts is used (-march=native is not universal)
_ARCH_FLAGS = (["-march=native"], ["-mcpu=native"], [])

log = logging.getLogger(__name__)
_reason: str | None = None


def enabled() -> bool:
    return os.environ.get("EMIT_JAX_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    d = env_path("EMIT_JAX_NATIVE_CACHE")
    return Path(d) if d else Path.home() / ".cache" / "emit_jax" / "native"


def compiler() -> str | None:
    """The C++ compiler to build with: ``$CXX`` if set, else the first of c++, g++, clang++."""
    env = os.environ.get("CXX")
    if env:
        return shutil.which(env) or env
    for name in ("c++", "g++", "clang++"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _cpu_id() -> str:
    """This CPU's model and feature flags (what ``-march=native`` builds for)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines = [ln for ln in f if ln.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part")]
        return "".join(sorted(set(lines)))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


class _BuildFailed(Exception):
    """A compiler run failed: :func:`atomic_path` drops its output."""


def _build(cxx: str) -> Path:
    import jax.ffi
    import jaxlib

    # the FFI headers come with jaxlib: a new jaxlib builds anew
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    version += f"jaxlib {jaxlib.__version__}"
    src = SOURCE.read_bytes()
    cpu = _cpu_id().encode()
    override = os.environ.get("EMIT_JAX_NATIVE_ARCH")
    candidates = []  # (arch flags, all flags, library path) in the order they are tried
    for arch in ([override.split()] if override is not None else _ARCH_FLAGS):
        # -w: the FFI headers' own warnings would bury a real error
        flags = ["-O3", "-std=c++17", "-shared", "-fPIC", "-pthread", "-w", *arch,
                 f"-I{jax.ffi.include_dir()}"]
        key = hashlib.sha256(b"\0".join([src, version.encode(), " ".join(flags).encode(),
                                         cpu])).hexdigest()[:20]
        candidates.append((arch, flags, cache_dir() / f"heatmap_cpu-{key}.so"))
    for _, _, out in candidates:  # a library built before, even with a fallback flag set
        if out.is_file():
            return out
    errors = []
    for arch, flags, out in candidates:
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            with atomic_path(out) as tmp:  # renamed into place only when the build succeeds
                proc = subprocess.run([cxx, *flags, str(SOURCE), "-o", tmp], capture_output=True,
                                      text=True)
                if proc.returncode != 0:
                    raise _BuildFailed
        except _BuildFailed:
            errors.append(f"{cxx} {' '.join(flags)}: exit {proc.returncode}: {proc.stderr.strip()[-2000:]}")
            if arch and arch[0] not in proc.stderr:  # not the target flag: another will not help
                break
            continue
        log.info("built %s with %s %s", out, cxx, " ".join(flags))
        return out
    raise RuntimeError(f"could not compile {SOURCE}:\n" + "\n".join(errors))


@functools.cache
def load() -> str | None:
    """Build (once per cache), load and register the kernel for XLA:CPU; the FFI target's name,
    or ``None`` when it is unavailable (:func:`unavailable_reason` says why)."""
    global _reason
    if not enabled():
        _reason = "EMIT_JAX_NATIVE=0"
        return None
    cxx = compiler()
    if cxx is None:
        _reason = "no C++ compiler found ($CXX, c++, g++, clang++)"
        return None
    try:
        import jax.ffi

        lib = ctypes.CDLL(str(_build(cxx)))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(getattr(lib, _SYMBOL)), platform="cpu")
    except Exception as e:  # a failed build must not take the XLA strategies down with it
        _reason = f"{type(e).__name__}: {e}"
        if isinstance(e, OSError) and e.filename == cxx and os.environ.get("CXX"):
            why = (f"$CXX={os.environ['CXX']}: {e.strerror or e} (set $CXX to a C++ compiler, "
                   "or unset it to use c++, g++ or clang++; EMIT_JAX_NATIVE=0 to build none)")
        elif isinstance(e, OSError) and e.filename and os.path.isfile(e.filename):  # N2
            why = (f"{e.filename}: a file, where the kernel's build folder should be (set "
                   "$EMIT_JAX_NATIVE_CACHE to a writable folder, or EMIT_JAX_NATIVE=0)")
        elif isinstance(e, OSError) and e.filename and e.strerror:  # its build folder
            why = (f"{e.filename}: {e.strerror} (its build folder is {cache_dir()}: set "
                   "$EMIT_JAX_NATIVE_CACHE to a writable folder, or EMIT_JAX_NATIVE=0)")
        else:
            why = " ".join(_reason.split())[:500]
        print(f"warning: native heat-map kernel unavailable, using the XLA strategies: {why}",
              file=sys.stderr)
        return None
    return TARGET


def unavailable_reason() -> str | None:
    """Why :func:`load` returned ``None`` (``None`` if it has not run or succeeded)."""
    return _reason


def threads() -> int:
    """Threads the kernel runs on: the CPUs this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1
