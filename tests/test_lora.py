"""LoRA through qwix: the reference is the base model with the adapters off (shared weights, no
copy), training touches only LoRA factors and the fully trained modules, and the merged model
computes what the policy computes."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import optax
import pytest
import qwix
from flax import nnx

from emit_jax.models import architectures
from emit_jax.models.emit import EMIT
from emit_jax.models.internvl import InternVL
from emit_jax.training.lora import LORA_METHODS, lora_provider, merge_lora, trainable_filter
from emit_jax.training.config import LoRAConfig

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
    lcfg = LoRAConfig(rank=4, alpha=16.0, dropout=0.0, targets=TARGETS, weight_qtype=qtype)
    policy = qwix.apply_lora_to_model(ref, lora_provider(lcfg), ids, pix, mask, rngs=nnx.Rngs(1),
                                      methods=LORA_METHODS,
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


def test_the_training_paths_run_through_the_adapters():
    """GRPO's loss, the reference log-probs and the sampler call ``model.forward``: the adapters
    must act there (qwix intercepts one method; with its default, ``__call__``, every training
    path ran without them and the LoRA factors got no gradient)."""
    from emit_jax.ops.sampling import generate
    from emit_jax.rl.grpo import token_logprobs
    from emit_jax.training.grpo import completion_logits
    from emit_jax.training.lora import apply_lora

    ref = small_emit()
    ids, pix, mask, ce = inputs(ref)
    lcfg = LoRAConfig(rank=4, alpha=16.0, dropout=0.0, targets=TARGETS)
    policy = apply_lora(ref, {"input_ids": ids, "pixel_values": pix, "attention_mask": mask,
                              "ce_pixels": ce, "num_ce": 1}, lcfg, seed=1)
    b = {"input_ids": ids, "pixel_values": pix, "attention_mask": mask, "ce_pixels": ce,
         "num_ce": jnp.int32(1)}
    comp = jnp.full((1, 4), 7, jnp.int32)

    def loss(m):
        return -jnp.sum(token_logprobs(completion_logits(m, b, comp, jnp.ones_like(comp)), comp))

    grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(policy)
    g_b = [np.abs(np.asarray(v.get_value())).max() for p, v in nnx.to_flat_state(grads)
           if p[-1].endswith("_lora_b")]
    assert len(g_b) > 0 and min(g_b) > 0  # every B factor (zero at init) gets a gradient
    state = nnx.state(policy, nnx.LoRAParam)
    for p, v in nnx.to_flat_state(state):
        if p[-1].endswith("_lora_b"):
            v.set_value(jnp.full(v.get_value().shape, 0.1, v.get_value().dtype))
    nnx.update(policy, state)
    h_ref = ref.forward(ids, pix, mask, ce_pixels=ce).logits
    h_pol = policy.forward(ids, pix, mask, ce_pixels=ce).logits
    assert np.abs(np.asarray(h_pol) - np.asarray(h_ref)).max() > 1e-2
    kw = dict(ce_pixels=ce, max_new_tokens=3, temperature=0.0)
    np.testing.assert_array_equal(np.asarray(generate(policy, ids, mask, pix, **kw).tokens[:, 0]),
                                  np.asarray(jnp.argmax(h_pol[:, -1], -1)))


def test_the_vit_gets_its_adapters_under_vit_chunk():
    """Sixteenth probe TB3: with ``memory.vit_chunk`` smaller than the tiles the ViT sees at once,
    the trace that creates the factors ran the ViT in ``lax.map`` over a merged copy: qwix made
    the ViT's factors on the copy, or found no rngs there (a traceback at GRPO's first step;
    ``aot`` compiled without them and said the recipe fits; configs/internvl3_8b_grpo.py sets
    ``vit_chunk=64`` with the ViT's linears targeted)."""
    from emit_jax.models.memory import memory_options
    from emit_jax.training.lora import apply_lora

    model = small_emit()
    ids = np.full((1, 30), 5, np.int32)
    ids[0, 2:10] = 63  # two tiles' image tokens: the ViT's main path sees 2 tiles, above 1
    ids[0, 12:12 + model.num_comp_slots] = model.emit_config.comp_token_id
    rs = np.random.RandomState(0)
    ids, pix = jnp.asarray(ids), jnp.asarray(rs.randn(2, 3, 56, 56), jnp.float32)
    mask, ce = jnp.ones((1, 30), jnp.int32), jnp.asarray(rs.randn(1, 2, 3, 56, 56), jnp.float32)
    sample = {"input_ids": ids, "pixel_values": pix, "attention_mask": mask, "ce_pixels": ce,
              "num_ce": 1}
    lcfg = LoRAConfig(rank=4, alpha=16.0, dropout=0.0, targets=TARGETS)

    def factors(vit_chunk):
        with memory_options(vit_chunk=vit_chunk):
            policy = apply_lora(small_emit(), sample, lcfg, seed=1)
            paths = sorted("/".join(map(str, p)) for p, _ in
                           nnx.to_flat_state(nnx.state(policy, nnx.LoRAParam)))
            b = {**sample, "num_ce": jnp.int32(1)}
            out = policy(b["input_ids"], b["pixel_values"], b["attention_mask"], b["ce_pixels"])
        return paths, np.asarray(out)

    whole, out_whole = factors(0)
    chunked, out_chunked = factors(1)
    assert any("vision" in p for p in whole)
    assert chunked == whole
    np.testing.assert_allclose(out_chunked, out_whole, atol=1e-5)
