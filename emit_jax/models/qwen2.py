"""Qwen2 decoder (Flax NNX), parameter-compatible with transformers' ``Qwen2Model``.

RMSNorm, rotary position embeddings (default RoPE, the config's theta), grouped-query attention
with q/k/v bias and no o-proj bias, SwiGLU feed-forward. One forward serves three uses:

- full sequence (training, log-probs): ``cache=None``;
- prefill into a preallocated KV cache;
- decoding one (or a few) tokens against that cache.

Padding is handled by masks: ``attention_mask [B, T]`` marks real tokens (1) and padding (0), so
left-padded batches work; positions default to ``cumsum(mask) - 1`` so a left-padded row gets the
same positions (and outputs) as the unpadded sequence.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from emit_jax.models.config import TextConfig, dtype_from_name
from emit_jax.models import memory, scan
from emit_jax.ops.attention import einsum_attention, self_attention
from emit_jax.parallel import constrain_hidden
from emit_jax.models.layers import axes_meta, RMSNorm, linear

class KVCache(NamedTuple):
    """Preallocated key/value cache for all layers.

    k, v: one ``[B, S, KVH, Dh]`` array per layer (tuples of L), each written in place by its
    layer. A stacked ``[L, B, S, KVH, Dh]`` cache made every decode step copy each layer's
    slice out of the stack (``python -m bench rollout --arch small``, 2-core CPU:
    about 870 -> 970 new tokens/s; a ``[B, KVH, Dh, S]`` key layout, which spares XLA's
    transposed copy of the keys, measured slower, 780). mask: ``[B, S]`` bool, slots holding
    real tokens;
    positions: ``[B]`` int32, the RoPE position the next token of each row gets;
    end: ``[]`` int32, number of slots written (the same for every row: rows are left-padded).
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    mask: jax.Array
    positions: jax.Array
    end: jax.Array

    @classmethod
    def create(cls, cfg: TextConfig, batch: int, max_len: int, dtype=jnp.float32) -> "KVCache":
        kvh, dh, n = cfg.num_key_value_heads, cfg.head_size, cfg.num_hidden_layers
        return cls(
            k=tuple(jnp.zeros((batch, max_len, kvh, dh), dtype) for _ in range(n)),
            v=tuple(jnp.zeros((batch, max_len, kvh, dh), dtype) for _ in range(n)),
            mask=jnp.zeros((batch, max_len), bool), positions=jnp.zeros((batch,), jnp.int32),
            end=jnp.zeros((), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.mask.shape[1]

    def grow(self, max_len: int) -> "KVCache":
        """The same cache with ``max_len`` slots (empty slots appended; one copy): the sampler's
        bucketed decode (``emit_jax.ops.kernels``) attends over a cache grown phase by
        phase instead of the whole one."""
        extra = max_len - self.max_len
        if extra < 0:
            raise ValueError(f"cannot shrink a KV cache of {self.max_len} slots to {max_len}")

        def pad(x):  # keys / values [..., S, KVH, Dh], mask [B, S]
            axis = x.ndim - 3 if x.ndim > 2 else 1
            return jnp.pad(x, [(0, extra if a == axis else 0) for a in range(x.ndim)])
        return self._replace(k=jax.tree.map(pad, self.k), v=jax.tree.map(pad, self.v),
                             mask=pad(self.mask))


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float):
    """``positions [B, T]`` -> cos, sin ``[B, T, head_dim]`` in float32 (HF's layout: the
    frequencies repeated twice, paired with ``rotate_half``)."""
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.int32).astype(jnp.float32) / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """``x [B, T, H, Dh]`` rotated by ``cos/sin [B, T, Dh]``."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


class AttentionMask(NamedTuple):
    """What a layer's attention may see. ``tokens [B, T]``: the new tokens' padding mask;
    ``dense [B, T, S]`` (bool) over the cache's S slots, or None: the T tokens attend to each
    other causally (no cache, or a prefill into a cache of exactly T slots) through the kernel
    ``emit_jax.ops.kernels`` selects."""

    tokens: jax.Array
    dense: jax.Array | None = None


class Qwen2Attention(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        d, hd = cfg.hidden_size, cfg.head_size
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = linear(d, cfg.num_attention_heads * hd, ("embed", "heads"), **kw)
        self.k_proj = linear(d, cfg.num_key_value_heads * hd, ("embed", "kv_heads"), **kw)
        self.v_proj = linear(d, cfg.num_key_value_heads * hd, ("embed", "kv_heads"), **kw)
        self.o_proj = linear(cfg.num_attention_heads * hd, d, ("heads", "embed"), use_bias=False, **kw)

    def __call__(self, x, cos, sin, mask: AttentionMask, kv=None, end=None):
        """x ``[B, T, D]``; cos/sin ``[B, T, Dh]``; ``mask``: :class:`AttentionMask`.
        ``kv``: ``(k, v)``, this layer's cache ``[B, S, KVH, Dh]`` each; the T new keys/values
        are written at slot ``end`` and attention runs over all S slots (or, with
        ``mask.dense`` None, over the T new tokens). Returns ``(out [B, T, D], (k, v) or
        None)``."""
        b, t, _ = x.shape
        c = self.cfg
        q = self.q_proj(x).reshape(b, t, c.num_attention_heads, c.head_size)
        k = self.k_proj(x).reshape(b, t, c.num_key_value_heads, c.head_size)
        v = self.v_proj(x).reshape(b, t, c.num_key_value_heads, c.head_size)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is not None:
            k_c, v_c = kv
            k_c = jax.lax.dynamic_update_slice(
                k_c, k.astype(k_c.dtype), (0, end, 0, 0))
            v_c = jax.lax.dynamic_update_slice(
                v_c, v.astype(v_c.dtype), (0, end, 0, 0))
            kv = (k_c, v_c)
            k, v = k_c.astype(q.dtype), v_c.astype(q.dtype)
        chunk = memory.current().attention_chunk
        if mask.dense is None:
            out = self_attention(q, k, v, mask.tokens, causal=True, chunk=chunk)
        else:
            out = einsum_attention(q, k, v, mask.dense, chunk)
        out = out.reshape(b, t, c.num_attention_heads * c.head_size)
        return self.o_proj(out), kv


class Qwen2MLP(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, use_bias=False)
        self.gate_proj = linear(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.up_proj = linear(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.down_proj = linear(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), **kw)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen2DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.self_attn = Qwen2Attention(cfg, **kw)
        self.mlp = Qwen2MLP(cfg, **kw)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps,
                                                param_dtype=param_dtype)

    def __call__(self, x, cos, sin, mask, kv=None, end=None):
        a, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv, end)
        x = x + a.astype(x.dtype)
        x = x + self.mlp(self.post_attention_layernorm(x)).astype(x.dtype)
        return x, kv


def default_positions(attention_mask: jax.Array) -> jax.Array:
    """``[B, T]`` mask -> positions ``cumsum - 1`` (padding slots get 0)."""
    m = attention_mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(m, axis=-1) - 1, 0)


class Qwen2Model(nnx.Module):
    """Embeddings + decoder layers + final norm (no LM head)."""

    def __init__(self, cfg: TextConfig, *, dtype="float32", param_dtype="float32", rngs: nnx.Rngs,
                 scan_layers: bool = False):
        """``scan_layers``: the layers as one stacked module run by ``lax.scan``
        (``emit_jax.models.scan``; the KV cache then holds ``[L, B, S, KVH, Dh]`` arrays)."""
        self.cfg = cfg
        dt, pdt = dtype_from_name(dtype), dtype_from_name(param_dtype)
        self.compute_dtype = dt
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=dt, param_dtype=pdt, rngs=rngs,
            embedding_init=nnx.initializers.normal(0.02),
            embedding_metadata=axes_meta(("vocab", "embed")))
        self.scan_layers = scan_layers
        if scan_layers:
            self.layers = scan.stacked(
                lambda r: Qwen2DecoderLayer(cfg, dtype=dt, param_dtype=pdt, rngs=r),
                cfg.num_hidden_layers, rngs)
        else:
            self.layers = nnx.List([Qwen2DecoderLayer(cfg, dtype=dt, param_dtype=pdt, rngs=rngs)
                                    for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pdt)

    def __call__(self, inputs_embeds: jax.Array, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None, cache: KVCache | None = None,
                 output_hidden_states: bool = False):
        """``inputs_embeds [B, T, D]`` -> ``(hidden [B, T, D], cache, hidden_states)``.

        Without a cache, attention is causal within the T tokens, restricted to keys where
        ``attention_mask`` is 1. With a cache the T tokens are written at slot ``cache.end`` and
        attend to every earlier real slot; ``positions`` default to ``cache.positions + cumsum``.
        """
        b, t, _ = inputs_embeds.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), bool)
        attention_mask = attention_mask.astype(bool)
        if cache is None:
            if positions is None:
                positions = default_positions(attention_mask)
            mask = AttentionMask(attention_mask)
        else:
            if positions is None:
                positions = cache.positions[:, None] + default_positions(attention_mask)
            end = cache.end
            new_mask = jax.lax.dynamic_update_slice(cache.mask, attention_mask, (0, end))
            if cache.max_len == t:  # a prefill filling the whole cache: it must start at slot 0
                mask = AttentionMask(attention_mask)
            else:
                slot = jnp.arange(cache.max_len)
                q_slot = end + jnp.arange(t)
                causal = slot[None, :] <= q_slot[:, None]  # [T, S]
                mask = AttentionMask(attention_mask, causal[None] & new_mask[:, None, :])
        cos, sin = rope_cos_sin(positions, self.cfg.head_size, self.cfg.rope_theta)
        x = inputs_embeds.astype(self.compute_dtype)
        run = self._scanned if self.scan_layers else self._unrolled
        x, (new_k, new_v), hidden = run(x, cos, sin, mask, cache, output_hidden_states)
        x = self.norm(x)
        if cache is not None:
            last_pos = jnp.max(jnp.where(attention_mask, positions, -1), axis=-1)
            cache = KVCache(
                k=new_k, v=new_v, mask=new_mask,
                positions=jnp.maximum(last_pos + 1, cache.positions),
                end=cache.end + t)
        return x, cache, hidden

    def _unrolled(self, x, cos, sin, mask, cache, output_hidden_states):
        """The layers one by one. Returns ``(x, (k, v) tuples of the layers' caches, hidden
        states or None)``."""
        hidden = [x] if output_hidden_states else None
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            if cache is None and memory.current().remat:  # keep what memory.remat_policy saves
                x, _ = nnx.remat(lambda m, h: m(h, cos, sin, mask),
                                 policy=memory.current().checkpoint_policy())(layer, x)
            elif cache is None:
                x, _ = layer(x, cos, sin, mask)
            else:
                x, (k_i, v_i) = layer(x, cos, sin, mask, (cache.k[i], cache.v[i]), cache.end)
                new_k.append(k_i)
                new_v.append(v_i)
            x = constrain_hidden(x)  # block boundary: batch-sharded under a mesh, else no-op
            if output_hidden_states:
                hidden.append(x)
        return x, (tuple(new_k), tuple(new_v)), (tuple(hidden) if output_hidden_states else None)

    def _scanned(self, x, cos, sin, mask, cache, output_hidden_states):
        """:meth:`_unrolled` as one ``lax.scan`` over the stacked layers; the cache's ``k, v``
        are ``[L, B, S, KVH, Dh]`` and come back so (the hidden states as L ``[B, T, D]``
        slices of the scan's stacked outputs)."""
        end = None if cache is None else cache.end
        if cache is not None and isinstance(cache.k, tuple):
            raise ValueError("a model with scan_layers takes a stacked KV cache "
                             "([L, B, S, KVH, Dh] arrays): make it with model.init_cache")

        def body(layer, h, kv):
            h, kv = layer(h, cos, sin, mask, kv, end)
            h = constrain_hidden(h)  # block boundary
            return h, (kv, h if output_hidden_states else None)

        xs = None if cache is None else (cache.k, cache.v)
        out, (kv, ys) = scan.run(self.layers, body, x, xs,
                                 remat=cache is None and memory.current().remat)
        return out, (((), ()) if kv is None else kv), ((x, *ys) if output_hidden_states else None)
