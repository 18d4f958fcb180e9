"""Per-device memory plan of a training config on a mesh, before any weight is loaded.

    python -m emit_jax.plan --config configs/internvl3_8b_grpo.py --mesh fsdp=8 \
        [--device a100-80g|h100-80g|h200|v5p|v4|cpu] [--headroom 10] [--json]

Prints, per device and for the whole model (unsharded), the bytes of every component of the
config's stage (default: the stage of ``config.stages`` with the largest footprint; ``--stage``
picks one), a total, and whether it fits the device with ``--headroom`` percent reserved. All
sizes are in GiB = 2**30 bytes. Nothing is allocated: the model's variables come from
``nnx.eval_shape`` (shapes, dtypes and the logical axis names of their ``out_sharding``
metadata), each array's sharding from :func:`emit_jax.parallel.logical_to_spec` on an abstract
mesh (per-device bytes = size / product of the mesh axes its spec names x itemsize), and the
optimizer state from ``jax.eval_shape`` of the project's AdamW (``training.sft.make_optimizer``)
on the abstract trainable set. Activations and the KV cache follow the formulas below.

Components (``phase`` says when each one is live; total = resident + max(rollout, train)):

- resident, for the whole stage:
  ``weights``: every variable of the model (InternVL, plus EMIT's soft prompt and heat-map
  projector for stages sft / sft2 / grpo, with ``<COMP_CONTEXT>`` added to the vocabulary).
  With QLoRA (``grpo.lora.weight_qtype``) the LoRA-targeted kernels of the *policy* are
  ``qlora weights`` instead: 4 bits (nf4/int4; 8 for int8/fp8) per entry + one scale per output
  column (qwix without ``tile_size``; with ``grpo.lora.tile_size`` one per tile) in the param
  dtype. ``weights`` then counts only the policy's other variables.
  ``reference``: what the frozen reference of sft2 / grpo holds that the policy does not share.
  The policy is ``qwix.apply_lora_to_model(model)``: new Variables that share the model's arrays
  at creation. On one device they stay shared, so the reference adds only the pre-update values
  of the fully trained modules (soft prompt, projector, mlp1) and, with QLoRA, the
  full-precision targeted kernels. On a mesh, ``run_grpo`` shards policy, reference and
  optimizer together (``shard_module``, which places an array several Variables hold once), and
  the jitted programs take frozen weights as inputs only, so the sharing holds there too
  (asserted in tests/test_parallel.py). ``--reference shared`` (default) counts that;
  ``--reference copy`` a separate sharded copy of all weights (what a reference loaded apart
  from the policy would cost).
  ``lora``: LoRA factors, computed analytically (tracing qwix abstractly on the 8B model takes
  ~2 minutes; tests/test_plan.py checks the rule against such a trace of a small EMIT model,
  and it matched all 680 factors of internvl3_8b): for every kernel whose module path
  (``/``-joined, e.g. ``mllm/language_model/layers/0/self_attn/q_proj``) fully matches
  ``grpo.lora.targets``, ``A [in, r]`` with axes ``(in_axis, None)`` and ``B [r, out]`` with
  ``(None, out_axis)``, in float32.
  ``optimizer``: AdamW's two moments of every trainable array, sharded like it, plus optax's
  counters. Every trained array is float32 while its stage runs (``training.precision``): the
  ``weights`` row counts the trained ones at 4 bytes, and so do gradients and moments. With
  ``<stage>.micro_batch_size`` the train rows (activations, logits) are one micro-batch's and
  the gradients count twice (the running sum and one micro-batch's); ``memory.vit_chunk`` = K
  limits the ViT's working set to one chunk of K tiles. Trainable: warmup / base all parameters (``train_vision=False``: not the
  ViT); sft the soft prompt and projector; sft2 / grpo the LoRA factors + soft prompt,
  projector and mlp1 (``training.grpo.trainable_filter``).

- rollout (grpo only), while the sampler runs: ``kv cache`` = 2 (k, v) x L x b x (P + N) x
  KVH/t_kv x Dh x c, and ``prefill`` = the larger of one decoder layer's forward working set on
  the prompts, ``b P [c (3F/t_f + 2 H Dh/t_h + 2 KVH Dh/t_kv) + D (4 + 4c) + S] + A_pre`` with
  S = P + N (the cache length) and the attention scores ``A_pre = b P H/t_h S (8 + c)``
  (float32 scores and softmax plus compute-dtype probabilities: the whole matrix) or, with
  ``memory.attention_chunk`` = C < P, ``b C H/t_h S (8 + c) + b P_C S`` (one chunk of queries at
  a time + the padded mask chunks, P_C = P rounded up to a multiple of C); and one ViT layer's
  forward working set on the image tiles (and on the 5 x CE tiles of the heat map, whose 4
  read-out layers are kept). Remat does not apply to the sampler (it has a KV cache).

- train, during one optimizer step: ``gradients`` of the trainable set (sharded like the
  parameters) and ``activations`` = max(ViT forward working set, ViT saved + mlp1 residuals +
  LLM saved + LLM backward workspace, ViT backward), with the per-token residuals that
  ``jax.ad_checkpoint``'s ``saved_residuals`` lists for ``Qwen2DecoderLayer`` /
  ``VisionLayer`` (checked at float32 and bfloat16):

      r_lin   2 (4 + 2c) D + c (2 H Dh/t_h + 2 KVH Dh/t_kv + 4 Dh) + 6 c F/t_f + 16 + 8 H/t_h
              (a decoder layer without its attention scores)
      r_att   (9 + c) H/t_h T    (mask 1 + masked scores 4 + exp 4 + probs c; no chunks)
              c H/t_h Dh (T_C - T) / T   (chunks: the chunk map saves its padded queries only)
      ViT     2 (12 + c) Dv + c (4 Dv/t_vh + 2 Dv) + 4 c Fv/t_vf + (4 + c) Hv/t_vh p
      mlp1    (12 + c) 4 Dv + 5 c D        (per visual token)

  and, per device, layer = b T (r_lin + r_att), final = b T D (4 + 2c) (the final norm),
  mask = b T T (+ b T_C T for the padded mask chunks: one array for all layers), and the
  attention backward A = 4 b H/t_h T T (float32 gradient of the scores) or, with chunks,
  b H/t_h C T (12 + 2c) (one chunk's scores recomputed, its probabilities and gradients):

      memory.remat off   LLM saved = L x layer + mask + final
                         workspace = b T (r_lin + 4 D) + A
      memory.remat on    LLM saved = L b T D c (each layer's input) + 8 b T Dh (rotary
                         tables) + mask + final
                         workspace = layer (recomputed) + b T (2 r_lin + 4 D) + A

  (with remat the workspace counts the non-attention residuals twice: XLA's memory-minimising
  CPU schedule holds about one more layer's worth of them, as if the next layer's
  recomputation overlapped the current one's backward). ViT saved = Lv x tiles x p x ViT
  without remat, Lv tiles p Dv c with it (then ViT backward = ViT saved + 2 tiles p ViT: one
  block recomputed and its gradients); ViT and mlp1 count only when they have trainable weights
  upstream (base; sft2 / grpo with LoRA on the ViT and mlp1 in full). T_C = T rounded up to a
  multiple of C; chunks apply when 0 < C < T. ``logits``: ``b K V/t_v (3 x 4 + c)`` (the
  compute-dtype projection, its float32 copy, the log-sum-exp residual, the float32 gradient),
  K = the completion length N for grpo, ``--label_tokens`` (default 128) label positions for
  the SFT stages (``sft.label_positions``: only those go through the vocabulary projection).
  ``memory.remat`` / ``memory.attention_chunk`` come from the config (``--set memory.remat=True
  --set memory.attention_chunk=1024`` overrides them; a config without ``memory``: both off).

  Against XLA's compiled ``memory_analysis`` (CPU) of the train step of two small models (4
  decoder layers of width 128 or 512, 1-2 sequences of 1k-4k tokens; tests/test_plan.py runs
  three such checks), activations + logits / XLA's temporaries, under XLA's default schedule
  and (in brackets) its memory-minimising one (``--xla_cpu_enable_concurrency_optimized_
  scheduler=false``): no switches 1.2-1.3 (1.8-2.3); chunks 1.4-1.5 (1.2-1.3); remat + chunks
  0.9-1.25 (0.97-1.2); remat alone (1.04-1.17), while the default CPU schedule hoists the
  recomputation and keeps nearly every layer's residuals (0.44-0.57: XLA's temporaries hardly
  move from the no-remat ones). Details in docs/MEMORY_PLAN.md.

Symbols: b = sequences per device (the global batch split over data x fsdp where they divide
it), T = train length (prompt P + N for grpo, P for SFT; P = the largest ``data.length_buckets``
entry or ``--prompt_len``), c = compute dtype bytes, D/F/H/KVH/Dh/L/V the decoder's widths,
heads, layers and vocabulary, Dv/Fv/Hv the ViT's, t_x the tensor-axis split of that width (1
when it does not divide it, as ``logical_to_spec`` does). Image tiles per sequence:
``--images_per_sample`` (default 2: EMIT's prompts carry a normal reference and the query) x
(``data.max_tiles`` + 1 thumbnail), at most P / tokens_per_tile; per step padded as the code
pads them (grpo: to a multiple of prompts x G x 2 x max_tiles; SFT: of 4). The tile and CE
batches are split over data x fsdp like the sequences.

Not counted: XLA's own buffers and fragmentation (what ``--headroom`` is for), the reference
log-prob pass of grpo (forward only, below the train step), host memory, the transient full
copy a loader puts on one device before ``shard_module`` re-places it.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import importlib.util
import json
import math
import os
import re
import sys
from typing import Any, Sequence

GiB = 2 ** 30

# device -> (bytes of memory per device, where the number comes from)
DEVICES: dict[str, tuple[int, str]] = {
    "a100-80g": (81920 * 2 ** 20, "NVIDIA A100 80GB, 81920 MiB (nvidia-smi)"),
    "h100-80g": (81559 * 2 ** 20, "NVIDIA H100 80GB HBM3, 81559 MiB (nvidia-smi)"),
    "h200": (143771 * 2 ** 20, "NVIDIA H200 141GB, 143771 MiB (nvidia-smi)"),
    "v5p": (95 * GiB, "TPU v5p chip, 95 GiB HBM2e"),
    "v4": (32 * GiB, "TPU v4 chip, 32 GiB HBM2"),
    "cpu": (0, "this machine's RAM (os.sysconf)"),
}
STAGES = ("warmup", "base", "sft", "sft2", "grpo")
LORA_STAGES = ("sft2", "grpo")
EMIT_STAGES = ("sft", "sft2", "grpo")
QBITS = {"nf4": 4, "int4": 4, "uint4": 4, "fp4": 4, "int8": 8, "uint8": 8,
         "float8_e4m3fn": 8, "float8_e5m2": 8, "fp8": 8}


class PlanError(ValueError):
    """Bad input: unknown device, unparsable mesh, missing config file..."""


def cpu_ram_bytes() -> int:
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def device_capacity(name: str) -> int:
    if name not in DEVICES:
        raise PlanError(f"unknown device {name!r}; known: {', '.join(DEVICES)}")
    return cpu_ram_bytes() if name == "cpu" else DEVICES[name][0]


# ------------------------------------------------------------------------------ config
def load_config(spec: str, overrides: Sequence[str] = ()):
    """An ml_collections config file, ``path`` or ``path:arg`` as ``--config`` of
    ``emit_jax.train`` takes it, with ``key.sub=value`` overrides applied."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise PlanError(f"config file not found: {path}")
    name = "_emit_plan_config_" + re.sub(r"\W", "_", os.path.abspath(path))
    mod_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
        cfg = module.get_config(arg or None)
    except Exception as e:  # noqa: BLE001 - any failure of the user's file is bad input
        raise PlanError(f"config file {path} failed to load: {type(e).__name__}: {e}") from None
    for item in overrides:
        key, eq, raw = item.partition("=")
        if not eq:
            raise PlanError(f"--set {item!r}: expected key=value")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        node = cfg
        *parents, last = key.split(".")
        try:
            for p in parents:
                node = node[p]
            if last not in node:
                raise KeyError(last)
        except (KeyError, TypeError):
            raise PlanError(f"--set {item!r}: no config field {key!r}") from None
        try:
            node[last] = value
        except (TypeError, ValueError) as e:  # ml_collections keeps a field's type
            raise PlanError(f"--set {item!r}: {key} {value!r}: {e}") from None
    return cfg


# ------------------------------------------------------------------------------ mesh
def resolve_mesh(spec: str, devices: int | None = None) -> tuple[int, int, int]:
    """``--mesh`` (and ``--devices``) -> (data, fsdp, tensor). Without ``devices`` the device
    count is the product of the sizes named; an axis left to -1 then needs ``devices``."""
    from emit_jax import parallel

    try:
        axes = parallel.parse_mesh(spec)
    except ValueError as e:
        raise PlanError(f"bad --mesh {spec!r}: {e}") from None
    if devices is None:
        named = set(re.findall(r"(\w+)\s*=", spec))
        rest = [a for a, v in axes.items() if v == -1]
        if rest and rest[0] in named:
            raise PlanError(f"--mesh {spec!r} leaves {rest[0]} as the rest of the devices (-1); "
                            f"name every size or pass --devices N")
        devices = math.prod(v for v in axes.values() if v != -1)  # unnamed axes: 1
    if devices < 1:
        raise PlanError(f"--devices {devices}: must be positive")
    try:
        return parallel.mesh_shape(spec, devices)
    except ValueError as e:
        raise PlanError(f"bad --mesh {spec!r}: {e}") from None


def abstract_mesh(shape: Sequence[int]):
    import jax

    from emit_jax.parallel import MESH_AXES

    try:
        return jax.sharding.AbstractMesh(tuple(shape), MESH_AXES)
    except TypeError:  # older signature: ((name, size), ...)
        return jax.sharding.AbstractMesh(tuple(zip(MESH_AXES, shape)))


def shards(axes, shape, mesh, rules=None) -> int:
    """Into how many pieces ``logical_to_spec`` cuts an array (1: replicated)."""
    from emit_jax.parallel import logical_to_spec

    spec = logical_to_spec(tuple(axes), tuple(shape), mesh, rules)
    n = 1
    for entry in spec:
        for a in ((entry,) if isinstance(entry, str) else (entry or ())):
            n *= mesh.shape[a]
    return n


def array_bytes(shape, bits: float, axes, mesh, rules=None) -> tuple[int, int]:
    """(per-device bytes, whole bytes) of an array with logical ``axes``."""
    whole = math.ceil(math.prod(shape) * bits / 8)
    return math.ceil(whole / shards(axes or (), shape, mesh, rules)) if axes else whole, whole


# ------------------------------------------------------------------------------ model
@dataclasses.dataclass(frozen=True)
class Var:
    path: str
    shape: tuple
    bits: int
    axes: tuple | None
    kind: str  # Param, BatchStat, ...


def model_config(cfg, emit: bool):
    """The InternVLConfig a run of ``cfg`` trains: ``arch`` in ``param_dtype`` (the preset's
    vocabulary; +1 entry for ``<COMP_CONTEXT>`` when EMIT is on)."""
    from emit_jax.models import architectures

    kw = {"dtype": cfg.param_dtype} if cfg.get("param_dtype") else {}
    try:
        mcfg = architectures.get_config(cfg.arch, **kw)
    except KeyError as e:
        raise PlanError(str(e).strip("\"'")) from None
    if cfg.get("image_size"):
        mcfg = mcfg.replace(vision=dataclasses.replace(mcfg.vision, image_size=int(cfg.image_size)))
    if emit:
        mcfg = mcfg.replace(text=dataclasses.replace(mcfg.text, vocab_size=mcfg.text.vocab_size + 1))
    return mcfg.validate()


@functools.lru_cache(maxsize=8)
def abstract_variables(mcfg, emit: bool, num_soft_tokens: int = 9,
                       max_readout: bool = False) -> tuple[Var, ...]:
    """Every variable of ``InternVL(mcfg)`` (wrapped in ``EMIT`` when ``emit``; ``mcfg`` then
    already has the ``<COMP_CONTEXT>`` row) from ``nnx.eval_shape``: nothing is allocated."""
    import jax.numpy as jnp
    from flax import nnx

    from emit_jax.models.internvl import InternVL

    if emit:
        from emit_jax.models.emit import EMIT, EMITConfig

        ecfg = EMITConfig(num_soft_tokens=num_soft_tokens, comp_token_id=mcfg.text.vocab_size - 1,
                          max_readout=max_readout)
        build = lambda: EMIT(InternVL(mcfg, rngs=nnx.Rngs(0)), ecfg, rngs=nnx.Rngs(0))  # noqa: E731
    else:
        build = lambda: InternVL(mcfg, rngs=nnx.Rngs(0))  # noqa: E731
    model = nnx.eval_shape(build)
    out = []
    for path, v in nnx.to_flat_state(nnx.state(model)):
        val = v.get_value()
        if not hasattr(val, "shape"):
            continue
        axes = v.get_metadata().get("out_sharding")
        out.append(Var("/".join(map(str, path)), tuple(val.shape), jnp.dtype(val.dtype).itemsize * 8,
                       tuple(axes) if isinstance(axes, (tuple, list)) else None, type(v).__name__))
    return tuple(out)


def lora_factors(variables: Sequence[Var], targets: str, rank: int, bits: int | None = None):
    """``[(kernel Var, A Var, B Var)]`` for every kernel qwix would adapt: a ``kernel`` of 2+
    dims whose module path fully matches ``targets`` (qwix's ``re.fullmatch``)."""
    rx = re.compile(targets)
    out = []
    for v in variables:
        module, _, leaf = v.path.rpartition("/")
        if leaf != "kernel" or len(v.shape) < 2 or v.kind != "Param" or not rx.fullmatch(module):
            continue
        fan_in, fan_out = math.prod(v.shape[:-1]), v.shape[-1]
        ax = v.axes or (None,) * len(v.shape)
        a = Var(v.path + "_lora_a", (fan_in, rank), bits or v.bits,
                (ax[0] if len(v.shape) == 2 else None, None), "LoRAParam")
        b = Var(v.path + "_lora_b", (rank, fan_out), bits or v.bits, (None, ax[-1]), "LoRAParam")
        out.append((v, a, b))
    return out


def qlora_arrays(kernel: Var, qtype: str, tile_size: int | None):
    """The policy's quantized copy of a targeted kernel: qvalue (same axes) + scales."""
    bits = QBITS.get(str(qtype).lower())
    if bits is None:
        raise PlanError(f"grpo.lora.weight_qtype {qtype!r}: unknown; known {sorted(QBITS)}")
    *lead, fan_out = kernel.shape
    fan_in = math.prod(lead)
    blocks = 1 if not tile_size else max(1, math.ceil(fan_in / int(tile_size)))
    ax = kernel.axes or (None,) * len(kernel.shape)
    q = Var(kernel.path + "/qvalue", kernel.shape, bits, kernel.axes, "QArray")
    s = Var(kernel.path + "/scale", (blocks, fan_out), kernel.bits, (None, ax[-1]), "QArray")
    return q, s


TRAIN_BITS = 32  # trained parameters' storage while a stage runs (emit_jax.training.precision)


def _master(v: Var) -> Var:
    """A trained parameter as the stage stores it: float32 (``precision.promote_trainable``)."""
    return dataclasses.replace(v, bits=max(v.bits, TRAIN_BITS))


def _in_full(path: str, names) -> bool:
    return any(n in path.split("/") for n in names)


# ------------------------------------------------------------------------------ shapes
@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything a stage's plan depends on (``dataclasses.replace`` makes what-ifs)."""
    stage: str
    mesh: tuple  # (data, fsdp, tensor)
    batch: int  # sequences per optimizer step
    prompt_len: int
    new_tokens: int  # grpo completion length
    label_tokens: int
    images_per_sample: int
    max_tiles: int
    tile_bucket: int
    lora_rank: int = 0
    lora_targets: str = ""
    qtype: str = ""
    tile_size: int | None = None
    reference: str = "shared"
    train_vision: bool = True
    num_soft_tokens: int = 9
    max_readout: bool = False
    use_contrastive: bool = True
    rotations: int = 4
    ce_layers: int = 4
    remat: bool = False  # memory.remat: every decoder / ViT layer rematerialised
    attention_chunk: int = 0  # memory.attention_chunk: LLM queries in chunks of this many
    micro_batch: int = 0  # rows per micro-batch of the train step (0 = the whole batch)
    vit_chunk: int = 0  # memory.vit_chunk: ViT tiles per chunk (0 = all at once)

    @property
    def micro_batches(self) -> int:
        mb = self.micro_batch
        return self.batch // mb if 0 < mb < self.batch and self.batch % mb == 0 else 1

    @property
    def train_rows(self) -> int:
        """Sequences whose activations the train step holds at once (one micro-batch)."""
        return self.batch // self.micro_batches


def stage_setup(cfg, stage: str, mesh: tuple, *, prompt_len: int | None = None,
                label_tokens: int = 128, images_per_sample: int = 2,
                reference: str = "shared") -> Setup:
    if stage not in STAGES:
        raise PlanError(f"unknown stage {stage!r}; known: {', '.join(STAGES)}")
    if stage not in cfg or cfg.get(stage) is None:
        raise PlanError(f"config has no {stage!r} section")
    sec = cfg[stage]
    buckets = tuple(cfg.data.get("length_buckets", ()) or ())
    if prompt_len is not None and prompt_len < 1:
        raise PlanError(f"--prompt_len {prompt_len}: must be positive")
    p = int(prompt_len or (max(buckets) if buckets else 0))
    if p < 1:
        raise PlanError("no prompt length: the config has no data.length_buckets; pass --prompt_len")
    if label_tokens < 1:
        raise PlanError(f"--label_tokens {label_tokens}: must be positive")
    max_tiles = int(cfg.data.get("max_tiles", 1))
    kw: dict[str, Any] = {}
    if stage == "grpo":
        g = cfg.grpo
        batch = int(g.prompts_per_step) * int(g.G)
        kw.update(new_tokens=int(g.max_new_tokens), tile_bucket=batch * 2 * max_tiles)
    else:
        if not sec.get("batch_size"):
            raise PlanError(f"config section {stage!r} has no batch_size")
        batch = int(sec.batch_size)
        kw.update(new_tokens=0, tile_bucket=4)
    if stage in LORA_STAGES:
        lcfg = cfg.grpo.lora
        kw.update(lora_rank=int(lcfg.rank), lora_targets=str(lcfg.targets),
                  qtype=str(lcfg.get("weight_qtype", "") or ""),
                  tile_size=(int(lcfg.tile_size) if lcfg.get("tile_size") else None))
    emit = cfg.get("emit") or {}
    mem = cfg.get("memory") or {}
    try:
        remat, chunk = mem.get("remat", False), int(mem.get("attention_chunk", 0) or 0)
    except (TypeError, ValueError):
        raise PlanError(f"memory.attention_chunk {mem.get('attention_chunk')!r}: not an integer") from None
    if not isinstance(remat, (bool, int)) or isinstance(remat, int) and remat not in (0, 1):
        raise PlanError(f"memory.remat {remat!r}: expected True or False")
    if chunk < 0:
        raise PlanError(f"memory.attention_chunk {chunk}: must be >= 0 (0 = off)")
    kw.update(remat=bool(remat), attention_chunk=chunk)
    mb = int(sec.get("micro_batch_size", 0) or 0)
    if mb < 0 or (0 < mb < batch and batch % mb):
        raise PlanError(f"{stage}.micro_batch_size {mb}: must be 0 or divide the step's "
                        f"{batch} rows")
    try:
        vit_chunk = int(mem.get("vit_chunk", 0) or 0)
    except (TypeError, ValueError):
        raise PlanError(f"memory.vit_chunk {mem.get('vit_chunk')!r}: not an integer") from None
    if vit_chunk < 0:
        raise PlanError(f"memory.vit_chunk {vit_chunk}: must be >= 0 (0 = off)")
    kw.update(micro_batch=mb, vit_chunk=vit_chunk)
    return Setup(stage=stage, mesh=tuple(mesh), batch=batch, prompt_len=p,
                 label_tokens=int(label_tokens), images_per_sample=int(images_per_sample),
                 max_tiles=max_tiles, reference=reference,
                 train_vision=bool(sec.get("train_vision", True)),
                 num_soft_tokens=int(emit.get("num_soft_tokens", 9)),
                 max_readout=bool(emit.get("max_readout", False)),
                 use_contrastive=bool(emit.get("use_contrastive", True)),
                 rotations=int(emit.get("rotations", 4)), **kw)


# ------------------------------------------------------------------------------ the plan
@dataclasses.dataclass
class Row:
    name: str
    phase: str  # resident | rollout | train
    per_device: int
    whole: int
    note: str = ""


@dataclasses.dataclass
class StagePlan:
    setup: Setup
    rows: list
    info: dict

    def phase(self, name: str) -> int:
        return sum(r.per_device for r in self.rows if r.phase == name)

    @property
    def resident(self) -> int:
        return self.phase("resident")

    @property
    def rollout(self) -> int:
        return self.phase("rollout")

    @property
    def train(self) -> int:
        return self.phase("train")

    @property
    def total(self) -> int:
        return self.resident + max(self.rollout, self.train)

    def whole(self, name: str | None = None) -> int:
        return sum(r.whole for r in self.rows if name is None or r.phase == name)

    @property
    def whole_total(self) -> int:
        return self.whole("resident") + max(self.whole("rollout"), self.whole("train"))


@dataclasses.dataclass(frozen=True)
class _Split:
    """Per-device divisors of the activation dimensions (1 everywhere = the whole job)."""
    b: int = 1  # sequences
    tiles: int = 1
    ce: int = 1
    t_h: int = 1
    t_kv: int = 1
    t_f: int = 1
    t_v: int = 1
    t_vh: int = 1
    t_vf: int = 1


def _split(mcfg, mesh, batch: int, tiles: int, ce: int) -> _Split:
    t, v = mcfg.text, mcfg.vision

    def one(name, n):
        return shards((name,), (n,), mesh) if n else 1

    return _Split(b=one("batch", batch), tiles=one("batch", tiles), ce=one("batch", ce),
                  t_h=one("heads", t.num_attention_heads), t_kv=one("kv_heads", t.num_key_value_heads),
                  t_f=one("mlp", t.intermediate_size), t_v=one("vocab", t.vocab_size),
                  t_vh=one("vit_heads", v.num_attention_heads), t_vf=one("vit_mlp", v.intermediate_size))


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def activation_terms(mcfg, s: Setup, sp: _Split, *, vit_trained: bool, mm_trained: bool,
                     emit: bool) -> dict[str, float]:
    """The formulas of the module docstring, in bytes, for one device's share ``sp``."""
    t, v = mcfg.text, mcfg.vision
    import jax.numpy as jnp

    from emit_jax.models.config import dtype_from_name

    c = jnp.dtype(dtype_from_name(mcfg.dtype)).itemsize
    D, F, H, KVH, Dh, L, V = (t.hidden_size, t.intermediate_size, t.num_attention_heads,
                              t.num_key_value_heads, t.head_size, t.num_hidden_layers, t.vocab_size)
    Dv, Fv, Hv, Lv = v.hidden_size, v.intermediate_size, v.num_attention_heads, v.num_hidden_layers
    p = v.grid * v.grid + 1  # ViT tokens per tile (CLS + patches)
    k_img = mcfg.tokens_per_tile
    P, N = s.prompt_len, s.new_tokens
    T = P + N
    b = _ceil_div(s.batch, sp.b)
    tiles, ce = _tiles(mcfg, s), (s.batch if emit and s.use_contrastive else 0)
    tiles_d, ce_d = _ceil_div(tiles, sp.tiles), _ceil_div(ce, sp.ce)
    ce_tiles_d = ce_d * (1 + s.rotations)

    # one decoder layer's residuals for the backward pass, per token (the constants are what
    # jax's saved_residuals lists for Qwen2DecoderLayer / VisionLayer; see the docstring):
    # r_lin without the attention scores, r_att the scores' share
    llm_lin = (2 * (4 + 2 * c) * D + c * (2 * H * Dh / sp.t_h + 2 * KVH * Dh / sp.t_kv + 4 * Dh)
               + 6 * c * F / sp.t_f + 16 + 8 * H / sp.t_h)
    C = int(s.attention_chunk)
    chunked = 0 < C < T
    T_c = _ceil_div(T, C) * C if chunked else T  # queries padded to a multiple of the chunk
    if chunked:
        # the checkpointed chunk map saves only its inputs: the padded queries (in place of q,
        # which r_lin counts) and the padded mask chunks (one array for all layers: XLA's CSE)
        llm_att = c * H / sp.t_h * Dh * (T_c - T) / T
        att_ws = b * H / sp.t_h * C * T * (12 + 2 * c)  # one chunk's scores, recomputed + grads
        mask = b * (T + T_c) * T
    else:
        llm_att = (9 + c) * H / sp.t_h * T  # mask 1 + masked scores 4 + exp 4 + probs c
        att_ws = b * T * 4 * H / sp.t_h * T  # float32 gradient of the scores
        mask = b * T * T
    layer = b * T * (llm_lin + llm_att)  # one layer's residuals
    final = b * T * D * (4 + 2 * c)  # the final norm's
    if s.remat:  # layer inputs + the shared mask / rotary tables; one layer recomputed at a time
        llm_saved = L * b * T * D * c + b * T * 8 * Dh + mask + final
        # + a second layer's non-attention residuals: what XLA's memory-minimising schedule
        # shows (as if the next layer's recomputation overlapped this one's backward)
        llm_ws = layer + b * T * (2 * llm_lin + 4 * D) + att_ws
    else:
        llm_saved = L * layer + mask + final
        llm_ws = b * T * (llm_lin + 4 * D) + att_ws
    # one ViT block's residuals, per token (only with trainable ViT weights)
    vit_tok = (2 * (12 + c) * Dv + c * (4 * Dv / sp.t_vh + 2 * Dv) + 4 * c * Fv / sp.t_vf
               + (4 + c) * Hv / sp.t_vh * p)
    # forward-only working sets of one layer, per token (attention matrix: f32 scores, f32
    # softmax, compute-dtype probabilities)
    vit_fwd_tok = Hv / sp.t_vh * p * (8 + c) + c * (4 * Dv / sp.t_vh + 2 * Fv / sp.t_vf + 2 * Dv) + 4 * Dv
    ce_keep = 2 * s.ce_layers * ce_tiles_d * p * Dv * c  # the read-out layers and their stack
    Kv = int(s.vit_chunk)
    # memory.vit_chunk: one chunk of K tiles (spread over the tile shards) at a time
    run_d = min(tiles_d, _ceil_div(Kv, sp.tiles)) if Kv else tiles_d
    run_ce = min(ce_tiles_d, _ceil_div(Kv, sp.ce)) if Kv else ce_tiles_d
    vit_fwd = max(run_d * p * vit_fwd_tok + (tiles_d * p * Dv * c if Kv else 0),
                  run_ce * p * vit_fwd_tok + ce_keep)

    out: dict[str, float] = {"b": b, "tiles_per_device": tiles_d, "ce_tiles_per_device": ce_tiles_d}
    vit_layer = run_d * p * vit_tok if vit_trained else 0.0
    if not vit_trained:
        vit_saved = vit_bwd = 0.0
    elif Kv:  # checkpointed chunks: the outputs of all tiles; one chunk recomputed at a time
        vit_saved = tiles_d * p * Dv * c
        vit_bwd = vit_saved + (Lv * run_d * p * Dv * c if s.remat else Lv * vit_layer) \
            + 2 * vit_layer
    else:
        vit_saved = Lv * tiles_d * p * Dv * c if s.remat else Lv * vit_layer
        vit_bwd = vit_saved + 2 * vit_layer if s.remat else 0.0  # one block recomputed + grads
    mm_saved = tiles_d * k_img * ((12 + c) * 4 * Dv + 5 * c * D) if (mm_trained or vit_trained) else 0.0
    # the attention scores' share of the train peak (saved per layer, or one layer / one chunk)
    out["attention_saved"] = att_ws + mask + (0 if chunked else (1 if s.remat else L) * b * T * llm_att)
    out["vit_saved"], out["mm_saved"], out["llm_saved"], out["llm_workspace"] = (
        vit_saved, mm_saved, llm_saved, llm_ws)
    out["vit_forward"] = vit_saved + vit_fwd
    out["activations"] = max(out["vit_forward"], vit_saved + mm_saved + llm_saved + llm_ws, vit_bwd)
    K = N if s.stage == "grpo" else min(s.label_tokens, P)
    out["logits"] = b * K * V / sp.t_v * (3 * 4 + c)
    if s.stage == "grpo":
        S = P + N
        out["kv_cache"] = 2 * L * b * S * KVH / sp.t_kv * Dh * c
        llm_fwd_tok = (c * (3 * F / sp.t_f + 2 * H * Dh / sp.t_h + 2 * KVH * Dh / sp.t_kv)
                       + D * (4 + 4 * c))
        if 0 < C < P:  # one chunk of scores at a time + the padded mask chunks
            P_c = _ceil_div(P, C) * C
            att = b * C * H / sp.t_h * S * (8 + c) + b * P_c * S + c * b * (P_c - P) * H / sp.t_h * Dh
        else:
            att = b * P * H / sp.t_h * S * (8 + c)
        prefill_llm = b * P * llm_fwd_tok + att + b * P * S + 2 * b * V / sp.t_v * 4
        out["prefill_attention"] = att
        out["prefill"] = max(prefill_llm, vit_fwd + tiles_d * k_img * D * c)
    return out


def _tiles(mcfg, s: Setup) -> int:
    """Image tiles of one step, padded as the pipeline pads them."""
    if s.stage == "warmup" or s.images_per_sample <= 0:
        return 0
    per_image = s.max_tiles + 1 if s.max_tiles > 1 else 1  # + the thumbnail
    per_seq = min(s.images_per_sample * per_image, s.prompt_len // mcfg.tokens_per_tile)
    n = s.batch * per_seq
    bucket = max(1, s.tile_bucket)
    return max(bucket, _ceil_div(n, bucket) * bucket) if n else 0


@functools.lru_cache(maxsize=32)
def _optimizer_leaves(trainable: tuple) -> tuple:
    """``(shape, bits, Var or None)`` of every leaf of the project's AdamW state on
    ``trainable``, from ``jax.eval_shape(tx.init)`` (cached: what-ifs re-plan often)."""
    import jax
    import jax.numpy as jnp

    from emit_jax.training.sft import OptimConfig, make_optimizer

    dtypes = {8: jnp.int8, 16: jnp.bfloat16, 32: jnp.float32, 64: jnp.float64}
    params = {v.path: jax.ShapeDtypeStruct(v.shape, dtypes.get(v.bits, jnp.float32))
              for v in trainable}
    byname = {v.path: v for v in trainable}
    state = jax.eval_shape(make_optimizer(OptimConfig()).init, params)
    out = []
    for kp, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        keys = [getattr(k, "key", None) for k in kp]
        var = next((byname[k] for k in keys if isinstance(k, str) and k in byname), None)
        if var is not None and tuple(leaf.shape) != var.shape:
            var = None
        out.append((tuple(leaf.shape), jnp.dtype(leaf.dtype).itemsize * 8, var))
    return tuple(out)


def optimizer_bytes(trainable: Sequence[Var], mesh) -> tuple[int, int]:
    """(per device, whole) bytes of ``nnx.Optimizer(model, make_optimizer(...), wrt)``'s state
    on ``trainable``: AdamW's moments (each sharded like its parameter) and counters, + the
    optimizer's uint32 step."""
    per = whole = 4
    for shape, bits, var in _optimizer_leaves(tuple(trainable)):
        pd, wh = array_bytes(shape, bits, var.axes if var is not None else None, mesh)
        per, whole = per + pd, whole + wh
    return per, whole


def plan_stage(cfg, s: Setup, *, mcfg=None, variables=None) -> StagePlan:
    """The plan of one stage (``mcfg`` / ``variables`` override the config's model: tests)."""
    from emit_jax.training.grpo import TRAINED_IN_FULL

    emit = s.stage in EMIT_STAGES
    if mcfg is None:
        mcfg = model_config(cfg, emit)
    if variables is None:
        variables = abstract_variables(mcfg, emit, s.num_soft_tokens if emit else 9,
                                       s.max_readout and emit)
    mesh = abstract_mesh(s.mesh)
    n_dev = math.prod(s.mesh)
    rows: list[Row] = []

    def total(vs, m=mesh):
        per = whole = 0
        for v in vs:
            pd, wh = array_bytes(v.shape, v.bits, v.axes, m)
            per, whole = per + pd, whole + wh
        return per, whole

    # trained parameters are stored in float32 while the stage runs (training.precision):
    # the soft prompt / projector / mlp1 copies, the LoRA factors, their gradients and AdamW state
    lora = lora_factors(variables, s.lora_targets, s.lora_rank, bits=TRAIN_BITS) \
        if s.stage in LORA_STAGES else []
    targeted = {k.path for k, _, _ in lora}
    lora_vars = [x for _, a, b in lora for x in (a, b)]
    quant = []
    if s.qtype and lora:
        quant = [x for k, _, _ in lora for x in qlora_arrays(k, s.qtype, s.tile_size)]

    # trainable set
    if s.stage in ("warmup", "base"):
        trained_full = [v for v in variables if v.kind == "Param"
                        and (s.train_vision or not v.path.startswith("vision_tower/"))]
    elif s.stage == "sft":
        trained_full = [v for v in variables if v.kind == "Param"
                        and _in_full(v.path, ("soft_prompt", "projector"))]
    else:
        trained_full = [v for v in variables if v.kind == "Param" and _in_full(v.path, TRAINED_IN_FULL)]
    trained_full = [_master(v) for v in trained_full]
    trainable = trained_full + lora_vars
    master = {v.path: v for v in trained_full}
    policy_vars = [master.get(v.path, v) for v in variables if not (quant and v.path in targeted)]
    rows.append(Row("weights", "resident", *total(policy_vars),
                    "model variables" + (" except the QLoRA-targeted kernels" if quant else "")
                    + (f"; the {len(trained_full)} trained arrays in float32" if any(
                        v.bits > 16 for v in trained_full) else "")))
    if quant:
        rows.append(Row("qlora weights", "resident", *total(quant),
                        f"{s.qtype} targeted kernels + per-{'tile' if s.tile_size else 'column'} scales"))

    if s.stage in LORA_STAGES:
        full_mods = [master[v.path] for v in variables if v.path in master]
        if s.reference == "copy" and n_dev > 1:
            ref = [master.get(v.path, v) for v in variables]
            note = "separate copy of all weights (--reference copy)"
        else:
            ref = full_mods + ([v for v in variables if v.path in targeted] if quant else [])
            note = "pre-update soft prompt / projector / mlp1" + (
                " + full-precision targeted kernels" if quant else "")
        rows.append(Row("reference", "resident", *total(ref), note))
        rows.append(Row("lora", "resident", *total(lora_vars),
                        f"r={s.lora_rank} on {len(lora)} kernels, float32"))
    rows.append(Row("optimizer", "resident", *optimizer_bytes(trainable, mesh),
                    f"AdamW mu+nu of {sum(math.prod(v.shape) for v in trainable):,} trainable"))

    # activations: this device's share, and the whole job's (unit split)
    llm_trained = s.stage in ("warmup", "base") or any(
        p.startswith(("mllm/language_model/", "language_model/")) for p in targeted)
    vit_trained = (s.stage == "base" and s.train_vision) or any(
        "vision_tower/" in p for p in targeted)
    mm_trained = s.stage in ("base",) + LORA_STAGES
    tiles = _tiles(mcfg, s)
    ce = s.batch if emit and s.use_contrastive else 0
    kw = dict(vit_trained=vit_trained, mm_trained=mm_trained, emit=emit)
    dev = activation_terms(mcfg, s, _split(mcfg, mesh, s.batch, tiles, ce), **kw)
    one = activation_terms(mcfg, s, _Split(), **kw)
    m = s.micro_batches
    if m > 1:  # the train step holds one micro-batch's activations at a time
        st = dataclasses.replace(s, batch=s.train_rows, tile_bucket=max(1, s.tile_bucket // m))
        tiles_t, ce_t = _tiles(mcfg, st), (st.batch if emit and s.use_contrastive else 0)
        dev_t = activation_terms(mcfg, st, _split(mcfg, mesh, st.batch, tiles_t, ce_t), **kw)
        one_t = activation_terms(mcfg, st, _Split(), **kw)
    else:
        dev_t, one_t = dev, one
    if s.stage == "grpo":
        rows.append(Row("kv cache", "rollout", int(dev["kv_cache"]), int(one["kv_cache"]),
                        f"{s.batch} x {s.prompt_len + s.new_tokens} tokens"))
        rows.append(Row("prefill", "rollout", int(dev["prefill"]), int(one["prefill"]),
                        "one layer's forward working set" + (
                            f", queries in chunks of {s.attention_chunk}"
                            if 0 < s.attention_chunk < s.prompt_len else "")))
    gp, gw = total(trainable)
    rows.append(Row("gradients", "train", gp * (2 if m > 1 else 1), gw * (2 if m > 1 else 1),
                    "of the trainable set, float32" + (
                        " (the running sum + one micro-batch's)" if m > 1 else "")))
    micro_note = f"; one micro-batch of {s.train_rows} of {s.batch} rows" if m > 1 else ""
    rows.append(Row("activations", "train", int(dev_t["activations"]), int(one_t["activations"]),
                    _activation_note(s) + micro_note))
    rows.append(Row("logits", "train", int(dev_t["logits"]), int(one_t["logits"]),
                    f"float32, {s.new_tokens if s.stage == 'grpo' else min(s.label_tokens, s.prompt_len)}"
                    " positions per sequence" + micro_note))
    n_params = sum(math.prod(v.shape) for v in variables if v.kind == "Param")
    info = dict(arch=cfg.arch if cfg is not None else "", emit=emit, dtype=mcfg.param_dtype,
                compute_dtype=mcfg.dtype, parameters=n_params, trainable=sum(
                    math.prod(v.shape) for v in trainable), lora_kernels=len(lora),
                devices=n_dev, batch=s.batch, batch_per_device=int(dev["b"]),
                micro_batches=m, micro_batch=s.train_rows,
                micro_batch_per_device=int(dev_t["b"]),
                prompt_len=s.prompt_len, new_tokens=s.new_tokens,
                train_len=s.prompt_len + s.new_tokens, tiles=tiles,
                tiles_per_device=int(dev["tiles_per_device"]),
                ce_tiles_per_device=int(dev["ce_tiles_per_device"]),
                attention_saved=int(dev_t["attention_saved"]),
                prefill_attention=int(dev.get("prefill_attention", 0)),
                remat=s.remat, attention_chunk=s.attention_chunk,
                vit_trained=vit_trained, llm_trained=llm_trained)
    return StagePlan(s, rows, info)


def _activation_note(s: Setup) -> str:
    t = s.prompt_len + s.new_tokens
    chunk = f", attention in {s.attention_chunk}-query chunks" if 0 < s.attention_chunk < t else ""
    if s.remat:
        return "remat: layer inputs + one layer recomputed + workspace" + chunk
    return "residuals of every layer (no remat) + workspace" + chunk


# ------------------------------------------------------------------------------ verdict
def _variant(s: Setup, **changes) -> Setup:
    """``s`` with ``changes``; grpo's tile bucket follows its batch and ``max_tiles``."""
    s2 = dataclasses.replace(s, **changes)
    if s2.stage == "grpo":
        s2 = dataclasses.replace(s2, tile_bucket=s2.batch * 2 * s2.max_tiles)
    return s2


def _knobs(cfg, s: Setup) -> list[tuple[str, list]]:
    """One-change what-ifs, mildest first: ``(knob, [(label, Setup), ...])``."""
    d, f, t = s.mesh
    knobs = []
    # gradient accumulation first: the same update, one micro-batch's activations at a time
    cur = s.train_rows
    micro = [mb for mb in (s.batch // 2 ** k for k in range(1, 12))
             if mb < cur and mb >= d * f and s.batch % mb == 0 and mb % (d * f) == 0]
    if micro:
        knobs.append(("gradient accumulation", [(f"--set {s.stage}.micro_batch_size={mb}",
                                                 _variant(s, micro_batch=mb)) for mb in micro]))
    # the memory switches first: same training, more compute (emit_jax.models.memory)
    if not s.remat:
        knobs.append(("rematerialisation", [("--set memory.remat=True", _variant(s, remat=True))]))
    chunks = (1024, 512, 256, 128)
    if not s.attention_chunk:
        knobs.append(("query-chunked attention", [(f"--set memory.attention_chunk={c}",
                                                   _variant(s, attention_chunk=c)) for c in chunks]))
    else:
        knobs.append(("smaller attention chunks", [(f"--set memory.attention_chunk={c}",
                                                    _variant(s, attention_chunk=c))
                                                   for c in chunks if c < s.attention_chunk]))
    if not s.vit_chunk:
        knobs.append(("ViT in tile chunks", [(f"--set memory.vit_chunk={k}", _variant(s, vit_chunk=k))
                                             for k in (64, 32, 16, 8)]))
    if s.stage in LORA_STAGES and s.lora_rank and re.search(r"vision|attention/|fc1|fc2",
                                                             s.lora_targets):
        llm_only = rf"(?=.*language_model/)(?:{s.lora_targets})"
        knobs.append(("LoRA on the LLM only", [("no LoRA on the ViT (grpo.lora.targets "
                                                "restricted to language_model/)",
                                                _variant(s, lora_targets=llm_only))]))
    if s.max_tiles > 1:
        knobs.append(("fewer tiles", [(f"--set data.max_tiles={m}", _variant(s, max_tiles=m))
                                      for m in range(s.max_tiles - 1, 0, -1)]))
    buckets = sorted({int(x) for x in (cfg.data.get("length_buckets", ()) if cfg is not None else ())}
                     or {s.prompt_len // 2 ** k for k in range(1, 4)}, reverse=True)
    prompts = ("shorter prompts", [(f"--prompt_len {n} (data.length_buckets up to {n})",
                                    _variant(s, prompt_len=n)) for n in buckets if n < s.prompt_len])
    knobs.append(prompts)
    if s.stage == "grpo" and cfg is not None:
        g, n = int(cfg.grpo.G), int(cfg.grpo.prompts_per_step)
        knobs.append(("fewer G", [(f"--set grpo.G={g2}", _variant(s, batch=n * g2))
                                  for g2 in (g // 2 ** k for k in range(1, 8)) if g2 >= 2]))
    else:
        knobs.append(("smaller batch", [(f"--set {s.stage}.batch_size={b2}", _variant(s, batch=b2))
                                        for b2 in (s.batch // 2 ** k for k in range(1, 12)) if b2 >= 1]))
    knobs.append(("larger fsdp", [(f"--mesh fsdp={f * 2 ** k} ({d * f * 2 ** k * t} devices)",
                                   _variant(s, mesh=(d, f * 2 ** k, t)))
                                  for k in range(1, 13) if d * f * 2 ** k * t <= 4096]))
    return knobs


def suggestions(cfg, plan: StagePlan, usable: int, mcfg=None) -> list[str]:
    """What-ifs that change one thing and re-plan (cheap: the abstract model is cached), then
    the knobs combined greedily (each at its mildest fitting level, else its strongest)."""
    s = plan.setup

    def total(s2):
        return plan_stage(cfg, s2, mcfg=mcfg).total

    def gib(x):
        return f"{x / GiB:.1f} GiB"

    out = []
    now = plan.total
    for name, options in _knobs(cfg, s):
        hit = next(((label, tot) for label, s2 in options if (tot := total(s2)) <= usable), None)
        if hit:
            out.append(f"{name}: {hit[0]} needs {gib(hit[1])}")
        elif options:
            label, tot = min(((lb, total(s2)) for lb, s2 in options), key=lambda x: x[1])
            if tot < 0.99 * now:  # knobs that change nothing here are left out
                out.append(f"{name}: not enough alone (at best {label}: {gib(tot)})")
    if s.stage in LORA_STAGES and not s.qtype and (tot := total(_variant(s, qtype="nf4"))) < 0.99 * now:
        out.append(f"QLoRA (--set grpo.lora.weight_qtype=nf4) needs {gib(tot)} (only the policy's "
                   "targeted kernels shrink: the frozen reference keeps full-precision weights)")
    cur, steps = s, {}
    for _ in range(3):  # greedy passes: a knob may start to matter once others moved
        before = dict(steps)
        for name, _ in _knobs(cfg, s):
            if total(cur) <= usable:
                break
            options = dict(_knobs(cfg, cur)).get(name, [])
            if not options:
                continue
            label, chosen = next(((lb, s2) for lb, s2 in options if total(s2) <= usable),
                                 min(options, key=lambda o: total(o[1])))
            if total(chosen) < 0.99 * total(cur):
                cur = chosen
                steps[name] = label
        if steps == before or total(cur) <= usable:
            break
    steps = list(steps.values())
    if len(steps) > 1:
        tot = total(cur)
        out.append(f"combined: {'; '.join(steps)} -> {gib(tot)} "
                   f"({'fits' if tot <= usable else 'still does not fit'})")
    att = plan.info["attention_saved"]
    if plan.train and att > 0.4 * plan.train and not s.attention_chunk:
        out.append(f"the materialised [b, H, T, T] attention matrices are {gib(att)} of the train "
                   f"step's {gib(plan.train)}: memory.attention_chunk (and memory.remat) remove "
                   "most of it")
    return out


def make_report(cfg, config_path: str, mesh: tuple, device: str, headroom: float, *,
                stage: str | None = None, prompt_len: int | None = None, label_tokens: int = 128,
                images_per_sample: int = 2, reference: str = "shared", want_suggestions=True) -> dict:
    """The full plan as a JSON-able dict (``plan`` holds the chosen stage's StagePlan)."""
    capacity = device_capacity(device)
    if not 0 <= headroom < 100:
        raise PlanError(f"--headroom {headroom}: a percentage in [0, 100)")
    stages = [x for x in cfg.get("stages", ()) if x in STAGES]
    if stage is not None:
        if stage not in STAGES:
            raise PlanError(f"unknown stage {stage!r}; known: {', '.join(STAGES)}")
        chosen = [stage]
    else:
        if not stages:
            raise PlanError(f"config lists no known stage ({', '.join(STAGES)}); pass --stage")
        chosen = stages
    plans = {}
    for st in chosen:
        s = stage_setup(cfg, st, mesh, prompt_len=prompt_len, label_tokens=label_tokens,
                        images_per_sample=images_per_sample, reference=reference)
        plans[st] = plan_stage(cfg, s)
    worst = max(plans, key=lambda k: plans[k].total)
    plan = plans[worst]
    usable = int(capacity * (1 - headroom / 100))
    fits = plan.total <= usable
    rep = dict(
        config=config_path, stage=worst, stages={k: p.total for k, p in plans.items()},
        mesh=dict(zip(("data", "fsdp", "tensor"), mesh)), devices=math.prod(mesh),
        device=device, device_note=DEVICES[device][1], capacity=capacity, headroom_pct=headroom,
        usable=usable, fits=fits, unit="bytes; GiB = 2**30",
        rows=[dataclasses.asdict(r) for r in plan.rows],
        resident=plan.resident, rollout=plan.rollout, train=plan.train, total=plan.total,
        whole=dict(resident=plan.whole("resident"), rollout=plan.whole("rollout"),
                   train=plan.whole("train"), total=plan.whole_total),
        info=plan.info, setup=dataclasses.asdict(plan.setup),
        suggestions=[] if fits or not want_suggestions else suggestions(cfg, plan, usable),
        plan=plan)
    return rep


def format_report(rep: dict) -> str:
    plan: StagePlan = rep["plan"]
    info, s = plan.info, plan.setup
    g = lambda x: f"{x / GiB:10.2f}"  # noqa: E731
    mesh = " ".join(f"{k}={v}" for k, v in rep["mesh"].items())
    lines = [
        f"memory plan: {rep['config']}, stage {rep['stage']}"
        + (f" (of {', '.join(rep['stages'])}: largest)" if len(rep["stages"]) > 1 else ""),
        f"model {info['arch']}{' + EMIT' if info['emit'] else ''}: {info['parameters'] / 1e9:.3f} B "
        f"parameters in {info['dtype']}, {info['trainable']:,} trainable"
        + (f" (LoRA r={s.lora_rank} on {info['lora_kernels']} kernels"
           + (f", QLoRA {s.qtype}" if s.qtype else "") + ")" if s.stage in LORA_STAGES else ""),
        f"mesh {mesh} ({rep['devices']} devices), {rep['device']}: {rep['device_note']}",
        f"step: {info['batch']} sequences ({info['batch_per_device']} per device"
        + (f"; trained in {info['micro_batches']} micro-batches of {info['micro_batch']}, "
           f"{info['micro_batch_per_device']} per device" if info.get("micro_batches", 1) > 1 else "")
        + ") x "
        f"{info['train_len']} tokens (prompt {info['prompt_len']}"
        + (f" + {info['new_tokens']} new" if info["new_tokens"] else "")
        + f"), {info['tiles']} image tiles ({info['tiles_per_device']} per device)",
        f"memory: remat {'on' if s.remat else 'off'}, attention_chunk "
        f"{s.attention_chunk or 'off'}, vit_chunk {s.vit_chunk or 'off'} (config memory.remat / "
        "memory.attention_chunk / memory.vit_chunk)",
        "sizes in GiB (2**30 bytes); whole = unsharded (all sequences of the step, weights once)",
        "",
        f"{'component':<14}{'phase':<10}{'per device':>10}  {'whole':>10}  note",
    ]
    for r in plan.rows:
        lines.append(f"{r.name:<14}{r.phase:<10}{g(r.per_device)}  {g(r.whole)}  {r.note}")
    lines += [
        f"{'resident':<24}{g(plan.resident)}  {g(plan.whole('resident'))}",
        f"{'rollout peak':<24}{g(plan.rollout)}  {g(plan.whole('rollout'))}",
        f"{'train peak':<24}{g(plan.train)}  {g(plan.whole('train'))}",
        f"{'total':<24}{g(plan.total)}  {g(plan.whole_total)}  = resident + max(rollout, train)",
    ]
    if len(rep["stages"]) > 1:
        lines.append("per stage: " + ", ".join(f"{k} {v / GiB:.2f}" for k, v in rep["stages"].items()))
    lines.append("")
    cap, hr = rep["capacity"] / GiB, rep["headroom_pct"]
    if rep["fits"]:
        lines.append(f"fits on {rep['device']} ({plan.total / GiB:.2f} of {cap:.2f} GiB, "
                     f"{hr:g}% reserved)")
    else:
        lines.append(f"does not fit on {rep['device']} ({cap:.2f} GiB, {hr:g}% reserved: "
                     f"{rep['usable'] / GiB:.2f} usable): needs {plan.total / GiB:.2f} GiB; "
                     f"suggestions: " + "; ".join(rep["suggestions"]))
    return "\n".join(lines)


def to_json(rep: dict) -> str:
    out = {k: v for k, v in rep.items() if k != "plan"}
    for r in out["rows"]:
        r["per_device_gib"] = round(r["per_device"] / GiB, 4)
        r["whole_gib"] = round(r["whole"] / GiB, 4)
    out["total_gib"] = round(rep["total"] / GiB, 4)
    out["capacity_gib"] = round(rep["capacity"] / GiB, 4)
    out["usable_gib"] = round(rep["usable"] / GiB, 4)
    return json.dumps(out, indent=1, default=str)


# ------------------------------------------------------------------------------ CLI
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        raise PlanError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m emit_jax.plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="ml_collections config file (path[:arg])")
    p.add_argument("--mesh", default="fsdp=1", help='e.g. "fsdp=8", "data=2,fsdp=4"')
    p.add_argument("--devices", type=int, default=None,
                   help="device count (default: the product of the --mesh sizes)")
    p.add_argument("--device", default="a100-80g", help=", ".join(DEVICES))
    p.add_argument("--headroom", type=float, default=10.0, help="percent of memory reserved")
    p.add_argument("--stage", default=None, help="plan this stage (default: the largest)")
    p.add_argument("--prompt_len", type=int, default=None,
                   help="prompt tokens (default: the largest data.length_buckets)")
    p.add_argument("--label_tokens", type=int, default=128, help="SFT label positions per row")
    p.add_argument("--images_per_sample", type=int, default=2)
    p.add_argument("--reference", choices=("copy", "shared"), default="shared",
                   help="grpo/sft2 on a mesh: arrays shared with the policy (the code) or a "
                        "separate copy of all weights")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. grpo.G=4 (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        if args.device not in DEVICES:
            raise PlanError(f"unknown device {args.device!r}; known: {', '.join(DEVICES)}")
        cfg = load_config(args.config, args.set)
        mesh = resolve_mesh(args.mesh, args.devices)
        rep = make_report(cfg, args.config, mesh, args.device, args.headroom, stage=args.stage,
                          prompt_len=args.prompt_len, label_tokens=args.label_tokens,
                          images_per_sample=args.images_per_sample, reference=args.reference)
    except PlanError as e:
        print(f"emit_jax.plan: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(to_json(rep) if args.json else format_report(rep))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.exit(main())
