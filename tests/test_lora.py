"""LoRA through qwix: the reference is the base model with the adapters off (shared weights, no
copy), training touches only LoRA factors and the fully trained modules, and the merged model
computes what the policy computes."""

import dataclasses

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import qwix
from flax import nnx

from emit_jax.models import architectures
from emit_jax.models.emit import EMIT
from emit_jax.models.internvl import InternVL
from emit_jax.training.grpo import lora_provider, merge_lora, trainable_filter

TARGETS = (r".*(self_attn/(q_proj|k_proj|v_proj|o_proj)|mlp/(gate_proj|up_proj|down_proj)"
           r"|attention/(q_proj|k_proj|v_proj|projection_layer)|mlp/(fc1|fc2))")


def small_emit():
    cfg = architectures.tiny()
    cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, image_size=56, num_hidden_layers=2),
                      text=dataclasses.replace(cfg.text, vocab_size=64, num_hidden_layers=2),
                      image_token_id=63)
    return EMIT.create(InternVL(cfg, rngs=nnx.Rngs(0)), hint_ids=[1, 2])


def inputs(model):
    ids = np.full((1, 30), 5, np.int32)
    ids[0, 2:6] = 63
    ids[0, 8:8 + model.num_comp_slots] = model.emit_config.comp_token_id
    rs = np.random.RandomState(0)
    return (jnp.asarray(ids), jnp.asarray(rs.randn(1, 3, 56, 56), jnp.float32),
            jnp.ones((1, 30), jnp.int32), jnp.asarray(rs.randn(1, 2, 3, 56, 56), jnp.float32))


@pytest.mark.parametrize("qtype", ["", "nf4"])
def test_reference_merge_and_trainable_set(qtype):
    ref = small_emit()
    ref.eval()
    ids, pix, mask, ce = inputs(ref)
    lcfg = ml_collections.ConfigDict(dict(rank=4, alpha=16.0, dropout=0.0, targets=TARGETS,
                                          weight_qtype=qtype))
    policy = qwix.apply_lora_to_model(ref, lora_provider(lcfg), ids, pix, mask, rngs=nnx.Rngs(1),
                                      ce_pixels=ce)
    policy._emit_lora_scale = 16.0 / 4
    policy.eval()
    lora = nnx.to_flat_state(nnx.state(policy, nnx.LoRAParam))
    paths = {"/".join(map(str, p[:-1])) for p, _ in lora}
    assert any("mllm/language_model/layers/0/self_attn/q_proj" == p for p in paths)
    assert any("mllm/vision_tower/layers/1/mlp/fc2" == p for p in paths)
    assert not any("multi_modal_projector" in p or "lm_head" in p for p in paths)
    before = np.asarray(ref(ids, pix, mask, ce))
    # one optimizer step on the trainable set
    wrt = trainable_filter()
    opt = nnx.Optimizer(policy, optax.sgd(0.5), wrt=wrt)

    def loss(m):
        return jnp.mean(m(ids, pix, mask, ce) ** 2)

    grads = nnx.grad(loss, argnums=nnx.DiffState(0, wrt))(policy)
    names = {p[0] if p[0] != "mllm" else p[1] for p, _ in nnx.to_flat_state(nnx.state(grads))}
    assert names == {"soft_prompt", "projector", "multi_modal_projector", "language_model",
                     "vision_tower"}
    opt.update(policy, grads)
    # the reference (adapters off, original modules) is untouched
    np.testing.assert_array_equal(np.asarray(ref(ids, pix, mask, ce)), before)
    after = np.asarray(policy(ids, pix, mask, ce))
    assert np.abs(after - before).max() > 1e-3
    merged = merge_lora(policy, ref)
    merged.eval()
    tol = 1e-4 if not qtype else 0.5  # nf4: the policy computes with a quantized base
    np.testing.assert_allclose(np.asarray(merged(ids, pix, mask, ce)), after, atol=tol)
    if not qtype:
        assert merged.mllm.language_model.layers[0].self_attn.q_proj.kernel[...].shape == \
            ref.mllm.language_model.layers[0].self_attn.q_proj.kernel[...].shape
