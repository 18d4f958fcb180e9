"""Files and folders written so that a reader never sees half of one, and JSON read so that a
bad file is one line naming it.

The bottom layer: it imports nothing else of the project, so every module may use it.

* :func:`atomic_output` (a file written through an open file object), :func:`atomic_path` (a
  file written by name, e.g. by a subprocess) and :func:`atomic_folder` (a folder) build the
  result under a temporary name beside the target and rename it into place (``os.replace``)
  only when the block completes; a failed block leaves the target as it was and no temporary
  file or folder behind.
* :func:`check_free_space` says a full disk in one line before a write (or, where nothing can
  be created at all, e.g. a read-only or pseudo file system reporting 0 bytes free, that
  error); :func:`disk_full_error` turns a writer's full-disk failure (Orbax / TensorStore text
  included) into that ``OSError``. :func:`check_utf8_path` refuses an output path that is not
  UTF-8 where a library (Orbax) would write it.
* :func:`hold_lock`: one process at a time in a folder (``fcntl.flock`` on a lock file; the
  kernel drops it when the holder dies), a second one refused with a ``LockedError`` line;
  :func:`output_lock`: the same for one output file.
* :func:`read_json` and :func:`iter_json_lines` read JSON and JSON Lines files; every way a file
  can fail to read or parse (missing, unreadable, not UTF-8, malformed, too deep, a number too
  long) becomes one line that names the file (and line).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import stat
import sys
import tempfile
import time
from typing import IO, Any, Callable, Iterator

from emit_jax.errors import (ConfigError, InputOverwriteError, LockedError, causes, has_control,
                             not_utf8, show_path)


# --------------------------------------------------------------------------------- writing files
def where_written(path: str | os.PathLike) -> str:
    """The absolute path the kernel writes when given ``path``: its folder with symbolic links
    resolved before any ``..`` is applied (``LINK/../x`` is ``x`` beside the link's target, not
    beside the link, which ``os.path.abspath`` would say), its last name as given (a link
    there is the writers' to refuse). Every writer here and :func:`check_not_input` (which
    resolves the same way) so agree on the file meant: an output that names an input through
    a link is refused, never written over it."""
    p = os.fspath(path)
    head, tail = os.path.split(p)
    if tail in ("", os.curdir, os.pardir):
        return os.path.realpath(p)
    return os.path.join(os.path.realpath(head or os.curdir), tail)


def unambiguous(path: str | os.PathLike) -> str:
    """``path`` itself when ``os.path.abspath`` and the kernel read it alike (no link followed
    by ``..``), else :func:`where_written`'s reading: a folder a run writes into through many
    functions, some of which would collapse ``..`` lexically (``os.path.abspath``) and others
    not, is one folder, not two."""
    p = os.fspath(path)
    lexical = os.path.abspath(p)
    kernel = where_written(p)
    if os.path.join(os.path.realpath(os.path.dirname(lexical)),
                    os.path.basename(lexical)) == kernel:
        return p
    return kernel


def user_path(path: str) -> str:
    """A path as the user meant it where no shell has read it (quoted, after ``=``, in a
    config): a leading ``~`` expanded, and a ``LINK/../x`` read as the kernel reads it
    (:func:`unambiguous`: before, ``os.path.abspath`` collapsed it beside the link, a folder
    the user never named). Anything else is returned as it is. A ``~user`` that names no user
    of this machine is a ``ConfigError`` (a shell leaves it as it is: the output went to a
    folder ``./~user`` the user never meant)."""
    if not isinstance(path, str) or not path:
        return path
    if path.startswith("~"):
        expanded = os.path.expanduser(path)
        if expanded == path:
            head = path.split(os.sep, 1)[0]
            raise ConfigError(f"{path!r}: " + (f"{head} names no user of this machine (no home "
                              "folder to put in its place)" if head != "~" else
                              "no home folder to put in place of ~ (HOME is unset and this user "
                              "has none)") + f"; write ./{path} for a folder of that name")
        path = expanded
    if os.pardir in path.split(os.sep):
        path = unambiguous(path)
    return path


def env_path(name: str) -> str | None:
    """The path the environment variable ``name`` holds, read as :func:`user_path` reads a
    flag (a quoted ``~/x`` from a ``.env`` file or a service unit is the home folder's; before,
    a folder named ``~`` was made under ./); None when unset or empty. A ``~user`` of no user
    is a ``ConfigError`` naming the variable."""
    value = os.environ.get(name)
    if not value:
        return None
    try:
        return user_path(value)
    except ConfigError as e:
        raise ConfigError(f"${name}: {e}") from None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """``with atomic_path(path) as tmp: ...`` yields the name of a new empty temporary file beside
    ``path`` (``.tmp-*`` with ``path``'s extension, in the same folder, created if missing) for the
    block to write (e.g. a compiler's ``-o``), then renames it over ``path``. If the block raises,
    the temporary file and the folders made for it are removed and ``path`` is untouched (a full
    disk is re-raised as an ``OSError`` naming ``path``). Nothing is fsynced here: the writer
    decides (:func:`atomic_output` does)."""
    path = where_written(path)
    check_regular(path)  # a device, pipe or link is never renamed over
    folder = os.path.dirname(path)
    created = _missing_folders(folder)  # made here, deepest first: removed again on failure
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)  # inside: a failure half-way removes what it made
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=folder)
        # mkstemp makes it 0600; the file gets the mode ordinary creation would give it (the
        # umask's), or keeps the mode of the file it replaces
        os.fchmod(fd, _replaced_mode(path, 0o666))
        os.close(fd)
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.lexists(tmp):
            os.remove(tmp)
        _remove_folders(created)
        if isinstance(e, OSError) and e.errno is not None and (
                (not e.filename and e.errno in _DISK_ERRNOS) or _is_temp_name(e.filename, folder)):
            # name the user's path, not the temporary file beside it (mkstemp's own failure)
            raise OSError(e.errno, e.strerror or os.strerror(e.errno), path) from None
        raise


def _is_temp_name(name, folder: str) -> bool:
    """Whether ``name`` (an ``OSError``'s filename) is a temporary file of :func:`atomic_path`
    in ``folder``."""
    if not isinstance(name, (str, bytes)):
        return False
    name = os.fsdecode(name)
    return (os.path.dirname(os.path.abspath(name)) == folder
            and os.path.basename(name).startswith(".tmp-"))


def _missing_folders(folder: str) -> list[str]:
    """The folders ``os.makedirs(folder)`` would create, deepest first."""
    created = []
    while not os.path.lexists(folder) and os.path.dirname(folder) != folder:
        created.append(folder)
        folder = os.path.dirname(folder)
    return created


def _remove_folders(created: list[str]) -> None:
    """Remove the (empty) folders of :func:`_missing_folders` that exist, deepest first."""
    for d in created:
        with contextlib.suppress(OSError):
            os.rmdir(d)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """``with atomic_output(path) as f: ...`` writes to a temporary file beside ``path``
    (``.tmp-*``, in the same folder, created if missing), flushes and fsyncs it, then renames it
    over ``path``; if the block raises, the temporary file is removed and ``path`` is untouched
    (a full disk is re-raised as an ``OSError`` naming ``path``). See :func:`atomic_path`.
    ``mode`` is ``"w"`` (UTF-8 text) or ``"wb"``."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_output: mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(path) as tmp:
        with open(tmp, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


def current_umask() -> int:
    """The process's umask, read without changing it where Linux allows (``/proc``); else by
    setting and restoring it."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _replaced_mode(path: str, default: int) -> int:
    """The permission bits a new file at ``path`` gets: those of the regular file it replaces,
    else ``default`` less the umask."""
    try:
        st = os.stat(path)
        if stat.S_ISREG(st.st_mode):
            return stat.S_IMODE(st.st_mode)
    except OSError:
        pass
    return default & ~current_umask()


# a failed write names no file: say which one (a full disk, a quota, a size limit)
#: the errnos of a disk or quota that takes no more, and how writers that raise them from their
#: own threads (Orbax / TensorStore) say them in text
_DISK_TEXTS = {errno.ENOSPC: ("No space left on device", "os_error_code='28'"),
               errno.EDQUOT: ("Disk quota exceeded", "os_error_code='122'"),
               errno.EFBIG: ("File too large", "os_error_code='27'")}  # ulimit -f, a quota
_DISK_ERRNOS = tuple(_DISK_TEXTS)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, *, hint: str = "choose a new folder",
                  tmp: str | os.PathLike | None = None, owner: bool = True) -> Iterator[str]:
    """``with atomic_folder(path) as tmp: ...`` yields a new temporary folder beside ``path``
    (``.tmp-<name>-*``; the parent folder is created if missing) for the block to fill, then
    renames it to ``path``. If the block raises, the temporary folder is removed and ``path`` is
    untouched.

    ``path`` must be missing or an empty folder (which is replaced); anything else raises
    ``FileExistsError("<path>: exists and is not empty; <hint>")`` before anything is written.

    Several processes writing one folder (multi-host checkpoints) agree on a fixed ``tmp``
    instead: the ``owner`` empties and creates it on entry (the others must wait for that, e.g.
    at a barrier at the top of the block) and alone renames it into place on success; the
    others leave it as it is. On failure the owner removes it (before, every process did: one
    process interrupted removed the folder the others were still writing, twenty-seventh probe
    N7; the owner's next entry empties it anyway)."""
    path = where_written(path)
    if tmp is None and not owner:
        raise ValueError("atomic_folder: owner=False needs the shared tmp folder")
    check_new_folder(path, hint=hint)
    parent = os.path.dirname(path)
    # the parent folders made for a single writer are removed again on failure (several
    # processes may share them)
    created = _missing_folders(parent) if tmp is None else []
    try:
        os.makedirs(parent, exist_ok=True)
        if tmp is None:
            # the name cut short: a legal 255-byte name must not make the temporary one too long
            tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path)[:64] + "-", dir=parent)
            os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it 0700
        else:
            tmp = os.path.abspath(os.fspath(tmp))
            if owner:
                shutil.rmtree(tmp, ignore_errors=True)
                os.makedirs(tmp)
    except BaseException:
        _remove_folders(created)
        raise
    try:
        yield tmp
        if owner:
            try:
                if os.path.isdir(path):
                    os.rmdir(path)  # an empty folder; os.rmdir refuses one filled meanwhile
                os.replace(tmp, path)
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                raise FileExistsError(
                    f"{path}: filled by another run while this one was writing it; this run's "
                    "copy is discarded and the folder holds the other's") from None
    except BaseException as e:
        if owner:
            shutil.rmtree(tmp, ignore_errors=True)
        _remove_folders(created)
        if isinstance(e, OSError) and e.errno is not None:
            # name the user's path, not the temporary folder (a full disk, "File too large")
            name = os.fsdecode(e.filename) if isinstance(e.filename, (str, bytes)) else None
            if name is not None and (name == tmp or name.startswith(tmp + os.sep)):
                raise OSError(e.errno, e.strerror or os.strerror(e.errno),
                              os.path.join(path, name[len(tmp) + 1:]).rstrip(os.sep)) from None
            if name is None and e.errno in _DISK_ERRNOS:
                raise OSError(e.errno, e.strerror or os.strerror(e.errno), path) from None
        raise


def check_not_input(out: str | os.PathLike, inputs: dict) -> None:
    """Refuse an output path that is one of ``inputs`` or lies inside one (symlinks resolved):
    ``inputs`` maps a flag name (``"--data"``) to its path, or None when not given. Raises
    ``ValueError`` naming the output, the flag and its path, before anything is written. An
    output in what a training workdir's runs write (:func:`training_workdir_part`: its ``hf/``,
    stage folders, ``results.json`` ...) is refused too."""
    target = os.path.realpath(os.fspath(out))
    for flag, path in inputs.items():
        if not path:
            continue
        src = os.path.realpath(os.fspath(path))
        if target == src or target.startswith(src.rstrip(os.sep) + os.sep):
            where = "is" if target == src else "lies inside"
            raise InputOverwriteError(
                f"{show_path(out)}: the output {where} the input {flag} {show_path(path)}; "
                "choose a path outside it")
    # (eighteenth probe E15/F2/F3: written in WORKDIR/hf, gone with the next export; the
    # twenty-second's X34 / T03b: in a stage's checkpoint step, deleted as the stage went on,
    # and over WORKDIR/results.json, replaced as the run ended)
    if part := training_workdir_part(target):
        workdir, entry, what = part
        # (twenty-sixth probe OW4: a restart's moved outputs are kept, never deleted)
        why = ("which the tool keeps as the restart left it" if what in KEPT_AS_LEFT
               else "which its runs replace or delete")
        raise InputOverwriteError(
            f"{show_path(out)}: the output {'is' if entry == target else 'lies inside'} "
            f"{show_path(entry)}, {what} of the training workdir {show_path(workdir)}, {why}; "
            "choose a path outside it (or a new name in the workdir itself)")


#: what a training workdir's runs write at its top level, and so replace or delete: the stage
#: folders (their checkpoints rotate), the export, the records, the tokenizer, the results and
#: plots, the lock; folders starting with these prefixes (restarts, fresh_images) too
WORKDIR_OWN = {"warmup": "a stage folder", "base": "a stage folder", "sft": "a stage folder",
               "sft2": "a stage folder", "grpo": "a stage folder",
               "hf": "the model export", "data": "the records", "tokenizer": "the tokenizer",
               "results.json": "the results", "curves.png": "the curves",
               "results.png": "the results plot", ".lock": "the lock"}
WORKDIR_OWN_PREFIXES = {"replaced-": "a restart's moved output",
                        "fresh_": "a fresh_images run's folder"}
#: of those, what a run never changes again (a restart's moved outputs, for the user to keep)
KEPT_AS_LEFT = ("a restart's moved output",)


def training_workdir_part(path: str) -> tuple[str, str, str] | None:
    """``(workdir, entry, what)`` when ``path`` (resolved) is, or lies inside, an entry a
    training workdir's runs write (:data:`WORKDIR_OWN`: ``WORKDIR/hf``, a stage folder and its
    checkpoints, ``results.json`` ...); ``WORKDIR`` is known by its records'
    ``data/options.json``. None elsewhere, a new name at the workdir's top level included."""
    entry = path
    while entry and entry != os.path.dirname(entry):
        workdir, name = os.path.dirname(entry), os.path.basename(entry)
        what = WORKDIR_OWN.get(name) or next(
            (w for p, w in WORKDIR_OWN_PREFIXES.items() if name.startswith(p)), None)
        if what and os.path.isfile(os.path.join(workdir, "data", "options.json")):
            return workdir, entry, what
        entry = workdir
    return None


def _kind(mode: int) -> str:
    """What a file of ``st_mode`` ``mode`` that is no regular file is, in words."""
    return ("a folder" if stat.S_ISDIR(mode) else "a symbolic link" if stat.S_ISLNK(mode)
            else "a pipe" if stat.S_ISFIFO(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "not a file")


def not_a_file(path: str | os.PathLike) -> str | None:
    """What ``path`` is when it exists (as a name) but is no regular file to read, in words
    (``a symbolic link to nothing (or a link loop)``, ``a folder``, ``a pipe``, ``a device``,
    ``a socket``, ``not a file``); None when it is a file (through links) or does not exist."""
    path = os.fspath(path)
    if os.path.isfile(path) or not os.path.lexists(path):
        return None
    if not os.path.exists(path):
        return "a symbolic link to nothing (or a link loop)"
    return _kind(os.stat(path).st_mode)


def check_regular(path: str | os.PathLike) -> None:
    """Raise ``FileExistsError`` naming ``path`` when it exists and is not a regular file (a
    device such as ``/dev/null``, a pipe, a socket, a symbolic link, a link loop): an output
    written atomically is renamed over its path, which would replace the device or the link
    itself with a file. A folder is left to the caller (``IsADirectoryError``)."""
    path = os.fspath(path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError:  # a path through a loop or a non-folder: the write says it
        return
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return
    what = _kind(mode)
    raise FileExistsError(f"{path}: exists and is not a regular file ({what}), which writing it "
                          "would replace; choose another path")


def check_writable(path: str | os.PathLike) -> None:
    """Raise the ``OSError`` (naming ``path``) that writing ``path`` with :func:`atomic_output`
    would meet, before any work is done: ``path`` is a folder, or its nearest existing ancestor
    is not a writable folder. (A full disk still shows only when writing.)"""
    note_blank_names(path)
    path = where_written(path)
    if os.path.isdir(path) and not os.path.islink(path):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    check_regular(path)
    _check_parent(path)


def _check_parent(path: str) -> None:
    """The ``OSError`` naming ``path`` that creating it would meet: a name longer than the file
    system allows (one of its own, or of the folders to create), or a nearest existing ancestor
    that is not a writable folder."""
    check_no_control(path)
    folder = nearest_existing(os.path.dirname(path))
    names = os.path.relpath(path, folder).split(os.sep)  # the file and the folders to make
    if not os.path.isdir(folder):  # checked again below; first, so pathconf reads a folder
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
    longest, whole = name_max(folder), _pathconf(folder, "PC_PATH_MAX", 4096)
    if any(len(os.fsencode(n)) > longest for n in names) or len(os.fsencode(path)) >= whole:
        raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), path)
    check_folder_writable(folder, path)


_BLANK_NOTED: set[str] = set()


def note_blank_names(path: str | os.PathLike) -> None:
    """Once per path: a note on stderr when a name that does not exist yet in ``path`` begins or
    ends with a blank (a stray space in a script: ``" /tmp/x"`` is a relative path, written
    under the current folder; twenty-sixth probe TS3: without a word), naming where it goes."""
    path = os.fsdecode(path)
    if path in _BLANK_NOTED:
        return
    made = os.path.relpath(os.path.abspath(path), nearest_existing(path))
    if made != os.curdir and any(n != n.strip() for n in made.split(os.sep)):
        _BLANK_NOTED.add(path)
        print(f"note: {path!r}: a name in it begins or ends with a blank; it is written as it "
              f"is, at {os.path.abspath(path)!r}", file=sys.stderr)


def name_max(folder: str) -> int:
    """The longest file name (bytes) the file system of the existing ``folder`` takes (255
    where it does not say)."""
    return _pathconf(folder, "PC_NAME_MAX", 255)


def _pathconf(folder: str, name: str, default: int) -> int:
    try:
        return os.pathconf(folder, name)
    except (OSError, ValueError):
        return default


def nearest_existing(path: str | os.PathLike) -> str:
    """The nearest of ``path`` (absolute) and its ancestors that exists: where creating
    ``path`` would begin."""
    folder = os.path.abspath(os.fspath(path))
    while not os.path.lexists(folder):
        folder = os.path.dirname(folder)
    return folder


def check_folder_writable(folder: str, path: str, *, full_disk_ok: bool = True) -> None:
    """Raise the ``OSError`` naming ``path`` that creating a file in the existing ``folder``
    meets: not a folder, no write permission, or creating one fails (root passes
    ``os.access`` on a read-only mount or in ``/sys``). A full disk is let through when
    ``full_disk_ok`` (the writer says it with the space needed), raised otherwise."""
    if not os.path.isdir(folder):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
    _check_creatable(folder, path, full_disk_ok=full_disk_ok)


def check_no_control(path: str | os.PathLike) -> None:
    """Raise ``OSError(EINVAL)`` naming ``path`` (quoted) when it holds a newline, tab or other
    control character: an output made under such a name could not be named in a log line, a
    shell or a JSON-lines listing without quoting, and is almost always a pasting mistake."""
    if has_control(os.fsdecode(path)):
        raise OSError(errno.EINVAL, "the path holds a newline or another control character; "
                      "choose another", os.fsdecode(path))


def check_new_folder(path: str | os.PathLike, *, hint: str = "choose a new folder") -> None:
    """Raise, before any work is done, the error :func:`atomic_folder` would meet writing the
    folder ``path``: it exists and is not an empty folder (``FileExistsError``, the same line),
    a name too long, or its nearest existing ancestor is not a writable folder (an ``OSError``
    naming ``path``)."""
    note_blank_names(path)
    path = where_written(path)
    if os.path.islink(path):  # before: "exists and is not empty", for a link to nothing too
        raise FileExistsError(f"{path}: a symbolic link, which writing the folder would "
                              f"replace; {hint}")
    if os.path.lexists(path) and not os.path.isdir(path):  # before: "not empty" of /dev/null
        raise FileExistsError(f"{path}: exists and is {not_a_file(path) or 'a file'}, not a "
                              f"folder; {hint}")
    if os.path.lexists(path) and os.listdir(path):
        raise FileExistsError(f"{path}: exists and is not empty; {hint}")
    _check_parent(path)


def check_free_space(path: str | os.PathLike, nbytes: int) -> None:
    """Raise ``OSError(ENOSPC)`` naming ``path`` when the file system that would hold it has
    fewer than ``nbytes`` bytes free: a full disk said in one line before anything is written
    (writers such as Orbax fail noisily, from background threads, when it fills mid-write)."""
    path = where_written(path)
    folder = path
    while not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    free = shutil.disk_usage(folder).free
    if free < nbytes:
        # a location that cannot be written at all (a read-only or pseudo file system, where
        # no space is reported free) is said as such, not as a full disk
        _check_creatable(folder, path)
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (needs {nbytes / 2**20:.1f} MiB, "
                      f"{free / 2**20:.1f} MiB free)", path)


def _check_creatable(folder: str, path: str, *, full_disk_ok: bool = True) -> None:
    """Raise the ``OSError`` naming ``path`` that creating an (empty) file in the existing
    ``folder`` meets, unless it is a full disk and ``full_disk_ok``; ``os.access`` alone is not
    enough (root passes it on a read-only mount or in ``/sys``)."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    except OSError as e:
        if not full_disk_ok or (e.errno is not None and e.errno not in _DISK_ERRNOS):
            raise OSError(e.errno, e.strerror or os.strerror(e.errno), path) from None
        return
    os.close(fd)
    with contextlib.suppress(OSError):
        os.remove(tmp)


def check_utf8_path(path: str | os.PathLike, flag: str, *,
                    why: str = "the library that writes it cannot use such a name") -> None:
    """Raise ``ConfigError`` naming ``flag`` and ``path`` (by the repr of its bytes) when
    ``path`` is not valid UTF-8 (Python hands such bytes over as lone surrogates), for outputs
    written by a library that cannot take such a name (Orbax / TensorStore, tokenizers)."""
    path = os.fspath(path)
    if isinstance(path, bytes):
        try:
            path.decode("utf-8")
            return
        except UnicodeDecodeError:
            raw = path
    else:
        try:
            path.encode("utf-8")
            return
        except UnicodeEncodeError:
            raw = os.fsencode(path)
    said = not_utf8(raw, "choose a UTF-8 path")
    if said.startswith("is not"):
        said = f"is not valid UTF-8 and {why}; choose a UTF-8 path"
    raise ConfigError(f"{flag} {raw!r}: the path {said}")


def disk_full_error(e: BaseException, path: str | os.PathLike) -> OSError | None:
    """The ``OSError(ENOSPC)`` naming ``path`` that ``e`` amounts to when it (or an exception it
    was raised from) says the disk or the quota is full: an ``OSError`` with such an errno, or
    the text writers such as Orbax / TensorStore raise from their threads (``No space left on
    device``, ``os_error_code='28'``); else None."""
    for x in causes(e):
        if isinstance(x, OSError) and x.errno in _DISK_ERRNOS:
            return OSError(x.errno, os.strerror(x.errno), os.fspath(path))
        text = str(x)
        for code, marks in _DISK_TEXTS.items():
            if any(m in text for m in marks):
                return OSError(code, os.strerror(code), os.fspath(path))
    return None


#: why a folder would not take a file (besides a full disk): no permission, a read-only or
#: immutable file system
_REFUSED_ERRNOS = (errno.EPERM, errno.EACCES, errno.EROFS)


def write_refused_error(e: BaseException, path: str | os.PathLike) -> OSError | None:
    """The ``OSError`` naming ``path`` that ``e`` amounts to when it (or an exception it was
    raised from) is a write the file system refused (``Operation not permitted``, ``Permission
    denied``, ``Read-only file system``: a folder made immutable, a permission change or a
    read-only mount under a running job); else None."""
    for x in causes(e):
        if isinstance(x, OSError) and x.errno in _REFUSED_ERRNOS:
            return OSError(x.errno, os.strerror(x.errno), os.fspath(path))
    return None


def folder_gone_error(e: BaseException) -> FileNotFoundError | None:
    """The ``FileNotFoundError`` in ``e``'s chain whose file's folder no longer exists: the
    folder a writer (Orbax's threads) was writing into was moved or deleted under it (a workdir
    renamed while a run trains); else None."""
    for x in causes(e):
        if isinstance(x, FileNotFoundError) and isinstance(x.filename, str) and \
                not os.path.isdir(os.path.dirname(x.filename)):
            return x
    return None


# --------------------------------------------------------------------------------- locks
@contextlib.contextmanager
def hold_lock(path: str | os.PathLike, *, what: str, hint: str,
              remove: bool = False) -> Iterator[None]:
    """``with hold_lock(path, what=..., hint=...): ...`` holds an exclusive lock
    (``fcntl.flock``) on the file ``path`` (created if missing; it records the holder: pid,
    host, start time) while the block runs. When another process holds it, raises
    ``LockedError("<what> (pid <pid> on <host>, since <time>); <hint>")`` before the block.

    The kernel releases a flock when the process holding it ends, however it ends (``kill -9``
    included), so a lock file left by a dead process never blocks. The file stays unless
    ``remove``: then the holder deletes it before it lets go, and a process that locked the
    file just deleted (it opened it before the deletion) opens the new one again, so two
    processes never hold two different files. On a file system without locks (``flock`` fails
    with ENOLCK / EOPNOTSUPP) a warning is printed and the block runs unlocked."""
    path = os.fspath(path)
    for _ in range(100):  # a holder that removes the file as this one locks it: open it again
        fd = _open_lock_file(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            os.close(fd)
            raise LockedError(f"{what} ({holder}); {hint}") from None
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            print(f"warning: {path}: cannot lock ({e.strerror}); make sure no other process "
                  "writes here at the same time", file=sys.stderr, flush=True)
            yield
            return
        if not remove or _same_file(fd, path):
            break
        os.close(fd)
    else:
        raise LockedError(f"{what} (its lock file keeps being replaced); {hint}")
    try:
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        yield
    finally:
        if remove:
            with contextlib.suppress(OSError):
                os.remove(path)  # still held: the next process creates and locks a new file
        os.close(fd)  # releases the lock


def _open_lock_file(path: str) -> int:
    """Open (create) the lock file ``path`` for :func:`hold_lock`, which writes the holder into
    it and may delete it. Refused (``FileExistsError`` naming it): a symbolic link there (the
    write went through it: a link to a user's file replaced that file), anything but a regular
    file, a file with other hard links (the same file under another name): a
    :class:`LockPathError`."""
    problem = None
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NOCTTY | os.O_NONBLOCK,
                     0o666 & ~current_umask())
    except OSError as e:
        if e.errno == errno.ELOOP:
            return _refuse_lock(path, "a symbolic link")
        kind = not_a_file(path)
        if kind:  # a folder (EISDIR), a socket (ENXIO): before, said of the output
            return _refuse_lock(path, kind)
        if os.path.lexists(path):  # one left by a run that died, which cannot be reopened
            raise LockPathError(f"{show_path(path)}: {e.strerror or e}: the lock file of an "
                                "earlier run, which this command cannot reopen; remove it if no "
                                "run is using it, or make it writable") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        problem = "not a regular file"
    elif st.st_nlink > 1:
        problem = f"a file with {st.st_nlink - 1} other name(s) (hard links)"
    if problem:
        os.close(fd)
        return _refuse_lock(path, problem)
    return fd


class LockPathError(FileExistsError):
    """Something other than a lock file of ours where a lock file goes (:func:`_open_lock_file`)."""


def _refuse_lock(path: str, what: str):
    raise LockPathError(f"{show_path(path)}: {what} where this command keeps its lock file, "
                          "which it writes and removes; remove it (it is not this tool's)")


def remove_leftovers(target: str, shown: str) -> None:
    """Remove the ``.tmp-<name>-*`` / ``.old-<name>-*`` folders beside ``target`` (a build or a
    swap cut off by ``kill -9``, which no handler sees), saying so in a ``note:`` line. Called
    with the folder's lock held, so no live run owns them."""
    parent, base = os.path.split(target)
    try:
        names = os.listdir(parent or os.curdir)
    except OSError:
        return
    # tempfile.mkdtemp's names: the prefix (atomic_folder's cuts the name at 64 characters)
    # and 8 random characters
    prefixes = {f"{kind}-{b}-" for kind in (".tmp", ".old") for b in (base, base[:64])}
    stale = sorted(n for n in names if any(n.startswith(p) and len(n) == len(p) + 8
                                           for p in prefixes)
                   and os.path.isdir(os.path.join(parent, n))
                   and not os.path.islink(os.path.join(parent, n)))
    for n in stale:
        shutil.rmtree(os.path.join(parent, n), ignore_errors=True)
    if stale:
        print(f"note: removed {len(stale)} unfinished cop{'y' if len(stale) == 1 else 'ies'} "
              f"of {show_path(shown)} left beside it by an earlier run that was killed "
              f"({', '.join(stale)})", file=sys.stderr)


@contextlib.contextmanager
def output_lock(out: str | os.PathLike, *, what: str, hint: str) -> Iterator[None]:
    """``with output_lock(out, what=..., hint=...): ...``: one process at a time writes the file
    ``out``. Holds ``.<name>.lock`` beside it (:func:`hold_lock`; removed when the block ends)
    so a second run writing the same file stops at once with a ``LockedError`` line instead of
    both finishing and the later one's rename silently replacing the other's output. The folder
    is created if missing, and removed again (when empty) if the block fails."""
    out = where_written(out)
    folder = os.path.dirname(out)
    created = _missing_folders(folder)
    done = False
    try:
        with contextlib.ExitStack() as stack:
            try:
                os.makedirs(folder, exist_ok=True)
                stack.enter_context(hold_lock(_lock_name(out), what=what, hint=hint,
                                              remove=True))
            except (LockedError, LockPathError):
                raise
            except OSError as e:  # a full disk, a read-only folder: said of the output
                raise OSError(e.errno, e.strerror or os.strerror(e.errno or 0), out) from None
            yield
        done = True
    finally:
        if not done:
            _remove_folders(created)


def _lock_name(out: str) -> str:
    """The lock file of :func:`output_lock` beside ``out``: ``.<name>.lock``; for a name so
    long that this would pass the file system's limit, ``.<first 64 bytes>-<hash>.lock``."""
    import hashlib

    name = os.path.basename(out)
    if len(os.fsencode(name)) > 200:
        digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:16]
        # cut at a byte: a character cut in two stays those bytes (os.fsdecode's escapes)
        name = os.fsdecode(os.fsencode(name)[:64]) + "-" + digest
    return os.path.join(os.path.dirname(out), f".{name}.lock")


def _same_file(fd: int, path: str) -> bool:
    """Whether the open file ``fd`` is still the file at ``path``."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _lock_holder(fd: int) -> str:
    """Who holds the lock, as its file records it (``pid P on HOST, since T``)."""
    try:
        holder = json.loads((os.pread(fd, 4096, 0).decode().splitlines() or ["{}"])[0])
        return (f"pid {int(holder['pid'])} on {holder.get('host', '?')}, since "
                f"{holder.get('since', '?')}")
    except (OSError, ValueError, KeyError, TypeError):
        return "held by another process, which has not recorded its pid yet"


# --------------------------------------------------------------------------------- reading JSON
def read_text(path: str | os.PathLike, *, error: type[Exception] = ValueError) -> str:
    """A small UTF-8 text file (a description, a corpus file); ``error`` with one line naming
    it when it cannot be read or is not UTF-8 (as :func:`read_json` says it)."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        problem = json_problem(e)
    except OSError as e:
        problem = f"cannot read ({e.strerror or e})"
    raise error(f"{show_path(path)}: {problem}") from None



def normalisation_twin(path: str) -> str | None:
    """For a ``path`` that does not exist: the existing path one of whose names differs from
    ``path``'s only in Unicode normalisation (an NFD folder name, as macOS writes them, against
    an NFC name in a file, or the reverse), up to the first such name; None when there is none.
    Such names look the same in every message but are other bytes, so "no such file" alone
    puzzles a reader."""
    import unicodedata

    path = os.fspath(path)
    cur = os.sep if os.path.isabs(path) else os.curdir
    for name in path.split(os.sep):
        if not name:
            continue
        nxt = os.path.join(cur, name)
        if os.path.lexists(nxt):
            cur = nxt
            continue
        want = unicodedata.normalize("NFC", name)
        try:
            names = os.listdir(cur)
        except OSError:
            return None
        same = [n for n in names if n != name and unicodedata.normalize("NFC", n) == want]
        return os.path.normpath(os.path.join(cur, same[0])) if same else None
    return None


def missing_file(path: str) -> str:
    """``"no such file"``, and when a name differs only in Unicode normalisation from one on
    disk (:func:`normalisation_twin`), which one and what to do."""
    twin = normalisation_twin(path)
    return "no such file" + (f"; {twin} differs from it only in Unicode normalisation (NFD "
                             "against NFC): rename so they match byte for byte" if twin else "")


def read_json(path: str | os.PathLike, *, error: type[Exception] = ValueError,
              what: str | None = None,
              object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None) -> Any:
    """The parsed content of the JSON file ``path``. Any failure to read or parse it raises
    ``error`` (``from None``) with one line: ``<path>: <problem>``, or with ``what`` (e.g.
    ``"valid JSON"``, ``"a valid splits file"``) ``<path>: not <what> (<problem>)``, where the
    problem is ``no such file``, ``cannot read (<reason>)``, ``not UTF-8 text (<reason> at byte
    <n>)`` or ``malformed JSON: <what> at line <l> column <c>`` (or ``malformed JSON: <reason>``
    for nesting too deep or a number too long). The shape of the content is the caller's to
    check. ``object_pairs_hook`` is passed to :func:`json.load`."""
    path = os.fspath(path)
    problem = not_a_file(path)  # a pipe would block the read; a link to nothing is said so
    if problem is None:
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f, object_pairs_hook=object_pairs_hook)
        except FileNotFoundError:
            problem = "no such file"
        except OSError as e:
            problem = f"cannot read ({e.strerror or e})"
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError, JSONDecodeError too
            problem = json_problem(e)
    raise error(f"{path}: {problem}" if what is None else f"{path}: not {what} ({problem})"
                ) from None


def finite_json(obj):
    """``obj`` with every non-finite float (NaN, inf; Python's or NumPy's) as ``None``: what
    ``json.dump`` writes is then JSON (``NaN`` is not: strict readers, ``jq`` and JavaScript
    refuse the file). Dicts, lists and tuples are copied; anything else is returned as it is."""
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    if isinstance(obj, float) or type(obj).__name__ in ("float32", "float64", "float16"):
        return float(obj) if obj == obj and abs(float(obj)) != float("inf") else None
    return obj


class JSONObject(dict):
    """A JSON object that remembers the keys it saw more than once (``json`` keeps the last
    one): what :func:`pairs_noting_duplicates` builds, for readers that refuse a key given twice
    (a split in ``splits.json``, a question's key in an MMAD file)."""

    duplicates: tuple[str, ...] = ()


JSONObject.__name__ = "dict"  # messages say "got {type(x).__name__}": a JSON object reads "dict"


def pairs_noting_duplicates(pairs: list[tuple[str, Any]]) -> JSONObject:
    """``object_pairs_hook`` for :func:`read_json`: each object a :class:`JSONObject` whose
    ``duplicates`` lists the keys given more than once, in order."""
    obj = JSONObject()
    dups = []
    for k, v in pairs:
        if k in obj and k not in dups:
            dups.append(k)
        obj[k] = v
    obj.duplicates = tuple(dups)
    return obj


def json_problem(e: BaseException, *, one_line: bool = False) -> str:
    """One line saying why text did not decode (``UnicodeDecodeError``) or parse as JSON
    (``ValueError``, ``RecursionError``): ``not UTF-8 text (<reason> at byte <n>)``, ``malformed
    JSON: <what> at line <l> column <c>`` (with ``one_line``, for a line of a JSON Lines file,
    only the column) or ``malformed JSON: <reason>``."""
    if isinstance(e, UnicodeDecodeError):
        return f"not UTF-8 text ({e.reason} at byte {e.start})"
    if isinstance(e, json.JSONDecodeError):
        where = f"column {e.colno}" if one_line else f"line {e.lineno} column {e.colno}"
        # (json's "Unterminated string starting at" already ends in "at")
        return f"malformed JSON: {e.msg.removesuffix(' at')} at {where}"
    return f"malformed JSON: {e}"  # a number of over 4300 digits, nesting too deep


def iter_json_lines(path: str | os.PathLike) -> Iterator[tuple[int, Any, str | None]]:
    """``(line number, value, None)`` for each non-blank line of the JSON Lines file ``path``
    (lines counted from 1, each decoded on its own), or ``(line number, None, problem)`` for a
    line that is not UTF-8 text or not JSON (the problem as :func:`json_problem` says it), so the
    caller decides whether a bad line stops the read. Opening the file raises ``OSError``."""
    with open(os.fspath(path), "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, None, json_problem(e)
                continue
            if not text.strip():
                continue
            try:
                value = json.loads(text.rstrip("\r\n"))  # an error at the end: this line
            except (ValueError, RecursionError) as e:  # JSONDecodeError included
                yield lineno, None, json_problem(e, one_line=True)
                continue
            yield lineno, value, None


def matplotlib_agg():
    """``matplotlib``, imported with the Agg backend, without its two warnings when its config
    folder cannot be written (HOME unset or read-only, a service account, or ``$MPLCONFIGDIR``
    naming a file or a closed folder): Matplotlib then makes a temporary config folder itself
    and says so in two lines ("mkdir -p failed", "it is highly recommended to set the
    MPLCONFIGDIR"). Here that folder is chosen before the import (a temporary ``$MPLCONFIGDIR``
    for this process, removed at exit); a usable folder, the user's or the default, is kept.
    ``$MPLBACKEND`` is not read (the backend is Agg whatever it says; a name Matplotlib does not
    know was a ``ValueError`` traceback at the import)."""
    backend = os.environ.pop("MPLBACKEND", None) if "matplotlib" not in sys.modules else None
    if "matplotlib" not in sys.modules:
        target = os.environ.get("MPLCONFIGDIR") or os.path.join(
            os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config"),
            "matplotlib")
        try:
            os.makedirs(target, exist_ok=True)
            usable = os.path.isdir(target) and os.access(target, os.W_OK | os.X_OK)
        except OSError:
            usable = False
        if not usable:  # (Matplotlib reads the variable again later: it stays set)
            import atexit

            folder = tempfile.mkdtemp(prefix="emit-jax-matplotlib-")
            atexit.register(shutil.rmtree, folder, True)
            os.environ["MPLCONFIGDIR"] = folder
    try:
        import matplotlib
    finally:
        if backend is not None:  # as the user set it, for anything else that reads it
            os.environ["MPLBACKEND"] = backend
    matplotlib.use("Agg")
    return matplotlib
