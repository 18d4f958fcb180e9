"""Checking a training config before anything is built.

``python -m emit_jax.train`` calls :func:`validate_config` first, so a bad value (a negative or
NaN learning rate, ``grpo.G`` below 2, an unknown stage or reward, a mesh that does not fit the
devices, a batch that does not split over the mesh's batch shards, a missing data folder) is one
line naming the key, not a traceback minutes into a run::

    emit_jax.train: error: config grpo.G: 1 is below 2 (GRPO compares G >= 2 completions per prompt)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

from emit_jax.errors import ConfigError
from emit_jax.limits import INT_MAX, MAX_TILES, MAX_TOKENS
from emit_jax.ops import kernels
from emit_jax.training.config import (SFT_STAGES, STAGES, GRPOConfig, OptimConfig, check_float,
                                      check_int, fail as _fail)

DTYPES = ("float32", "bfloat16", "float16")


def _get(section, key: str, path: str, default=...):
    if key in section:
        return section[key]
    if default is ...:
        raise ConfigError(f"config {path}: missing")
    return default


def _int(section, key: str, path: str, *, low: int | None = None, high: int = INT_MAX,
         default=...):
    return check_int(path, _get(section, key, path, default), low=low, high=high)


@dataclasses.dataclass(frozen=True)
class Settings:
    """The typed settings of a validated config: each listed stage's :class:`OptimConfig`
    (SFT-type stages) and the :class:`GRPOConfig` (``grpo``, and ``sft2``'s LoRA)."""
    stages: tuple[str, ...]
    optim: dict[str, OptimConfig]
    grpo: GRPOConfig | None
    #: keys of the config no shipped config has (a typo in a config file: ``base.stepz``)
    unknown: tuple[str, ...] = ()

    def warnings(self) -> list[str]:
        """``warning:`` lines for valid but surprising values: a learning rate above
        :data:`LR_WARN` (an AdamW step moves every weight by about the learning rate, so the
        run diverges at once; a typo such as ``1e3`` for ``1e-3``), a ``micro_batch_size``
        larger than the step's rows (it has no effect)."""
        lrs = [(f"{s}.lr", o.lr) for s, o in self.optim.items()]
        if self.grpo is not None:
            lrs.append(("grpo.lr", self.grpo.lr))
        out = [f"warning: config {key}={lr:g} is above {LR_WARN:g}: each AdamW step moves every "
               f"weight by about that much and training diverges{_typo_hint(lr)}"
               for key, lr in lrs if lr > LR_WARN]
        micro = [(f"{s}.micro_batch_size", o.micro_batch_size, o.batch_size, f"{s}.batch_size")
                 for s, o in self.optim.items()]
        if self.grpo is not None:
            micro.append(("grpo.micro_batch_size", self.grpo.micro_batch_size, self.grpo.rows,
                          "grpo.prompts_per_step x grpo.G"))
        out += [f"warning: config {key}={mb} is larger than a step's {rows} rows ({what}): the "
                f"whole batch is one micro-batch, as with 0" for key, mb, rows, what in micro
                if mb > rows]
        out += [unknown_key_line(key) for key in self.unknown]
        return out


@functools.cache
def known_keys() -> frozenset[str]:
    """Every key (dotted) of every shipped config (``emit_jax/configs``, each variant): the
    settings some part of the trainer reads."""
    import importlib
    import pkgutil

    from emit_jax import configs

    keys: set[str] = set()
    for mod in pkgutil.iter_modules(configs.__path__):
        get = getattr(importlib.import_module(f"emit_jax.configs.{mod.name}"), "get_config", None)
        for variant in (None, "smoke", "plain"):
            try:
                keys |= set(_flat_keys(get(variant))) if get else set()
            except (ValueError, ConfigError):  # a variant that config does not have
                pass
    return frozenset(keys)


def _flat_keys(cfg, prefix: str = "") -> list[str]:
    """The dotted keys of a ConfigDict's leaves (sections recursed into)."""
    out = []
    for k, v in cfg.items():
        if hasattr(v, "items") and not isinstance(v, dict):
            out += _flat_keys(v, f"{prefix}{k}.")
        else:
            out.append(prefix + k)
    return out


def unknown_keys(cfg) -> tuple[str, ...]:
    """The keys of ``cfg`` no shipped config has: each would be silently ignored."""
    known = known_keys()
    return tuple(k for k in _flat_keys(cfg) if k not in known)


def unknown_key_line(key: str) -> str:
    """The ``warning:`` line for a config key no shipped config has."""
    return f"warning: config {key}: no such setting, nothing reads it{_did_you_mean(key)}"


def _did_you_mean(key: str) -> str:
    import difflib

    close = difflib.get_close_matches(key, sorted(known_keys()), n=1, cutoff=0.8)
    return f" (did you mean {close[0]}?)" if close else ""


#: learning rates above this are warned about (the embedded default's highest is 1e-2)
LR_WARN = 0.1


def _typo_hint(lr: float) -> str:
    """``1000.0`` -> ``' (did you mean 1e-3?)'``: a power of ten whose exponent lost its sign."""
    import math

    e = round(math.log10(lr))
    return f" (did you mean 1e-{e}?)" if e > 0 and math.isclose(lr, 10.0 ** e) else ""


def check_kernels_and_mesh(cfg) -> None:
    """``kernels.*`` and ``mesh.*`` as train reads them (the names, the sizes), without the
    devices: what ``plan`` checks of them (before: ``plan --set kernels.attention=flash3`` or
    ``mesh.fsdp=0`` planned without a word)."""
    from emit_jax import parallel

    _kernels(cfg)
    spec = dict(cfg.mesh) if "mesh" in cfg and cfg.mesh is not None else None
    try:
        parallel.parse_mesh(spec)
    except ValueError as e:
        raise ConfigError(f"config mesh: {e}") from None


def _mesh(cfg, stages, num_devices: int | None) -> None:
    """The mesh must parse and fit the devices; each stage's batch must split over its
    ``data x fsdp`` batch shards (``parallel.batch_spec`` shards the batch axis over them)."""
    from emit_jax import parallel

    spec = dict(cfg.mesh) if "mesh" in cfg and cfg.mesh is not None else None
    try:
        parallel.parse_mesh(spec)
        if num_devices is None:
            import jax

            num_devices = jax.device_count()
        shape = dict(zip(parallel.MESH_AXES, parallel.mesh_shape(spec, num_devices)))
    except ValueError as e:
        raise ConfigError(f"config mesh: {e}") from None
    if "grpo" in stages:
        _sampler_mesh(cfg.grpo, num_devices)
    check_batch_split(cfg, stages, shape, num_devices)


def check_batch_split(cfg, stages, shape: dict, num_devices: int) -> None:
    """Each of ``stages``' batches (and micro-batches) must split over the ``data x fsdp``
    batch shards of the mesh ``shape`` (``{axis: size}``): a one-line ``ConfigError`` if not.
    ``emit_jax.plan`` checks its ``--mesh`` with it too (twenty-ninth probe S1: it planned each
    of 3 devices as holding the whole 32-row batch)."""
    from emit_jax import parallel

    shards = math.prod(shape[a] for a in parallel.BATCH_AXES)
    if shards == 1:
        return
    how = " x ".join(f"{a} {shape[a]}" for a in parallel.BATCH_AXES)
    for s in stages:
        if s == "grpo":
            p, G = int(cfg.grpo.prompts_per_step), int(cfg.grpo.G)
            n, what = p * G, f"grpo.prompts_per_step x grpo.G: {p} x {G} = {p * G} sequences"
        else:
            n = int(cfg[s].batch_size)
            what = f"{s}.batch_size: {n} rows"
        if n % shards:
            raise ConfigError(f"config {what} do not split over the mesh's {shards} batch "
                              f"shards ({how} of {num_devices} devices); use a multiple of "
                              f"{shards} or change config.mesh")
        mb = int((cfg.grpo if s == "grpo" else cfg[s]).get("micro_batch_size", 0) or 0)
        if 0 < mb < n and mb % shards:
            raise ConfigError(f"config {s}.micro_batch_size: {mb} rows per micro-batch do not "
                              f"split over the mesh's {shards} batch shards ({how} of "
                              f"{num_devices} devices); use a multiple of {shards}")


def _sampler_mesh(grpo, num_devices: int) -> None:
    """``grpo.sampler.mesh='replicated'`` splits a step's sequences over every device."""
    if (grpo.get("sampler") or {}).get("mesh") != "replicated":
        return
    rows = int(grpo.prompts_per_step) * int(grpo.G)
    if rows % num_devices:
        raise ConfigError(f"config grpo.sampler.mesh: 'replicated' splits the {rows} sequences "
                          f"of a step (grpo.prompts_per_step x grpo.G) over all {num_devices} "
                          f"devices, which they do not divide; use a multiple of {num_devices} "
                          f"or 'learner' / 'tensor'")


def host_memory_bytes() -> int | None:
    """This host's physical memory in bytes (None where the system does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, OSError, ValueError):
        return None


def _batch_fits_host(cfg, stages, image_size: int, memory: int | None = None) -> None:
    """A step whose images alone cannot fit in this host's memory is refused before any stage
    runs (before: the run built the data and trained the stages before it, then failed in the
    GRPO stage). The floor counted: each row's (GRPO: each prompt's) two images, the query and
    its reference, as one ``3 x image_size^2`` bfloat16 tile each, a fraction of what the step
    really holds."""
    memory = host_memory_bytes() if memory is None else memory
    if not memory:
        return
    tile = 3 * image_size * image_size * 2
    for s in stages:
        if s == "grpo":
            rows = int(cfg.grpo.prompts_per_step)  # its G completions share the images
            what = f"grpo.prompts_per_step: {rows} prompts"
        elif s in cfg and cfg[s] is not None and "batch_size" in cfg[s]:
            rows = int(cfg[s].batch_size)
            what = f"{s}.batch_size: {rows} rows"
        else:
            continue
        need = rows * 2 * tile
        if need > memory:
            raise ConfigError(
                f"config {what} need at least {need / 2**30:,.0f} GiB for the step's images "
                f"alone (2 images of 3 x {image_size} x {image_size} each), more than this "
                f"host's {memory / 2**30:,.0f} GiB of memory; use fewer rows (python -m "
                "emit_jax.plan estimates a config's memory)")


def starting_config(cfg):
    """``(model config, where)``: the model a run of ``cfg`` starts from, before any weight is
    read: ``init_from``'s Hugging Face ``config.json``, else the architecture's (``param_dtype``
    and ``image_size`` applied; a ``param_dtype`` no model takes raises ``ConfigError``).
    ``where`` names it for messages (``init_from DIR``, ``arch 'tiny'``). The config is None for an Orbax ``init_from`` (its config is read when it
    loads), for a ``config.json`` that cannot be read (the load says why) and for an unknown
    architecture (refused by :func:`validate_config`). One reading for the checks of the
    context (:func:`check_context`, ``stages.check_prompt_room``) and for
    ``stages.build_initial_model``."""
    from emit_jax import hf
    from emit_jax.errors import USER_ERRORS
    from emit_jax.models import architectures

    dtype = cfg.get("param_dtype") or ""
    if dtype not in DTYPES + ("",):  # train, plan and aot alike (before: a ValueError traceback)
        _fail("param_dtype", dtype, f"is not one of {DTYPES} (or '' for the stored dtypes)")
    init_from = cfg.get("init_from") or ""
    if init_from:
        where = f"init_from {init_from}"
        if not os.path.isfile(os.path.join(init_from, "config.json")):
            return None, where
        try:
            return hf.read_config(init_from)[0], where
        except USER_ERRORS:
            return None, where
    where = f"arch {cfg.get('arch')!r}"
    if cfg.get("arch") not in architectures.ARCHITECTURES:
        return None, where
    mcfg = architectures.get_config(cfg.arch, **({"dtype": cfg.param_dtype}
                                                 if cfg.get("param_dtype") else {}))
    if cfg.get("image_size"):
        mcfg = mcfg.replace(vision=dataclasses.replace(mcfg.vision, image_size=cfg.image_size))
    return mcfg, where


def check_context(cfg, stages) -> None:
    """:func:`_fits_context` against the model ``cfg`` starts from (:func:`starting_config`);
    also for the commands that plan or compile a config (``plan``, ``aot``: before, they
    planned a generation train refuses)."""
    mcfg, where = starting_config(cfg)
    if mcfg is not None:
        _fits_context(cfg, stages, mcfg.text.max_position_embeddings, where)


def _fits_context(cfg, stages, context: int, model: str) -> None:
    """A generation longer than the model's context (``max_position_embeddings``: the positions
    this port supports) is refused before the run starts (before:
    ``grpo.max_new_tokens=1048576`` built the data, made the workdir, trained the stages before
    GRPO, then failed allocating its cache). Counted: the new tokens alone, a floor (the prompt
    comes on top)."""
    asked = []
    if "grpo" in stages:
        asked.append(("grpo.max_new_tokens", cfg.grpo.get("max_new_tokens")))
    if cfg.get("eval_adfm_tokens"):
        asked.append(("eval_adfm_tokens", cfg.eval_adfm_tokens))
    if cfg.get("eval_limit", 0) or cfg.get("eval_unseen", 0):
        asked.append(("eval_max_new_tokens", cfg.get("eval_max_new_tokens")))
    for key, n in asked:
        if isinstance(n, int) and not isinstance(n, bool) and n >= context:
            _fail(key, n, f"new tokens do not fit the model's context: {model} holds "
                  f"{context:,} positions (max_position_embeddings), the prompt included")


def check_length_buckets(cfg) -> tuple[int, ...]:
    """``data.length_buckets``: increasing positive integers up to ``limits.MAX_TOKENS``; also
    what ``plan`` and ``aot`` size prompts by (eighteenth probe K3: ``(1024, 512)`` was planned,
    and fitted, where train refuses it)."""
    data = _get(cfg, "data", "data", None) or {}
    buckets = tuple(_get(data, "length_buckets", "data.length_buckets"))
    if not buckets or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in buckets) \
            or list(buckets) != sorted(set(buckets)):
        _fail("data.length_buckets", buckets, "must be increasing positive integers")
    if buckets[-1] > MAX_TOKENS:
        _fail("data.length_buckets", buckets, f"reaches above {MAX_TOKENS} tokens")
    return buckets


def check_options(cfg) -> None:
    """``memory.*`` and ``kernels.*``, as :func:`validate_config` words them: train checks them
    before it builds the trace-time options from them (which raised in their own words)."""
    mem = _get(cfg, "memory", "memory", None) or {}
    _int(mem, "attention_chunk", "memory.attention_chunk", low=0, default=0)
    _int(mem, "vit_chunk", "memory.vit_chunk", low=0, default=0)
    from emit_jax.models.memory import REMAT_POLICIES

    if mem.get("remat_policy", "full") not in REMAT_POLICIES:
        _fail("memory.remat_policy", mem["remat_policy"],
              f"must be one of {', '.join(REMAT_POLICIES)}")
    _kernels(cfg)


def _kernels(cfg) -> None:
    """``kernels.*``: the names ``emit_jax.ops.kernels`` knows, a positive decode bucket."""
    k = _get(cfg, "kernels", "kernels", None) or {}
    for key, allowed in (("attention", kernels.ATTENTION), ("decode", kernels.DECODE)):
        if key in k and k[key] not in allowed:
            _fail(f"kernels.{key}", k[key], f"must be one of {', '.join(allowed)}")
    _int(k, "decode_bucket", "kernels.decode_bucket", low=1, high=MAX_TOKENS, default=64)


def stage_settings(cfg, stages) -> tuple[dict[str, OptimConfig], GRPOConfig | None]:
    """The typed settings of the stage sections ``stages`` name (each checked: a negative batch,
    a learning rate that is no number raise :class:`ConfigError` naming the key): each SFT-type
    stage's :class:`OptimConfig`, and the :class:`GRPOConfig` when ``grpo`` or ``sft2`` (its
    LoRA) is among them. What ``plan`` checks of the stages it plans, as train does."""
    optim = {s: OptimConfig.from_section(cfg[s], s) for s in stages if s in SFT_STAGES}
    grpo = None
    if "grpo" in stages or "sft2" in stages:
        if "sft2" in stages and ("grpo" not in cfg or "lora" not in cfg.grpo):
            raise ConfigError("config stages: 'sft2' uses grpo.lora, but the config has none")
        grpo = GRPOConfig.from_section(cfg.grpo)
    return optim, grpo


def check_emit(cfg, stages) -> None:
    """The ``emit`` section, each bad field named (``config emit.num_soft_tokens: -3 is below
    0``); checked even when no stage reads it (a typo waits for the run that adds stage 1)."""
    if not ("emit" in cfg or "sft" in stages or "sft2" in stages or "grpo" in stages):
        return
    from emit_jax.models.emit import EMITConfig

    try:
        EMITConfig(**dict(_get(cfg, "emit", "emit"))).validate()
    except (TypeError, ValueError) as e:
        import re

        raise ConfigError(f"config emit.{e}" if re.match(r"\w+: ", str(e))
                          else f"config emit: {e}") from None


def check_stages(cfg) -> tuple[str, ...]:
    """``cfg.stages`` as a tuple, checked: known stages, each with its section, none repeated,
    in the order of :data:`STAGES` (else :class:`ConfigError` naming ``stages``). What train,
    plan and aot refuse alike."""
    stages = _get(cfg, "stages", "stages")
    if isinstance(stages, str) or not stages:
        _fail("stages", stages, f"must be a non-empty tuple of stage names from {STAGES}")
    stages = tuple(stages)
    for s in stages:
        if s not in STAGES:
            _fail("stages", stages, f"names unknown stage {s!r}; known: {', '.join(STAGES)}")
        if s not in cfg or cfg[s] is None:
            _fail("stages", stages, f"lists {s!r} but the config has no {s} section")
    if len(set(stages)) != len(stages):
        _fail("stages", stages, "repeats a stage")
    if list(stages) != sorted(stages, key=STAGES.index):
        _fail("stages", stages, f"is out of order: each stage builds on the one before, in the "
              f"order {', '.join(STAGES)}")
    return stages


def check_vision_init(cfg, arch: str) -> None:
    """``vision_init`` (``training.vision_init``; read only without ``init_from``): ``""``,
    ``"embedded"`` (an architecture with ``tiny``'s ViT) or an existing file or folder."""
    from emit_jax.models import architectures

    source = cfg.get("vision_init") or ""
    if not isinstance(source, str):
        _fail("vision_init", source, "must be '', 'embedded' or a path")
    if source == "embedded" and \
            architectures.ARCHITECTURES[arch]().vision != architectures.get_config("tiny").vision:
        _fail("vision_init", source, f"is the packaged ViT of architecture 'tiny'; arch {arch!r} "
              "has another ViT (give a .safetensors file or model folder of its ViT, or '')")
    if source and source != "embedded" and not os.path.exists(source):
        _fail("vision_init", source, "is not a file or folder (give 'embedded', a "
              ".safetensors file of a vision tower or a model folder)")


def validate_config(cfg, *, num_devices: int | None = None) -> Settings:
    """Raise :class:`ConfigError` naming the first key of the training config ``cfg`` (an
    ``ml_collections.ConfigDict`` as in ``configs/``) that has a bad value; return None if all
    is well. ``num_devices``: the device count the mesh is checked against (default
    ``jax.device_count()``). Nothing is built, loaded or written."""
    from emit_jax.models import architectures

    stages = check_stages(cfg)
    optim, grpo = stage_settings(cfg, stages)
    from emit_jax.training.data import WARMUP_HINTS

    if "warmup" in cfg and cfg.warmup is not None and \
            cfg.warmup.get("hint", "statement") not in WARMUP_HINTS:
        _fail("warmup.hint", cfg.warmup.hint, "must be 'statement' or 'map'")
    uses_adfm = ("grpo" in stages and cfg.grpo.get("records", "grpo") == "adfm") or \
        ("base" in stages and cfg.base.get("adfm", False)) or bool(cfg.get("eval_adfm", 0))
    if uses_adfm and not ("data" in cfg and cfg.data.get("adfm", False)):
        _fail("data.adfm", False, "must be True when grpo.records='adfm', base.adfm=True or "
              "eval_adfm > 0 (the AD-FM records are only built then)")
    if "grpo" in stages and cfg.grpo.get("records", "grpo") == "adfm" and \
            cfg.grpo.get("instruction", "think") == "direct":
        _fail("grpo.instruction", "direct", "must be 'think' when grpo.records='adfm' (AD-FM's "
              "prompts ask for staged reasoning and a box, not a letter alone)")
    check_emit(cfg, stages)

    # model and data sources
    init_from = _get(cfg, "init_from", "init_from", "")
    image_size = 448  # InternVL's tile side: a checkpoint's own is read when it is loaded
    if init_from:
        if not os.path.isdir(init_from):
            _fail("init_from", init_from, "is not a folder (an HF folder or an emit_jax checkpoint)")
    else:
        arch = _get(cfg, "arch", "arch")
        if arch not in architectures.ARCHITECTURES:
            _fail("arch", arch, f"is not a known architecture {sorted(architectures.ARCHITECTURES)}")
        size = _int(cfg, "image_size", "image_size", low=0, default=0)
        vision = architectures.ARCHITECTURES[arch]().vision
        if size and size % vision.patch_size:
            _fail("image_size", size, f"is not a multiple of the patch size {vision.patch_size}")
        image_size = size or vision.image_size
        check_vision_init(cfg, arch)
    check_context(cfg, stages)  # the model's context, once init_from or arch is known good
    tok = _get(cfg, "tokenizer", "tokenizer", "")
    if tok and not os.path.isdir(tok):
        _fail("tokenizer", tok, "is not a folder")
    data = _get(cfg, "data", "data")
    source = _get(data, "source", "data.source")
    if not isinstance(source, str) or not source:
        _fail("data.source", source, "must be 'embedded' or a dataset folder "
              "(--config.data.source=DIR)")
    if source != "embedded" and not os.path.isdir(source):
        _fail("data.source", source, "is not a folder (expected an MVTec-AD-style dataset)")
    max_tiles = check_int("data.max_tiles", _get(data, "max_tiles", "data.max_tiles"), low=1,
                          high=MAX_TILES)
    if grpo is not None:  # the rollout's tile bucket: 2 images x max_tiles per completion
        check_int("grpo.prompts_per_step x grpo.G x 2 x data.max_tiles",
                  grpo.rows * 2 * max_tiles)
    _int(data, "seed", "data.seed", low=0, default=0)  # the embedded dataset's seeds are >= 0
    _int(data, "dk_sentences", "data.dk_sentences", low=0, default=0)  # 0: the whole text
    from emit_jax.data.tasks import AD_ORDERS
    from emit_jax.training.data import ANSWER_FORMS, RATIONALES

    if data.get("ad_order", "shuffled") not in AD_ORDERS:
        _fail("data.ad_order", data.ad_order, f"must be one of {AD_ORDERS}")
    if data.get("rationale", "brief") not in RATIONALES:
        _fail("data.rationale", data.rationale, f"must be one of {RATIONALES}")
    if data.get("answers", "letter") not in ANSWER_FORMS:
        _fail("data.answers", data.answers, f"must be one of {ANSWER_FORMS}")
    check_float("data.zoom", _get(data, "zoom", "data.zoom", 0.0), low=0.0, high=1.0)
    layers = data.get("zoom_layers", ()) or ()
    if isinstance(layers, (str, int)) or not all(isinstance(b, int) and not isinstance(b, bool)
                                                 and b >= 1 for b in layers):
        _fail("data.zoom_layers", layers, "must be a tuple of ViT block numbers (1 = the first)")
    if not isinstance(data.get("peak_region", False), bool):
        _fail("data.peak_region", data.peak_region, "must be True or False")
    for s in ("sft", "base"):
        if s not in cfg or s not in stages:
            continue
        from emit_jax.training.data import UNSEEN_SEED0

        if _int(cfg[s], "fresh_datasets", f"{s}.fresh_datasets", low=0,
                default=0) >= UNSEEN_SEED0 - int(data.get("seed", 0)):
            _fail(f"{s}.fresh_datasets", cfg[s].fresh_datasets, "would reach the seeds of the "
                  f"unseen evaluation datasets ({UNSEEN_SEED0} on, eval_unseen)")
    if "base" in cfg and "base" in stages:
        check_float("base.fresh_direct", _get(cfg.base, "fresh_direct", "base.fresh_direct", 0.0),
                    low=0.0, high=1.0)
        if not isinstance(cfg.base.get("emit", False), bool):
            _fail("base.emit", cfg.base.emit, "must be True or False")
    from emit_jax.data.prompts import TASKS

    # task filters of the stages (before: an unknown name left a stage with no records, a
    # ValueError traceback after the data was built)
    for s, key in (("base", "fresh_tasks"), ("warmup", "tasks"), ("sft", "tasks"),
                   ("sft", "fresh_tasks")):
        if s in stages:
            picked = cfg[s].get(key, ()) or ()
            if isinstance(picked, str) or any(t not in TASKS for t in picked):
                _fail(f"{s}.{key}", picked, f"must be a tuple of task names from {TASKS}")
    if "sft" in stages and cfg.sft.get("fresh_shares", ()):
        shares = cfg.sft.fresh_shares
        asked = tuple(cfg.sft.get("fresh_tasks", ()) or ("anomaly_discrimination",))
        if isinstance(shares, str) or len(shares) != len(asked):
            _fail("sft.fresh_shares", shares, f"must be a tuple of {len(asked)} shares, one per "
                  f"task of sft.fresh_tasks {asked}")
        for share in shares:
            check_float("sft.fresh_shares", share, low=0.0, high=1.0)
    buckets = check_length_buckets(cfg)
    soft = cfg.emit.get("num_soft_tokens", 0) if "emit" in cfg and cfg.emit is not None else 0
    if set(stages) & {"sft", "sft2", "grpo"} and isinstance(soft, int) and soft > buckets[-1]:
        # (before: found minutes in, when stage 1 built its first batch)
        _fail("emit.num_soft_tokens", soft, f"is longer than the longest prompt "
              f"(data.length_buckets ends at {buckets[-1]} tokens)")
    _int(cfg, "seed", "seed", low=0)
    _int(cfg, "eval_adfm", "eval_adfm", low=0, default=0)
    if cfg.get("eval_adfm_tokens") is not None:  # 0 / None: grpo.max_new_tokens
        _int(cfg, "eval_adfm_tokens", "eval_adfm_tokens", low=0)
    _int(cfg, "checkpoint_every", "checkpoint_every", low=1)
    _int(cfg, "log_every", "log_every", low=1)
    from emit_jax.training.loop import POLICIES

    policy = _get(cfg, "nonfinite", "nonfinite", "skip")
    if policy not in POLICIES:
        _fail("nonfinite", policy, f"must be one of {', '.join(POLICIES)}")
    if cfg.get("eval_instruction", "direct") not in ("direct", "think"):
        _fail("eval_instruction", cfg.eval_instruction, "must be 'direct' or 'think'")
    if _int(cfg, "eval_limit", "eval_limit", low=0, default=0) + \
            _int(cfg, "eval_unseen", "eval_unseen", low=0, default=0):
        _int(cfg, "eval_unseen_limit", "eval_unseen_limit", low=0, default=0)
        from emit_jax.data.prompts import TASKS

        asked = cfg.get("eval_unseen_tasks", ()) or ()
        if isinstance(asked, str) or any(t not in TASKS for t in asked):
            _fail("eval_unseen_tasks", asked, f"must be a tuple of task names from {TASKS}")
        _int(cfg, "eval_max_new_tokens", "eval_max_new_tokens", low=1)
        _int(cfg, "eval_batch", "eval_batch", low=1, default=1)
    check_options(cfg)
    scan_layers = (_get(cfg, "kernels", "kernels", None) or {}).get("scan_layers", False)
    if not isinstance(scan_layers, bool):
        _fail("kernels.scan_layers", scan_layers, "must be True or False")
    if scan_layers and grpo is not None and grpo.lora.weight_qtype:
        _fail("grpo.lora.weight_qtype", grpo.lora.weight_qtype, "(QLoRA) does not work with "
              "kernels.scan_layers=True (qwix quantizes the kernels inside each layer's first "
              "run, a per-layer copy under lax.scan); use weight_qtype='' or scan_layers=False")
    _mesh(cfg, stages, num_devices)
    _batch_fits_host(cfg, stages, image_size)
    return Settings(stages=stages, optim=optim, grpo=grpo, unknown=unknown_keys(cfg))
