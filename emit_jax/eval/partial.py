"""The partial-answers file of ``python -m emit_jax.evaluate``: answers kept as they are made, so
an interrupted or failed run resumes instead of starting over.

``<out>.partial.jsonl`` (beside ``--out``) is JSON Lines, one object a line, each line written
with one ``write`` and fsynced before the next question starts:

- line 1, the header: ``{"emit_jax.evaluate": "partial answers", "version": 1, "checkpoint":
  ..., "data": ..., "settings": {...}}``. ``settings`` (:func:`settings`) are what the responses
  depend on: the checkpoint's files (:func:`checkpoint_stamp`: names, sizes and modification
  times, so a moved folder still matches and a retrained one does not), ``think``,
  ``max_new_tokens``, ``min_new_tokens``, ``decoding`` and ``max_tiles``. ``checkpoint`` and
  ``data`` are the paths as given, for the reader.
- then one line per answered question: ``{"id": k, "fingerprint": ..., "response": ...,
  "row": {...}}`` where ``k`` is the question's position in the run's order, ``fingerprint``
  (:func:`fingerprint`) a hash of what the model was shown (user text, image paths relative to
  the data root, the CE flag) and ``row`` the results row as ``--out`` will hold it. On resume
  the row is made again from ``response`` with the current ``--parse`` (answer parsing does not
  change what the model said, so it may differ between runs).

:func:`read` returns the answers of a file made with the same settings for the same questions
and refuses, in one line naming the file, one made otherwise. Bytes after the last newline are
a line torn by a kill and are dropped. :class:`Writer` appends (one writer at a time: it holds
an exclusive ``flock``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from typing import Any, Sequence

from emit_jax.errors import DataError
from emit_jax.fileio import where_written

SUFFIX = ".partial.jsonl"
KIND = "partial answers"
VERSION = 2  # 2: the fingerprints hash the images' contents too
RESTART_HINT = "rerun with --restart to start over, or choose another --out"


def path_for(out: str) -> str:
    """The partial-answers file of the results file ``out``: ``<out>.partial.jsonl``."""
    return os.fspath(out) + SUFFIX


def fingerprint(text: str, image_keys: Sequence[str], use_comp: bool,
                image_digests: Sequence[str] = ()) -> str:
    """A short hash of one query as the model sees it: the user text, the image paths (relative
    to the data root, so a moved data folder still matches), the images' contents
    (:func:`file_digest`; before, an image replaced under its name kept its old answer) and the
    CE flag."""
    blob = json.dumps([text, list(image_keys), bool(use_comp), list(image_digests)],
                      ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def file_digest(path: str) -> str:
    """A short hash of the bytes of the file ``path``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def check_is_ours(path: str) -> None:
    """Raise :class:`DataError` when ``path`` exists, holds a complete first line and that line
    is not a partial-answers header: another file (another evaluation's results named like
    this one's answers file), which neither a resume nor ``--restart`` may replace (before,
    ``--restart``, as the message advised, deleted it)."""
    try:
        with open(path, "rb") as f:
            first = f.readline()
    except (FileNotFoundError, IsADirectoryError):
        return
    if not first.endswith(b"\n"):
        return  # empty, or a header torn by a kill: this run's to rewrite
    try:
        head = json.loads(first.decode("utf-8"))
    except (ValueError, RecursionError):
        head = None
    if not (isinstance(head, dict) and head.get("emit_jax.evaluate") == KIND):
        raise DataError(f"{path}: not an emit_jax.evaluate partial-answers file, and this run "
                        "keeps its answers there; move it, or choose another --out")


def checkpoint_stamp(checkpoint: str) -> str | None:
    """A hash of the names (relative), sizes and modification times of every file below the
    checkpoint folder (or of the file itself); None when it does not exist."""
    entries = []
    if os.path.isfile(checkpoint):
        st = os.stat(checkpoint)
        entries.append((".", st.st_size, st.st_mtime_ns))
    elif os.path.isdir(checkpoint):
        for dirpath, dirs, files in os.walk(checkpoint, followlinks=True):
            dirs.sort()
            for name in sorted(files):
                full = os.path.join(dirpath, name)
                try:
                    st = os.stat(full)
                except OSError:
                    continue
                entries.append((os.path.relpath(full, checkpoint), st.st_size, st.st_mtime_ns))
    else:
        return None
    return hashlib.sha256(json.dumps(entries).encode("utf-8")).hexdigest()[:16]


#: the settings every partial-answers file records; the others (an MVTec-style folder's
#: question flags, recorded since the twelfth probe) are compared when the file records them
BASE_SETTINGS = ("checkpoint_files", "think", "max_new_tokens", "min_new_tokens", "decoding",
                 "max_tiles")


def settings(*, checkpoint: str, think: bool, max_new_tokens: int, min_new_tokens: int,
             decoding: str, max_tiles: int, questions: dict[str, Any] | None = None
             ) -> dict[str, Any]:
    """The settings a resumed run must share with the run that wrote the file; ``questions``:
    the flags that made an MVTec-style folder's questions (``--seed``, ``--split``...), named
    when they changed (before: "the data or the prompt changed" of a new ``--seed``)."""
    return {"checkpoint_files": checkpoint_stamp(checkpoint), "think": bool(think),
            "max_new_tokens": int(max_new_tokens), "min_new_tokens": int(min_new_tokens),
            "decoding": decoding, "max_tiles": int(max_tiles), **(questions or {})}


def header(checkpoint: str, data: str, run_settings: dict[str, Any]) -> dict[str, Any]:
    return {"emit_jax.evaluate": KIND, "version": VERSION, "checkpoint": checkpoint,
            "data": data, "settings": run_settings}


def _show(v: Any) -> str:
    return json.dumps(v) if not isinstance(v, str) else v


def read(path: str, run_settings: dict[str, Any], fingerprints: Sequence[str]
         ) -> tuple[dict[int, str], int]:
    """``(question index -> response, bytes of the file to keep)``: :func:`read_all` without
    the count of answers beyond ``fingerprints``."""
    out, keep, _ = read_all(path, run_settings, fingerprints)
    return out, keep


def read_all(path: str, run_settings: dict[str, Any], fingerprints: Sequence[str]
             ) -> tuple[dict[int, str], int, int]:
    """``(question index -> response, bytes of the file to keep, beyond)`` from the partial-answers
    file ``path`` ({} and 0 when it is missing or holds no complete line). Raises
    :class:`DataError` (one line naming the file and saying to use ``--restart``) when the file
    is not one, was written with other ``run_settings``, holds a malformed line before its last
    one, or answers a question whose :func:`fingerprint` is not ``fingerprints[id]`` (the data
    or the prompt changed). Answers to ids past ``len(fingerprints)`` (a smaller ``--limit``)
    are not returned, and stay in the file (the writer only appends): ``beyond`` counts them
    (distinct ids), so the caller keeps the file for a later run that asks those questions."""
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except FileNotFoundError:
        return {}, 0, 0
    keep = blob.rfind(b"\n") + 1  # what follows the last newline is a torn line: dropped
    lines = blob[:keep].split(b"\n")[:-1]
    if not lines:
        return {}, 0, 0

    def bad(lineno: int, problem: str) -> DataError:
        return DataError(f"{path}: line {lineno}: {problem}; {RESTART_HINT}")

    def parse(lineno: int, raw: bytes) -> Any:
        try:
            return json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError, JSONDecodeError
            from emit_jax.fileio import json_problem

            raise bad(lineno, json_problem(e, one_line=True)) from None

    head = parse(1, lines[0])
    if not (isinstance(head, dict) and head.get("emit_jax.evaluate") == KIND
            and isinstance(head.get("settings"), dict)):
        raise bad(1, "not the header of an emit_jax.evaluate partial-answers file")
    if head.get("version") != VERSION:
        raise bad(1, f"version {head.get('version')!r}, this emit_jax reads {VERSION}")
    old = head["settings"]
    diffs = [f"the checkpoint's files differ ({head.get('checkpoint')} then)"
             if k == "checkpoint_files" else f"{k} {_show(old.get(k))}, now {_show(v)}"
             for k, v in run_settings.items()
             if (k in BASE_SETTINGS or k in old) and old.get(k) != v]
    if diffs:
        if len(lines) == 1:  # a header and no answer: nothing to keep (nineteenth probe NA3:
            return {}, 0, 0  # a run stopped before its first answer blocked the next one)
        raise DataError(f"{path}: its answers were made with other settings ({'; '.join(diffs)})"
                        f"; {RESTART_HINT}")
    out: dict[int, str] = {}
    beyond: set[int] = set()
    for lineno, raw in enumerate(lines[1:], 2):
        rec = parse(lineno, raw)
        if not (isinstance(rec, dict) and isinstance(rec.get("id"), int)
                and not isinstance(rec["id"], bool) and rec["id"] >= 0
                and isinstance(rec.get("fingerprint"), str)
                and isinstance(rec.get("response"), str)):
            raise bad(lineno, "not an answer line (id, fingerprint, response)")
        k = rec["id"]
        if k >= len(fingerprints):
            beyond.add(k)
            continue
        if k in out:
            continue
        if rec["fingerprint"] != fingerprints[k]:
            raise bad(lineno, f"the answer to question {k} was made for another question (the "
                      "data or the prompt changed)")
        out[k] = rec["response"]
    return out, keep, len(beyond)


def identity(path: str) -> tuple[int, int] | None:
    """``(device, inode)`` of the file ``path`` (None when there is none): taken before
    :func:`read`, it lets :class:`Writer` notice the file was replaced or removed meanwhile."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return st.st_dev, st.st_ino


def check_not_locked(path: str) -> None:
    """Raise :class:`DataError` when another run holds the partial-answers file ``path`` (it is
    answering questions into it), before this run does any work; nothing when there is no
    such file or it cannot be opened (:func:`read` says why)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise DataError(f"{path}: another emit_jax.evaluate run is writing it") from None
    except OSError:
        pass
    finally:
        os.close(fd)  # releases the probe's lock


_ANY = object()


class Writer:
    """Appends answer lines to the partial-answers file ``path``: the file is cut to its first
    ``keep`` bytes (what :func:`read` accepted; 0 starts it over with ``head``), then each
    :meth:`write` is one ``os.write`` of a whole line, fsynced. Holds an exclusive ``flock``
    while open, so a second run writing the same file is refused.

    ``expect``: the file's :func:`identity` when :func:`read` read it (None: there was none).
    When the file is not that one any more (another run wrote, finished or restarted it in the
    meantime) the run is refused in one line instead of cutting or appending to that run's
    answers."""

    def __init__(self, path: str, head: dict[str, Any], keep: int, expect: Any = _ANY):
        self.path = path
        folder = os.path.dirname(where_written(path))
        os.makedirs(folder, exist_ok=True)
        changed = DataError(f"{path}: another emit_jax.evaluate run changed it after this run "
                            "read it; rerun the same command to resume from what it holds now")
        flags = os.O_RDWR | (os.O_CREAT if expect is _ANY else
                             os.O_CREAT | os.O_EXCL if expect is None else 0)
        try:
            self.fd = os.open(path, flags, 0o666)
        except (FileExistsError, FileNotFoundError):
            raise changed from None
        try:
            try:
                import fcntl

                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except ImportError:  # not POSIX: no lock
                pass
            except BlockingIOError:
                raise DataError(f"{path}: another emit_jax.evaluate run is writing it") from None
            if expect is not _ANY and expect is not None:
                st = os.fstat(self.fd)
                if (st.st_dev, st.st_ino) != tuple(expect) or st.st_size < keep:
                    raise changed
            os.ftruncate(self.fd, keep)
            os.lseek(self.fd, 0, os.SEEK_END)
            if keep == 0:
                self._line(head)
        except BaseException:
            os.close(self.fd)
            raise

    def _line(self, obj: dict[str, Any]) -> None:
        data = (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
            os.fsync(self.fd)
        except OSError as e:
            if e.filename:
                raise
            raise OSError(e.errno, e.strerror or os.strerror(e.errno or errno.EIO),
                          self.path) from None

    def write(self, k: int, fp: str, response: str, row: dict[str, Any]) -> None:
        """One answered question (see the module docstring)."""
        self._line({"id": k, "fingerprint": fp, "response": response, "row": row})

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
