"""Stacked layers under ``lax.scan`` (``InternVLConfig.scan_layers``, ``emit_jax.models.scan``):
the same values and gradients as the unrolled layers with the same weights (left padding, images,
the KV cache, the sampler, the ViT's hidden states and early stop, the remat policies, EMIT, LoRA)
and the same files (Hugging Face safetensors, model and training checkpoints) either way."""

import dataclasses
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from emit_jax import checkpoint, hf
from emit_jax.errors import ConfigError
from emit_jax.models import architectures
from emit_jax.models.emit import EMIT
from emit_jax.models.internvl import InternVL
from emit_jax.models.memory import REMAT_POLICIES, memory_options
from emit_jax.models.scan import stack_layers, unstack_layers
from emit_jax.training.config import LoRAConfig

IMG = 500
TARGETS = (r".*(self_attn/(q_proj|k_proj|v_proj|o_proj)|mlp/(gate_proj|up_proj|down_proj)"
           r"|attention/(q_proj|k_proj|v_proj|projection_layer)|mlp/(fc1|fc2))")


def config(scan=False):
    """tiny at 56 px (4 visual tokens a tile), 3 ViT blocks, 3 decoder layers, vocabulary 512."""
    cfg = architectures.tiny()
    return cfg.replace(vision=dataclasses.replace(cfg.vision, image_size=56, num_hidden_layers=3),
                       text=dataclasses.replace(cfg.text, vocab_size=512, num_hidden_layers=3),
                       image_token_id=IMG, scan_layers=scan)


def with_weights(model, source):
    """``model`` (stacked or unrolled layers) holding ``source``'s values; returns ``model``."""
    state = nnx.state(model)
    pure = unstack_layers(nnx.to_pure_dict(nnx.state(source)))
    nnx.replace_by_pure_dict(state, stack_layers(pure, nnx.to_pure_dict(state)))
    nnx.update(model, state)
    return model


@pytest.fixture(scope="module")
def pair():
    u = InternVL(config(), rngs=nnx.Rngs(0))
    return u, with_weights(InternVL(config(scan=True), rngs=nnx.Rngs(1)), u)


def inputs():
    """Two left-padded rows (5 and 0 padding slots) with one 4-token image each."""
    ids = np.random.RandomState(0).randint(0, IMG - 1, (2, 20)).astype(np.int32)
    mask = np.ones((2, 20), np.int32)
    mask[0, :5], ids[0, :5] = 0, 0
    ids[0, 7:11] = IMG
    ids[1, 2:6] = IMG
    px = np.random.RandomState(1).randn(2, 3, 56, 56).astype(np.float32)
    return jnp.asarray(ids), jnp.asarray(px), jnp.asarray(mask)


def assert_trees_close(a, b, atol=1e-5, rtol=1e-4):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=rtol)


def loss(m, ids, px, mask):
    return jnp.mean(m(ids, px, mask) * jax.random.normal(jax.random.key(0), (2, 20, 512)))


def grads(model, loss, wrt=nnx.Param):
    """The gradient of ``loss(model, *inputs())`` (jitted), in the unrolled layout."""
    g = nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, wrt)))(model, *inputs())
    return unstack_layers(nnx.to_pure_dict(g))


@pytest.fixture(scope="module")
def unrolled_grads(pair):
    return grads(pair[0], loss)


def test_stacked_parameters_and_their_sharding(pair):
    from jax.sharding import AbstractMesh, PartitionSpec as P

    from emit_jax.parallel import logical_to_spec

    _, s = pair
    kernel = s.language_model.layers.self_attn.q_proj.kernel
    assert kernel.shape == (3, 128, 128)
    assert kernel.get_metadata()["out_sharding"] == ("layers", "embed", "heads")
    assert s.vision_tower.layers.lambda_1.get_metadata()["out_sharding"] == ("layers", "norm")
    mesh = AbstractMesh((1, 2, 2), ("data", "fsdp", "tensor"))
    assert logical_to_spec(("layers", "embed", "heads"), kernel.shape, mesh) == \
        P(None, "fsdp", "tensor")


def test_logits_and_gradients_equal_the_unrolled_model(pair, unrolled_grads):
    u, s = pair
    ids, px, mask = inputs()
    outs = [m.forward(ids, px, mask, output_hidden_states=True) for m in (u, s)]
    np.testing.assert_allclose(np.asarray(outs[1].logits), np.asarray(outs[0].logits), atol=1e-5)
    assert len(outs[1].hidden_states) == 4
    assert_trees_close(outs[1].hidden_states, outs[0].hidden_states)
    assert_trees_close(grads(s, loss), unrolled_grads)


@pytest.mark.parametrize("policy", REMAT_POLICIES)
def test_remat_policies_keep_values_and_gradients(pair, unrolled_grads, policy):
    u, s = pair
    with memory_options(remat=True, remat_policy=policy):
        assert_trees_close(grads(u, loss), unrolled_grads)
        assert_trees_close(grads(s, loss), unrolled_grads)


def test_remat_policies_save_what_they_name(pair, capsys):
    """More is kept from full to save_qkv_proj to save_dot_except_mlp to minimal."""
    import re

    from jax.ad_checkpoint import print_saved_residuals

    _, s = pair
    ids, _, mask = inputs()
    graphdef, state = nnx.split(s.language_model)  # (the image merge needs concrete ids)
    x = s.language_model.embed_tokens(ids)

    def text_loss(m):
        return jnp.sum(m(x, mask)[0])
    sizes = []
    for policy in ("full", "save_qkv_proj", "save_dot_except_mlp", "minimal"):
        with memory_options(remat=True, remat_policy=policy):
            print_saved_residuals(lambda st: text_loss(nnx.merge(graphdef, st)), state)
        shapes = re.findall(r"^\w+\[([\d,]*)\]", capsys.readouterr().out, re.M)
        sizes.append(sum(int(np.prod([int(d) for d in x.split(",") if d])) for x in shapes))
    assert sizes == sorted(sizes) and len(set(sizes)) == 4, sizes


def test_kv_cache_prefill_and_decode(pair):
    u, s = pair
    ids, px, mask = inputs()
    outs = []
    for m in (u, s):
        pre = m.forward(ids, px, mask, cache=m.init_cache(2, 24))
        tok = jnp.argmax(pre.logits[:, -1], -1)[:, None]
        dec = m.forward(tok, attention_mask=jnp.ones((2, 1), bool), cache=pre.cache)
        outs.append((pre, dec))
    (pu, du), (ps, ds) = outs
    assert ps.cache.k.shape == (3, 2, 24, 2, 32)
    for a, b in ((pu.logits, ps.logits), (du.logits, ds.logits),
                 (jnp.stack(du.cache.k), ds.cache.k), (jnp.stack(du.cache.v), ds.cache.v),
                 (du.cache.mask, ds.cache.mask), (du.cache.positions, ds.cache.positions)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    np.testing.assert_allclose(np.asarray(s(ids, px, mask)[:, -1]), np.asarray(ps.logits[:, -1]),
                               atol=1e-5)


def test_sampler(pair):
    from emit_jax.ops.sampling import generate

    u, s = pair
    ids, px, mask = inputs()
    kw = dict(max_new_tokens=4, temperature=0.0)
    a, b = generate(u, ids, mask, px, **kw), generate(s, ids, mask, px, **kw)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_allclose(np.asarray(a.logprobs), np.asarray(b.logprobs), atol=1e-5)


def test_sampler_bucketed_with_a_stacked_cache(pair):
    """The bucketed decode (a cache grown phase by phase, ``emit_jax.ops.kernels``) over the
    stacked ``[L, B, S, KVH, Dh]`` cache gives the unrolled model's tokens."""
    from emit_jax.ops.kernels import kernel_options
    from emit_jax.ops.sampling import generate

    u, s = pair
    ids, px, mask = inputs()
    kw = dict(max_new_tokens=7, temperature=0.0)
    a = generate(u, ids, mask, px, **kw)
    with kernel_options(decode="bucketed", decode_bucket=2):
        b = generate(s, ids, mask, px, **kw)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_allclose(np.asarray(a.logprobs), np.asarray(b.logprobs), atol=1e-5)


@pytest.mark.parametrize("vit_chunk", [0, 1])
def test_vit_hidden_states_and_early_stop(pair, vit_chunk):
    u, s = pair
    _, px, _ = inputs()
    with memory_options(vit_chunk=vit_chunk):
        for kw in (dict(), dict(num_layers=2), dict(num_layers=3, hidden_layers=(1, 3)),
                   dict(num_layers=2, hidden_layers=(0, 1))):
            (lu, hu), (ls, hs) = (m.vision_tower(px, output_hidden_states=True, **kw)
                                  for m in (u, s))
            assert len(hs) == len(hu) == 1 + kw.get("num_layers", 3)
            keep = kw.get("hidden_layers", range(4))
            assert [h is not None for h in hs] == [i in keep for i in range(len(hs))]
            assert_trees_close((ls, hs), (lu, hu))
        np.testing.assert_allclose(np.asarray(s.vision_tower(px)), np.asarray(u.vision_tower(px)),
                                   atol=1e-5)


def test_emit_model():
    """EMIT over a scanned InternVL: <COMP_CONTEXT> added, the heat map from the early-stopped
    ViT's hidden states, the same logits."""
    u = EMIT.create(InternVL(config(), rngs=nnx.Rngs(0)), hint_ids=[1, 2])
    s = with_weights(EMIT.create(InternVL(config(scan=True), rngs=nnx.Rngs(0)), hint_ids=[1, 2]),
                     u)
    ids, px, mask = inputs()
    ids = ids.at[1, 6:6 + u.num_comp_slots].set(u.emit_config.comp_token_id)
    ce = jnp.asarray(np.random.RandomState(2).randn(1, 2, 3, 56, 56), jnp.float32)
    np.testing.assert_allclose(np.asarray(s.heatmap(ce)), np.asarray(u.heatmap(ce)), atol=1e-5)
    np.testing.assert_allclose(np.asarray(s(ids, px, mask, ce)), np.asarray(u(ids, px, mask, ce)),
                               atol=1e-5)


def read_folder(path):
    return {f: open(os.path.join(path, f), "rb").read() for f in sorted(os.listdir(path))}


def test_hf_files_are_the_same_and_load_either_way(pair, tmp_path):
    u, s = pair
    a = hf.save(u, tmp_path / "u", max_shard_size="300KB")
    b = hf.save(s, tmp_path / "s", max_shard_size="300KB")
    files = read_folder(a)
    assert len([f for f in files if f.endswith(".safetensors")]) > 2  # sharded, with an index
    assert files == read_folder(b)  # byte for byte
    want_u, want_s = nnx.to_pure_dict(nnx.state(u)), nnx.to_pure_dict(nnx.state(s))
    assert_trees_close(nnx.to_pure_dict(nnx.state(hf.load(b))), want_u, atol=0, rtol=0)
    back = hf.load(a, scan_layers=True)
    assert back.config.scan_layers
    assert_trees_close(nnx.to_pure_dict(nnx.state(back)), want_s, atol=0, rtol=0)


def test_model_checkpoints_are_the_same_and_load_either_way(pair, tmp_path):
    u, s = pair
    checkpoint.save_model(u, tmp_path / "u")
    checkpoint.save_model(s, tmp_path / "s")
    ckptr = ocp.StandardCheckpointer()
    layout = [jax.tree.map(lambda m: (tuple(m.shape), str(m.dtype)),
                           ckptr.metadata(str(tmp_path / n / "params")).item_metadata.tree)
              for n in ("u", "s")]
    ckptr.close()
    assert layout[0] == layout[1]
    back, meta = checkpoint.load_model(tmp_path / "s")  # as saved: stacked
    assert meta["config"]["scan_layers"] and back.config.scan_layers
    unrolled, _ = checkpoint.load_model(tmp_path / "s", scan_layers=False)
    stacked, _ = checkpoint.load_model(tmp_path / "u", scan_layers=True)
    assert not unrolled.config.scan_layers and stacked.config.scan_layers
    assert_trees_close(nnx.to_pure_dict(nnx.state(unrolled)), nnx.to_pure_dict(nnx.state(u)),
                       atol=0, rtol=0)
    assert_trees_close(nnx.to_pure_dict(nnx.state(stacked)), nnx.to_pure_dict(nnx.state(s)),
                       atol=0, rtol=0)
    assert_trees_close(nnx.to_pure_dict(nnx.state(back)), nnx.to_pure_dict(nnx.state(s)),
                       atol=0, rtol=0)


def test_training_checkpoints_resume_across_the_switch(pair, tmp_path):
    from emit_jax.training.state import StageCheckpoints

    u, s = pair

    def trained(model):  # one Adam step: parameters and both moments changed
        model = nnx.clone(model)
        opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
        opt.update(model, jax.tree.map(lambda p: jnp.sin(p * 3.0), nnx.state(model, nnx.Param)))
        return model, opt

    for src, dst in (((s, u), "s"), ((u, s), "u")):
        model, opt = trained(src[0])
        ck = StageCheckpoints(str(tmp_path / dst), every=1, async_save=False)
        ck.save(1, model, opt, {"step": 1})
        ck.close()
        other = nnx.clone(src[1])
        other_opt = nnx.Optimizer(other, optax.adam(1e-2), wrt=nnx.Param)
        ck = StageCheckpoints(str(tmp_path / dst), every=1, async_save=False)
        assert ck.restore(other, other_opt) == {"step": 1}
        ck.close()
        for a, b in ((model, other), (opt, other_opt)):
            assert_trees_close(unstack_layers(nnx.to_pure_dict(nnx.state(b))),
                               unstack_layers(nnx.to_pure_dict(nnx.state(a))), atol=0, rtol=0)


def test_lora(pair):
    """qwix LoRA over stacked layers: factors [L, in, r] / [L, r, out] made before qwix traces
    the model; with the unrolled policy's factors, the same logits, LoRA gradients and merge."""
    from emit_jax.training.lora import apply_lora, merge_lora

    u, s = pair
    ids, px, mask = inputs()
    lcfg = LoRAConfig(rank=4, alpha=16.0, targets=TARGETS)
    sample = {"input_ids": ids, "pixel_values": px, "attention_mask": mask, "num_ce": 0}
    pu, ps = apply_lora(u, sample, lcfg, seed=1), apply_lora(s, sample, lcfg, seed=1)
    assert not jax.tree.leaves(nnx.state(s, nnx.LoRAParam))  # the reference has no factors
    a = ps.language_model.layers.self_attn.q_proj.kernel_lora_a
    assert a.shape == (3, 128, 4)
    assert a.get_metadata()["out_sharding"] == ("layers", "embed", None)
    lu = nnx.state(pu, nnx.LoRAParam)
    for i, (_, v) in enumerate(nnx.to_flat_state(lu)):  # B is zero at init: make it count
        v.set_value(jax.random.normal(jax.random.key(i), v.get_value().shape) * 0.1)
    nnx.update(pu, lu)
    ls = nnx.state(ps, nnx.LoRAParam)
    assert len(jax.tree.leaves(ls)) * 3 == len(jax.tree.leaves(lu))
    nnx.replace_by_pure_dict(ls, stack_layers(nnx.to_pure_dict(lu), nnx.to_pure_dict(ls)))
    nnx.update(ps, ls)
    logits = [np.asarray(p.forward(ids, px, mask).logits) for p in (pu, ps, u)]
    np.testing.assert_allclose(logits[1], logits[0], atol=1e-5)
    assert np.abs(logits[0] - logits[2]).max() > 1e-2

    def lora_loss(m, ids, px, mask):
        return jnp.mean(m.forward(ids, px, mask).logits ** 2)

    assert_trees_close(grads(ps, lora_loss, nnx.LoRAParam), grads(pu, lora_loss, nnx.LoRAParam))
    np.testing.assert_allclose(np.asarray(merge_lora(ps, s)(ids, px, mask)), logits[0], atol=1e-5)
    with pytest.raises(ConfigError, match="QLoRA"):
        apply_lora(s, sample, dataclasses.replace(lcfg, weight_qtype="nf4"))


def grpo_smoke_config():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("grpo_config", os.path.join(root, "configs",
                                                                              "grpo.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config("smoke")


def test_config_keys():
    from emit_jax.models.config import InternVLConfig
    from emit_jax.training.validate import validate_config

    cfg = config(scan=True)
    assert "scan_layers" not in str(cfg.to_hf_dict())
    old = cfg.to_json_dict()
    del old["scan_layers"]  # a checkpoint written before the switch existed
    assert InternVLConfig.from_json_dict(old) == config()
    c = grpo_smoke_config()
    assert c.kernels.scan_layers is False and c.memory.remat_policy == "full"
    with c.unlocked():
        c.kernels.scan_layers = True
    validate_config(c, num_devices=1)
    for key, value, needle in (("memory.remat_policy", "dots", "memory.remat_policy"),
                               ("grpo.lora.weight_qtype", "nf4", "QLoRA")):
        bad = c.copy_and_resolve_references()
        section, name = key.rsplit(".", 1)
        node = bad
        for part in section.split("."):
            node = node[part]
        node[name] = value
        with pytest.raises(ConfigError, match=needle):
            validate_config(bad, num_devices=1)
