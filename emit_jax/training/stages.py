"""The stages of a run (``--config.stages``), each a function in :data:`REGISTRY`, and what they
share: the run's data, the initial model, finishing and loading a stage in the workdir.

- ``warmup`` (embedded default only): text-only versions of the tasks, the images replaced by one
  sentence (``emit_jax.training.data.warmup_records``);
- ``base`` (embedded default only): the whole tiny MLLM on the four tasks, no soft prompt or
  contrastive tokens, so that a frozen MLLM in stage 1 knows something;
- ``sft``: EMIT stage 1, ``<COMP_CONTEXT>`` added, soft prompt + heat-map projector trained by
  cross-entropy on anomaly-discrimination and localization answers, the MLLM frozen;
- ``sft2``: the ablation "SFT instead of GRPO": stage 2's data with templated think answers,
  cross-entropy, the same LoRA adapters and fully trained modules as GRPO;
- ``grpo``: EMIT stage 2, difficulty-aware GRPO (``emit_jax.training.grpo``).

A stage function takes the :class:`Run` and the model so far and returns ``(model, info)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import shutil
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np
from flax import nnx

from emit_jax import checkpoint, hf, parallel
from emit_jax.data.adfm import with_rationales as adfm_rationales
from emit_jax.data.embedded import ensure_cached
from emit_jax.data.embedded.cache import cache_path
from emit_jax.data.pipeline import PipelineConfig, RecordEncoder, collate
from emit_jax.data.tokenizer import load_tokenizer
from emit_jax.errors import CheckpointError, ConfigError, LockedError
from emit_jax.fileio import (atomic_output, check_free_space, finite_json, hold_lock, read_json,
                             remove_leftovers)
from emit_jax.models import architectures
from emit_jax.models.emit import EMIT, EMITConfig, is_emit
from emit_jax.models.internvl import InternVL
from emit_jax.training import data as stage_data
from emit_jax.training import vision_init
from emit_jax.training.grpo import run_grpo
from emit_jax.training.lora import apply_lora, merge_lora, trainable_filter
from emit_jax.training.precision import to_storage
from emit_jax.training.sft import run_sft
from emit_jax.training.state import saved_steps
from emit_jax.training.validate import Settings, starting_config


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclasses.dataclass
class Run:
    """What every stage of one run shares."""
    cfg: Any  # the ml_collections config (data, model and evaluation keys)
    settings: Settings  # the typed stage settings built from it (validate_config)
    workdir: str
    source: str  # the dataset root
    tokenizer: Any
    records: dict[str, list[dict]]
    mesh: Any = None
    zoom: Any = None  # a training.zoom.Zoomer (data.zoom, data.peak_region), or None

    @property
    def pad(self) -> int:
        return self.tokenizer.pad_token_id or 0

    def zoomed(self, records):
        """``records`` with the zoom image or the peak's region added to the questions that
        take them, each pair cut when a stage first reads its record (``data.zoom``,
        ``data.peak_region``; :mod:`emit_jax.training.zoom`), or as they are."""
        return self.zoom.lazy(records) if self.zoom is not None else records

    def pipeline(self, model, *, train: bool = True, with_answer: bool = True) -> PipelineConfig:
        return pipeline_config(self.cfg, model, train=train, with_answer=with_answer)

    def sft(self, model, records, name: str, *, wrt=nnx.Param, pcfg=None) -> dict:
        """Run the SFT-type stage ``name`` on ``records`` (its settings from ``settings``)."""
        cfg = self.cfg
        return run_sft(model, self.zoomed(records), self.tokenizer, pcfg or self.pipeline(model),
                       self.settings.optim[name], os.path.join(self.workdir, name), wrt=wrt,
                       name=name, seed=cfg.seed, checkpoint_every=cfg.checkpoint_every,
                       log_every=cfg.log_every, pad_id=self.pad, mesh=self.mesh,
                       on_nonfinite=cfg.get("nonfinite", "skip"))


def pipeline_config(cfg, model, *, train: bool = True, with_answer: bool = True) -> PipelineConfig:
    """How an SFT-type stage (or the evaluation) encodes records for ``model``."""
    return PipelineConfig.for_model(model, max_tiles=cfg.data.max_tiles, train=train,
                                    with_answer=with_answer,
                                    length_buckets=tuple(cfg.data.length_buckets))


# ------------------------------------------------------------------------------ the stages
def stage1_trainable(train_llm: bool = False):
    """The parameters EMIT's stage 1 trains: the soft prompt and the heat-map projector (and,
    with ``train_llm`` (``sft.train_llm``, not EMIT's recipe), the language model too, so it
    learns to read the contrastive tokens)."""
    parts = [nnx.PathContains("soft_prompt"), nnx.PathContains("projector")]
    if train_llm:
        parts.append(nnx.PathContains("language_model"))
    return nnx.All(nnx.Param, nnx.Any(*parts))


def text_stage_records(cfg, records: dict, stage: str) -> list[dict]:
    """The records of the ``warmup`` / ``base`` stage. ``warmup.tasks`` picks the statement
    tasks; ``base.statements`` mixes those statement records into the base stage too, so what the
    warm-up taught (statement at the end of the user turn -> answer letter) is kept while the
    base stage learns the image tasks."""
    tasks = tuple(cfg.warmup.get("tasks", ())) if "warmup" in cfg else ()
    source = "warmup_map" if map_grid(cfg) else "warmup"
    statements = [r for r in records[source] if not tasks or r["task_type"] in tasks]
    if stage == "warmup":
        return answered(cfg, statements)
    extra = adfm_rationales(records["adfm"]) if cfg.base.get("adfm", False) else []
    fresh = int(cfg.base.get("fresh_datasets", 0))
    if embedded_only(cfg, "[base] base.fresh_datasets", fresh):
        # think questions on every image of further embedded datasets (seeds data.seed+1..)
        import time  # noqa: PLC0415

        t0 = time.time()
        tasks_ = tuple(cfg.base.get("fresh_tasks", ()) or BASE_FRESH_TASKS)
        direct = float(cfg.base.get("fresh_direct", 0.0))
        more = stage_data.fresh_base_records(
            range(cfg.data.seed + 1, cfg.data.seed + 1 + fresh), tasks_,
            style=rationale_style(cfg), direct=direct, pick_seed=cfg.seed,
            **question_options(cfg))
        random.Random(cfg.seed).shuffle(more)
        extra = extra + more
        asked = "think" if not direct else f"think and direct ({direct:.0%} direct)"
        log(f"[base] {len(more)} {asked} questions ({', '.join(tasks_)}) of {fresh} fresh "
            f"embedded datasets (seeds {cfg.data.seed + 1}-{cfg.data.seed + fresh}, "
            f"{time.time() - t0:.0f} s)")
    return answered(cfg, records["base"] + (statements if cfg.base.get("statements", False)
                                            else []) + extra)


#: ``base.fresh_tasks`` when empty: the three four-option tasks (their options the pointer the
#: restated think answers read)
BASE_FRESH_TASKS = ("defect_classification", "defect_localization", "object_classification")


def run_text_stage(run: Run, model, stage: str):
    """``warmup`` / ``base``: the whole tiny MLLM, cross-entropy on the answers."""
    cfg = run.cfg
    if stage == "base" and cfg.base.get("emit", False):
        model = as_emit(cfg, model, run.tokenizer)
    wrt = nnx.Param if cfg[stage].get("train_vision", True) else \
        nnx.All(nnx.Param, nnx.Not(nnx.PathContains("vision_tower")))
    return model, run.sft(model, text_stage_records(cfg, run.records, stage), stage, wrt=wrt)


def as_emit(cfg, model, tokenizer):
    """``model`` with EMIT's contrastive tokens and soft prompt added (``cfg.emit``), or as it
    is when it has them."""
    if is_emit(model):
        return model
    return EMIT.create(model, EMITConfig(**dict(cfg.emit.items())), tokenizer=tokenizer,
                       rngs=nnx.Rngs(cfg.seed))


def run_stage1(run: Run, model, stage: str = "sft"):
    """EMIT stage 1: ``<COMP_CONTEXT>`` added (an EMIT model over the MLLM), soft prompt and
    projector trained."""
    cfg = run.cfg
    model = as_emit(cfg, model, run.tokenizer)
    tasks = tuple(cfg.sft.get("tasks", ()))
    records = [r for r in run.records["sft"] if not tasks or r["task_type"] in tasks]
    fresh = int(cfg.sft.get("fresh_datasets", 0))
    if embedded_only(cfg, "[sft] sft.fresh_datasets", fresh):
        # AD questions on further embedded datasets: no image repeats (configs)
        import time  # noqa: PLC0415

        t0 = time.time()
        fresh_tasks = tuple(cfg.sft.get("fresh_tasks", ()) or ("anomaly_discrimination",))
        drawn = stage_data.fresh_records(
            range(cfg.data.seed + 1, cfg.data.seed + 1 + fresh), tasks_=fresh_tasks,
            **question_options(cfg))
        shares = tuple(cfg.sft.get("fresh_shares", ()) or ())
        if shares:  # a share of some tasks' questions (validated: one per fresh task)
            drawn = stage_data.task_shares(drawn, dict(zip(fresh_tasks, map(float, shares))),
                                           seed=cfg.seed)
        records = records + drawn
        random.Random(cfg.seed).shuffle(records)
        log(f"[sft] {len(records)} records with the {', '.join(fresh_tasks)} questions of "
            f"{fresh} fresh embedded datasets (seeds {cfg.data.seed + 1}-"
            f"{cfg.data.seed + fresh}, {time.time() - t0:.0f} s)")
    if cfg.sft.get("think", False):
        records = stage_data.think_records(records, rationale_style(cfg))
    records = answered(cfg, records)
    return model, run.sft(model, records, "sft",
                          wrt=stage1_trainable(bool(cfg.sft.get("train_llm", False))))


def run_sft2(run: Run, model, stage: str = "sft2"):
    """The ablation: stage 2 by SFT (same LoRA and trainable set as GRPO), merged after."""
    records = answered(run.cfg, stage_data.with_rationales(run.records["grpo"],
                                                           rationale_style(run.cfg)))
    pcfg = run.pipeline(model)
    sample = collate([RecordEncoder(run.tokenizer, pcfg)(records[0], np.random.default_rng(0))],
                     pcfg, run.pad)
    policy = apply_lora(model, sample, run.settings.grpo.lora, seed=run.cfg.seed)
    info = run.sft(policy, records, "sft2", wrt=trainable_filter(), pcfg=pcfg)
    model = merge_lora(policy, model)
    model.eval()
    return model, info


def run_stage2(run: Run, model, stage: str = "grpo"):
    """EMIT stage 2: difficulty-aware GRPO with LoRA; returns the merged model."""
    cfg, g = run.cfg, run.settings.grpo
    records = run.records[g.records]
    if g.instruction == "direct":  # asked as the held-out evaluation asks
        records = stage_data.asked_with(records, "direct")
    return run_grpo(model, run.zoomed(records), run.tokenizer, g,
                    os.path.join(run.workdir, "grpo"), mesh=run.mesh, seed=cfg.seed,
                    max_tiles=cfg.data.max_tiles, length_buckets=cfg.data.length_buckets,
                    checkpoint_every=cfg.checkpoint_every,
                    on_nonfinite=cfg.get("nonfinite", "skip"), answers=answer_form(cfg))


#: stage name -> ``fn(run, model, stage) -> (model, info)``
REGISTRY: dict[str, Callable] = {"warmup": run_text_stage, "base": run_text_stage,
                                 "sft": run_stage1, "sft2": run_sft2, "grpo": run_stage2}


# ------------------------------------------------------------------------------ the workdir
def stage_steps(cfg, stage: str) -> int:
    section = cfg.get(stage) if stage in REGISTRY else None
    return int((section or {}).get("steps", 0))


def done_steps(workdir: str, stage: str) -> int | None:
    """The step count ``stage`` finished with (its ``done.json``), None when it has not
    finished; a ``done.json`` without one is a ``ConfigError``."""
    path = os.path.join(workdir, stage, "done.json")
    if not os.path.isfile(path):
        return None
    # the way forward (thirtieth probe D2: a torn one was refused without it): without the
    # file the stage is unfinished, and the next run finishes it from its last checkpoint
    way = ("restore it, or remove it: the next run finishes the stage from its last checkpoint "
           "(or trains it again when it has none)")
    try:
        done = read_json(path, error=ConfigError, what="a stage's done.json")
    except ConfigError as e:
        raise ConfigError(f"{e}; {way}") from None
    n = done.get("steps") if isinstance(done, dict) else None
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError(f"{path}: not a stage's done.json (no step count); {way}")
    return n


def stage_done(workdir: str, stage: str, steps: int) -> bool:
    """Finished with at least ``steps`` steps (a larger step count continues from the stage's
    last checkpoint)."""
    n = done_steps(workdir, stage)
    return n is not None and n >= steps


def finish_stage(workdir: str, stage: str, model, info: dict) -> None:
    """Save the finished stage's model (``WORKDIR/<stage>/model``) and its ``done.json``."""
    to_storage(model)  # trained parameters back to the dtype the user asked for (bf16 8B)
    d = os.path.join(workdir, stage)
    target = os.path.join(d, "model")
    check_free_space(target, hf.state_bytes(model) + 2**20)  # a full disk: one line, first
    if parallel.is_primary():
        if os.path.isdir(target):  # an earlier, shorter run: replace it
            shutil.rmtree(target)
        remove_leftovers(target, target)  # a save cut off (kill -9, a second Ctrl-C)
    parallel.barrier("replace:" + stage)  # nobody checks the target before it is gone
    checkpoint.save_model(model, target, assets_from=os.path.join(workdir, "tokenizer"))
    if parallel.is_primary():
        with atomic_output(os.path.join(d, "done.json"), "w") as f:
            json.dump(finite_json(info), f, indent=1, default=str)
    parallel.barrier("finish:" + stage)


# ------------------------------------------------------------------------------ one writer
LOCK_FILE = ".lock"


@contextlib.contextmanager
def workdir_lock(workdir: str):
    """Hold ``WORKDIR/.lock`` (``fcntl.flock``, :func:`emit_jax.fileio.hold_lock`) while the
    block runs: a second trainer on the workdir stops with one ``LockedError`` line naming the
    workdir and the holder's pid. The OS drops the lock when the holder ends, however it ends,
    so a killed run never leaves the workdir locked. Multi-process runs: process 0 alone takes
    it (the others of the same job write into the same workdir) and tells the others (a
    collective), so every process of a refused job stops, with the same line."""
    error = ""
    with contextlib.ExitStack() as stack:
        if parallel.is_primary():
            try:
                stack.enter_context(hold_lock(
                    os.path.join(workdir, LOCK_FILE), what=f"{workdir}: in use by another trainer",
                    hint="wait for it to end or stop it, or choose another --workdir"))
            except LockedError as e:
                error = str(e)
        if parallel.any_process(bool(error)) and not error:  # (a collective: every process)
            error = (f"{workdir}: in use by another trainer (process 0 of this job found "
                     f"{os.path.join(workdir, LOCK_FILE)} held; see its error)")
        if error:
            raise LockedError(error)
        yield


# ------------------------------------------------------------------------------ stored settings
#: what a stage's stored output (its checkpoints and model) depends on, besides the stage before
#: it in ``stages``: the model every stage builds on, and what the stage itself trains. A rerun
#: that changes one of these for a stage with output in the workdir is refused
#: (:func:`check_settings`) unless ``restart`` is set; every other setting (step counts,
#: learning rates, batch sizes, evaluation, logging, checkpointing, the compile cache, the
#: data's options, ``kernels.scan_layers``) may change between runs.
MODEL_SETTINGS = ("arch", "init_from", "vision_init", "tokenizer", "param_dtype", "image_size")
LORA_SETTINGS = ("grpo.lora.rank", "grpo.lora.alpha", "grpo.lora.targets",
                 "grpo.lora.weight_qtype")
STAGE_SETTINGS = {"warmup": ("warmup.train_vision",), "base": ("base.train_vision",),
                  "sft": ("emit", "sft.train_llm"), "sft2": LORA_SETTINGS, "grpo": LORA_SETTINGS}
#: defaults of keys a config may lack (the stage code's defaults)
_SETTING_DEFAULTS = {"warmup.train_vision": True, "base.train_vision": True,
                     "sft.train_llm": False}
SETTINGS_FILE = "settings.json"  # WORKDIR/<stage>/settings.json: the resolved config it ran with
BEFORE = "the stage before {stage}"


def config_json(cfg) -> dict:
    """The resolved config as plain JSON values (tuples as lists)."""
    return json.loads(json.dumps(cfg.to_dict(), default=str))


def stage_settings(config: dict, stage: str) -> dict:
    """``{setting: value}`` that ``stage``'s output depends on, read from a resolved config
    (:func:`config_json`): :data:`MODEL_SETTINGS`, the stage's :data:`STAGE_SETTINGS` (a
    section as its dotted keys) and the stage before it in ``stages`` (None: the first)."""
    out = {}

    def add(key, value):
        if isinstance(value, dict):
            for k, v in value.items():
                add(f"{key}.{k}", v)
        else:
            out[key] = value

    for key in MODEL_SETTINGS + STAGE_SETTINGS.get(stage, ()):
        node = config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        add(key, _SETTING_DEFAULTS.get(key) if node is None else node)
    order = list(config.get("stages") or ())
    i = order.index(stage) if stage in order else -1
    out[BEFORE.format(stage=stage)] = order[i - 1] if i > 0 else None
    return out


def save_settings(cfg, workdir: str, stage: str) -> None:
    """Store the resolved config with ``stage``'s output (``WORKDIR/<stage>/settings.json``),
    when the stage starts or resumes: what a later run compares (:func:`check_settings`). A
    stage with output but no settings file (an earlier version's) keeps none: what it was
    trained with is not known."""
    path = os.path.join(workdir, stage, SETTINGS_FILE)
    if not os.path.isfile(path) and has_output(workdir, stage):
        return
    with atomic_output(path, "w") as f:
        json.dump({"stage": stage, "config": config_json(cfg)}, f, indent=1)


def has_output(workdir: str, stage: str) -> bool:
    """Whether ``stage`` left anything a later run builds on: a finished model (``done.json``)
    or a checkpoint step."""
    d = os.path.join(workdir, stage)
    return os.path.isfile(os.path.join(d, "done.json")) or \
        bool(saved_steps(os.path.join(d, "ckpt")))


def changed_settings(cfg, workdir: str, *,
                     sections: bool = False) -> dict[str, list[tuple[str, Any, Any]]]:
    """``{stage: [(setting, stored, now), ...]}`` for each stage of the run whose output in the
    workdir was made with other :func:`stage_settings`. A stage without output
    (:func:`has_output`: not started, or stopped before its first checkpoint, e.g. on a config
    error) is not compared; one with output but no settings file (it is written before the
    stage trains) raises ``ConfigError``, or with ``sections`` (restart) counts as changed.
    ``sections``: the stage's own section's other settings too (:func:`section_changes`: what
    ``restart`` trains again with), and a finished stage's step count when fewer are asked."""
    now, out = config_json(cfg), {}
    for stage in cfg.stages:
        path = os.path.join(workdir, stage, SETTINGS_FILE)
        if not has_output(workdir, stage):
            continue
        if not os.path.lexists(path):  # (nineteenth probe D02: the guard went with the file)
            if sections:  # restart: trained again, as a stage whose settings changed
                out[stage] = [(SETTINGS_FILE, "missing", "this run's")]
                continue
            raise ConfigError(
                f"{path}: missing, so the settings {stage} was trained with cannot be compared "
                "with this run's (its checkpoints and model depend on them); restore the file, "
                f"or {_train_again(workdir, stage)}")
        try:
            stored = stored_config(workdir, stage)
        except ConfigError:
            if sections:  # damaged: as missing (28th probe P6: restart was refused too)
                out[stage] = [(SETTINGS_FILE, "unreadable", "this run's")]
                continue
            raise
        old, new = stage_settings(stored, stage), stage_settings(now, stage)
        if old.get("init_from") and old.get("init_from") == new.get("init_from"):
            # the model came from init_from: arch and vision_init were not used either time
            old.pop("arch", None)
            old.pop("vision_init", None)
        diff = [(k, old.get(k), new[k]) for k in new if k in old and old[k] != new[k]]
        if sections:
            diff += section_changes(cfg, workdir, stage)
            if stored.get("seed") != now.get("seed"):
                # the weights' draw: restart trains again with another one (twentieth probe
                # C81: "nothing to restart", the stages kept with the old seed)
                diff.append(("seed", stored.get("seed"), now.get("seed")))
            trained, asked = done_steps(workdir, stage), stage_steps(cfg, stage)
            if trained is not None and asked < trained:  # fewer steps: what restart trains
                diff.append((f"{stage}.steps", trained, asked))  # (before: "nothing to restart")
        if diff:
            out[stage] = diff
    return out


def _flat(prefix: str, value, out: dict) -> dict:
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}.{k}", v, out)
    else:
        out[prefix] = value
    return out


def flat_config(config: dict) -> dict:
    """``{dotted key: value}`` of a resolved config (:func:`config_json`)."""
    out: dict = {}
    for k, v in config.items():
        _flat(k, v, out)
    return out


def stored_config(workdir: str, stage: str) -> dict | None:
    """The resolved config ``stage`` last started or resumed with
    (``WORKDIR/<stage>/settings.json``), None when there is none."""
    path = os.path.join(workdir, stage, SETTINGS_FILE)
    if not os.path.lexists(path):  # (a link to nothing or a folder there: read_json's line)
        return None
    way = f"restore it, or {_train_again(workdir, stage)}"  # (28th probe P6: no way out said)
    try:
        stored = read_json(path, error=ConfigError, what="a stage settings file")
    except ConfigError as e:
        raise ConfigError(f"{e}; {way}") from None
    if not isinstance(stored, dict) or not isinstance(stored.get("config"), dict):
        raise ConfigError(f"{path}: not a stage settings file (no config object); {way}")
    return stored["config"]


def _train_again(workdir: str, stage: str) -> str:
    return (f"rerun with --config.restart=True to train {stage} again (its output is moved to "
            f"{os.path.join(workdir, 'replaced-<time>')}/, not deleted)")


def _differ(old: dict, new: dict, skip=(), one_sided: bool = False) -> list[tuple[str, Any, Any]]:
    """``[(key, old, new), ...]`` of two flat configs. A key one side lacks (a newer version's
    setting) is not known to have changed, unless ``one_sided`` and its value there is set
    (not None, False, 0 or empty): a config file that sets more (``configs/adfm.py``'s
    ``base.adfm=True`` beside ``configs/grpo.py``, which has no such key; twenty-third probe
    CS1/CS3: the stage went on with AD-FM records, unsaid). For notices only: restart, which
    trains again, compares the keys both sides have."""
    out = [(k, old[k], new[k]) for k in new if k in old and k not in skip and old[k] != new[k]]
    if one_sided:
        out += [(k, None, new[k]) for k in new if k not in old and k not in skip and new[k]]
        out += [(k, old[k], None) for k in old if k not in new and k not in skip and old[k]]
    return out


def section_changes(cfg, workdir: str, stage: str, *,
                    one_sided: bool = False) -> list[tuple[str, Any, Any]]:
    """``[(setting, stored, now), ...]``: the keys of ``stage``'s own config section (its
    learning rate, beta, batch size...) that differ from those its output in the workdir was
    made with, the step count and the structural settings (:func:`changed_settings`, refused
    anyway) left out. Empty for a stage without output or without a settings file.
    ``one_sided``: as :func:`_differ`."""
    if stage not in REGISTRY or not has_output(workdir, stage):
        return []
    stored = stored_config(workdir, stage)
    now = config_json(cfg)
    if stored is None or not isinstance(now.get(stage), dict):
        return []
    old, new = _flat(stage, stored.get(stage) or {}, {}), _flat(stage, now[stage], {})
    skip = {f"{stage}.steps"} | set(stage_settings(now, stage))
    return _differ(old, new, skip, one_sided)


def _changes(diff) -> str:
    return ", ".join(f"{k} {_show(a)} -> {_show(b)}" for k, a, b in diff)


def settings_notice(cfg, workdir: str, stage: str, *, finished: bool,
                    trained: int | None = None) -> str | None:
    """The line a rerun prints for ``stage`` when its own section's settings
    (:func:`section_changes`) differ from those its stored output was made with: a finished
    stage is kept as trained (``--config.restart=True`` trains it again with these), an
    unfinished one resumes with them, mixing both in one stage. None when nothing changed.
    Called before :func:`save_settings` records this run's settings. A finished stage asked
    for fewer steps than it trained is named too (more steps continue it); ``trained``, its
    step count when the caller read it already (:func:`done_steps`)."""
    diff = section_changes(cfg, workdir, stage, one_sided=True)
    if finished:
        if trained is None:
            trained = done_steps(workdir, stage)
        asked = stage_steps(cfg, stage)
        if trained is not None and asked < trained:  # before: kept without a word
            diff = diff + [(f"{stage}.steps", trained, asked)]
    if not diff:
        return None
    if finished:
        return (f"warning: {stage} is already finished and kept as trained; this run's "
                f"changed settings are not used for it: {_changes(diff)}. To train {stage} "
                f"again with them, add --config.restart=True (its output is moved to "
                f"{os.path.join(workdir, 'replaced-<time>')}/, not deleted)")
    return f"warning: {stage} resumes with settings changed since its checkpoint: {_changes(diff)}"


#: top-level keys no run-wide notice names: compared per stage, or about this run alone (where
#: compiled code is cached changes nothing trained; before, a changed one was said used)
_NOT_RUN_WIDE = ("stages", "restart", "emit", "compile_cache") + MODEL_SETTINGS


def run_changes(cfg, workdir: str) -> list[tuple[str, Any, Any]]:
    """``[(setting, stored, now), ...]``: the settings outside every stage's own section (the
    seed, the evaluation's, the data's, logging, export) that differ from those of the workdir's
    last run. The
    structural settings (:func:`check_settings`) and the stage sections
    (:func:`section_changes`) are left out: they have their own lines. The last run's settings
    are those its ``results.json`` records (``config``), or a stage's written after it (a run
    that ended before its results: twenty-seventh probe RS1r, an interrupted restart's rerun
    was compared with the run before the restart)."""
    newest, stored = -1.0, None
    path = os.path.join(workdir, "results.json")
    try:
        with open(path, encoding="utf-8") as f:
            results = json.load(f)
        if isinstance(results, dict) and isinstance(results.get("config"), dict):
            newest, stored = os.path.getmtime(path), results["config"]
    except (OSError, ValueError):
        pass
    for stage in cfg.stages:
        path = os.path.join(workdir, stage, SETTINGS_FILE)
        if os.path.isfile(path) and has_output(workdir, stage) and \
                os.path.getmtime(path) > newest:
            newest, stored = os.path.getmtime(path), stored_config(workdir, stage)
    if stored is None:
        return []
    now, old = {}, {}
    for src, dst in ((config_json(cfg), now), (stored, old)):
        for k, v in src.items():
            if k not in REGISTRY and k not in _NOT_RUN_WIDE:
                _flat(k, v, dst)
    return [(k, a, b) for k, a, b in sorted(_differ(old, now, one_sided=True))
            if not _same_folder(k, a, b)]


def _same_folder(key: str, old, now) -> bool:
    """Whether ``data.source`` names the same folder both times, spelled two ways (``./ds`` and
    ``ds``, or through a link to it): not a change."""
    return key == "data.source" and isinstance(old, str) and isinstance(now, str) and \
        os.path.realpath(old) == os.path.realpath(now)


def check_data_source(cfg, workdir: str) -> None:
    """Refuse a rerun whose ``data.source`` differs from the workdir's last run while the
    workdir keeps the records built from the old one (``WORKDIR/data``): they name the old
    dataset's images. Before, the run-wide notice said the run continued with the new value,
    then reading the records failed with a line asking whether the dataset had moved."""
    data = os.path.join(workdir, "data")
    if not os.path.isdir(data):
        return
    for key, old, now in run_changes(cfg, workdir):  # (./ds and ds are one: _same_folder)
        if key != "data.source":
            continue
        if old == "embedded" and isinstance(now, str) and os.path.realpath(now) == \
                os.path.realpath(cache_path(None, cfg.data.seed)):  # (eighteenth probe T14)
            raise ConfigError(
                f"config data.source: {_show(now)} is the embedded dataset's cache folder, which "
                f"this workdir's records ({data}) were built from as 'embedded'; rerun with "
                "--config.data.source=embedded (named as a folder it is a dataset of its own: "
                "the further datasets the embedded source draws are not drawn)")
        raise ConfigError(
            f"config data.source: {_show(now)}, but {data} holds the records built from "
            f"{_show(old)} in this workdir's last run (and its stages were trained on "
            f"them); choose another --workdir for another dataset, or rerun with "
            f"--config.data.source={old} (a dataset that moved: move it back)")


def run_notice(cfg, workdir: str) -> str | None:
    """The line a rerun prints when :func:`run_changes` finds settings changed since the
    workdir's last run: finished stages are kept as trained (they do not train again for
    these), and this run's evaluation, export and ``results.json`` use the new values. None
    when nothing changed."""
    diff = run_changes(cfg, workdir)
    if not diff:
        return None
    # (a finished stage asked for more steps resumes: not kept as trained)
    done = [s for s in cfg.stages if stage_done(workdir, s, stage_steps(cfg, s))]
    kept = (f"the finished stage{'s' if len(done) > 1 else ''} {', '.join(done)} "
            f"{'are' if len(done) > 1 else 'is'} kept as trained (not retrained for these); "
            if done else "")
    # an unfinished stage with checkpoints mixes both (eighteenth probe T11: a changed seed
    # resumed base at step 3 without a word that steps 1-2 ran with the old one)
    mixed = [s for s in cfg.stages if s not in done and has_output(workdir, s)]
    resumes = (f"; the unfinished stage{'s' if len(mixed) > 1 else ''} {', '.join(mixed)} "
               f"resume{'' if len(mixed) > 1 else 's'} from {'their' if len(mixed) > 1 else 'its'}"
               " checkpoint with them, the steps trained so far having used the old ones"
               if mixed else "")
    evaluates = bool(cfg.get("eval_limit", 0) or cfg.get("eval_unseen", 0))
    return (f"warning: settings changed since this workdir's last run: {_changes(diff)}; "
            f"{kept}this run continues with the new values"
            + (f", and its evaluation replaces {os.path.join(workdir, 'results.json')}"
               if evaluates else " (it evaluates nothing)") + resumes)


def _show(value) -> str:
    return "none" if value is None else repr(value)


def restart_note(cfg, workdir: str) -> str:
    """The ``[restart]`` line of a restart that trains nothing again: the stored stages match
    the run's settings. A finished stage asked for more steps continues from its last step
    (twenty-first probe: "nothing to restart", and then the stage trained on, unexplained)."""
    more = [f"{s} continues from step {n} to {stage_steps(cfg, s)}" for s in cfg.stages
            if (n := done_steps(workdir, s)) is not None and n < stage_steps(cfg, s)]
    return ("[restart] the stored stages were trained with these settings: nothing to train "
            "again" + (f" ({'; '.join(more)}: more steps resume a stage, fewer train it "
                       "again)" if more else ""))


def check_settings(cfg, workdir: str) -> None:
    """Refuse a rerun whose settings differ from those a stage's output in the workdir was made
    with (:func:`changed_settings`): one ``ConfigError`` naming each (stored -> now). With
    ``restart``, the first such stage of the run and every later one with output start over:
    their folders (and the exported ``hf/``) are moved to ``WORKDIR/replaced-<time>/``; with
    ``restart`` a stage whose own section changed (a learning rate: :func:`section_changes`)
    counts too. A restart that would move the ``init_from`` or ``tokenizer`` this run reads is
    refused before anything moves."""
    restart = bool(cfg.get("restart", False))
    changed = changed_settings(cfg, workdir, sections=restart)
    if not changed:
        if restart:
            log(restart_note(cfg, workdir))
        return
    first = next(s for s in cfg.stages if s in changed)
    later = [s for s in cfg.stages[list(cfg.stages).index(first):]
             if os.path.lexists(os.path.join(workdir, s))]
    what = "; ".join(f"{stage}: " + ", ".join(f"{k} {_show(a)} -> {_show(b)}" for k, a, b in diff)
                     for stage, diff in changed.items())
    if not restart:
        raise ConfigError(
            f"{workdir}: this run's settings differ from those its stored stages were trained "
            f"with ({what}), and their checkpoints and models depend on them. Rerun with the "
            f"stored settings to continue, or add --config.restart=True to train "
            f"{', '.join(later)} again (the old output is moved to "
            f"{os.path.join(workdir, 'replaced-<time>')}/, not deleted), or choose another "
            f"--workdir")
    moved = later + [n for n in ("hf",) if os.path.lexists(os.path.join(workdir, n))]
    if any(k in ("tokenizer", "init_from") for diff in changed.values() for k, _, _ in diff):
        moved += [n for n in ("tokenizer",) if os.path.lexists(os.path.join(workdir, n))]
    for key in ("init_from", "tokenizer"):  # what this run reads must stay where it is
        path = cfg.get(key) or ""
        for name in moved if path else ():
            folder = os.path.join(workdir, name)
            if _inside(path, folder):
                raise ConfigError(
                    f"config {key} {path} is inside {folder}, which --config.restart=True would "
                    f"move to {os.path.join(workdir, 'replaced-<time>')}/ before reading it: copy "
                    f"it out of the workdir first and point {key} at the copy, or choose "
                    f"another --workdir")
    parallel.barrier("restart:compared")  # every process has read the stored settings
    if parallel.is_primary():
        aside = os.path.join(workdir, "replaced-" + time.strftime("%Y%m%d-%H%M%S"))
        os.makedirs(aside, exist_ok=True)
        for name in moved:
            shutil.move(os.path.join(workdir, name), os.path.join(aside, name))
        log(f"[restart] settings changed ({what}): moved {', '.join(moved)} to {aside}; "
            f"training {', '.join(later)} again")
    parallel.barrier("restart")


def _inside(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or lies under it (symbolic links resolved)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def stored_results(workdir: str, stage: str) -> dict:
    """A finished stage's results entry (steps, history, seconds) as the run that trained it
    recorded it: its ``done.json``, else the entry of the workdir's ``results.json``, else the
    history rebuilt from ``<stage>/metrics.jsonl``; {} when none is readable."""
    def load(path):
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    info = load(os.path.join(workdir, stage, "done.json"))
    if isinstance(info, dict) and info.get("history") is not None:
        return info
    old = load(os.path.join(workdir, "results.json"))
    entry = (old.get("stages") or {}).get(stage) if isinstance(old, dict) else None
    if isinstance(entry, dict) and entry:
        return entry
    history = []
    try:
        with open(os.path.join(workdir, stage, "metrics.jsonl"), encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict):
                    history.append(row)
    except OSError:
        pass
    out = dict(info) if isinstance(info, dict) else {}
    if history:
        out["history"] = history
        out.setdefault("steps", max((int(r.get("step", 0)) for r in history), default=0))
    return out


def warn_untrained_start(cfg, workdir: str, stage: str) -> None:
    """``stage`` is the run's first and builds on trained weights (stage 1 and after) but no
    ``init_from`` gives any: it starts from a random initialisation. Say so, and how to give it
    weights."""
    earlier = {"sft": ["base"], "sft2": ["base", "sft"], "grpo": ["base", "sft"]}.get(stage)
    if stage == "grpo" and cfg.data.get("adfm", False):  # AD-FM's recipe: base, then grpo
        earlier = ["base"]  # (nineteenth probe AF09: the advice added EMIT's sft)
    if not earlier or cfg.init_from or not parallel.is_primary():
        return
    found = [os.path.join(workdir, s, "model") for s in reversed(earlier)
             if os.path.isfile(os.path.join(workdir, s, "model", "emit_jax.json"))]
    example = found[0] if found else "DIR"
    log(f"warning: {stage} starts from randomly initialised weights: no stage before it in this "
        f"run (stages={tuple(cfg.stages)!r}) and no init_from, so no stage trained its weights. "
        f"Give it trained weights with --config.init_from={example} (an HF folder or an "
        f"emit_jax model checkpoint{', which this workdir holds' if found else ''}), or run the "
        f"earlier stages too (--config.stages=\"{tuple(earlier + [stage])!r}\")")


def load_stage(workdir: str, stage: str, scan_layers: bool | None = None):
    """The finished ``stage``'s model; ``scan_layers``: stacked or unrolled layers (None: as
    saved). Its ``model`` folder gone while ``done.json`` says it finished: one line with the way
    back (before: only "no such folder")."""
    d = os.path.join(workdir, stage)
    back = (f"move {d}/done.json away and rerun: the stage resumes from its last checkpoint "
            f"in {d}/ckpt and saves its model again" if os.path.isdir(os.path.join(d, "ckpt"))
            else f"restore it, or move {d} away to train the stage again")
    if not os.path.lexists(os.path.join(d, "model")):
        raise CheckpointError(f"{d}/model: no such folder, though {d}/done.json says {stage} "
                              f"finished (its model was removed); {back}")
    try:
        model, _ = checkpoint.load_model(os.path.join(d, "model"), scan_layers=scan_layers)
    except CheckpointError as e:  # (twenty-sixth probe WT1: a damaged model, no way back said)
        raise CheckpointError(f"{e}; {back.replace('restore it', f'restore {d}/model')}") \
            from None
    return model


def check_stage_model(model, tokenizer, workdir: str, stage: str) -> None:
    """Raise ``CheckpointError`` when a finished stage's model cannot be the one this workdir
    trained with its tokenizer (``<workdir>/tokenizer``): the image token's id differs, or the
    tokenizer has tokens the model has no row for (but ``<COMP_CONTEXT>``, the last, which the
    stages before stage 1 do not embed). Before, a model copied in from elsewhere, or a
    replaced tokenizer, was loaded and evaluated without a word."""
    mcfg = model.config
    img = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    if fits_tokenizer(mcfg, tokenizer):
        return
    raise CheckpointError(
        f"{os.path.join(workdir, stage, 'model')}: does not fit this workdir's tokenizer "
        f"({os.path.join(workdir, 'tokenizer')}: {len(tokenizer):,} tokens, <IMG_CONTEXT> id "
        f"{img}; the model: {mcfg.text.vocab_size:,} rows, image token id "
        f"{mcfg.image_token_id}): one of them was replaced; restore it, or remove "
        f"{os.path.join(workdir, stage)} to train the stage again")


def fits_tokenizer(mcfg, tokenizer) -> bool:
    """Whether a model of config ``mcfg`` reads ``tokenizer``'s ids: the same ``<IMG_CONTEXT>``
    id, and a row for every token but ``<COMP_CONTEXT>`` (the last, which stage 1 adds)."""
    img = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    return img == mcfg.image_token_id and len(tokenizer) <= mcfg.text.vocab_size + 1


def check_initial_model(cfg, model, tokenizer) -> None:
    """Raise ``ConfigError`` when the ``init_from`` model does not read this run's tokenizer,
    before any stage trains (before: a checkpoint of another vocabulary trained the base stage
    with its image tokens never replaced by the image, then stage 1 failed with a traceback)."""
    if not cfg.init_from or fits_tokenizer(model.config, tokenizer):
        return
    mcfg = model.config
    raise ConfigError(
        f"config init_from {cfg.init_from}: the model does not read the tokenizer "
        f"({tokenizer_source(cfg)}: {len(tokenizer):,} tokens, <IMG_CONTEXT> id "
        f"{tokenizer.convert_tokens_to_ids('<IMG_CONTEXT>')}; the model: "
        f"{mcfg.text.vocab_size:,} rows, image token id {mcfg.image_token_id}); give the "
        "tokenizer it was trained with (--config.tokenizer=DIR)")


def scan_layers(cfg) -> bool:
    """``kernels.scan_layers``: the models a run builds or loads have stacked layers."""
    return bool((cfg.get("kernels") or {}).get("scan_layers", False))


def check_vocabulary(cfg, tokenizer) -> None:
    """Settings bounded by the tokenizer's vocabulary, checked once it is known and before any
    stage trains: ``grpo.top_k`` (0: off) keeps at most the whole vocabulary (before: accepted
    until the GRPO stage sampled, after the stages before it had trained)."""
    if "grpo" not in cfg.stages:
        return
    top_k, vocab = int(cfg.grpo.get("top_k", 0) or 0), len(tokenizer)
    if top_k > vocab:
        raise ConfigError(f"config grpo.top_k: {top_k} is more than the {vocab} tokens of the "
                          "tokenizer's vocabulary; use at most that, or 0 to sample from all")


def check_prompt_room(cfg, tokenizer, records: dict) -> None:
    """GRPO's prompts and ``grpo.max_new_tokens`` must fit the model's context together,
    checked once the records are built and before any stage trains (before: only the new
    tokens were compared, so ``max_new_tokens=8000`` beside 400-token prompts trained every
    stage before GRPO, then failed allocating a cache the positions do not cover). Counted
    per record: its text and one tile per image, a floor (more tiles only add); skipped for an
    Orbax ``init_from`` (its context is read when it loads)."""
    mcfg, where = starting_config(cfg)
    if "grpo" not in cfg.stages or mcfg is None:
        return
    from emit_jax.data.tokenizer import encode_chat

    context, new = mcfg.text.max_position_embeddings, int(cfg.grpo.max_new_tokens)
    longest = 0
    for rec in records.get(cfg.grpo.get("records", "grpo")) or ():
        user = next((m["content"] for m in rec.get("messages", ()) if m.get("role") == "user"),
                    None)
        if isinstance(user, str):
            n = len(encode_chat(tokenizer, user, tiles_per_image=[1] * len(rec.get("images", ())),
                                tokens_per_tile=mcfg.tokens_per_tile)["input_ids"])
            longest = max(longest, n)  # every record: the advice must be a value that passes
    if longest + new > context:
        raise ConfigError(f"config grpo.max_new_tokens: {new:,} new tokens after prompts of at "
                          f"least {longest:,} tokens pass the model's context: {where} holds "
                          f"{context:,} positions (max_position_embeddings); use at most "
                          f"{max(context - longest, 0):,}")


def build_initial_model(cfg, tokenizer):
    """The model a run starts from: ``init_from`` (HF folder or Orbax checkpoint), or the named
    architecture with random weights, its vocabulary fitted to the tokenizer; its layers
    stacked when ``kernels.scan_layers`` is set."""
    scan = scan_layers(cfg)
    if cfg.init_from:
        return checkpoint.load_model_folder(cfg.init_from, cfg.get("param_dtype") or None,
                                            scan_layers=scan)[0]
    model = fitted_model(starting_config(cfg)[0], tokenizer, cfg.seed, scan=scan)
    if cfg.get("vision_init"):  # the ViT from trained weights, the rest random
        tensors, where = vision_init.read_vision(cfg.vision_init)
        vision_init.apply_vision(model, tensors, where)
        log(f"[model] the ViT from {where} (vision_init)")
        if cfg.vision_init == "embedded" and cfg.data.source != "embedded":
            log(f"[model] note: that ViT was trained on the embedded default's images, not on "
                f"data.source {cfg.data.source}'s; --config.vision_init='' starts it random, a "
                f"file or folder of your own ViT starts it there")
    return model


def make_zoomer(cfg, tokenizer, workdir: str):
    """The :class:`emit_jax.training.zoom.Zoomer` of ``data.zoom`` and ``data.peak_region``
    (None when both are off): crops and regions placed by the heat map (the run's ``emit``
    settings, at the ViT blocks ``data.zoom_layers`` when given) of the ViT the run starts from
    (the initial model's, :func:`build_initial_model`, whatever stage a rerun loads), cut into
    ``WORKDIR/zoom`` as the stages read them (:meth:`Run.zoomed`)."""
    share = float(cfg.data.get("zoom", 0.0) or 0.0)
    region = bool(cfg.data.get("peak_region", False))
    if not share and not region:
        return None
    from emit_jax.training.zoom import Zoomer

    vit = build_initial_model(cfg, tokenizer).vision_tower
    ecfg = EMITConfig(**dict(cfg.emit.items())).validate()
    layers = tuple(cfg.data.get("zoom_layers", ()) or ())
    if layers:  # the map that places the crop from the first blocks only (a cheaper ViT pass)
        ecfg = dataclasses.replace(ecfg, ce_layers=layers)
        try:
            ecfg.layers_for(vit.cfg.num_hidden_layers)
        except ValueError as e:
            raise ConfigError(f"config data.zoom_layers: {e}".replace("ce_layers ", "")) from None
    return Zoomer(vit, ecfg, os.path.join(workdir, "zoom"), share, region=region)


def fitted_model(mcfg, tokenizer, seed: int, *, scan: bool = False) -> InternVL:
    """A randomly initialised InternVL of config ``mcfg`` with its vocabulary fitted to
    ``tokenizer`` (the image token's id and a row per token but the last, ``<COMP_CONTEXT>``,
    which EMIT appends to the model at stage 1), ``nnx.Rngs(seed)``."""
    img = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    vocab = len(tokenizer) - 1
    mcfg = mcfg.replace(text=dataclasses.replace(mcfg.text, vocab_size=vocab), image_token_id=img,
                        scan_layers=scan)
    return InternVL(mcfg.validate(), rngs=nnx.Rngs(seed))


# ------------------------------------------------------------------------------ the run's data
def adfm_frame(cfg) -> tuple[int, int]:
    """The model's input frame ``(W, H)`` for AD-FM boxes: ``image_size``, else the HF
    checkpoint's vision config, else the architecture's."""
    size = cfg.get("image_size") or 0
    if not size:
        mcfg = starting_config(cfg)[0] or architectures.get_config(cfg.arch)  # (Orbax: arch's)
        size = mcfg.vision.image_size
    return int(size), int(size)


def map_grid(cfg) -> int:
    """The contrastive-token grid side when the warm-up's hints are defect maps
    (``warmup.hint='map'``), else 0: the ViT's patch grid halved by the projector's stride-2
    conv (8 for ``tiny``)."""
    hint = cfg.warmup.get("hint", "statement") if "warmup" in cfg else "statement"
    if hint not in stage_data.WARMUP_HINTS:  # validate_config says so first on the command line
        raise ValueError(f"warmup.hint must be 'statement' or 'map', got {hint!r}")
    if hint == "statement":
        return 0
    return adfm_frame(cfg)[0] // architectures.get_config(cfg.arch).vision.patch_size // 2


def question_options(cfg) -> dict:
    """How ``cfg`` builds questions (``tasks.build_questions``' options), for the workdir's
    record sets and for the extra embedded datasets (fresh and unseen) alike."""
    return dict(ad_order=cfg.data.get("ad_order", "shuffled"),
                domain_knowledge=cfg.data.get("domain_knowledge", True),
                dk_sentences=cfg.data.get("dk_sentences", 0))


def rationale_style(cfg) -> str:
    """How templated think answers read (``data.rationale``; ``training.data.RATIONALES``)."""
    return cfg.data.get("rationale", "brief")


def answer_form(cfg) -> str:
    """How the four-option tasks' answers read (``data.answers``; ``training.data.ANSWER_FORMS``)."""
    return cfg.data.get("answers", "letter")


def answered(cfg, records: list[dict]) -> list[dict]:
    """``records`` with their answers in the config's form (:func:`answer_form`)."""
    tasks_ = stage_data.WORDED_TASKS.get(answer_form(cfg))
    return stage_data.in_words(records, tasks_) if tasks_ else records


def embedded_only(cfg, option: str, value) -> bool:
    """Whether ``option`` (set to ``value``) applies: further datasets are drawn by the embedded
    generator only; with a dataset folder it is not used, and the log says so."""
    if value and cfg.data.source != "embedded":
        log(f"{option}={value} not used: it draws further datasets with the embedded generator, "
            "and data.source is a dataset folder")
        return False
    return bool(value)


def tokenizer_source(cfg) -> str:
    """Where a run's tokenizer files are: ``tokenizer``, else ``init_from``'s (a real checkpoint
    brings its own: the HF folder, or an Orbax checkpoint's ``assets/``), else "" (the run
    trains the tiny tokenizer in its workdir)."""
    if cfg.get("tokenizer") or not cfg.init_from:
        return cfg.get("tokenizer") or ""
    return cfg.init_from if os.path.isfile(os.path.join(cfg.init_from, "config.json")) \
        else checkpoint.assets_dir(cfg.init_from)


def prepare_data(cfg, workdir: str, *, write: bool = True):
    """(dataset root, tokenizer, stage records); ``write=False`` keeps the record files out of
    the workdir (a secondary process of a multi-process run)."""
    source = ensure_cached(seed=cfg.data.seed) if cfg.data.source == "embedded" else cfg.data.source
    tok_src = tokenizer_source(cfg)
    tokenizer = load_tokenizer(tok_src) if tok_src else stage_data.tokenizer_for(workdir, source)
    if write and not os.path.isdir(os.path.join(workdir, "tokenizer")):
        tokenizer.save_pretrained(os.path.join(workdir, "tokenizer"))
    kw = dict(seed=cfg.data.seed, text_samples=cfg.data.text_samples,
              base_think=cfg.data.get("base_think", True),
              rationale_style=rationale_style(cfg),
              adfm_frame=adfm_frame(cfg) if cfg.data.get("adfm", False) else None,
              map_grid=map_grid(cfg), **question_options(cfg))
    if write:
        records = stage_data.stage_records(source, workdir, **kw)
        # one line once the records are built: a bad dataset or tokenizer is the only line
        log(f"[data] {source}: " + ", ".join(f"{k} {len(v)}" for k, v in records.items()))
    else:
        with tempfile.TemporaryDirectory() as scratch:
            records = stage_data.stage_records(source, scratch, **kw)
    return source, tokenizer, records
