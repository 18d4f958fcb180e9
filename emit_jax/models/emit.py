"""EMIT's additions to InternVL (docs/reference/emit.md 4.4, 5, 6, 7): contrastive embeddings from a local-window
heat map, the soft prompt, and their ``<COMP_CONTEXT>`` slots in the token sequence.

Per CE sample (a normal reference image and a query image, each one 448 px tile):

1. the query and the four rot90 rotations of the reference go through the model's own ViT with
   no gradient; hidden states of ``ce_layers`` (4/8/16/20 of InternViT-300M's 24 blocks) feed
   :func:`emit_jax.ops.heatmap.anomaly_map` -> heat map ``[h, w]`` (32x32 at 448 px);
2. :class:`HeatmapProjector`: BatchNorm over the single channel, Conv(1 -> D, 4x4, stride 2,
   pad 1), flattened row-major -> ``(h/2)(w/2)`` tokens (256);
3. ``ref_tokens = [soft_prompt (9); CE tokens (256)]`` overwrite, in flattened batch order, the
   ``<COMP_CONTEXT>`` positions of the input ids (265 per CE sample).

BatchNorm (docs/reference/emit.md 5.5): ``bn_mode='standard'`` (default) uses batch statistics in train mode
and the running statistics in eval mode, and touches nothing on batches without a CE sample.
``bn_mode='official'`` additionally reproduces the reference code's dummy pass: every forward
in train mode with no CE sample pushes a zero heat map through BatchNorm, pulling the running
statistics towards mean 0 / variance 0 exactly as the released model's were
(:meth:`EMIT.forward` does it; the ablation switches leave it alone).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import warnings
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# the <COMP_CONTEXT> sequence rules live on the data side; named here too (the model's API)
from emit_jax.data.comp import (COMP_TOKEN, HINT_TEXT, add_comp_token_to_tokenizer,  # noqa: F401
                                comp_insert_index, hint_token_ids, insert_comp_slots, use_comp)
from emit_jax.models.config import dtype_from_name
from emit_jax.models.internvl import InternVL, ModelOutput, merge_image_features
from emit_jax.models.layers import axes_meta
from emit_jax.ops.heatmap import anomaly_map

OFFICIAL_LAYERS = (4, 8, 16, 20)  # of InternViT-300M's 24 blocks
OFFICIAL_WINDOW = 6  # at the 32 x 32 patch grid of a 448 px tile
OFFICIAL_SOFT_PROMPT = "soft_prompt_init_9x3584_float32.npy"
#: ``peak_location``'s initial softmax sharpness over the normalised map (a peak of 3-4 standard
#: deviations then outweighs the ~250 ordinary positions of a 16 x 16 map)
PEAK_TEMPERATURE = 2.0


def scaled_layers(depth: int, layers: Sequence[int] = OFFICIAL_LAYERS, ref_depth: int = 24):
    """EMIT's layer choice carried to a ViT of another depth: ``round(l * depth / 24)``, kept
    distinct and within 1..depth (6 blocks -> 1, 2, 4, 5)."""
    out = []
    for l in layers:
        v = min(depth, max(1, int(round(l * depth / ref_depth))))
        while v in out and v < depth:
            v += 1
        out.append(v)
    return tuple(sorted(set(out)))


@dataclasses.dataclass(frozen=True)
class EMITConfig:
    ce_layers: tuple[int, ...] | None = None  # None: OFFICIAL_LAYERS scaled to the ViT depth
    # neighbor_dis: half-width of the (2k+1)^2 window in patches; None: the official 6 at a 32-patch
    # grid, scaled to the model's grid (3 for the tiny 16x16)
    window: int | None = None
    rotations: int = 4  # rot90 copies of the reference (k = 0..rotations-1)
    # not in EMIT: each of those copies also turned by 90 * j / reference_turns degrees,
    # j = 1..reference_turns-1 (bilinear): 1 is EMIT's four references, 4 sixteen, 22.5 degrees
    # apart (objects whose normal images turn freely, docs/training.md)
    reference_turns: int = 1
    # not in EMIT: each of those copies' ViT feature grids also turned by 90 / reference_turns *
    # j / feature_turns degrees, j = 1..feature_turns-1 (bilinear, no ViT pass): 4 is sixteen
    # references from EMIT's four ViT passes
    feature_turns: int = 1
    # not in EMIT: of the reference_turns, only the one nearest the query in pixels goes through
    # the ViT, in its rot90 copies (nearest_turn): EMIT's four ViT passes
    align_turn: bool = False
    zero_fill: bool = True  # official: masked similarities count as 0 (docs/reference/emit.md 5.2)
    heatmap_strategy: str = "auto"
    num_soft_tokens: int = 9
    use_soft_prompt: bool = True  # ablation switches (paper Table 3)
    use_contrastive: bool = True
    bn_mode: str = "standard"  # or "official" (docs/reference/emit.md 5.5)
    bn_momentum: float = 0.1  # PyTorch convention: new = (1 - m) * old + m * batch
    bn_eps: float = 1e-5
    # not in EMIT: every CE token also gets max(BN(heat map)) * u (u learned, zero at init), so a
    # frozen LLM that averages over the 64 tokens still sees the map's maximum (HeatmapProjector)
    max_readout: bool = False
    # not in EMIT: every CE token also gets where the map peaks, sum_p softmax(t * BN(map))_p e_p
    # (e [h*w, D] learned, zero at init; t learned), so a frozen LLM reading about the mean of
    # the tokens can still tell where the defect is (HeatmapProjector)
    peak_location: bool = False
    # not in EMIT: every CE token also gets W f, f the query's CE-layer features averaged over
    # the heat map's ``hot_patches`` hottest patches minus the references' mean feature (each
    # layer scaled by the query's feature RMS), W learned and zero at init; 0 = off. The defect's
    # kind is in those features (a linear probe reads it, docs/training.md), not in the map
    hot_patches: int = 0
    comp_token_id: int | None = None

    def validate(self) -> "EMITConfig":
        if self.bn_mode not in ("standard", "official"):
            raise ValueError(f"bn_mode must be 'standard' or 'official', got {self.bn_mode!r}")
        # each bad field named (before: "bad EMIT config EMITConfig(...)", 14 fields)
        for name, value, low in (("window", self.window, 0), ("rotations", self.rotations, 1),
                                 ("reference_turns", self.reference_turns, 1),
                                 ("feature_turns", self.feature_turns, 1),
                                 ("num_soft_tokens", self.num_soft_tokens, 0),
                                 ("hot_patches", self.hot_patches, 0)):
            if value is not None and value < low:
                raise ValueError(f"{name}: {value} is below {low}")
        if self.align_turn and self.reference_turns == 1:
            raise ValueError("align_turn: true with reference_turns 1 (one turn, nothing to "
                             "choose from); set reference_turns above 1")
        if self.use_soft_prompt and self.num_soft_tokens == 0:
            raise ValueError("num_soft_tokens: 0 with use_soft_prompt=True (a soft prompt of no "
                             "token); set use_soft_prompt=False for none")
        return self

    def layers_for(self, depth: int) -> tuple[int, ...]:
        layers = tuple(self.ce_layers) if self.ce_layers else scaled_layers(depth)
        if any(not 1 <= l <= depth for l in layers):
            raise ValueError(f"ce_layers {layers} outside the ViT's 1..{depth} blocks")
        if len(set(layers)) != len(layers):  # (before: a block's distance counted twice)
            raise ValueError(f"ce_layers {layers}: a block is named twice")
        return layers

    def window_for(self, grid: int) -> int:
        if self.window is not None:
            return self.window
        return max(1, int(round(OFFICIAL_WINDOW * grid / 32)))

    def to_json_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ce_layers"] = list(self.ce_layers) if self.ce_layers else None
        return d

    @classmethod
    def from_json_dict(cls, d: dict) -> "EMITConfig":
        d = dict(d)
        if d.get("ce_layers") is not None:
            d["ce_layers"] = tuple(d["ce_layers"])
        return cls(**d).validate()


# ------------------------------------------------------------------------------ projector
class HeatmapBatchNorm(nnx.Module):
    """PyTorch ``BatchNorm2d(1)`` semantics on ``[B, h, w]``: biased batch variance to
    normalise, unbiased to update the running variance; ``use_running_average`` toggled by
    ``model.train()`` / ``model.eval()``."""

    def __init__(self, momentum: float = 0.1, eps: float = 1e-5):
        self.momentum = momentum
        self.eps = eps
        self.use_running_average = False
        self.scale = nnx.Param(jnp.ones((1,), jnp.float32), **axes_meta(("norm",)))
        self.bias = nnx.Param(jnp.zeros((1,), jnp.float32), **axes_meta(("norm",)))
        self.mean = nnx.BatchStat(jnp.zeros((1,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((1,), jnp.float32))

    def update_stats(self, x: jax.Array, valid: jax.Array | None = None
                     ) -> tuple[jax.Array, jax.Array]:
        """Batch mean / biased variance of ``x [B, h, w]`` (only rows where ``valid [B]``, when
        given: padding rows of a batch never enter the statistics); folds them into the
        running statistics."""
        x = x.astype(jnp.float32)
        if valid is None:
            w = jnp.ones_like(x)
        else:
            w = jnp.broadcast_to(valid.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1)),
                                 x.shape)
        n = jnp.maximum(jnp.sum(w), 1.0)
        mean = jnp.sum(x * w) / n
        var = jnp.sum(jnp.square(x - mean) * w) / n
        m = self.momentum
        self.mean[...] = (1 - m) * self.mean[...] + m * mean
        self.var[...] = (1 - m) * self.var[...] + m * var * (n / jnp.maximum(n - 1, 1.0))
        return mean, var

    def __call__(self, x: jax.Array, valid: jax.Array | None = None) -> jax.Array:
        if self.use_running_average:
            mean, var = self.mean[...][0], self.var[...][0]
        else:
            mean, var = self.update_stats(x, valid)
        y = (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + self.eps)
        return y * self.scale[...][0] + self.bias[...][0]


class HeatmapProjector(nnx.Module):
    """heat map ``[B, h, w]`` -> BN -> Conv(1 -> D, 4, stride 2, pad 1) -> ``[B, (h/2)(w/2), D]``.

    ``max_readout`` (not in EMIT, off by default): each token also gets ``max(BN(map)) * u``, with
    ``u [D]`` learned and zero at init (so training starts from the official projector). The conv
    is linear per 4x4 cell, and an LLM that cannot be trained (stage 1) and attends about evenly
    over the tokens reads roughly the map's mean. On the embedded default, with the tiny ViT as
    initialised, the mean separates the classes with AUROC 0.62-0.67 and the maximum with
    0.81-0.88 (docs/training.md)."""

    def __init__(self, hidden: int, *, momentum=0.1, eps=1e-5, dtype=jnp.float32,
                 param_dtype=jnp.float32, max_readout: bool = False, peak_cells: int = 0,
                 hot_dim: int = 0, rngs: nnx.Rngs):
        self.bn = HeatmapBatchNorm(momentum, eps)
        # hot_patches: the hot patches' features [hot_dim] -> [D], zero at init
        self.hot_proj = nnx.Param(jnp.zeros((hot_dim, hidden), param_dtype),
                                  **axes_meta((None, "embed"))) if hot_dim else None
        self.max_proj = nnx.Param(jnp.zeros((hidden,), param_dtype), **axes_meta(("embed",))) \
            if max_readout else None
        # peak_location: one embedding per map position, and the softmax's sharpness
        self.loc_embed = nnx.Param(jnp.zeros((peak_cells, hidden), param_dtype),
                                   **axes_meta((None, "embed"))) if peak_cells else None
        self.loc_temp = nnx.Param(jnp.full((1,), PEAK_TEMPERATURE, jnp.float32),
                                  **axes_meta(("norm",))) if peak_cells else None
        self.conv = nnx.Conv(
            1, hidden, kernel_size=(4, 4), strides=(2, 2), padding=((1, 1), (1, 1)), dtype=dtype,
            param_dtype=param_dtype, rngs=rngs,
            # PyTorch kaiming_normal_(mode='fan_in', nonlinearity='leaky_relu', a=0): std sqrt(2/16)
            kernel_init=nnx.initializers.variance_scaling(2.0, "fan_in", "normal"),
            bias_init=nnx.initializers.zeros,
            kernel_metadata=axes_meta(("conv_h", "conv_w", "conv_in", "embed")),
            bias_metadata=axes_meta(("embed",)))

    def __call__(self, heat: jax.Array, valid: jax.Array | None = None,
                 hot: jax.Array | None = None) -> jax.Array:
        """``heat [B, h, w]`` (and, with ``hot_proj``, ``hot [B, hot_dim]``: the hot patches'
        features, :func:`hot_features`) -> ``[B, (h/2)(w/2), D]``."""
        y = self.bn(heat, valid)  # [B, h, w]
        x = self.conv(y[..., None])  # [B, h/2, w/2, D]
        b, h2, w2, d = x.shape
        x = x.reshape(b, h2 * w2, d)
        if self.max_proj is not None:
            peak = jnp.max(y, axis=(1, 2)).astype(x.dtype)  # [B]
            x = x + peak[:, None, None] * self.max_proj[...].astype(x.dtype)[None, None, :]
        if self.loc_embed is not None:
            x = x + self.peak_location(y).astype(x.dtype)[:, None, :]
        if self.hot_proj is not None:
            if hot is None:
                raise ValueError("the projector has hot_proj (emit.hot_patches) but no hot "
                                 "patches' features were given")
            w = self.hot_proj[...]
            x = x + (hot.astype(jnp.float32) @ w.astype(jnp.float32)).astype(x.dtype)[:, None, :]
        return x

    def peak_location(self, y: jax.Array) -> jax.Array:
        """``y [B, h, w]`` (the normalised map) -> ``[B, D]``: the position embeddings weighted
        by ``softmax(t * y)`` over the ``h * w`` positions (about the hottest one's when the map
        has a clear peak)."""
        b, h, w = y.shape
        if h * w != self.loc_embed.shape[0]:
            raise ValueError(f"peak_location: a {h} x {w} map, embeddings for "
                             f"{self.loc_embed.shape[0]} positions")
        p = jax.nn.softmax(self.loc_temp[...][0] * y.reshape(b, h * w).astype(jnp.float32), -1)
        return p @ self.loc_embed[...].astype(jnp.float32)


def ce_valid(num_ce, n: int) -> jax.Array | None:
    """The real rows of ``n`` CE rows: ``num_ce`` is None (all), a count (the first ``num_ce``)
    or already a bool mask ``[n]``."""
    if num_ce is None:
        return None
    if jnp.ndim(num_ce) == 1:
        return jnp.asarray(num_ce, bool)
    return jnp.arange(n) < num_ce


# ------------------------------------------------------------------------------ heat map
def rotations_of(images: jax.Array, n: int = 4) -> jax.Array:
    """``[B, C, H, W]`` -> ``[B, n, C, H, W]``: rot90 by k = 0..n-1 (counter-clockwise,
    ``out[i][j] = in[j][W-1-i]`` for k = 1), as ``torch.rot90(x, k, (2, 3))``."""
    return jnp.stack([jnp.rot90(images, k, axes=(2, 3)) for k in range(n)], axis=1)


def turned(images: jax.Array, degrees: float, mode: str = "nearest") -> jax.Array:
    """``[B, C, H, W]`` turned ``degrees`` about the image's centre in ``jnp.rot90``'s sense
    (``turned(x, 90) == rot90(x, 1)`` for a square x), bilinear, the edge's values continued
    outside (``scipy.ndimage.rotate(x, degrees, axes=(2, 3), order=1, mode="nearest")``);
    ``mode="constant"``: the image padded with zeros, blended in at the edge (scipy's
    ``mode="grid-constant"``)."""
    b, c, h, w = images.shape
    th = np.deg2rad(degrees)
    yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                          indexing="ij")
    cy, cx = (h - 1) / 2, (w - 1) / 2
    # out[y, x] = in[R^-1 (y, x)]; rot90 (k = 1): out[i][j] = in[j][W-1-i]
    src_y = cy + np.sin(th) * (xx - cx) + np.cos(th) * (yy - cy)
    src_x = cx + np.cos(th) * (xx - cx) - np.sin(th) * (yy - cy)
    flat = images.reshape(b * c, h, w)
    out = jax.vmap(lambda im: jax.scipy.ndimage.map_coordinates(
        im, [src_y, src_x], order=1, mode=mode, cval=0.0))(flat)
    return out.reshape(b, c, h, w).astype(images.dtype)


def reference_bank(ref: jax.Array, rotations: int = 4, turns: int = 1) -> jax.Array:
    """``[n, C, H, W]`` -> ``[n, turns * rotations, C, H, W]``: each turn of the reference
    (0, 90 / turns, ... degrees, :func:`turned`) in its ``rotations`` rot90 copies."""
    n, c, hh, ww = ref.shape
    base = jnp.stack([ref] + [turned(ref, 90.0 * j / turns) for j in range(1, turns)], axis=1)
    return rotations_of(base.reshape(n * turns, c, hh, ww), rotations).reshape(
        n, turns * rotations, c, hh, ww)


def turned_features(feats: jax.Array, turns: int, span: float = 90.0) -> jax.Array:
    """``[..., R, g, g, D]`` patch features of R reference copies -> ``[..., turns * R, g, g, D]``:
    the copies as they are, then each copy's feature grid turned by ``span * j / turns`` degrees
    (j = 1..turns-1; bilinear, :func:`turned` about the grid's centre, the grid padded with
    zeros: ``scipy.ndimage.rotate``'s ``mode="grid-constant"``), turn-major as
    :func:`reference_bank` orders its copies."""
    *lead, r, g, g2, d = feats.shape
    flat = jnp.moveaxis(feats.reshape(-1, g, g2, d), -1, 1)  # [N, D, g, g]
    out = [flat] + [turned(flat, span * j / turns, mode="constant") for j in range(1, turns)]
    out = jnp.moveaxis(jnp.stack(out, 0), 2, -1)  # [turns, N, g, g, D]
    out = out.reshape(turns, -1, r, g, g2, d)  # [turns, prod(lead), R, g, g, D]
    return jnp.moveaxis(out, 0, 1).reshape(*lead, turns * r, g, g2, d)


def nearest_turn(query: jax.Array, bank: jax.Array, rotations: int, pool: int = 4) -> jax.Array:
    """``query [n, C, H, W]``, ``bank [n, turns * rotations, C, H, W]`` (:func:`reference_bank`)
    -> ``[n]`` int32: the turn whose copy is nearest the query in pixels (the mean squared
    difference of ``pool`` x ``pool`` averages, each image's mean removed)."""
    h, w = bank.shape[-2] // pool, bank.shape[-1] // pool

    def small(x):  # [..., C, H, W] -> [..., C*h*w], mean removed
        x = x[..., :h * pool, :w * pool].astype(jnp.float32)
        x = x.reshape(*x.shape[:-2], h, pool, w, pool).mean((-3, -1)).reshape(*x.shape[:-3], -1)
        return x - x.mean(-1, keepdims=True)

    d = jnp.mean((small(bank) - small(query)[:, None]) ** 2, axis=-1)  # [n, K]
    return (jnp.argmin(d, axis=-1) // rotations).astype(jnp.int32)


def contrastive_heatmap(vit, ce_pixels: jax.Array, layers: Sequence[int], window: int, *,
                        rotations: int = 4, zero_fill: bool = True,
                        strategy: str = "auto", turns: int = 1,
                        feature_turns: int = 1, align_turn: bool = False,
                        hot_patches: int = 0):
    """``ce_pixels [n, 2, 3, H, W]`` (slot 0 the normal reference, slot 1 the query) ->
    heat map ``[n, H/p, W/p]`` float32. No gradient reaches the ViT. ``turns`` > 1 adds the
    reference turned between the rot90s (:func:`reference_bank`; not in EMIT), one ViT pass per
    copy; ``feature_turns`` > 1 turns each copy's ViT feature grid between it and the next turn
    (:func:`turned_features`, by ``90 / turns * j / feature_turns`` degrees; no ViT pass):
    ``rotations * turns * feature_turns`` copies in all (not in EMIT). ``align_turn`` keeps
    only the turn whose copy is nearest the query in pixels (:func:`nearest_turn`), in its
    ``rotations`` rot90s: ``rotations`` ViT passes (not in EMIT)."""
    n, two, c, hh, ww = ce_pixels.shape
    if two != 2:
        raise ValueError(f"ce_pixels must be [n, 2, 3, H, W] (reference, query); got {ce_pixels.shape}")
    if hh != ww and (rotations > 1 or turns > 1):
        raise ValueError(f"CE images must be square to rotate; got {hh}x{ww}")
    ref, query = ce_pixels[:, 0], ce_pixels[:, 1]
    bank = reference_bank(ref, rotations, turns)  # [n, turns * rotations, C, H, W]
    kept = turns  # the turns the ViT sees
    if align_turn and turns > 1:
        j = nearest_turn(query, bank, rotations)
        bank = bank.reshape(n, turns, rotations, c, hh, ww)[jnp.arange(n), j]
        kept = 1
    copies = rotations * kept
    refs = bank.reshape(n * copies, c, hh, ww)
    _, hidden = vit(jnp.concatenate([query, refs], 0), output_hidden_states=True,
                    num_layers=max(layers), hidden_layers=tuple(layers))
    feats = jax.lax.stop_gradient(jnp.stack([hidden[l][:, 1:] for l in layers]))  # [L, N, P, D]
    L, _, p, d = feats.shape
    g = int(round(p ** 0.5))
    q = feats[:, :n].reshape(L, n, g, g, d)
    r = feats[:, n:].reshape(L, n, copies, g, g, d)
    if feature_turns > 1:
        r = turned_features(r, feature_turns, 90.0 / turns)  # between one turn and the next
    heat = anomaly_map(q, r, window, zero_fill, strategy)
    if hot_patches:
        return heat, hot_features(heat, q, r, hot_patches)
    return heat


def config_heatmap(vit, ce_pixels: jax.Array, c: EMITConfig, *, with_hot: bool = False):
    """:func:`contrastive_heatmap` as the EMIT config ``c`` sets it up for the ViT ``vit`` (an
    InternViT): its CE layers and window scaled to the ViT's depth and patch grid. ``ce_pixels
    [n, 2, 3, H, W]`` -> ``[n, g, g]``; with ``with_hot`` (and ``c.hot_patches``) ``(heat,
    hot)``."""
    vc = vit.cfg
    return contrastive_heatmap(vit, ce_pixels, c.layers_for(vc.num_hidden_layers),
                               c.window_for(vc.grid), rotations=c.rotations,
                               zero_fill=c.zero_fill, strategy=c.heatmap_strategy,
                               turns=c.reference_turns, feature_turns=c.feature_turns,
                               align_turn=c.align_turn,
                               hot_patches=c.hot_patches if with_hot else 0)


def hot_features(heat: jax.Array, q: jax.Array, r: jax.Array, k: int) -> jax.Array:
    """``heat [n, g, g]``, query features ``q [L, n, g, g, D]``, reference features
    ``r [L, n, R, g, g, D]`` -> ``[n, L * D]`` float32: per layer, the mean of the query's
    features at the ``k`` hottest patches minus the mean of every reference patch, divided by
    the RMS of the query's features at that layer (so layers of different scale weigh alike),
    the layers concatenated. Not in EMIT (``emit.hot_patches``)."""
    L, n, g, g2, d = q.shape
    if not 1 <= k <= g * g2:
        raise ValueError(f"hot_patches {k}: a {g} x {g2} map has {g * g2} patches")
    qf = q.reshape(L, n, g * g2, d).astype(jnp.float32)
    _, top = jax.lax.top_k(heat.reshape(n, g * g2).astype(jnp.float32), k)  # [n, k]
    at = jnp.take_along_axis(qf, top[None, :, :, None], axis=2).mean(2)  # [L, n, D]
    ref = r.astype(jnp.float32).mean(axis=(2, 3, 4))  # [L, n, D]
    rms = jnp.sqrt(jnp.mean(jnp.square(qf), axis=(2, 3)) + 1e-12)  # [L, n]
    out = (at - ref) / rms[..., None]
    return jnp.moveaxis(out, 0, 1).reshape(n, L * d)


# ------------------------------------------------------------------------------ soft prompt
def official_soft_prompt() -> np.ndarray:
    """The authors' 9 x 3584 initial value (bf16 in their release, stored as float32)."""
    ref = importlib.resources.files("emit_jax.assets").joinpath(OFFICIAL_SOFT_PROMPT)
    with ref.open("rb") as f:
        return np.load(f, allow_pickle=False)


def soft_prompt_from_hint(embedding: np.ndarray, hint_ids: Sequence[int], n: int = 9) -> np.ndarray:
    """Fit the embeddings of the hint text's tokens to ``n`` rows: row i copies the embedding
    of token ``hint_ids[i * len // n]``. In order; a hint shorter than ``n`` repeats its earliest
    tokens (8 tokens -> the first appears twice), a longer one is subsampled evenly."""
    return np.asarray(embedding)[np.asarray(hint_rows(hint_ids, n))]


def hint_rows(hint_ids: Sequence[int], n: int = 9) -> list[int]:
    """The token ids :func:`soft_prompt_from_hint` copies, row by row."""
    if len(hint_ids) == 0:
        raise ValueError("hint_ids is empty")
    return [hint_ids[i * len(hint_ids) // n] for i in range(n)]


def add_comp_token(mllm: InternVL) -> tuple[InternVL, int]:
    """Append ``<COMP_CONTEXT>`` to the vocabulary: the new id is the old vocabulary size; its
    output row (lm_head, or the tied matrix) is the mean of the previous rows (docs/reference/emit.md 2.3);
    its input row is always overwritten, so with an untied head it is set to the mean too."""
    cfg = mllm.config
    new_id = cfg.text.vocab_size
    text = dataclasses.replace(cfg.text, vocab_size=new_id + 1)
    new_cfg = cfg.replace(text=text)
    abstract = nnx.eval_shape(lambda: InternVL(new_cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    old = nnx.state(mllm)
    pure = nnx.to_pure_dict(old)

    def grow(table, axis):  # append the mean row / column
        mean = jnp.mean(table.astype(jnp.float32), axis=axis, keepdims=True).astype(table.dtype)
        return jnp.concatenate([table, mean], axis=axis)

    emb = pure["language_model"]["embed_tokens"]["embedding"]
    pure["language_model"]["embed_tokens"]["embedding"] = grow(emb, 0)
    if pure.get("lm_head"):
        pure["lm_head"]["kernel"] = grow(pure["lm_head"]["kernel"], 1)
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state), new_id


def is_emit(model) -> bool:
    """Whether ``model`` is an EMIT model (or a LoRA policy over one, which keeps its
    attributes): soft prompt, projector and ``<COMP_CONTEXT>`` slots, rather than a plain
    InternVL."""
    return hasattr(model, "emit_config")


# ------------------------------------------------------------------------------ the model
class EMIT(nnx.Module):
    """InternVL + soft prompt + contrastive-embedding projector.

    ``model(input_ids, pixel_values, attention_mask, ce_pixels=None) -> logits``; ``ce_pixels
    [n_ce, 2, 3, H, W]`` are the (reference, query) pairs of the CE samples, in batch order, and
    ``input_ids`` hold ``num_comp_slots`` ``comp_token_id`` positions per CE sample.
    """

    def __init__(self, mllm: InternVL, cfg: EMITConfig, *, rngs: nnx.Rngs,
                 soft_prompt: np.ndarray | None = None):
        cfg.validate()
        if cfg.comp_token_id is None:
            raise ValueError("EMITConfig.comp_token_id is unset; use EMIT.create (adds the token)")
        self.mllm = mllm
        self.emit_config = cfg
        mc = mllm.config
        d = mc.text.hidden_size
        pdt, dt = dtype_from_name(mc.param_dtype), dtype_from_name(mc.dtype)
        self.ce_layers = cfg.layers_for(mc.vision.num_hidden_layers)
        if soft_prompt is None:
            soft_prompt = nnx.initializers.normal(0.02)(rngs.params(), (cfg.num_soft_tokens, d))
        soft_prompt = jnp.asarray(soft_prompt)
        if soft_prompt.shape != (cfg.num_soft_tokens, d):
            raise ValueError(f"soft prompt init has shape {soft_prompt.shape}, expected "
                             f"{(cfg.num_soft_tokens, d)}")
        self.soft_prompt = nnx.Param(soft_prompt.astype(pdt), **axes_meta((None, "embed")))
        self.projector = HeatmapProjector(d, momentum=cfg.bn_momentum, eps=cfg.bn_eps, dtype=dt,
                                          param_dtype=pdt, max_readout=cfg.max_readout,
                                          peak_cells=mc.vision.grid ** 2 if cfg.peak_location
                                          else 0,
                                          hot_dim=len(self.ce_layers) * mc.vision.hidden_size
                                          if cfg.hot_patches else 0, rngs=rngs)

    @classmethod
    def create(cls, mllm: InternVL, cfg: EMITConfig = EMITConfig(), *, rngs: nnx.Rngs | None = None,
               hint_ids: Sequence[int] | None = None, tokenizer=None) -> "EMIT":
        """Add ``<COMP_CONTEXT>`` to ``mllm`` (unless ``cfg.comp_token_id`` is set) and
        initialise the soft prompt: the official 9 x 3584 value at hidden size 3584, else the
        embeddings of the hint text's ``hint_ids`` (:func:`soft_prompt_from_hint`), else a
        N(0, 0.02) draw with a warning. With a ``tokenizer`` the hint ids come from it and
        ``<COMP_CONTEXT>`` is registered in it too (ids checked to agree)."""
        rngs = rngs or nnx.Rngs(0)
        if tokenizer is not None and hint_ids is None:
            hint_ids = hint_token_ids(tokenizer)
        if cfg.comp_token_id is None:
            mllm, comp_id = add_comp_token(mllm)
            cfg = dataclasses.replace(cfg, comp_token_id=comp_id)
        if tokenizer is not None:
            add_comp_token_to_tokenizer(tokenizer, cfg.comp_token_id)
        d = mllm.config.text.hidden_size
        init = None
        if d == 3584 and cfg.num_soft_tokens == 9:
            init = official_soft_prompt()
        elif hint_ids is not None:
            # the hint's rows only, gathered on every process (nineteenth probe MP1: the whole
            # table read with np.asarray failed when it was sharded over several processes)
            idx = hint_rows(hint_ids, cfg.num_soft_tokens)
            rows = mllm.language_model.embed_tokens.embedding[...][jnp.asarray(idx)]
            if not rows.is_fully_addressable:
                from jax.experimental import multihost_utils

                rows = multihost_utils.process_allgather(rows, tiled=True)
            init = np.asarray(rows, np.float32)
        else:
            warnings.warn("EMIT.create: no hint_ids and hidden size != 3584; the soft prompt "
                          "starts from N(0, 0.02)")
        return cls(mllm, cfg, rngs=rngs, soft_prompt=init)

    # -------------------------------------------------------------- pieces
    @property
    def config(self):
        """The base model's config (what samplers and loaders read)."""
        return self.mllm.config

    @property
    def num_ce_tokens(self) -> int:
        g = self.mllm.config.vision.grid
        return (g // 2) * (g // 2)

    @property
    def num_comp_slots(self) -> int:
        c = self.emit_config
        return (c.num_soft_tokens if c.use_soft_prompt else 0) + \
            (self.num_ce_tokens if c.use_contrastive else 0)

    def heatmap(self, ce_pixels: jax.Array, with_hot: bool = False):
        """``[n, g, g]``; with ``with_hot`` (and ``emit.hot_patches``) ``(heat, hot)``."""
        return config_heatmap(self.mllm.vision_tower, ce_pixels, self.emit_config,
                              with_hot=with_hot)

    def ref_tokens(self, ce_pixels: jax.Array, num_ce: jax.Array | None = None) -> jax.Array:
        """``[n_ce, num_comp_slots, D]``: soft prompt rows first, then the CE tokens. ``num_ce``
        marks the real rows (the rest is padding, kept out of BatchNorm's statistics): a count
        (the first ``num_ce`` rows) or a bool mask ``[n_ce]``."""
        c = self.emit_config
        n = ce_pixels.shape[0]
        d = self.mllm.config.text.hidden_size
        valid = ce_valid(num_ce, n)
        parts = []
        if c.use_soft_prompt:
            parts.append(jnp.broadcast_to(self.soft_prompt[...], (n, c.num_soft_tokens, d)))
        if c.use_contrastive and c.hot_patches:
            heat, hot = self.heatmap(ce_pixels, with_hot=True)
            parts.append(self.projector(heat, valid, hot))
        elif c.use_contrastive:
            parts.append(self.projector(self.heatmap(ce_pixels), valid))
        if not parts:
            return jnp.zeros((n, 0, d), self.soft_prompt[...].dtype)
        dt = dtype_from_name(self.mllm.config.dtype)
        return jnp.concatenate([p.astype(dt) for p in parts], axis=1)

    def dummy_bn_update(self) -> None:
        """The official no-CE-batch side effect: a zero heat map through BatchNorm in train mode."""
        g = self.mllm.config.vision.grid
        self.projector.bn.update_stats(jnp.zeros((1, g, g), jnp.float32))

    def embed(self, input_ids, pixel_values=None, ce_pixels=None, num_ce=None, tile_valid=None):
        embeds = self.mllm.embed(input_ids, pixel_values, tile_valid=tile_valid)
        c = self.emit_config
        if ce_pixels is not None and self.num_comp_slots:
            tokens = self.ref_tokens(ce_pixels, num_ce)
            mask = num_ce if num_ce is not None and jnp.ndim(num_ce) == 1 else None
            embeds = merge_image_features(embeds, input_ids, tokens, c.comp_token_id, kind="comp",
                                          valid=mask)
        return embeds

    # -------------------------------------------------------------- forward
    def forward(self, input_ids, pixel_values=None, attention_mask=None, *, ce_pixels=None,
                num_ce=None, positions=None, cache=None, output_hidden_states=False,
                compute_logits=True, tile_valid=None) -> ModelOutput:
        embeds = self.embed(input_ids, pixel_values, ce_pixels, num_ce, tile_valid)
        c = self.emit_config
        if (ce_pixels is None and cache is None and c.bn_mode == "official" and c.use_contrastive
                and not self.projector.bn.use_running_average):
            self.dummy_bn_update()  # the reference code's dummy pass on batches with no CE sample
        return self.mllm.forward(inputs_embeds=embeds, attention_mask=attention_mask,
                                 positions=positions, cache=cache,
                                 output_hidden_states=output_hidden_states,
                                 compute_logits=compute_logits)

    def __call__(self, input_ids, pixel_values=None, attention_mask=None, ce_pixels=None):
        return self.forward(input_ids, pixel_values, attention_mask, ce_pixels=ce_pixels).logits

    def logits_from_hidden(self, hidden):
        return self.mllm.logits_from_hidden(hidden)

    def init_cache(self, batch: int, max_len: int, dtype=None):
        return self.mllm.init_cache(batch, max_len, dtype)
