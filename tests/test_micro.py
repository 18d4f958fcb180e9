"""Gradient accumulation: a step taken in micro-batches equals the one-shot step (SFT and GRPO)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from emit_jax.models import architectures
from emit_jax.models.emit import EMIT
from emit_jax.models.internvl import InternVL
from emit_jax.training import micro
from emit_jax.training.config import GRPOConfig, LoRAConfig, OptimConfig
from emit_jax.training.optim import make_train_state
from emit_jax.training.sft import make_train_step, micro_device_batch, sft_loss, to_device

STAGE1 = nnx.All(nnx.Param, nnx.Any(nnx.PathContains("soft_prompt"), nnx.PathContains("projector")))
TILES = (1, 2, 0, 1, 2, 1)  # tiles per row
CE = (True, False, True, True, False, True)  # rows with a CE pair


def emit_model():
    cfg = architectures.tiny()
    cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, image_size=56, num_hidden_layers=2),
                      text=dataclasses.replace(cfg.text, vocab_size=64, num_hidden_layers=2),
                      image_token_id=63)
    m = EMIT.create(InternVL(cfg, rngs=nnx.Rngs(0)), hint_ids=[1, 2])
    m.train()
    m.projector.bn.use_running_average = True  # batch statistics would couple the rows
    return m


def collated(model, seed=0, T=96):
    """A collated batch (the pipeline's layout) whose rows have different tile and CE counts."""
    rs = np.random.RandomState(seed)
    B = len(TILES)
    ids = rs.randint(1, 60, size=(B, T)).astype(np.int32)
    labels = np.full((B, T), -100, np.int32)
    for i, (t, c) in enumerate(zip(TILES, CE)):
        ids[i, 2:2 + 4 * t] = 63  # 4 visual tokens per 56 px tile
        if c:
            ids[i, 12:12 + model.num_comp_slots] = model.emit_config.comp_token_id
        n = 2 + i % 3  # label counts differ per row: the global token mean matters
        labels[i, T - n:] = ids[i, T - n:]
    n_tiles = sum(TILES)
    pix = np.zeros((n_tiles + 2, 3, 56, 56), np.float32)  # padded tile stack, as collate pads
    pix[:n_tiles] = rs.randn(n_tiles, 3, 56, 56)
    ce = np.zeros((B, 2, 3, 56, 56), np.float32)
    ce[:sum(CE)] = rs.randn(sum(CE), 2, 3, 56, 56)
    return {"input_ids": ids, "labels": labels, "attention_mask": np.ones((B, T), np.int32),
            "pixel_values": pix, "num_tiles": np.int32(n_tiles), "ce_pixels": ce,
            "num_ce": np.int32(sum(CE)), "use_comp": np.array(CE),
            "row_tiles": np.array(TILES, np.int32)}


def test_split_rows_keeps_each_rows_tiles_and_ce_pair():
    b = collated(emit_model())
    parts = micro.split_rows(b, 3)
    assert parts["input_ids"].shape == (2, 3, 96)
    np.testing.assert_array_equal(parts["input_ids"][:, 1], b["input_ids"][2:4])
    # block 1 = rows 2, 3: tiles 0 + 1 (the 4th tile of the stack), one CE pair each
    np.testing.assert_array_equal(parts["pixel_values"][0, 1], b["pixel_values"][3])
    assert not parts["pixel_values"][1:, 1].any()
    np.testing.assert_array_equal(parts["num_ce"], [1, 2, 1])
    np.testing.assert_array_equal(parts["ce_pixels"][:2, 1], b["ce_pixels"][1:3])
    assert parts["label_mask"].sum() == (b["labels"][:, 1:] != -100).sum()
    with pytest.raises(ValueError, match="do not divide"):
        micro.split_rows(b, 4)
    assert micro.micro_count(64, 8) == 8 and micro.micro_count(64, 0) == 1
    with pytest.raises(ValueError, match="does not divide"):
        micro.micro_count(64, 6)


@pytest.mark.parametrize("m", [3, 6])
def test_sft_accumulated_loss_and_gradients_equal_the_one_shot_step(m):
    model = emit_model()
    b = collated(model)
    one = to_device(b)
    parts = micro_device_batch(b, m)

    @nnx.jit
    def one_shot(model, b):
        return nnx.value_and_grad(sft_loss, argnums=nnx.DiffState(0, STAGE1), has_aux=True)(model, b)

    @nnx.jit
    def accumulated(model, b):
        total = jnp.sum(b["label_mask"]).astype(jnp.float32)
        return micro.accumulate(model, STAGE1, b, lambda mm, mb: sft_loss(mm, mb, denominator=total))

    (loss1, (n1, c1)), g1 = one_shot(model, one)
    loss2, (n2, c2), g2 = accumulated(model, parts)
    np.testing.assert_allclose(float(loss2), float(loss1), rtol=1e-6)
    assert int(jnp.sum(n2)) == int(n1) and int(jnp.sum(c2)) == int(c1)
    f1, f2 = nnx.to_flat_state(g1), dict(nnx.to_flat_state(g2))
    assert len(f1) == len(f2) == 5  # soft prompt, BatchNorm scale / bias, conv kernel / bias
    for path, v in f1:
        a, b_ = np.asarray(v.get_value()), np.asarray(f2[path].get_value())
        assert np.abs(a).max() > 0
        # float32 summation in another order: within 1e-6 (absolute; relative for |g| > 1)
        np.testing.assert_allclose(b_, a, rtol=1e-6, atol=1e-6, err_msg=str(path))


def test_sft_step_with_micro_batches_updates_like_the_one_shot_step():
    """The jitted step (optimizer, non-finite guard) with 3 micro-batches of 2 rows."""
    b = collated(emit_model())
    results = []
    for m in (1, 3):
        model = emit_model()
        opt = make_train_state(model, OptimConfig(steps=2, lr=1e-3, warmup_ratio=0.0), STAGE1)
        step = make_train_step(STAGE1, micro_batches=m)
        batch = to_device(b) if m == 1 else micro_device_batch(b, m)
        out = [step(model, opt, batch) for _ in range(2)]
        assert all(bool(o[3]) for o in out)
        results.append((out, nnx.to_pure_dict(nnx.state(model, STAGE1))))
    (o1, p1), (o3, p3) = results
    for a, c in zip(o1, o3):
        np.testing.assert_allclose(float(c[0]), float(a[0]), rtol=1e-6)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-6),
                 p1, p3)


def grpo_setup(agg):
    """A LoRA policy over a small EMIT model, a prompt batch with its completions, and the
    jitted GRPO programs for 1 and more micro-batches."""
    import optax
    import qwix

    from emit_jax.training.lora import LORA_METHODS, lora_provider, trainable_filter

    ref = emit_model()
    ref.eval()
    b = collated(ref, T=64)
    lcfg = LoRAConfig(rank=4, alpha=16.0, dropout=0.0, targets=r".*(q_proj|v_proj|fc1|down_proj)")
    policy = qwix.apply_lora_to_model(ref, lora_provider(lcfg), jnp.asarray(b["input_ids"][:1]),
                                      jnp.asarray(b["pixel_values"]),
                                      jnp.asarray(b["attention_mask"][:1]), rngs=nnx.Rngs(1),
                                      methods=LORA_METHODS,
                                      ce_pixels=jnp.asarray(b["ce_pixels"]))
    # non-zero B factors, so the policy differs from the reference (KL and its gradient)
    lora = nnx.state(policy, nnx.LoRAParam)
    for path, v in nnx.to_flat_state(lora):
        if path[-1].endswith("_lora_b"):
            v.set_value(jnp.full(v.get_value().shape, 0.05, jnp.float32))
    nnx.update(policy, lora)
    policy.eval()
    rs = np.random.RandomState(3)
    B, N = len(TILES), 8
    toks = rs.randint(1, 60, size=(B, N)).astype(np.int32)
    lens = np.array([8, 3, 0, 5, 8, 1])
    cmask = (np.arange(N)[None] < lens[:, None]).astype(np.int32)
    adv = rs.randn(B).astype(np.float32)
    g = GRPOConfig(iterations=1, beta=0.04, eps_low=0.2, eps_high=0.2, kl="k3", agg=agg)
    wrt = trainable_filter()
    opt = nnx.Optimizer(policy, optax.sgd(1.0), wrt=wrt)  # the update is minus the gradient
    return ref, policy, opt, wrt, g, b, toks, cmask, adv


@pytest.mark.parametrize("agg", ["token_mean", "sequence_mean"])
def test_grpo_micro_batches_equal_the_one_shot_step(agg):
    from emit_jax.training.grpo import _step_inputs, make_grpo_fns

    outs = {}
    for m in (1, 3):
        ref, policy, opt, wrt, g, b, toks, cmask, adv = grpo_setup(agg)
        init = nnx.to_pure_dict(nnx.state(policy, wrt))
        score, train_step = make_grpo_fns(g, wrt, micro_batches=m)
        bb, ct, cm, ad = _step_inputs(b, toks, cmask, jnp.asarray(adv), m)
        r, o = score(policy, ref, bb, ct, cm)
        loss, metrics, ok = train_step(policy, opt, bb, ct, cm, ad, r, o)
        assert bool(ok)
        grads = jax.tree.map(lambda a, c: np.asarray(a) - np.asarray(c), init,
                             nnx.to_pure_dict(nnx.state(policy, wrt)))
        ref_lp = np.asarray(r if m == 1 else micro.rows(r))
        outs[m] = (float(loss), {k: float(v) for k, v in metrics.items()}, grads, ref_lp)
    loss1, met1, g1, r1 = outs[1]
    assert abs(loss1) > 1e-3 and met1["kl"] > 0
    for m in (3,):
        loss_m, met_m, g_m, r_m = outs[m]
        np.testing.assert_allclose(r_m, r1, atol=1e-6)
        assert_same_step((loss1, met1, g1), (loss_m, met_m, g_m), loss=(1e-6, 1e-7),
                         metrics=(1e-5, 1e-7), update=(1e-6, 1e-6))


def assert_same_step(want, got, *, loss, metrics, update):
    """Two GRPO steps ``(loss, metrics, parameter update)`` agree: the loss, each metric and
    every leaf of the update within its ``(rtol, atol)``; the update is not zero."""
    np.testing.assert_allclose(got[0], want[0], rtol=loss[0], atol=loss[1])
    for k in want[1]:
        np.testing.assert_allclose(got[1][k], want[1][k], rtol=metrics[0], atol=metrics[1],
                                   err_msg=k)
    flat_want = jax.tree_util.tree_leaves_with_path(want[2])
    flat_got = dict(jax.tree_util.tree_leaves_with_path(got[2]))
    assert max(np.abs(v).max() for _, v in flat_want) > 1e-4
    for path, v in flat_want:
        np.testing.assert_allclose(flat_got[path], v, rtol=update[0], atol=update[1],
                                   err_msg=str(path))


def test_batchnorm_in_train_mode_sees_each_micro_batch_in_turn():
    """With the heat-map BatchNorm on batch statistics (stage 1), each micro-batch is normalised
    with its own statistics and the running statistics move once per micro-batch, as in PyTorch
    with gradient accumulation: the accumulated loss is the sum of the micro-batch losses taken
    one after another on a copy of the model, and the statistics end where the copy's do."""
    model = emit_model()
    model.projector.bn.use_running_average = False
    b = collated(model)
    parts = micro_device_batch(b, 3)
    seq = nnx.clone(model)
    total = jnp.sum(parts["label_mask"]).astype(jnp.float32)
    want = 0.0
    for k in range(3):
        mb = {key: (v[k] if key == "num_ce" else v[:, k]) for key, v in parts.items()}
        want += float(sft_loss(seq, mb, denominator=total)[0])

    @nnx.jit
    def accumulated(model, b):
        return micro.accumulate(model, STAGE1, b, lambda mm, mb: sft_loss(mm, mb, denominator=total))

    loss, _, _ = accumulated(model, parts)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    for name in ("mean", "var"):
        got = np.asarray(getattr(model.projector.bn, name)[...])
        np.testing.assert_allclose(got, np.asarray(getattr(seq.projector.bn, name)[...]), rtol=1e-5)
        assert not np.allclose(got, np.asarray(getattr(emit_model().projector.bn, name)[...]))


def test_micro_batches_with_every_memory_switch():
    """Micro-batches under remat, query-chunked attention and ViT chunks (the 8B configs' set):
    the same loss and update as the plain one-shot step."""
    from emit_jax.models.memory import memory_options

    b = collated(emit_model())
    got = []
    for m, opts in ((1, {}), (3, dict(remat=True, attention_chunk=16, vit_chunk=2))):
        model = emit_model()
        opt = make_train_state(model, OptimConfig(steps=2, lr=1e-3, warmup_ratio=0.0), STAGE1)
        batch = to_device(b) if m == 1 else micro_device_batch(b, m)
        with memory_options(**opts):
            out = make_train_step(STAGE1, micro_batches=m)(model, opt, batch)
        assert bool(out[3])
        got.append((float(out[0]), nnx.to_pure_dict(nnx.state(model, STAGE1))))
    np.testing.assert_allclose(got[1][0], got[0][0], rtol=1e-6)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-6),
                 got[0][1], got[1][1])
