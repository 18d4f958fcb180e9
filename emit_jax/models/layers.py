"""Small building blocks shared by the vision encoder, the projector and the decoder.

Every parameter carries logical axis names in its ``out_sharding`` metadata (MaxText style);
``emit_jax.parallel`` maps them to mesh axes by rules. The names used:

==============  ==========================================================
``embed``       LLM hidden size
``mlp``         LLM feed-forward width
``heads``       LLM query heads x head dim
``kv_heads``    LLM key/value heads x head dim
``vocab``       vocabulary
``norm``        a normalisation scale/bias vector (never sharded by default)
``vit_embed``   ViT hidden size;  ``vit_mlp``: ViT feed-forward width
``vit_heads``   ViT heads x head dim;  ``vit_pos``: ViT position slots
``mm_in``       pixel-shuffled ViT width entering mlp1 (4 x vit_embed)
``conv_*``      convolution spatial / input-channel axes
``layers``      the stacked layers of ``scan_layers`` (``emit_jax.models.scan``; replicated)
==============  ==========================================================
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from emit_jax.models import memory

Axes = tuple


def axes_meta(axes) -> dict:
    """Variable metadata naming logical axes. ``eager_sharding=False``: the names are only
    recorded here; ``emit_jax.parallel`` turns them into explicit shardings by rules."""
    return {"out_sharding": tuple(axes), "eager_sharding": False}


def remat_name(axes: Axes) -> str | None:
    """The name a linear's output carries for the remat policies (``emit_jax.models.memory``),
    from its kernel's logical axes ``(in, out)``: ``"qkv_proj"`` into attention heads,
    ``"out_proj"`` out of them, else None."""
    if axes[-1] in ("heads", "kv_heads", "vit_heads"):
        return "qkv_proj"
    if axes[-2] in ("heads", "vit_heads"):
        return "out_proj"
    return None


class Linear(nnx.Linear):
    """``nnx.Linear`` whose output ``[..., out]`` stays in the compute dtype ``dtype`` (when set).

    Mixed precision (``emit_jax.training.precision``): a qwix LoRA adapter with float32 factors
    adds a float32 delta to the bf16 product, which would promote every activation after it to
    float32; the sum is cast back here, so only the rank-r branch computes in float32.
    Under ``memory.remat`` the output is named ``remat_name`` (``jax.ad_checkpoint``) for the
    remat policies."""

    def __init__(self, *args, remat_name: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.remat_name = remat_name

    def __call__(self, inputs: jax.Array) -> jax.Array:
        y = super().__call__(inputs)
        y = y if self.dtype is None else y.astype(self.dtype)
        if self.remat_name and memory.current().remat:
            y = checkpoint_name(y, self.remat_name)
        return y


def linear(in_features: int, out_features: int, axes: Axes, *, use_bias: bool = True,
           dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs,
           kernel_init=nnx.initializers.lecun_normal()) -> nnx.Linear:
    """:class:`Linear` whose kernel ``[in, out]`` has logical axes ``axes`` and bias ``axes[1:]``."""
    return Linear(
        in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
        kernel_init=kernel_init, rngs=rngs, remat_name=remat_name(axes),
        kernel_metadata=axes_meta(axes), bias_metadata=axes_meta(axes[1:]),
    )


def layer_norm(num_features: int, eps: float, axis_name: str = "norm", *, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """PyTorch-equivalent LayerNorm (two-pass variance, statistics in float32)."""
    return nnx.LayerNorm(
        num_features, epsilon=eps, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False,
        rngs=rngs, scale_metadata=axes_meta((axis_name,)), bias_metadata=axes_meta((axis_name,)),
    )


class RMSNorm(nnx.Module):
    """``weight * (x / sqrt(mean(x^2) + eps))``, the statistics in float32 and the product in the
    input dtype, exactly as Qwen2RMSNorm / InternVLVisionRMSNorm. Input ``[..., D]``."""

    def __init__(self, dim: int, eps: float = 1e-6, axis_name: str = "norm", *,
                 param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        del rngs
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), **axes_meta((axis_name,)))

    def __call__(self, x: jax.Array) -> jax.Array:
        in_dtype = x.dtype
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        w = self.weight[...]
        return (w * h.astype(in_dtype)).astype(jnp.promote_types(w.dtype, in_dtype))


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, as ``torch.nn.GELU()`` / transformers' ``"gelu"``."""
    return jax.nn.gelu(x, approximate=False)


def count_params(module_or_state) -> int:
    """Number of scalars in every ``nnx.Param`` (works on abstract modules from eval_shape)."""
    state = nnx.state(module_or_state, nnx.Param) if isinstance(module_or_state, nnx.Module) \
        else module_or_state
    total = 0
    for leaf in jax.tree.leaves(state):
        total += int(leaf.size)
    return total
