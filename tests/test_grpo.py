"""EMIT stage-2 GRPO math (docs/reference/emit.md §11.5-§11.7): every formula against an independent NumPy
implementation written from the spec's equations, gradients, the resampling driver with a
scripted sampler, and property tests."""

from __future__ import annotations

import itertools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emit_jax.rl import grpo as GR

FAST = settings(max_examples=150, deadline=None)
AGGS = ("token_mean", "sequence_mean", "sequence_mean_token_sum", "sequence_mean_token_scale")
KLS = ("k1", "k2", "k3")


# ------------------------------------------------------------------------------------------
# Independent NumPy references (float64, from the spec's equations)
# ------------------------------------------------------------------------------------------


def np_advantages(r, G, eps=1e-4, scale="std"):
    """§11.6: (R - mean) / (unbiased std + eps), per group of G consecutive samples."""
    r = np.asarray(r, np.float64).reshape(-1, G)
    out = r - r.mean(1, keepdims=True)
    if scale == "std":
        out = out / (r.std(1, ddof=1, keepdims=True) + eps)
    return out.reshape(-1)


def np_weights(correct, G, exception=True):
    """§11.6: w = 1 + n_wrong/G, 1 when the whole group is wrong (code)."""
    c = np.asarray(correct).reshape(-1, G)
    out = []
    for row in c:
        wrong = int(np.sum(~row.astype(bool)))
        w = 1.0 if (exception and wrong == G) else 1.0 + wrong / G
        out += [w] * G
    return np.array(out)


def np_kl(logp, ref, kind):
    if kind == "k1":
        return logp - ref
    if kind == "k2":
        return 0.5 * (logp - ref) ** 2
    return np.exp(ref - logp) - (ref - logp) - 1.0


def np_kl_grad(logp, ref, kind):
    """d KL / d logp."""
    if kind == "k1":
        return np.ones_like(logp)
    if kind == "k2":
        return logp - ref
    return 1.0 - np.exp(ref - logp)


def np_weight_matrix(mask, agg, max_tokens=None):
    """Per-token coefficients c such that loss = sum(c * l) (all aggregations are linear)."""
    m = np.asarray(mask, np.float64)
    B, T = m.shape
    if agg == "token_mean":
        return m / max(m.sum(), 1.0)
    if agg == "sequence_mean":
        return m / np.maximum(m.sum(1, keepdims=True), 1.0) / B
    if agg == "sequence_mean_token_sum":
        return m / B
    return m / (B * (T if max_tokens is None else max_tokens))


def np_loss(logp, old, ref, adv, mask, eps_low, eps_high, beta, kl, agg):
    """§11.7 token loss -min(rho A, clip(rho) A) + beta KL, then the aggregation."""
    logp = np.asarray(logp, np.float64)
    old = logp if old is None else np.asarray(old, np.float64)
    A = np.asarray(adv, np.float64)[:, None]
    rho = np.exp(logp - old)
    l = -np.minimum(rho * A, np.clip(rho, 1 - eps_low, 1 + eps_high) * A)
    if ref is not None:
        l = l + beta * np_kl(logp, np.asarray(ref, np.float64), kl)
    return float(np.sum(np_weight_matrix(mask, agg) * l))


def np_loss_grad(logp, old, ref, adv, mask, eps_low, eps_high, beta, kl, agg):
    """Analytic d loss / d logp: the surrogate contributes -A rho where the unclipped term is the
    min (or rho is inside the clip range), 0 where the clipped constant is the min."""
    logp = np.asarray(logp, np.float64)
    old = logp if old is None else np.asarray(old, np.float64)
    A = np.asarray(adv, np.float64)[:, None]
    rho = np.exp(logp - old)
    unclipped_min = (rho * A) <= (np.clip(rho, 1 - eps_low, 1 + eps_high) * A)
    g = np.where(unclipped_min, -A * rho, 0.0)
    if ref is not None:
        g = g + beta * np_kl_grad(logp, np.asarray(ref, np.float64), kl)
    return np_weight_matrix(mask, agg) * g


def random_batch(seed, B=5, T=7, spread=0.5, empty_row=True):
    rs = np.random.RandomState(seed)
    logp = -rs.uniform(0.05, 4.0, (B, T)).astype(np.float32)
    old = (logp + rs.normal(0, spread, (B, T))).astype(np.float32)
    ref = (logp + rs.normal(0, spread, (B, T))).astype(np.float32)
    adv = rs.normal(0, 1.5, B).astype(np.float32)
    lens = rs.randint(1, T + 1, B)
    if empty_row:
        lens[-1] = 0  # a fully padded row
    mask = (np.arange(T)[None] < lens[:, None]).astype(np.float32)
    return logp, old, ref, adv, mask


# ------------------------------------------------------------------------------------------
# §11.6 advantages and difficulty weights
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("G", [2, 3, 4, 8])
@pytest.mark.parametrize("scale", ["std", "none"])
def test_group_advantages_match_numpy(G, scale):
    rs = np.random.RandomState(G)
    r = rs.uniform(-5, 5, 4 * G).astype(np.float32)
    got = np.asarray(GR.group_advantages(jnp.asarray(r), G, scale=scale))
    np.testing.assert_allclose(got, np_advantages(r, G, scale=scale), rtol=1e-5, atol=1e-5)
    assert got.dtype == np.float32


def test_group_advantages_match_torch_std():
    """TRL 0.17: rewards.view(-1, G).std(dim=1) is torch's unbiased std; eps added to it."""
    torch = pytest.importorskip("torch")
    r = np.random.RandomState(1).uniform(-5, 5, 24).astype(np.float32)
    t = torch.tensor(r).view(-1, 8)
    ref = ((t - t.mean(1, keepdim=True)) / (t.std(1, keepdim=True) + 1e-4)).reshape(-1).numpy()
    np.testing.assert_allclose(np.asarray(GR.group_advantages(r, 8)), ref, rtol=1e-5, atol=1e-5)


def test_spec_worked_example():
    """§11.6: one correct answer with R = 4.9 and seven wrong with R = 0.6."""
    r = np.array([4.9] + [0.6] * 7, np.float32)
    correct = np.array([True] + [False] * 7)
    a_hat = np.asarray(GR.group_advantages(r, 8))
    np.testing.assert_allclose(a_hat[[0, 1]], [2.4747, -0.3535], atol=1e-4)
    w = np.asarray(GR.difficulty_weights(correct, 8))
    np.testing.assert_allclose(w, 1.875)
    a = np.asarray(GR.compute_advantages(r, correct, 8))
    np.testing.assert_allclose(a[[0, 1]], [4.6401, -0.6629], atol=1e-4)
    np.testing.assert_allclose(r.std(ddof=1), 1.5203, atol=1e-4)


def test_equal_rewards_zero_advantage_and_group_of_one():
    r = np.array([0.1] * 3 + [2.0, 2.0, 2.0] + [-5.0] * 3, np.float32)
    assert np.all(np.asarray(GR.group_advantages(r, 3)) == 0.0)
    # G = 1: torch's unbiased std is NaN; here sigma = 0 and the advantage is 0
    a1 = np.asarray(GR.group_advantages(np.array([1.0, -3.0], np.float32), 1))
    assert np.all(a1 == 0.0)


def test_difficulty_weights_hand_examples():
    """G = 4 with 0, 1, 2, 3, 4 incorrect answers."""
    groups = [[1, 1, 1, 1], [1, 1, 1, 0], [1, 0, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    correct = np.array(groups, bool).reshape(-1)
    w = np.asarray(GR.difficulty_weights(correct, 4)).reshape(5, 4)
    np.testing.assert_allclose(w[:, 0], [1.0, 1.25, 1.5, 1.75, 1.0])  # all wrong: w = 1 (code)
    assert np.all(w == w[:, :1])  # same weight for the whole group
    w_paper = np.asarray(GR.difficulty_weights(correct, 4, all_wrong_exception=False))
    np.testing.assert_allclose(w_paper.reshape(5, 4)[:, 0], [1.0, 1.25, 1.5, 1.75, 2.0])
    # accuracy rewards: invalid (-1) and wrong (0) both count as incorrect
    acc = np.array([1, -1, 0, -1], np.float32)
    np.testing.assert_allclose(np.asarray(GR.difficulty_weights(acc, 4)), 1.75)


@pytest.mark.parametrize("G", [2, 4, 8])
@pytest.mark.parametrize("exception", [True, False])
def test_difficulty_matches_numpy(G, exception):
    rs = np.random.RandomState(G)
    correct = rs.rand(6 * G) < 0.3
    correct[:G] = False  # an all-wrong group
    correct[G:2 * G] = True  # an all-correct group
    adv = rs.normal(size=6 * G).astype(np.float32)
    w = np_weights(correct, G, exception)
    np.testing.assert_allclose(GR.difficulty_weights(correct, G, all_wrong_exception=exception),
                               w, rtol=1e-6)
    np.testing.assert_allclose(
        GR.apply_difficulty(adv, correct, G, all_wrong_exception=exception), adv * w, rtol=1e-6)
    # plain GRPO: reweighting switched off is the identity
    np.testing.assert_array_equal(GR.apply_difficulty(adv, correct, G, enabled=False), adv)


def test_plain_grpo_is_a_flag():
    rs = np.random.RandomState(0)
    r = rs.uniform(-5, 5, 16).astype(np.float32)
    correct = rs.rand(16) < 0.5
    plain = GR.compute_advantages(r, correct, 8, reweight=False)
    np.testing.assert_array_equal(plain, GR.group_advantages(r, 8))
    emit = GR.compute_advantages(r, correct, 8)
    np.testing.assert_allclose(emit, np_advantages(r, 8) * np_weights(correct, 8), rtol=1e-5,
                               atol=1e-6)


def test_advantages_jit_and_errors():
    f = jax.jit(GR.compute_advantages, static_argnames=("G", "reweight", "scale"))
    r = jnp.arange(8.0)
    c = jnp.array([True, False] * 4)
    np.testing.assert_allclose(f(r, c, G=4), GR.compute_advantages(r, c, 4), rtol=1e-6)
    with pytest.raises(ValueError):
        GR.group_advantages(jnp.arange(6.0), 4)
    with pytest.raises(ValueError):
        GR.group_advantages(jnp.arange(8.0), 4, scale="mad")


_adv_jit = jax.jit(GR.group_advantages, static_argnums=1)
_difficulty_jit = jax.jit(GR.apply_difficulty, static_argnums=2)

_reward = st.one_of(st.floats(-1e4, 1e4, width=32),
                    st.sampled_from([-5.0, -1.0, 0.0, 0.6, 4.9, 5.0]))


@FAST
@given(G=st.sampled_from([1, 2, 3, 4, 8]), n_groups=st.integers(1, 4), data=st.data())
def test_property_advantages_sum_to_zero_and_finite(G, n_groups, data):
    kind = data.draw(st.sampled_from(["random", "equal", "two_values"]))
    if kind == "random":
        r = data.draw(st.lists(_reward, min_size=G * n_groups, max_size=G * n_groups))
    elif kind == "equal":
        r = [data.draw(_reward)] * (G * n_groups)
    else:
        a, b = data.draw(_reward), data.draw(_reward)
        r = data.draw(st.lists(st.sampled_from([a, b]), min_size=G * n_groups,
                               max_size=G * n_groups))
    r = np.asarray(r, np.float32)
    correct = np.asarray(data.draw(st.lists(st.booleans(), min_size=G * n_groups,
                                            max_size=G * n_groups)))
    a = np.asarray(_adv_jit(r, G)).reshape(-1, G)
    assert np.all(np.isfinite(a))
    np.testing.assert_allclose(a.sum(1), 0.0, atol=1e-3)
    # |z| <= (G-1)/sqrt(G) for the unbiased-std z-score
    assert np.all(np.abs(a) <= (G - 1) / np.sqrt(G) + 1e-3)
    equal = np.all(r.reshape(-1, G) == r.reshape(-1, G)[:, :1], axis=1)
    assert np.all(a[equal] == 0.0)
    w = np.asarray(_difficulty_jit(a.reshape(-1), correct, G)).reshape(-1, G)
    assert np.all(np.isfinite(w))
    np.testing.assert_allclose(w.sum(1), 0.0, atol=2e-3)


# ------------------------------------------------------------------------------------------
# §11.7 loss
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("kl", KLS)
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_matches_numpy(agg, kl, beta):
    # a seed fixed per case: hash() of strings changes with every process (PYTHONHASHSEED), and
    # some draws exercised no clipping, which the last assertion requires
    logp, old, ref, adv, mask = random_batch(zlib.crc32(f"{agg}-{kl}".encode()) % 1000)
    eps_low, eps_high = 0.1, 0.28  # asymmetric (DAPO clip-higher)
    loss, m = GR.grpo_loss(logp, old, ref, adv, mask, eps_low=eps_low, eps_high=eps_high,
                           beta=beta, kl=kl, agg=agg)
    want = np_loss(logp, old, ref, adv, mask, eps_low, eps_high, beta, kl, agg)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-6)
    # metrics
    mb = mask > 0
    rho = np.exp(logp.astype(np.float64) - old)
    A = adv[:, None] * np.ones_like(rho)
    np.testing.assert_allclose(float(m["kl"]), np_kl(logp.astype(np.float64), ref, kl)[mb].mean(),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(m["ratio_mean"]), rho[mb].mean(), rtol=1e-5)
    clipped = np.clip(rho, 1 - eps_low, 1 + eps_high)
    np.testing.assert_allclose(float(m["clip_frac"]), (rho * A > clipped * A)[mb].mean(),
                               atol=1e-6)
    np.testing.assert_allclose(float(m["clip_frac_low"]),
                               ((rho < 1 - eps_low) & (A < 0))[mb].mean(), atol=1e-6)
    np.testing.assert_allclose(float(m["clip_frac_high"]),
                               ((rho > 1 + eps_high) & (A > 0))[mb].mean(), atol=1e-6)
    assert 0 < float(m["clip_frac"]) < 1  # the test data exercises clipping
    np.testing.assert_allclose(float(m["pg_loss"]),
                               np_loss(logp, old, None, adv, mask, eps_low, eps_high, 0, kl, agg),
                               rtol=1e-5, atol=1e-6)
    assert float(m["tokens"]) == mask.sum()


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("kl", KLS)
@pytest.mark.parametrize("with_old", [True, False])
def test_loss_gradient_matches_analytic(agg, kl, with_old):
    logp, old, ref, adv, mask = random_batch(7 + len(agg) + len(kl))
    old_arg = old if with_old else None
    kw = dict(eps_low=0.15, eps_high=0.3, beta=0.05, kl=kl, agg=agg)
    g = jax.grad(lambda lp: GR.grpo_loss(lp, old_arg, ref, adv, mask, **kw)[0])(jnp.asarray(logp))
    want = np_loss_grad(logp, old_arg, ref, adv, mask, 0.15, 0.3, 0.05, kl, agg)
    np.testing.assert_allclose(np.asarray(g), want, rtol=1e-4, atol=1e-6)
    assert np.all(np.asarray(g)[mask == 0] == 0)


def test_loss_gradient_finite_differences():
    logp, old, ref, adv, mask = random_batch(3, B=4, T=5, empty_row=False)
    kw = dict(eps_low=0.2, eps_high=0.28, beta=0.04, kl="k3", agg="token_mean")
    f = lambda lp: GR.grpo_loss(lp, old, ref, adv, mask, **kw)[0]  # noqa: E731
    g = np.asarray(jax.grad(f)(jnp.asarray(logp)))
    h = 1e-2
    args = (old, ref, adv, mask, 0.2, 0.28, 0.04, "k3", "token_mean")
    checked = 0
    for b, t in itertools.product(range(4), range(5)):
        if not mask[b, t]:
            continue
        rho = np.exp(logp[b, t] - old[b, t])
        lo, hi = 1 - kw["eps_low"], 1 + kw["eps_high"]
        if min(abs(rho * np.exp(-h) - lo), abs(rho * np.exp(h) - lo),
               abs(rho * np.exp(-h) - hi), abs(rho * np.exp(h) - hi)) < 2 * h * rho:
            continue  # a kink of the clip inside the stencil
        e = np.zeros_like(logp)
        e[b, t] = h
        fd = (np_loss(logp + e, *args) - np_loss(logp - e, *args)) / (2 * h)
        np.testing.assert_allclose(g[b, t], fd, rtol=2e-3, atol=1e-5)
        checked += 1
    assert checked >= 6


def test_mu_equals_one():
    """num_iterations = 1 (§11.7): old = stop_gradient(logp), ratio 1, no clipping, gradient
    -A / len per token (sequence mean), loss = -mean(A) + beta * KL."""
    logp, _, ref, adv, mask = random_batch(11, empty_row=False)
    loss, m = GR.grpo_loss(logp, None, ref, adv, mask, beta=0.0)
    np.testing.assert_allclose(float(loss), -adv.mean(), rtol=1e-5)
    assert float(m["ratio_mean"]) == 1.0 and float(m["clip_frac"]) == 0.0
    g = jax.grad(lambda lp: GR.grpo_loss(lp, None, ref, adv, mask, beta=0.0)[0])(jnp.asarray(logp))
    want = -adv[:, None] * mask / mask.sum(1, keepdims=True) / len(adv)
    np.testing.assert_allclose(np.asarray(g), want, rtol=1e-5, atol=1e-7)
    # the same as passing old = logp explicitly (value and gradient)
    loss2 = GR.grpo_loss(logp, logp, ref, adv, mask)[0]
    np.testing.assert_allclose(float(GR.grpo_loss(logp, None, ref, adv, mask)[0]), float(loss2),
                               rtol=1e-6)


def test_defaults_are_the_script_values():
    assert (GR.EPS_LOW, GR.EPS_HIGH, GR.BETA, GR.KL_ESTIMATOR, GR.LOSS_AGG) == (
        0.2, 0.2, 5e-3, "k3", "sequence_mean")
    assert GR.ADV_EPS == 1e-4 and GR.MAX_RESAMPLE_TIMES == 3
    logp, old, ref, adv, mask = random_batch(5)
    loss = GR.grpo_loss(logp, old, ref, adv, mask)[0]
    np.testing.assert_allclose(float(loss), np_loss(logp, old, ref, adv, mask, 0.2, 0.2, 5e-3,
                                                    "k3", "sequence_mean"), rtol=1e-5)


def test_aliases_and_errors():
    logp, old, ref, adv, mask = random_batch(2)
    for alias, name in [("grpo", "sequence_mean"), ("bnpo", "token_mean"),
                        ("dr_grpo", "sequence_mean_token_scale"),
                        ("seq-mean-token-sum", "sequence_mean_token_sum")]:
        a = GR.grpo_loss(logp, old, ref, adv, mask, agg=alias)[0]
        b = GR.grpo_loss(logp, old, ref, adv, mask, agg=name)[0]
        assert float(a) == float(b)
    assert float(GR.grpo_loss(logp, old, ref, adv, mask, kl="low_var_kl")[0]) == \
        float(GR.grpo_loss(logp, old, ref, adv, mask, kl="k3")[0])
    with pytest.raises(ValueError):
        GR.grpo_loss(logp, old, ref, adv, mask, agg="sum")
    with pytest.raises(ValueError):
        GR.grpo_loss(logp, old, ref, adv, mask, kl="k4")
    with pytest.raises(ValueError):
        GR.grpo_loss(logp, old, None, adv, mask, beta=0.04)
    loss, m = GR.grpo_loss(logp, old, None, adv, mask, beta=0.0)  # no reference: no KL
    assert float(m["kl"]) == 0.0
    np.testing.assert_allclose(float(loss), float(m["pg_loss"]))


def test_dr_grpo_max_tokens():
    """Dr. GRPO: sum of token losses / (B * max_completion_length)."""
    logp, old, ref, adv, mask = random_batch(4)
    got = GR.grpo_loss(logp, old, ref, adv, mask, agg="dr_grpo", max_tokens=512)[0]
    want = np_loss(logp, old, ref, adv, mask, 0.2, 0.2, 5e-3, "k3", "sequence_mean_token_scale")
    np.testing.assert_allclose(float(got), want * logp.shape[1] / 512, rtol=1e-5)


@pytest.mark.parametrize("agg", ["token_mean", "sequence_mean", "sequence_mean_token_sum"])
def test_global_denominator_over_micro_batches(agg):
    """Summing micro-batch losses with the global normaliser gives the full-batch loss."""
    logp, old, ref, adv, mask = random_batch(9, B=8)
    full = float(GR.grpo_loss(logp, old, ref, adv, mask, agg=agg)[0])
    den = mask.sum() if agg == "token_mean" else 8
    parts = [float(GR.grpo_loss(logp[s], old[s], ref[s], adv[s], mask[s], agg=agg,
                                denominator=den)[0]) for s in (slice(0, 3), slice(3, 8))]
    np.testing.assert_allclose(sum(parts), full, rtol=1e-5)


def test_loss_finite_for_extreme_logprobs():
    B, T = 4, 6
    mask = np.ones((B, T), np.float32)
    mask[1, 3:] = 0
    mask[3] = 0
    logp = np.full((B, T), -1e4, np.float32)
    logp[0] = -1e-12
    logp[2] = -80.0
    old = np.zeros((B, T), np.float32)
    old[2] = -1e4  # huge positive log-ratio
    ref = np.full((B, T), -1e4, np.float32)
    ref[0] = -3e4
    ref[1] = 0.0  # exp(ref - logp) = exp(1e4)
    adv = np.array([3.0, -2.0, -5.0, 0.0], np.float32)
    # padding holds -inf / NaN: ignored
    logp_pad = logp.copy()
    logp_pad[mask == 0] = -np.inf
    old_pad = old.copy()
    old_pad[mask == 0] = np.nan
    for kl, agg in itertools.product(KLS, AGGS):
        f = lambda lp: GR.grpo_loss(lp, old_pad, ref, adv, mask, beta=0.04, kl=kl,  # noqa: E731
                                    agg=agg, eps_low=0.2, eps_high=0.28)
        (loss, m), g = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logp_pad))
        assert np.isfinite(float(loss)), (kl, agg)
        assert all(np.isfinite(float(v)) for v in m.values()), (kl, agg, m)
        assert np.all(np.isfinite(np.asarray(g))), (kl, agg)
        clean = GR.grpo_loss(logp, old, ref, adv, mask, beta=0.04, kl=kl, agg=agg,
                             eps_low=0.2, eps_high=0.28)[0]
        assert float(loss) == float(clean)
    # μ = 1 with extreme values
    loss, _ = GR.grpo_loss(logp_pad, None, ref, adv, mask)
    assert np.isfinite(float(loss))


@FAST
@given(seed=st.integers(0, 10_000), scale=st.sampled_from([1.0, 30.0, 1e3]),
       kl=st.sampled_from(KLS), agg=st.sampled_from(AGGS))
def test_property_loss_finite(seed, scale, kl, agg):
    rs = np.random.RandomState(seed)
    B, T = 3, 5
    logp = (-np.abs(rs.normal(0, scale, (B, T)))).astype(np.float32)
    old = (-np.abs(rs.normal(0, scale, (B, T)))).astype(np.float32)
    ref = (-np.abs(rs.normal(0, scale, (B, T)))).astype(np.float32)
    adv = rs.normal(0, 3, B).astype(np.float32)
    mask = (rs.rand(B, T) < 0.7).astype(np.float32)
    loss, m = GR.grpo_loss(logp, old, ref, adv, mask, beta=0.04, kl=kl, agg=agg)
    assert np.isfinite(float(loss)) and all(np.isfinite(float(v)) for v in m.values())


def test_loss_jit():
    logp, old, ref, adv, mask = random_batch(6)
    f = jax.jit(GR.grpo_loss, static_argnames=("kl", "agg", "eps_low", "eps_high", "beta"))
    a, _ = f(logp, old, ref, adv, mask, kl="k2", agg="token_mean")
    b, _ = GR.grpo_loss(logp, old, ref, adv, mask, kl="k2", agg="token_mean")
    np.testing.assert_allclose(float(a), float(b), rtol=1e-6)
    # old_logp None / ref None inside jit
    c, _ = jax.jit(lambda lp: GR.grpo_loss(lp, None, None, adv, mask, beta=0.0))(logp)
    assert np.isfinite(float(c))


# ------------------------------------------------------------------------------------------
# log-probs and entropy
# ------------------------------------------------------------------------------------------


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_match_numpy(temperature):
    rs = np.random.RandomState(0)
    logits = (rs.normal(0, 3, (2, 5, 11))).astype(np.float32)
    tg = rs.randint(0, 11, (2, 5))
    got = np.asarray(GR.token_logprobs(jnp.asarray(logits), jnp.asarray(tg),
                                       temperature=temperature))
    want = np.take_along_axis(np_log_softmax(logits / temperature), tg[..., None], -1)[..., 0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert got.dtype == np.float32
    # bf16 logits -> float32 log-probs
    bf = GR.token_logprobs(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(tg))
    assert bf.dtype == jnp.float32


def test_token_logprobs_chunked_equals_dense():
    rs = np.random.RandomState(1)
    logits = jnp.asarray(rs.normal(0, 2, (2, 7, 13)).astype(np.float32))
    tg = jnp.asarray(rs.randint(0, 13, (2, 7)))
    w = jnp.asarray(rs.normal(size=(2, 7)).astype(np.float32))
    dense = GR.token_logprobs(logits, tg)
    gd = jax.grad(lambda x: jnp.sum(w * GR.token_logprobs(x, tg)))(logits)
    for c in (2, 3):  # 2: 4 chunks (1 padded step); 3: 3 chunks (2 padded)
        f = jax.jit(jax.value_and_grad(
            lambda x: jnp.sum(w * GR.token_logprobs(x, tg, chunk_size=c))))
        np.testing.assert_allclose(GR.token_logprobs(logits, tg, chunk_size=c), dense,
                                   rtol=1e-6, atol=1e-6)
        v, gc = f(logits)
        np.testing.assert_allclose(v, jnp.sum(w * dense), rtol=1e-6)
        np.testing.assert_allclose(gc, gd, rtol=1e-5, atol=1e-6)


def test_entropy():
    rs = np.random.RandomState(2)
    logits = rs.normal(0, 2, (2, 4, 9)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], np.float32)
    ls = np_log_softmax(logits)
    h = -(np.exp(ls) * ls).sum(-1)
    np.testing.assert_allclose(GR.token_entropy(jnp.asarray(logits)), h, rtol=1e-5)
    np.testing.assert_allclose(float(GR.entropy(jnp.asarray(logits), mask)),
                               h[mask > 0].mean(), rtol=1e-5)
    np.testing.assert_allclose(float(GR.entropy(jnp.zeros((1, 2, 16)), np.ones((1, 2)))),
                               np.log(16), rtol=1e-6)
    assert float(GR.entropy(jnp.asarray(logits), np.zeros((2, 4)))) == 0.0


def test_kl_estimators_by_hand():
    lp = jnp.array([[-1.0, -2.0]])
    ref = jnp.array([[-1.5, -1.0]])
    np.testing.assert_allclose(GR.kl_divergence(lp, ref, "k1"), [[0.5, -1.0]])
    np.testing.assert_allclose(GR.kl_divergence(lp, ref, "k2"), [[0.125, 0.5]])
    np.testing.assert_allclose(GR.kl_divergence(lp, ref, "k3"),
                               [[np.exp(-0.5) + 0.5 - 1, np.exp(1.0) - 1.0 - 1]], rtol=1e-6)
    assert float(GR.kl_divergence(lp, lp, "k3").sum()) == 0.0


# ------------------------------------------------------------------------------------------
# §11.5 resampling driver
# ------------------------------------------------------------------------------------------


class ScriptedSampler:
    """generate_fn for tests: prompt i becomes correct from round ``first_correct[i]`` on (None:
    never). Completion objects are (prompt, round, j) tuples; completion j = 0 of a correct round
    is the correct one. Records every call."""

    def __init__(self, first_correct, G):
        self.first_correct, self.G = first_correct, G
        self.calls = []
        self.round_of = {}

    def __call__(self, indices):
        self.calls.append(list(indices))
        out = []
        for i in indices:
            r = self.round_of.get(i, -1) + 1
            self.round_of[i] = r
            out.append([(i, r, j) for j in range(self.G)])
        return out

    def is_correct(self, prompt, completion):
        i, r, j = completion
        assert prompt == f"p{i}"
        fc = self.first_correct[i]
        return fc is not None and r >= fc and j == 0


PROMPTS = ["p0", "p1", "p2", "p3"]
# p0 correct at once, p1 at round 2, p2 never, p3 at round 1
SCRIPT = [0, 2, None, 1]


def test_resample_keep():
    s = ScriptedSampler(SCRIPT, G=2)
    res = GR.resample_groups(s, PROMPTS, 2, s.is_correct, max_resample_times=3)
    assert s.calls == [[0, 1, 2, 3], [1, 2, 3], [1, 2], [2]]
    assert res.rounds == [0, 2, 3, 1]
    assert res.valid == [True, True, False, True]
    assert res.prompt_indices == [0, 1, 2, 3]
    # final generation of each group; old responses discarded
    assert res.completions == [[(0, 0, 0), (0, 0, 1)], [(1, 2, 0), (1, 2, 1)],
                               [(2, 3, 0), (2, 3, 1)], [(3, 1, 0), (3, 1, 1)]]
    assert res.correct == [[True, False], [True, False], [False, False], [True, False]]
    assert (res.groups_resampled, res.groups_recovered, res.groups_without_correct) == (3, 2, 1)
    assert (res.groups_dropped, res.groups_duplicated, res.generated_groups, res.rounds_made) == \
        (0, 0, 10, 3)
    assert not res.all_failed
    assert len(res.flat_completions()) == 8 and res.flat_correct()[0] is True
    assert res.counts()["groups_without_correct"] == 1


def test_resample_drop_tiles_like_the_official_code():
    s = ScriptedSampler(SCRIPT, G=2)
    res = GR.resample_groups(s, PROMPTS, 2, s.is_correct, max_resample_times=3, on_failure="drop")
    # valid lists in append order: [p0 (first pass), p3 (round 1), p1 (round 2)], tiled,
    # the last 4 kept
    assert res.prompt_indices == [1, 0, 3, 1]
    assert [g[0][0] for g in res.completions] == [1, 0, 3, 1]
    assert all(any(c) for c in res.correct)
    assert (res.groups_dropped, res.groups_duplicated, res.groups_without_correct) == (1, 1, 1)
    assert res.rounds == [0, 2, 3, 1]


def test_tile_groups_spec_example():
    g = [f"g{i}" for i in range(5)]
    assert GR.tile_groups(g, 8) == ["g2", "g3", "g4", "g0", "g1", "g2", "g3", "g4"]
    assert GR.tile_groups(g, 5) == g
    assert GR.tile_groups(["a"], 3) == ["a", "a", "a"]
    assert GR.tile_groups(["a", "b", "c"], 2) == ["b", "c"]
    with pytest.raises(ValueError):
        GR.tile_groups([], 8)


def test_resample_respects_max_resample_times():
    for M in range(0, 5):
        s = ScriptedSampler([None, None], G=3)
        res = GR.resample_groups(s, ["p0", "p1"], 3, s.is_correct, max_resample_times=M)
        assert len(s.calls) == 1 + M
        assert res.rounds == [M, M] and res.rounds_made == M
        assert res.groups_without_correct == 2
        assert res.groups_resampled == (2 if M else 0)


def test_resample_official_wasted_round():
    """score_last_round=False: the official effective M - 1 useful rounds (§11.5 [BUG])."""
    s = ScriptedSampler(SCRIPT, G=2)
    res = GR.resample_groups(s, PROMPTS, 2, s.is_correct, max_resample_times=3,
                             score_last_round=False)
    assert s.calls == [[0, 1, 2, 3], [1, 2, 3], [1, 2]]
    assert res.rounds == [0, 2, 2, 1] and res.groups_without_correct == 1
    # M = 3 scores 3 rounds: a group first correct at round 3 is recovered only then
    s = ScriptedSampler([3], G=2)
    assert GR.resample_groups(s, ["p0"], 2, s.is_correct).valid == [True]
    s = ScriptedSampler([3], G=2)
    assert GR.resample_groups(s, ["p0"], 2, s.is_correct, score_last_round=False).valid == [False]


def test_resample_disabled_is_plain_grpo():
    s = ScriptedSampler(SCRIPT, G=2)
    res = GR.resample_groups(s, PROMPTS, 2, s.is_correct, enabled=False)
    assert s.calls == [[0, 1, 2, 3]]
    assert res.rounds == [0, 0, 0, 0] and res.groups_without_correct == 3
    assert res.groups_resampled == 0
    assert [g[0][1] for g in res.completions] == [0, 0, 0, 0]


def test_resample_all_failed_does_not_crash():
    for mode in ("keep", "drop"):
        s = ScriptedSampler([None, None, None], G=2)
        res = GR.resample_groups(s, ["p0", "p1", "p2"], 2, s.is_correct, max_resample_times=2,
                                 on_failure=mode)
        assert res.all_failed and res.groups_without_correct == 3
        assert res.prompt_indices == [0, 1, 2]  # original batch kept (last generations)
        assert [g[0][1] for g in res.completions] == [2, 2, 2]
        assert res.groups_dropped == 0


def test_resample_stops_early_and_initial_and_round_argument():
    s = ScriptedSampler([0, 1], G=2)
    res = GR.resample_groups(s, ["p0", "p1"], 2, s.is_correct, max_resample_times=5)
    assert s.calls == [[0, 1], [1]] and res.rounds_made == 1
    # the first generation supplied by the caller
    s = ScriptedSampler([0, 1], G=2)
    initial = [[(0, 0, 0), (0, 0, 1)], [(1, 0, 0), (1, 0, 1)]]
    s.round_of = {0: 0, 1: 0}
    res = GR.resample_groups(s, ["p0", "p1"], 2, s.is_correct, initial=initial)
    assert s.calls == [[1]] and res.valid == [True, True] and res.generated_groups == 1
    # pass_round: generate_fn(indices, round)
    seen = []

    def gen(indices, round_):
        seen.append((list(indices), round_))
        return [[round_ >= 2] * 2 for _ in indices]

    res = GR.resample_groups(gen, ["a"], 2, lambda p, c: c, pass_round=True)
    assert seen == [([0], 0), ([0], 1), ([0], 2)] and res.rounds == [2]


def test_resample_accuracy_rewards_and_errors():
    # is_correct_fn may return the accuracy reward: -1 invalid and 0 wrong are not correct
    res = GR.resample_groups(lambda idx: [[-1, 0] for _ in idx], ["a"], 2, lambda p, c: c,
                             max_resample_times=1)
    assert res.valid == [False] and res.correct == [[False, False]]
    res = GR.resample_groups(lambda idx: [[1.0, 0] for _ in idx], ["a"], 2, lambda p, c: c)
    assert res.valid == [True]
    with pytest.raises(ValueError):
        GR.resample_groups(lambda idx: [[1] for _ in idx], ["a"], 2, lambda p, c: c)
    with pytest.raises(ValueError):
        GR.resample_groups(lambda idx: [], ["a"], 2, lambda p, c: c)
    with pytest.raises(ValueError):
        GR.resample_groups(lambda idx: [[1, 1]], ["a"], 2, lambda p, c: c, on_failure="skip")


def test_resample_then_advantages_end_to_end():
    """Kept failing group: all-wrong weight 1, equal rewards -> zero advantages."""
    s = ScriptedSampler(SCRIPT, G=2)
    res = GR.resample_groups(s, PROMPTS, 2, s.is_correct)
    correct = np.array(res.flat_correct())
    rewards = np.where(correct, 4.0, 0.5).astype(np.float32)
    adv = np.asarray(GR.compute_advantages(rewards, correct, 2)).reshape(4, 2)
    assert np.all(adv[2] == 0.0)
    np.testing.assert_allclose(adv[0], np_advantages(rewards[:2], 2) * 1.5, rtol=1e-5)


def test_advantage_mass_moves_to_hard_groups_with_the_difficulty_weights():
    """``advantage_mass`` against NumPy: five groups of G = 4 with 0..4 correct (reward = the
    accuracy), advantages ``(r - mean) / (unbiased std + eps)``; plain GRPO's mass is symmetric
    in k <-> G - k, the difficulty weights (1.75, 1.5, 1.25 for k = 1, 2, 3) move it to the hard
    groups (k = 1, 2)."""
    from emit_jax.rl.grpo import ADV_EPS, advantage_mass, compute_advantages

    G = 4
    correct = np.array([[j < k for j in range(G)] for k in range(G + 1)], np.float32).reshape(-1)
    r = correct.reshape(-1, G)
    ref = (r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + ADV_EPS)
    per_group = np.abs(ref).sum(1)  # k = 0..4
    assert per_group[0] == per_group[4] == 0 and np.isclose(per_group[1], per_group[3])
    w = np.array([1, 1.75, 1.5, 1.25, 1])  # 1 + n_wrong / G; all wrong: 1 (the code's exception)
    for reweight, scale in ((False, np.ones(G + 1)), (True, w)):
        adv = compute_advantages(jnp.asarray(correct), jnp.asarray(correct), G, reweight=reweight)
        got = advantage_mass(adv, correct, G)
        mass = per_group * scale
        assert got["groups_k"] == [1, 1, 1, 1, 1]
        np.testing.assert_allclose(got["adv_abs"], mass.sum(), rtol=1e-5)
        np.testing.assert_allclose(got["adv_abs_hard"], mass[1] + mass[2], rtol=1e-5)
    plain = (per_group[1] + per_group[2]) / per_group.sum()
    aware = (mass[1] + mass[2]) / mass.sum()
    assert 0.68 < plain < 0.69 and 0.73 < aware < 0.74  # 2 sqrt(3)/4 vs 1: the shares by hand
