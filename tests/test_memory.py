"""Memory switches (emit_jax.models.memory): query-chunked attention and layer remat compute
the same values and gradients as the plain forward, and lower the compiled step's temporary
memory."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from emit_jax.models import architectures
from emit_jax.models.internvl import InternVL
from emit_jax.models.memory import memory_options
from emit_jax.ops.attention import einsum_attention as attention


def test_chunked_attention_equals_full():
    rs = np.random.RandomState(0)
    b, t, s, h, kvh, dh = 2, 37, 37, 4, 2, 8
    q, k, v = (jnp.asarray(rs.randn(*shape), jnp.float32)
               for shape in ((b, t, h, dh), (b, s, kvh, dh), (b, s, kvh, dh)))
    mask = jnp.asarray(np.tril(np.ones((t, s), bool))[None].repeat(b, 0))
    mask = mask.at[1, :, :5].set(False)  # left padding in row 1
    full = attention(q, k, v, mask, chunk=0)
    for chunk in (8, 16, 37, 64):
        np.testing.assert_allclose(attention(q, k, v, mask, chunk=chunk), full, atol=1e-6)
    loss = lambda c: lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v, mask, chunk=c)))  # noqa: E731
    g_full = jax.grad(loss(0), argnums=(0, 1, 2))(q, k, v)
    g_chunk = jax.grad(loss(8), argnums=(0, 1, 2))(q, k, v)
    for a, c in zip(g_full, g_chunk):
        np.testing.assert_allclose(c, a, atol=1e-5)


def _small(seq_layers=2):
    cfg = architectures.tiny()
    return cfg.replace(vision=dataclasses.replace(cfg.vision, image_size=56, num_hidden_layers=2),
                       text=dataclasses.replace(cfg.text, vocab_size=64, num_hidden_layers=seq_layers),
                       image_token_id=63)


def _loss_and_grads(model, ids, pix):
    def loss(m):
        logits = m(ids, pix, jnp.ones_like(ids))
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
            logits, jnp.roll(ids, -1, 1)[..., None], -1)[..., 0])
    return nnx.value_and_grad(loss)(model)


def test_remat_and_chunks_give_the_same_loss_and_gradients():
    model = InternVL(_small(), rngs=nnx.Rngs(0))
    rs = np.random.RandomState(1)
    ids = rs.randint(0, 60, (2, 40)).astype(np.int32)
    ids[:, 2:6] = 63
    ids, pix = jnp.asarray(ids), jnp.asarray(rs.randn(2, 3, 56, 56), jnp.float32)
    l0, g0 = _loss_and_grads(model, ids, pix)
    with memory_options(remat=True, attention_chunk=16):
        l1, g1 = _loss_and_grads(model, ids, pix)
    assert float(l1) == pytest.approx(float(l0), rel=1e-6)
    for (p, a), (_, c) in zip(nnx.to_flat_state(g0), nnx.to_flat_state(g1)):
        np.testing.assert_allclose(np.asarray(c.get_value()), np.asarray(a.get_value()),
                                   atol=2e-6, err_msg="/".join(map(str, p)))


def test_switches_lower_the_compiled_temporary_memory():
    """XLA's own accounting of the train step's temporaries (CPU compile, no run)."""
    model = InternVL(_small(seq_layers=4), rngs=nnx.Rngs(0))
    ids = jnp.zeros((2, 1024), jnp.int32)
    pix = jnp.zeros((1, 3, 56, 56), jnp.float32)
    graphdef, state = nnx.split(model)

    def temp_bytes(**opts):
        def step(state, ids, pix):  # a new function each time: jax caches traces per function
            return _loss_and_grads(nnx.merge(graphdef, state), ids, pix)[0]

        with memory_options(**opts):
            compiled = jax.jit(step).lower(state, ids, pix).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    plain, chunked = temp_bytes(), temp_bytes(attention_chunk=128)
    both = temp_bytes(remat=True, attention_chunk=128)
    # the [B, heads, T, T] float32 scores of 4 layers (2 x 4 x 1024 x 1024 x 4 B = 32 MiB each)
    assert chunked < plain / 2, (plain, chunked)
    assert both <= chunked, (chunked, both)


def test_vit_chunks_give_the_same_values_and_gradients_and_less_memory():
    """memory.vit_chunk: the ViT over its tiles K at a time (5 tiles in chunks of 2: one chunk
    padded), the image features, the hidden states the heat map reads, and the gradients of the
    ViT's weights equal the unchunked ones."""
    model = InternVL(_small(), rngs=nnx.Rngs(0))
    rs = np.random.RandomState(2)
    ids = rs.randint(0, 60, (2, 40)).astype(np.int32)
    ids[0, 2:10] = 63  # 2 tiles
    ids[1, 3:15] = 63  # 3 tiles
    ids, pix = jnp.asarray(ids), jnp.asarray(rs.randn(5, 3, 56, 56), jnp.float32)
    l0, g0 = _loss_and_grads(model, ids, pix)
    _, h0 = model.vision_tower(pix, output_hidden_states=True, num_layers=1)
    with memory_options(vit_chunk=2):
        l1, g1 = _loss_and_grads(model, ids, pix)
        _, h1 = model.vision_tower(pix, output_hidden_states=True, num_layers=1)
    assert float(l1) == pytest.approx(float(l0), rel=1e-6)
    for a, c in zip(h0, h1):
        np.testing.assert_allclose(np.asarray(c), np.asarray(a), atol=1e-6)
    vit = [(p, v) for p, v in nnx.to_flat_state(g0) if p[0] == "vision_tower"]
    got = dict(nnx.to_flat_state(g1))
    assert vit and max(np.abs(np.asarray(v.get_value())).max() for _, v in vit) > 0
    for p, a in vit:
        np.testing.assert_allclose(np.asarray(got[p].get_value()), np.asarray(a.get_value()),
                                   atol=2e-6, err_msg="/".join(map(str, p)))
    # at 224 px (257 tokens a tile) one layer's scores are 1 MiB a tile: 16 tiles at once
    # against 2 at a time
    from emit_jax.models.internvit import InternViT

    vcfg = dataclasses.replace(_small().vision, image_size=224)
    graphdef, state = nnx.split(InternViT(vcfg, rngs=nnx.Rngs(0)))
    big = jnp.zeros((16, 3, 224, 224), jnp.float32)

    def temp_bytes(**opts):
        def fwd(state, px):
            return nnx.merge(graphdef, state)(px)

        with memory_options(**opts):
            return jax.jit(fwd).lower(state, big).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes(vit_chunk=2) < temp_bytes() / 2
