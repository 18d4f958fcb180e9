"""The dataset cache: one folder per generator version and seed, built once, atomically."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from emit_jax.data.embedded.catalogue import GENERATOR_VERSION
from emit_jax.fileio import env_path
from emit_jax.data.embedded.seeding import _check_seed
from emit_jax.data.embedded.writer import _embedded_manifest, generate


def cache_path(cache_dir: str | os.PathLike | None = None, seed: int = 0) -> str:
    """Where :func:`ensure_cached` keeps the dataset: ``<root>/embedded-v<version>-seed<seed>``
    with ``root`` = ``cache_dir``, else ``$EMIT_JAX_CACHE``, else ``~/.cache/emit_jax``."""
    root = cache_dir if cache_dir is not None else env_path("EMIT_JAX_CACHE")
    if not root:
        root = os.path.join(os.path.expanduser("~"), ".cache", "emit_jax")
    return os.path.join(os.fspath(root), f"embedded-v{GENERATOR_VERSION}-seed{_check_seed(seed)}")


def check_cache_root(cache_dir: str | os.PathLike | None = None) -> str:
    """Raise ``DataError`` naming where the cache root came from (``$EMIT_JAX_CACHE``, or the
    ``cache_dir`` given) when it, or its nearest existing ancestor, is not a folder: before,
    ``makedirs`` said ``File exists`` without naming the variable. Returns that naming."""
    from emit_jax.errors import DataError

    if cache_dir is not None:
        root, what = os.fspath(cache_dir), f"cache folder {os.fspath(cache_dir)}"
    elif env_path("EMIT_JAX_CACHE"):
        root = env_path("EMIT_JAX_CACHE")
        what = f"$EMIT_JAX_CACHE={root}"
    else:
        root = os.path.join(os.path.expanduser("~"), ".cache", "emit_jax")
        what = f"the cache folder {root} (set $EMIT_JAX_CACHE to choose another)"
    folder = os.path.abspath(root)
    while not os.path.lexists(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        where = "is" if folder == os.path.abspath(root) else f"lies below {folder}, which is"
        raise DataError(f"{what}: {where} not a folder (the embedded dataset is cached there)")
    return what


def _manifest_matches(path: str, seed: int) -> bool:
    try:
        with open(os.path.join(path, "manifest.json"), encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(m, dict) and m.get("version") == GENERATOR_VERSION and m.get("seed") == seed


def ensure_cached(cache_dir: str | os.PathLike | None = None, seed: int = 0) -> str:
    """Path of the dataset for ``seed`` in the cache (see :func:`cache_path`); built on first use.

    The build goes into a temporary sibling directory that is then renamed into place
    (``os.replace``), so a reader never sees a half-written dataset and concurrent builders agree.
    An existing folder at the target without a matching manifest is replaced.
    """
    seed = _check_seed(seed)
    target = cache_path(cache_dir, seed)
    if _manifest_matches(target, seed):
        return target
    parent = os.path.dirname(target)
    what = check_cache_root(cache_dir)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=os.path.basename(target) + ".tmp-", dir=parent)
    except OSError as e:  # before: the error named a temporary folder the user never chose
        from emit_jax.errors import DataError

        raise DataError(f"{what}: cannot write there ({e.strerror or e}); the embedded dataset "
                        "is built and cached there on first use: make it writable or set "
                        "$EMIT_JAX_CACHE to a folder that is") from None
    try:
        generate(tmp, seed, overwrite=True)
        if os.path.lexists(target) and not _manifest_matches(target, seed):
            import sys
            import time

            stale = tempfile.mkdtemp(prefix=os.path.basename(target) + ".stale-", dir=parent)
            os.replace(target, os.path.join(stale, "old"))
            if _embedded_manifest(os.path.join(stale, "old")):  # an older generation's: ours
                # (O2: before, 24 MB rewritten without a word)
                print(f"note: {target} held the embedded dataset of another generator version "
                      f"or seed (its manifest.json); generated again in its place",
                      file=sys.stderr)
                shutil.rmtree(stale, ignore_errors=True)
            else:  # no generation wrote it: a user's files are kept (eighteenth probe Z1: the
                # folder's other files were deleted, with a note)
                kept = f"{target}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
                kept = kept if not os.path.lexists(kept) else stale + ".kept"
                os.replace(os.path.join(stale, "old"), kept)
                os.rmdir(stale)
                print(f"note: {target} did not hold the embedded dataset of seed {seed} (no "
                      f"manifest.json of the generator); it is moved to {kept}, and the "
                      "dataset generated in its place", file=sys.stderr)
        try:
            os.replace(tmp, target)
        except OSError:
            if not _manifest_matches(target, seed):  # not a concurrent builder that won the race
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return target


_BUILD = ("import sys\nfrom emit_jax.data.embedded.cache import ensure_cached\n"
          "for s in sys.argv[2:]:\n    ensure_cached(sys.argv[1] or None, int(s))\n")


def ensure_cached_many(seeds, cache_dir: str | os.PathLike | None = None, *,
                       workers: int | None = None) -> list[str]:
    """:func:`ensure_cached` for each of ``seeds``, in order; the ones not yet cached built side
    by side in up to ``workers`` child interpreters (default: one per CPU), since a dataset is
    about 7 s of one core's numpy under the GIL. A child that fails leaves its seeds to this
    process, which then raises what :func:`ensure_cached` raises."""
    seeds = [_check_seed(s) for s in seeds]
    missing = sorted({s for s in seeds if not _manifest_matches(cache_path(cache_dir, s), s)})
    n = min(len(missing), workers or os.cpu_count() or 1)
    if n > 1:
        import subprocess
        import sys

        check_cache_root(cache_dir)  # its one-line error, before any child starts
        root = "" if cache_dir is None else os.fspath(cache_dir)
        children = [subprocess.Popen([sys.executable, "-c", _BUILD, root,
                                      *map(str, missing[k::n])],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    for k in range(n)]
        try:
            for child in children:
                child.wait()
        finally:  # interrupted: no child goes on writing
            for child in children:
                if child.poll() is None:
                    child.kill()
                    child.wait()
    return [ensure_cached(cache_dir, s) for s in seeds]
