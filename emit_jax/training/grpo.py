"""EMIT stage 2: difficulty-aware GRPO with LoRA (qwix).

One optimiser step (``prompts_per_step`` prompts x G completions):

1. the policy (LoRA applied, eval mode: BatchNorm on running statistics) samples G completions
   per prompt with the jitted sampler (temperature / top-k / top-p, stop at ``<|im_end|>``);
2. rewards (``emit_jax.rl.rewards``: accuracy 3, cosine length 1, format 1, repetition 1);
3. difficulty-aware resampling: groups with no correct completion are regenerated up to
   ``max_resample_times`` (``emit_jax.rl.grpo.resample_groups``);
4. group-normalised advantages times the difficulty weight ``1 + #incorrect / G``;
5. the token-level clipped loss with ``beta`` x KL against the reference policy, which is the
   same model with the adapters off (the original module objects: no second copy of the
   weights) — the soft prompt, projector and mlp1 are trained in full, the reference keeps
   their original values; gradients only for LoRA factors and those modules.

Plain GRPO is ``resample=False, reweight=False``. The final policy is merged (LoRA into the base
kernels) for the stage's model checkpoint and the HF export.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emit_jax import faults
from emit_jax.data.pipeline import PipelineConfig, RecordEncoder, collate
from emit_jax.training import micro, nonfinite, preemption
from emit_jax.training.metrics import MetricWriter
from emit_jax.training.nonfinite import NonFiniteCounter, NonFiniteError
from emit_jax.training.state import StageCheckpoints

TRAINED_IN_FULL = ("soft_prompt", "projector", "multi_modal_projector")
# the model method qwix intercepts to apply the adapters (see apply_lora)
LORA_METHODS = ("forward",)


def correctness(name: str):
    """What "correct" means for resampling, reweighting and the accuracy metrics: ``accuracy``
    (EMIT: the answer letter matches) or ``adfm_cls`` (AD-FM: R_cls = 1)."""
    if name == "accuracy":
        from emit_jax.rl import rewards

        return rewards.is_correct
    if name == "adfm_cls":
        from emit_jax.rl import adfm

        return adfm.is_correct
    raise ValueError(f"grpo.correct must be 'accuracy' or 'adfm_cls', got {name!r}")


def lora_provider(cfg):
    """qwix's LoRA rule for ``cfg`` (``grpo.lora``). The factors are created in float32 whatever
    the base kernels' dtype (qwix's default initializers, He-uniform A and zero B, drawn in
    float32; ``emit_jax.training.precision``)."""
    import qwix

    from emit_jax.training.precision import float32_initializer

    return qwix.LoraProvider(module_path=cfg.targets, rank=int(cfg.rank), alpha=float(cfg.alpha),
                             dropout=float(cfg.get("dropout", 0.0)),
                             lora_a_initializer=float32_initializer(jax.nn.initializers.he_uniform()),
                             lora_b_initializer=float32_initializer(jax.nn.initializers.zeros),
                             **({"weight_qtype": cfg.weight_qtype} if cfg.get("weight_qtype") else {}))


def trainable_filter():
    full = nnx.Any(*[nnx.PathContains(n) for n in TRAINED_IN_FULL])
    return nnx.Any(nnx.LoRAParam, nnx.All(nnx.Param, full))


def merge_lora(policy, reference):
    """A plain model (``reference``'s structure) whose kernels include the LoRA updates
    ``kernel + A @ B * alpha / rank`` and whose fully trained modules hold the policy's values.
    With QLoRA the update is added to the reference's full-precision kernel."""
    pstate = dict(nnx.to_flat_state(nnx.state(policy)))
    merged = nnx.clone(reference)
    mstate = nnx.state(merged)
    flat = dict(nnx.to_flat_state(mstate))
    for path, var in flat.items():
        a = pstate.get(path[:-1] + (path[-1] + "_lora_a",))
        b = pstate.get(path[:-1] + (path[-1] + "_lora_b",))
        if path in pstate:
            value = pstate[path].get_value()
        elif a is not None:  # QLoRA: the policy holds a quantized copy; merge into the original
            value = var.get_value()
        else:
            continue
        if a is not None and b is not None:
            scale = a.get_metadata().get("lora_scale") or _lora_scale(policy)
            value = (value + (a.get_value() @ b.get_value()) * scale).astype(value.dtype)
        var.set_value(value)
    nnx.update(merged, mstate)
    return merged


def _lora_scale(policy) -> float:
    return float(getattr(policy, "_emit_lora_scale", 1.0))


def apply_lora(model, sample: dict, lora_cfg, *, seed: int = 0):
    """The LoRA policy over ``model`` (which stays the reference: its modules are shared, not
    copied), traced once on the collated ``sample`` batch.

    qwix applies the adapters inside the one method it intercepts (``__call__`` by default).
    Every training and sampling path calls ``model.forward`` (``__call__`` calls it too), so
    that is the method intercepted: with the default, the loss, the reference-free log-probs and
    the sampler all ran without the adapters, and LoRA received no gradient."""
    import qwix

    from emit_jax.parallel import localize_module

    model.eval()
    localize_module(model)  # qwix traces eagerly: per process, not over a multi-process mesh
    ce, _ = _ce(sample)
    kw = {"ce_pixels": ce} if hasattr(model, "emit_config") else {}
    policy = qwix.apply_lora_to_model(model, lora_provider(lora_cfg),
                                      jnp.asarray(sample["input_ids"]),
                                      jnp.asarray(sample["pixel_values"]),
                                      jnp.asarray(sample["attention_mask"]), rngs=nnx.Rngs(seed),
                                      methods=LORA_METHODS, **kw)
    policy._emit_lora_scale = float(lora_cfg.alpha) / float(lora_cfg.rank)
    return policy


def _ce(batch):
    n = int(batch["num_ce"])
    return (jnp.asarray(batch["ce_pixels"][:n]) if n else None), n


def completion_logits(m, b, comp_tokens, comp_mask):
    """``[B, N, V]`` float32 logits predicting each completion token ``comp_tokens [B, N]``
    after the left-padded prompts ``b["input_ids"] [B, T]``; only the completion positions go
    through the vocabulary projection."""
    full_ids = jnp.concatenate([b["input_ids"], comp_tokens], axis=1)
    full_mask = jnp.concatenate([b["attention_mask"], comp_mask], axis=1)
    kw = {"ce_pixels": b["ce_pixels"], "num_ce": b["num_ce"]} if hasattr(m, "emit_config") else {}
    n_prompt = b["input_ids"].shape[1]
    hidden = m.forward(full_ids, b["pixel_values"], full_mask, compute_logits=False,
                       **kw).last_hidden
    return m.logits_from_hidden(hidden[:, n_prompt - 1:-1]).astype(jnp.float32)


def make_grpo_fns(g, wrt, *, mesh=None, rules=None, micro_batches: int = 1):
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
    """
    from emit_jax.parallel import sharded_jit
    from emit_jax.rl import grpo as G_

    iterations = int(g.get("iterations", 1))
    beta = float(g.beta)
    mutable = nnx.Any(wrt, nnx.Not(nnx.Param))  # what train_step changes

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
                                     eps_low=float(g.eps_low), eps_high=float(g.eps_high),
                                     beta=beta, kl=g.kl, agg=g.agg, denominator=denominator)
        metrics["entropy"] = G_.entropy(jax.lax.stop_gradient(logits), mask)
        return loss, metrics

    def train_step(policy, optimizer, b, comp_tokens, comp_mask, adv, ref, old):
        before = nonfinite.snapshot((policy, optimizer), mutable)
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
        ok = nonfinite.update_if_finite(policy, optimizer, grads, loss, mutable, before)
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
    from emit_jax.models.emit import HeatmapBatchNorm

    n = 0
    for _, m in nnx.iter_graph(model):
        if isinstance(m, HeatmapBatchNorm):
            m.use_running_average = True
            n += 1
    return n


def run_grpo(model, records, tokenizer, cfg, stage_dir: str, *, mesh=None):
    """Train ``model`` (an EMIT model after stage 1) with difficulty-aware GRPO.
    Returns (merged model, info)."""
    from emit_jax.ops.sampling import generate
    from emit_jax.rl import grpo as G_
    from emit_jax.rl import rewards as R_
    from emit_jax.training.sft import OptimConfig, make_train_state
    import grain

    g = cfg.grpo
    G = int(g.G)
    mcfg = model.config
    emit = hasattr(model, "emit_config")
    pcfg = PipelineConfig(image_size=mcfg.vision.image_size, max_tiles=cfg.data.max_tiles,
                          tokens_per_tile=mcfg.tokens_per_tile, train=True,
                          comp_slots=model.num_comp_slots if emit else 0,
                          comp_token_id=model.emit_config.comp_token_id if emit else None,
                          with_answer=False, pad_side="left",
                          # one pixel and one CE shape per step: the sampler and the step compile
                          # once per length bucket, not once per mix of tasks
                          tile_bucket=int(g.prompts_per_step) * G * 2 * int(cfg.data.max_tiles),
                          ce_bucket=int(g.prompts_per_step) * G,
                          length_buckets=tuple(cfg.data.length_buckets))
    encoder = RecordEncoder(tokenizer, pcfg)
    pad = tokenizer.pad_token_id or 0
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    order = grain.MapDataset.source(records).shuffle(seed=cfg.seed).repeat(None)
    it = iter(order.to_iter_dataset())

    reference = model
    policy = apply_lora(reference, collate([encoder(records[0], np.random.default_rng(0))], pcfg, pad),
                        g.lora, seed=cfg.seed)
    wrt = trainable_filter()
    # the schedule counts optimiser updates: mu per sampled batch
    ocfg = OptimConfig(steps=int(g.steps) * int(g.get("iterations", 1)), lr=float(g.lr),
                       warmup_ratio=float(g.warmup_ratio), weight_decay=float(g.weight_decay),
                       b1=0.9, b2=0.95, clip_norm=1.0)
    optimizer = make_train_state(policy, ocfg, wrt)
    if mesh is not None:
        from emit_jax.parallel import shard_module

        # together, so the base weights the policy and the reference share stay one copy
        shard_module((policy, reference, optimizer), mesh)
    ckpt = StageCheckpoints(os.path.join(stage_dir, "ckpt"), every=cfg.checkpoint_every,
                            state_filter=nnx.Any(wrt, nnx.BatchStat), name="grpo")
    start = 0
    meta = ckpt.restore(policy, optimizer)
    if meta is not None:
        start = int(meta["step"])
        it.set_state(meta["data"])

    names, weights = list(g.reward_names), [float(w) for w in g.reward_weights]
    is_correct = correctness(g.get("correct", "accuracy"))
    bn_frozen = g.get("bn", "train") == "frozen"
    # record fields the rewards read (AD-FM's GT boxes) and constant reward options
    forwarded = [k for k in ("bbox_answer",) if any(k in r for r in records)]
    reward_kwargs = dict(g.get("reward_kwargs", {}))

    def encode_group(recs, step, round_):
        rng = np.random.default_rng([cfg.seed, step, round_])
        exs = [encoder(r, rng) for r in recs for _ in range(G)]
        return collate(exs, pcfg, pad)

    def sample_completions(recs, step, round_):
        """G completions per record -> (batch, tokens [n*G, N], lengths, texts)."""
        batch = encode_group(recs, step, round_)
        ce, _ = _ce(batch)
        policy.eval()
        out = generate(policy, batch["input_ids"], batch["attention_mask"],
                       jnp.asarray(batch["pixel_values"]), ce_pixels=ce,
                       max_new_tokens=int(g.max_new_tokens), eos_token_id=eos, pad_token_id=pad,
                       temperature=float(g.temperature), top_k=int(g.top_k), top_p=float(g.top_p),
                       rng=jax.random.fold_in(jax.random.key(cfg.seed), step * 16 + round_),
                       mesh=mesh)
        toks, lens = np.array(out.tokens), np.array(out.lengths)  # writable copies
        texts = []
        for i in range(len(toks)):
            body = toks[i, :lens[i]]
            if len(body) and body[-1] == eos:
                body = body[:-1]
            texts.append(tokenizer.decode(body.tolist(), skip_special_tokens=True))
        return batch, toks, lens, texts

    n_micro = micro.micro_count(int(g.prompts_per_step) * G, int(g.get("micro_batch_size", 0)),
                                "grpo's rows (prompts_per_step x G)")
    if n_micro > 1:
        print(f"[grpo] {n_micro} micro-batches of {int(g.prompts_per_step) * G // n_micro} "
              f"completions per step (gradient accumulation)", file=sys.stderr, flush=True)
    score, train_step = make_grpo_fns(g, wrt, mesh=mesh, micro_batches=n_micro)
    iterations = int(g.get("iterations", 1))

    progress = MetricWriter(stage_dir, stage="grpo", total_steps=int(g.steps), start_step=start)
    totals = Counter()
    history = []
    counter = NonFiniteCounter("grpo", cfg.get("nonfinite", "skip"),
                               skipped=(meta or {}).get("nonfinite_skipped", 0))
    totals.update((meta or {}).get("counts", {}))
    done, data_state = start, it.get_state()

    def meta_at(step):
        return {"step": step, "data": data_state, "nonfinite_skipped": counter.skipped,
                "counts": dict(totals)}
    try:
        with preemption.guard():
            for step in range(start + 1, int(g.steps) + 1):
                t0 = time.time()
                recs = [next(it) for _ in range(int(g.prompts_per_step))]
                first_batch = {}

                def generate_fn(indices, round_, recs=recs, step=step):
                    # a resampling round pads its prompts to the full count (one sampler shape)
                    full = list(indices) + [indices[-1]] * (len(recs) - len(indices))
                    batch, toks, lens, texts = sample_completions([recs[i] for i in full], step, round_)
                    if round_ == 0:
                        first_batch["b"] = batch  # the encoding the loss uses
                    return [[(texts[k * G + j], toks[k * G + j], int(lens[k * G + j])) for j in range(G)]
                            for k in range(len(indices))]

                result = G_.resample_groups(
                    generate_fn, recs, G, lambda r, c: is_correct(c[0], r.get("solution", "")),
                    max_resample_times=int(g.max_resample_times), on_failure="keep",
                    enabled=bool(g.resample), pass_round=True)
                batch = first_batch["b"]
                flat = result.flat_completions()
                texts = [c[0] for c in flat]
                toks = np.stack([c[1] for c in flat])
                lens = np.array([c[2] for c in flat])
                correct = np.array(result.flat_correct())
                solutions = [recs[i].get("solution", "") for i in result.prompt_indices for _ in range(G)]
                lengths = [int(l) - int(l > 0 and toks[i, l - 1] == eos) for i, l in enumerate(lens)]
                fields = {k: [recs[i].get(k) for i in result.prompt_indices for _ in range(G)]
                          for k in forwarded}
                total, parts = R_.combine(names, weights, texts, solution=solutions, lengths=lengths,
                                          **fields, **reward_kwargs)
                adv = G_.group_advantages(jnp.asarray(total, jnp.float32), G)
                adv = G_.apply_difficulty(adv, jnp.asarray(correct), G, enabled=bool(g.reweight))
                comp_mask = (np.arange(toks.shape[1])[None, :] < lens[:, None]).astype(np.int32)
                policy.train()
                if bn_frozen:  # stage 1's running statistics, as the sampler used them
                    _freeze_heatmap_bn(policy)
                b, ctoks, cmask, adv = _step_inputs(batch, toks, comp_mask, adv, n_micro)
                ref, old = score(policy, reference, b, ctoks, cmask)
                if faults.fires("nan", "grpo", step):
                    adv = adv * jnp.float32(jnp.nan)
                finite = True
                for _ in range(iterations):  # mu updates on this batch against the stored old log-probs
                    loss, metrics, ok = train_step(policy, optimizer, b, ctoks, cmask, adv, ref, old)
                    finite &= bool(ok)
                counter.record(step, finite)  # raises when the policy says stop
                weight = G_.difficulty_weights(jnp.asarray(correct), G)
                tasks_ = [recs[i].get("task_type", "") for i in result.prompt_indices for _ in range(G)]
                per_task = {f"acc/{t}": float(np.mean([c for c, tt in zip(correct, tasks_) if tt == t]))
                            for t in sorted(set(tasks_)) if t}
                m = {"loss": float(loss), "reward": float(np.mean(total)), "acc": float(correct.mean()),
                     "resampled": result.groups_resampled,
                     "no_correct_groups": result.groups_without_correct,
                     "difficulty_weight": float(jnp.mean(weight)) if g.reweight else 1.0,
                     "completion_len": float(np.mean(lengths)),
                     **{f"reward_{k}": float(np.mean(v)) for k, v in parts.items()},
                     **{k: float(v) for k, v in metrics.items()}, **per_task,
                     "nonfinite_skipped": counter.skipped, "step_s": time.time() - t0}
                totals.update({**{k: int(v) for k, v in result.counts().items()}, "groups": len(recs)})
                progress.write(step, m, tokens=int(comp_mask.sum()),
                               show=("reward", "acc", "loss", "resampled", "completion_len", "step_s"))
                history.append({"step": step, **m})
                done, data_state = step, it.get_state()
                ckpt.save(step, policy, optimizer, meta_at(step), force=step == int(g.steps))
                if preemption.stop_requested():
                    raise preemption.Preempted(f"grpo: stopped after step {step}")
    except (KeyboardInterrupt, NonFiniteError):  # a signal, or the non-finite policy: save the
        progress.close()                          # last finished (good) step, then stop
        ckpt.save_interrupted(done, start, policy, optimizer, meta_at(done))
        raise
    ckpt.close()
    progress.close()
    merged = merge_lora(policy, reference)
    merged.eval()
    return merged, {"steps": int(g.steps), "history": history, "counts": dict(totals)}
