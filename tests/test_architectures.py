"""Named architectures: parameter counts equal transformers' for the same config (meta device,
no weights); every parameter carries logical axis names; configs round-trip through config.json."""

import functools

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from emit_jax.models import architectures
from emit_jax.models.config import ConfigError, InternVLConfig
from emit_jax.models.internvl import InternVL
from emit_jax.models.layers import count_params

KNOWN_AXES = {"embed", "mlp", "heads", "kv_heads", "vocab", "norm", "vit_embed", "vit_mlp",
              "vit_heads", "vit_pos", "mm_in", "mm_hidden", "conv_h", "conv_w", "conv_in", None}


@functools.lru_cache(maxsize=None)
def abstract(cfg):
    """The model's shapes (no arrays); one trace per config for the whole file (read only)."""
    return nnx.eval_shape(lambda: InternVL(cfg, rngs=nnx.Rngs(0)))


def hf_meta_count(cfg: InternVLConfig) -> int:
    hf_cfg = transformers.InternVLConfig.from_dict(cfg.to_hf_dict())
    with torch.device("meta"):
        model = transformers.InternVLForConditionalGeneration(hf_cfg)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(architectures.ARCHITECTURES))
def test_param_count_matches_transformers(name):
    cfg = architectures.get_config(name)
    ours = count_params(abstract(cfg))
    assert ours == hf_meta_count(cfg)


def test_internvl3_sizes_are_the_public_ones():
    # InternViT-300M (304.0M) + mlp1 + Qwen2.5 with an untied head; bf16 bytes of these counts
    # match the published checkpoint sizes (1.88 GB, 4.18 GB, 15.89 GB).
    counts = {n: count_params(abstract(architectures.get_config(n)))
              for n in ("internvl3_1b", "internvl3_2b", "internvl3_8b")}
    assert abs(counts["internvl3_1b"] / 1e9 - 0.938) < 0.005
    assert abs(counts["internvl3_2b"] / 1e9 - 2.089) < 0.005
    assert abs(counts["internvl3_8b"] / 1e9 - 7.944) < 0.005
    vit = count_params(nnx.state(abstract(architectures.get_config("internvl3_8b")).vision_tower))
    assert abs(vit / 1e6 - 304.0) < 0.5


@pytest.mark.parametrize("name", ["tiny", "internvl3_8b"])
def test_every_parameter_has_logical_axes(name):
    state = nnx.state(abstract(architectures.get_config(name)), nnx.Param)
    for path, var in nnx.to_flat_state(state):
        axes = var.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == len(var.shape), path
        assert set(axes) <= KNOWN_AXES, (path, axes)
    specs = nnx.get_partition_spec(state)
    emb = specs["language_model"]["embed_tokens"]["embedding"].get_value()
    assert tuple(emb) == ("vocab", "embed")


def test_hf_config_round_trip():
    for name in architectures.ARCHITECTURES:
        cfg = architectures.get_config(name)
        d = cfg.to_hf_dict()
        assert InternVLConfig.from_hf_dict(d) == cfg
        # and transformers reads the same numbers back
        hf_cfg = transformers.InternVLConfig.from_dict(d)
        assert hf_cfg.text_config.num_key_value_heads == cfg.text.num_key_value_heads
        assert InternVLConfig.from_hf_dict(hf_cfg.to_dict()) == cfg


def test_config_errors_name_the_problem():
    with pytest.raises(ConfigError, match="model_type is 'internvl_chat'.*python -m emit_jax.convert"):
        InternVLConfig.from_hf_dict({"model_type": "internvl_chat"})
    d = architectures.tiny().to_hf_dict()
    d["text_config"]["num_key_value_heads"] = 3
    with pytest.raises(ConfigError, match="multiple of num_key_value_heads 3"):
        InternVLConfig.from_hf_dict(d)
    d = architectures.tiny().to_hf_dict()
    d["text_config"]["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}
    with pytest.raises(ConfigError, match="yarn"):
        InternVLConfig.from_hf_dict(d)


def test_bf16_params_with_f32_compute():
    cfg = architectures.tiny().replace(param_dtype="bfloat16", dtype="float32")
    cfg = cfg.replace(vision=cfg.vision.__class__(**{**cfg.vision.__dict__, "image_size": 56}))
    model = InternVL(cfg, rngs=nnx.Rngs(0))
    assert model.language_model.layers[0].mlp.up_proj.kernel[...].dtype == jax.numpy.bfloat16
    ids = np.full((1, 8), 5)
    ids[0, 1:5] = cfg.image_token_id
    logits = model(ids, np.zeros((1, 3, 56, 56), np.float32))
    assert logits.dtype == np.float32 and logits.shape == (1, 8, cfg.text.vocab_size)
    assert np.isfinite(np.asarray(logits)).all()
