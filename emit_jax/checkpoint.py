"""Orbax model checkpoints.

A model checkpoint is a folder::

    CKPT/
      emit_jax.json     model config (ours) + the source config.json (kept for export)
      params/           Orbax (OCDBT) tree of every parameter, each in its own dtype
      assets/           tokenizer / processor / generation files copied from the HF folder

It is assembled in a temporary sibling folder and renamed into place only when complete, so an
interrupted write never leaves something that looks like a checkpoint.

``params/`` always has the unrolled per-layer layout (``layers/<i>/...``): a model with stacked
layers (``InternVLConfig.scan_layers``) is unstacked on save and stacked again on load
(``emit_jax.models.scan``), so a checkpoint loads with either setting.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import sys
import warnings

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from emit_jax.errors import (causes, exit_interrupted, interrupted, program, show_path,
                             stop_signals_held)
from emit_jax.fileio import (atomic_folder, disk_full_error, folder_gone_error, not_a_file,
                             read_json, where_written, write_refused_error)
from emit_jax.hf import CheckpointError, copy_assets
from emit_jax.models import scan
from emit_jax.models.config import ConfigError, InternVLConfig
from emit_jax.models.emit import is_emit
from emit_jax.models.internvl import InternVL

META_FILE = "emit_jax.json"
PARAMS_DIR = "params"
ASSETS_DIR = "assets"
FORMAT_VERSION = 1


def _loop_closed(e: BaseException | None) -> bool:
    """Whether ``e`` is the ``RuntimeError("Event loop is closed")`` that TensorStore's late
    callbacks raise into an event loop Orbax has abandoned."""
    return isinstance(e, RuntimeError) and "Event loop is closed" in str(e)


class DiskFullLogs(logging.Filter):
    """Drops Orbax's error logs (each with a traceback, from its writer threads) about a full
    disk or a write the file system refused (``write_refused_error``): the command reports it
    once, as an ``OSError`` (``StageCheckpoints._disk_full``, :func:`save_model`). Once such a
    failure was met, also the ``RuntimeError("Event loop is closed")`` that TensorStore's
    late callbacks into Orbax's abandoned event loop raise (printed as "Exception ignored",
    one traceback per array, through ``sys.unraisablehook``)."""

    _installed = False
    seen = False  # a full disk or a refused write was met in this process

    @classmethod
    def install(cls) -> None:
        if not cls._installed:
            logging.getLogger("absl").addFilter(cls())
            previous = sys.unraisablehook

            def hook(args):
                if not (cls.seen and _loop_closed(args.exc_value)):
                    previous(args)

            sys.unraisablehook = hook
            cls._installed = True

    def filter(self, record: logging.LogRecord) -> bool:
        if f"{os.sep}orbax{os.sep}" not in (record.pathname or ""):
            return True
        exc = record.exc_info[1] if record.exc_info else None
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record: leave it to the handler
            text = ""
        if (exc is not None and (disk_full_error(exc, "") or write_refused_error(exc, "")
                                 or folder_gone_error(exc)) is not None) \
                or disk_full_error(OSError(text), "") is not None:
            DiskFullLogs.seen = True
            return False
        return True


def save_model(model: InternVL, path: str | os.PathLike, *, hf_config: dict | None = None,
               assets_from: str | os.PathLike | None = None,
               extra_meta: dict | None = None) -> str:
    """Write ``model`` as an Orbax model checkpoint at ``path`` (must not exist or be empty).
    ``extra_meta``: more JSON fields for its meta file (e.g. ``internvl_chat``: the source
    folder's config and BatchNorm counter, for an export back to that format)."""
    path = where_written(path)  # LINK/../NAME as the kernel reads it
    from emit_jax.parallel import barrier

    DiskFullLogs.install()  # a full disk: one line, not Orbax's threads' logs

    multi = jax.process_count() > 1
    # several processes write their shards into one agreed folder; process 0 finishes it
    shared = (os.path.join(os.path.dirname(path), ".tmp-" + os.path.basename(path) + "-multihost")
              if multi else None)
    with atomic_folder(path, hint="choose a new checkpoint path", tmp=shared,
                       owner=not multi or jax.process_index() == 0) as tmp:
        if multi:
            barrier("save_model:" + path)  # process 0 has made the folder
        # parameters (+ BatchNorm statistics), stacked layers sliced back into per-layer arrays
        pure = scan.unstack_layers(nnx.to_pure_dict(nnx.state(model)))
        ckptr = ocp.StandardCheckpointer()
        try:
            # a signal waits for the write: raised into Orbax's save, it leaves its writer threads
            # writing on into the temporary folder atomic_folder removes (which then stays, with
            # a screen of their errors); after it, the complete folder is removed instead
            # (and the callbacks of a failed write into Orbax's closed loop, which can fire
            # before its error reaches the handler below, print nothing)
            with _interrupts_deferred(), _loop_closed_unprinted():
                ckptr.save(os.path.join(tmp, PARAMS_DIR), pure)
                ckptr.wait_until_finished()
        except Exception as e:  # a full disk, raised by Orbax's writer threads: one line
            with contextlib.suppress(Exception):
                ckptr.close()
            err = disk_full_error(e, path)
            if err is None:
                raise
            DiskFullLogs.seen = True
            quiet_abandoned_reads()  # the writes Orbax left running fail as its loop closes
            raise err from None
        except BaseException:  # a second Ctrl-C: close what can be closed
            with contextlib.suppress(Exception):
                ckptr.close()
            raise
        ckptr.close()
        if multi and jax.process_index() != 0:
            barrier("save_model_done:" + path)
            return path
        os.makedirs(os.path.join(tmp, ASSETS_DIR))
        if assets_from is not None:
            copy_assets(assets_from, os.path.join(tmp, ASSETS_DIR))
        meta = {**(extra_meta or {}), "format_version": FORMAT_VERSION, "kind": "model",
                "config": model.config.to_json_dict(), "hf_config": hf_config}
        if is_emit(model):
            meta["emit_config"] = model.emit_config.to_json_dict()
        with open(os.path.join(tmp, META_FILE), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
    barrier("save_model_done:" + path)
    return path


@contextlib.contextmanager
def _interrupts_deferred():
    """SIGINT / SIGTERM received while the block runs are raised as ``KeyboardInterrupt`` when
    it ends (main thread only; a second one ends the process at once, in one line; an ignored
    signal stays ignored). With several processes the write waits for every process, one of
    which may be gone: after ``PEER_WAIT`` seconds the signal counts as the second (twenty-
    seventh probe N7: raised into Orbax's save on one process, it removed the shared folder
    the others were writing: a traceback through the tool's code, no line)."""
    def at_once(signum):  # (twenty-seventh probe N1: raised into Orbax's wait, its threads'
        # tracebacks followed the line) at once, in one line
        exit_interrupted(f"{program()}: interrupted ({signal.Signals(signum).name} while a "
                         "model was written): stopped at once; rerun the same command (it "
                         "removes the unfinished copy)")

    with stop_signals_held(at_once, several=jax.process_count() > 1) as got:
        yield
    if got:
        raise KeyboardInterrupt(signal.Signals(got[0]).name)


#: a training workdir's stage folders, last trained first (its newest model is the last one's)
_STAGE_FOLDERS = ("grpo", "sft2", "sft", "base", "warmup")


def model_hint(path: str) -> str:
    """What ``path``, given where an emit_jax model is read, is instead (before: only "not an
    emit_jax model checkpoint"): a Hugging Face folder (convert it), a stage's training
    checkpoint, a training workdir's stage folder or the workdir (where their models are); ""
    when none of these."""
    weights = any(n.endswith(".safetensors") for n in os.listdir(path))
    if weights and os.path.isfile(os.path.join(path, "config.json")):  # (before: not said)
        return (" but a Hugging Face model folder; convert it first with python -m "
                f"emit_jax.convert --hf {path} --out CKPT")
    if weights:  # (twenty-first probe #29)
        return (" (it holds .safetensors files as a Hugging Face model folder does, but no "
                "config.json: restore that file, then convert the folder with python -m "
                "emit_jax.convert)")
    given = os.path.normpath(path)
    ckpt = given if os.path.basename(given) == "ckpt" else os.path.dirname(given)
    stage = os.path.basename(os.path.dirname(os.path.abspath(ckpt)))
    if os.path.basename(ckpt) == "ckpt" and stage in _STAGE_FOLDERS:
        # WD/<stage>/ckpt/<step> (or ckpt itself): a training state, not a model (before: not
        # said, where the stage folder and the workdir were)
        model = os.path.join(os.path.dirname(ckpt), "model")
        step = "" if ckpt == given else f" (step {os.path.basename(given)})"
        if os.path.isfile(os.path.join(model, META_FILE)):
            return f" but a training checkpoint of stage {stage}{step}: its model is {model}"
        return (f" but a training checkpoint of stage {stage}{step}, which has not finished: "
                f"rerun the training command to finish it (its model is then {model})")
    if os.path.isfile(os.path.join(path, "model", META_FILE)):  # WD/<stage>: its model
        return f" but a stage folder of a training workdir: its model is {os.path.join(path, 'model')}"
    models = [os.path.join(path, s, "model") for s in _STAGE_FOLDERS
              if os.path.isfile(os.path.join(path, s, "model", META_FILE))]
    if not models:
        return ""
    hf_dir = os.path.join(path, "hf")
    return (f" but a training workdir: its stages' models are {', '.join(models)}"
            + (f" (and the exported {hf_dir})" if os.path.isdir(hf_dir) else "")
            + f"; the last trained is {models[0]}")


def read_meta(path: str | os.PathLike) -> dict:
    meta_path = os.path.join(os.fspath(path), META_FILE)
    if kind := not_a_file(meta_path):  # before: "not found", for a folder or a pipe there
        raise CheckpointError(f"{meta_path}: {kind}, not a checkpoint's metadata file")
    if not os.path.isdir(path):  # before: its metadata file "not found"
        what = "a file, not a folder" if os.path.exists(path) else "no such folder"
        raise CheckpointError(f"{show_path(path)}: {what} (an emit_jax model checkpoint is a "
                              f"folder holding {META_FILE})")
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"{meta_path}: not found; {path} is not an emit_jax model "
                              f"checkpoint{model_hint(os.fspath(path))}")
    meta = read_json(meta_path, error=CheckpointError, what="valid JSON")
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path}: not valid JSON (expected an object, got "
                              f"{type(meta).__name__})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: unsupported format_version "
                              f"{meta.get('format_version')!r} (this version reads "
                              f"{FORMAT_VERSION})")
    return meta


#: how TensorStore's own errors begin (``OUT_OF_RANGE: Error reading "<array>/0.0" ...``)
_TS_STATUS = re.compile(r"^[A-Z_]{4,}: ")


@contextlib.contextmanager
def _loop_closed_unprinted():
    """While the block runs, ``RuntimeError("Event loop is closed")`` raised in TensorStore's
    callbacks (printed through ``sys.excepthook``) is not printed; kept after a failure (then
    :func:`quiet_abandoned_reads`), undone after success. Before, the callbacks of a failed
    read that fired as Orbax closed its loop, before the failure reached this process's
    handler, printed fragments of three tracebacks ahead of the error line (twenty-sixth probe
    WT1, 1 run of 8). The same through ``sys.unraisablehook``, as a failed write's callbacks
    report it before the failure is known (``DiskFullLogs`` drops them only after: the
    2026-12-06 suite, convert under ``ulimit -f``, 1 run of 3 with JAX_PLATFORMS=cpu)."""
    previous, previous_unraisable = sys.excepthook, sys.unraisablehook

    def excepthook(kind, value, tb):
        if not _loop_closed(value):
            previous(kind, value, tb)

    def unraisablehook(u):
        if not _loop_closed(u.exc_value):
            previous_unraisable(u)

    sys.excepthook, sys.unraisablehook = excepthook, unraisablehook
    yield
    if sys.excepthook is excepthook:
        sys.excepthook = previous
    if sys.unraisablehook is unraisablehook:
        sys.unraisablehook = previous_unraisable


def quiet_abandoned_reads() -> None:
    """After a failed restore, the reads Orbax left running fail too as their event loop is
    closed and they are collected, each printed by asyncio's logger or Python's unraisable hook
    (hundreds of lines after the one error line, a different number each time): silence those
    for the rest of this process (the commands end with that error; a caller that goes on loses
    only asyncio's error log and the unraisable reports of coroutines and tasks)."""
    import gc

    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    previous = sys.unraisablehook

    def hook(u):
        abandoned = ("coroutine" in repr(u.object) or "Task" in repr(u.object)
                     or _loop_closed(u.exc_value))
        if not abandoned:
            previous(u)

    sys.unraisablehook = hook
    # TensorStore's callbacks into the closed loop print through sys.excepthook (PyErr_Print)
    previous_hook = sys.excepthook

    def excepthook(kind, value, tb):
        if not _loop_closed(value):
            previous_hook(kind, value, tb)

    sys.excepthook = excepthook
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited",
                            category=RuntimeWarning)
    gc.collect()


def restore_problem(e: BaseException, limit: int = 300) -> str:
    """The part of an Orbax restore failure a reader can use, on one short line: TensorStore's
    own message (which array, which file, what is wrong) when the chain holds one, else the
    exception's text without the store's spec Orbax appends (over a thousand characters)."""
    e = next((c for c in causes(e) if _TS_STATUS.match(str(c))), e)
    text = " ".join(str(e).split(" See full TensorStore details")[0].split())
    if len(text) > limit:
        text = text[:limit - 3] + "..."
    return f"{type(e).__name__}: {text}"


def load_model(path: str | os.PathLike, dtype: str | None = None, *,
               scan_layers: bool | None = None) -> tuple[InternVL, dict]:
    """Restore ``(model, meta)`` (an ``InternVL``, or ``EMIT`` when the checkpoint has one)
    from a model checkpoint. ``dtype`` casts the parameters (and the
    compute dtype); ``None`` keeps the stored dtypes. ``scan_layers``: build the model with
    stacked (True) or unrolled (False) layers; ``None`` as the saved config says."""
    path = os.fspath(path)
    meta = read_meta(path)
    try:
        cfg = InternVLConfig.from_json_dict(meta["config"])
    except (KeyError, TypeError, ConfigError) as e:
        raise CheckpointError(f"{os.path.join(path, META_FILE)}: bad model config ({e})") from None
    if scan_layers is not None:
        cfg = cfg.replace(scan_layers=bool(scan_layers))
    if dtype is not None:
        cfg = cfg.replace(param_dtype=dtype, dtype=dtype)
    params_path = os.path.join(os.path.abspath(path), PARAMS_DIR)
    if not os.path.isdir(params_path):
        raise CheckpointError(f"{params_path}: missing parameter folder")
    build = lambda: InternVL(cfg, rngs=nnx.Rngs(0))  # noqa: E731
    if meta.get("emit_config") is not None:
        from emit_jax.models.emit import EMIT, EMITConfig

        ecfg = EMITConfig.from_json_dict(meta["emit_config"])
        build = lambda: EMIT(InternVL(cfg, rngs=nnx.Rngs(0)), ecfg, rngs=nnx.Rngs(0))  # noqa: E731
    abstract = nnx.eval_shape(build)
    graphdef, state = nnx.split(abstract)
    ckptr = ocp.StandardCheckpointer()
    absl_logger = logging.getLogger("absl")
    absl_level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        # restore onto this process's first device whatever mesh wrote it (a run on another
        # device or process count shards it again by the logical axes); Orbax's absl warnings
        # about a damaged folder are said in the one error line below instead
        dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        stored = ckptr.metadata(params_path)
        stored = getattr(stored, "item_metadata", stored)
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=dev),
                              stored.tree if hasattr(stored, "tree") else stored)
        with _loop_closed_unprinted():
            restored = ckptr.restore(params_path, target)
    except Exception as e:  # orbax raises several types for damaged folders
        if interrupted(e):  # Ctrl-C during the read, wrapped by TensorStore: not a damaged file
            raise KeyboardInterrupt(str(e.__context__ or e.__cause__ or "")) from None
        quiet_abandoned_reads()
        raise CheckpointError(f"{params_path}: cannot restore ({restore_problem(e)})") from None
    finally:
        absl_logger.setLevel(absl_level)
        ckptr.close()
    restored = nnx.restore_int_paths(restored)
    abstract_pure = nnx.to_pure_dict(state)
    try:  # the model's stacked layers (scan_layers) from the per-layer arrays
        restored = scan.stack_layers(restored, abstract_pure)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{params_path}: parameters do not match the stored model "
                              f"config ({e})") from None
    want = jax.tree.map(lambda x: x.shape, abstract_pure)
    got = jax.tree.map(lambda x: x.shape, restored)
    if jax.tree.structure(want) != jax.tree.structure(got) or want != got:
        raise CheckpointError(f"{params_path}: parameters do not match the stored model config")
    if dtype is not None:
        restored = jax.tree.map(lambda x: x.astype(jnp.dtype(dtype))
                                if jnp.issubdtype(x.dtype, jnp.floating) else x, restored)
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state), meta


def load_model_folder(path: str | os.PathLike, dtype: str | None = None, *,
                      scan_layers: bool | None = None) -> tuple[InternVL, dict]:
    """``(model, meta)`` of a model folder of either kind: a Hugging Face folder (it holds
    ``config.json``; :func:`emit_jax.hf.load`, ``meta`` empty) or an Orbax model checkpoint
    (:func:`load_model`). ``dtype`` and ``scan_layers`` as :func:`load_model`'s (``None`` layers:
    unrolled for a Hugging Face folder, as saved for a checkpoint)."""
    from emit_jax import hf  # noqa: PLC0415

    if os.path.isfile(os.path.join(os.fspath(path), "config.json")):
        return hf.load(path, dtype, scan_layers=bool(scan_layers)), {}
    return load_model(path, dtype, scan_layers=scan_layers)


def assets_dir(path: str | os.PathLike) -> str:
    return os.path.join(os.fspath(path), ASSETS_DIR)
