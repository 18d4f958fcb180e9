"""Named InternVL architectures.

``internvl3_*`` follow the public -hf checkpoints (InternVL3 = InternViT-300M-448px-V2.5 + a
Qwen2.5 LLM, untied lm_head, vocabulary 151,674 with ``<IMG_CONTEXT>`` = 151667, bf16 weights):

=============  =====================  ======================================================
name           LLM                    LLM dims (hidden / FFN / layers / heads / KV heads)
=============  =====================  ======================================================
internvl3_1b   Qwen2.5-0.5B           896 / 4864 / 24 / 14 / 2
internvl3_2b   Qwen2.5-1.5B           1536 / 8960 / 28 / 12 / 2
internvl3_8b   Qwen2.5-7B             3584 / 18944 / 28 / 28 / 4   (EMIT's base model)
=============  =====================  ======================================================

The 1B config.json carries ``rope_scaling = {dynamic, factor 2}`` with 32768 positions; the same
is assumed for 2B/8B (it changes nothing below 32768 tokens). Real runs read the checkpoint's own
config.json (``emit_jax.hf.load``); these presets serve random init, planning and tests.

``tiny`` is the CPU default: the same structure at toy width (224 px tiles -> 16x16 patches ->
64 visual tokens per tile; 6 ViT blocks; a 4-layer GQA decoder; tied embeddings), keeping the
InternVL3 vocabulary so token ids mean the same thing.
"""

from __future__ import annotations

from emit_jax.models.config import InternVLConfig, TextConfig, VisionConfig

INTERNVIT_300M = VisionConfig(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
    image_size=448, patch_size=14, norm_type="layer_norm", use_qk_norm=False, attention_bias=True,
    layer_norm_eps=1e-6, layer_scale_init_value=0.1, use_mean_pooling=True)

_QWEN_COMMON = dict(vocab_size=151674, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
                    max_position_embeddings=32768, rope_type="dynamic", rope_factor=2.0)


def _internvl3(text: TextConfig, dtype: str) -> InternVLConfig:
    return InternVLConfig(vision=INTERNVIT_300M, text=text, image_token_id=151667,
                          downsample_ratio=0.5, tie_word_embeddings=False,
                          param_dtype=dtype, dtype=dtype)


def internvl3_1b(dtype: str = "bfloat16") -> InternVLConfig:
    return _internvl3(TextConfig(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                 num_attention_heads=14, num_key_value_heads=2, **_QWEN_COMMON),
                      dtype)


def internvl3_2b(dtype: str = "bfloat16") -> InternVLConfig:
    return _internvl3(TextConfig(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                 num_attention_heads=12, num_key_value_heads=2, **_QWEN_COMMON),
                      dtype)


def internvl3_8b(dtype: str = "bfloat16") -> InternVLConfig:
    return _internvl3(TextConfig(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                 num_attention_heads=28, num_key_value_heads=4, **_QWEN_COMMON),
                      dtype)


def tiny(dtype: str = "float32") -> InternVLConfig:
    vision = VisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=6,
                          num_attention_heads=4, image_size=224, patch_size=14,
                          norm_type="layer_norm", attention_bias=True)
    text = TextConfig(vocab_size=151674, hidden_size=128, intermediate_size=384,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      rope_theta=1_000_000.0, max_position_embeddings=8192)
    return InternVLConfig(vision=vision, text=text, image_token_id=151667,
                          tie_word_embeddings=True, param_dtype=dtype, dtype=dtype)


def small(dtype: str = "float32") -> InternVLConfig:
    """The peers' benchmark model (../shared/bench): a Qwen2 decoder of hidden 512, 8 layers, 8
    heads / 2 KV heads (head dim 64), MLP 1376, vocabulary 32,000, tied embeddings, q/k/v bias,
    float32 — 38.5M parameters — behind ``tiny``'s vision tower (unused by text-only work).
    Token 31997 is the image token (the peers use 31998 / 31999 as pad / EOS)."""
    text = TextConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376,
                      num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                      rope_theta=1_000_000.0, max_position_embeddings=8192)
    return InternVLConfig(vision=tiny().vision, text=text, image_token_id=31997,
                          tie_word_embeddings=True, param_dtype=dtype, dtype=dtype)


ARCHITECTURES = {
    "tiny": tiny,
    "small": small,
    "internvl3_1b": internvl3_1b,
    "internvl3_2b": internvl3_2b,
    "internvl3_8b": internvl3_8b,
}


def get_config(name: str, **kw) -> InternVLConfig:
    """``get_config('internvl3_8b', dtype='bfloat16')``."""
    if name not in ARCHITECTURES:
        raise KeyError(f"unknown architecture {name!r}; known: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[name](**kw).validate()


def _main() -> None:
    """``python -m emit_jax.models.architectures``: parameter counts (no weights allocated)."""
    from flax import nnx

    from emit_jax.models.internvl import InternVL
    from emit_jax.models.layers import count_params

    print("| name | vision | LLM | parameters |")
    for name in ARCHITECTURES:
        cfg = get_config(name)
        model = nnx.eval_shape(lambda: InternVL(cfg, rngs=nnx.Rngs(0)))
        total = count_params(model)
        vision = count_params(nnx.state(model.vision_tower, nnx.Param))
        print(f"| {name} | {vision:,} | {total - vision:,} | {total:,} |")


if __name__ == "__main__":
    _main()
