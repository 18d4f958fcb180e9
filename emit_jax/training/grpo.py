"""EMIT stage 2: difficulty-aware GRPO with LoRA (qwix).

One optimiser step (``prompts_per_step`` prompts x G completions):

1. the policy (LoRA applied, eval mode: BatchNorm on running statistics) samples G completions
   per prompt with the jitted sampler (temperature / top-k / top-p, stop at ``<|im_end|>``),
   by default from a copy with the LoRA updates merged once per step, on the learner's mesh or
   the sampler's own (``grpo.sampler``: :class:`Rollout`);
2. rewards (``emit_jax.rl.rewards``: accuracy 3, cosine length 1, format 1, repetition 1);
3. difficulty-aware resampling: groups with no correct completion are regenerated up to
   ``max_resample_times`` (``emit_jax.rl.grpo.resample_groups``), a round generating only for
   them, padded to a power of two (:func:`rollout_groups`);
4. group-normalised advantages times the difficulty weight ``1 + #incorrect / G``;
5. the token-level clipped loss with ``beta`` x KL against the reference policy, which is the
   same model with the adapters off (the original module objects: no second copy of the
   weights) — the soft prompt, projector and mlp1 are trained in full, the reference keeps
   their original values; gradients only for LoRA factors and those modules.

A prompt is encoded once per round (its G rows are copies: the same tiles and CE pair), and on
one device with one micro-batch the reference pass and the update run each prompt once into a
KV cache its G completions attend to (:func:`shared_completion_logits`): the same log-probs
and gradients as running every row in full, for about a third of the tokens at G = 4.

Plain GRPO is ``resample=False, reweight=False``. The final policy is merged (LoRA into the base
kernels) for the stage's model checkpoint and the HF export.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from collections import Counter
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emit_jax import faults
from emit_jax.data.pipeline import (PipelineConfig, RecordEncoder, batch_ce, collate,
                                    repeat_rows)
from emit_jax.ops.sampling import generate
from emit_jax.eval.scoring import lettered
from emit_jax.parallel import placed_module, sampler_mesh, shard_module, sharded_jit
from emit_jax.rl import grpo as G_
from emit_jax.rl import rewards as R_
from emit_jax.training import micro, optim
from emit_jax.training.config import GRPOConfig
from emit_jax.training.lora import (adapted_kernels, apply_lora, merge_lora, merged_model,
                                   trainable_filter)
from emit_jax.training.loop import Stage, StepResult, run_loop
from emit_jax.training.state import StageCheckpoints
from emit_jax.models.emit import HeatmapBatchNorm, is_emit



def correctness(name: str):
    """What "correct" means for resampling, reweighting and the accuracy metrics: ``accuracy``
    (EMIT: the answer letter matches) or ``adfm_cls`` (AD-FM: R_cls = 1)."""
    from emit_jax.rl import adfm  # noqa: PLC0415 - AD-FM's rewards only when asked for

    table = {"accuracy": R_.is_correct, "adfm_cls": adfm.is_correct}
    if name not in table:
        raise ValueError(f"grpo.correct must be 'accuracy' or 'adfm_cls', got {name!r}")
    return table[name]


def completion_logits(m, b, comp_tokens, comp_mask):
    """``[B, N, V]`` float32 logits predicting each completion token ``comp_tokens [B, N]``
    after the left-padded prompts ``b["input_ids"] [B, T]``; only the completion positions go
    through the vocabulary projection."""
    full_ids = jnp.concatenate([b["input_ids"], comp_tokens], axis=1)
    full_mask = jnp.concatenate([b["attention_mask"], comp_mask], axis=1)
    kw = {"ce_pixels": b["ce_pixels"], "num_ce": b["num_ce"]} if is_emit(m) else {}
    n_prompt = b["input_ids"].shape[1]
    hidden = m.forward(full_ids, b["pixel_values"], full_mask, compute_logits=False,
                       **kw).last_hidden
    return m.logits_from_hidden(hidden[:, n_prompt - 1:-1]).astype(jnp.float32)


_completion_logits = completion_logits  # make_grpo_fns picks it or the shared one


def _repeat_cache(cache, times: int):
    """A KV cache of B rows as one of ``B x times`` (row ``i`` -> rows ``i * times ..``)."""
    def rep(x):  # keys / values [(L,) B, S, KVH, Dh]
        return jnp.repeat(x, times, axis=x.ndim - 4)
    return cache._replace(k=jax.tree.map(rep, cache.k), v=jax.tree.map(rep, cache.v),
                          mask=jnp.repeat(cache.mask, times, axis=0),
                          positions=jnp.repeat(cache.positions, times, axis=0))


def shared_completion_logits(m, b, comp_tokens, comp_mask, G: int):
    """:func:`completion_logits` for groups of ``G`` completions that share their prompt:
    ``b`` holds the ``P`` prompts once (``input_ids [P, T]``, their tiles and CE pairs) and
    ``comp_tokens [P * G, N]`` the completions group by group (rows ``k * G .. k * G + G - 1``
    follow prompt ``k``). The prompts (their image tiles, heat maps and ``T`` tokens) go
    through the model once, into a KV cache repeated for the G completions, which then attend
    to it: a full-sequence pass over ``P * G * (T + N)`` tokens becomes ``P * T + P * G * N``.
    The same logits as :func:`completion_logits` on the prompts repeated G times, and (the
    cache being part of the traced function) the same gradients. ``[P * G, N, V]`` float32."""
    kw = {"ce_pixels": b["ce_pixels"], "num_ce": b["num_ce"]} if is_emit(m) else {}
    P, T = b["input_ids"].shape
    prompt = m.forward(b["input_ids"], b["pixel_values"], b["attention_mask"],
                       cache=m.init_cache(P, T), compute_logits=False, **kw)
    cache = _repeat_cache(prompt.cache.grow(T + comp_tokens.shape[1]), G)
    rest = m.forward(comp_tokens, attention_mask=comp_mask, cache=cache, compute_logits=False)
    # the prompt's last position predicts the first completion token
    first = jnp.repeat(prompt.last_hidden[:, -1:], G, axis=0)
    hidden = jnp.concatenate([first, rest.last_hidden[:, :-1].astype(first.dtype)], axis=1)
    return m.logits_from_hidden(hidden).astype(jnp.float32)


def make_grpo_fns(g: GRPOConfig, wrt, *, mesh=None, rules=None, micro_batches: int = 1,
                  shared_prompts: bool = False):
    """The two jitted programs of a GRPO step, over ``mesh`` when given (parameters, LoRA
    factors and optimizer state sharded by their logical axes, the batch over data x fsdp):

    - ``score(policy, reference, b, comp_tokens, comp_mask) -> (ref, old)`` per-token log-probs
      ``[B, N]`` of the reference (adapters off; zeros when beta = 0) and, for mu > 1, of the
      policy before this batch's updates (zeros otherwise);
    - ``train_step(policy, optimizer, b, comp_tokens, comp_mask, adv, ref, old) -> (loss,
      metrics, finite)``: the clipped token-level loss with KL, one optimizer update in place
      (none, and no other change, when the loss or a gradient is non-finite).

    With ``micro_batches`` M > 1 every array argument (and ``ref`` / ``old`` as ``score``
    returns them) is in the split layout of ``emit_jax.training.micro.split_rows`` (``[B / M, M,
    ...]``): both programs take one micro-batch at a time, the loss of each is normalised by the
    whole batch's denominator and the gradients are summed, so the update is the one-shot one.

    With ``shared_prompts`` (one micro-batch), ``b`` holds each prompt once and the G
    completions of a group follow each other (:func:`shared_completion_logits`).
    """
    iterations, beta = g.iterations, g.beta
    mutable = nnx.Any(wrt, nnx.Not(nnx.Param))  # what train_step changes
    if shared_prompts and micro_batches != 1:
        raise ValueError("shared_prompts needs one micro-batch")

    def completion_logits(m, b, comp_tokens, comp_mask):
        if shared_prompts:
            return shared_completion_logits(m, b, comp_tokens, comp_mask, g.G)
        return _completion_logits(m, b, comp_tokens, comp_mask)

    def score_one(policy, reference, b, comp_tokens, comp_mask):
        # the mu > 1 policy pass runs on a clone: BatchNorm statistics move only in training
        ref = G_.token_logprobs(completion_logits(reference, b, comp_tokens, comp_mask), comp_tokens) \
            if beta else jnp.zeros(comp_tokens.shape, jnp.float32)
        old = G_.token_logprobs(completion_logits(nnx.clone(policy), b, comp_tokens, comp_mask),
                                comp_tokens) if iterations > 1 else jnp.zeros(comp_tokens.shape, jnp.float32)
        return ref, old

    def score(policy, reference, b, comp_tokens, comp_mask):
        if micro_batches == 1:
            return score_one(policy, reference, b, comp_tokens, comp_mask)
        xs = {**b, "comp_tokens": comp_tokens, "comp_mask": comp_mask}
        return micro.scan_apply((policy, reference), lambda p, r, mb: score_one(
            p, r, mb, mb["comp_tokens"], mb["comp_mask"]), xs)

    def loss_fn(p, b, comp_tokens, comp_mask, adv, ref, old, denominator=None):
        mask = comp_mask.astype(jnp.float32)
        logits = completion_logits(p, b, comp_tokens, comp_mask)
        logp = G_.token_logprobs(logits, comp_tokens)
        loss, metrics = G_.grpo_loss(logp, old if iterations > 1 else None,
                                     ref if beta else None, adv, mask,
                                     eps_low=g.eps_low, eps_high=g.eps_high,
                                     beta=beta, kl=g.kl, agg=g.agg, denominator=denominator)
        metrics["entropy"] = G_.entropy(jax.lax.stop_gradient(logits), mask)
        return loss, metrics

    def train_step(policy, optimizer, b, comp_tokens, comp_mask, adv, ref, old):
        before = optim.snapshot((policy, optimizer), mutable)
        if micro_batches == 1:
            (loss, metrics), grads = nnx.value_and_grad(
                loss_fn, argnums=nnx.DiffState(0, wrt), has_aux=True)(
                    policy, b, comp_tokens, comp_mask, adv, ref, old)
        else:
            den = G_.loss_denominator(micro.rows(comp_mask), g.agg)
            xs = {**b, "comp_tokens": comp_tokens, "comp_mask": comp_mask, "adv": adv,
                  "ref": ref, "old": old}
            loss, metrics, grads = micro.accumulate(policy, wrt, xs, lambda p, mb: loss_fn(
                p, mb, mb["comp_tokens"], mb["comp_mask"], mb["adv"], mb["ref"], mb["old"], den))
            metrics = G_.combine_metrics(metrics)
        ok = optim.update_if_finite(policy, optimizer, grads, loss, mutable, before)
        return loss, metrics, ok

    # only what a program changes comes back out: nothing of the weights for score, the
    # trainable set (and optimizer, BatchNorm statistics, RNG counters) for train_step
    return (sharded_jit(score, mesh, rules, mutable=nnx.Not(nnx.Param)),
            sharded_jit(train_step, mesh, rules, mutable=mutable))


STEP_KEYS = ("input_ids", "attention_mask", "pixel_values", "ce_pixels", "num_ce")


def _step_inputs(batch: dict, toks: np.ndarray, comp_mask: np.ndarray, adv, n_micro: int):
    """The device inputs of ``score`` / ``train_step`` for a collated prompt batch and its
    completions ``toks [B, N]`` / ``comp_mask [B, N]`` / advantages ``[B]``: as they are, or in
    ``n_micro`` micro-batches (``emit_jax.training.micro.split_rows``)."""
    if n_micro == 1:
        b = {k: jnp.asarray(batch[k]) for k in STEP_KEYS}
        return b, jnp.asarray(toks), jnp.asarray(comp_mask), adv
    parts = micro.split_rows({**{k: batch[k] for k in STEP_KEYS + ("use_comp", "row_tiles")},
                              "comp_tokens": toks, "comp_mask": comp_mask,
                              "adv": np.asarray(adv)}, n_micro)
    b = {k: jnp.asarray(parts[k]) for k in STEP_KEYS}
    return b, jnp.asarray(parts["comp_tokens"]), jnp.asarray(parts["comp_mask"]), \
        jnp.asarray(parts["adv"])


def _freeze_heatmap_bn(model) -> int:
    """Put the heat-map BatchNorm of ``model`` (``grpo.bn='frozen'``) in inference mode: the
    loss then normalises with the running statistics stage 1 left, as the sampler did, and
    leaves them as they are. Returns how many it set."""
    n = 0
    for _, m in nnx.iter_graph(model):
        if isinstance(m, HeatmapBatchNorm):
            m.use_running_average = True
            n += 1
    return n


class _Prompts:
    """``prompts_per_step`` records per batch from an endless shuffled grain order, with the
    order's iterator state (what a checkpoint saves)."""

    def __init__(self, records: Sequence[dict], n: int, seed: int):
        import grain  # noqa: PLC0415

        order = grain.MapDataset.source(records).shuffle(seed=seed).repeat(None)
        self._it, self._n = iter(order.to_iter_dataset()), n

    def __next__(self) -> list[dict]:
        return [next(self._it) for _ in range(self._n)]

    def get_state(self):
        return self._it.get_state()

    def set_state(self, state) -> None:
        self._it.set_state(state)


def prompt_pipeline(model, g: GRPOConfig, max_tiles: int, length_buckets) -> PipelineConfig:
    """How stage 2 encodes its prompts (left-padded, no answer), with one pixel and one CE shape
    per step: the sampler and the step compile once per length bucket, not once per mix of
    tasks."""
    return PipelineConfig.for_model(model, max_tiles=max_tiles, train=True, with_answer=False,
                                    pad_side="left", tile_bucket=g.rows * 2 * max_tiles,
                                    ce_bucket=g.rows, length_buckets=tuple(length_buckets))


def round_size(n: int, total: int, pad: str) -> int:
    """Prompts a sampling round of ``n`` of the step's ``total`` prompts generates for: the
    next power of two, at most ``total`` (``pad="pow2"``), or ``total`` (``"full"``)."""
    return total if pad == "full" else min(total, 1 << (n - 1).bit_length())


def merges_lora(policy, g: GRPOConfig) -> bool:
    """Whether the rollout samples from a merged copy (``grpo.sampler.merge_lora``): never
    with QLoRA (the policy computes with the quantized kernels), and with ``float32`` only
    when every adapted kernel is float32 (merging into bfloat16 would round the update)."""
    mode = g.sampler.merge_lora
    if mode == "never" or g.lora.weight_qtype:
        return False
    return mode == "always" or all(k.dtype == jnp.float32 for k in adapted_kernels(policy).values())


class Rollout:
    """The sampler's role: ``G`` completions per prompt from the policy (eval mode, the jitted
    sampler), decoded to text. ``rollout(recs, step, round_) -> (batch, tokens [n*G, N],
    lengths [n*G], texts)``; ``batch`` is the collated batch of the ``n x G`` rows (each prompt
    encoded once and repeated: ``repeat_rows``), with the ``n`` prompts' own under ``"prompts"``,
    which the loss reuses. The
    randomness is fixed by (``seed``, step, round): a resumed run samples the same.

    It samples from the policy itself or, per ``g.sampler``, from a copy made once per step
    (:meth:`sampling`): LoRA merged into the kernels (``emit_jax.training.lora.merged_model``)
    and / or placed on the sampler's mesh (``emit_jax.parallel.sampler_mesh``), so the decode
    loop neither computes ``x @ A @ B`` nor gathers weights."""

    def __init__(self, policy, tokenizer, pcfg: PipelineConfig, g: GRPOConfig, *, seed: int,
                 mesh=None, reference=None):
        self.policy, self.tokenizer, self.pcfg, self.g = policy, tokenizer, pcfg, g
        self.seed, self.mesh, self.reference = seed, mesh, reference
        self.sampler_mesh = None if mesh is None else sampler_mesh(mesh, g.sampler.mesh)
        self.merge = reference is not None and merges_lora(policy, g)
        self.encoder = RecordEncoder(tokenizer, pcfg)
        self.pad = tokenizer.pad_token_id or 0
        self.eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self._model = None

    def sampler_model(self):
        """The module the decode loop runs: the policy, or a merged / moved copy of it."""
        self.policy.eval()
        if self.merge:
            model = merged_model(self.policy, self.reference, self.sampler_mesh)
        elif self.sampler_mesh is not self.mesh:
            model = placed_module(*nnx.split(self.policy), self.sampler_mesh)
        else:
            return self.policy
        model.eval()
        return model

    @contextlib.contextmanager
    def sampling(self):
        """Within: every call samples from one :meth:`sampler_model` (the step's rounds share
        it); the copy is dropped on exit, before the loss runs."""
        self._model = self.sampler_model()
        try:
            yield self
        finally:
            self._model = None

    def pipeline(self, n: int) -> PipelineConfig:
        """The collation of a round of ``n`` prompts: tile and CE buckets scaled from the
        step's ``prompts_per_step`` to ``n`` (one pixel shape per round size)."""
        full = self.g.prompts_per_step
        if n == full:
            return self.pcfg
        return dataclasses.replace(self.pcfg, tile_bucket=max(1, self.pcfg.tile_bucket * n // full),
                                   ce_bucket=max(1, self.pcfg.ce_bucket * n // full))

    def __call__(self, recs: Sequence[dict], step: int, round_: int):
        g, eos = self.g, self.eos
        rng = np.random.default_rng([self.seed, step, round_])
        # each prompt encoded once (one JPEG draw for its tiles), its G rows copies of it
        pcfg = self.pipeline(len(recs))
        prompts = collate([self.encoder(r, rng) for r in recs], dataclasses.replace(
            pcfg, tile_bucket=max(1, pcfg.tile_bucket // g.G),
            ce_bucket=max(1, pcfg.ce_bucket // g.G)), self.pad)
        batch = {**repeat_rows(prompts, g.G), "prompts": prompts}
        ce, _ = batch_ce(batch)
        model = self._model if self._model is not None else self.sampler_model()
        out = generate(model, batch["input_ids"], batch["attention_mask"],
                       jnp.asarray(batch["pixel_values"]), ce_pixels=ce,
                       max_new_tokens=g.max_new_tokens, eos_token_id=eos, pad_token_id=self.pad,
                       temperature=g.temperature, top_k=g.top_k, top_p=g.top_p,
                       rng=jax.random.fold_in(jax.random.key(self.seed), step * 16 + round_),
                       mesh=self.sampler_mesh)
        toks, lens = np.array(out.tokens), np.array(out.lengths)  # writable copies
        texts = []
        for i in range(len(toks)):
            body = toks[i, :lens[i]]
            if len(body) and body[-1] == eos:
                body = body[:-1]
            texts.append(self.tokenizer.decode(body.tolist(), skip_special_tokens=True))
        return batch, toks, lens, texts


def rollout_groups(rollout, recs: Sequence[dict], step: int, first_batch: dict,
                   answers: str = "letter"):
    """``generate_fn(indices, round_)`` for ``emit_jax.rl.grpo.resample_groups``: ``G`` (text,
    tokens, length) completions for each prompt ``recs[i]``; with ``answers`` ``'words'`` or
    ``'all_words'`` each text's answer is read as the letter EMIT's parser takes from it
    (``eval.scoring.lettered``), once, for the correctness and the rewards alike. A round pads
    ``indices`` with
    copies of its last prompt up to :func:`round_size` (``grpo.sampler.resample_pad``), so the
    sampler compiles one shape per size and a round of 1 failed group makes ``G`` rows with
    ``pow2``; the padding rows come last, so the real rows are encoded and drawn as with any
    other padding. Round 0's collated batch goes into ``first_batch["b"]`` (what the loss
    encodes)."""
    G, pad = rollout.g.G, rollout.g.sampler.resample_pad

    def generate_fn(indices, round_):
        n = round_size(len(indices), len(recs), pad)
        padded = list(indices) + [indices[-1]] * (n - len(indices))
        batch, toks, lens, texts = rollout([recs[i] for i in padded], step, round_)
        if round_ == 0:
            first_batch["b"] = batch
        if answers != "letter":  # the rewards read letters: the parser's letter of the words
            texts = [lettered(t, recs[indices[r // G]].get("options"))
                     for r, t in enumerate(texts[:len(indices) * G])]
        return [[(texts[k * G + j], toks[k * G + j], int(lens[k * G + j])) for j in range(G)]
                for k in range(len(indices))]
    return generate_fn


def score_groups(g: GRPOConfig, texts: Sequence[str], toks: np.ndarray, lens: np.ndarray,
                 correct: np.ndarray, rows: Sequence[dict], eos: int, forwarded=()) -> dict:
    """Rewards and advantages of ``n x G`` completions (``rows``: each completion's record):
    ``lengths`` (tokens without the closing EOS), ``total`` / ``parts`` (weighted reward sum and
    each reward, ``emit_jax.rl.rewards.combine``), ``weight`` (the difficulty weight
    ``1 + #incorrect / G``) and ``adv`` (group-normalised advantages, times ``weight`` with
    ``g.reweight``)."""
    G = g.G
    lengths = [int(l) - int(l > 0 and toks[i, l - 1] == eos) for i, l in enumerate(lens)]
    total, parts = R_.combine(list(g.reward_names), list(g.reward_weights), list(texts),
                              solution=[r.get("solution", "") for r in rows], lengths=lengths,
                              **{k: [r.get(k) for r in rows] for k in forwarded},
                              **g.reward_kwargs)
    weight = G_.difficulty_weights(jnp.asarray(correct), G)
    adv = G_.group_advantages(jnp.asarray(total, jnp.float32), G)
    adv = G_.apply_difficulty(adv, jnp.asarray(correct), G, enabled=g.reweight, weights=weight)
    return {"lengths": lengths, "total": total, "parts": parts, "weight": weight, "adv": adv}


def run_grpo(model, records, tokenizer, g: GRPOConfig, stage_dir: str, *, mesh=None, seed: int = 0,
             max_tiles: int = 1, length_buckets=(512, 768, 1024, 1536, 2048, 4096),
             checkpoint_every: int = 50, on_nonfinite: str = "skip", answers: str = "letter"):
    """Train ``model`` (an EMIT model after stage 1) with difficulty-aware GRPO through
    :func:`emit_jax.training.loop.run_loop`: per step, the :class:`Rollout` samples (resampling
    groups with no correct answer), :func:`score_groups` scores, ``score`` takes the reference
    log-probs and ``train_step`` updates (``make_grpo_fns``). ``answers='words'``: a completion
    whose answer is an option's words is read as that option's letter before the rewards and
    the correctness (``eval.scoring.lettered``, EMIT's parser), as the evaluation reads it.
    Returns (merged model, info)."""
    G = g.G
    pcfg = prompt_pipeline(model, g, max_tiles, length_buckets)
    reference = model
    sample = collate([RecordEncoder(tokenizer, pcfg)(records[0], np.random.default_rng(0))], pcfg,
                     tokenizer.pad_token_id or 0)
    policy = apply_lora(reference, sample, g.lora, seed=seed)
    wrt = trainable_filter()
    optimizer = optim.make_train_state(policy, g.optim(), wrt)
    if mesh is not None:
        # together, so the base weights the policy and the reference share stay one copy
        shard_module((policy, reference, optimizer), mesh)
    ckpt = StageCheckpoints(os.path.join(stage_dir, "ckpt"), every=checkpoint_every,
                            state_filter=nnx.Any(wrt, nnx.BatchStat), name="grpo")
    rollout = Rollout(policy, tokenizer, pcfg, g, seed=seed, mesh=mesh, reference=reference)
    print(f"[grpo] sampler: LoRA {'merged once per step' if rollout.merge else 'unmerged'}, "
          f"mesh {g.sampler.mesh if mesh is not None else '-'}, resampling rounds padded "
          f"{g.sampler.resample_pad}", file=sys.stderr, flush=True)
    is_correct = correctness(g.correct)
    # record fields the rewards read (AD-FM's GT boxes)
    forwarded = [k for k in ("bbox_answer",) if any(k in r for r in records)]
    n_micro = micro.micro_count(g.rows, g.micro_batch_size, "grpo's rows (prompts_per_step x G)")
    if n_micro > 1:
        print(f"[grpo] {n_micro} micro-batches of {g.rows // n_micro} completions per step "
              f"(gradient accumulation)", file=sys.stderr, flush=True)
    # one micro-batch on one device: each prompt runs once per pass, its G completions attend
    # to its keys and values (shared_completion_logits); else every row runs in full
    shared = n_micro == 1 and mesh is None and g.G > 1
    score, train_step = make_grpo_fns(g, wrt, mesh=mesh, micro_batches=n_micro,
                                      shared_prompts=shared)
    totals = Counter()

    def step(n: int, recs: list[dict]) -> StepResult:
        t0 = time.time()
        first_batch = {}

        with rollout.sampling():  # the sampler's copy of the policy lives for these rounds
            result = G_.resample_groups(
                rollout_groups(rollout, recs, n, first_batch, answers), recs, G,
                lambda r, c: is_correct(c[0], r.get("solution", "")),
                max_resample_times=g.max_resample_times, on_failure="keep", enabled=g.resample,
                pass_round=True)
        t_sampled = time.time()
        flat = result.flat_completions()
        toks = np.stack([c[1] for c in flat])
        lens = np.array([c[2] for c in flat])
        correct = np.array(result.flat_correct())
        rows = [recs[i] for i in result.prompt_indices for _ in range(G)]
        sc = score_groups(g, [c[0] for c in flat], toks, lens, correct, rows, rollout.eos,
                          forwarded)
        comp_mask = (np.arange(toks.shape[1])[None, :] < lens[:, None]).astype(np.int32)
        policy.train()
        if g.bn == "frozen":  # stage 1's running statistics, as the sampler used them
            _freeze_heatmap_bn(policy)
        b, ctoks, cmask, adv = _step_inputs(
            first_batch["b"]["prompts"] if shared else first_batch["b"], toks, comp_mask,
            sc["adv"], n_micro)
        t_scored = time.time()
        ref, old = score(policy, reference, b, ctoks, cmask)
        jax.block_until_ready((ref, old))
        t_ref = time.time()
        if faults.fires("nan", "grpo", n):
            adv = adv * jnp.float32(jnp.nan)
        finite = True
        for _ in range(g.iterations):  # mu updates on this batch against the stored old log-probs
            loss, metrics, ok = train_step(policy, optimizer, b, ctoks, cmask, adv, ref, old)
            finite &= bool(ok)
        tasks_ = [r.get("task_type", "") for r in rows]
        per_task = {f"acc/{t}": float(np.mean([c for c, tt in zip(correct, tasks_) if tt == t]))
                    for t in sorted(set(tasks_)) if t}
        # where the step's advantage mass lies (hard groups: 1 to G/2 correct), for comparing
        # plain and difficulty-aware GRPO (experiments.table1's diagnostics)
        mass = G_.advantage_mass(sc["adv"], correct, G)
        by_k = {f"groups_correct_{k}": n for k, n in enumerate(mass["groups_k"])}
        m = {"loss": float(loss), "reward": float(np.mean(sc["total"])),
             "acc": float(correct.mean()), "resampled": result.groups_resampled,
             "no_correct_groups": result.groups_without_correct,
             "difficulty_weight": float(jnp.mean(sc["weight"])) if g.reweight else 1.0,
             "completion_len": float(np.mean(sc["lengths"])),
             "adv_abs": mass["adv_abs"], "adv_abs_hard": mass["adv_abs_hard"], **by_k,
             **{f"reward_{k}": float(np.mean(v)) for k, v in sc["parts"].items()},
             **{k: float(v) for k, v in metrics.items()}, **per_task,
             # where the step's time goes: the sampler's rounds (prefill with the heat map,
             # decoding, detokenising), rewards and batch assembly on the host, the reference
             # pass, the update(s)
             "sample_s": t_sampled - t0, "rewards_s": t_scored - t_sampled,
             "reference_s": t_ref - t_scored, "update_s": time.time() - t_ref,
             "step_s": time.time() - t0}
        totals.update({**{k: int(v) for k, v in result.counts().items()}, "groups": len(recs),
                       **by_k})
        return StepResult(finite, m, tokens=int(comp_mask.sum()))

    def summarize(results, skipped: int) -> dict:  # a line every step
        m = dict(results[-1].scalars)
        step_s = m.pop("step_s")
        return {**m, "nonfinite_skipped": skipped, "step_s": step_s}

    stage = Stage(name="grpo", steps=g.steps, model=policy, optimizer=optimizer,
                  data=_Prompts(records, g.prompts_per_step, seed), step=step,
                  summarize=summarize, log_every=1,
                  show=("reward", "acc", "loss", "resampled", "completion_len", "step_s"),
                  extra_meta=lambda: {"counts": dict(totals)},
                  restore_meta=lambda meta: totals.update(meta.get("counts", {})))
    history = run_loop(stage, ckpt, stage_dir, on_nonfinite=on_nonfinite)
    merged = merge_lora(policy, reference)
    merged.eval()
    return merged, {"steps": g.steps, "history": history, "counts": dict(totals)}
