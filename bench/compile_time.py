"""``python -m bench compile_time``: how long XLA takes to build one training step (forward +
backward of a cross-entropy-like loss, text and images) at full depth, with the layers unrolled
and stacked under ``lax.scan`` (``InternVLConfig.scan_layers``), optionally under
``memory.remat``. The model is abstract (``nnx.eval_shape``): nothing is allocated or run, only
traced (``jax.jit(...).lower``) and compiled (``.compile()``).

Default shape: ``--arch small``'s narrow decoder (hidden 512) at InternVL3-2B/8B's 28 layers
behind ``tiny``'s narrow ViT (hidden 64) at InternViT-300M's 24 blocks, 224 px tiles.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp


def _config(arch: str, text_layers: int, vit_layers: int, scan: bool):
    from emit_jax.models import architectures

    cfg = architectures.get_config(arch)
    return cfg.replace(
        text=dataclasses.replace(cfg.text, num_hidden_layers=text_layers),
        vision=dataclasses.replace(cfg.vision, num_hidden_layers=vit_layers), scan_layers=scan)


def _step_inputs(cfg, batch: int, seq_len: int):
    """Abstract ``ids [B, T], pixel_values [B, 3, H, W] (one tile a row), mask [B, T]``."""
    size = cfg.vision.image_size
    return (jax.ShapeDtypeStruct((batch, seq_len), jnp.int32),
            jax.ShapeDtypeStruct((batch, 3, size, size), jnp.float32),
            jax.ShapeDtypeStruct((batch, seq_len), jnp.int32))


def compile_time(arch: str, text_layers: int, vit_layers: int, batch: int, seq_len: int,
                 scan: bool, remat: bool, remat_policy: str) -> dict:
    """Seconds to trace + lower and to compile the step, for one setting."""
    from flax import nnx

    from emit_jax.models.internvl import InternVL
    from emit_jax.models.memory import memory_options

    cfg = _config(arch, text_layers, vit_layers, scan)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: InternVL(cfg, rngs=nnx.Rngs(0))))
    ids, px, mask = _step_inputs(cfg, batch, seq_len)

    def step(state, ids, px, mask):
        def loss(st):
            logits = nnx.merge(graphdef, st)(ids, px, mask)
            return jnp.mean(jax.nn.logsumexp(logits.astype(jnp.float32), -1))
        return jax.value_and_grad(loss)(state)

    with memory_options(remat=remat, remat_policy=remat_policy):
        t0 = time.perf_counter()
        lowered = jax.jit(step).lower(state, ids, px, mask)
        t1 = time.perf_counter()
        lowered.compile()
        t2 = time.perf_counter()
    return {"bench": "compile_time", "arch": arch, "text_layers": text_layers,
            "vit_layers": vit_layers, "batch": batch, "seq_len": seq_len, "scan_layers": scan,
            "remat": remat, "remat_policy": remat_policy if remat else None,
            "lower_s": round(t1 - t0, 2), "compile_s": round(t2 - t1, 2),
            "total_s": round(t2 - t0, 2), "device": jax.devices()[0].platform}


def bench_compile_time(arch: str, text_layers: int, vit_layers: int, batch: int, seq_len: int,
                       remat: bool, remat_policy: str) -> list[dict]:
    """One row per setting, unrolled first, then stacked; the last row adds the ratio."""
    rows = [compile_time(arch, text_layers, vit_layers, batch, seq_len, scan, remat, remat_policy)
            for scan in (False, True)]
    rows[-1]["speedup_vs_unrolled"] = round(rows[0]["total_s"] / rows[1]["total_s"], 2)
    return rows
