"""``python -m emit_jax.train --config configs/grpo.py [--config.key=value ...] [--workdir DIR]``

Runs the stages a config lists (``emit_jax.training.stages``: warmup, base, sft, sft2, grpo), in
order, each resumable and skipped when already finished. Each stage writes ``WORKDIR/<stage>/``
(Orbax checkpoints every K steps, ``metrics.jsonl``, TensorBoard events in ``tb/`` —
``tensorboard --logdir WORKDIR`` — and on completion ``model/``, an emit_jax model checkpoint). At
the end the held-out tables are printed (and saved to ``WORKDIR/results.json`` and
``results.png``), the curves are drawn into ``WORKDIR/curves.png`` and the final model is exported
to ``WORKDIR/hf`` (switch off with ``--config.export_hf=False``); a rerun that ends with another
model (a stage continued with more steps, another last stage) replaces the export.

The config is read by :func:`emit_jax.configs.load` (a file, ``file:arg``, or a packaged recipe's
name) and checked by :func:`emit_jax.training.validate.validate_config` before anything is built.
One trainer at a time writes a workdir (``WORKDIR/.lock``); each stage keeps the config it trained
with (``WORKDIR/<stage>/settings.json``), and a rerun that changes a setting the stored stages
depend on stops with one error line, or with ``--config.restart=True`` trains them again, their
old output moved to ``WORKDIR/replaced-<time>/`` (:func:`emit_jax.training.stages.check_settings`).
Other settings of a stage's own section (a learning rate, beta) may change, and the run says so:
a resumed stage names them in one warning line, a finished one is kept as trained (one line:
``--config.restart=True`` trains it again with them). A stage loaded as finished keeps the
results its training recorded (``<stage>/done.json``) in ``results.json``, and a rerun that
trains nothing keeps the workdir's ``seconds`` (its own time: ``rerun_seconds``).
"""

from __future__ import annotations

import faulthandler
import json
import math
import os
import random
import shutil
import sys
import time
from typing import Callable

import jax
from absl import app, flags, logging

from emit_jax import checkpoint, cli, configs, hf, parallel
from emit_jax.data.mmad import paper_task_name
from emit_jax.data.mvtec import utf8_name
from emit_jax.errors import (USER_ERRORS, ConfigError, NonFiniteError, has_control, message,
                             not_utf8, show_path)
from emit_jax.eval.scoring import format_table
from emit_jax.evaluate import evaluate_adfm, evaluate_records
from emit_jax.fileio import (atomic_output, check_folder_writable, check_free_space, check_not_input,
                             check_utf8_path, finite_json, nearest_existing, not_a_file,
                             remove_leftovers, unambiguous, user_path)
from emit_jax.ops.kernels import kernel_options
from emit_jax.models.memory import memory_options
from emit_jax.training import data as stage_data
from emit_jax.training import stages
from emit_jax.training.metrics import plot_curves, plot_table
from emit_jax.training.zoom import LONGEST_CELL
from emit_jax.training.validate import validate_config

_CONFIG = flags.DEFINE_string("config", None, "config file (configs/grpo.py, configs/grpo.py:smoke) "
                              "or a packaged recipe's name (grpo); --config.KEY=VALUE overrides")
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (default: runs/<config name>, "
                                "runs/<config name>-<variant> for path:variant)")
_COORDINATOR = flags.DEFINE_string("coordinator", "", "multihost: host:port of process 0 "
                                   "(default: EMIT_COORDINATOR, SLURM, or TPU auto-detection)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "multihost: number of processes "
                                       "(0: auto-detected)", lower_bound=0)
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "multihost: this process's index "
                                   "(-1: auto-detected)", lower_bound=-1)


def run(cfg, workdir: str, *, chosen: bool = False,
        written: Callable[[], None] | None = None) -> dict:
    """Run the stages ``cfg`` lists into ``workdir`` (each resumed, or loaded when finished),
    then the held-out evaluation, the HF export and the plots. Returns the results
    (also written to ``WORKDIR/results.json``). ``chosen``: the workdir is the default one
    (no ``--workdir``), named in a line once the settings are valid. ``written``: called once
    every output is written (the train command: a signal from then on says the run was done)."""
    # a path no message, JSON file or tokenizer file can name: refused before anything is made
    check_workdir_name(workdir)
    workdir = unambiguous(workdir)  # LINK/../NAME: one folder (it split over two)
    settings = validate_config(cfg)
    for line in settings.warnings():  # valid, but almost surely not meant
        stages.log(line)
    # the run writes data/, tokenizer/, checkpoints: never into the data it reads
    source = cfg.data.get("source", "embedded")
    if source == "embedded":  # its cached folder (before: a workdir inside it was accepted)
        from emit_jax.data.embedded.cache import cache_path

        shown, read = "config data.source (the embedded dataset, cached in)", cache_path()
    else:
        shown, read = "config data.source", source
    check_not_input(workdir, {shown: read,
                              "config init_from": cfg.get("init_from") or None,
                              "config tokenizer": cfg.get("tokenizer") or None})
    # what a run reads before it writes: a damaged init_from or a cache that cannot be one is
    # one line before the workdir, its data/ and tokenizer/ exist
    check_init_from(cfg.get("init_from") or "")
    if cfg.get("tokenizer"):  # a folder without tokenizer files: said so, before the data
        from emit_jax.data.tokenizer import check_tokenizer_folder

        check_tokenizer_folder(cfg.tokenizer)
    if source == "embedded":
        from emit_jax.data.embedded.cache import check_cache_root

        check_cache_root()
    check_is_workdir(workdir)
    check_workdir_outputs(workdir)
    made = not os.path.lexists(workdir)
    if chosen:  # (twenty-first probe: the folder a run without --workdir used was not said)
        stages.log(f"[workdir] {workdir} ({'a new folder' if made else 'found'}; no --workdir "
                   "given: runs/<config name>[-<variant>] under the current folder)")
    if made and any(part != part.strip() for part in workdir.split(os.sep)):  # SP5
        stages.log(f"note: --workdir {workdir!r}: a folder name in it begins or ends with a "
                   "blank; the lines below show the path as it is")
    os.makedirs(workdir, exist_ok=True)
    try:
        with stages.workdir_lock(workdir):  # one writer per workdir
            return _run(cfg, workdir, settings, written)
    except USER_ERRORS:
        # bad data or settings found before any stage trained, in a workdir this run made: no
        # half-made workdir (its lock, tokenizer, data) is left behind
        if made and parallel.is_primary() and not any(
                os.path.lexists(os.path.join(workdir, s)) for s in stages.REGISTRY):
            shutil.rmtree(workdir, ignore_errors=True)
        raise


#: the files a run writes at the workdir's top, replacing those there (``hf/``: a folder)
WORKDIR_OUTPUTS = ("results.json", "curves.png", "results.png")


def check_workdir_outputs(workdir: str) -> None:
    """Refuse (``ConfigError``) a workdir whose output names (:data:`WORKDIR_OUTPUTS`, ``hf``)
    are taken by something the run must not replace: a symbolic link, a folder where a file
    goes, a pipe. Before, this was found only as the run ended, after its evaluation, and the
    line said "choose another path", which no flag can."""
    import stat  # noqa: PLC0415

    for name in (*WORKDIR_OUTPUTS, "hf"):
        path = os.path.join(workdir, name)
        try:
            mode = os.lstat(path).st_mode
        except OSError:
            continue
        if name == "hf" and stat.S_ISDIR(mode):
            if os.listdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
                # (sixteenth probe S2: kept silently, as if it were the export)
                raise ConfigError(f"{path}: a folder that is not the run's export (no "
                                  "config.json), where the run writes its export; move it out "
                                  "of the workdir")
            continue
        if stat.S_ISREG(mode) and name != "hf":
            continue
        what = ("a symbolic link" if stat.S_ISLNK(mode) else "a folder" if stat.S_ISDIR(mode)
                else "a file" if stat.S_ISREG(mode) else "not a regular file")
        raise ConfigError(f"{path}: {what}, where the run writes its "
                          f"{'export' if name == 'hf' else name} (replacing what is there); "
                          "move it out of the workdir")


def _stage_started(folder: str) -> bool:
    """Whether the stage folder ``folder`` holds a stage's own files: the settings it started
    with, its ``done.json``, a checkpoint step (``ckpt/<number>``) or an emit_jax model
    (``model/emit_jax.json``); a folder merely named like a stage (a user's model there, another
    workdir) does not."""
    if any(os.path.isfile(os.path.join(folder, n)) for n in (stages.SETTINGS_FILE, "done.json")):
        return True
    if os.path.isfile(os.path.join(folder, "model", checkpoint.META_FILE)):
        return True
    ckpt = os.path.join(folder, "ckpt")
    return os.path.isdir(ckpt) and any(n.isdigit() for n in os.listdir(ckpt))


def is_training_workdir(workdir: str) -> bool:
    """Whether ``workdir`` holds what a training run writes, not merely names it might use: its
    own ``.lock`` (the holder recorded as JSON), records it built (``data/options.json``), or a
    stage folder with a stage's files (:func:`_stage_started`). Before, any entry named
    ``data``, ``tokenizer`` or like a stage (an empty ``base/``) made a user's folder one, and
    its ``hf/``, ``results.json``, ``curves.png``, a model in ``base/model`` were replaced
    (twenty-third probe N04-N11)."""
    lock = os.path.join(workdir, stages.LOCK_FILE)
    if os.path.lexists(lock) and (os.path.islink(lock) or not os.path.isfile(lock)):
        return True  # not the tool's own: the lock refuses it, naming it (not "not a workdir")
    if os.path.isfile(lock):
        try:
            with open(lock, encoding="utf-8") as f:
                text = f.read(4096)
            if not text.strip():  # created, not yet written
                return True
            holder = json.loads(text)
            if isinstance(holder, dict) and "pid" in holder:
                return True
        except (OSError, ValueError, UnicodeDecodeError):
            pass
    if os.path.isfile(os.path.join(workdir, "data", "options.json")):
        return True
    return any(_stage_started(os.path.join(workdir, stage)) for stage in stages.REGISTRY)


def check_is_workdir(workdir: str) -> None:
    """Refuse (``ConfigError``) a ``workdir`` that exists, is not empty and is not a training
    workdir (:func:`is_training_workdir`): a folder of the user's, whose files (a
    ``results.json``, ``curves.png``, an ``hf/``) the run would overwrite."""
    if not os.path.isdir(workdir):
        return
    names = os.listdir(workdir)
    if not names or is_training_workdir(workdir):
        return
    shown = ", ".join(sorted(names)[:3]) + (", ..." if len(names) > 3 else "")
    raise ConfigError(f"{workdir}: not a training workdir and not empty (it holds {shown}); "
                      "a run writes results.json, curves.png and its stage folders there: "
                      "choose a new or empty --workdir")


def check_workdir_name(workdir: str) -> None:
    """Raise ``ConfigError`` when ``workdir``'s path is not valid UTF-8 (Python holds such bytes
    as lone surrogates, which the tokenizer files, results.json and the messages cannot encode),
    naming it by its bytes."""
    if not utf8_name(os.path.abspath(workdir)):
        raise ConfigError(f"{os.fsencode(workdir)!r}: the workdir's path "
                          f"{not_utf8(os.fsencode(workdir), 'choose another --workdir')}")
    if has_control(workdir):
        raise ConfigError(f"--workdir {workdir!r}: the path holds a newline or another control "
                          "character (choose another)")
    if os.path.lexists(workdir) and not os.path.isdir(workdir):  # was "File exists"
        what = not_a_file(workdir) or "a file"  # a link to nothing is no file either
        raise ConfigError(f"--workdir {show_path(workdir)}: {what}, not a folder (name the "
                          "run's folder)")


def check_init_from(path: str) -> None:
    """Raise the error loading ``init_from`` would meet in its config or its weights' headers
    (a truncated ``model.safetensors``, a checkpoint without its parameters), reading no
    tensor."""
    if not path:
        return
    if os.path.isfile(os.path.join(path, "config.json")):
        hf.read_config(path)
        reader = hf.SafetensorsReader(path)  # one file: its header is read here
        try:
            for shard in sorted(set(reader.key_file.values())):
                reader._open(shard)
        finally:
            reader.close()
    else:
        from emit_jax import checkpoint
        from emit_jax.errors import CheckpointError

        checkpoint.read_meta(path)
        params = os.path.join(os.path.abspath(path), checkpoint.PARAMS_DIR)
        if not os.path.isdir(params):
            raise CheckpointError(f"{params}: missing parameter folder")


def _run(cfg, workdir: str, settings, written=None) -> dict:
    # stored stages made with other settings: refused, or moved aside with --config.restart
    stages.check_settings(cfg, workdir)
    stages.check_data_source(cfg, workdir)  # the records name the old dataset's images
    notice = stages.run_notice(cfg, workdir)  # the seed, the evaluation's settings...
    if notice and parallel.is_primary():
        stages.log(notice)
    t_start = time.time()
    # multi-process: process 0 builds the dataset cache, the tokenizer and the record files;
    # the others then read the same (deterministic) data, writing nothing into the workdir
    if not parallel.is_primary():
        parallel.barrier("data")
    source, tokenizer, records = stages.prepare_data(cfg, workdir, write=parallel.is_primary())
    if parallel.is_primary():
        parallel.barrier("data")
    stages.check_vocabulary(cfg, tokenizer)  # before any stage trains
    # data.zoom / data.peak_region: the pairs cut as the stages read them (their lengths
    # checked here with the longest region's name)
    zoom = stages.make_zoomer(cfg, tokenizer, workdir)
    stages.check_prompt_room(cfg, tokenizer, records if zoom is None else
                             {k: [zoom.plan(r, cell=LONGEST_CELL) for r in v]
                              for k, v in records.items()})
    run_ = stages.Run(cfg=cfg, settings=settings, workdir=workdir, source=source,
                      tokenizer=tokenizer, records=records, mesh=make_mesh(cfg), zoom=zoom)
    model = None
    # the settings this run used: what the next run's notice compares (stages.run_changes)
    results: dict = {"workdir": workdir, "stages": {}, "config": stages.config_json(cfg)}
    trained = []  # the stages this run trained (or continued)
    for stage in cfg.stages:
        done = stages.done_steps(workdir, stage)
        if done is not None and done >= stages.stage_steps(cfg, stage):
            model = stages.load_stage(workdir, stage, stages.scan_layers(cfg))
            stages.check_stage_model(model, tokenizer, workdir, stage)
            stages.log(f"[{stage}] already finished; loaded {workdir}/{stage}/model")
            later = [n for n in stages.saved_steps(os.path.join(workdir, stage, "ckpt"))
                     if n > done]
            if later and parallel.is_primary():  # (before: not said)
                stages.log(f"note: {stage} also holds checkpoints after its finished model "
                           f"(step{'s' if len(later) > 1 else ''} "
                           f"{', '.join(map(str, later))}, from a continuation that did not "
                           f"finish); --config.{stage}.steps={later[-1]} or more continues "
                           "from them")
            # its results as the run that trained it recorded them (done.json)
            results["stages"][stage] = stages.stored_results(workdir, stage)
            notice = stages.settings_notice(cfg, workdir, stage, finished=True,
                                            trained=done)
            if notice and parallel.is_primary():
                stages.log(notice)
            continue
        if model is None:
            model = stages.build_initial_model(cfg, tokenizer)
            stages.check_initial_model(cfg, model, tokenizer)
            stages.warn_untrained_start(cfg, workdir, stage)
        if parallel.is_primary():  # what a later run compares its settings with
            notice = stages.settings_notice(cfg, workdir, stage, finished=False)
            if notice:  # one stage trained with two settings: say so
                stages.log(notice)
            stages.save_settings(cfg, workdir, stage)
        trained.append(stage)
        t0 = time.time()
        model, info = stages.REGISTRY[stage](run_, model, stage)
        info["seconds"] = time.time() - t0
        stages.finish_stage(workdir, stage, model, info)
        results["stages"][stage] = info
        stages.log(f"[{stage}] finished in {info['seconds']:.0f}s")
    if model is not None:
        model.eval()
        results.update(evaluate_heldout(run_, model))
        before = _read_results(workdir).get("export")
        export = _export(run_, model, bool(trained), before) if cfg.export_hf \
            else _export_kept(run_, before)
        if export is not None:
            results["export"] = export
    seconds = time.time() - t_start
    previous = _read_results(workdir) if not trained else {}
    if isinstance(previous.get("seconds"), (int, float)):
        # nothing trained: the workdir's training time stays, this run's is recorded apart
        results["seconds"] = previous["seconds"]
        results["rerun_seconds"] = seconds
    else:
        results["seconds"] = seconds
    carried = [k for k in previous if k not in results and k not in _RUN_KEYS]
    if carried and not set(results) - _RUN_KEYS:
        # nothing trained and nothing evaluated (eval_limit 0): the earlier run's evaluation
        # stays (before: results.json was rewritten without it, hours of an 8B evaluation lost)
        results.update({k: previous[k] for k in carried})
        # the settings that evaluation ran with (this run's "config" says eval_limit 0)
        results["evaluation_config"] = previous.get("evaluation_config") or previous.get("config")
        if parallel.is_primary():
            stages.log(f"note: this run evaluated nothing; {workdir}/results.json keeps the "
                       "held-out results of the run before")
    if parallel.is_primary():
        if plot_curves(workdir, os.path.join(workdir, "curves.png")):
            drawn = [f"{workdir}/curves.png"] + ([f"{workdir}/results.png"]  # (eval_limit 0:
                                                 if "test_table" in results else [])  # none)
            stages.log(f"[plots] {', '.join(drawn)}")
        elif os.path.exists(os.path.join(workdir, "curves.png")):  # before: nothing said
            stages.log(f"note: no training curves to draw (every stage's metrics.jsonl is "
                       f"empty or torn); {workdir}/curves.png is left as an earlier run drew it")
        with atomic_output(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(finite_json(results), f, indent=1, default=str)
    if written is not None:  # (twenty-sixth probe ST6: a SIGHUP after results.json was
        written()            # written said "rerun to resume", of a complete run)
    parallel.barrier("run_done")
    return results


def _export(run_, model, trained: bool, before) -> dict | None:
    """Export the run's final model to ``WORKDIR/hf`` unless it holds that model already, and
    return what it holds: ``{"stage": S, "steps": N}`` (kept in results.json, so the next run
    can tell; None for an export whose source an older run did not record).

    ``before``: the previous run's record. An ``hf/`` made from another stage or step count (a
    stage continued with more steps, a run ending at another stage) is replaced: the new folder
    is written beside it and swapped in, the old one removed after (before: it was kept as it
    was, silently the model of the earlier run)."""
    cfg, workdir = run_.cfg, run_.workdir
    hf_dir = os.path.join(workdir, "hf")
    last = cfg.stages[-1]
    record = {"stage": last, "steps": stages.done_steps(workdir, last)}
    exists = os.path.isdir(hf_dir) and bool(os.listdir(hf_dir))  # an empty hf/: none
    damaged = hf.export_problem(hf_dir) if exists and before == record else None
    # (an unrecorded export is replaced: eighteenth probe T8 found one kept that held another
    # stage's model); every process takes the same branch (the export is a collective)
    if not parallel.any_process(not (exists and before == record and not damaged)):
        return before
    parallel.replicate_module(model, run_.mesh)  # every process: a collective
    if parallel.is_primary():
        check_free_space(hf_dir, hf.state_bytes(model) + 2**20)
        tokenizer = os.path.join(workdir, "tokenizer")
        if not exists:
            hf.save(model, hf_dir, assets_from=tokenizer)
            stages.log(f"[export] {workdir}/hf")
        else:
            _replace_export(model, hf_dir, tokenizer)
            # (twenty-sixth probe WT2: a torn model.safetensors was kept without a word; WE1:
            # an export results.json does not describe was called an earlier run's model)
            held = (f"this model, damaged: {damaged}" if damaged else
                    f"{before['stage']} after {before['steps']} steps" if isinstance(before, dict)
                    else "a model this workdir's results.json does not describe")
            stages.log(f"[export] {workdir}/hf ({last} after {record['steps']} steps; it held "
                       f"{held})")
    return record


def default_workdir(config: str) -> str:
    """``runs/<config name>``, ``runs/<config name>-<variant>`` for ``path:variant`` (before,
    ``configs/grpo.py:plain`` ran in ``runs/grpo``, where the difficulty-aware run's finished
    stages were loaded as its own)."""
    path, _, variant = config.partition(":")
    name = os.path.splitext(os.path.basename(path))[0]
    return os.path.join("runs", f"{name}-{variant}" if variant else name)


def _export_kept(run_, before) -> dict | None:
    """``export_hf=False``: what ``WORKDIR/hf`` still holds (``before``, kept in results.json;
    before, the key was dropped and nothing recorded which model the folder held), and a note
    when that is not the model this run ended with (eighteenth probe T2: a run ending at grpo
    left the sft export in place without a word)."""
    cfg, workdir = run_.cfg, run_.workdir
    hf_dir = os.path.join(workdir, "hf")
    if not (os.path.isdir(hf_dir) and os.listdir(hf_dir)):
        return None
    last = cfg.stages[-1]
    record = {"stage": last, "steps": stages.done_steps(workdir, last)}
    if before != record and parallel.is_primary():
        held = (f"{before['stage']} after {before['steps']} steps" if isinstance(before, dict)
                else "a model this workdir's results.json does not describe")
        stages.log(f"note: {hf_dir} holds {held}, not the model this run ended with ({last} "
                   f"after {record['steps']} steps): export_hf is False; rerun with "
                   "--config.export_hf=True to replace it")
    return before if isinstance(before, dict) else None


def _replace_export(model, hf_dir: str, tokenizer: str) -> None:
    """Write ``model`` to ``.hf-export`` beside ``hf_dir``, then swap it in: ``hf_dir`` is the
    old export or the new one at every moment but between two renames; what a killed swap
    leaves (``.hf-export``, ``.old-hf-*``) goes at the next export."""
    parent = os.path.dirname(hf_dir)
    staging = os.path.join(parent, ".hf-export")
    remove_leftovers(hf_dir, hf_dir)
    remove_leftovers(staging, staging)
    shutil.rmtree(staging, ignore_errors=True)
    hf.save(model, staging, assets_from=tokenizer)
    import tempfile  # noqa: PLC0415

    # files the new export does not hold are not ours to delete (eighteenth probe T13: an
    # evaluate --out written into hf/ went with the old export, without a word)
    theirs = sorted(set(_files(hf_dir)) - set(_files(staging)))
    aside = tempfile.mkdtemp(prefix=".old-hf-", dir=parent)
    os.rename(hf_dir, os.path.join(aside, "hf"))
    os.rename(staging, hf_dir)
    if theirs:
        kept = os.path.join(parent, "replaced-" + time.strftime("%Y%m%d-%H%M%S"))
        os.makedirs(kept, exist_ok=True)
        target = os.path.join(kept, "hf")
        if os.path.lexists(target):
            target = tempfile.mkdtemp(prefix="hf-", dir=kept)
            os.rmdir(target)
        os.rename(os.path.join(aside, "hf"), target)
        stages.log(f"note: the replaced export held {len(theirs)} file"
                   f"{'' if len(theirs) == 1 else 's'} the export does not write "
                   f"({', '.join(theirs[:3])}{', ...' if len(theirs) > 3 else ''}): it is "
                   f"kept whole in {target}")
    shutil.rmtree(aside, ignore_errors=True)


def _files(folder: str) -> list[str]:
    """Every file under ``folder``, as paths relative to it."""
    return [os.path.relpath(os.path.join(d, n), folder)
            for d, _, names in os.walk(folder) for n in names]


#: what results.json records of every run, evaluated or not (the rest is the evaluation's)
_RUN_KEYS = frozenset({"workdir", "stages", "config", "seconds", "rerun_seconds", "export",
                       "evaluation_config"})


def _read_results(workdir: str) -> dict:
    """The workdir's ``results.json`` as a dict ({} when absent or unreadable)."""
    try:
        with open(os.path.join(workdir, "results.json"), encoding="utf-8") as f:
            old = json.load(f)
    except (OSError, ValueError):
        return {}
    return old if isinstance(old, dict) else {}


def make_mesh(cfg):
    """The device mesh of ``cfg.mesh`` (axes data / fsdp / tensor, -1 = the rest); None on a
    single device, where the plain jitted programs run."""
    if jax.device_count() == 1:
        return None
    mesh = parallel.make_mesh(dict(cfg.mesh) if "mesh" in cfg else None)
    stages.log(f"[mesh] {dict(mesh.shape)} over {jax.device_count()} devices, "
               f"{jax.process_count()} process(es)")
    return mesh


def eval_think(cfg) -> bool:
    """The held-out evaluation asks for think answers when a stage trained them (stage 2, or
    stage 1 with ``sft.think``) and ``eval_think`` is on."""
    trained = bool({"grpo", "sft2"} & set(cfg.stages)) or \
        ("sft" in cfg.stages and cfg.sft.get("think", False))
    return bool(cfg.eval_think) and trained


def evaluate_heldout(run_: stages.Run, model) -> dict:
    """The held-out evaluations the config asks for, printed and returned as results entries:
    the test split (``eval_limit`` questions), every image of ``eval_unseen`` embedded datasets no
    stage saw, and AD-FM's test records (``eval_adfm``)."""
    cfg, out = run_.cfg, {}
    asked = cfg.get("eval_instruction", "direct") == "think"
    kw = dict(max_tiles=cfg.data.max_tiles, think=eval_think(cfg) or asked,
              max_new_tokens=cfg.eval_max_new_tokens, mesh=run_.mesh,
              batch=int(cfg.get("eval_batch", 1)))

    def ask(records):  # the think instruction in place of the direct one, when asked for
        return run_.zoomed(stage_data.asked_to_think(records) if asked else records)

    def show(summary, rows, title: str) -> dict:
        table = format_table(summary, title=title)
        if parallel.is_primary():
            print(table, flush=True)
        return {"table": table, "tasks": {paper_task_name(t): summary.average[t]
                                          for t in summary.tasks}}

    if cfg.eval_limit:
        summary, rows = evaluate_records(model, run_.tokenizer, ask(run_.records["test"]),
                                         limit=cfg.eval_limit, root=run_.source, **kw)
        title = f"held-out test split ({len(rows)} questions)"
        shown = show(summary, rows, title)
        out.update(test_average=summary.average["Average"], test_tasks=shown["tasks"],
                   test_table=shown["table"], answers=rows)
        if parallel.is_primary():
            header = ["Task"] + [paper_task_name(t) for t in summary.tasks] + ["Average"]
            plot_table([["accuracy %"] + [f"{summary.average[t]:.1f}" for t in summary.tasks]
                        + [f"{summary.average['Average']:.1f}"]], header,
                       os.path.join(run_.workdir, "results.png"), title=title)
    unseen = int(cfg.get("eval_unseen", 0))
    if stages.embedded_only(cfg, "[eval] eval_unseen", unseen):
        t0 = time.time()
        from emit_jax.data.prompts import TASKS

        recs = stage_data.unseen_records(unseen, tasks_=tuple(cfg.get("eval_unseen_tasks", (
            "anomaly_discrimination",)) or TASKS), **stages.question_options(cfg))
        limit = int(cfg.get("eval_unseen_limit", 0))
        subset = 0 < limit < len(recs)
        if subset:  # a fixed random subset (all classes, both labels)
            random.Random(stage_data.UNSEEN_SEED0).shuffle(recs)
            recs = recs[:limit]
        summary, rows = evaluate_records(model, run_.tokenizer, ask(recs), **kw)
        seed0 = stage_data.UNSEEN_SEED0
        shown = show(summary, rows, f"held-out: {unseen} embedded dataset(s) no stage saw (seeds "
                     f"{seed0}-{seed0 + unseen - 1}), {len(rows)} questions"
                     f"{' (a fixed random subset)' if subset else ''}, {time.time() - t0:.0f} s")
        out.update(unseen_tasks=shown["tasks"], unseen_questions=len(rows),
                   unseen_table=shown["table"])
    if cfg.get("eval_adfm", 0) and "adfm_test" in run_.records:
        summary, rows = evaluate_adfm(
            model, run_.tokenizer, run_.records["adfm_test"], limit=int(cfg.eval_adfm),
            max_tiles=cfg.data.max_tiles, mesh=run_.mesh, batch=int(cfg.get("eval_batch", 1)),
            max_new_tokens=int(cfg.get("eval_adfm_tokens") or cfg.grpo.max_new_tokens))
        out.update(adfm_test=summary, adfm_answers=rows)
        if parallel.is_primary():
            print(f"AD-FM held-out, eval_adfm={int(cfg.eval_adfm)} (" + ", ".join(
                (f"{k} {v:.1f}" if math.isfinite(v) else f"{k} n/a") if isinstance(v, float)
                else f"{k} {v}" for k, v in summary.items()) + ")", flush=True)
    return out


def _compile_cache(cfg) -> None:
    """Turn on JAX's persistent compilation cache at ``cfg.compile_cache`` (unless
    ``$JAX_COMPILATION_CACHE_DIR`` chose one already, or the key is empty).

    A path that is not valid UTF-8 is refused (``ConfigError``: JAX's cache raised a
    ``TypeError`` at the first compilation, after the workdir was made); a folder that cannot be
    made or written is one warning line, and the run compiles without a persistent cache (JAX's
    own two-line ``UserWarning`` said the same at each compilation)."""
    env = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if env:  # checked as the config's is (before: JAX's two-line warning at every compilation)
        try:  # '~/xla' quoted: the home folder (JAX itself made a folder '~' under ./)
            path = user_path(env)
        except ConfigError as e:
            raise ConfigError(f"JAX_COMPILATION_CACHE_DIR: {e}") from None
        if why := _unusable_cache(path):
            stages.log(f"warning: JAX_COMPILATION_CACHE_DIR={env}: {why}; compiling without a "
                       "persistent cache")
            jax.config.update("jax_compilation_cache_dir", None)
        elif path != env:
            jax.config.update("jax_compilation_cache_dir", path)
        if _overridden("compile_cache"):
            stages.log(f"note: --config.compile_cache not used: $JAX_COMPILATION_CACHE_DIR={env} "
                       "chooses the compilation cache")  # before: ignored without a word
        return
    path = cfg.get("compile_cache", "")
    if not path:
        return
    if not isinstance(path, str):
        raise ConfigError(f"config compile_cache: {path!r} is not a folder path (or '' for none)")
    check_utf8_path(path, "config compile_cache", why="JAX's compilation cache cannot use it")
    try:
        path = user_path(path)
    except ConfigError as e:
        raise ConfigError(f"config compile_cache: {e}") from None
    if why := _unusable_cache(path):  # nothing is made here: JAX makes it at its first write
        stages.log(f"warning: config compile_cache {path}: {why}; compiling without "
                   "a persistent cache (--config.compile_cache= to say so, or choose a "
                   "writable folder)")
        return
    jax.config.update("jax_compilation_cache_dir", path)


def _unusable_cache(path: str) -> str | None:
    """Why the compilation cache folder ``path`` cannot be used (what is there, or on the way to
    it, is not a folder, cannot be written, or a full disk), naming the existing ancestor
    checked when it is not ``path``; None when it can."""
    target = os.path.abspath(path)
    folder = nearest_existing(target)
    try:
        check_folder_writable(folder, folder, full_disk_ok=False)
    except OSError as e:
        return (e.strerror or str(e)) + (f" ({folder})" if folder != target else "")
    return None


_OVERRIDES: list[str] = []


def _overridden(key: str) -> bool:
    """Whether ``--config.<key>=...`` was given on the command line."""
    return any(o.partition("=")[0].strip() == key for o in _OVERRIDES)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing with the ``--config.KEY=VALUE`` overrides taken out first (read by
    :func:`emit_jax.configs.load`); a malformed override, or a flag or override given twice with
    different values (:func:`check_given_once`), is one error line, exit 2."""
    try:
        rest, overrides = configs.split_overrides(argv)
        check_given_once(rest, overrides)
    except ConfigError as e:
        print(f"emit_jax.train: error: {e}", file=sys.stderr)
        sys.exit(2)
    _OVERRIDES[:] = overrides
    try:
        return flags.FLAGS(rest)
    except flags.Error as e:
        print(f"emit_jax.train: error: {e}", file=sys.stderr)
        sys.exit(2)


def check_given_once(argv: list[str], overrides: list[str]) -> None:
    """Raise ``ConfigError`` naming a flag (``--config a ... --config b``, ``--workdir``) or an
    override (``--config.sft.steps=2 ... --config.sft.steps=3``) given twice with different
    values, where absl and the overrides let the last one silently win (the argparse commands
    refuse it too: ``emit_jax.cli.Parser``). The same value twice is accepted. ``argv``: the
    command line without the overrides, program name first, as absl reads it."""
    seen: dict[str, str] = {}

    def once(name: str, value: str) -> None:
        if seen.setdefault(name, value) != value:
            raise ConfigError(f"{name}: given twice ({seen[name]!r}, then {value!r}); "
                              "give it once")

    for item in overrides:
        key, _, value = item.partition("=")
        once(f"--config.{key.strip()}", value)
    args = iter(argv[1:])
    for a in args:
        if a == "--":  # absl: the rest are arguments
            break
        if not a.startswith("-") or a == "-":
            continue
        name, eq, value = a.lstrip("-").partition("=")
        flag = flags.FLAGS[name] if name in flags.FLAGS else None
        if flag is None and name.startswith("no") and name[2:] in flags.FLAGS \
                and flags.FLAGS[name[2:]].boolean and not eq:
            flag, value, eq = flags.FLAGS[name[2:]], "false", "="
        if flag is None or isinstance(flag, flags.MultiFlag):  # unknown: absl says so
            continue
        if not eq:
            if flag.boolean:
                value = "true"
            else:
                value = next(args, None)
                if value is None:  # absl reports the missing value
                    break
        once(f"--{flag.name}", value)


def _exit(status: int) -> None:
    """End the process with ``status`` once the error line is out. Where a checkpoint write
    failed, Orbax's background threads wait for signals that never come, and Python's exit
    waited for them for ever (a folder made unwritable under a run): then the process ends at
    once, as ``kill`` would after the line."""
    import threading

    if not cli.may_exit(status) or any(t.is_alive() and not t.daemon
                                       for t in threading.enumerate()
                                       if t is not threading.main_thread()):
        cli.flush_and_exit(status)
    sys.exit(status)


def main(argv) -> None:
    if len(argv) > 1:  # before: ignored, and the run trained as if they were not there
        print(f"emit_jax.train: error: unexpected argument(s) {' '.join(map(repr, argv[1:]))}: "
              "train takes only flags (--config, --workdir, --config.KEY=VALUE ...)",
              file=sys.stderr)
        sys.exit(2)
    logging.set_verbosity(logging.WARNING)  # Orbax logs every write at INFO
    if not os.environ.get("PYTHONFAULTHANDLER"):
        # absl's app.run turns on Python's fault handler: an abort in C++ (jax's distributed
        # client ends a process whose coordinator died) printed "Fatal Python error: Aborted"
        # and every thread's Python stack, read as a traceback of the tool (twenty-seventh
        # probe MB6); PYTHONFAULTHANDLER=1 keeps them, for a bug report
        faulthandler.disable()
    if _CONFIG.value is None:
        print("emit_jax.train: error: --config is required (e.g. --config configs/grpo.py)",
              file=sys.stderr)
        sys.exit(2)
    try:
        cfg = configs.load(_CONFIG.value, _OVERRIDES)
    except ConfigError as e:
        print(f"emit_jax.train: error: {e}", file=sys.stderr)
        sys.exit(2)
    if cfg.get("init_from") and _overridden("arch"):
        print(f"warning: --config.arch={cfg.arch}: not used, the model (its architecture "  # I02
              f"included) comes from init_from {cfg.init_from}", file=sys.stderr)
    if cfg.get("init_from") and cfg.get("vision_init") and _overridden("vision_init"):
        print(f"warning: --config.vision_init={cfg.vision_init}: not used, the model (its ViT "
              f"included) comes from init_from {cfg.init_from}", file=sys.stderr)
    if _WORKDIR.value == "":
        print("emit_jax.train: error: --workdir: empty path; name the run's folder (or leave "
              "the flag out for runs/<config name>[-<variant>])", file=sys.stderr)
        sys.exit(2)
    try:
        workdir = user_path(_WORKDIR.value) or default_workdir(_CONFIG.value)
    except ConfigError as e:
        print(f"emit_jax.train: error: --workdir: {e}", file=sys.stderr)
        sys.exit(2)

    with cli.stdout_guard() as guard:
        _train(cfg, workdir)
    status = cli.stdout_ending(guard, 0, "emit_jax.train")
    cli.finishing("emit_jax.train", status)
    cli.end(status)


def _train(cfg, workdir: str) -> None:
    """Train ``cfg`` in ``workdir``; every way it can fail ends the process with one line."""
    try:
        # SIGTERM stops like Ctrl-C (the last checkpoint is complete); neither is lost in an
        # import or a gc callback (cli.interrupts)
        with cli.interrupts():
            cli.no_x64("emit_jax.train")
            cli.skip_absent_tpu()  # no libtpu start-up lines on a host without a TPU
            _compile_cache(cfg)  # before the workdir is made: a bad path is one line
            try:
                parallel.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
            except ValueError as e:  # inconsistent multihost arguments
                raise ConfigError(str(e)) from None
            attention = (cfg.get("kernels") or {}).get("attention", "einsum")
            if attention == "splash" and jax.default_backend() != "tpu":  # was a tracer error
                raise ConfigError(f"config kernels.attention: 'splash' is a TPU kernel (Pallas) "
                                  f"and this host runs {jax.default_backend()}; use 'auto' "
                                  "(splash on a TPU, the best other kernel elsewhere)")
            # run() validates the config first: after initialize, so the mesh is checked
            # against every device; the options' own keys now, in validate's words
            from emit_jax.training.validate import check_options

            check_options(cfg)
            with memory_options(**dict(cfg.get("memory") or {})), \
                    kernel_options(**dict(cfg.get("kernels") or {})):
                run(cfg, workdir, chosen=not _WORKDIR.value,
                    written=lambda: cli.finishing("emit_jax.train", 0))
            cli.finishing("emit_jax.train", 0)  # from here a signal says the run was done
    except KeyboardInterrupt as e:
        stages.log(cli.interrupted_line("emit_jax.train", f"({str(e) or 'SIGINT'})",
                                        "rerun the same command to resume from the last "
                                        "checkpoint"))
        cli.after_the_line()
        cli.end(cli.INTERRUPTED)
    except USER_ERRORS as e:  # bad config, data, checkpoint or path: one line, exit 2
        stages.log(f"emit_jax.train: error: {message(e)}")
        _exit(2)
    except NonFiniteError as e:  # the non-finite policy stopped the run; its last good step is saved
        stages.log(f"emit_jax.train: error: {message(e)}")
        _exit(3)
    except Exception as e:  # more memory than there is, a platform JAX cannot start: one line
        if (line := cli.runtime_error(e)) is None:
            raise
        stages.log(f"emit_jax.train: error: {line}")
        _exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
