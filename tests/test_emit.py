"""EMIT's components: contrastive embeddings, BatchNorm + conv projector, soft prompt, the
<COMP_CONTEXT> slots and their interop (docs/reference/emit.md 4.4-7)."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors import safe_open

from conftest import hf_config, make_hf_model
from test_heatmap import numpy_reference
from emit_jax import checkpoint, hf
from emit_jax.hf import to_hf_layout
from emit_jax.models import architectures
from emit_jax.models.config import TextConfig
from emit_jax.models.emit import (EMIT, EMITConfig, HINT_TEXT, add_comp_token, comp_insert_index,
                                  insert_comp_slots, official_soft_prompt, rotations_of,
                                  scaled_layers, soft_prompt_from_hint, use_comp)
from emit_jax.models.internvl import InternVL
from emit_jax.ops.sampling import generate

IM_END = 7


def small_mllm(image_size=56, vision_layers=2, vocab=64, hidden=32, seed=0):
    cfg = architectures.tiny()
    cfg = cfg.replace(
        vision=dataclasses.replace(cfg.vision, image_size=image_size, num_hidden_layers=vision_layers),
        text=dataclasses.replace(cfg.text, vocab_size=vocab, hidden_size=hidden, intermediate_size=48,
                                 num_hidden_layers=2),
        image_token_id=vocab - 1)
    return InternVL(cfg, rngs=nnx.Rngs(seed))


def prompt_with_slots(model, n_ce_rows, length=12, seed=0):
    """Left-aligned ids: text, comp slots, <|im_end|>, 3 trailing tokens (ChatML-like)."""
    rs = np.random.RandomState(seed)
    rows = []
    for i in range(len(n_ce_rows)):
        ids = list(rs.randint(10, 40, length)) + [IM_END, 1, 2, 3]
        if n_ce_rows[i]:
            ids = insert_comp_slots(ids, model.num_comp_slots, model.emit_config.comp_token_id, IM_END)
        rows.append(ids)
    width = max(map(len, rows))
    ids = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):  # left padding
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


# ------------------------------------------------------------------ rules and small pieces
def test_scaled_layers():
    assert scaled_layers(24) == (4, 8, 16, 20)
    assert scaled_layers(6) == (1, 2, 4, 5)
    assert scaled_layers(12) == (2, 4, 8, 10)
    assert EMITConfig().layers_for(24) == (4, 8, 16, 20)
    assert EMITConfig().window_for(32) == 6 and EMITConfig().window_for(16) == 3


def test_use_comp_rule():
    ad = "Is there any defect in the object?\nA. Yes\nB. No\n"
    dl = "Where is the defect?\nA. top left\n"
    assert use_comp(2, ad) and use_comp(2, dl)
    assert not use_comp(1, ad)  # one image
    assert not use_comp(2, "What type of defect is it?")
    assert use_comp(2, ad, mode="eval", image_path="DS-MVTec/pill/image/crack/000.png")
    assert use_comp(2, dl, mode="eval", image_path="VisA/candle/Data/Images/Anomaly/000.JPG")
    assert not use_comp(2, ad, mode="eval", image_path="MVTec-LOCO/box/test/x.png")
    assert not use_comp(2, ad, mode="eval", image_path="GoodsAD/cigarette_box/x.jpg")


def test_comp_slots_go_before_the_user_turns_close():
    # system ... <|im_end|> \n user ... <|im_end|> \n <|im_start|> assistant \n
    prompt = [5, 9, IM_END, 1, 6, 20, 21, 22, IM_END, 1, 6, 30, 1]
    assert comp_insert_index(prompt, IM_END) == len(prompt) - 5
    out = insert_comp_slots(prompt, 3, 99, IM_END)
    assert out == prompt[:8] + [99, 99, 99] + prompt[8:]
    with pytest.raises(ValueError, match="im_end"):
        comp_insert_index([1, 2, 3], IM_END)


def test_rotations_match_torch_rot90():
    x = np.random.RandomState(0).randn(2, 3, 5, 5).astype(np.float32)
    ours = np.asarray(rotations_of(jnp.asarray(x), 4))
    for k in range(4):
        np.testing.assert_array_equal(ours[:, k], torch.rot90(torch.tensor(x), k, (2, 3)).numpy())
    # docs/reference/emit.md 5.1: for k = 1, out[i][j] = in[j][W-1-i]
    assert ours[0, 1, 0, 1, 3] == x[0, 0, 3, 5 - 1 - 1]


def test_turned_references_match_scipy_and_rot90():
    """``emit.reference_turns`` (not in EMIT): the reference also turned between the rot90s."""
    from scipy import ndimage

    from emit_jax.models.emit import contrastive_heatmap, reference_bank, turned

    x = np.random.RandomState(1).randn(2, 3, 16, 16).astype(np.float32)
    np.testing.assert_allclose(np.asarray(turned(jnp.asarray(x), 90)),
                               np.rot90(x, 1, axes=(2, 3)), atol=1e-5)
    np.testing.assert_allclose(np.asarray(turned(jnp.asarray(x), 30)),
                               ndimage.rotate(x, 30, axes=(2, 3), reshape=False, order=1,
                                              mode="nearest"), atol=1e-4)
    bank = np.asarray(reference_bank(jnp.asarray(x), 4, 2))  # [n, 2 turns x 4 rot90s, ...]
    assert bank.shape == (2, 8, 3, 16, 16)
    np.testing.assert_array_equal(bank[:, :4], np.asarray(rotations_of(jnp.asarray(x), 4)))
    np.testing.assert_allclose(bank[:, 5], np.rot90(np.asarray(turned(jnp.asarray(x), 45)), 1,
                                                    axes=(2, 3)), atol=1e-5)
    # more references can only bring each query patch nearer: the map does not rise, and a
    # query that is the reference turned by 45 degrees is matched better
    mllm = small_mllm(image_size=56)
    ref = np.random.RandomState(2).rand(1, 3, 56, 56).astype(np.float32)
    query = np.asarray(turned(jnp.asarray(ref), 45))
    ce = jnp.asarray(np.stack([ref, query], 1))
    one, two = (np.asarray(contrastive_heatmap(mllm.vision_tower, ce, (1, 2), 1, turns=t))
                for t in (1, 2))
    assert (two <= one + 1e-6).all() and two.mean() < one.mean()
    with pytest.raises(ValueError, match="reference_turns: 0 is below 1"):
        EMITConfig(reference_turns=0).validate()


def test_turned_features_match_scipy_and_the_pixel_bank():
    """``emit.feature_turns`` (not in EMIT): the copies' feature grids turned, zeros outside;
    the copies in :func:`reference_bank`'s order; the map from a ViT's turned features is the
    map ``contrastive_heatmap`` computes with ``feature_turns``."""
    from scipy import ndimage

    from emit_jax.models.emit import contrastive_heatmap, reference_bank, turned_features
    from emit_jax.ops.heatmap import anomaly_map

    f = np.random.RandomState(3).randn(2, 3, 4, 8, 8, 5).astype(np.float32)  # [L, n, R, g, g, D]
    out = np.asarray(turned_features(jnp.asarray(f), 4))
    assert out.shape == (2, 3, 16, 8, 8, 5)
    np.testing.assert_array_equal(out[:, :, :4], f)
    for j in (1, 2, 3):
        want = ndimage.rotate(f, 90 * j / 4, axes=(3, 4), reshape=False, order=1,
                              mode="grid-constant", cval=0.0)
        np.testing.assert_allclose(out[:, :, 4 * j:4 * j + 4], want, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(turned_features(jnp.asarray(f), 1)), f)
    # through the ViT: the same as turning its rot90 references' features by hand
    mllm = small_mllm(image_size=56)
    rng = np.random.RandomState(4)
    ce = jnp.asarray(rng.rand(2, 2, 3, 56, 56).astype(np.float32))
    # two turns in pixels (0 and 45 degrees), each copy's features turned by 22.5 more
    got = np.asarray(contrastive_heatmap(mllm.vision_tower, ce, (1, 2), 1, turns=2,
                                         feature_turns=2))
    refs = reference_bank(ce[:, 0], 4, 2).reshape(16, 3, 56, 56)
    _, hid = mllm.vision_tower(jnp.concatenate([ce[:, 1], refs]), output_hidden_states=True,
                               num_layers=2, hidden_layers=(1, 2))
    feats = jnp.stack([hid[l][:, 1:] for l in (1, 2)])  # [L, 2 + 16, P, D]
    d = feats.shape[-1]
    q = feats[:, :2].reshape(2, 2, 4, 4, d)
    r = feats[:, 2:].reshape(2, 2, 8, 4, 4, d)
    turned_r = np.asarray(turned_features(r, 2, 45.0))
    np.testing.assert_allclose(turned_r[:, :, 8:], ndimage.rotate(
        np.asarray(r), 22.5, axes=(3, 4), reshape=False, order=1, mode="grid-constant"),
        atol=1e-4)
    np.testing.assert_allclose(got, np.asarray(anomaly_map(q, jnp.asarray(turned_r), 1)),
                               atol=1e-5)
    eight = np.asarray(contrastive_heatmap(mllm.vision_tower, ce, (1, 2), 1, turns=2))
    assert (got <= eight + 1e-6).all()  # more copies never raise the map
    with pytest.raises(ValueError, match="feature_turns: 0 is below 1"):
        EMITConfig(feature_turns=0).validate()


def test_align_turn_keeps_the_turn_nearest_the_query():
    """``emit.align_turn`` (not in EMIT): of the reference's turns, the one nearest the query in
    pixels, in its rot90s; the map is EMIT's four-reference map of that turn."""
    from emit_jax.models.emit import contrastive_heatmap, nearest_turn, reference_bank, turned

    rng = np.random.RandomState(5)
    # a smooth image, so that a turned copy is near its turn and far from the others
    base = np.kron(rng.rand(2, 3, 7, 7), np.ones((8, 8))).astype(np.float32)  # [2, 3, 56, 56]
    ref = jnp.asarray(base)
    query = jnp.stack([turned(ref[:1], 45)[0], jnp.rot90(turned(ref[1:], 22.5), 1, (2, 3))[0]])
    bank = reference_bank(ref, 4, 4)  # turns of 0, 22.5, 45, 67.5 degrees
    assert np.asarray(nearest_turn(query, bank, 4)).tolist() == [2, 1]
    assert np.asarray(nearest_turn(ref, bank, 4)).tolist() == [0, 0]
    mllm = small_mllm(image_size=56)
    ce = jnp.stack([ref, query], 1)
    got = np.asarray(contrastive_heatmap(mllm.vision_tower, ce, (1, 2), 1, turns=4,
                                         align_turn=True))
    for i, j in enumerate((2, 1)):  # each sample: EMIT's map with the reference at its turn
        one = jnp.stack([turned(ref[i:i + 1], 22.5 * j), query[i:i + 1]], 1)
        np.testing.assert_allclose(got[i], np.asarray(contrastive_heatmap(
            mllm.vision_tower, one, (1, 2), 1))[0], atol=1e-5)
    with pytest.raises(ValueError, match="align_turn: true with reference_turns 1"):
        EMITConfig(align_turn=True).validate()
    EMITConfig(align_turn=True, reference_turns=4).validate()


def test_soft_prompt_inits():
    sp = official_soft_prompt()
    assert sp.shape == (9, 3584) and sp.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(sp, axis=1),
                               [0.948, 0.940, 0.956, 0.902, 0.944, 0.952, 0.945, 0.864, 0.751],
                               atol=1e-3)
    table = np.arange(20 * 4, dtype=np.float32).reshape(20, 4)
    rows = soft_prompt_from_hint(table, [3, 5, 7, 11, 13, 15, 17, 19], 9)  # 8 hint tokens
    np.testing.assert_array_equal(rows, table[[3, 3, 5, 7, 11, 13, 15, 17, 19]])
    assert soft_prompt_from_hint(table, list(range(18)), 9).tolist() == table[:18:2].tolist()


def test_official_soft_prompt_used_at_hidden_3584():
    cfg = architectures.tiny()
    cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, image_size=56, num_hidden_layers=1),
                      text=TextConfig(vocab_size=40, hidden_size=3584, intermediate_size=16,
                                      num_hidden_layers=1, num_attention_heads=28,
                                      num_key_value_heads=4), image_token_id=39)
    model = EMIT.create(InternVL(cfg, rngs=nnx.Rngs(0)))
    np.testing.assert_array_equal(np.asarray(model.soft_prompt[...]), official_soft_prompt())


def test_soft_prompt_from_hint_ids_below_3584():
    mllm = small_mllm()
    hint_ids = [11, 12, 13, 14, 15, 16, 17, 18]
    model = EMIT.create(mllm, hint_ids=hint_ids)
    table = np.asarray(model.mllm.language_model.embed_tokens.embedding[...])
    np.testing.assert_array_equal(np.asarray(model.soft_prompt[...]),
                                  table[[11, 11, 12, 13, 14, 15, 16, 17, 18]])
    assert HINT_TEXT == "Below are some hints for your reference:"


def test_add_comp_token_rows_and_unchanged_logits():
    for tied in (False, True):
        mllm = small_mllm()
        mllm = InternVL(mllm.config.replace(tie_word_embeddings=tied), rngs=nnx.Rngs(1))
        grown, comp_id = add_comp_token(mllm)
        assert comp_id == 64 and grown.config.text.vocab_size == 65
        head = (grown.language_model.embed_tokens.embedding[...] if tied
                else grown.lm_head.kernel[...].T)
        old = (mllm.language_model.embed_tokens.embedding[...] if tied else mllm.lm_head.kernel[...].T)
        np.testing.assert_allclose(np.asarray(head[comp_id]), np.asarray(old).mean(0), atol=1e-6)
        ids = jnp.asarray([[3, 4, 5, 6]])
        np.testing.assert_allclose(np.asarray(grown(ids))[..., :64], np.asarray(mllm(ids)), atol=1e-5)


# ------------------------------------------------------------------ projector vs torch
def test_batchnorm_matches_torch_train_and_eval():
    model = EMIT.create(small_mllm(), hint_ids=[1, 2])
    bn = model.projector.bn
    tbn = torch.nn.BatchNorm2d(1)
    rs = np.random.RandomState(0)
    for step in range(3):
        x = (rs.rand(3, 4, 4) * (step + 1)).astype(np.float32)
        model.train()
        ours = np.asarray(bn(jnp.asarray(x)))
        tbn.train()
        ref = tbn(torch.tensor(x)[:, None])[:, 0].detach().numpy()
        np.testing.assert_allclose(ours, ref, atol=1e-5)
    np.testing.assert_allclose(np.asarray(bn.mean[...]), tbn.running_mean.numpy(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(bn.var[...]), tbn.running_var.numpy(), atol=1e-6)
    model.eval()
    tbn.eval()
    x = rs.rand(2, 4, 4).astype(np.float32)
    np.testing.assert_allclose(np.asarray(bn(jnp.asarray(x))),
                               tbn(torch.tensor(x)[:, None])[:, 0].detach().numpy(), atol=1e-5)


def test_conv_projector_matches_torch_and_init():
    model = EMIT.create(small_mllm(hidden=64), hint_ids=[1])
    conv = model.projector.conv
    k = np.asarray(conv.kernel[...])
    assert k.shape == (4, 4, 1, 64)
    assert abs(k.std() - np.sqrt(2 / 16)) < 0.05 and np.all(np.asarray(conv.bias[...]) == 0)
    tconv = torch.nn.Conv2d(1, 64, 4, 2, 1)
    with torch.no_grad():
        tconv.weight.copy_(torch.tensor(to_hf_layout(("kernel",), k)))
        tconv.bias.copy_(torch.randn(64))
        conv.bias[...] = jnp.asarray(tconv.bias.numpy())
    model.eval()
    heat = np.random.RandomState(1).rand(2, 8, 8).astype(np.float32)
    ours = np.asarray(model.projector(jnp.asarray(heat)))  # [2, 16, 64]
    bn = model.projector.bn
    normed = (heat - np.asarray(bn.mean[...])) / np.sqrt(np.asarray(bn.var[...]) + 1e-5)
    ref = tconv(torch.tensor(normed[:, None], dtype=torch.float32)).detach()
    ref = ref.permute(0, 2, 3, 1).reshape(2, 16, 64).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5)


# ------------------------------------------------------------------ heat map from the ViT
def test_contrastive_heatmap_equals_transformers_vit_plus_numpy(save_hf):
    """Features from transformers' InternVL ViT (query + torch.rot90 references), the windowed
    definition in NumPy: equal to EMIT.heatmap on the converted model."""
    cfg = hf_config(vision_layers=3, image_size=84)
    tmodel = make_hf_model(cfg, seed=4)
    mllm = hf.load(save_hf(tmodel))
    ecfg = EMITConfig(ce_layers=(1, 3), window=2)
    model = EMIT.create(mllm, ecfg, hint_ids=[1, 2, 3])
    rs = np.random.RandomState(0)
    ce = rs.randn(2, 2, 3, 84, 84).astype(np.float32)
    ours = np.asarray(model.heatmap(jnp.asarray(ce)))
    vit = tmodel.model.vision_tower
    with torch.no_grad():
        ref = torch.tensor(ce[:, 0])
        rots = torch.cat([torch.rot90(ref, k, (2, 3)) for k in range(4)])  # [k-major]
        hq = vit(pixel_values=torch.tensor(ce[:, 1]), output_hidden_states=True).hidden_states
        hr = vit(pixel_values=rots, output_hidden_states=True).hidden_states
    g = 6
    q = np.stack([hq[l][:, 1:].numpy().reshape(2, g, g, -1) for l in (1, 3)])
    r = np.stack([hr[l][:, 1:].numpy().reshape(4, 2, g, g, -1).transpose(1, 0, 2, 3, 4)
                  for l in (1, 3)])
    want = numpy_reference(q, r, 2, True)
    np.testing.assert_allclose(ours, want, atol=1e-4)


def test_identical_images_give_a_flat_zero_map():
    model = EMIT.create(small_mllm(), hint_ids=[1])
    img = np.random.RandomState(2).randn(1, 3, 56, 56).astype(np.float32)
    heat = np.asarray(model.heatmap(jnp.asarray(np.stack([img, img], 1))))
    np.testing.assert_allclose(heat, 0.0, atol=1e-5)


def test_no_gradient_reaches_the_vit_through_ce():
    model = EMIT.create(small_mllm(), hint_ids=[1])
    ce = jnp.asarray(np.random.RandomState(3).randn(1, 2, 3, 56, 56), jnp.float32)

    def loss(m):
        return jnp.sum(m.ref_tokens(ce) ** 2)

    grads = nnx.grad(loss)(model)
    vit_grads = jax.tree.leaves(nnx.state(grads)["mllm"]["vision_tower"])
    assert all(float(jnp.abs(g).max()) == 0.0 for g in vit_grads)
    assert float(jnp.abs(nnx.state(grads)["projector"]["conv"]["kernel"][...]).max()) > 0
    assert float(jnp.abs(nnx.state(grads)["soft_prompt"][...]).max()) > 0


# ------------------------------------------------------------------ assembly
def test_ref_tokens_fill_the_comp_slots_in_batch_order():
    model = EMIT.create(small_mllm(), hint_ids=[1, 2])
    model.eval()
    assert model.num_comp_slots == 9 + 4
    ids, mask = prompt_with_slots(model, [1, 0, 1])
    ce = jnp.asarray(np.random.RandomState(5).randn(2, 2, 3, 56, 56), jnp.float32)
    embeds = np.asarray(model.embed(jnp.asarray(ids), None, ce))
    base = np.asarray(model.mllm.embed(jnp.asarray(ids)))
    ref = np.asarray(model.ref_tokens(ce))
    slots = ids == model.emit_config.comp_token_id
    np.testing.assert_array_equal(embeds[~slots], base[~slots])
    np.testing.assert_allclose(embeds[0][slots[0]], ref[0], atol=1e-6)
    np.testing.assert_allclose(embeds[2][slots[2]], ref[1], atol=1e-6)
    np.testing.assert_allclose(ref[0, :9], np.asarray(model.soft_prompt[...]), atol=1e-6)
    with pytest.raises(ValueError, match="comp tokens do not match"):
        model.embed(jnp.asarray(ids), None, ce[:1])


@pytest.mark.parametrize("use_sp,use_ce,slots", [(True, False, 9), (False, True, 4), (False, False, 0)])
def test_ablation_switches(use_sp, use_ce, slots):
    model = EMIT.create(small_mllm(), EMITConfig(use_soft_prompt=use_sp, use_contrastive=use_ce),
                        hint_ids=[1])
    model.eval()
    assert model.num_comp_slots == slots
    ce = jnp.asarray(np.random.RandomState(6).randn(1, 2, 3, 56, 56), jnp.float32)
    tokens = np.asarray(model.ref_tokens(ce))
    assert tokens.shape == (1, slots, 32)
    if use_sp:
        np.testing.assert_allclose(tokens[0, :9], np.asarray(model.soft_prompt[...]), atol=1e-6)
    ids, mask = prompt_with_slots(model, [1])
    logits = model(jnp.asarray(ids), None, jnp.asarray(mask), ce)
    assert np.isfinite(np.asarray(logits)).all()


def test_official_bn_mode_reproduces_the_dummy_pass():
    ids = jnp.asarray([[10, 11, 12, IM_END, 1]])
    for mode, changes in (("standard", False), ("official", True)):
        model = EMIT.create(small_mllm(), EMITConfig(bn_mode=mode), hint_ids=[1])
        model.train()
        model(ids)  # a batch with no CE sample
        var = float(model.projector.bn.var[...][0])
        assert (var < 1.0) == changes, (mode, var)
        if changes:  # zero heat map: mean stays 0, var decays by (1 - momentum)
            assert abs(var - 0.9) < 1e-6 and float(model.projector.bn.mean[...][0]) == 0.0
        model.eval()
        before = float(model.projector.bn.var[...][0])
        model(ids)
        assert float(model.projector.bn.var[...][0]) == before  # eval never updates


def test_generate_with_ce_equals_full_forward_greedy():
    model = EMIT.create(small_mllm(), hint_ids=[1])
    model.eval()
    ids, mask = prompt_with_slots(model, [1, 1])
    ce = jnp.asarray(np.random.RandomState(8).randn(2, 2, 3, 56, 56), jnp.float32)
    out = generate(model, ids, mask, ce_pixels=ce, max_new_tokens=6)
    full_ids = jnp.concatenate([jnp.asarray(ids), out.tokens], 1)
    full_mask = jnp.concatenate([jnp.asarray(mask), jnp.ones_like(out.tokens)], 1)
    logits = model(full_ids, None, full_mask, ce)
    greedy = np.asarray(jnp.argmax(logits[:, ids.shape[1] - 1:-1], -1))
    np.testing.assert_array_equal(np.asarray(out.tokens), greedy)


def test_padding_between_real_rows_is_skipped_by_the_masks():
    """A batch assembled from several processes has padding tiles / CE rows between its real
    ones (``parallel.assemble_batch``): with ``tile_valid`` and a bool ``num_ce`` the forward
    pass, and BatchNorm's training statistics, equal those of the prefix-padded batch."""
    mllm = small_mllm()
    tokens_per_tile = mllm.config.tokens_per_tile
    model = EMIT.create(mllm, hint_ids=[1])
    ids, mask = prompt_with_slots(model, [1, 1, 0])
    img = mllm.config.image_token_id
    ids = np.concatenate([np.full((3, tokens_per_tile), img, np.int32), ids], 1)  # a tile per row
    mask = np.concatenate([np.ones((3, tokens_per_tile), np.int32), mask], 1)
    rs = np.random.RandomState(3)
    tiles = rs.randn(3, 3, 56, 56).astype(np.float32)
    ce = rs.randn(2, 2, 3, 56, 56).astype(np.float32)
    pad_t, pad_c = np.full((1, 3, 56, 56), 7.0, np.float32), np.full((1, 2, 3, 56, 56), 7.0, np.float32)
    # prefix padding (one process) vs padding after each process's block (rows 0 | rows 1-2)
    prefix = dict(pixel_values=np.concatenate([tiles, pad_t]), ce_pixels=np.concatenate([ce, pad_c]),
                  num_ce=2)
    blocks = dict(pixel_values=np.concatenate([tiles[:1], pad_t, tiles[1:], pad_t]),
                  tile_valid=np.array([1, 0, 1, 1, 0], bool),
                  ce_pixels=np.concatenate([ce[:1], pad_c, ce[1:], pad_c]),
                  num_ce=np.array([1, 0, 1, 0], bool))
    outs, stats = [], []
    for kw in (prefix, blocks):
        m = nnx.clone(model)
        m.train()  # BatchNorm on batch statistics: the padding must stay out of them
        kw = {k: jnp.asarray(v) for k, v in kw.items()}
        outs.append(np.asarray(m.forward(jnp.asarray(ids), attention_mask=jnp.asarray(mask), **kw).logits))
        stats.append((float(m.projector.bn.mean[...][0]), float(m.projector.bn.var[...][0])))
    np.testing.assert_allclose(outs[1], outs[0], atol=2e-5)
    np.testing.assert_allclose(stats[1], stats[0], rtol=1e-6)
    assert stats[0][0] != 0.0  # the statistics moved


# ------------------------------------------------------------------ interop
def _extras(model):
    st = dict(nnx.to_flat_state(nnx.state(model)))
    keys = [k for k in st if k[0] in ("soft_prompt", "projector")]
    return {k: np.asarray(st[k].get_value()) for k in keys}


def test_emit_round_trips_through_hf_folder_and_transformers_loads_it(tmp_path, save_hf):
    import transformers

    mllm = hf.load(save_hf(make_hf_model(hf_config(), seed=2)))
    model = EMIT.create(mllm, hint_ids=[1, 2, 3])
    model.train()
    model.projector.bn.update_stats(jnp.asarray(np.random.RandomState(0).rand(2, 4, 4), jnp.float32))
    out = hf.save(model, tmp_path / "emit_hf")
    assert os.path.isfile(os.path.join(out, hf.EMIT_EXTRAS))
    with safe_open(os.path.join(out, hf.EMIT_EXTRAS), "numpy") as f:
        assert set(f.keys()) == {"soft_prompt", "projector.bn.weight", "projector.bn.bias",
                                 "projector.bn.running_mean", "projector.bn.running_var",
                                 "projector.conv.weight", "projector.conv.bias"}
        assert f.get_tensor("projector.conv.weight").shape == (64, 1, 4, 4)  # hidden 64
    back = hf.load(out)
    assert isinstance(back, EMIT) and back.emit_config == model.emit_config
    a, b = _extras(model), _extras(back)
    assert a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)
    comp = model.emit_config.comp_token_id
    np.testing.assert_array_equal(np.asarray(back.mllm.lm_head.kernel[...][:, comp]),
                                  np.asarray(model.mllm.lm_head.kernel[...][:, comp]))
    t, info = transformers.InternVLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert t.config.text_config.vocab_size == comp + 1
    # and through an Orbax checkpoint
    checkpoint.save_model(back, tmp_path / "ck")
    again, meta = checkpoint.load_model(tmp_path / "ck")
    assert isinstance(again, EMIT) and meta["emit_config"]["comp_token_id"] == comp
    c = _extras(again)
    assert all(a[k].tobytes() == c[k].tobytes() for k in a)


def test_tokenizer_gets_comp_token_and_hint_ids():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from emit_jax.models.emit import COMP_TOKEN, hint_token_ids

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([HINT_TEXT, "a pill with a crack"] * 20,
                            trainers.BpeTrainer(vocab_size=63, special_tokens=["<unk>"]))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    mllm = small_mllm(vocab=len(hf_tok))
    hint = hint_token_ids(hf_tok)
    model = EMIT.create(mllm, tokenizer=hf_tok)
    comp = model.emit_config.comp_token_id
    assert comp == len(hf_tok) - 1 == hf_tok.convert_tokens_to_ids(COMP_TOKEN)
    assert hf_tok(f"x {COMP_TOKEN} y")["input_ids"].count(comp) == 1
    table = np.asarray(model.mllm.language_model.embed_tokens.embedding[...])
    idx = [hint[i * len(hint) // 9] for i in range(9)]
    np.testing.assert_array_equal(np.asarray(model.soft_prompt[...]), table[idx])
    other = small_mllm(vocab=len(hf_tok) + 5)
    with pytest.raises(ValueError, match="the model expects"):
        EMIT.create(other, tokenizer=hf_tok)


def test_max_readout_adds_the_maps_peak_to_every_token_and_round_trips(tmp_path):
    """``emit.max_readout`` (not in EMIT): starts as the official projector (u = 0); then every
    token is conv(BN(map)) + max(BN(map)) * u, u gets a gradient, and u goes through the HF
    folder and an Orbax checkpoint."""
    heat = jnp.asarray(np.random.RandomState(2).rand(3, 8, 8).astype(np.float32))
    plain = EMIT.create(small_mllm(hidden=64), hint_ids=[1])
    model = EMIT.create(small_mllm(hidden=64), dataclasses.replace(EMITConfig(), max_readout=True),
                        hint_ids=[1])
    for m in (plain, model):
        m.eval()
    model.projector.conv.kernel[...] = plain.projector.conv.kernel[...]
    np.testing.assert_array_equal(np.asarray(model.projector(heat)),
                                  np.asarray(plain.projector(heat)))
    assert plain.projector.max_proj is None
    assert not any("max_proj" in k for k in dict(nnx.to_flat_state(nnx.state(plain))))

    grads = nnx.grad(lambda p: jnp.sum(jnp.square(p(heat))))(model.projector)
    assert float(jnp.abs(grads["max_proj"][...]).sum()) > 0

    u = np.random.RandomState(3).randn(64).astype(np.float32)
    model.projector.max_proj[...] = jnp.asarray(u)
    bn = model.projector.bn
    normed = (np.asarray(heat) - np.asarray(bn.mean[...])) / np.sqrt(np.asarray(bn.var[...]) + 1e-5)
    expected = np.asarray(plain.projector(heat)) + normed.max(axis=(1, 2))[:, None, None] * u
    np.testing.assert_allclose(np.asarray(model.projector(heat)), expected, rtol=1e-5, atol=1e-5)

    _projector_extra_round_trips(model, tmp_path, "max_readout", "max_proj", u)


def _projector_extra_round_trips(model, tmp_path, setting: str, name: str, value) -> None:
    """``projector.<name>`` (an EMIT option's parameter, ``value``) goes through the HF folder
    (``emit_extras.safetensors``, ``projector.<name>.weight``) and an Orbax checkpoint; the
    option is set in both."""
    out = hf.save(model, tmp_path / "emit_hf")
    with safe_open(os.path.join(out, hf.EMIT_EXTRAS), "numpy") as f:
        np.testing.assert_array_equal(f.get_tensor(f"projector.{name}.weight"), value)
    back = hf.load(out)
    assert getattr(back.emit_config, setting)
    np.testing.assert_array_equal(np.asarray(getattr(back.projector, name)[...]), value)
    checkpoint.save_model(back, tmp_path / "ck")
    again, _ = checkpoint.load_model(tmp_path / "ck")
    assert getattr(again.emit_config, setting)
    np.testing.assert_array_equal(np.asarray(getattr(again.projector, name)[...]), value)


def test_peak_location_adds_where_the_map_peaks_to_every_token_and_round_trips(tmp_path):
    """``emit.peak_location`` (not in EMIT): starts as the official projector (e = 0); then every
    token is conv(BN(map)) + sum_p softmax(t * BN(map))_p e_p (NumPy below), e and t get
    gradients, and both go through the HF folder and an Orbax checkpoint."""
    plain = EMIT.create(small_mllm(hidden=64), hint_ids=[1])
    model = EMIT.create(small_mllm(hidden=64), dataclasses.replace(EMITConfig(), peak_location=True),
                        hint_ids=[1])
    g = model.mllm.config.vision.grid  # the heat map is the ViT's patch grid
    heat = jnp.asarray(np.random.RandomState(4).rand(3, g, g).astype(np.float32))
    for m in (plain, model):
        m.eval()
    model.projector.conv.kernel[...] = plain.projector.conv.kernel[...]
    np.testing.assert_array_equal(np.asarray(model.projector(heat)),
                                  np.asarray(plain.projector(heat)))
    assert plain.projector.loc_embed is None
    assert model.projector.loc_embed.shape == (g * g, 64)  # one row per map position

    e = np.random.RandomState(5).randn(g * g, 64).astype(np.float32)
    model.projector.loc_embed[...] = jnp.asarray(e)
    grads = nnx.grad(lambda p: jnp.sum(jnp.square(p(heat))))(model.projector)
    assert float(jnp.abs(grads["loc_embed"][...]).sum()) > 0
    assert float(jnp.abs(grads["loc_temp"][...]).sum()) > 0
    bn = model.projector.bn
    normed = (np.asarray(heat) - np.asarray(bn.mean[...])) / np.sqrt(np.asarray(bn.var[...]) + 1e-5)
    logits = 2.0 * normed.reshape(3, g * g)
    w = np.exp(logits - logits.max(1, keepdims=True))
    w /= w.sum(1, keepdims=True)
    expected = np.asarray(plain.projector(heat)) + (w @ e)[:, None, :]
    np.testing.assert_allclose(np.asarray(model.projector(heat)), expected, rtol=1e-5, atol=1e-5)
    sharp = jnp.zeros((1, g, g)).at[0, 2, 1].set(50.0)  # one clear peak: its own embedding
    np.testing.assert_allclose(np.asarray(model.projector.peak_location(sharp))[0], e[2 * g + 1],
                               rtol=1e-5, atol=1e-5)

    model.projector.loc_temp[...] = jnp.asarray([3.5])
    _projector_extra_round_trips(model, tmp_path, "peak_location", "loc_embed", e)
    back = hf.load(tmp_path / "emit_hf")
    np.testing.assert_array_equal(np.asarray(back.projector.loc_temp[...]), [3.5])


def test_hot_patches_add_the_hottest_patches_features_to_every_token_and_round_trip(tmp_path):
    """``emit.hot_patches`` (not in EMIT): the query's CE-layer features at the map's k hottest
    patches minus the references' mean, per layer over the query's feature RMS (NumPy below);
    W starts at zero (the official tokens), then every CE token gets W f; W gets a gradient
    through the whole EMIT model and goes through the HF folder and an Orbax checkpoint."""
    from emit_jax.models.emit import hot_features

    rs = np.random.RandomState(6)
    L, n, g, d, R, k = 2, 3, 4, 5, 2, 3
    heat = rs.rand(n, g, g).astype(np.float32)
    q = rs.randn(L, n, g, g, d).astype(np.float32)
    r = rs.randn(L, n, R, g, g, d).astype(np.float32)
    expect = []
    for i in range(n):
        top = np.argsort(heat[i].ravel())[-k:]
        rows = []
        for layer in range(L):
            qf = q[layer, i].reshape(g * g, d)
            rms = np.sqrt(np.mean(qf ** 2))
            rows.append((qf[top].mean(0) - r[layer, i].reshape(-1, d).mean(0)) / rms)
        expect.append(np.concatenate(rows))
    np.testing.assert_allclose(np.asarray(hot_features(jnp.asarray(heat), jnp.asarray(q),
                                                       jnp.asarray(r), k)),
                               np.stack(expect), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="hot_patches 17: a 4 x 4 map has 16 patches"):
        hot_features(jnp.asarray(heat), jnp.asarray(q), jnp.asarray(r), 17)
    with pytest.raises(ValueError, match="hot_patches: -1 is below 0"):
        EMITConfig(hot_patches=-1).validate()

    plain = EMIT.create(small_mllm(hidden=64), hint_ids=[1])
    model = EMIT.create(small_mllm(hidden=64), dataclasses.replace(EMITConfig(), hot_patches=4),
                        hint_ids=[1])
    for m in (plain, model):
        m.eval()
    vcfg = model.mllm.config.vision
    assert model.projector.hot_proj.shape == (len(model.ce_layers) * vcfg.hidden_size, 64)
    assert plain.projector.hot_proj is None
    model.projector.conv.kernel[...] = plain.projector.conv.kernel[...]
    model.mllm.vision_tower = plain.mllm.vision_tower
    ce = jnp.asarray(rs.rand(2, 2, 3, vcfg.image_size, vcfg.image_size).astype(np.float32))
    np.testing.assert_allclose(np.asarray(model.ref_tokens(ce)), np.asarray(plain.ref_tokens(ce)),
                               rtol=1e-6, atol=1e-6)  # W = 0: the official tokens

    heat_map, hot = model.heatmap(ce, with_hot=True)
    np.testing.assert_array_equal(np.asarray(heat_map), np.asarray(plain.heatmap(ce)))
    w = rs.randn(*model.projector.hot_proj.shape).astype(np.float32) * 0.1
    model.projector.hot_proj[...] = jnp.asarray(w)
    tokens = np.asarray(model.ref_tokens(ce))
    base = np.asarray(plain.ref_tokens(ce))
    nsoft = model.emit_config.num_soft_tokens
    np.testing.assert_allclose(tokens[:, nsoft:], base[:, nsoft:] + (np.asarray(hot) @ w)[:, None],
                               rtol=1e-4, atol=1e-4)
    model.train()
    grads = nnx.grad(lambda p: jnp.sum(jnp.square(p(heat_map, None, hot))))(model.projector)
    assert float(jnp.abs(grads["hot_proj"][...]).sum()) > 0
    with pytest.raises(ValueError, match="no hot patches' features"):
        model.projector(heat_map)
    model.eval()
    _projector_extra_round_trips(model, tmp_path, "hot_patches", "hot_proj", w)
