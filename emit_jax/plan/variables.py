"""The model's variables without allocating them: shapes, bits and logical axes of every
variable of a stage's model (``nnx.eval_shape``), the LoRA factors qwix would add (analytic) and
QLoRA's quantized kernels, and trained parameters as a stage stores them (float32)."""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Sequence

from emit_jax.errors import PlanError

QBITS = {"nf4": 4, "int4": 4, "uint4": 4, "fp4": 4, "int8": 8, "uint8": 8,
         "float8_e4m3fn": 8, "float8_e5m2": 8, "fp8": 8}


@dataclasses.dataclass(frozen=True)
class Var:
    path: str
    shape: tuple
    bits: int
    axes: tuple | None
    kind: str  # Param, BatchStat, ...


TINY_VOCAB = 4096  # the bound of the tiny tokenizer train makes without a tokenizer of its own


def vocabulary(cfg) -> tuple[int | None, int | None, str]:
    """``(rows, image token id, how)``: the embedding rows, before EMIT's ``<COMP_CONTEXT>``,
    of a run that starts from random weights (``init_from`` empty): train fits the
    architecture's vocabulary to the tokenizer (``stages.build_initial_model``), the config's
    ``tokenizer`` when set, else the tiny tokenizer it trains on the data (at most
    :data:`TINY_VOCAB` entries; the bound is planned, its ``<IMG_CONTEXT>`` at the id it would
    then have). ``(None, None, ...)`` when the model comes from ``init_from`` (its own
    vocabulary), and for the InternVL3 presets, whose runs start from the released checkpoint
    (their configs require ``init_from``): the checkpoint's vocabulary is planned."""
    if cfg.get("init_from") or str(cfg.get("arch", "")).startswith("internvl3_"):
        return None, None, "the checkpoint's"
    path = cfg.get("tokenizer") or ""
    if not path:
        from emit_jax.data.tokenizer import EMIT_TOKENS

        img = TINY_VOCAB - len(EMIT_TOKENS) + EMIT_TOKENS.index("<IMG_CONTEXT>")
        return (TINY_VOCAB - 1, img,
                f"at most {TINY_VOCAB:,} entries (the tiny tokenizer train makes)")
    return _tokenizer_vocabulary(path)


@functools.lru_cache(maxsize=4)
def _tokenizer_vocabulary(path: str) -> tuple[int, int | None, str]:
    """:func:`vocabulary` of the tokenizer folder ``path``, read once (a plan asks it for every
    stage and every suggestion it sizes)."""
    from emit_jax.data.tokenizer import COMP_TOKEN, load_tokenizer, token_id
    from emit_jax.errors import USER_ERRORS

    try:
        tok = load_tokenizer(path)
    except USER_ERRORS as e:
        raise PlanError(f"config tokenizer: {e}") from None
    return (len(tok) - (token_id(tok, COMP_TOKEN) is not None),
            token_id(tok, "<IMG_CONTEXT>"), f"{len(tok):,} entries (tokenizer {path})")


def init_from_config(cfg):
    """The model config of ``init_from`` as train reads it (an HF folder's ``config.json``, an
    emit_jax model checkpoint's ``emit_jax.json``; ``param_dtype`` and ``image_size`` applied),
    None without ``init_from``. One ``PlanError`` line where train would refuse it (before, a
    training checkpoint, a broken ``config.json`` or a missing folder planned the config's
    ``arch`` without a word: twentieth probe C64 / C65)."""
    import os

    from emit_jax import checkpoint, hf
    from emit_jax.errors import USER_ERRORS
    from emit_jax.models.config import InternVLConfig

    init_from = cfg.get("init_from") or ""
    if not init_from:
        return None
    if not os.path.isdir(init_from):
        raise PlanError(f"config init_from: {init_from!r} is not a folder (an HF folder or an "
                        "emit_jax checkpoint)")
    try:
        if os.path.isfile(os.path.join(init_from, "config.json")):
            mcfg = hf.read_config(init_from)[0]
        else:
            mcfg = InternVLConfig.from_json_dict(checkpoint.read_meta(init_from)["config"])
    except USER_ERRORS + (KeyError, TypeError) as e:
        raise PlanError(f"config init_from: {e}") from None
    if cfg.get("param_dtype"):
        mcfg = mcfg.replace(param_dtype=cfg.param_dtype, dtype=cfg.param_dtype)
    if cfg.get("image_size"):
        mcfg = mcfg.replace(vision=dataclasses.replace(mcfg.vision, image_size=int(cfg.image_size)))
    return mcfg


def model_config(cfg, emit: bool):
    """The InternVLConfig a run of ``cfg`` trains, as train builds it: ``init_from``'s
    ``config.json`` when it has one, else ``arch`` (``param_dtype``, ``image_size`` applied) with
    the vocabulary of :func:`vocabulary` (before, the architecture's full 151,674 rows were
    planned for a run that trains a 1,821-token tokenizer: 20.6 M planned parameters against
    1.43 M); +1 entry for ``<COMP_CONTEXT>`` when EMIT is on."""
    from emit_jax.models import architectures
    from emit_jax.training.validate import starting_config

    mcfg = init_from_config(cfg) or starting_config(cfg)[0]  # (a bad param_dtype: ConfigError)
    if mcfg is None:  # no such arch: get_config's KeyError names the known ones
        try:
            mcfg = architectures.get_config(cfg.arch)
        except KeyError as e:
            raise PlanError(str(e).strip("\"'")) from None
    rows, img, _ = vocabulary(cfg)
    if rows is not None:
        mcfg = mcfg.replace(text=dataclasses.replace(mcfg.text, vocab_size=rows),
                            image_token_id=img)
    if emit:
        mcfg = mcfg.replace(text=dataclasses.replace(mcfg.text, vocab_size=mcfg.text.vocab_size + 1))
    return mcfg.validate()


@functools.lru_cache(maxsize=8)
def abstract_variables(mcfg, emit: bool, num_soft_tokens: int = 9,
                       max_readout: bool = False, peak_location: bool = False,
                       hot_patches: int = 0) -> tuple[Var, ...]:
    """Every variable of ``InternVL(mcfg)`` (wrapped in ``EMIT`` when ``emit``; ``mcfg`` then
    already has the ``<COMP_CONTEXT>`` row) from ``nnx.eval_shape``: nothing is allocated."""
    import jax.numpy as jnp
    from flax import nnx

    from emit_jax.models.internvl import InternVL

    if emit:
        from emit_jax.models.emit import EMIT, EMITConfig

        ecfg = EMITConfig(num_soft_tokens=num_soft_tokens, comp_token_id=mcfg.text.vocab_size - 1,
                          max_readout=max_readout, peak_location=peak_location,
                          hot_patches=hot_patches)
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
    from emit_jax.training.config import check_lora_rank  # (train's check, said alike)

    check_lora_rank(rank, {k.path.rpartition("/")[0]: (k.shape[-2], k.shape[-1]) for k, _, _ in out})
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
