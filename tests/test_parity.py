"""Logits of the NNX InternVL equal transformers' InternVLForConditionalGeneration (fp32, CPU)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import hf_config, hf_positions, make_hf_model, token_batch
from emit_jax import hf

TOL = 1e-4

CASES = {
    # name: (config kwargs, image sizes to feed)
    "gqa1-untied-internvit300m": (dict(heads=4, kv_heads=4, tied=False, vit="layer_norm"), (56, 84)),
    "gqa2-tied-internvit6b": (dict(heads=4, kv_heads=2, tied=True, vit="rms_norm"), (56, 84)),
    "gqa4-untied-finalnorm": (dict(heads=8, kv_heads=2, tied=False, vit="layer_norm",
                                   mean_pool=False), (56,)),
    "gqa4-tied-internvit6b-84px": (dict(heads=8, kv_heads=2, tied=True, vit="rms_norm",
                                        image_size=84), (84, 56)),
}


def _compare(hf_model, jm, ids, mask, pix=None):
    with torch.no_grad():
        ref = hf_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                       position_ids=torch.tensor(hf_positions(mask)),
                       pixel_values=None if pix is None else torch.tensor(pix)).logits.numpy()
    out = np.asarray(jm(jnp.asarray(ids), None if pix is None else jnp.asarray(pix),
                        jnp.asarray(mask)))
    assert out.shape == ref.shape
    real = mask.astype(bool)
    err = np.abs(out - ref)[real].max()
    scale = np.abs(ref[real]).max()
    assert scale > 1.0, "logits too small for a meaningful comparison"
    assert err < TOL, f"max abs diff {err:.2e} (logit scale {scale:.1f})"


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_match_transformers(name, save_hf):
    kwargs, sizes = CASES[name]
    cfg = hf_config(**kwargs)
    model = make_hf_model(cfg, seed=len(name))
    jm = hf.load(save_hf(model))
    assert jm.config.tie_word_embeddings == kwargs["tied"]

    # text only, batch 2 with left padding in row 1
    ids, mask = token_batch(cfg.text_config.vocab_size, cfg.image_token_id, (0, 0), pad=(0, 6))
    _compare(model, jm, ids, mask)

    # image + text: row 0 holds two images, row 1 one image (3 tiles in flattened order)
    for size in sizes:
        per_image = (size // 14 // 2) ** 2
        ids, mask = token_batch(cfg.text_config.vocab_size, cfg.image_token_id,
                                (2 * per_image, per_image), length=2 * per_image + 12, pad=(0, 4),
                                seed=size)
        pix = np.random.RandomState(size).randn(3, 3, size, size).astype(np.float32)
        _compare(model, jm, ids, mask, pix)


def test_vision_hidden_states_match(save_hf):
    """Every ViT hidden state (embeddings + each block) equals transformers' (EMIT reads 4/8/16/20)."""
    cfg = hf_config(vision_layers=3)
    model = make_hf_model(cfg, seed=3)
    jm = hf.load(save_hf(model))
    pix = np.random.RandomState(0).randn(2, 3, 56, 56).astype(np.float32)
    with torch.no_grad():
        ref = model.model.vision_tower(pixel_values=torch.tensor(pix), output_hidden_states=True)
    last, hidden = jm.vision_tower(jnp.asarray(pix), output_hidden_states=True)
    assert len(hidden) == len(ref.hidden_states) == 4
    for a, b in zip(hidden, ref.hidden_states):
        np.testing.assert_allclose(np.asarray(a), b.numpy(), atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(last), ref.last_hidden_state.numpy(), atol=TOL, rtol=0)


def test_image_token_count_mismatch_is_an_error(save_hf):
    cfg = hf_config()
    jm = hf.load(save_hf(make_hf_model(cfg)))
    ids, mask = token_batch(cfg.text_config.vocab_size, cfg.image_token_id, (3, 0))
    pix = np.zeros((1, 3, 56, 56), np.float32)  # 4 visual tokens, 3 image tokens
    with pytest.raises(ValueError, match="image tokens do not match"):
        jm(jnp.asarray(ids), jnp.asarray(pix), jnp.asarray(mask))


def test_dynamic_rope_config_below_its_limit(save_hf):
    """InternVL3-1B's config carries rope_scaling {dynamic, factor 2}: identical to default RoPE
    below max_position_embeddings, which is where this port runs it."""
    cfg = hf_config(rope_parameters={"rope_type": "dynamic", "factor": 2.0})
    model = make_hf_model(cfg, seed=9)
    folder = save_hf(model)
    jm = hf.load(folder)
    assert jm.config.text.rope_type == "dynamic" and jm.config.text.rope_factor == 2.0
    ids, mask = token_batch(cfg.text_config.vocab_size, cfg.image_token_id, (0, 0), length=40,
                            pad=(0, 3))
    _compare(model, jm, ids, mask)
    out = hf.save(jm, folder + "-out")
    import json, os
    with open(os.path.join(out, "config.json")) as f:
        rope = json.load(f)["text_config"]["rope_parameters"]
    assert rope["rope_type"] == "dynamic" and rope["factor"] == 2.0
