"""Attention implementations shared by the Qwen2 decoder and the InternViT, chosen by
``emit_jax.ops.kernels`` (see there for the switches and what each one is for).

Shapes: queries ``q [B, T, H, Dh]``, keys / values ``k, v [B, S, KVH, Dh]`` with ``H`` a
multiple of ``KVH`` (grouped-query attention); outputs ``[B, T, H, Dh]`` in ``v``'s dtype.
Scores and softmax run in float32 in every implementation.

- :func:`einsum_attention`: any dense ``mask [B, T, S]`` (the cache paths use it), queries
  optionally in checkpointed chunks (``memory.attention_chunk``);
- :func:`self_attention`: attention of a sequence to itself — causal with a token mask
  ``[B, T]`` (the LLM; left padding, right padding or both) or bidirectional without padding (the
  ViT) — through the configured kernel.

Padding rows (queries that are padding) may hold different values in different kernels; they
are never read by a real token, and every loss masks them.
"""

from __future__ import annotations

import functools
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from emit_jax.ops import kernels
from emit_jax.parallel import active_mesh, logical_to_spec

_NEG = -1e30  # finite "minus infinity": a fully masked row (pure padding) stays NaN-free


# ------------------------------------------------------------------------------------- einsum
def einsum_attention(q, k, v, mask, chunk: int = 0):
    """GQA attention over a dense ``mask [B, T, S]`` (bool, or None: every key). ``chunk`` > 0
    (the model passes ``memory.attention_chunk``) runs the queries in chunks of that many, each
    rematerialised, so only one ``[B, H, chunk, S]`` block of scores is live."""
    t = q.shape[1]
    if not chunk or t <= chunk:
        return _einsum(q, k, v, mask)
    b, _, h, dh = q.shape
    pad = (-t) % chunk
    n = (t + pad) // chunk
    qs = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, n, chunk, h, dh).swapaxes(0, 1)
    # padded query rows attend to nothing (uniform softmax over masked scores) and are dropped
    ms = jnp.pad(mask, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, -1).swapaxes(0, 1)
    one = jax.checkpoint(lambda qm: _einsum(qm[0], k, v, qm[1]))
    out = jax.lax.map(one, (qs, ms))  # [n, B, chunk, H, Dh]
    return out.swapaxes(0, 1).reshape(b, n * chunk, h, dh)[:, :t]


def _einsum(q, k, v, mask):
    b, t, h, dh = q.shape
    kvh = k.shape[2]
    q = q.reshape(b, t, kvh, h // kvh, dh)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32) * (dh ** -0.5)
    if mask is not None:
        scores = jnp.where(mask[:, None, None, :, :], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, dh)


def causal_mask(token_mask: jax.Array | None, shape: tuple[int, int] | None = None) -> jax.Array:
    """``[B, T]`` token mask (None: every one of ``shape = (B, T)`` real) -> ``[B, T, T]``:
    query t sees real keys s <= t."""
    if token_mask is None:
        token_mask = jnp.ones(shape, bool)
    t = token_mask.shape[1]
    idx = jnp.arange(t)
    return (idx[:, None] >= idx[None, :])[None] & token_mask[:, None, :]


# ------------------------------------------------------------------------------- dispatch
def self_attention(q, k, v, token_mask: jax.Array | None, *, causal: bool, chunk: int = 0):
    """Attention of a sequence to itself through the configured kernel. ``token_mask [B, T]``
    (bool, or None: every token real) marks real tokens; with ``causal`` query t sees keys
    s <= t. Real tokens need not start at 0 (left padding) but must be contiguous within a row
    for ``dot_product`` on a GPU (prompt padding on the left, completion padding on the right:
    what every batch here has). ``chunk``: :func:`einsum_attention`'s (the fused kernels need
    none)."""
    impl = kernels.current().attention_impl()
    if impl == "einsum":
        if causal:
            mask = causal_mask(token_mask, q.shape[:2])
        else:
            mask = None if token_mask is None else jnp.broadcast_to(
                token_mask[:, None, :], (q.shape[0], q.shape[1], k.shape[1]))
        return einsum_attention(q, k, v, mask, chunk)
    if impl == "dot_product":
        return dot_product_attention(q, k, v, token_mask, causal=causal)
    return splash_attention(q, k, v, token_mask, causal=causal)


# ----------------------------------------------------------------------------- dot_product
def dot_product_attention(q, k, v, token_mask, *, causal: bool, implementation: str | None = None):
    """``jax.nn.dot_product_attention``. ``implementation`` None: cuDNN on a GPU for bf16/fp16
    (through :func:`right_padded`, the layout cuDNN's padding mask assumes), XLA otherwise (a
    dense boolean mask)."""
    if implementation is None:
        implementation = "cudnn" if (kernels.platform() == "gpu" and q.dtype in (
            jnp.bfloat16, jnp.float16)) else "xla"
    if implementation == "cudnn":
        return right_padded(q, k, v, token_mask, causal=causal, implementation="cudnn")
    mask = None
    if causal:
        mask = causal_mask(token_mask, q.shape[:2])[:, None]
    elif token_mask is not None:
        mask = token_mask[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla").astype(v.dtype)


def roll_rows(x: jax.Array, shift: jax.Array) -> jax.Array:
    """``out[b, t] = x[b, (t + shift[b]) % T]`` for ``x [B, T, ...]``, ``shift [B]``."""
    t = x.shape[1]
    idx = (jnp.arange(t)[None, :] + shift[:, None]) % t
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def right_padded(q, k, v, token_mask, *, causal: bool, implementation: str):
    """Attention with per-row sequence lengths, the padding cuDNN handles natively: each row is
    rolled so its real tokens (contiguous, starting at the first real one) come first, attends
    with ``query_seq_lengths = key_value_seq_lengths = #real`` (and ``is_causal``), and is
    rolled back. ``implementation="xla"`` runs the same layout on any backend (tests)."""
    if token_mask is None:
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                            implementation=implementation).astype(v.dtype)
    first = jnp.argmax(token_mask, axis=1).astype(jnp.int32)                        # [B]
    lengths = jnp.maximum(jnp.sum(token_mask, axis=1), 1).astype(jnp.int32)         # [B]
    q, k, v = (roll_rows(x, first) for x in (q, k, v))
    out = jax.nn.dot_product_attention(q, k, v, is_causal=causal, query_seq_lengths=lengths,
                                       key_value_seq_lengths=lengths,
                                       implementation=implementation)
    return roll_rows(out.astype(v.dtype), -first)


# --------------------------------------------------------------------------------- splash
def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@functools.lru_cache(maxsize=32)
def _splash_kernel(seq: int, heads: int, causal: bool, block: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa  # noqa: PLC0415

    one = sa.CausalMask((seq, seq)) if causal else sa.FullMask((seq, seq))
    sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                          block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                          block_q_dq=block, block_kv_dq=block)
    return sa.make_splash_mha(sa.MultiHeadMask([one] * heads), head_shards=1, q_seq_shards=1,
                              block_sizes=sizes, interpret=interpret)


def splash_block(seq: int) -> int:
    """Splash's tile along the sequence: 512 for long sequences, else the sequence rounded up
    to a multiple of 128 (the TPU lane width)."""
    return min(512, _round_up(seq, 128))


def splash_attention(q, k, v, token_mask, *, causal: bool):
    """Pallas splash attention (TPU; Pallas interpret mode elsewhere). Padding becomes segment
    ids (real tokens 1, padding 0: a real query never sees a padding key), the sequence is
    padded to whole blocks, queries are pre-scaled by ``Dh ** -0.5`` (splash does not scale),
    and the batch is ``vmap``-ed. Under a mesh (``emit_jax.parallel.use_mesh``) the kernel runs
    per shard in ``shard_map``: batch over data x fsdp, heads over ``tensor`` when both head
    counts divide it."""
    b, t, h, dh = q.shape
    block = splash_block(t)
    tp = _round_up(t, block)
    seg = jnp.ones((b, t), jnp.int32) if token_mask is None else token_mask.astype(jnp.int32)
    pad = ((0, 0), (0, tp - t), (0, 0), (0, 0))
    q = jnp.pad(q * jnp.asarray(dh ** -0.5, q.dtype), pad)
    k, v = jnp.pad(k, pad), jnp.pad(v, pad)
    seg = jnp.pad(seg, ((0, 0), (0, tp - t)))
    kernel = _splash_kernel(tp, h, causal, block, kernels.platform() != "tpu")
    out = _per_shard(functools.partial(_splash_batch, kernel), q, k, v, seg)
    return out[:, :t].astype(v.dtype)


def _splash_batch(kernel, q, k, v, seg):
    """``[b, T, H, Dh]`` blocks -> the kernel's ``[H, T, Dh]`` layout, one row at a time."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa  # noqa: PLC0415

    def one(q1, k1, v1, s1):
        return kernel(q1.swapaxes(0, 1), k1.swapaxes(0, 1), v1.swapaxes(0, 1),
                      segment_ids=sa.SegmentIds(q=s1, kv=s1)).swapaxes(0, 1)
    return jax.vmap(one)(q, k, v, seg)


def _per_shard(fn, q, k, v, seg):
    """``fn(q, k, v, seg)`` directly, or under ``shard_map`` over the active mesh."""
    active = active_mesh()
    if active is None:
        return fn(q, k, v, seg)
    mesh, rules = active

    def axis(name: str, dim: int):  # the mesh axes ``name`` maps to when they divide ``dim``
        spec = logical_to_spec((name,), (dim,), mesh, rules)
        return spec[0] if len(spec) else None
    # KV heads divide the query heads, so an axis dividing them divides both
    batch, heads = axis("batch", q.shape[0]), axis("heads", k.shape[2])
    spec = P(batch, None, heads, None)
    return jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, spec, P(batch, None)),
                         out_specs=spec, check_vma=False)(q, k, v, seg)
