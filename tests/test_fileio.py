"""emit_jax.fileio: atomic files and folders, JSON read as one-line errors naming the file."""

import json
import os

import pytest

from emit_jax.fileio import (atomic_folder, atomic_output, atomic_path, iter_json_lines,
                             json_problem, read_json)


class Boom(Exception):
    pass


class MyError(ValueError):
    pass


def _one_line(msg: str) -> str:
    assert "\n" not in msg, msg
    return msg


# ------------------------------------------------------------------------------- atomic_folder
def test_atomic_folder_moves_a_complete_folder_into_place(tmp_path):
    target = tmp_path / "sub" / "out"  # the parent is created
    with atomic_folder(target) as tmp:
        assert os.path.isdir(tmp) and not target.exists()
        assert os.path.dirname(tmp) == str(tmp_path / "sub")
        assert os.path.basename(tmp).startswith(".tmp-out-")
        (open(os.path.join(tmp, "a.txt"), "w")).write("a")
        os.makedirs(os.path.join(tmp, "d"))
        (open(os.path.join(tmp, "d", "b.txt"), "w")).write("b")
    assert (target / "a.txt").read_text() == "a" and (target / "d" / "b.txt").read_text() == "b"
    assert sorted(os.listdir(tmp_path / "sub")) == ["out"]  # no temporary folder left


def test_atomic_folder_failure_leaves_nothing(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(Boom):
        with atomic_folder(target) as tmp:
            open(os.path.join(tmp, "half.txt"), "w").write("half")
            raise Boom
    assert os.listdir(tmp_path) == []  # no partial output, no temporary folder


def test_atomic_folder_failure_keeps_an_empty_target(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(tmp_path / "out") as tmp:
            open(os.path.join(tmp, "x"), "w").write("x")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == ["out"] and os.listdir(tmp_path / "out") == []


def test_atomic_folder_replaces_an_empty_folder(tmp_path):
    (tmp_path / "out").mkdir()
    with atomic_folder(tmp_path / "out") as tmp:
        open(os.path.join(tmp, "x"), "w").write("x")
    assert os.listdir(tmp_path) == ["out"] and (tmp_path / "out" / "x").read_text() == "x"


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_atomic_folder_refuses_an_existing_target_before_writing(tmp_path, kind):
    target = tmp_path / "out"
    if kind == "folder":
        target.mkdir()
        (target / "keep.txt").write_text("keep me")
    else:
        target.write_text("keep me")
    entered = []
    with pytest.raises(FileExistsError) as e:
        with atomic_folder(target, hint="choose a new checkpoint path"):
            entered.append(1)
    what = "is not empty" if kind == "folder" else "is a file, not a folder"
    assert _one_line(str(e.value)) == f"{target}: exists and {what}; choose a new checkpoint path"
    assert not entered and sorted(os.listdir(tmp_path)) == ["out"]
    assert (target / "keep.txt" if kind == "folder" else target).read_text() == "keep me"


def test_atomic_folder_target_filled_meanwhile_is_kept(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(OSError):
        with atomic_folder(target) as tmp:
            open(os.path.join(tmp, "new"), "w").write("new")
            target.mkdir()
            (target / "other").write_text("other")  # another writer won
    assert os.listdir(tmp_path) == ["out"] and os.listdir(target) == ["other"]


def test_atomic_folder_shared_tmp(tmp_path):
    """Multi-host: the owner empties and makes the agreed folder and publishes it; the others
    write into it and leave it; the owner's failure removes it, another's leaves it (the owner
    may still be writing)."""
    shared = tmp_path / ".tmp-out-multihost"
    shared.mkdir()
    (shared / "stale").write_text("from an interrupted run")
    with atomic_folder(tmp_path / "out", tmp=shared, owner=True) as tmp:
        assert tmp == str(shared) and os.listdir(shared) == []
        with atomic_folder(tmp_path / "out", tmp=shared, owner=False) as tmp2:
            open(os.path.join(tmp2, "shard1"), "w").write("1")
        assert os.listdir(shared) == ["shard1"]  # not published by a non-owner
        open(os.path.join(tmp, "shard0"), "w").write("0")
    assert sorted(os.listdir(tmp_path / "out")) == ["shard0", "shard1"]
    assert os.listdir(tmp_path) == ["out"]

    shared.mkdir()
    (shared / "shard0").write_text("another process is still writing this")
    with pytest.raises(Boom):
        with atomic_folder(tmp_path / "out2", tmp=shared, owner=False):
            raise Boom
    # a non-owner's failure leaves the folder the others may still be writing
    assert sorted(os.listdir(tmp_path)) == [".tmp-out-multihost", "out"]
    assert os.listdir(shared) == ["shard0"]
    with pytest.raises(Boom):
        with atomic_folder(tmp_path / "out2", tmp=shared, owner=True):
            raise Boom
    assert sorted(os.listdir(tmp_path)) == ["out"]  # the owner's failure removes it
    with pytest.raises(ValueError, match="owner=False"):
        with atomic_folder(tmp_path / "out3", owner=False):
            pass


# ------------------------------------------------------------------------ atomic_path / output
def test_atomic_path_renames_only_on_success(tmp_path):
    target = tmp_path / "lib.so"
    target.write_bytes(b"old")
    with pytest.raises(Boom):
        with atomic_path(target) as tmp:
            assert os.path.dirname(tmp) == str(tmp_path) and tmp.endswith(".so")
            open(tmp, "wb").write(b"half")
            raise Boom
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["lib.so"]
    with atomic_path(target) as tmp:
        os.remove(tmp)  # a writer that replaces the file (as a linker does)
        open(tmp, "wb").write(b"new")
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["lib.so"]


def test_atomic_output_failure_removes_the_folders_it_made(tmp_path):
    target = tmp_path / "a" / "b" / "out.json"
    with pytest.raises(Boom):
        with atomic_output(target) as f:
            f.write("{")
            raise Boom
    assert os.listdir(tmp_path) == []
    with atomic_output(target) as f:
        f.write("{}")
    assert json.loads(target.read_text()) == {} and os.listdir(target.parent) == ["out.json"]
    with pytest.raises(ValueError, match="mode"):
        with atomic_output(target, "a"):
            pass


# ----------------------------------------------------------------------------------- read_json
def test_read_json_good_file(tmp_path):
    path = tmp_path / "good.json"
    path.write_text('{"a": [1, 2], "é": "ü"}', encoding="utf-8")
    assert read_json(path) == {"a": [1, 2], "é": "ü"}
    pairs = read_json(path, object_pairs_hook=list)
    assert pairs == [("a", [1, 2]), ("é", "ü")]


@pytest.mark.parametrize("content,problem", [
    (None, "no such file"),
    ('{"a": ', "malformed JSON: Expecting value at line 1 column 7"),
    ('{"a": 1,\n "b": }', "malformed JSON: Expecting value at line 2 column 7"),
    (b'{"a": "\xff"}', "not UTF-8 text (invalid start byte at byte 7)"),
    ("[" * 100000, "malformed JSON: maximum recursion depth exceeded"),
    ("1" * 5000, "malformed JSON: Exceeds the limit"),
])
def test_read_json_errors_are_one_line_naming_the_file(tmp_path, content, problem):
    path = tmp_path / "bad.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(MyError) as e:
        read_json(path, error=MyError)
    assert type(e.value) is MyError and e.value.__cause__ is None
    assert _one_line(str(e.value)).startswith(f"{path}: {problem}"), str(e.value)
    with pytest.raises(ValueError) as e:  # the default class; ``what`` says what it should be
        read_json(str(path), what="a valid splits file")
    assert type(e.value) is ValueError
    assert _one_line(str(e.value)).startswith(f"{path}: not a valid splits file ({problem}")
    assert str(e.value).endswith(")")


def test_read_json_unreadable(tmp_path):
    with pytest.raises(MyError) as e:
        read_json(tmp_path, error=MyError)  # a folder
    assert str(e.value) == f"{tmp_path}: a folder"
    os.mkfifo(tmp_path / "pipe.json")  # before: the read blocked for ever
    with pytest.raises(MyError, match=r"pipe.json: not valid JSON \(a pipe\)$"):
        read_json(tmp_path / "pipe.json", error=MyError, what="valid JSON")
    os.symlink(tmp_path / "nowhere", tmp_path / "link.json")
    with pytest.raises(MyError, match=r"link.json: a symbolic link to nothing \(or a link "
                       r"loop\)$"):
        read_json(tmp_path / "link.json", error=MyError)
    (tmp_path / "locked.json").write_text("{}")
    os.chmod(tmp_path / "locked.json", 0)
    if os.geteuid() != 0:  # root reads it anyway
        with pytest.raises(MyError, match=r"locked.json: cannot read \("):
            read_json(tmp_path / "locked.json", error=MyError)


# ------------------------------------------------------------------------------ JSON lines
def test_iter_json_lines(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"a": 1}\n\n  \n[1, \n"\xff"\n2\n')
    got = list(iter_json_lines(path))
    assert got == [(1, {"a": 1}, None),
                   (4, None, "malformed JSON: Expecting value at column 5"),
                   (5, None, "not UTF-8 text (invalid start byte at byte 1)"),
                   (6, 2, None)]
    with pytest.raises(FileNotFoundError):
        list(iter_json_lines(tmp_path / "missing.jsonl"))


def test_json_problem_is_one_line():
    try:
        json.loads('{"a":\n\n x}')
    except ValueError as e:
        assert json_problem(e) == "malformed JSON: Expecting value at line 3 column 2"
        assert json_problem(e, one_line=True) == "malformed JSON: Expecting value at column 2"


@pytest.fixture
def umask():
    """Set the process umask for a test, restored after."""
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


@pytest.mark.parametrize("mask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                                    (0o002, 0o664, 0o775)])
def test_written_files_and_folders_follow_the_umask(umask, tmp_path, mask, file_mode, dir_mode):
    """Files written through atomic_output / atomic_path and folders through atomic_folder get
    the modes ordinary creation gives them (they came out 0600 / 0700 whatever the umask)."""
    import stat

    from emit_jax.fileio import current_umask

    umask(mask)
    assert current_umask() == mask
    with atomic_output(tmp_path / "results.json") as f:
        f.write("{}")
    with atomic_path(tmp_path / "curves.png") as p:
        open(p, "wb").close()
    with atomic_folder(tmp_path / "hf") as d:
        open(os.path.join(d, "config.json"), "w").close()
    for name in ("results.json", "curves.png"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == file_mode, name
    assert stat.S_IMODE(os.stat(tmp_path / "hf").st_mode) == dir_mode
    assert stat.S_IMODE(os.stat(tmp_path / "hf" / "config.json").st_mode) == file_mode


def test_rewriting_a_file_keeps_its_mode(umask, tmp_path):
    import stat

    umask(0o022)
    p = tmp_path / "results.json"
    p.write_text("old")
    os.chmod(p, 0o640)
    with atomic_output(p) as f:
        f.write("new")
    assert p.read_text() == "new" and stat.S_IMODE(os.stat(p).st_mode) == 0o640


def test_output_checks_try_the_folder_where_root_passes_os_access(tmp_path):
    """Before: as root ``os.access`` says every folder is writable (``/sys`` included), so
    ``check_writable`` and ``check_new_folder`` passed, and the command failed at its end."""
    import pytest

    from emit_jax.fileio import check_new_folder, check_writable

    for folder in ("/sys", "/proc"):
        if not (os.path.isdir(folder) and os.access(folder, os.W_OK | os.X_OK)):
            continue  # not root, or no such pseudo file system: os.access already refuses
        for check in (check_writable, check_new_folder):
            with pytest.raises(OSError) as e:
                check(os.path.join(folder, "results.json"))
            assert e.value.filename == os.path.join(folder, "results.json")
            assert not [n for n in os.listdir(folder) if n.startswith(".tmp-")]
    check_writable(tmp_path / "a" / "results.json")  # an ordinary folder: fine, nothing left
    check_new_folder(tmp_path / "b")
    assert os.listdir(tmp_path) == []


def test_an_output_that_is_a_device_pipe_or_link_is_refused_not_replaced(tmp_path):
    """Before: ``data.build --out /dev/null`` (and visualize's --out) renamed a regular file over
    the device, the pipe or the link."""
    import pytest

    from emit_jax.fileio import atomic_output, check_writable

    fifo, link, target = tmp_path / "fifo", tmp_path / "link.json", tmp_path / "target.json"
    os.mkfifo(fifo)
    target.write_text("keep")
    os.symlink(target, link)
    loop = tmp_path / "loop"
    os.symlink(loop, loop)
    for path, what in ((fifo, "a pipe"), (link, "a symbolic link"), (loop, "a symbolic link"),
                       ("/dev/null", "a device")):
        for write in (check_writable, lambda p: atomic_output(p).__enter__()):
            with pytest.raises(FileExistsError) as e:
                write(path)
            assert str(e.value) == (f"{path}: exists and is not a regular file ({what}), which "
                                    "writing it would replace; choose another path")
    assert os.path.islink(link) and target.read_text() == "keep"
    assert not os.path.isfile(fifo) and os.path.exists("/dev/null")
    assert sorted(os.listdir(tmp_path)) == ["fifo", "link.json", "loop", "target.json"]


def test_a_folder_filled_meanwhile_by_another_run_is_said_so(tmp_path):
    """Before: two ``data.embedded`` runs on one --out: the second ended with a bare
    ``Directory not empty``."""
    import pytest

    from emit_jax.fileio import atomic_folder

    out = tmp_path / "out"
    with pytest.raises(FileExistsError) as e:
        with atomic_folder(out) as tmp:
            (tmp_path / "out").mkdir()
            (out / "theirs.txt").write_text("the other run's")  # the other run finished first
            open(os.path.join(tmp, "mine.txt"), "w").close()
    assert str(e.value) == (f"{out}: filled by another run while this one was writing it; this "
                            "run's copy is discarded and the folder holds the other's")
    assert os.listdir(out) == ["theirs.txt"] and sorted(os.listdir(tmp_path)) == ["out"]
