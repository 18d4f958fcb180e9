"""The step's arrays, abstract: :class:`Shapes` (counted as ``emit_jax.plan`` counts them), the
batches the training code feeds its programs (``ShapeDtypeStruct``s), and their micro-batch
layout.

With ``<stage>.micro_batch_size`` set, the train step (and GRPO's reference pass) takes its
batch in ``training.micro.split_rows``' layout (:func:`split_layout`), as the training code
feeds it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from emit_jax.errors import AotError
from emit_jax.plan.stage import _tiles, stage_setup
from emit_jax.training.config import EMIT_STAGES


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


def step_shapes(cfg, stage: str, mesh_shape, mcfg, *, prompt_len=None, label_tokens=128,
                images_per_sample=2) -> tuple[Shapes, Any]:
    """(:class:`Shapes`, ``plan.Setup``) of one step of ``stage``, from plan's ``stage_setup``
    and ``_tiles`` so that the compiled programs and the plan count the same arrays."""
    from emit_jax.training import micro

    s = stage_setup(cfg, stage, tuple(mesh_shape), prompt_len=prompt_len,
                    label_tokens=label_tokens, images_per_sample=images_per_sample)
    emit = stage in EMIT_STAGES
    ce = s.batch if emit and s.use_contrastive else 1
    per_image = s.max_tiles + 1 if s.max_tiles > 1 else 1  # + the thumbnail, as plan's _tiles
    row_tiles = 0 if stage == "warmup" else \
        min(s.images_per_sample * per_image, s.prompt_len // mcfg.tokens_per_tile)
    what = "grpo.prompts_per_step x grpo.G" if stage == "grpo" else f"{stage}.batch_size"
    try:
        m = micro.micro_count(s.batch, int(cfg[stage].get("micro_batch_size", 0) or 0), what)
    except ValueError as e:
        raise AotError(f"{stage}.micro_batch_size: {e}") from None
    return Shapes(batch=s.batch, prompt_len=s.prompt_len, new_tokens=s.new_tokens,
                  label_tokens=min(s.label_tokens, s.prompt_len), tiles=_tiles(mcfg, s),
                  ce=ce, image_size=mcfg.vision.image_size, row_tiles=row_tiles, micro=m), s


def _sds(shape, dtype):
    import jax

    return jax.ShapeDtypeStruct(tuple(shape), dtype)


def sft_batch(sh: Shapes, stage: str) -> dict:
    """``training.sft.to_device``'s batch, abstract (see :mod:`emit_jax.aot.programs`)."""
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
