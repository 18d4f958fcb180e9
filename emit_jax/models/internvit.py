"""InternViT vision encoder (Flax NNX), parameter-compatible with transformers'
``InternVLVisionModel``.

Two variants, chosen by ``VisionConfig``:
- InternViT-300M-448px-V2.5 (InternVL3-1B/2B/8B): LayerNorm, qkv bias, no qk-norm;
- InternViT-6B: RMSNorm, qk-norm (RMSNorm over the full width before the head split), no qkv bias.
Both: patch embedding (conv, stride = patch), learned CLS token, learned position embeddings
(bicubically resized when the patch grid differs from the configured one), pre-norm blocks with
layer-scale vectors ``lambda_1`` / ``lambda_2`` on both residual branches, no final norm unless
``use_mean_pooling`` is false.
"""

from __future__ import annotations

import dataclasses

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emit_jax.models.config import VisionConfig, dtype_from_name
from emit_jax.models import memory, scan
from emit_jax.ops import kernels
from emit_jax.ops.attention import self_attention
from emit_jax.parallel import constrain_hidden
from emit_jax.models.layers import axes_meta, RMSNorm, gelu, layer_norm, linear


# ---------------------------------------------------------------------------------- bicubic
@functools.lru_cache(maxsize=64)
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """``[out_size, in_size]`` weights reproducing ``torch.nn.functional.interpolate(...,
    mode='bicubic', align_corners=False)`` along one axis (Keys kernel, A = -0.75, border
    indices clamped)."""
    a = -0.75

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    scale = in_size / out_size
    w = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        real = scale * (i + 0.5) - 0.5
        base = int(np.floor(real))
        t = real - base
        coeffs = (far(t + 1), near(t), near(1 - t), far(2 - t))
        for k, c in enumerate(coeffs):
            idx = min(max(base - 1 + k, 0), in_size - 1)
            w[i, idx] += c
    return w


def resize_pos_embed(grid_embed: jax.Array, out_h: int, out_w: int) -> jax.Array:
    """Bicubic resize of ``[g, g, D]`` position embeddings to ``[out_h, out_w, D]``."""
    g_h, g_w, _ = grid_embed.shape
    wh = jnp.asarray(bicubic_matrix(g_h, out_h), jnp.float32)
    ww = jnp.asarray(bicubic_matrix(g_w, out_w), jnp.float32)
    x = grid_embed.astype(jnp.float32)
    x = jnp.einsum("oh,hwd->owd", wh, x, precision=jax.lax.Precision.HIGHEST)
    x = jnp.einsum("pw,owd->opd", ww, x, precision=jax.lax.Precision.HIGHEST)
    return x.astype(grid_embed.dtype)


# ---------------------------------------------------------------------------------- modules
class VisionEmbeddings(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.patch_embeddings = nnx.Conv(
            cfg.num_channels, cfg.hidden_size, kernel_size=(cfg.patch_size, cfg.patch_size),
            strides=(cfg.patch_size, cfg.patch_size), padding="VALID", dtype=dtype,
            param_dtype=param_dtype, rngs=rngs,
            kernel_metadata=axes_meta(("conv_h", "conv_w", "conv_in", "vit_embed")),
            bias_metadata=axes_meta(("vit_embed",)),
        )
        init = nnx.initializers.truncated_normal(0.02)
        self.cls_token = nnx.Param(init(rngs.params(), (1, 1, cfg.hidden_size), param_dtype),
                                   **axes_meta((None, None, "vit_embed")))
        self.position_embeddings = nnx.Param(
            init(rngs.params(), (1, cfg.grid * cfg.grid + 1, cfg.hidden_size), param_dtype),
            **axes_meta((None, "vit_pos", "vit_embed")))

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """``[N, C, H, W]`` (NCHW, as HF processors emit) -> ``[N, 1 + (H/p)(W/p), D]``."""
        x = jnp.transpose(pixel_values, (0, 2, 3, 1))
        x = self.patch_embeddings(x)  # [N, gh, gw, D]
        n, gh, gw, d = x.shape
        x = x.reshape(n, gh * gw, d)
        cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (n, 1, d))
        x = jnp.concatenate([cls, x], axis=1)
        pos = self.position_embeddings[...]
        g = self.cfg.grid
        if (gh, gw) != (g, g):
            patch_pos = resize_pos_embed(pos[0, 1:].reshape(g, g, d), gh, gw).reshape(1, gh * gw, d)
            pos = jnp.concatenate([pos[:, :1], patch_pos], axis=1)
        return x + pos.astype(x.dtype)


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.hidden_size
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = linear(d, d, ("vit_embed", "vit_heads"), use_bias=cfg.attention_bias, **kw)
        self.k_proj = linear(d, d, ("vit_embed", "vit_heads"), use_bias=cfg.attention_bias, **kw)
        self.v_proj = linear(d, d, ("vit_embed", "vit_heads"), use_bias=cfg.attention_bias, **kw)
        self.projection_layer = linear(d, d, ("vit_heads", "vit_embed"), use_bias=True, **kw)
        if cfg.use_qk_norm:
            self.q_norm = RMSNorm(d, 1e-6, "vit_heads", param_dtype=param_dtype)
            self.k_norm = RMSNorm(d, 1e-6, "vit_heads", param_dtype=param_dtype)
        else:
            self.q_norm = None
            self.k_norm = None

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[N, S, D]`` -> ``[N, S, D]`` (bidirectional)."""
        n, s, d = x.shape
        h, hd = self.cfg.num_attention_heads, self.cfg.head_dim
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.reshape(n, s, h, hd)
        k = k.reshape(n, s, h, hd)
        v = v.reshape(n, s, h, hd)
        if kernels.current().attention_impl() == "einsum":
            scores = jnp.einsum("nqhd,nkhd->nhqk", q, k) * (hd ** -0.5)
            probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
            out = jnp.einsum("nhqk,nkhd->nqhd", probs, v)
        else:  # the configured kernel (emit_jax.ops.kernels), bidirectional, no padding
            out = self_attention(q, k, v, None, causal=False)
        return self.projection_layer(out.reshape(n, s, d))


class VisionMLP(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = linear(cfg.hidden_size, cfg.intermediate_size, ("vit_embed", "vit_mlp"), **kw)
        self.fc2 = linear(cfg.intermediate_size, cfg.hidden_size, ("vit_mlp", "vit_embed"), **kw)

    def __call__(self, x):
        return self.fc2(gelu(self.fc1(x)))


def _norm(cfg: VisionConfig, *, dtype, param_dtype, rngs):
    if cfg.norm_type == "rms_norm":
        return RMSNorm(cfg.hidden_size, cfg.layer_norm_eps, param_dtype=param_dtype)
    return layer_norm(cfg.hidden_size, cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype,
                      rngs=rngs)


class VisionLayer(nnx.Module):
    """Pre-norm block: ``x + l1 * attn(n1(x))`` then ``h + l2 * mlp(n2(h))``."""

    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attention = VisionAttention(cfg, **kw)
        self.mlp = VisionMLP(cfg, **kw)
        self.layernorm_before = _norm(cfg, **kw)
        self.layernorm_after = _norm(cfg, **kw)
        ls = jnp.full((cfg.hidden_size,), cfg.layer_scale_init_value, param_dtype)
        self.lambda_1 = nnx.Param(ls, **axes_meta(("norm",)))
        self.lambda_2 = nnx.Param(ls, **axes_meta(("norm",)))

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x + self.lambda_1[...].astype(x.dtype) * self.attention(self.layernorm_before(x))
        return h + self.lambda_2[...].astype(x.dtype) * self.mlp(self.layernorm_after(h))


class InternViT(nnx.Module):
    """``pixel_values [N, C, H, W] -> last hidden state [N, 1 + P, D]`` (+ all hidden states)."""

    def __init__(self, cfg: VisionConfig, *, dtype="float32", param_dtype="float32",
                 rngs: nnx.Rngs, scan_layers: bool = False):
        """``scan_layers``: the layers as one stacked module run by ``lax.scan``
        (``emit_jax.models.scan``)."""
        self.cfg = cfg
        kw = dict(dtype=dtype_from_name(dtype), param_dtype=dtype_from_name(param_dtype), rngs=rngs)
        self.embeddings = VisionEmbeddings(cfg, **kw)
        self.scan_layers = scan_layers
        if scan_layers:
            self.layers = scan.stacked(lambda r: VisionLayer(cfg, **{**kw, "rngs": r}),
                                       cfg.num_hidden_layers, rngs)
        else:
            self.layers = nnx.List([VisionLayer(cfg, **kw) for _ in range(cfg.num_hidden_layers)])
        self.layernorm = None if cfg.use_mean_pooling else _norm(cfg, **kw)
        self.compute_dtype = kw["dtype"]

    def __call__(self, pixel_values: jax.Array, *, output_hidden_states: bool = False,
                 num_layers: int | None = None, hidden_layers: tuple[int, ...] | None = None):
        """Returns ``last`` ``[N, 1+P, D]``, or ``(last, hidden_states)`` where
        ``hidden_states[0]`` is the embedding output and ``hidden_states[i]`` block i's output
        (EMIT reads layers 4/8/16/20). ``num_layers`` stops early (the CE branch never needs the
        blocks past its deepest layer); the final norm is then skipped. ``hidden_layers``: the
        hidden states wanted (indices up to ``num_layers``), the others None (with
        ``scan_layers`` only those are ever kept, see :meth:`_scanned`). With
        ``memory.vit_chunk`` = K < N the tiles go through K at a time (:meth:`_chunked`; same
        values)."""
        k = memory.current().vit_chunk
        if 0 < k < pixel_values.shape[0]:
            return self._chunked(pixel_values, k, output_hidden_states, num_layers, hidden_layers)
        x = self.embeddings(pixel_values.astype(self.compute_dtype))
        if self.scan_layers:
            x, hidden = self._scanned(x, output_hidden_states, num_layers, hidden_layers)
        else:
            hidden = [x]
            layers = self.layers if num_layers is None else self.layers[:num_layers]
            remat = memory.current().remat
            for layer in layers:
                x = nnx.remat(lambda m, h: m(h), policy=memory.current().checkpoint_policy())(
                    layer, x) if remat else layer(x)
                x = constrain_hidden(x)  # block boundary (no-op without a mesh)
                hidden.append(x)
            if hidden_layers is not None:
                hidden = [h if i in hidden_layers else None for i, h in enumerate(hidden)]
        if self.layernorm is not None and num_layers is None:
            x = self.layernorm(x)
        if output_hidden_states:
            return x, tuple(hidden)
        return x

    def _scanned(self, x: jax.Array, output_hidden_states: bool, num_layers: int | None,
                 hidden_layers: tuple[int, ...] | None):
        """The stacked blocks after the embeddings ``x [N, 1+P, D]``: one ``lax.scan`` whose
        outputs are every block's hidden state, or with ``hidden_layers`` one scan per stretch
        between them, which keeps those hidden states only. Returns ``(x, hidden or None)``."""
        remat = memory.current().remat
        stop = self.cfg.num_hidden_layers if num_layers is None else num_layers
        every = output_hidden_states and hidden_layers is None

        def body(layer, h, _):
            h = constrain_hidden(layer(h))  # block boundary (no-op without a mesh)
            return h, (h if every else None)

        if not output_hidden_states or every:
            out, ys = scan.run(self.layers, body, x, stop=stop, remat=remat)
            return out, ((x, *ys) if every else None)
        hidden = [x if 0 in hidden_layers else None] + [None] * stop
        start = 0
        for end in sorted({i for i in hidden_layers if 0 < i <= stop} | {stop}):
            x, _ = scan.run(self.layers, body, x, start=start, stop=end, remat=remat)
            hidden[end] = x if end in hidden_layers else None
            start = end
        return x, tuple(hidden)

    def _chunked(self, pixel_values: jax.Array, k: int, output_hidden_states: bool,
                 num_layers: int | None, hidden_layers: tuple[int, ...] | None):
        """:meth:`__call__` over chunks of ``k`` tiles (``lax.map`` of a checkpointed chunk: one
        chunk's activations at a time, forward and backward). Tile ``i * n + j`` goes to chunk
        ``j`` (``n`` chunks), so a tile axis sharded over devices in contiguous blocks gives every
        chunk rows from every device (no resharding)."""
        N = pixel_values.shape[0]
        n = -(-N // k)
        px = jnp.pad(pixel_values, ((0, n * k - N),) + ((0, 0),) * (pixel_values.ndim - 1))
        px = px.reshape((k, n) + pixel_values.shape[1:])  # chunk j = px[:, j] (no copy)
        graphdef, state = nnx.split(self)

        def one(j):
            chunk = jax.lax.dynamic_index_in_dim(px, j, axis=1, keepdims=False)  # [k, ...]
            with memory.memory_options(**{**dataclasses.asdict(memory.current()), "vit_chunk": 0}):
                # fresh Variables at this trace level (the chunk may run inside grad / scan)
                m = nnx.merge(graphdef, jax.tree.map(lambda x: x, state))
                return m(chunk, output_hidden_states=output_hidden_states, num_layers=num_layers,
                         hidden_layers=hidden_layers)

        out = jax.lax.map(jax.checkpoint(one), jnp.arange(n))

        def back(y):  # [n, k, ...] -> [N, ...] in tile order
            return jnp.moveaxis(y, 0, 1).reshape((n * k,) + y.shape[2:])[:N]
        return jax.tree.map(back, out)
