"""The TPU compiler's word on a config before any hardware is rented: the project's real jitted
programs compiled ahead of time for an abstract TPU slice, on this CPU host.

    python -m emit_jax.aot --config configs/internvl3_8b_grpo.py --topology v5p:2x2x1 \
        [--config.key=value ...] [--set key=value] [--mesh fsdp=4] [--stage sft|grpo|...] \
        [--programs a,b] [--prompt_len N] [--label_tokens 128] [--headroom 10] [--hbm GIB] \
        [--json] [--json_out PATH]

Needs libtpu (``pip install -e '.[tpu-aot]'``): ``jax.experimental.topologies`` then describes
a slice (``--topology``: generation and chips per dimension, e.g. ``v5e:2x2``, ``v5e:4x4``,
``v5p:2x2x1``, ``v6e:2x4``) as abstract devices, the config's mesh (``config.mesh`` or
``--mesh``) is laid over them (``emit_jax.parallel.make_mesh``), and every program of the stage
is lowered with the project's shardings (``emit_jax.parallel.sharded_jit.lower``) and compiled by
the TPU compiler. Nothing runs and nothing is allocated: the model, the LoRA policy (qwix's own,
traced) and the optimizer come from one ``nnx.eval_shape``, the batch is ``ShapeDtypeStruct``s.
The heat map's ``auto`` strategy is resolved as on a TPU (on this host it would pick the native
CPU kernel, which a TPU program cannot call). The default stage is the one ``emit_jax.plan``
reports (the largest of ``config.stages``).

Programs (the training code's functions, shardings and memory switches ``config.memory``):

- SFT stages (``warmup``, ``base``, ``sft``, ``sft2``): ``train_step`` =
  ``training.sft.make_train_step(wrt, mesh, micro_batches)`` on ``(model, optimizer, batch)``,
  the batch as ``training.sft.to_device`` makes it from ``data.pipeline.collate``: ``input_ids``
  / ``labels`` / ``attention_mask [B, P]`` int32, ``pixel_values [N, 3, S, S]`` float32,
  ``ce_pixels [M, 2, 3, S, S]`` float32, ``num_ce []`` int32, ``label_pos`` / ``label_ids [B, K]``
  int32 and ``label_mask [B, K]`` bool. B = ``<stage>.batch_size``, P = the largest
  ``data.length_buckets`` (or ``--prompt_len``), K = ``--label_tokens`` (as plan counts them),
  N = the step's image tiles as ``emit_jax.plan`` counts them (2 images per row x
  (``data.max_tiles`` + a thumbnail), padded as the pipeline pads them), M = B CE pairs for the
  EMIT stages (1 padding row otherwise, as collate gives it). ``warmup`` is text only.
- ``grpo``: ``sampler`` = ``ops.sampling._sharded_sample`` under ``sharded_jit`` (prefill into
  the KV cache + the decode loop, as ``generate(..., mesh=mesh)`` runs it) on the policy in eval
  mode: prompts ``[B, P]`` (mask bool), tiles ``[N, 3, S, S]``, CE pairs ``[B, 2, 3, S, S]``, an
  RNG key; ``score`` (reference log-probs) and ``train_step`` (the learner step) =
  ``training.grpo.make_grpo_fns(g, wrt, mesh=mesh, micro_batches)`` on the policy in train mode,
  with the completions ``comp_tokens`` / ``comp_mask [B, max_new_tokens]`` int32, ``adv [B]``,
  ``ref`` / ``old [B, max_new_tokens]`` float32. B = ``prompts_per_step x G``, N padded to a
  multiple of B x 2 x ``max_tiles`` as run_grpo pads it.

With ``<stage>.micro_batch_size`` set, the train step (and GRPO's reference pass) takes its
batch in ``training.micro.split_rows``' layout (:func:`split_layout`), as the training code
feeds it.

Per program and per device (GiB = 2**30 bytes) the compiler's ``memory_analysis``: arguments,
outputs (``sharded_jit`` donates nothing, so a train step's new state exists beside its old
one), temp and generated code; ``xla`` = arguments + outputs - aliased + temp + code. The
``peak`` of the device while the program runs is the larger of that and XLA's own
``peak_memory_in_bytes``, less ``shared args`` (arguments that are one buffer in a run: the
reference's weights are the policy's, which XLA counts twice when both are read), plus ``other
resident`` (arrays the stage keeps on the device that the program does not read: the optimizer
state during the sampler and the reference pass, the reference's own copies of the trained
modules, weights XLA dropped as unused). It is compared with the chip's HBM (``--hbm`` GiB per
device, or by device kind: v5p 95, v5e 16, v6e 32, v4 32 GiB per chip, shared by the devices of
a chip) less ``--headroom`` percent, and with ``emit_jax.plan``'s estimate of the phase
(resident + train for the train step, resident + rollout for the sampler; plan has no phase for
the reference pass, so ``score`` stands beside plan's resident alone, unflagged); a ratio
outside 1 +- 15 % is flagged. A program the compiler refuses for lack of HBM is reported with
the compiler's own figures. Also per program: FLOPs and bytes accessed per device
(``cost_analysis``, which counts a loop's body once, whatever its trip count), how the
executable takes the weights (its ``input_shardings`` of the frozen argument: arrays sharded,
bytes per device, the largest array's spec), which weights it never reads, and whether a
program that runs the LoRA policy reads its adapters.

Errors a user can cause (no libtpu, unknown topology, bad config or override, a mesh that does
not match the topology) print one line ``emit_jax.aot: error: ...`` and exit 2. A program that
fails to trace or compile (other than for HBM) is reported as failed, with where, after the
others, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
import tempfile
import time
from typing import Any, Sequence

from emit_jax.plan import GiB, PlanError

# HBM per chip by jax's device_kind; a chip of several devices (v2-v4 cores) shares it
HBM_PER_CHIP: dict[str, tuple[int, str]] = {
    "TPU v5": (95 * GiB, "TPU v5p chip, 95 GiB HBM2e"),
    "TPU v5p": (95 * GiB, "TPU v5p chip, 95 GiB HBM2e"),
    "TPU v5 lite": (16 * GiB, "TPU v5e chip, 16 GiB HBM2"),
    "TPU v5e": (16 * GiB, "TPU v5e chip, 16 GiB HBM2"),
    "TPU v6 lite": (32 * GiB, "TPU v6e chip, 32 GiB HBM"),
    "TPU v6e": (32 * GiB, "TPU v6e chip, 32 GiB HBM"),
    "TPU v4": (32 * GiB, "TPU v4 chip, 32 GiB HBM2"),
    "TPU v3": (32 * GiB, "TPU v3 chip, 32 GiB HBM"),
    "TPU v2": (16 * GiB, "TPU v2 chip, 16 GiB HBM"),
}
SFT_STAGES = ("warmup", "base", "sft", "sft2")
PROGRAMS = {"sft": ("train_step",), "grpo": ("sampler", "score", "train_step")}
FLAG = 0.15  # plan vs compiler: a ratio outside 1 +- FLAG is flagged
LIBTPU_MISSING = "libtpu is not installed: pip install -e '.[tpu-aot]'"


class AotError(ValueError):
    """Bad input: no libtpu, unknown topology, a mesh that does not fit the slice..."""


# ------------------------------------------------------------------------------ topology
def require_libtpu() -> None:
    if importlib.util.find_spec("libtpu") is None:
        raise AotError(LIBTPU_MISSING)


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (libtpu's C++ start-up warnings about the missing TPU
    hardware, written straight to it) for the duration; Python exceptions pass through."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def topology(name: str):
    """``jax.experimental.topologies.get_topology_desc`` of a TPU slice name (``v5e:2x2``)."""
    require_libtpu()
    if not re.fullmatch(r"[\w.-]+:\d+(x\d+)*", name or ""):
        raise AotError(f"bad --topology {name!r}: expected GENERATION:AxB[xC], e.g. v5e:2x2, "
                       f"v5p:2x2x1, v6e:2x4")
    # libtpu takes /tmp/libtpu_lockfile so that two processes do not drive the same chips;
    # compiling drives none, so several compilations (and a test's children) may run at once
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    try:
        with _quiet_stderr():
            return topologies.get_topology_desc(platform="tpu", topology_name=name)
    except Exception as e:  # noqa: BLE001 - libtpu's own words on a name it does not know
        msg = " ".join(str(e).split())
        what = "unknown topology" if msg.startswith("INVALID_ARGUMENT") else "topology"
        raise AotError(f"{what} {name!r}: {msg.removeprefix('INVALID_ARGUMENT: ')}") from None


def device_capacity(devices, hbm_gib: float | None = None) -> tuple[int, str]:
    """(bytes of HBM per device, where the number comes from): ``hbm_gib`` per device when
    given, else the chip's HBM by device kind over the devices that share a chip."""
    kind = devices[0].device_kind
    if hbm_gib is not None:
        if not hbm_gib > 0:
            raise AotError(f"--hbm {hbm_gib:g}: GiB per device, positive")
        return int(hbm_gib * GiB), f"{kind}, --hbm {hbm_gib:g} GiB per device"
    if kind not in HBM_PER_CHIP:
        raise AotError(f"HBM of {kind!r} devices is not known here; pass --hbm GIB (per device)")
    chip, note = HBM_PER_CHIP[kind]
    per_chip = {}
    for d in devices:
        key = tuple(getattr(d, "coords", (d.id,)))
        per_chip[key] = per_chip.get(key, 0) + 1
    n = max(per_chip.values())
    if n > 1:
        note += f", {n} devices per chip: {chip / n / GiB:g} GiB each"
    return chip // n, note


# ------------------------------------------------------------------------------ abstract run
@dataclasses.dataclass
class Shapes:
    """The step's array shapes, counted as ``emit_jax.plan`` counts them."""
    batch: int  # B, sequences per step
    prompt_len: int  # P
    new_tokens: int  # grpo completions
    label_tokens: int  # K, SFT label positions per row
    tiles: int  # N, image tiles per step (0: text only)
    ce: int  # M, CE pairs per step
    image_size: int  # S
    row_tiles: int = 0  # image tiles of one sequence (before the step's padding)
    micro: int = 1  # micro-batches of the train step (gradient accumulation)


@dataclasses.dataclass
class Abstract:
    """The stage's nodes, abstract (``nnx.eval_shape``), as the training code builds them."""
    model: Any  # the SFT stages' model; grpo: the reference (the stage-1 EMIT model)
    policy: Any  # sft2 / grpo: the LoRA policy (else the model)
    optimizer: Any
    wrt: Any  # the trainable filter
    shared: frozenset  # paths of reference arrays that are the policy's own arrays
    seconds: float


def model_setup(cfg, stage: str):
    """(InternVLConfig, EMITConfig or None) of ``cfg``'s ``stage``: ``emit_jax.plan``'s model
    config; EMIT's options from ``config.emit``, the heat map's strategy resolved as on a TPU
    (``auto`` picks the native CPU kernel on this host, which a TPU program cannot call)."""
    from emit_jax import plan
    from emit_jax.models.emit import EMITConfig
    from emit_jax.ops import heatmap

    emit = stage in plan.EMIT_STAGES
    mcfg = plan.model_config(cfg, emit)
    if not emit:
        return mcfg, None
    fields = {f.name for f in dataclasses.fields(EMITConfig)}
    kw = {k: v for k, v in dict(cfg.get("emit") or {}).items() if k in fields}
    kw["ce_layers"] = tuple(kw["ce_layers"]) if kw.get("ce_layers") else None
    try:
        ecfg = EMITConfig(**kw, comp_token_id=mcfg.text.vocab_size - 1).validate()
    except (TypeError, ValueError) as e:
        raise AotError(f"config emit section: {e}") from None
    grid = mcfg.vision.grid
    if ecfg.heatmap_strategy == "auto":
        ecfg = dataclasses.replace(ecfg, heatmap_strategy=heatmap.choose_strategy(
            grid, grid, ecfg.window_for(grid)))
    return mcfg, ecfg


def _optim_config(cfg, stage: str):
    from emit_jax.training.sft import OptimConfig

    if stage == "grpo":
        g = cfg.grpo
        return OptimConfig(steps=int(g.steps) * int(g.get("iterations", 1)), lr=float(g.lr),
                           warmup_ratio=float(g.warmup_ratio),
                           weight_decay=float(g.weight_decay), b1=0.9, b2=0.95, clip_norm=1.0)
    names = {f.name for f in dataclasses.fields(OptimConfig)}
    return OptimConfig(**{k: v for k, v in dict(cfg[stage]).items() if k in names})


def _make_optimizer(model, ocfg, wrt):
    """The stage's optimizer as its training code builds it (``make_train_state`` where the
    training code has it: trained parameters in float32; else ``nnx.Optimizer``)."""
    from flax import nnx

    from emit_jax.training import sft

    if hasattr(sft, "make_train_state"):
        with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):  # its log line
            return sft.make_train_state(model, ocfg, wrt)
    return nnx.Optimizer(model, sft.make_optimizer(ocfg), wrt=wrt)


def abstract_stage(cfg, stage: str, mcfg, ecfg, seed: int = 0) -> Abstract:
    """Model, LoRA policy and optimizer of ``stage`` inside one ``nnx.eval_shape``: shapes,
    dtypes and logical axes, nothing allocated. LoRA is qwix's own (``training.grpo.apply_lora``)
    traced on a one-row sample; which arrays the policy shares with the reference is read off
    the trace (the same traced value in both)."""
    import numpy as np
    from flax import nnx

    from emit_jax.models.emit import EMIT
    from emit_jax.models.internvl import InternVL
    from emit_jax.train import stage1_trainable
    from emit_jax.training import grpo

    ocfg = _optim_config(cfg, stage)
    if stage in ("warmup", "base"):  # emit_jax.train
        wrt = nnx.Param if cfg[stage].get("train_vision", True) else \
            nnx.All(nnx.Param, nnx.Not(nnx.PathContains("vision_tower")))
    elif stage == "sft":
        wrt = stage1_trainable()
    else:
        wrt = grpo.trainable_filter()
    shared: set = set()

    def build():
        model = InternVL(mcfg, rngs=nnx.Rngs(seed))
        if ecfg is not None:
            model = EMIT(model, ecfg, rngs=nnx.Rngs(seed))
        policy = model
        if stage in ("sft2", "grpo"):  # LoRA traced on a one-row sample, as run_grpo applies it
            s = mcfg.vision.image_size
            sample = {"input_ids": np.zeros((1, 8), np.int32),
                      "attention_mask": np.ones((1, 8), np.int32),
                      "pixel_values": np.zeros((1, 3, s, s), np.float32),
                      "ce_pixels": np.zeros((1, 2, 3, s, s), np.float32),
                      "num_ce": np.int32(1 if ecfg is not None else 0)}
            policy = grpo.apply_lora(model, sample, cfg.grpo.lora, seed=seed)
        if stage in SFT_STAGES:
            policy.train()  # run_sft
        optimizer = _make_optimizer(policy, ocfg, wrt)
        if policy is not model:
            ref_values = {id(v.get_value()) for _, v in nnx.to_flat_state(nnx.state(model))}
            shared.update(p for p, v in nnx.to_flat_state(nnx.state(policy))
                          if id(v.get_value()) in ref_values)
        return model, policy, optimizer

    t0 = time.time()
    model, policy, optimizer = nnx.eval_shape(build)
    return Abstract(model, policy, optimizer, wrt=wrt, shared=frozenset(shared),
                    seconds=time.time() - t0)


def step_shapes(cfg, stage: str, mesh_shape, mcfg, *, prompt_len=None, label_tokens=128,
                images_per_sample=2) -> tuple[Shapes, Any]:
    """(:class:`Shapes`, ``plan.Setup``) of one step of ``stage``, from plan's ``stage_setup``
    and ``_tiles`` so that the compiled programs and the plan count the same arrays."""
    from emit_jax import plan
    from emit_jax.training import micro

    s = plan.stage_setup(cfg, stage, tuple(mesh_shape), prompt_len=prompt_len,
                         label_tokens=label_tokens, images_per_sample=images_per_sample)
    emit = stage in plan.EMIT_STAGES
    ce = s.batch if emit and s.use_contrastive else 1
    per_image = s.max_tiles + 1 if s.max_tiles > 1 else 1  # + the thumbnail, as plan._tiles
    row_tiles = 0 if stage == "warmup" else \
        min(s.images_per_sample * per_image, s.prompt_len // mcfg.tokens_per_tile)
    what = "grpo.prompts_per_step x grpo.G" if stage == "grpo" else f"{stage}.batch_size"
    try:
        m = micro.micro_count(s.batch, int(cfg[stage].get("micro_batch_size", 0) or 0), what)
    except ValueError as e:
        raise AotError(f"{stage}.micro_batch_size: {e}") from None
    return Shapes(batch=s.batch, prompt_len=s.prompt_len, new_tokens=s.new_tokens,
                  label_tokens=min(s.label_tokens, s.prompt_len), tiles=plan._tiles(mcfg, s),
                  ce=ce, image_size=mcfg.vision.image_size, row_tiles=row_tiles, micro=m), s


def _sds(shape, dtype):
    import jax

    return jax.ShapeDtypeStruct(tuple(shape), dtype)


def sft_batch(sh: Shapes, stage: str) -> dict:
    """``training.sft.to_device``'s batch, abstract (see the module docstring)."""
    import jax.numpy as jnp

    B, P, K, S = sh.batch, sh.prompt_len, sh.label_tokens, sh.image_size
    b = {"input_ids": _sds((B, P), jnp.int32), "labels": _sds((B, P), jnp.int32),
         "attention_mask": _sds((B, P), jnp.int32)}
    if sh.tiles and stage != "warmup":
        b["pixel_values"] = _sds((sh.tiles, 3, S, S), jnp.float32)
    b.update(ce_pixels=_sds((sh.ce, 2, 3, S, S), jnp.float32), num_ce=_sds((), jnp.int32),
             label_pos=_sds((B, K), jnp.int32), label_ids=_sds((B, K), jnp.int32),
             label_mask=_sds((B, K), jnp.bool_))
    return b


def grpo_batch(sh: Shapes) -> dict:
    """run_grpo's ``b`` (left-padded prompts, tiles, CE pairs), abstract."""
    import jax.numpy as jnp

    B, P, S = sh.batch, sh.prompt_len, sh.image_size
    return {"input_ids": _sds((B, P), jnp.int32), "attention_mask": _sds((B, P), jnp.int32),
            "pixel_values": _sds((max(sh.tiles, 1), 3, S, S), jnp.float32),
            "ce_pixels": _sds((sh.ce, 2, 3, S, S), jnp.float32), "num_ce": _sds((), jnp.int32)}


def split_layout(b: dict, sh: Shapes) -> dict:
    """An abstract batch in ``training.micro.split_rows``'s layout for ``sh.micro``
    micro-batches (unchanged for one): row arrays ``[B, ...]`` -> ``[B / M, M, ...]``; the tile
    and CE stacks ``[size, M, ...]`` with ``size`` the larger of one block's own items (its rows'
    tiles, one CE pair per row) and ``1 / M`` of the step's padded stack; ``num_ce`` -> ``[M]``."""
    import jax.numpy as jnp

    m = sh.micro
    if m == 1:
        return b
    per = sh.batch // m
    out = {}
    for k, a in b.items():
        if k == "pixel_values":
            size = max(per * sh.row_tiles, -(-a.shape[0] // m), 1)
        elif k == "ce_pixels":
            size = max(per if sh.ce == sh.batch else 0, -(-a.shape[0] // m), 1)
        elif k == "num_ce":
            out[k] = _sds((m,), jnp.int32)
            continue
        else:  # indexed by row
            size = per
        out[k] = _sds((size, m) + tuple(a.shape[1:]), a.dtype)
    return out


# ------------------------------------------------------------------------------ programs
@dataclasses.dataclass
class Program:
    """One program to compile: ``fn`` a ``sharded_jit``, ``args`` its (abstract) arguments,
    ``roles`` what its graph-node arguments are (``policy``, ``reference``, ``optimizer``), in
    order; ``prepare`` what the training code does to the nodes before calling it (train /
    eval mode)."""
    name: str
    fn: Any
    args: tuple
    roles: tuple
    prepare: Any = None


def _itemsize(dtype) -> int:
    import numpy as np

    try:
        return np.dtype(dtype).itemsize
    except TypeError:  # typed PRNG keys: their uint32 data
        import jax

        return jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).size * 4 \
            if "key" in str(dtype) else 8


def _leaf_bytes(shape, dtype, sharding=None) -> int:
    """Bytes one device holds of an array (all of it without ``sharding``)."""
    shape = tuple(shape)
    return math.prod(sharding.shard_shape(shape) if sharding is not None else shape) * \
        _itemsize(dtype)


def _key(roles, path, shared) -> tuple:
    """The buffer a state leaf is in a run: ``(role, path)``; a reference array that is the
    policy's own is the policy's."""
    role = roles[path[0]]
    rest = tuple(path[1:])
    return ("policy", rest) if role == "reference" and rest in shared else (role, rest)


@dataclasses.dataclass
class Stage:
    """The programs of a stage and the arrays it keeps on every device throughout:
    ``resident`` maps each buffer (``(role, path)``) to its per-device bytes; ``shared`` are the
    reference's paths whose arrays are the policy's (no step changes them)."""
    programs: list
    resident: dict
    shared: frozenset


def stage_programs(cfg, stage: str, ab: Abstract, sh: Shapes, mesh) -> Stage:
    """The stage's programs with their abstract arguments, in the order a step runs them."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding

    from emit_jax.parallel import _var_axes, logical_to_spec, sharded_jit

    # the reference shares the policy's arrays except those a step replaces (trained ones,
    # BatchNorm statistics: the train step returns new arrays for them)
    stepped = nnx.Any(ab.wrt, nnx.Not(nnx.Param))
    changed = {p for p, _ in nnx.to_flat_state(nnx.state(ab.policy, stepped))}
    shared = frozenset(ab.shared - changed)
    nodes = {"policy": ab.policy, "optimizer": ab.optimizer}
    if ab.model is not ab.policy:
        nodes["reference"] = ab.model
    resident: dict = {}
    for role, node in nodes.items():
        for path, v in nnx.to_flat_state(nnx.state(node)):
            val = v.get_value()
            if hasattr(val, "shape"):
                sharding = NamedSharding(mesh, logical_to_spec(_var_axes(v), val.shape, mesh))
                resident.setdefault(_key((role,), (0,) + tuple(path), shared),
                                    _leaf_bytes(val.shape, val.dtype, sharding))

    if stage in SFT_STAGES:
        from emit_jax.training.sft import make_train_step

        kw = {"micro_batches": sh.micro} if sh.micro > 1 else {}
        return Stage([Program("train_step", make_train_step(ab.wrt, mesh, **kw),
                              (ab.policy, ab.optimizer, split_layout(sft_batch(sh, stage), sh)),
                              ("policy", "optimizer"))], resident, shared)

    from emit_jax.ops.sampling import _sharded_sample
    from emit_jax.training.grpo import _freeze_heatmap_bn, make_grpo_fns

    g = cfg.grpo
    B, N = sh.batch, sh.new_tokens
    b = grpo_batch(sh)

    def train_mode():  # run_grpo: policy.train() (+ the heat-map BatchNorm frozen) before both
        ab.policy.train()
        if g.get("bn", "train") == "frozen":
            _freeze_heatmap_bn(ab.policy)

    kw = {"micro_batches": sh.micro} if sh.micro > 1 else {}
    score, train_step = make_grpo_fns(g, ab.wrt, mesh=mesh, **kw)
    rng = jax.eval_shape(lambda: jax.random.key(0))
    # score and train_step take the step in micro-batches (run_grpo's _step_inputs); the
    # sampler the whole batch
    mb = split_layout({**b, "comp_tokens": _sds((B, N), jnp.int32),
                       "comp_mask": _sds((B, N), jnp.int32), "adv": _sds((B,), jnp.float32),
                       "lp": _sds((B, N), jnp.float32)}, sh)
    ctoks, cmask, adv, lp = (mb.pop(k) for k in ("comp_tokens", "comp_mask", "adv", "lp"))
    # the sampler's ids: <|im_end|> / <|endoftext|> of the Qwen2 vocabulary (static constants)
    return Stage([
        Program("sampler", sharded_jit(_sharded_sample, mesh, mutable=nnx.Not(nnx.Param)),
                (ab.policy, _sds((B, sh.prompt_len), jnp.int32),
                 _sds((B, sh.prompt_len), jnp.bool_), b["pixel_values"], b["ce_pixels"], rng,
                 int(g.max_new_tokens), 151645, 151643, float(g.temperature), int(g.top_k),
                 float(g.top_p)), ("policy",), prepare=ab.policy.eval),
        Program("score", score, (ab.policy, ab.model, mb, ctoks, cmask), ("policy", "reference"),
                prepare=train_mode),
        Program("train_step", train_step,
                (ab.policy, ab.optimizer, mb, ctoks, cmask, adv, lp, lp),
                ("policy", "optimizer"), prepare=train_mode),
    ], resident, shared)


# ------------------------------------------------------------------------------ compile
_UNITS = {"B": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def _size(text: str) -> int:
    m = re.fullmatch(r"([\d.]+)\s*([KMGT]?)i?B?", text.strip())
    return int(float(m.group(1)) * _UNITS[m.group(2) or "B"]) if m else 0


def hbm_refusal(message: str) -> dict | None:
    """The compiler's figures from a RESOURCE_EXHAUSTED compile error, or None when the error
    is something else: ``required`` (what it counted, bytes) and ``available`` where it says."""
    if "RESOURCE_EXHAUSTED" not in message and "Ran out of memory" not in message:
        return None
    out: dict = {"message": " ".join(message.split())[:2000]}
    m = re.search(r"Used ([\d.]+[KMGT]?) of ([\d.]+[KMGT]?) hbm", message)
    if m:
        out.update(required=_size(m.group(1)), available=_size(m.group(2)))
    m = re.search(r"required for ([\w ]+?) \(([\d.]+[KMGT]?)\) exceeds available HBM "
                  r"\(([\d.]+[KMGT]?)\)", message)
    if m:
        out.update(what=m.group(1), required=_size(m.group(2)), available=_size(m.group(3)))
    m = re.search(r"Exceeded hbm capacity by ([\d.]+[KMGT]?)", message)
    if m:
        out["exceeded"] = _size(m.group(1))
    return out


def _state_leaves(tree) -> list:
    """``[(nnx path, leaf)]`` of an abstract ``nnx.State`` in the order of ``jax.tree.leaves``."""
    import jax

    out = []
    for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out.append((tuple(getattr(k, "key", None) for k in kp
                          if isinstance(k, jax.tree_util.DictKey)), leaf))
    return out


def account(p: Program, abstract_args: tuple, shardings: tuple, resident: dict,
            shared: frozenset) -> dict:
    """What the executable takes of the stage's arrays, per device: ``dup`` bytes of arguments
    that are one buffer passed twice (the reference's weights that are the policy's, when both
    are used), ``missing`` bytes of resident arrays it does not take (not an argument, or one it
    never reads: XLA drops those), and the frozen argument's (the weights') sharding."""
    import jax

    seen: dict = {}
    read: set = set()  # weights (frozen arguments) the program reads
    dup = 0
    weights = {"arrays": 0, "used": 0, "sharded": 0, "whole": 0, "per_device": 0,
               "unused": 0, "unused_whole": 0, "unused_examples": [], "largest": None}
    for group, (tree, sh_tree) in enumerate(zip(abstract_args[:2], shardings[:2])):
        shs = jax.tree.leaves(sh_tree, is_leaf=lambda x: x is None)
        for (path, leaf), s in zip(_state_leaves(tree), shs):
            key = _key(p.roles, path, shared)
            whole = _leaf_bytes(leaf.shape, leaf.dtype)
            if group == 1:
                weights["arrays"] += 1
            if s is None:  # dropped by XLA: the program never reads it
                if group == 1:
                    weights["unused"] += 1
                    weights["unused_whole"] += whole
                    if len(weights["unused_examples"]) < 4:
                        weights["unused_examples"].append("/".join(map(str, path[1:])))
                continue
            b = _leaf_bytes(leaf.shape, leaf.dtype, s)
            if key in seen:
                dup += b
            seen[key] = b
            if group == 1:
                read.add(key)
            if group == 1:
                weights["used"] += 1
                weights["whole"] += whole
                weights["per_device"] += b
                weights["sharded"] += tuple(s.shard_shape(tuple(leaf.shape))) != tuple(leaf.shape)
                if weights["largest"] is None or whole > weights["largest"]["whole"]:
                    weights["largest"] = {"path": "/".join(map(str, path[1:])), "whole": whole,
                                          "shape": list(leaf.shape), "spec": str(s.spec),
                                          "per_device": b}
    missing = sum(b for k, b in resident.items() if k not in seen)
    # a program that reads the policy's own (not shared) weights but none of its LoRA factors,
    # both frozen arguments there (the sampler; the reference pass with mu > 1), runs the
    # policy without its adapters. (The train step takes the factors as trained state, which
    # its update reads whether the loss does or not.)
    lora = [k for k in resident
            if k[0] == "policy" and str(k[1][-1]).endswith(("_lora_a", "_lora_b"))]
    own = [k for k in resident if k[0] == "policy" and k not in lora and k[1] not in shared]
    reads_policy = any(k in read for k in own)
    weights["lora_factors"] = len(lora)
    weights["lora_read"] = sum(k in seen for k in lora)
    weights["lora_ignored"] = bool(lora) and reads_policy and not weights["lora_read"]
    return {"dup": dup, "missing": missing, "weights": weights}


def lower_program(p: Program, memory: dict) -> tuple:
    """``(lowered, abstract arguments, seconds)`` of ``p``: the nodes put in the program's mode
    (``p.prepare``), then traced and lowered under the config's memory switches."""
    from emit_jax.models.memory import memory_options

    if p.prepare is not None:
        p.prepare()
    t0 = time.time()
    with memory_options(**memory):
        lowered = p.fn.lower(*p.args)
    return lowered, p.fn.abstract_args(*p.args), time.time() - t0


def compile_program(p: Program, lowered, abstract_args, resident: dict,
                    shared: frozenset) -> dict:
    """Compile a lowered program; the compiler's figures, per device, in bytes (or its refusal
    for lack of HBM). Thread-safe: nothing here traces."""
    import jax

    t1 = time.time()
    out: dict = {"name": p.name}
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - the compiler's refusal is a result, not a crash
        out["compile_s"] = round(time.time() - t1, 1)
        refusal = hbm_refusal(str(e))
        if refusal is None:
            raise
        out["refused"] = refusal
        # no executable: every argument counts as used (shardings as the call asks for them)
        acc = account(p, abstract_args, tuple(jax.tree.map(lambda a: a.sharding, t)
                                              for t in abstract_args[:2]), resident, shared)
        out.update(shared_args=acc["dup"], other_resident=acc["missing"], weights=acc["weights"])
        return out
    out["compile_s"] = round(time.time() - t1, 1)
    ma = compiled.memory_analysis()
    out.update(arguments=int(ma.argument_size_in_bytes), outputs=int(ma.output_size_in_bytes),
               alias=int(ma.alias_size_in_bytes), temp=int(ma.temp_size_in_bytes),
               code=int(ma.generated_code_size_in_bytes))
    out["xla_peak"] = int(getattr(ma, "peak_memory_in_bytes", 0) or 0)
    out["xla_total"] = (out["arguments"] + out["outputs"] - out["alias"] + out["temp"]
                        + out["code"])
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else (cost or {})
    out["flops"] = float(cost.get("flops", 0.0))
    out["bytes_accessed"] = float(cost.get("bytes accessed", 0.0))
    acc = account(p, abstract_args, compiled.input_shardings[0], resident, shared)
    out.update(shared_args=acc["dup"], other_resident=acc["missing"], weights=acc["weights"])
    outs = jax.tree.leaves(compiled.output_shardings[0])
    out["state_out"] = {"arrays": len(outs),
                        "sharded": sum(not s.is_fully_replicated for s in outs)}
    return out


# ------------------------------------------------------------------------------ report
def memory_switches(cfg) -> dict:
    """``config.memory`` as ``models.memory.memory_options`` takes it (as ``emit_jax.train``
    passes it), checked."""
    from emit_jax.models.memory import memory_options

    memory = dict(cfg.get("memory") or {})
    try:
        with memory_options(**memory) as opts:
            return dataclasses.asdict(opts)
    except (TypeError, ValueError) as e:
        raise AotError(f"config memory section {memory}: {e}") from None


def default_stage(cfg, mesh_shape, **kw) -> str:
    """The stage plan.py reports by default: the largest of ``config.stages``."""
    from emit_jax import plan

    stages = [x for x in cfg.get("stages", ()) if x in plan.STAGES]
    if not stages:
        raise AotError(f"config lists no known stage ({', '.join(plan.STAGES)}); pass --stage")
    if len(stages) == 1:
        return stages[0]
    totals = {st: plan.plan_stage(cfg, plan.stage_setup(cfg, st, mesh_shape, **kw)).total
              for st in stages}
    return max(totals, key=totals.get)


def make_report(cfg, config_path: str, topology_name: str, *, mesh_spec=None, stage=None,
                prompt_len=None, label_tokens: int = 128, headroom: float = 10.0,
                hbm_gib: float | None = None, only: Sequence[str] = (), jobs: int = 1) -> dict:
    """Compile the stage's programs for ``topology_name`` and compare them with the plan;
    ``jobs`` > 1 compiles that many at once (each InternVL3-8B program takes 5-8 GB of host
    RAM while it compiles)."""
    from emit_jax import parallel, plan

    if not 0 <= headroom < 100:
        raise AotError(f"--headroom {headroom}: a percentage in [0, 100)")
    if jobs < 1:
        raise AotError(f"--jobs {jobs}: at least 1")
    topo = topology(topology_name)
    devices = list(topo.devices)
    capacity, cap_note = device_capacity(devices, hbm_gib)
    spec = mesh_spec if mesh_spec is not None else (dict(cfg.mesh) if "mesh" in cfg else None)
    try:
        mesh = parallel.make_mesh(spec, devices=devices)
    except ValueError as e:
        raise AotError(f"mesh {spec!r} does not fit topology {topology_name} "
                       f"({len(devices)} devices): {e}") from None
    mesh_shape = tuple(int(mesh.shape[a]) for a in parallel.MESH_AXES)
    kw = dict(prompt_len=prompt_len, label_tokens=label_tokens)
    stage = stage or default_stage(cfg, mesh_shape, **kw)
    if stage not in plan.STAGES:
        raise AotError(f"unknown stage {stage!r}; known: {', '.join(plan.STAGES)}")
    mcfg, ecfg = model_setup(cfg, stage)
    shapes, setup = step_shapes(cfg, stage, mesh_shape, mcfg, **kw)
    kind = "sft" if stage in SFT_STAGES else "grpo"
    if only:
        bad = sorted(set(only) - set(PROGRAMS[kind]))
        if bad:
            raise AotError(f"--programs {','.join(bad)}: stage {stage} has "
                           f"{', '.join(PROGRAMS[kind])}")
    pl = plan.plan_stage(cfg, setup)
    ab = abstract_stage(cfg, stage, mcfg, ecfg, seed=int(cfg.get("seed", 0)))
    memory = memory_switches(cfg)
    usable = int(capacity * (1 - headroom / 100))
    results = []
    st = stage_programs(cfg, stage, ab, shapes, mesh)
    todo = [p for p in st.programs if not only or p.name in only]

    def failed(p, e) -> dict:  # a program that does not trace or compile is a finding about
        import traceback       # that program: the others are still compiled and reported

        where = traceback.extract_tb(e.__traceback__)
        return {"name": p.name, "error": f"{type(e).__name__}: {' '.join(str(e).split())[:600]}",
                "where": [f"{f.filename}:{f.lineno} {f.name}" for f in where
                          if "/emit_jax/" in f.filename][-6:],
                "peak": None, "fits": False, "plan": None, "ratio": None, "flag": False,
                "plan_phase": "", "shared_args": 0, "other_resident": 0}

    lowered: dict = {}
    for p in todo:  # tracing changes the nodes' modes: one program at a time
        try:
            lowered[p.name] = lower_program(p, memory)
        except Exception as e:  # noqa: BLE001
            lowered[p.name] = failed(p, e)

    def finish(p) -> dict:
        got = lowered[p.name]
        if isinstance(got, dict):
            return got
        lo, abstract_args, seconds = got
        try:
            r = compile_program(p, lo, abstract_args, st.resident, st.shared)
        except Exception as e:  # noqa: BLE001
            return failed(p, e)
        r["lower_s"] = round(seconds, 1)
        return r

    if jobs > 1:  # XLA compiles outside the GIL: the programs side by side
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=jobs) as pool:
            done = list(pool.map(finish, todo))
    else:
        done = [finish(p) for p in todo]
    for p, r in zip(todo, done):
        if r.get("error"):
            results.append(r)
            continue
        if "refused" in r:
            req = r["refused"].get("required", 0)
            r["peak"] = req - r["shared_args"] + r["other_resident"] if req else None
        else:
            r["peak"] = max(r["xla_total"], r["xla_peak"]) - r["shared_args"] + r["other_resident"]
        r["fits"] = None if r["peak"] is None else (r["peak"] <= usable and "refused" not in r)
        if p.name == "sampler":
            r["plan_phase"], est = "resident + rollout", pl.resident + pl.rollout
        elif p.name == "score":
            r["plan_phase"], est = "resident (no phase for the reference pass)", pl.resident
        else:
            r["plan_phase"], est = "resident + train", pl.resident + pl.train
        r["plan"] = est
        r["ratio"] = round(r["peak"] / est, 3) if r["peak"] and est else None
        r["flag"] = bool(r["ratio"] is not None and p.name != "score"
                         and abs(r["ratio"] - 1) > FLAG)
        results.append(r)
    rep = dict(
        config=config_path, stage=stage, topology=topology_name,
        device_kind=devices[0].device_kind, devices=len(devices),
        mesh=dict(zip(parallel.MESH_AXES, mesh_shape)), capacity=capacity, capacity_note=cap_note,
        headroom_pct=headroom, usable=usable, unit="bytes per device; GiB = 2**30",
        model=dict(arch=cfg.arch, emit=ecfg is not None, param_dtype=mcfg.param_dtype,
                   dtype=mcfg.dtype, heatmap_strategy=ecfg.heatmap_strategy if ecfg else None),
        memory=memory, shapes=dataclasses.asdict(shapes), abstract_s=round(ab.seconds, 1),
        plan=dict(resident=pl.resident, rollout=pl.rollout, train=pl.train, total=pl.total),
        programs=results)
    rep["fits"] = all(r["fits"] for r in results)
    rep["advice"] = advice(rep, cfg, pl, setup, usable)
    return rep


def advice(rep: dict, cfg, pl, setup, usable: int) -> list[str]:
    """For every program that does not fit: which, by how much, and what to change."""
    from emit_jax import plan

    out = []
    stage, mem = rep["stage"], rep["memory"]
    batch_key = "grpo.prompts_per_step / grpo.G" if stage == "grpo" else f"{stage}.batch_size"
    for r in rep["programs"]:
        if r["fits"]:
            continue
        g = lambda x: f"{x / GiB:.2f} GiB"  # noqa: E731
        if r.get("error"):
            out.append(f"{r['name']}: did not lower or compile ({r['error'][:200]}): a bug in the "
                       "program, not a memory verdict")
            continue
        if r.get("refused"):
            ref = r["refused"]
            head = (f"{r['name']}: the TPU compiler refused it (needs {g(ref['required'])} of "
                    f"{g(ref['available'])} HBM" if ref.get("required") and ref.get("available")
                    else f"{r['name']}: the TPU compiler refused it ({ref['message'][:200]}")
            head += ")"
        else:
            head = (f"{r['name']}: needs {g(r['peak'])} per device, {g(r['peak'] - usable)} over "
                    f"the {g(usable)} usable")
        tips = []
        temp = r.get("temp", 0)
        fixed = r.get("arguments", 0) - r.get("shared_args", 0) + r.get("other_resident", 0)
        if r.get("refused") or temp >= fixed:
            if not mem.get("remat"):
                tips.append("memory.remat=True")
            if not mem.get("attention_chunk") or mem["attention_chunk"] > 512:
                tips.append("a smaller memory.attention_chunk (e.g. 512)")
            if "vit_chunk" in mem and not mem["vit_chunk"]:
                tips.append("memory.vit_chunk (image tiles per ViT chunk)")
            if r["name"] == "sampler":
                tips.append(f"fewer rows per sampler call ({batch_key}) or a shorter "
                            "grpo.max_new_tokens (KV cache and prefill scale with them)")
            else:
                rows = rep["shapes"]["batch"] // rep["shapes"]["micro"]
                tips.append(f"--config.{stage}.micro_batch_size={max(1, rows // 2)} (gradient "
                            f"accumulation; {rows} rows at a time now) or a smaller {batch_key}")
        if fixed > 0.5 * usable or not tips:
            d, f, t = setup.mesh
            tips.append(f"more chips on fsdp (--mesh fsdp={2 * f} on a slice of {2 * d * f * t} "
                        "devices): weights, optimizer and batch all divide")
        out.append(head + "; try " + "; ".join(tips))
    if any(r["fits"] is False and not r.get("error") for r in rep["programs"]):
        try:
            what_ifs = plan.suggestions(cfg, pl, usable)
        except Exception:  # noqa: BLE001 - the plan's what-ifs are a bonus
            what_ifs = []
        out += [f"plan's what-ifs: {w}" for w in what_ifs[:6]]
    return out


def format_report(rep: dict) -> str:
    g = lambda x: "-" if x is None else f"{x / GiB:.2f}"  # noqa: E731
    mesh = " ".join(f"{k}={v}" for k, v in rep["mesh"].items())
    s, m = rep["shapes"], rep["model"]
    step = (f"{s['batch']} sequences x {s['prompt_len']} prompt"
            + (f" + {s['new_tokens']} new tokens" if s["new_tokens"] else
               f" tokens ({s['label_tokens']} label positions each)")
            + f", {s['tiles']} image tiles, {s['ce']} CE pairs"
            + (f"; train step in {s['micro']} micro-batches of {s['batch'] // s['micro']}"
               if s["micro"] > 1 else ""))
    lines = [
        f"TPU compile: {rep['config']}, stage {rep['stage']}, topology {rep['topology']} "
        f"({rep['devices']} x {rep['device_kind']}), mesh {mesh}",
        f"HBM per device {rep['capacity'] / GiB:.2f} GiB ({rep['capacity_note']}); "
        f"{rep['headroom_pct']:g}% reserved: {rep['usable'] / GiB:.2f} usable",
        f"model {m['arch']}{' + EMIT' if m['emit'] else ''}, params {m['param_dtype']}, compute "
        f"{m['dtype']}" + (f", heat map '{m['heatmap_strategy']}'" if m["heatmap_strategy"] else "")
        + "; memory: " + ", ".join(f"{k} {v if v else 'off'}" if not isinstance(v, bool) else
                                   f"{k} {'on' if v else 'off'}"
                                   for k, v in rep["memory"].items()),
        f"step: {step}",
        "sizes in GiB per device (2**30 bytes); xla = arguments + outputs - aliased + temp + code;",
        "peak = max(xla, XLA's own peak) - shared args + other resident, against the usable HBM",
        "",
        f"{'program':<11}{'args':>8}{'outputs':>8}{'temp':>8}{'code':>7}{'xla':>8}{'shared':>8}"
        f"{'other':>8}{'peak':>8}{'plan':>8}{'ratio':>7}  {'fits':<5}{'compile s':>10}",
    ]
    for r in rep["programs"]:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}" + ("!" if r["flag"] else "")
        fits = "-" if r["fits"] is None else ("yes" if r["fits"] else "NO")
        if r.get("error"):
            lines.append(f"{r['name']:<11}{'failed to lower or compile (below)':>39}")
            continue
        if r.get("refused"):
            lines.append(f"{r['name']:<11}{'refused by the compiler':>39}{g(r['shared_args']):>8}"
                         f"{g(r['other_resident']):>8}{g(r['peak']):>8}{g(r['plan']):>8}"
                         f"{ratio:>7}  {fits:<5}{r['compile_s']:>10.1f}")
        else:
            lines.append(f"{r['name']:<11}{g(r['arguments']):>8}{g(r['outputs']):>8}"
                         f"{g(r['temp']):>8}{g(r['code']):>7}{g(r['xla_total']):>8}"
                         f"{g(r['shared_args']):>8}{g(r['other_resident']):>8}{g(r['peak']):>8}"
                         f"{g(r['plan']):>8}{ratio:>7}  {fits:<5}{r['compile_s']:>10.1f}")
    lines.append("")
    for r in rep["programs"]:
        if r.get("error"):
            lines.append(f"{r['name']}: FAILED: {r['error']}")
            lines += [f"  at {w}" for w in r["where"]]
            continue
        lines.append(f"{r['name']}: plan = {r['plan_phase']}; lowered in {r['lower_s']:.1f} s, "
                     f"compiled in {r['compile_s']:.1f} s")
        if r.get("refused"):
            lines.append(f"  compiler: {r['refused']['message'][:600]}")
        else:
            lines.append(f"  {r['flops'] / 1e12:.3f} TFLOP*, {r['bytes_accessed'] / GiB:.2f} GiB* "
                         f"accessed per device; XLA's own peak {g(r['xla_peak'])} GiB; state out: "
                         f"{r['state_out']['sharded']} of {r['state_out']['arrays']} arrays "
                         "sharded")
        if r.get("xla_peak", 0) > r.get("xla_total", 0):
            lines.append(f"  XLA's own peak {g(r['xla_peak'])} GiB is above arguments + outputs + "
                         f"temp + code ({g(r['xla_total'])} GiB): the peak is used")
        w = r["weights"]
        big = w["largest"]
        lines.append(f"  weights (frozen argument): {w['used']} arrays used, {w['sharded']} of "
                     f"them sharded, {w['whole'] / GiB:.2f} GiB whole -> "
                     f"{w['per_device'] / GiB:.2f} GiB per device"
                     + (f"; largest {big['path']} {big['shape']} as {big['spec']}" if big else ""))
        if w.get("lora_ignored"):
            lines.append(f"  ! none of the policy's {w['lora_factors']} LoRA factors is read: "
                         f"this program runs the policy without its adapters")
        if w["unused"]:
            lines.append(f"  {w['unused']} weight arrays ({w['unused_whole'] / GiB:.3f} GiB "
                         f"whole) not read by this program (XLA dropped them), e.g. "
                         + ", ".join(w["unused_examples"]))
        if r["shared_args"] or r["other_resident"]:
            lines.append(f"  shared args {g(r['shared_args'])} GiB (one buffer passed twice), "
                         f"other resident {g(r['other_resident'])} GiB (the stage's arrays this "
                         f"program does not read: optimizer, unused weights, reference copies)")
        if r["flag"]:
            lines.append(f"  ! plan and compiler differ by {abs(r['ratio'] - 1) * 100:.0f}% "
                         f"(plan {g(r['plan'])} GiB, compiler's peak {g(r['peak'])} GiB)")
    lines.append("* XLA's cost_analysis counts a loop's body once: scans over micro-batches, "
                 "attention and ViT chunks and the decode loop are not multiplied by their trip "
                 "counts")
    p = rep["plan"]
    lines.append(f"plan ({'emit_jax.plan'}): resident {g(p['resident'])}, rollout "
                 f"{g(p['rollout'])}, train {g(p['train'])}, total {g(p['total'])} GiB per device")
    lines.append("")
    if rep["fits"]:
        lines.append(f"fits: every program within {rep['usable'] / GiB:.2f} GiB per device")
    else:
        failed = any(r.get("error") for r in rep["programs"])
        lines.append("does not fit" + (" (or did not compile)" if failed else "") + ":")
        lines += [f"  {a}" for a in rep["advice"]]
    return "\n".join(lines)


def to_json(rep: dict) -> str:
    out = dict(rep)
    out["capacity_gib"] = round(rep["capacity"] / GiB, 4)
    out["usable_gib"] = round(rep["usable"] / GiB, 4)
    for r in out["programs"]:
        for k in ("arguments", "outputs", "temp", "code", "xla_total", "peak", "plan",
                  "shared_args", "other_resident"):
            if r.get(k) is not None:
                r[k + "_gib"] = round(r[k] / GiB, 4)
    return json.dumps(out, indent=1, default=str)


# ------------------------------------------------------------------------------ CLI
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        raise AotError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m emit_jax.aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="ml_collections config file (path[:arg])")
    p.add_argument("--topology", required=True, help="TPU slice, e.g. v5e:2x2, v5p:2x2x1, v6e:2x4")
    p.add_argument("--mesh", default=None, help='default: config.mesh; e.g. "fsdp=4"')
    p.add_argument("--stage", default=None,
                   help="compile this stage (default: the largest of config.stages, as plan)")
    p.add_argument("--programs", default="", help="only these, comma-separated (sft: "
                   "train_step; grpo: sampler, score, train_step)")
    p.add_argument("--prompt_len", type=int, default=None,
                   help="prompt tokens (default: the largest data.length_buckets)")
    p.add_argument("--label_tokens", type=int, default=128, help="SFT label positions per row")
    p.add_argument("--headroom", type=float, default=10.0, help="percent of HBM reserved")
    p.add_argument("--hbm", type=float, default=None, help="GiB per device (default: by chip)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. grpo.G=4 (repeatable); also --config.KEY=VALUE")
    p.add_argument("--jobs", type=int, default=1,
                   help="programs compiled at once (8B: 5-8 GB of host RAM each)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--json_out", default=None, metavar="PATH",
                   help="also write the JSON object to PATH (the text goes to stdout)")
    return p


def split_config_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``--config.key=value`` / ``--config.key value`` (``emit_jax.train``'s form) ->
    ``key=value`` overrides; the rest of ``argv`` as it was."""
    rest, overrides = [], []
    it = iter(argv)
    for a in it:
        if a.startswith("--config."):
            key, eq, value = a[len("--config."):].partition("=")
            if not eq:
                value = next(it, None)
                if value is None:
                    raise AotError(f"{a}: expected --config.{key}=VALUE")
            overrides.append(f"{key}={value}")
        else:
            rest.append(a)
    return rest, overrides


def main(argv: Sequence[str] | None = None) -> int:
    from emit_jax import plan

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        rest, overrides = split_config_overrides(argv)
        args = _parser().parse_args(rest)
        require_libtpu()
        cfg = plan.load_config(args.config, overrides + list(args.set))
        only = tuple(x for x in args.programs.replace(" ", "").split(",") if x)
        rep = make_report(cfg, args.config, args.topology, mesh_spec=args.mesh, stage=args.stage,
                          prompt_len=args.prompt_len, label_tokens=args.label_tokens,
                          headroom=args.headroom, hbm_gib=args.hbm, only=only,
                          jobs=args.jobs)
    except (AotError, PlanError) as e:
        print(f"emit_jax.aot: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    text = to_json(rep)
    if args.json_out:
        try:
            with open(args.json_out, "w", encoding="utf-8") as f:
                f.write(text + "\n")
        except OSError as e:
            print(f"emit_jax.aot: error: --json_out {args.json_out}: {e.strerror}", file=sys.stderr)
            return 2
    print(text if args.json else format_report(rep))
    return 1 if any(r.get("error") for r in rep["programs"]) else 0


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.exit(main())
