"""Writing output files so that a reader never sees half of one."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """``with atomic_output(path) as f: ...`` writes to a temporary file beside ``path``
    (``.tmp-*``, in the same folder, created if missing), flushes and fsyncs it, then renames it
    over ``path``; if the block raises, the temporary file is removed and ``path`` is untouched
    (a full disk is re-raised as an ``OSError`` naming ``path``).
    ``mode`` is ``"w"`` (UTF-8 text) or ``"wb"``."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_output: mode must be 'w' or 'wb', got {mode!r}")
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    created = []  # the folders made here, deepest first: removed again on failure
    d = folder
    while not os.path.lexists(d):
        created.append(d)
        d = os.path.dirname(d)
    os.makedirs(folder, exist_ok=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=folder)
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        for d in created:
            with contextlib.suppress(OSError):
                os.rmdir(d)
        if isinstance(e, OSError) and not e.filename and e.errno in _DISK_ERRNOS:
            raise OSError(e.errno, e.strerror or os.strerror(e.errno), path) from None
        raise


# a failed write names no file: say which one (a full disk, a quota, a size limit)
_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def check_writable(path: str | os.PathLike) -> None:
    """Raise the ``OSError`` (naming ``path``) that writing ``path`` with :func:`atomic_output`
    would meet, before any work is done: ``path`` is a folder, or its nearest existing ancestor
    is not a writable folder. (A full disk still shows only when writing.)"""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    folder = os.path.dirname(path)
    while not os.path.lexists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)


def check_free_space(path: str | os.PathLike, nbytes: int) -> None:
    """Raise ``OSError(ENOSPC)`` naming ``path`` when the file system that would hold it has
    fewer than ``nbytes`` bytes free: a full disk said in one line before anything is written
    (writers such as Orbax fail noisily, from background threads, when it fills mid-write)."""
    path = os.path.abspath(os.fspath(path))
    folder = path
    while not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    free = shutil.disk_usage(folder).free
    if free < nbytes:
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (needs {nbytes / 2**20:.1f} MiB, "
                      f"{free / 2**20:.1f} MiB free)", path)
