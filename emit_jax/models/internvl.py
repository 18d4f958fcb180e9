"""The InternVL multimodal LLM (Flax NNX): InternViT -> pixel shuffle -> mlp1 -> Qwen2.

Parameter-compatible with transformers' ``InternVLForConditionalGeneration``; the image-token
positions (``image_token_id``) of ``input_ids`` are filled, in order (sample by sample, image by
image, tile by tile), with the projected visual tokens, exactly as transformers' masked_scatter.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from emit_jax.models.config import InternVLConfig, dtype_from_name
from emit_jax.models.internvit import InternViT
from emit_jax.models.layers import gelu, layer_norm, linear
from emit_jax.models.qwen2 import KVCache, Qwen2Model


def pixel_shuffle(x: jax.Array, downsample_ratio: float = 0.5) -> jax.Array:
    """InternVL's pixel shuffle (ps_version v2). ``[N, g, g, C] -> [N, g*s, g*s, C/s^2]``.

    With ``r = 1/s`` output cell ``(i, j)`` joins input cells ``(r*i + dr, r*j + dc)`` and its
    channel ``(dr*r + dc)*C + ch`` holds input channel ``ch`` of that cell (docs/reference/emit.md 2.2).
    """
    n, gh, gw, c = x.shape
    r = int(round(1 / downsample_ratio))
    if gh % r or gw % r:
        raise ValueError(f"pixel_shuffle: grid {gh}x{gw} is not divisible by {r}")
    x = x.reshape(n, gh // r, r, gw // r, r, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, gh // r, gw // r, r * r * c)


class MultiModalProjector(nnx.Module):
    """mlp1: LayerNorm(eps 1e-5) -> Linear -> GELU -> Linear. ``[..., 4*Dv] -> [..., D]``."""

    def __init__(self, cfg: InternVLConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        r = int(round(1 / cfg.downsample_ratio))
        d_in = cfg.vision.hidden_size * r * r
        d = cfg.text.hidden_size
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm = layer_norm(d_in, 1e-5, "mm_in", **kw)
        self.linear_1 = linear(d_in, d, ("mm_in", "embed"), **kw)
        self.linear_2 = linear(d, d, ("mm_hidden", "embed"), **kw)

    def __call__(self, x):
        return self.linear_2(gelu(self.linear_1(self.layer_norm(x))))


class ModelOutput(NamedTuple):
    logits: jax.Array  # [B, T, V]
    cache: KVCache | None = None
    hidden_states: tuple | None = None  # LLM hidden states (embeddings, block 1..L outputs)
    last_hidden: jax.Array | None = None  # [B, T, D] after the final norm


class InternVL(nnx.Module):
    """``model(input_ids [B, T], pixel_values [N, 3, H, W] | None, attention_mask [B, T] | None)
    -> logits [B, T, V]``. See :meth:`forward` for caches, positions and hidden states."""

    def __init__(self, cfg: InternVLConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.config = cfg
        dt, pdt = dtype_from_name(cfg.dtype), dtype_from_name(cfg.param_dtype)
        self.vision_tower = InternViT(cfg.vision, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                      rngs=rngs, scan_layers=cfg.scan_layers)
        self.multi_modal_projector = MultiModalProjector(cfg, dtype=dt, param_dtype=pdt, rngs=rngs)
        self.language_model = Qwen2Model(cfg.text, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                         rngs=rngs, scan_layers=cfg.scan_layers)
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = linear(cfg.text.hidden_size, cfg.text.vocab_size, ("embed", "vocab"),
                                  use_bias=False, dtype=dt, param_dtype=pdt, rngs=rngs,
                                  kernel_init=nnx.initializers.normal(0.02))

    # ------------------------------------------------------------------ vision
    def get_image_features(self, pixel_values: jax.Array) -> jax.Array:
        """``[N, 3, H, W]`` tiles -> ``[N, (H/p * s)(W/p * s), D]`` LLM-space visual tokens."""
        cfg = self.config
        if cfg.vision_feature_layer == -1:
            feats = self.vision_tower(pixel_values)
        else:
            _, hidden = self.vision_tower(pixel_values, output_hidden_states=True)
            feats = hidden[cfg.vision_feature_layer]
        if cfg.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]
        n, p, d = feats.shape
        g = int(round(p ** 0.5))
        if g * g != p:
            raise ValueError(f"image features: {p} patches do not form a square grid")
        feats = pixel_shuffle(feats.reshape(n, g, g, d), cfg.downsample_ratio)
        feats = feats.reshape(n, -1, feats.shape[-1])
        return self.multi_modal_projector(feats)

    def embed(self, input_ids: jax.Array, pixel_values: jax.Array | None = None,
              image_features: jax.Array | None = None, tile_valid: jax.Array | None = None
              ) -> jax.Array:
        """Token embeddings ``[B, T, D]`` with the image-token positions replaced, in order, by
        the visual tokens of ``pixel_values`` (or of precomputed ``image_features [N, K, D]``);
        ``tile_valid [N]`` marks the real tiles when padding lies between them."""
        embeds = self.language_model.embed_tokens(input_ids)
        if image_features is None and pixel_values is not None:
            image_features = self.get_image_features(pixel_values)
        if image_features is None:
            return embeds
        return merge_image_features(embeds, input_ids, image_features, self.config.image_token_id,
                                    valid=tile_valid)

    # ------------------------------------------------------------------ LLM
    def logits_from_hidden(self, hidden: jax.Array) -> jax.Array:
        """``[..., D] -> [..., V]`` through lm_head (or the tied input embeddings)."""
        if self.lm_head is None:
            return self.language_model.embed_tokens.attend(hidden)
        return self.lm_head(hidden)

    def forward(self, input_ids: jax.Array | None = None, pixel_values: jax.Array | None = None,
                attention_mask: jax.Array | None = None, *, positions: jax.Array | None = None,
                cache: KVCache | None = None, inputs_embeds: jax.Array | None = None,
                image_features: jax.Array | None = None, output_hidden_states: bool = False,
                compute_logits: bool = True, tile_valid: jax.Array | None = None) -> ModelOutput:
        """General forward. Exactly one of ``input_ids [B, T]`` / ``inputs_embeds [B, T, D]``.

        ``attention_mask [B, T]``: 1 for tokens, 0 for (left) padding. ``positions [B, T]``
        default to ``cumsum(mask) - 1`` (continuing from the cache when one is given).
        ``cache``: a :class:`KVCache`; the tokens are written at its end and the updated cache
        is returned.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, pixel_values, image_features, tile_valid)
        elif pixel_values is not None or image_features is not None:
            raise ValueError("pixel_values/image_features need input_ids to locate the image tokens")
        hidden, cache, all_hidden = self.language_model(
            inputs_embeds, attention_mask, positions, cache, output_hidden_states)
        logits = self.logits_from_hidden(hidden) if compute_logits else None
        return ModelOutput(logits=logits, cache=cache, hidden_states=all_hidden, last_hidden=hidden)

    def __call__(self, input_ids: jax.Array, pixel_values: jax.Array | None = None,
                 attention_mask: jax.Array | None = None) -> jax.Array:
        """``[B, T]`` ids -> ``[B, T, V]`` logits."""
        return self.forward(input_ids, pixel_values, attention_mask).logits

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        """An empty KV cache for ``batch`` rows of up to ``max_len`` tokens (with
        ``scan_layers`` its ``k, v`` are ``[L, B, S, KVH, Dh]`` arrays rather than tuples)."""
        dtype = dtype or dtype_from_name(self.config.dtype)
        cache = KVCache.create(self.config.text, batch, max_len, dtype)
        if self.config.scan_layers:
            cache = cache._replace(k=jnp.stack(cache.k), v=jnp.stack(cache.v))
        return cache


def valid_first(rows: jax.Array, valid: jax.Array | None) -> jax.Array:
    """``rows [N, ...]`` reordered so the rows where ``valid [N]`` holds come first, in order
    (the padding after). A batch assembled from several processes' padded blocks has padding
    between its real rows; this puts them back in the flattened order the tokens use."""
    if valid is None:
        return rows
    return rows[jnp.argsort(jnp.logical_not(valid), stable=True)]


def merge_image_features(embeds: jax.Array, input_ids: jax.Array, image_features: jax.Array,
                         image_token_id: int, kind: str = "image",
                         valid: jax.Array | None = None) -> jax.Array:
    """Replace the ``image_token_id`` positions of ``embeds [B, T, D]`` by the rows of
    ``image_features [N, K, D]`` in flattened order; rows past the last token are padding (fixed
    batch shapes). With ``valid [N]`` (bool) only the rows it marks are used, in order, wherever
    the padding lies (:func:`valid_first`). Raises when the tokens are more than the features or
    not whole rows (checked when ``input_ids`` is concrete, i.e. outside jit)."""
    image_features = valid_first(image_features, valid)
    b, t, d = embeds.shape
    feats = image_features.reshape(-1, image_features.shape[-1]).astype(embeds.dtype)
    is_img = (input_ids == image_token_id).reshape(-1)
    if not isinstance(input_ids, jax.core.Tracer):
        n_tokens = int(jnp.sum(is_img))
        if n_tokens > feats.shape[0] or n_tokens % max(image_features.shape[1], 1):
            raise ValueError(
                f"{kind} features and {kind} tokens do not match: {n_tokens} {kind} tokens "
                f"(id {image_token_id}) in input_ids, {feats.shape[0]} features "
                f"({image_features.shape[0]} x {image_features.shape[1]})")
    idx = jnp.clip(jnp.cumsum(is_img) - 1, 0, max(feats.shape[0] - 1, 0))
    merged = jnp.where(is_img[:, None], feats[idx], embeds.reshape(-1, d))
    return merged.reshape(b, t, d)
