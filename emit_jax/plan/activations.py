"""Activation, logit, KV-cache and prefill bytes of a stage's step, from the formulas of
docs/MEMORY_PLAN.md ("Activation formulas"), per device (the mesh's split of each dimension) or
for the whole job."""

from __future__ import annotations

import dataclasses

from emit_jax.plan.mesh import shards
from emit_jax.plan.stage import Setup, _ceil_div, _tiles


@dataclasses.dataclass(frozen=True)
class _Split:
    """Per-device divisors of the activation dimensions (1 everywhere = the whole job)."""
    b: int = 1  # sequences
    tiles: int = 1
    ce: int = 1
    t_h: int = 1
    t_kv: int = 1
    t_f: int = 1
    t_v: int = 1
    t_vh: int = 1
    t_vf: int = 1


def _split(mcfg, mesh, batch: int, tiles: int, ce: int) -> _Split:
    t, v = mcfg.text, mcfg.vision

    def one(name, n):
        return shards((name,), (n,), mesh) if n else 1

    return _Split(b=one("batch", batch), tiles=one("batch", tiles), ce=one("batch", ce),
                  t_h=one("heads", t.num_attention_heads), t_kv=one("kv_heads", t.num_key_value_heads),
                  t_f=one("mlp", t.intermediate_size), t_v=one("vocab", t.vocab_size),
                  t_vh=one("vit_heads", v.num_attention_heads), t_vf=one("vit_mlp", v.intermediate_size))


def activation_terms(mcfg, s: Setup, sp: _Split, *, vit_trained: bool, mm_trained: bool,
                     emit: bool) -> dict[str, float]:
    """The formulas of docs/MEMORY_PLAN.md, in bytes, for one device's share ``sp``."""
    t, v = mcfg.text, mcfg.vision
    import jax.numpy as jnp

    from emit_jax.models.config import dtype_from_name

    c = jnp.dtype(dtype_from_name(mcfg.dtype)).itemsize
    D, F, H, KVH, Dh, L, V = (t.hidden_size, t.intermediate_size, t.num_attention_heads,
                              t.num_key_value_heads, t.head_size, t.num_hidden_layers, t.vocab_size)
    Dv, Fv, Hv, Lv = v.hidden_size, v.intermediate_size, v.num_attention_heads, v.num_hidden_layers
    p = v.grid * v.grid + 1  # ViT tokens per tile (CLS + patches)
    k_img = mcfg.tokens_per_tile
    P, N = s.prompt_len, s.new_tokens
    T = P + N
    b = _ceil_div(s.batch, sp.b)
    tiles, ce = _tiles(mcfg, s), (s.batch if emit and s.use_contrastive else 0)
    tiles_d, ce_d = _ceil_div(tiles, sp.tiles), _ceil_div(ce, sp.ce)
    ce_tiles_d = ce_d * (1 + s.rotations)

    # one decoder layer's residuals for the backward pass, per token (the constants are what
    # jax's saved_residuals lists for Qwen2DecoderLayer / VisionLayer; docs/MEMORY_PLAN.md):
    # r_lin without the attention scores, r_att the scores' share
    llm_lin = (2 * (4 + 2 * c) * D + c * (2 * H * Dh / sp.t_h + 2 * KVH * Dh / sp.t_kv + 4 * Dh)
               + 6 * c * F / sp.t_f + 16 + 8 * H / sp.t_h)
    C = int(s.attention_chunk)
    chunked = 0 < C < T
    T_c = _ceil_div(T, C) * C if chunked else T  # queries padded to a multiple of the chunk
    if chunked:
        # the checkpointed chunk map saves only its inputs: the padded queries (in place of q,
        # which r_lin counts) and the padded mask chunks (one array for all layers: XLA's CSE)
        llm_att = c * H / sp.t_h * Dh * (T_c - T) / T
        att_ws = b * H / sp.t_h * C * T * (12 + 2 * c)  # one chunk's scores, recomputed + grads
        mask = b * (T + T_c) * T
    else:
        llm_att = (9 + c) * H / sp.t_h * T  # mask 1 + masked scores 4 + exp 4 + probs c
        att_ws = b * T * 4 * H / sp.t_h * T  # float32 gradient of the scores
        mask = b * T * T
    layer = b * T * (llm_lin + llm_att)  # one layer's residuals
    final = b * T * D * (4 + 2 * c)  # the final norm's
    if s.remat:  # layer inputs + the shared mask / rotary tables; one layer recomputed at a time
        llm_saved = L * b * T * D * c + b * T * 8 * Dh + mask + final
        # + a second layer's non-attention residuals: what XLA's memory-minimising schedule
        # shows (as if the next layer's recomputation overlapped this one's backward)
        llm_ws = layer + b * T * (2 * llm_lin + 4 * D) + att_ws
    else:
        llm_saved = L * layer + mask + final
        llm_ws = b * T * (llm_lin + 4 * D) + att_ws
    # one ViT block's residuals, per token (only with trainable ViT weights)
    vit_tok = (2 * (12 + c) * Dv + c * (4 * Dv / sp.t_vh + 2 * Dv) + 4 * c * Fv / sp.t_vf
               + (4 + c) * Hv / sp.t_vh * p)
    # forward-only working sets of one layer, per token (attention matrix: f32 scores, f32
    # softmax, compute-dtype probabilities)
    vit_fwd_tok = Hv / sp.t_vh * p * (8 + c) + c * (4 * Dv / sp.t_vh + 2 * Fv / sp.t_vf + 2 * Dv) + 4 * Dv
    ce_keep = 2 * s.ce_layers * ce_tiles_d * p * Dv * c  # the read-out layers and their stack
    Kv = int(s.vit_chunk)
    # memory.vit_chunk: one chunk of K tiles (spread over the tile shards) at a time
    run_d = min(tiles_d, _ceil_div(Kv, sp.tiles)) if Kv else tiles_d
    run_ce = min(ce_tiles_d, _ceil_div(Kv, sp.ce)) if Kv else ce_tiles_d
    vit_fwd = max(run_d * p * vit_fwd_tok + (tiles_d * p * Dv * c if Kv else 0),
                  run_ce * p * vit_fwd_tok + ce_keep)

    out: dict[str, float] = {"b": b, "tiles_per_device": tiles_d, "ce_tiles_per_device": ce_tiles_d}
    vit_layer = run_d * p * vit_tok if vit_trained else 0.0
    if not vit_trained:
        vit_saved = vit_bwd = 0.0
    elif Kv:  # checkpointed chunks: the outputs of all tiles; one chunk recomputed at a time
        vit_saved = tiles_d * p * Dv * c
        vit_bwd = vit_saved + (Lv * run_d * p * Dv * c if s.remat else Lv * vit_layer) \
            + 2 * vit_layer
    else:
        vit_saved = Lv * tiles_d * p * Dv * c if s.remat else Lv * vit_layer
        vit_bwd = vit_saved + 2 * vit_layer if s.remat else 0.0  # one block recomputed + grads
    mm_saved = tiles_d * k_img * ((12 + c) * 4 * Dv + 5 * c * D) if (mm_trained or vit_trained) else 0.0
    # the attention scores' share of the train peak (saved per layer, or one layer / one chunk)
    out["attention_saved"] = att_ws + mask + (0 if chunked else (1 if s.remat else L) * b * T * llm_att)
    out["vit_saved"], out["mm_saved"], out["llm_saved"], out["llm_workspace"] = (
        vit_saved, mm_saved, llm_saved, llm_ws)
    out["vit_forward"] = vit_saved + vit_fwd
    out["activations"] = max(out["vit_forward"], vit_saved + mm_saved + llm_saved + llm_ws, vit_bwd)
    K = N if s.stage == "grpo" else min(s.label_tokens, P)
    out["logits"] = b * K * V / sp.t_v * (3 * 4 + c)
    if s.stage == "grpo":
        S = P + N
        out["kv_cache"] = 2 * L * b * S * KVH / sp.t_kv * Dh * c
        llm_fwd_tok = (c * (3 * F / sp.t_f + 2 * H * Dh / sp.t_h + 2 * KVH * Dh / sp.t_kv)
                       + D * (4 + 4 * c))
        if 0 < C < P:  # one chunk of scores at a time + the padded mask chunks
            P_c = _ceil_div(P, C) * C
            att = b * C * H / sp.t_h * S * (8 + c) + b * P_c * S + c * b * (P_c - P) * H / sp.t_h * Dh
        else:
            att = b * P * H / sp.t_h * S * (8 + c)
        prefill_llm = b * P * llm_fwd_tok + att + b * P * S + 2 * b * V / sp.t_v * 4
        out["prefill_attention"] = att
        out["prefill"] = max(prefill_llm, vit_fwd + tiles_d * k_img * D * c)
    return out
