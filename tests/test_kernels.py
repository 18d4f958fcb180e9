"""The attention kernels of ``emit_jax.ops.kernels`` against the einsum path: values and
gradients (float32, 1e-5) of the LLM with left padding and images, of the ViT, of the
cuDNN padding layout (run with XLA's implementation on the CPU), of splash attention in
Pallas interpret mode, and of the prefill that fills its cache."""

from __future__ import annotations

import dataclasses
import importlib.util
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from emit_jax.models import InternVL, InternVLConfig
from emit_jax.models.architectures import tiny
from emit_jax.ops.attention import (causal_mask, einsum_attention, right_padded,
                                       self_attention, splash_block)
from emit_jax.ops.kernels import KernelOptions, kernel_options

KERNELS = ("dot_product", "splash")


def _qkv(b=3, t=20, h=4, kvh=2, dh=8, seed=0):
    r = np.random.default_rng(seed)
    return tuple(jnp.asarray(r.normal(size=s), jnp.float32)
                 for s in ((b, t, h, dh), (b, t, kvh, dh), (b, t, kvh, dh)))


def _token_mask(t=20):
    """Row 0 full, row 1 left-padded by 5, row 2 left-padded by 3 and right-padded by 4."""
    m = np.ones((3, t), bool)
    m[1, :5] = False
    m[2, :3] = False
    m[2, t - 4:] = False
    return jnp.asarray(m)


def _real(x, mask):
    return np.asarray(x)[np.asarray(mask)]


@pytest.mark.parametrize("kernel", KERNELS)
def test_causal_values_and_gradients_equal_einsum(kernel):
    q, k, v = _qkv()
    mask = _token_mask()
    w = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)

    def loss(q, k, v, impl):
        with kernel_options(attention=impl):
            out = self_attention(q, k, v, mask, causal=True)
        return jnp.sum(out * w * mask[:, :, None, None]), out

    (l0, o0), g0 = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, "einsum")
    (l1, o1), g1 = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, kernel)
    np.testing.assert_allclose(_real(o1, mask), _real(o0, mask), atol=1e-5, rtol=1e-5)
    assert abs(float(l1) - float(l0)) < 1e-4
    for a, b in zip(g1, g0):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", KERNELS)
def test_bidirectional_equals_einsum(kernel):
    q, k, v = _qkv(t=30, h=4, kvh=4)
    with kernel_options(attention=kernel):
        out = self_attention(q, k, v, None, causal=False)
    ref = einsum_attention(q, k, v, None, chunk=0)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)


def test_cudnn_layout_equals_einsum():
    """The right-padding layout cuDNN needs, run through XLA's implementation: rows rolled so
    the real tokens come first, per-row lengths, rolled back."""
    q, k, v = _qkv()
    mask = _token_mask()
    w = jnp.asarray(np.random.default_rng(2).normal(size=q.shape), jnp.float32)

    def loss(fn, q, k, v):
        out = fn(q, k, v)
        return jnp.sum(out * w * mask[:, :, None, None]), out

    def rolled(q, k, v):
        return right_padded(q, k, v, mask, causal=True, implementation="xla")

    def dense(q, k, v):
        return einsum_attention(q, k, v, causal_mask(mask), chunk=0)

    (_, o1), g1 = jax.value_and_grad(lambda *a: loss(rolled, *a), argnums=(0, 1, 2),
                                     has_aux=True)(q, k, v)
    (_, o0), g0 = jax.value_and_grad(lambda *a: loss(dense, *a), argnums=(0, 1, 2),
                                     has_aux=True)(q, k, v)
    np.testing.assert_allclose(_real(o1, mask), _real(o0, mask), atol=1e-5, rtol=1e-5)
    for a, b in zip(g1, g0):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def test_splash_blocks():
    assert splash_block(20) == 128 and splash_block(1025) == 512 and splash_block(300) == 384


def test_options_are_checked():
    with pytest.raises(ValueError, match="kernels.attention"):
        KernelOptions(attention="flash")
    with pytest.raises(ValueError, match="kernels.decode"):
        KernelOptions(decode="ragged")
    with pytest.raises(ValueError, match="decode_bucket"):
        KernelOptions(decode_bucket=0)
    assert KernelOptions(attention="auto").attention_impl() == "einsum"  # on this CPU


# ------------------------------------------------------------------------ whole model
@pytest.fixture(scope="module")
def model_and_batch():
    cfg: InternVLConfig = tiny()  # with a 600-token vocabulary (the gradients stay quick)
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=600), image_token_id=599)
    model = InternVL(cfg, rngs=nnx.Rngs(0))
    per = cfg.tokens_per_tile
    r = np.random.default_rng(0)
    b, t = 2, 2 * per + 12
    ids = r.integers(10, 590, size=(b, t)).astype(np.int32)
    mask = np.ones((b, t), bool)
    mask[1, :7] = False  # left padding
    ids[0, 3:3 + per] = cfg.image_token_id
    ids[1, 9:9 + per] = cfg.image_token_id
    px = r.normal(size=(2, 3, cfg.vision.image_size, cfg.vision.image_size)).astype(np.float32)
    return model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(px)


@pytest.mark.parametrize("kernel", KERNELS)
def test_model_logits_and_gradients_equal_einsum(model_and_batch, kernel):
    """The whole InternVL (ViT + LLM) with two images and a left-padded row: logits at real
    tokens and every parameter's gradient of a masked loss equal the einsum path."""
    model, ids, mask, px = model_and_batch
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, ids, mask, px, impl):
        m = nnx.merge(graphdef, params, rest)
        with kernel_options(attention=impl):
            logits = m(ids, px, mask)
        return jnp.sum(jax.nn.log_softmax(logits)[..., 5] * mask), logits

    grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=4)
    (_, l0), g0 = grad(params, ids, mask, px, "einsum")
    (_, l1), g1 = grad(params, ids, mask, px, kernel)
    np.testing.assert_allclose(_real(l1, mask), _real(l0, mask), atol=1e-5, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):  # 1e-5 of each gradient's scale
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(a - b).max() <= 1e-5 * max(1.0, np.abs(b).max()), np.abs(a - b).max()


@pytest.mark.parametrize("kernel", ("einsum", "dot_product"))
def test_prefill_filling_its_cache_equals_a_larger_cache(model_and_batch, kernel):
    """A prefill into a cache of exactly the prompt's length attends through the kernel; the
    hidden states and the cache equal those of a prefill into a larger cache."""
    model, ids, mask, px = model_and_batch
    t = ids.shape[1]
    with kernel_options(attention=kernel):
        exact = model.forward(ids, px, mask, cache=model.init_cache(2, t), compute_logits=False)
        big = model.forward(ids, px, mask, cache=model.init_cache(2, t + 5), compute_logits=False)
    np.testing.assert_allclose(_real(exact.last_hidden, mask), _real(big.last_hidden, mask),
                               atol=1e-5, rtol=1e-5)
    for a, b in zip(exact.cache.k + exact.cache.v, big.cache.k + big.cache.v):  # real slots
        np.testing.assert_allclose(_real(a, mask), _real(np.asarray(b)[:, :t], mask), atol=1e-5)
    assert int(exact.cache.end) == int(big.cache.end) == t


# ------------------------------------------------------------------------------- decoding
def test_decode_phases():
    from emit_jax.ops.sampling import decode_phases

    with kernel_options(decode="full"):
        assert decode_phases(512) == (512,)
    with kernel_options(decode="bucketed"):
        assert decode_phases(512) == (64, 128, 256, 512) and decode_phases(8) == (8,)
    with kernel_options(decode="bucketed", decode_bucket=2):
        assert decode_phases(9) == (2, 4, 8, 9)


@pytest.mark.parametrize("attention", ("einsum", "dot_product"))
def test_bucketed_decode_gives_the_same_tokens(model_and_batch, attention):
    """Greedy decoding over a cache grown phase by phase (and a prefill through the kernel)
    gives today's tokens; the log-probs agree to float32 rounding."""
    from emit_jax.ops.sampling import generate

    model, ids, mask, px = model_and_batch
    kw = dict(max_new_tokens=9, eos_token_id=None, pad_token_id=0, temperature=0.0)
    ref = generate(model, ids, mask, px, **kw)
    with kernel_options(attention=attention, decode="bucketed", decode_bucket=2):
        out = generate(model, ids, mask, px, **kw)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    np.testing.assert_array_equal(np.asarray(out.lengths), np.asarray(ref.lengths))
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(ref.logprobs), atol=1e-5)


# --------------------------------------------------------------------------------- on a TPU
needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed: no TPU compiler")


@needs_libtpu
def test_splash_compiles_to_a_tpu_kernel_under_a_mesh():
    """On an abstract v5e:2x2 slice (4 chips, batch over fsdp) ``auto`` resolves to splash,
    which compiles to the Pallas TPU custom call inside shard_map, forward and backward."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from emit_jax.aot.tpu import topology  # libtpu loaded so that other processes may too
    from emit_jax.ops import kernels
    from emit_jax.parallel import use_mesh

    devices = topology("v5e:2x2").devices
    mesh = Mesh(np.array(devices).reshape(1, 4, 1), ("data", "fsdp", "tensor"))
    b, t, h, kvh, dh = 4, 200, 8, 2, 64
    sh = NamedSharding(mesh, P(("data", "fsdp")))
    args = [jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=sh)
            for s in ((b, t, h, dh), (b, t, kvh, dh), (b, t, kvh, dh))]
    args.append(jax.ShapeDtypeStruct((b, t), jnp.bool_, sharding=sh))

    def loss(q, k, v, m):
        return jnp.sum(self_attention(q, k, v, m, causal=True).astype(jnp.float32))

    with use_mesh(mesh), kernel_options(attention="auto"):
        assert kernels.current().attention_impl() == "splash"
        hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile().as_text()
    assert hlo.count("tpu_custom_call") >= 2  # the forward and the backward kernels
