"""``python -m emit_jax.train --config configs/grpo.py [--config.key=value ...] [--workdir DIR]``

Runs the stages a config lists, in order, each resumable and skipped when already finished:

- ``warmup`` (the embedded default only): the tiny LLM learns the answer format on short
  text-only versions of the embedded tasks (``emit_jax.training.data.warmup_records``);
- ``base`` (the embedded default only): the tiny MLLM fine-tuned on the embedded tasks without
  soft prompt or contrastive tokens, so that a frozen MLLM in stage 1 knows something;
- ``sft``: EMIT stage 1 — ``<COMP_CONTEXT>`` added, soft prompt + heat-map projector trained by
  cross-entropy on anomaly-discrimination and localization answers, the MLLM frozen;
- ``sft2``: the ablation "SFT instead of GRPO": stage 2's data with templated think answers,
  cross-entropy, the same LoRA adapters and fully trained modules as GRPO;
- ``grpo``: EMIT stage 2 — difficulty-aware GRPO (see ``emit_jax.training.grpo``).

Each stage writes ``WORKDIR/<stage>/`` (Orbax checkpoints every K steps, ``metrics.jsonl``,
TensorBoard events in ``tb/`` — ``tensorboard --logdir WORKDIR`` — and on completion ``model/``,
an emit_jax model checkpoint). At the end the held-out table is printed (and saved to
``WORKDIR/results.json`` and ``results.png``), the curves are drawn into ``WORKDIR/curves.png``
and the final model is exported to ``WORKDIR/hf`` (switch off with ``--config.export_hf=False``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (default: runs/<config name>)")
_COORDINATOR = flags.DEFINE_string("coordinator", "", "multihost: host:port of process 0 "
                                   "(default: EMIT_COORDINATOR, SLURM, or TPU auto-detection)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "multihost: number of processes")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "multihost: this process's index")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _stage_steps(cfg, stage: str) -> int:
    section = cfg.get(stage) if stage in ("warmup", "base", "sft", "sft2", "grpo") else None
    return int((section or {}).get("steps", 0))


def _text_stage_records(cfg, records: dict, stage: str) -> list[dict]:
    """The records of the ``warmup`` / ``base`` stage. ``warmup.tasks`` picks the statement
    tasks; ``base.statements`` mixes those statement records into the base stage too, so what the
    warm-up taught (statement at the end of the user turn -> answer letter) is kept while the
    base stage learns the image tasks."""
    tasks = tuple(cfg.warmup.get("tasks", ())) if "warmup" in cfg else ()
    source = "warmup_map" if _map_grid(cfg) else "warmup"
    statements = [r for r in records[source] if not tasks or r["task_type"] in tasks]
    if stage == "warmup":
        return statements
    extra = []
    if cfg.base.get("adfm", False):  # AD-FM's three-stage format, from templated answers
        from emit_jax.data.adfm import with_rationales

        extra = with_rationales(records["adfm"])
    return records["base"] + (statements if cfg.base.get("statements", False) else []) + extra


def _eval_think(cfg) -> bool:
    """The held-out evaluation asks for think answers when a stage trained them (stage 2, or
    stage 1 with ``sft.think``) and ``eval_think`` is on."""
    trained = bool({"grpo", "sft2"} & set(cfg.stages)) or \
        ("sft" in cfg.stages and cfg.sft.get("think", False))
    return bool(cfg.eval_think) and trained


def _stage_done(workdir: str, stage: str, steps: int) -> bool:
    """Finished with at least ``steps`` steps (a larger step count continues from the stage's
    last checkpoint)."""
    path = os.path.join(workdir, stage, "done.json")
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as f:
        return int(json.load(f).get("steps", 0)) >= steps


def _finish_stage(workdir: str, stage: str, model, info: dict) -> None:
    from emit_jax import checkpoint

    from emit_jax import parallel
    from emit_jax.training.precision import to_storage

    to_storage(model)  # trained parameters back to the dtype the user asked for (bf16 8B)
    d = os.path.join(workdir, stage)
    target = os.path.join(d, "model")
    if os.path.isdir(target) and parallel.is_primary():  # an earlier, shorter run: replace it
        import shutil

        shutil.rmtree(target)
    parallel.barrier("replace:" + stage)  # nobody checks the target before it is gone
    checkpoint.save_model(model, target, assets_from=os.path.join(workdir, "tokenizer"))
    if parallel.is_primary():
        from emit_jax.fileio import atomic_output

        with atomic_output(os.path.join(d, "done.json"), "w") as f:
            json.dump(info, f, indent=1, default=str)
    parallel.barrier("finish:" + stage)


def _load_stage(workdir: str, stage: str):
    from emit_jax import checkpoint

    model, _ = checkpoint.load_model(os.path.join(workdir, stage, "model"))
    return model


def _adfm_frame(cfg) -> tuple[int, int]:
    """The model's input frame ``(W, H)`` for AD-FM boxes: ``image_size``, else the HF
    checkpoint's vision config, else the architecture's."""
    size = cfg.get("image_size") or 0
    hf_config = os.path.join(cfg.init_from or "", "config.json")
    if not size and cfg.init_from and os.path.isfile(hf_config):
        with open(hf_config, encoding="utf-8") as f:
            size = json.load(f).get("vision_config", {}).get("image_size", 0)
            size = size[0] if isinstance(size, (list, tuple)) else size
    if not size:
        from emit_jax.models import architectures

        size = architectures.get_config(cfg.arch).vision.image_size
    return int(size), int(size)


def _map_grid(cfg) -> int:
    """The contrastive-token grid side when the warm-up's hints are defect maps
    (``warmup.hint='map'``), else 0: the ViT's patch grid halved by the projector's stride-2
    conv (8 for ``tiny``)."""
    from emit_jax.training.data import WARMUP_HINTS

    hint = cfg.warmup.get("hint", "statement") if "warmup" in cfg else "statement"
    if hint not in WARMUP_HINTS:  # validate_config says so first on the command line
        raise ValueError(f"warmup.hint must be 'statement' or 'map', got {hint!r}")
    if hint == "statement":
        return 0
    from emit_jax.models import architectures

    return _adfm_frame(cfg)[0] // architectures.get_config(cfg.arch).vision.patch_size // 2


def stage1_trainable():
    """The parameters EMIT's stage 1 trains: the soft prompt and the heat-map projector."""
    from flax import nnx

    return nnx.All(nnx.Param, nnx.Any(nnx.PathContains("soft_prompt"),
                                      nnx.PathContains("projector")))


def build_initial_model(cfg, tokenizer):
    """The model a run starts from: ``init_from`` (HF folder or Orbax checkpoint), or the named
    architecture with random weights, its vocabulary fitted to the tokenizer."""
    from flax import nnx

    from emit_jax import checkpoint, hf
    from emit_jax.models import architectures
    from emit_jax.models.internvl import InternVL

    if cfg.init_from:
        if os.path.isfile(os.path.join(cfg.init_from, "config.json")):
            return hf.load(cfg.init_from, dtype=cfg.get("param_dtype") or None)
        return checkpoint.load_model(cfg.init_from, dtype=cfg.get("param_dtype") or None)[0]
    mcfg = architectures.get_config(cfg.arch, **({"dtype": cfg.param_dtype}
                                                  if cfg.get("param_dtype") else {}))
    img = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    # the tokenizer's last entry is <COMP_CONTEXT>, which EMIT appends to the model at stage 1
    vocab = len(tokenizer) - 1
    mcfg = mcfg.replace(text=dataclasses.replace(mcfg.text, vocab_size=vocab), image_token_id=img)
    if cfg.get("image_size"):
        mcfg = mcfg.replace(vision=dataclasses.replace(mcfg.vision, image_size=cfg.image_size))
    return InternVL(mcfg.validate(), rngs=nnx.Rngs(cfg.seed))


def _optim(section):
    from emit_jax.training.sft import OptimConfig

    fields = {f.name for f in dataclasses.fields(OptimConfig)}
    return OptimConfig(**{k: v for k, v in section.items() if k in fields})


def _pipeline(model, cfg, *, train: bool, with_answer: bool):
    from emit_jax.data.pipeline import PipelineConfig

    mcfg = model.config
    emit = hasattr(model, "emit_config")
    return PipelineConfig(image_size=mcfg.vision.image_size, max_tiles=cfg.data.max_tiles,
                          tokens_per_tile=mcfg.tokens_per_tile, train=train,
                          comp_slots=model.num_comp_slots if emit else 0,
                          comp_token_id=model.emit_config.comp_token_id if emit else None,
                          with_answer=with_answer,
                          length_buckets=tuple(cfg.data.length_buckets))


def make_mesh(cfg):
    """The device mesh of ``cfg.mesh`` (axes data / fsdp / tensor, -1 = the rest); None on a
    single device, where the plain jitted programs run."""
    import jax

    if jax.device_count() == 1:
        return None
    from emit_jax import parallel

    spec = dict(cfg.mesh) if "mesh" in cfg else None
    mesh = parallel.make_mesh(spec)
    _log(f"[mesh] {dict(mesh.shape)} over {jax.device_count()} devices, "
         f"{jax.process_count()} process(es)")
    return mesh


def _question_options(cfg) -> dict:
    """How ``cfg`` builds questions (``tasks.build_questions``' options), for the workdir's
    record sets and for the extra embedded datasets (fresh and unseen) alike."""
    return dict(ad_order=cfg.data.get("ad_order", "shuffled"),
                domain_knowledge=cfg.data.get("domain_knowledge", True),
                dk_sentences=cfg.data.get("dk_sentences", 0))


def _embedded_only(cfg, option: str, value) -> bool:
    """Whether ``option`` (set to ``value``) applies: further datasets are drawn by the embedded
    generator only; with a dataset folder it is not used, and the log says so."""
    if value and cfg.data.source != "embedded":
        _log(f"{option}={value} not used: it draws further datasets with the embedded generator, "
             "and data.source is a dataset folder")
        return False
    return bool(value)


def _prepare_data(cfg, workdir: str, *, write: bool = True):
    """(dataset root, tokenizer, stage records); ``write=False`` keeps the record files out of
    the workdir (a secondary process of a multi-process run)."""
    import tempfile

    from emit_jax.data.embedded import ensure_cached
    from emit_jax.training.data import stage_records, tokenizer_for

    source = ensure_cached(seed=cfg.data.seed) if cfg.data.source == "embedded" else cfg.data.source
    if write:
        _log(f"[data] {source}")
    tok_src = cfg.get("tokenizer") or ""
    if not tok_src and cfg.init_from:  # a real checkpoint brings its own tokenizer files
        from emit_jax import checkpoint as _ck

        tok_src = cfg.init_from if os.path.isfile(os.path.join(cfg.init_from, "config.json")) \
            else _ck.assets_dir(cfg.init_from)
    if tok_src:
        from emit_jax.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tok_src)
    else:
        tokenizer = tokenizer_for(workdir, source)
    if write and not os.path.isdir(os.path.join(workdir, "tokenizer")):
        tokenizer.save_pretrained(os.path.join(workdir, "tokenizer"))
    kw = dict(seed=cfg.data.seed, text_samples=cfg.data.text_samples,
              base_think=cfg.data.get("base_think", True),
              adfm_frame=_adfm_frame(cfg) if cfg.data.get("adfm", False) else None,
              map_grid=_map_grid(cfg), **_question_options(cfg))
    if write:
        records = stage_records(source, workdir, **kw)
        _log("[data] " + ", ".join(f"{k} {len(v)}" for k, v in records.items()))
    else:
        with tempfile.TemporaryDirectory() as scratch:
            records = stage_records(source, scratch, **kw)
    return source, tokenizer, records


def run(cfg, workdir: str) -> dict:
    from flax import nnx

    from emit_jax.models.emit import EMIT, EMITConfig
    from emit_jax.training.sft import run_sft

    from emit_jax import parallel

    os.makedirs(workdir, exist_ok=True)
    t_start = time.time()
    # multi-process: process 0 builds the dataset cache, the tokenizer and the record files;
    # the others then read the same (deterministic) data, writing nothing into the workdir
    if not parallel.is_primary():
        parallel.barrier("data")
    source, tokenizer, records = _prepare_data(cfg, workdir, write=parallel.is_primary())
    if parallel.is_primary():
        parallel.barrier("data")
    pad = tokenizer.pad_token_id or 0
    mesh = make_mesh(cfg)
    model = None
    results: dict = {"workdir": workdir, "stages": {}}
    for stage in cfg.stages:
        if _stage_done(workdir, stage, _stage_steps(cfg, stage)):
            model = _load_stage(workdir, stage)
            _log(f"[{stage}] already finished; loaded {workdir}/{stage}/model")
            continue
        if model is None:
            model = build_initial_model(cfg, tokenizer)
        t0 = time.time()
        if stage in ("warmup", "base"):  # the whole tiny MLLM, cross-entropy on the answers
            wrt = nnx.Param if cfg[stage].get("train_vision", True) else \
                nnx.All(nnx.Param, nnx.Not(nnx.PathContains("vision_tower")))
            info = run_sft(model, _text_stage_records(cfg, records, stage), tokenizer,
                           _pipeline(model, cfg, train=True, with_answer=True), _optim(cfg[stage]),
                           os.path.join(workdir, stage), wrt=wrt, name=stage,
                           seed=cfg.seed, checkpoint_every=cfg.checkpoint_every,
                           log_every=cfg.log_every, pad_id=pad, mesh=mesh,
                           on_nonfinite=cfg.get("nonfinite", "skip"))
        elif stage == "sft":
            if not hasattr(model, "emit_config"):
                ecfg = EMITConfig(**{k: v for k, v in cfg.emit.items()})
                model = EMIT.create(model, ecfg, tokenizer=tokenizer, rngs=nnx.Rngs(cfg.seed))
            wrt = stage1_trainable()
            sft_tasks = tuple(cfg.sft.get("tasks", ()))
            sft_records = [r for r in records["sft"] if not sft_tasks or r["task_type"] in sft_tasks]
            fresh = int(cfg.sft.get("fresh_datasets", 0))
            if _embedded_only(cfg, "[sft] sft.fresh_datasets", fresh):
                # AD questions on further embedded datasets: no image repeats (configs)
                import random

                from emit_jax.training.data import fresh_records

                t_fresh = time.time()
                sft_records = sft_records + fresh_records(
                    range(cfg.data.seed + 1, cfg.data.seed + 1 + fresh), **_question_options(cfg))
                random.Random(cfg.seed).shuffle(sft_records)
                _log(f"[sft] {len(sft_records)} records with the AD questions of {fresh} fresh "
                     f"embedded datasets (seeds {cfg.data.seed + 1}-{cfg.data.seed + fresh}, "
                     f"{time.time() - t_fresh:.0f} s)")
            if cfg.sft.get("think", False):
                from emit_jax.training.data import think_records

                sft_records = think_records(sft_records)
            info = run_sft(model, sft_records, tokenizer,
                           _pipeline(model, cfg, train=True, with_answer=True), _optim(cfg.sft),
                           os.path.join(workdir, "sft"), wrt=wrt, name="sft", seed=cfg.seed,
                           checkpoint_every=cfg.checkpoint_every, log_every=cfg.log_every,
                           pad_id=pad, mesh=mesh, on_nonfinite=cfg.get("nonfinite", "skip"))
        elif stage == "sft2":  # the ablation: stage 2 by SFT (same LoRA / trainable set as GRPO)
            from emit_jax.data.pipeline import RecordEncoder, collate
            from emit_jax.training.data import with_rationales
            from emit_jax.training.grpo import apply_lora, merge_lora, trainable_filter

            recs2 = with_rationales(records["grpo"])
            pcfg = _pipeline(model, cfg, train=True, with_answer=True)
            import numpy as np

            sample = collate([RecordEncoder(tokenizer, pcfg)(recs2[0], np.random.default_rng(0))],
                             pcfg, pad)
            policy = apply_lora(model, sample, cfg.grpo.lora, seed=cfg.seed)
            info = run_sft(policy, recs2, tokenizer, pcfg, _optim(cfg.sft2),
                           os.path.join(workdir, "sft2"), wrt=trainable_filter(), name="sft2",
                           seed=cfg.seed, checkpoint_every=cfg.checkpoint_every,
                           log_every=cfg.log_every, pad_id=pad, mesh=mesh,
                           on_nonfinite=cfg.get("nonfinite", "skip"))
            model = merge_lora(policy, model)
            model.eval()
        elif stage == "grpo":
            from emit_jax.training.grpo import run_grpo

            model, info = run_grpo(model, records[cfg.grpo.get("records", "grpo")], tokenizer, cfg,
                                   os.path.join(workdir, "grpo"), mesh=mesh)
        else:
            raise ValueError(f"unknown stage {stage!r} (warmup, base, sft, sft2, grpo)")
        info["seconds"] = time.time() - t0
        _finish_stage(workdir, stage, model, info)
        results["stages"][stage] = info
        _log(f"[{stage}] finished in {info['seconds']:.0f}s")
    # the held-out evaluations' shared answering options (test split, unseen datasets)
    eval_kw = dict(max_tiles=cfg.data.max_tiles, think=_eval_think(cfg),
                   max_new_tokens=cfg.eval_max_new_tokens, mesh=mesh)
    if model is not None and cfg.eval_limit:
        from emit_jax.data.mmad import paper_task_name
        from emit_jax.eval.scoring import format_table
        from emit_jax.evaluate import evaluate_records

        model.eval()
        summary, rows = evaluate_records(model, tokenizer, records["test"], limit=cfg.eval_limit,
                                         root=source, **eval_kw)
        table = format_table(summary, title=f"held-out test split ({len(rows)} questions)")
        results.update(test_average=summary.average["Average"],
                       test_tasks={paper_task_name(t): summary.average[t] for t in summary.tasks},
                       test_table=table, answers=rows)
        if parallel.is_primary():
            print(table, flush=True)
            from emit_jax.training.metrics import plot_table

            header = ["Task"] + [paper_task_name(t) for t in summary.tasks] + ["Average"]
            plot_table([["accuracy %"] + [f"{summary.average[t]:.1f}" for t in summary.tasks]
                        + [f"{summary.average['Average']:.1f}"]], header,
                       os.path.join(workdir, "results.png"),
                       title=f"held-out test split ({len(rows)} questions)")
    unseen = int(cfg.get("eval_unseen", 0))
    if model is not None and _embedded_only(cfg, "[eval] eval_unseen", unseen):
        from emit_jax.data.mmad import paper_task_name
        from emit_jax.eval.scoring import format_table
        from emit_jax.evaluate import evaluate_records
        from emit_jax.training.data import UNSEEN_SEED0, unseen_records

        t_unseen = time.time()
        model.eval()
        recs_u = unseen_records(unseen, **_question_options(cfg))
        limit_u = int(cfg.get("eval_unseen_limit", 0))
        subset = 0 < limit_u < len(recs_u)
        if subset:  # a fixed random subset (all classes, both labels)
            import random

            random.Random(UNSEEN_SEED0).shuffle(recs_u)
            recs_u = recs_u[:limit_u]
        summary_u, rows_u = evaluate_records(model, tokenizer, recs_u, **eval_kw)
        title = (f"held-out: {unseen} embedded dataset(s) no stage saw (seeds {UNSEEN_SEED0}-"
                 f"{UNSEEN_SEED0 + unseen - 1}), {len(rows_u)} questions"
                 f"{' (a fixed random subset)' if subset else ''}, "
                 f"{time.time() - t_unseen:.0f} s")
        table_u = format_table(summary_u, title=title)
        results.update(unseen_tasks={paper_task_name(t): summary_u.average[t]
                                     for t in summary_u.tasks},
                       unseen_questions=len(rows_u), unseen_table=table_u)
        if parallel.is_primary():
            print(table_u, flush=True)
    if model is not None and cfg.get("eval_adfm", 0) and "adfm_test" in records:
        from emit_jax.evaluate import evaluate_adfm

        model.eval()
        adfm_summary, adfm_rows = evaluate_adfm(
            model, tokenizer, records["adfm_test"], limit=int(cfg.eval_adfm),
            max_tiles=cfg.data.max_tiles, mesh=mesh,
            max_new_tokens=int(cfg.get("eval_adfm_tokens") or cfg.grpo.max_new_tokens))
        results.update(adfm_test=adfm_summary, adfm_answers=adfm_rows)
        if parallel.is_primary():
            print("AD-FM held-out (" + ", ".join(
                f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                for k, v in adfm_summary.items()) + ")", flush=True)
    if model is not None and cfg.export_hf and not os.path.isdir(os.path.join(workdir, "hf")):
        from emit_jax import hf

        parallel.replicate_module(model, mesh)  # every process: a collective
        if parallel.is_primary():
            hf.save(model, os.path.join(workdir, "hf"), assets_from=os.path.join(workdir, "tokenizer"))
            _log(f"[export] {workdir}/hf")
    results["seconds"] = time.time() - t_start
    if parallel.is_primary():
        from emit_jax.fileio import atomic_output
        from emit_jax.training.metrics import plot_curves

        if plot_curves(workdir, os.path.join(workdir, "curves.png")):
            _log(f"[plots] {workdir}/curves.png, {workdir}/results.png")
        with atomic_output(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)
    parallel.barrier("run_done")
    return results


def _compile_cache(cfg) -> None:
    """Turn on JAX's persistent compilation cache at ``cfg.compile_cache`` (unless
    ``$JAX_COMPILATION_CACHE_DIR`` chose one already, or the key is empty)."""
    path = cfg.get("compile_cache", "")
    if os.environ.get("JAX_COMPILATION_CACHE_DIR") or not path:
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every write at INFO
    cfg = _CONFIG.value
    if cfg is None:
        raise app.UsageError("--config is required (e.g. --config configs/grpo.py)")
    workdir = _WORKDIR.value or os.path.join(
        "runs", os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0])

    def on_term(signum, frame):  # SIGTERM: stop like Ctrl-C; the last checkpoint is complete
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    _compile_cache(cfg)
    from emit_jax import cli, parallel
    from emit_jax.models.config import ConfigError
    from emit_jax.models.memory import memory_options
    from emit_jax.training.nonfinite import NonFiniteError
    from emit_jax.training.validate import validate_config

    try:
        try:
            parallel.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
        except ValueError as e:  # inconsistent multihost arguments
            raise ConfigError(str(e)) from None
        validate_config(cfg)  # after initialize: the mesh is checked against every device
        with memory_options(**dict(cfg.get("memory") or {})):
            run(cfg, workdir)
    except KeyboardInterrupt as e:
        _log(f"interrupted ({e}); rerun the same command to resume from the last checkpoint")
        sys.exit(130)
    except cli.USER_ERRORS as e:  # bad config, data, checkpoint or path: one line, exit 2
        _log(f"emit_jax.train: error: {cli.message(e)}")
        sys.exit(2)
    except NonFiniteError as e:  # the non-finite policy stopped the run; its last good step is saved
        _log(f"emit_jax.train: error: {cli.message(e)}")
        sys.exit(3)


if __name__ == "__main__":
    app.run(main)
