"""EMIT stage 2 GRPO math: advantages, difficulty weights, response resampling, loss.

Pure functions, no model. The array functions are jnp code on plain arrays (jit-able with the
group size and the string options static); ``resample_groups`` is a plain-Python driver around
any sampler. Section numbers refer to ``docs/reference/emit.md``.

Batch layout (§11.2, TRL ``RepeatSampler``): a batch of ``N = n_groups * G`` completions is laid
out group after group; completions ``[g*G, (g+1)*G)`` all answer prompt ``g``. Every per-sample
array here (``rewards``, ``correct``, ``advantages``) uses that layout.

==========================  =================================================================
step                        formula (default constants)
==========================  =================================================================
group advantage  §11.6      ``Â_i = (R_i - mean_g R) / (std_g R + 1e-4)``, std *unbiased*
                            (divide by G-1, torch ``.std()``); ``scale="none"``: ``R_i - mean``
difficulty weight §11.6     ``w = 1 + n_wrong/G``, n_wrong = #{not correct} in the group;
                            ``w = 1`` when n_wrong = G (code; ``all_wrong_exception=False``:
                            the paper's ``w = 2``)
advantage        §11.6      ``A_i = w * Â_i`` (``reweight=False``: ``A_i = Â_i``, plain GRPO)
ratio            §11.7      ``rho_t = exp(logp_t - old_t)``; ``old = stop_gradient(logp)`` when
                            ``old_logp`` is None (num_iterations = 1: rho = 1 in value)
token loss       §11.7      ``l_t = -min(rho_t A, clip(rho_t, 1-eps_low, 1+eps_high) A)
                            + beta KL_t``, eps_low = eps_high = 0.2, beta = 5e-3 (script;
                            paper 0.01; TRL default 0.04)
KL               §11.7      k3 ``exp(ref-logp) - (ref-logp) - 1`` (default); k1 ``logp - ref``;
                            k2 ``(logp - ref)^2 / 2``
aggregation      §11.7      ``sequence_mean`` (ms-swift ``loss_type="grpo"``, the code): per
                            sequence sum/max(len,1), mean over the B sequences;
                            ``token_mean`` (paper Eq. 3, DAPO/BNPO): sum/max(total tokens,1);
                            ``sequence_mean_token_sum``: per-sequence sum, mean over sequences;
                            ``sequence_mean_token_scale`` (Dr. GRPO): sum/(B * max_tokens)
==========================  =================================================================

Plain GRPO (the paper's baseline) is the same learner with ``resample_groups(enabled=False)``
(or ``max_resample_times=0``) and ``apply_difficulty(enabled=False)`` /
``compute_advantages(reweight=False)``: a config change, nothing else.

Numerical guards (no effect on values in the normal range): the importance log-ratio and the
k3 log-difference are clamped to ``±max_log_ratio`` (20, as Tunix) before ``exp`` so that the
loss stays finite for extreme log-probs; padded positions (``mask == 0``) are replaced by 0
before any arithmetic, so ``-inf``/NaN log-probs at padding never reach the loss or the
gradient; groups of size 1 get std 0 (torch would give NaN).

Response resampling (§11.5) — what ``resample_groups`` does, versus the official code:

* a group is *valid* iff at least one of its G completions is correct (accuracy reward > 0;
  invalid answers count as not correct), as in the code;
* every invalid group is regenerated each round (G fresh completions for the same prompt; the
  old ones are discarded, not mixed in), up to ``max_resample_times`` rounds. The official code
  lets each of 8 processes pick one invalid id at random per round (so ids can collide or go
  unpicked); that is an artefact of its one-group-per-process layout, not reproduced: the result
  is deterministic given the sampler;
* every round is scored (§15 #3, clean behaviour): M = 3 gives 3 useful rounds. The official
  loop checks validity at the top, so its last regeneration is never scored (M - 1 = 2 useful
  rounds). ``score_last_round=False`` reproduces the *effective* behaviour (M - 1 rounds) without
  generating the wasted round;
* groups still without a correct answer: ``on_failure="keep"`` (default) keeps their last
  generation in place (same order as the prompts; their accuracy rewards are all <= 0, the
  difficulty weight is 1 by the all-wrong exception, and if their total rewards are all equal the
  advantages are 0) and counts them; ``on_failure="drop"`` is the official behaviour: drop them
  and refill the batch to ``n_groups`` by tiling the m valid groups (valid lists in append order:
  first-pass valid groups, then recovered ones; repeat ceil(n/m) times, keep the *last* n), so
  duplicated groups count twice in the loss. When m = 0 the official code divides by zero and
  crashes (§11.5 [BUG], §15 #4); here the batch is kept as in ``"keep"`` and
  ``ResampleResult.all_failed`` is set so the trainer may skip the step.

Public API::

    group_advantages(rewards [N], G, *, eps=1e-4, scale="std") -> [N]
    difficulty_weights(correct [N], G, *, all_wrong_exception=True) -> [N]
    apply_difficulty(advantages [N], correct [N], G, enabled=True, *, all_wrong_exception=True)
    compute_advantages(rewards [N], correct [N], G, *, reweight=True, eps=1e-4, scale="std",
                       all_wrong_exception=True) -> [N]
    advantage_mass(advantages [N], correct [N], G) -> {adv_abs, adv_abs_hard, groups_k [G+1]}
    resample_groups(generate_fn, prompts, G, is_correct_fn, max_resample_times=3,
                    on_failure="keep", *, enabled=True, score_last_round=True, initial=None,
                    pass_round=False) -> ResampleResult
    tile_groups(groups, n) -> list
    token_logprobs(logits [B,T,V], targets [B,T], *, temperature=1.0, chunk_size=None) -> [B,T]
    token_entropy(logits [B,T,V], *, temperature=1.0) -> [B,T]
    entropy(logits [B,T,V], mask [B,T], *, temperature=1.0) -> scalar
    kl_divergence(logp [B,T], ref_logp [B,T], kind="k3", *, max_log_ratio=20.0) -> [B,T]
    aggregate(values [B,T], mask [B,T], agg="sequence_mean", *, max_tokens=None,
              denominator=None) -> scalar
    grpo_loss(logp, old_logp, ref_logp, advantages, mask, *, eps_low=0.2, eps_high=0.2,
              beta=5e-3, kl="k3", agg="sequence_mean", max_log_ratio=20.0, max_tokens=None,
              denominator=None) -> (loss scalar, metrics dict of scalars)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# ------------------------------------------------------------------------------------------
# Constants (docs/reference/emit.md section in brackets)
# ------------------------------------------------------------------------------------------

#: §11.6: epsilon added to the (unbiased) group std.
ADV_EPS = 1e-4
#: §11.7 / §13: clipping (ε_low = ε_high = 0.2 in the script).
EPS_LOW = 0.2
EPS_HIGH = 0.2
#: §11.7 / §13: KL coefficient of the script (Stage2.sh); the paper says 0.01 [DIFF].
BETA = 5e-3
BETA_PAPER = 0.01
#: §11.7: KL estimator ("k3", TRL/ms-swift).
KL_ESTIMATOR = "k3"
#: §11.7: ms-swift's default ``loss_type="grpo"`` = per-sequence token mean, then batch mean.
LOSS_AGG = "sequence_mean"
#: §11.5 / §13: max_resample_times.
MAX_RESAMPLE_TIMES = 3
#: numerical guard on log-ratios before exp (Tunix clamps at ±20).
MAX_LOG_RATIO = 20.0

KL_ESTIMATORS = ("k1", "k2", "k3")
AGGREGATIONS = ("token_mean", "sequence_mean", "sequence_mean_token_sum",
                "sequence_mean_token_scale")
#: Peer names -> ours (TRL/ms-swift ``loss_type``, verl/Tunix ``loss_agg_mode``).
AGG_ALIASES = {
    "grpo": "sequence_mean", "sequence_mean_token_mean": "sequence_mean",
    "seq_mean_token_mean": "sequence_mean",
    "bnpo": "token_mean", "dapo": "token_mean",
    "seq_mean_token_sum": "sequence_mean_token_sum",
    "dr_grpo": "sequence_mean_token_scale", "seq_mean_token_scale": "sequence_mean_token_scale",
}
KL_ALIASES = {"kl": "k1", "mse_kl": "k2", "mse": "k2", "low_var_kl": "k3"}


def canon_agg(agg: str) -> str:
    a = str(agg).replace("-", "_").lower()
    a = AGG_ALIASES.get(a, a)
    if a not in AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {agg!r}; one of {AGGREGATIONS} "
                         f"or aliases {sorted(AGG_ALIASES)}")
    return a


def canon_kl(kind: str) -> str:
    k = str(kind).replace("-", "_").lower()
    k = KL_ALIASES.get(k, k)
    if k not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {kind!r}; one of {KL_ESTIMATORS}")
    return k


def _grouped(x: jax.Array, G: int) -> jax.Array:
    G = int(G)
    if G < 1:
        raise ValueError(f"group size must be >= 1, got {G}")
    if x.ndim != 1 or x.shape[0] % G:
        raise ValueError(f"expected a flat [N] array with N a multiple of G={G}, got {x.shape}")
    return x.reshape(-1, G)


# ------------------------------------------------------------------------------------------
# §11.6 advantages and difficulty reweighting
# ------------------------------------------------------------------------------------------


def group_advantages(rewards: jax.Array, G: int, *, eps: float = ADV_EPS,
                     scale: str = "std") -> jax.Array:
    """Group-normalised advantages, docs/reference/emit.md §11.6 (TRL 0.17 ``_generate_and_score``).

    rewards: [N] total rewards, N = n_groups * G, group after group. Returns float32 [N]:

    * ``scale="std"`` (``scale_rewards=True``, the default): ``(R_i - mu_g) / (sigma_g + eps)``
      with ``sigma_g`` the **unbiased** sample std (divide by G-1, torch ``Tensor.std()``) and
      ``eps = 1e-4`` added to sigma. A group of size 1 gets sigma = 0 (torch: NaN).
    * ``scale="none"`` (Dr. GRPO / ``scale_rewards=False``): ``R_i - mu_g``.

    The centred values are corrected by a second pass (``d - mean(d)``) so that a group's
    advantages sum to 0 up to rounding even when sigma is tiny; this changes nothing beyond
    float rounding. A group whose rewards are all equal gets exactly 0.
    """
    if scale not in ("std", "none"):
        raise ValueError(f"scale must be 'std' or 'none', got {scale!r}")
    r = _grouped(jnp.asarray(rewards, jnp.float32), G)
    G = r.shape[1]
    d = r - jnp.mean(r, axis=1, keepdims=True)
    d = d - jnp.mean(d, axis=1, keepdims=True)  # compensated two-pass centring
    d = jnp.where(jnp.all(r == r[:, :1], axis=1, keepdims=True), 0.0, d)  # ties: exactly 0
    if scale == "std":
        var = jnp.sum(d * d, axis=1, keepdims=True) / max(G - 1, 1)
        d = d / (jnp.sqrt(var) + eps)
    return d.reshape(-1)


def _as_correct(correct: jax.Array) -> jax.Array:
    c = jnp.asarray(correct)
    return c if c.dtype == jnp.bool_ else c > 0


def difficulty_weights(correct: jax.Array, G: int, *,
                       all_wrong_exception: bool = True) -> jax.Array:
    """Per-sample difficulty weight, docs/reference/emit.md §11.6: ``w = 1 + n_wrong / G``.

    correct: [N] bool (or the accuracy reward: correct iff > 0; wrong 0 and invalid -1 both count
    as wrong). ``n_wrong`` is the number of not-correct completions in the sample's group; every
    sample of a group gets the same w. With ``all_wrong_exception`` (the code, default) a group
    with n_wrong = G gets w = 1 instead of 2 (the paper's Eq. 5 has no exception). Returns
    float32 [N] in [1, 2].
    """
    c = _grouped(_as_correct(correct), G)
    G = c.shape[1]
    n_wrong = jnp.sum(~c, axis=1, keepdims=True).astype(jnp.float32)
    w = 1.0 + n_wrong / G
    if all_wrong_exception:
        w = jnp.where(n_wrong == G, 1.0, w)
    return jnp.broadcast_to(w, c.shape).reshape(-1)


def apply_difficulty(advantages: jax.Array, correct: jax.Array, G: int, enabled: bool = True,
                     *, all_wrong_exception: bool = True,
                     weights: jax.Array | None = None) -> jax.Array:
    """``A_i = w_i * Â_i`` (§11.6) when ``enabled``; the advantages unchanged (plain GRPO)
    otherwise. advantages, correct: [N]; ``weights``: :func:`difficulty_weights` of
    ``correct`` when the caller has them already. Returns [N] (float32)."""
    a = jnp.asarray(advantages, jnp.float32)
    if not enabled:
        return a
    if weights is None:
        weights = difficulty_weights(correct, G, all_wrong_exception=all_wrong_exception)
    return a * weights


def compute_advantages(rewards: jax.Array, correct: jax.Array, G: int, *, reweight: bool = True,
                       eps: float = ADV_EPS, scale: str = "std",
                       all_wrong_exception: bool = True) -> jax.Array:
    """§11.6 end to end: ``group_advantages`` then ``apply_difficulty`` (``reweight=False``:
    plain GRPO). rewards, correct: [N] -> [N]."""
    adv = group_advantages(rewards, G, eps=eps, scale=scale)
    return apply_difficulty(adv, correct, G, enabled=reweight,
                            all_wrong_exception=all_wrong_exception)


def advantage_mass(advantages, correct, G: int) -> dict:
    """Where a batch's advantage mass lies: ``|A|`` summed over all completions (``adv_abs``)
    and over those of the **hard** groups (``adv_abs_hard``: at most half of the group's G
    completions correct, at least one, i.e. the groups difficulty-aware GRPO weights by
    ``w >= 1.5`` and that still carry a signal), and the number of groups by correct count
    (``groups_k`` [G + 1]: index k = k correct). advantages, correct: [N] (N = groups x G),
    host arrays or jax arrays. Plain GRPO's mass is symmetric in k <-> G - k; the difficulty
    weights move it to the hard groups: the share ``adv_abs_hard / adv_abs`` says by how much."""
    a = np.abs(np.asarray(advantages, np.float64)).reshape(-1, G)
    k = (np.asarray(correct).reshape(-1, G) > 0).sum(axis=1)
    hard = (k >= 1) & (2 * k <= G)
    return {"adv_abs": float(a.sum()), "adv_abs_hard": float(a[hard].sum()),
            "groups_k": np.bincount(k, minlength=G + 1).tolist()}


# ------------------------------------------------------------------------------------------
# §11.5 response resampling (plain Python driver)
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ResampleResult:
    """Outcome of ``resample_groups``.

    Per *output* group (``len == n_groups``; with ``on_failure="drop"`` output groups may be
    reordered and duplicated):

    * ``completions``: list of G completions (the objects ``generate_fn`` returned);
    * ``correct``: list of G bools;
    * ``prompt_indices``: index into ``prompts`` of the prompt that group answers.

    Per *input* prompt (``len == n_groups``, prompt order):

    * ``rounds``: regeneration rounds made for that prompt (0: valid at the first generation);
    * ``valid``: whether its final generation has a correct completion.

    Counts: ``groups_resampled`` (prompts regenerated at least once), ``groups_recovered``
    (resampled and then valid), ``groups_without_correct`` (still no correct answer after all
    rounds), ``groups_dropped`` (removed by ``on_failure="drop"``), ``groups_duplicated`` (extra
    copies added by the tiling), ``generated_groups`` (groups sent to ``generate_fn``, all
    rounds), ``rounds_made`` (resampling rounds actually run). ``all_failed``: no group has a
    correct answer after resampling (the official code's division by zero; the batch is kept).
    """

    completions: list
    correct: list
    prompt_indices: list
    rounds: list
    valid: list
    groups_resampled: int = 0
    groups_recovered: int = 0
    groups_without_correct: int = 0
    groups_dropped: int = 0
    groups_duplicated: int = 0
    generated_groups: int = 0
    rounds_made: int = 0
    all_failed: bool = False

    def flat_completions(self) -> list:
        """All completions group after group ([n_groups * G], the §11.2 layout)."""
        return [c for grp in self.completions for c in grp]

    def flat_correct(self) -> list:
        return [c for grp in self.correct for c in grp]

    def counts(self) -> dict:
        return {k: getattr(self, k) for k in (
            "groups_resampled", "groups_recovered", "groups_without_correct", "groups_dropped",
            "groups_duplicated", "generated_groups", "rounds_made")} | {
            "all_failed": int(self.all_failed)}


def tile_groups(groups: Sequence[Any], n: int) -> list:
    """The official refill when only m < n groups are valid (§11.5): repeat the list
    ``ceil(n/m)`` times and keep the **last** n. m = 5, n = 8: [g2, g3, g4, g0, g1, g2, g3, g4].
    Raises ValueError when ``groups`` is empty (the official code divides by zero)."""
    m = len(groups)
    if m == 0:
        raise ValueError("tile_groups: no group to tile")
    tiled = list(groups) * math.ceil(n / m)
    return tiled[len(tiled) - n:]


def resample_groups(generate_fn: Callable[..., Sequence[Sequence[Any]]], prompts: Sequence[Any],
                    G: int, is_correct_fn: Callable[[Any, Any], Any],
                    max_resample_times: int = MAX_RESAMPLE_TIMES, on_failure: str = "keep", *,
                    enabled: bool = True, score_last_round: bool = True,
                    initial: Sequence[Sequence[Any]] | None = None,
                    pass_round: bool = False) -> ResampleResult:
    """Difficulty-aware response resampling, docs/reference/emit.md §11.5 (see the module docstring for the
    choices against the official ``_dynamic_sampling``).

    generate_fn: ``generate_fn(prompt_indices: list[int]) -> list`` of ``len(prompt_indices)``
        lists of G completions (any objects), one list per index, in that order
        (``pass_round=True``: ``generate_fn(prompt_indices, round)``, round 0 = first generation).
    prompts: the n_groups prompts (any objects; handed to ``is_correct_fn``).
    is_correct_fn: ``is_correct_fn(prompt, completion)`` -> bool, or the accuracy reward
        (correct iff > 0).
    max_resample_times: M, the cap on regeneration rounds (§13: 3).
    on_failure: ``"keep"`` (default: groups still without a correct answer keep their last
        generation, in place) or ``"drop"`` (official: drop them and refill by ``tile_groups``;
        if none is valid, keep everything and set ``all_failed``).
    enabled: False = plain GRPO: one generation, no resampling (counts still reported).
    score_last_round: True (clean, default) scores all M rounds; False reproduces the official
        effective behaviour of M - 1 useful rounds (the wasted last round is not generated).
    initial: the first generation when the caller already has it (then ``generate_fn`` is only
        called for regenerations).
    """
    if on_failure not in ("keep", "drop"):
        raise ValueError(f"on_failure must be 'keep' or 'drop', got {on_failure!r}")
    G = int(G)
    n = len(prompts)
    if max_resample_times < 0:
        raise ValueError("max_resample_times must be >= 0")

    def gen(indices: list, round_: int) -> list:
        out = generate_fn(list(indices), round_) if pass_round else generate_fn(list(indices))
        out = list(out)
        if len(out) != len(indices):
            raise ValueError(f"generate_fn returned {len(out)} groups for {len(indices)} prompts")
        for grp in out:
            if len(grp) != G:
                raise ValueError(f"generate_fn returned a group of {len(grp)} completions, "
                                 f"expected G={G}")
        return [list(g) for g in out]

    def score(i: int, grp: list) -> list:
        return [bool(_truthy(is_correct_fn(prompts[i], c))) for c in grp]

    generated = 0
    if initial is None:
        groups = gen(list(range(n)), 0)
        generated += n
    else:
        groups = [list(g) for g in initial]
        if len(groups) != n or any(len(g) != G for g in groups):
            raise ValueError(f"initial must hold {n} groups of G={G} completions")
    correct = [score(i, g) for i, g in enumerate(groups)]
    rounds = [0] * n
    order = [i for i in range(n) if any(correct[i])]  # official append order of valid groups

    budget = int(max_resample_times) if enabled else 0
    if not score_last_round:
        budget = max(budget - 1, 0)
    made = 0
    for round_ in range(1, budget + 1):
        bad = [i for i in range(n) if not any(correct[i])]
        if not bad:
            break
        made += 1
        new = gen(bad, round_)
        generated += len(bad)
        for i, grp in zip(bad, new):
            groups[i] = grp  # old responses discarded, not mixed in (§11.5 step 6)
            correct[i] = score(i, grp)
            rounds[i] += 1
            if any(correct[i]):
                order.append(i)

    valid = [any(c) for c in correct]
    failed = [i for i in range(n) if not valid[i]]
    res = dict(rounds=rounds, valid=valid, generated_groups=generated, rounds_made=made,
               groups_resampled=sum(r > 0 for r in rounds),
               groups_recovered=sum(r > 0 and v for r, v in zip(rounds, valid)),
               groups_without_correct=len(failed), all_failed=n > 0 and not order)
    if on_failure == "drop" and order:
        # official: the valid lists in append order, tiled when some groups were dropped
        slots = tile_groups(order, n)
        return ResampleResult(completions=[list(groups[i]) for i in slots],
                              correct=[list(correct[i]) for i in slots], prompt_indices=slots,
                              groups_dropped=len(failed), groups_duplicated=n - len(order),
                              **res)
    return ResampleResult(completions=groups, correct=correct, prompt_indices=list(range(n)),
                          **res)


def _truthy(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    return float(v) > 0


# ------------------------------------------------------------------------------------------
# §11.7 log-probs, entropy, KL, aggregation, loss
# ------------------------------------------------------------------------------------------


def _token_logprobs_dense(logits: jax.Array, targets: jax.Array) -> jax.Array:
    x = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(x, axis=-1)
    picked = jnp.take_along_axis(x, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - lse


def token_logprobs(logits: jax.Array, targets: jax.Array, *, temperature: float = 1.0,
                   chunk_size: int | None = None) -> jax.Array:
    """log softmax(logits / temperature)[target], float32. logits [B, T, V], targets [B, T]
    (int) -> [B, T].

    Computed as the gathered logit minus ``logsumexp`` (no [B, T, V] log-softmax is kept).
    ``chunk_size``: process the time axis in chunks of that many positions under
    ``jax.checkpoint`` (``lax.map``), so the float32 upcast and the softmax residual exist for
    one chunk at a time, in the forward and the backward pass (for large vocabularies).
    """
    if temperature != 1.0:
        logits = logits / jnp.asarray(temperature, logits.dtype)
    if chunk_size is None or chunk_size >= logits.shape[1]:
        return _token_logprobs_dense(logits, targets)
    B, T, V = logits.shape
    c = int(chunk_size)
    nc = -(-T // c)
    pad = nc * c - T
    lg = jnp.pad(logits, ((0, 0), (0, pad), (0, 0)))
    tg = jnp.pad(targets, ((0, 0), (0, pad)))
    lg = lg.reshape(B, nc, c, V).swapaxes(0, 1)
    tg = tg.reshape(B, nc, c).swapaxes(0, 1)
    out = jax.lax.map(jax.checkpoint(lambda a: _token_logprobs_dense(*a)), (lg, tg))
    return out.swapaxes(0, 1).reshape(B, nc * c)[:, :T]


def token_entropy(logits: jax.Array, *, temperature: float = 1.0) -> jax.Array:
    """Entropy of softmax(logits / temperature) per position, float32: ``logsumexp(x) -
    sum softmax(x) x``. logits [B, T, V] -> [B, T]."""
    x = logits.astype(jnp.float32)
    if temperature != 1.0:
        x = x / temperature
    lse = jax.nn.logsumexp(x, axis=-1)
    p = jax.nn.softmax(x, axis=-1)
    return lse - jnp.sum(p * x, axis=-1)


def entropy(logits: jax.Array, mask: jax.Array, *, temperature: float = 1.0) -> jax.Array:
    """Mean token entropy over the unmasked positions (a metric). logits [B, T, V], mask [B, T]
    -> scalar (0 when the mask is empty)."""
    m = jnp.asarray(mask) > 0
    h = jnp.where(m, token_entropy(logits, temperature=temperature), 0.0)
    return jnp.sum(h) / jnp.maximum(jnp.sum(m), 1)


def kl_divergence(logp: jax.Array, ref_logp: jax.Array, kind: str = KL_ESTIMATOR, *,
                  max_log_ratio: float | None = MAX_LOG_RATIO) -> jax.Array:
    """Per-token KL(pi_theta || pi_ref) estimate from sampled tokens (§11.7; PEERS §1).
    logp, ref_logp: [B, T] -> [B, T].

    * k1: ``logp - ref``;
    * k2: ``(logp - ref)^2 / 2``;
    * k3 (default, TRL/ms-swift): ``exp(ref - logp) - (ref - logp) - 1`` (>= 0); the
      log-difference is clamped to ``±max_log_ratio`` before ``exp`` (None: no clamp).
    """
    kind = canon_kl(kind)
    d = ref_logp - logp
    if kind == "k1":
        return -d
    if kind == "k2":
        return 0.5 * d * d
    if max_log_ratio is not None:
        d = jnp.clip(d, -max_log_ratio, max_log_ratio)
    return jnp.exp(d) - d - 1.0


def aggregate(values: jax.Array, mask: jax.Array, agg: str = LOSS_AGG, *,
              max_tokens: int | None = None, denominator: Any = None) -> jax.Array:
    """Reduce per-token values [B, T] with mask [B, T] to a scalar (§11.7; PEERS §1):

    * ``sequence_mean`` (ms-swift/TRL ``"grpo"``, EMIT's code): ``mean_i [sum_t m v / max(sum_t
      m, 1)]`` over all B sequences (an empty sequence contributes 0 and still counts);
    * ``token_mean`` (paper Eq. 3, DAPO, TRL ``"bnpo"``): ``sum m v / max(sum m, 1)``;
    * ``sequence_mean_token_sum``: ``mean_i sum_t m v``;
    * ``sequence_mean_token_scale`` (Dr. GRPO): ``sum m v / (B * max_tokens)``, max_tokens
      defaults to T.

    ``denominator``: replace the batch-local normaliser (total tokens for ``token_mean``, B for
    the others, B * max_tokens for Dr. GRPO) by a global one, so that summing the micro-batch
    losses gives the exact global loss (PEERS §5).
    """
    agg = canon_agg(agg)
    m = (jnp.asarray(mask) > 0).astype(jnp.float32)
    v = jnp.where(m > 0, values, 0.0)
    B, T = v.shape
    if agg == "token_mean":
        num = jnp.sum(v)
        den = jnp.maximum(jnp.sum(m), 1.0)
    elif agg == "sequence_mean":
        num = jnp.sum(jnp.sum(v, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0))
        den = B
    elif agg == "sequence_mean_token_sum":
        num = jnp.sum(v)
        den = B
    else:
        num = jnp.sum(v)
        den = B * (T if max_tokens is None else int(max_tokens))
    if denominator is not None:
        den = denominator
    return num / den


def loss_denominator(mask: jax.Array, agg: str = LOSS_AGG, *,
                     max_tokens: int | None = None) -> jax.Array:
    """The normaliser :func:`aggregate` divides by for the whole batch ``mask [B, T]``: pass it
    as ``denominator`` to each micro-batch's loss and the micro-batch losses sum to the batch's
    (gradient accumulation, ``emit_jax.training.micro``)."""
    agg = canon_agg(agg)
    B, T = mask.shape
    if agg == "token_mean":
        return jnp.maximum(jnp.sum((jnp.asarray(mask) > 0).astype(jnp.float32)), 1.0)
    if agg in ("sequence_mean", "sequence_mean_token_sum"):
        return jnp.float32(B)
    return jnp.float32(B * (T if max_tokens is None else int(max_tokens)))


# how each metric of grpo_loss (and the trainer's entropy) combines over micro-batches
_TOKEN_MEANS = ("kl", "clip_frac", "clip_frac_low", "clip_frac_high", "ratio_mean", "entropy")
_SUMS = ("pg_loss", "kl_loss", "tokens")


def combine_metrics(per_micro: dict) -> dict:
    """Metrics of :func:`grpo_loss` computed per micro-batch (each ``[M]``, the losses with the
    global ``denominator``) -> the whole batch's: sums for the losses and token counts, token-
    weighted means for the token means, the maximum ratio, the mean advantage (equal rows)."""
    tokens = per_micro["tokens"]
    out = {}
    for k, v in per_micro.items():
        if k in _SUMS:
            out[k] = jnp.sum(v)
        elif k in _TOKEN_MEANS:
            out[k] = jnp.sum(v * tokens) / jnp.maximum(jnp.sum(tokens), 1.0)
        elif k == "ratio_max":
            out[k] = jnp.max(v)
        else:
            out[k] = jnp.mean(v)
    return out


def grpo_loss(logp: jax.Array, old_logp: jax.Array | None, ref_logp: jax.Array | None,
              advantages: jax.Array, mask: jax.Array, *, eps_low: float = EPS_LOW,
              eps_high: float = EPS_HIGH, beta: float = BETA, kl: str = KL_ESTIMATOR,
              agg: str = LOSS_AGG, max_log_ratio: float | None = MAX_LOG_RATIO,
              max_tokens: int | None = None, denominator: Any = None):
    """Token-level clipped GRPO surrogate with a KL penalty, docs/reference/emit.md §11.7 (TRL 0.17
    ``compute_loss``).

    logp: [B, T] policy log-probs of the completion tokens (differentiated);
    old_logp: [B, T] log-probs of the sampling policy (mu > 1 iterations), or None:
        ``stop_gradient(logp)`` (num_iterations = 1: ratio = 1 in value, gradient ``A grad logp``);
    ref_logp: [B, T] reference log-probs, or None (then ``beta`` must be 0; the KL metric is 0);
    advantages: [B], one per completion, applied to all its tokens;
    mask: [B, T] 1 on completion tokens (incl. the appended ``<|im_end|>``), 0 on padding.

    Per token: ``rho = exp(clamp(logp - old, ±max_log_ratio))``,
    ``l = -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) + beta KL`` with KL the ``kl``
    estimator (``kl_divergence``); reduced by ``aggregate(l, mask, agg)``.

    Returns ``(loss, metrics)``; metrics are scalars: ``pg_loss`` (the surrogate alone, same
    aggregation), ``kl`` (token mean of the KL estimate, as TRL logs it), ``kl_loss``
    (``beta`` x aggregated KL), ``clip_frac`` (TRL 0.17: tokens where the clipped branch is the
    min, ``rho A > clip(rho) A``), ``clip_frac_low`` (rho < 1 - eps_low with A < 0),
    ``clip_frac_high`` (rho > 1 + eps_high with A > 0), ``ratio_mean``, ``ratio_max``,
    ``tokens`` (unmasked count), ``adv_mean``.
    """
    kl = canon_kl(kl)
    if ref_logp is None and isinstance(beta, (int, float)) and beta != 0:
        raise ValueError("grpo_loss: beta != 0 needs ref_logp")
    m = jnp.asarray(mask) > 0
    mf = m.astype(jnp.float32)
    ntok = jnp.maximum(jnp.sum(mf), 1.0)

    def tmean(x):
        return jnp.sum(jnp.where(m, x, 0.0)) / ntok

    # padding positions may hold -inf/NaN: zero them before any arithmetic (and gradient)
    lp = jnp.where(m, logp.astype(jnp.float32), 0.0)
    old = jax.lax.stop_gradient(lp) if old_logp is None else \
        jnp.where(m, jax.lax.stop_gradient(old_logp).astype(jnp.float32), 0.0)
    adv = jnp.asarray(advantages, jnp.float32)[:, None]

    log_ratio = lp - old
    if max_log_ratio is not None:
        log_ratio = jnp.clip(log_ratio, -max_log_ratio, max_log_ratio)
    ratio = jnp.exp(log_ratio)
    clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    s1 = ratio * adv
    s2 = clipped * adv
    per_token_pg = -jnp.minimum(s1, s2)

    if ref_logp is not None:
        ref = jnp.where(m, jax.lax.stop_gradient(ref_logp).astype(jnp.float32), 0.0)
        per_token_kl = kl_divergence(lp, ref, kl, max_log_ratio=max_log_ratio)
    else:
        per_token_kl = jnp.zeros_like(lp)
    per_token = per_token_pg + beta * per_token_kl if ref_logp is not None else per_token_pg

    kw = dict(max_tokens=max_tokens, denominator=denominator)
    loss = aggregate(per_token, mf, agg, **kw)
    sg = jax.lax.stop_gradient
    metrics = {
        "pg_loss": sg(aggregate(per_token_pg, mf, agg, **kw)),
        "kl": sg(tmean(per_token_kl)),
        "kl_loss": sg(beta * aggregate(per_token_kl, mf, agg, **kw)),
        "clip_frac": sg(tmean((s1 > s2).astype(jnp.float32))),
        "clip_frac_low": sg(tmean(((ratio < 1.0 - eps_low) & (adv < 0)).astype(jnp.float32))),
        "clip_frac_high": sg(tmean(((ratio > 1.0 + eps_high) & (adv > 0)).astype(jnp.float32))),
        "ratio_mean": sg(tmean(ratio)),
        "ratio_max": sg(jnp.max(jnp.where(m, ratio, 0.0))),
        "tokens": jnp.sum(mf),
        "adv_mean": sg(jnp.mean(adv)),
    }
    return loss, metrics
