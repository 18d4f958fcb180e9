"""Checkpoints of a training stage (Orbax ``CheckpointManager``).

A stage directory holds ``ckpt/<step>/`` with the trainable model state and optimizer state
(``state``), the grain iterator state and counters (``meta``, JSON). Running the same command
again restores the latest complete step and continues from it. Both are written in the unrolled
per-layer layout whatever ``scan_layers`` is (``emit_jax.models.scan``), so a run may resume
with the other setting.

Orbax writes a step into a temporary directory and renames it when complete, so a write cut
short (a kill, a full disk) is never taken for a checkpoint. A latest step that is there but
cannot be read (a truncated file) is moved aside to ``ckpt-unreadable/<step>`` with a warning
and the previous step is used instead. A step that reads but holds arrays of other names or
shapes than the run builds (a setting such as the LoRA rank changed since it was written) is
not unreadable: it stays where it is and the restore stops with one ``CheckpointError`` line
(``emit_jax.training.stages.check_settings`` normally says so first, naming the settings).

A full disk: before each write the free space is checked against the state's size, so a disk
that cannot hold the next checkpoint stops the run with one ``OSError`` (ENOSPC) naming the
checkpoint folder, the space needed and the space free. A disk that fills during a write (past
that check) ends the same way: Orbax's error (raised from its writer threads) becomes that
``OSError``, its error logs about it are dropped (:class:`DiskFullLogs`) and the step's
temporary folder is removed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sys
import time

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from emit_jax import faults
from emit_jax.checkpoint import DiskFullLogs
from emit_jax.errors import CheckpointError, interrupted
from emit_jax.fileio import (check_free_space, disk_full_error, folder_gone_error, where_written,
                             write_refused_error)
from emit_jax.models import scan

#: free space asked for beyond the arrays' bytes (Orbax's metadata files)
SPACE_MARGIN = 2**20


class StageCheckpoints:
    def __init__(self, directory: str, *, every: int, keep: int = 2, async_save: bool = True,
                 state_filter=..., name: str = ""):
        """``state_filter``: which model variables are saved (default all; GRPO saves only the
        trainable ones: LoRA factors, the fully trained modules, BatchNorm statistics).
        ``name``: the stage, for messages and ``emit_jax.faults``."""
        self.filter = state_filter
        self.directory, self.name = where_written(directory), name
        self._bytes = 0  # the size of the last checkpoint written, for a full disk's message
        self._saved = 0  # the last step saved (the reliability tests' kill_in_close)
        DiskFullLogs.install()
        os.makedirs(directory, exist_ok=True)
        self._identity = _identity(self.directory)
        self._remove_unfinished()
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=max(1, every),
                                            enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=opts,
                                             item_names=("state", "meta"))

    def _remove_unfinished(self) -> None:
        """A step's write an earlier run did not finish (a second Ctrl-C, a kill) leaves a
        temporary ``<step>.orbax-checkpoint-tmp...`` folder: removed here with a note (before:
        Orbax's own ``W...atomicity.py`` log line as it removed it)."""
        if jax.process_index() != 0:
            return
        for name in sorted(os.listdir(self.directory)):
            if ".orbax-checkpoint-tmp" in name:
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
                print(f"note: {os.path.join(self.directory, name)}: a checkpoint an earlier run "
                      "did not finish writing; removed (the run resumes from the last complete "
                      "one)", file=sys.stderr, flush=True)

    @property
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, model, optimizer, meta: dict, *, force: bool = False) -> bool:
        if not self._still_there():  # (Orbax would write on into a folder made again)
            raise self._gone()
        pure = self._pure(model, optimizer)
        if force or self.manager.should_save(step):  # a full disk: one line before writing
            self._bytes = _nbytes(pure) + SPACE_MARGIN
            check_free_space(os.path.join(self.directory, str(step)), self._bytes)
        state = scan.unstack_layers(pure)
        with self._disk_full():
            saved = self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)
        if saved:
            self._saved = step
        if saved and faults.fires("kill_in_save", self.name, step):
            faults.kill_now()  # the reliability tests: a kill while this step is being written
        return saved

    def save_interrupted(self, step: int, start: int, model, optimizer, meta: dict) -> None:
        """On SIGTERM / Ctrl-C: save the last finished ``step`` unless it is saved already (or
        nothing ran since ``start``), then wait for the write and close."""
        if step > start and self.latest_step != step:
            self.save(step, model, optimizer, meta, force=True)
        self.close()

    def restore(self, model, optimizer, step: int | None = None) -> dict | None:
        """Restore the latest readable step (or ``step``) into ``model`` / ``optimizer`` in place;
        returns the saved meta (or None when there is no checkpoint). An unreadable latest step
        is moved aside with a warning and the one before it is tried. A step that holds other
        arrays than ``model`` / ``optimizer`` (another LoRA rank, another trained set) raises
        ``CheckpointError`` and stays in place: it is not unreadable, the settings changed."""
        if step is not None:
            return self._restore(model, optimizer, step)
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                stored = self._stored_shapes(step)
            except Exception as e:  # noqa: BLE001 - its metadata is unreadable: fall back
                _reraise_interrupt(e)
                self._set_aside(step, e)
                continue
            self._check_fits(step, stored, model, optimizer)  # raises: not a damaged file
            try:
                return self._restore(model, optimizer, step)
            except Exception as e:  # noqa: BLE001 - any unreadable file: fall back, keep it
                _reraise_interrupt(e)
                self._set_aside(step, e)
        return None

    def _stored_shapes(self, step: int) -> dict[str, tuple]:
        """``{array path: shape}`` of the state saved at ``step`` (its metadata only)."""
        handler = ocp.StandardCheckpointHandler()
        try:
            stored = handler.metadata(epath.Path(self.directory) / str(step) / "state")
        finally:
            handler.close()
        stored = stored.tree if hasattr(stored, "tree") else stored
        if not isinstance(stored, dict):
            raise ValueError(f"no array metadata ({type(stored).__name__})")
        return _flat_shapes(stored)

    def _check_fits(self, step: int, stored: dict, model, optimizer) -> None:
        """Raise ``CheckpointError`` (one line) when the arrays saved at ``step`` are not those
        of ``model`` / ``optimizer`` (names or shapes)."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, self._pure(model, optimizer))
        want = _flat_shapes(scan.unstack_layers(abstract, scan.layer_struct))
        if want == stored:
            return
        missing, extra = sorted(want.keys() - stored.keys()), sorted(stored.keys() - want.keys())
        shapes = [k for k in sorted(want.keys() & stored.keys()) if want[k] != stored[k]]
        if shapes:
            k = shapes[0]
            example = f"{k}: stored {stored[k]}, this run {want[k]}"
        else:
            example = (f"{missing[0]} missing" if missing else f"{extra[0]} not in this run")
        stage_dir = os.path.dirname(self.directory)
        raise CheckpointError(
            f"{os.path.join(self.directory, str(step))}: the {self.name or 'stage'} checkpoint "
            f"holds other arrays than this run builds ({len(shapes)} of other shape, "
            f"{len(missing)} missing, {len(extra)} extra; e.g. {example}): a setting it depends "
            f"on (model, LoRA, trained modules) changed since it was written. Rerun with the "
            f"settings it was written with, or move {stage_dir} aside (or choose another "
            f"--workdir) to train the stage from the start")

    def _set_aside(self, step: int, error: Exception) -> None:
        aside = os.path.join(os.path.dirname(self.directory),
                             os.path.basename(self.directory) + "-unreadable")
        if jax.process_index() == 0:
            os.makedirs(aside, exist_ok=True)
            target = os.path.join(aside, f"{step}-{int(time.time())}")
            shutil.move(os.path.join(self.directory, str(step)), target)
            from emit_jax.checkpoint import restore_problem

            earlier = [s for s in saved_steps(self.directory) if s < step]
            then = ("trying the previous step" if earlier else
                    "no earlier checkpoint: the stage starts over from step 0")
            print(f"warning: {self.name or 'stage'} checkpoint step {step} is unreadable "
                  f"({restore_problem(error, 200)}); moved to {target}, {then}",
                  file=sys.stderr, flush=True)
        from emit_jax.parallel import barrier

        barrier(f"ckpt-aside:{self.directory}:{step}")
        self.manager.reload()

    def _restore(self, model, optimizer, step: int) -> dict:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, self._pure(model, optimizer))
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(scan.unstack_layers(abstract, scan.layer_struct)),
            meta=ocp.args.JsonRestore()))
        restored = scan.stack_layers(out["state"], abstract)
        ms, os_ = nnx.state(model, self.filter), nnx.state(optimizer)
        nnx.replace_by_pure_dict(ms, restored["model"])
        nnx.replace_by_pure_dict(os_, restored["opt"])
        nnx.update(model, ms)
        nnx.update(optimizer, os_)
        return dict(out["meta"])

    def _pure(self, model, optimizer) -> dict:
        return {"model": nnx.to_pure_dict(nnx.state(model, self.filter)),
                "opt": nnx.to_pure_dict(nnx.state(optimizer))}

    def wait(self):
        with self._disk_full():
            self.manager.wait_until_finished()

    def close(self):
        if faults.fires("kill_in_close", self.name, self._saved):
            faults.kill_now()  # the reliability tests: a kill as the last write is awaited
        with self._disk_full():
            self.manager.wait_until_finished()
        self.manager.close()

    def _still_there(self) -> bool:
        """Whether the checkpoint folder is still the one this run made (not moved or deleted:
        a folder made again at its path, by Orbax's threads, is another one)."""
        return _identity(self.directory) == self._identity

    def _gone(self) -> OSError:
        """The error of a checkpoint folder moved or deleted while the run wrote into it (a
        workdir renamed under a running job; twenty-fourth probe RN1: two Orbax tracebacks,
        a line naming a missing temporary file, and the folder made again at the old path)."""
        DiskFullLogs.seen = True  # Orbax's threads' logs of it are dropped too
        with contextlib.suppress(Exception):  # the write in flight: ended, one way or another
            self.manager.wait_until_finished()
        made = saved_steps(self.directory)  # (none when nothing was made again)
        again = (f"; the step {made[-1]} checkpoint being written as it moved was made at this "
                 "path again: move it into the ckpt folder where the workdir is now to resume "
                 "from it") if made else ""
        return OSError(errno.ENOENT, "moved or deleted while the run wrote its checkpoints "
                       "there; the run stops (rerun the same command on the workdir where it is "
                       f"now: it resumes from its last complete checkpoint){again}",
                       self.directory)

    @contextlib.contextmanager
    def _disk_full(self):
        """A full disk met by Orbax (raised here, or from its writer threads at the next call)
        becomes ``OSError(ENOSPC)`` naming the checkpoint folder and the space needed; the
        step's temporary folder is removed."""
        try:
            yield
        except Exception as e:
            if folder_gone_error(e) is not None and not self._still_there():
                raise self._gone() from None
            err = disk_full_error(e, self.directory)
            if err is None and (refused := write_refused_error(e, self.directory)) is not None:
                DiskFullLogs.seen = True  # Orbax's threads' logs of it are dropped too
                raise OSError(refused.errno, f"{refused.strerror}: this folder no longer takes "
                              f"new {self.name or 'stage'} checkpoints (its permissions or the "
                              "file system changed)", self.directory) from None
            if err is None:
                raise
            DiskFullLogs.seen = True
            with contextlib.suppress(Exception):
                self.manager.close()
            if jax.process_index() == 0:
                for name in os.listdir(self.directory):
                    if ".orbax-checkpoint-tmp" in name:
                        shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
            free = shutil.disk_usage(self.directory).free / 2**20
            need = f"needs {self._bytes / 2**20:.1f} MiB, " if self._bytes else ""
            raise OSError(err.errno, f"{err.strerror} while writing a {self.name or 'stage'} "
                          f"checkpoint ({need}{free:.1f} MiB free)", self.directory) from None


def _identity(path: str) -> tuple[int, int] | None:
    """``(device, inode)`` of the folder ``path``, None when there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def saved_steps(directory: str) -> list[int]:
    """The steps saved in a stage's checkpoint folder (``<stage>/ckpt/<step>/``), ascending; none
    when it does not exist. Orbax writes a step under a temporary name and renames it to its
    number when complete, so these are complete steps (:class:`StageCheckpoints` lists them
    through its ``CheckpointManager``)."""
    names = os.listdir(directory) if os.path.isdir(directory) else ()
    return sorted(int(n) for n in names if n.isdigit())


def _reraise_interrupt(e: BaseException) -> None:
    """Ctrl-C / SIGTERM during a restore comes back wrapped in TensorStore's ``Exception``: raise
    it as the ``KeyboardInterrupt`` it is, so a readable checkpoint is not set aside as
    unreadable (the next run would resume from an older step)."""
    if interrupted(e):
        raise KeyboardInterrupt(str(e.__context__ or e.__cause__ or "")) from None


def _nbytes(tree) -> int:
    """The bytes of the arrays in ``tree`` (their global size)."""
    return sum(int(getattr(x, "nbytes", 0)) for x in jax.tree.leaves(tree))


def _flat_shapes(tree) -> dict[str, tuple]:
    """``{"a/b/0/c": shape}`` of a nested dict of arrays / shape structs / Orbax metadata
    (integer keys as strings: Orbax stores them so)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key = "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                       for k in path)
        out[key] = tuple(int(d) for d in getattr(leaf, "shape", ()))
    return out
