"""KV-cache decoding equals the full forward; greedy generation equals transformers' generate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from conftest import hf_config, make_hf_model, token_batch
from emit_jax import hf
from emit_jax.models import architectures
from emit_jax.models.internvl import InternVL
from emit_jax.ops.sampling import generate


def _small_model(tied=False, kv_heads=2):
    cfg = architectures.tiny().replace(tie_word_embeddings=tied)
    cfg = cfg.replace(text=cfg.text.__class__(**{**cfg.text.__dict__, "vocab_size": 512,
                                                  "num_key_value_heads": kv_heads}),
                      vision=cfg.vision.__class__(**{**cfg.vision.__dict__, "image_size": 56,
                                                     "num_hidden_layers": 2}),
                      image_token_id=511)
    return InternVL(cfg, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("tied", [False, True])
def test_prefill_then_token_by_token_equals_full_forward(tied):
    model = _small_model(tied=tied)
    ids, mask = token_batch(512, 511, (4, 4), length=20, pad=(0, 5))
    pix = jnp.asarray(np.random.RandomState(0).randn(2, 3, 56, 56), jnp.float32)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    full = model(ids, pix, mask)  # [B, T, V]
    prompt = 12  # covers the image tokens of both rows
    cache = model.init_cache(2, 24)
    out = model.forward(ids[:, :prompt], pix, mask[:, :prompt], cache=cache)
    logits = [out.logits]
    cache = out.cache
    for t in range(prompt, ids.shape[1]):
        out = model.forward(ids[:, t:t + 1], attention_mask=mask[:, t:t + 1], cache=cache)
        cache = out.cache
        logits.append(out.logits)
    stepwise = jnp.concatenate(logits, axis=1)
    real = np.asarray(mask, bool)
    err = np.abs(np.asarray(stepwise) - np.asarray(full))[real].max()
    assert err < 1e-4, err
    assert int(cache.end) == ids.shape[1]


def test_left_padding_does_not_change_outputs():
    """A left-padded row gives the same logits as the same tokens alone, unpadded."""
    model = _small_model()
    ids, mask = token_batch(512, 511, (0, 0), length=16, pad=(0, 5))
    batch = np.asarray(model(jnp.asarray(ids), None, jnp.asarray(mask)))
    alone = np.asarray(model(jnp.asarray(ids[1:, 5:])))
    np.testing.assert_allclose(batch[1, 5:], alone[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("tied,vit", [(False, "layer_norm"), (True, "rms_norm")])
def test_greedy_generation_matches_transformers(tied, vit, save_hf):
    cfg = hf_config(tied=tied, vit=vit, heads=4, kv_heads=2)
    model = make_hf_model(cfg, seed=11)
    jm = hf.load(save_hf(model))
    ids, mask = token_batch(cfg.text_config.vocab_size, cfg.image_token_id, (4, 8), length=18,
                            pad=(4, 0), seed=5)
    pix = np.random.RandomState(7).randn(3, 3, 56, 56).astype(np.float32)
    with torch.no_grad():
        ref = model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                             pixel_values=torch.tensor(pix), max_new_tokens=20, min_new_tokens=20,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    ref = ref[:, ids.shape[1]:].numpy()
    out = generate(jm, ids, mask, jnp.asarray(pix), max_new_tokens=20)
    assert ref.shape == (2, 20)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)
    assert np.all(np.asarray(out.lengths) == 20)
    # the returned log-probs are those of the full forward on the generated sequence
    full_ids = np.concatenate([ids, ref], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(ref)], axis=1)
    logits = jm(jnp.asarray(full_ids), jnp.asarray(pix), jnp.asarray(full_mask))
    logp = jax.nn.log_softmax(logits[:, ids.shape[1] - 1:-1], axis=-1)
    want = np.take_along_axis(np.asarray(logp), ref[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(np.asarray(out.logprobs), want, atol=1e-4)


def test_eos_stops_each_row_and_pads():
    model = _small_model()
    ids, mask = token_batch(512, 511, (0, 0), length=8, pad=(0, 2))
    greedy = generate(model, ids, mask, max_new_tokens=6)
    eos = int(greedy.tokens[0, 2])  # row 0 produces this token at step 2
    out = generate(model, ids, mask, max_new_tokens=6, eos_token_id=eos, pad_token_id=7)
    toks = np.asarray(out.tokens)
    first = int(np.argmax(np.asarray(greedy.tokens[0]) == eos))
    assert int(out.lengths[0]) == first + 1
    assert np.all(toks[0, first + 1:] == 7)
    assert np.all(np.asarray(out.logprobs)[0, first + 1:] == 0.0)


def test_min_new_tokens_bans_eos_early_only():
    """min_new_tokens (EMIT's MMAD evaluation: 1): EOS cannot come first, so greedy takes the
    runner-up; with min_new_tokens = max_new_tokens no EOS at all; 0 changes nothing."""
    model = _small_model()
    ids, mask = token_batch(512, 511, (0, 0), length=8, pad=(0, 2))
    greedy = generate(model, ids, mask, max_new_tokens=6)
    eos = int(greedy.tokens[0, 0])  # row 0's first greedy token, made the EOS
    plain = generate(model, ids, mask, max_new_tokens=6, eos_token_id=eos)
    assert int(plain.lengths[0]) == 1
    out = generate(model, ids, mask, max_new_tokens=6, eos_token_id=eos, min_new_tokens=1)
    toks = np.asarray(out.tokens)
    assert toks[0, 0] != eos
    # the runner-up of the same logits (prompt's last position)
    logits = np.array(model(jnp.asarray(ids), None, jnp.asarray(mask))[0, -1])
    logits[eos] = -np.inf
    assert toks[0, 0] == int(np.argmax(logits))
    many = generate(model, ids, mask, max_new_tokens=6, eos_token_id=eos, min_new_tokens=6)
    assert not np.any(np.asarray(many.tokens) == eos) and list(np.asarray(many.lengths)) == [6, 6]
    zero = generate(model, ids, mask, max_new_tokens=6, eos_token_id=eos, min_new_tokens=0)
    np.testing.assert_array_equal(np.asarray(zero.tokens), np.asarray(plain.tokens))
    with pytest.raises(ValueError, match="min_new_tokens"):
        generate(model, ids, mask, max_new_tokens=6, eos_token_id=eos, min_new_tokens=7)


def test_sampling_is_deterministic_per_key_and_respects_top_k():
    model = _small_model()
    ids, mask = token_batch(512, 511, (0, 0), length=8, pad=(0, 0))
    kw = dict(max_new_tokens=8, temperature=1.0, top_k=5, top_p=0.9)
    a = generate(model, ids, mask, rng=jax.random.key(1), **kw)
    b = generate(model, ids, mask, rng=jax.random.key(1), **kw)
    c = generate(model, ids, mask, rng=jax.random.key(2), **kw)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))
    # with top_k=1 sampling is greedy
    g = generate(model, ids, mask, max_new_tokens=8)
    k1 = generate(model, ids, mask, max_new_tokens=8, temperature=0.7, top_k=1,
                  rng=jax.random.key(3))
    np.testing.assert_array_equal(np.asarray(g.tokens), np.asarray(k1.tokens))


def _empirical(logits, n, **kw):
    """Frequencies of ``n`` draws of ``sampling._select`` from one row of ``logits``."""
    from emit_jax.ops import sampling

    keys = jax.random.split(jax.random.key(0), n)
    draw = jax.jit(jax.vmap(lambda k: sampling._select(logits[None], k, 1.0, **kw)[0][0]))
    tok = np.asarray(draw(keys))
    return np.bincount(tok, minlength=logits.shape[-1]) / n


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (4, 1.0), (0, 0.7), (5, 0.8)])
def test_sampling_draws_follow_the_filtered_softmax(top_k, top_p):
    """Inverse-CDF draws against the NumPy distribution top-k -> top-p -> softmax: every
    frequency within 4.5 binomial standard deviations, and no filtered token ever drawn."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=12).astype(np.float32) * 1.5
    logits[3] = -1e30  # a token with probability 0
    order = np.argsort(-logits, kind="stable")
    keep = np.ones(12, bool)
    if top_k:
        keep[order[top_k:]] = False
    z = np.where(keep, logits, -np.inf)
    p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    if top_p < 1.0:
        ps = p[order]
        kept = (np.cumsum(ps) - ps) < top_p
        keep[order[~kept]] = False
        z = np.where(keep, logits, -np.inf)
        p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    n = 20000
    freq = _empirical(jnp.asarray(logits), n, top_k=top_k, top_p=top_p)
    assert np.all(freq[~keep] == 0)
    sd = np.sqrt(p * (1 - p) / n)
    np.testing.assert_array_less(np.abs(freq - p), 4.5 * sd + 1e-9)
    assert keep.sum() >= 2  # the case really samples
