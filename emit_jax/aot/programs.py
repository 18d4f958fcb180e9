"""The stage's programs, as the training code builds and calls them, with their abstract
arguments.

Programs (the training code's functions, shardings and memory switches ``config.memory``):

- SFT stages (``warmup``, ``base``, ``sft``, ``sft2``): ``train_step`` =
  ``training.sft.make_train_step(wrt, mesh, micro_batches)`` on ``(model, optimizer, batch)``,
  the batch as ``training.sft.to_device`` makes it from ``data.pipeline.collate``: ``input_ids``
  / ``labels`` / ``attention_mask [B, P]`` int32, ``pixel_values [N, 3, S, S]`` float32,
  ``ce_pixels [M, 2, 3, S, S]`` float32, ``num_ce []`` int32, ``label_pos`` / ``label_ids [B, K]``
  int32 and ``label_mask [B, K]`` bool. B = ``<stage>.batch_size``, P = the largest
  ``data.length_buckets`` (or ``--prompt_len``), K = ``--label_tokens`` (as plan counts them),
  N = the step's image tiles as ``emit_jax.plan`` counts them (2 images per row x
  (``data.max_tiles`` + a thumbnail), padded as the pipeline pads them), M = B CE pairs for the
  EMIT stages (1 padding row otherwise, as collate gives it). ``warmup`` is text only.
- ``grpo``: ``sampler`` = ``ops.sampling._sharded_sample`` under ``sharded_jit`` (prefill into
  the KV cache + the decode loop, as ``generate(..., mesh=mesh)`` runs it) on what the rollout
  samples from (``training.grpo.Rollout.sampler_model``, per ``grpo.sampler``): the policy in
  eval mode on the learner's mesh, or a copy made for the step, LoRA merged
  (``merge_lora``, with the reference's structure) and / or placed on the sampler's mesh
  (``grpo.sampler.mesh``). A copy is its own argument (role ``sampler``): the stage's resident
  arrays all count as "other resident" beside it, as they stay allocated while it samples; prompts ``[B, P]`` (mask bool), tiles ``[N, 3, S, S]``, CE pairs ``[B, 2, 3, S, S]``, an
  RNG key; ``score`` (reference log-probs) and ``train_step`` (the learner step) =
  ``training.grpo.make_grpo_fns(g, wrt, mesh=mesh, micro_batches)`` on the policy in train mode,
  with the completions ``comp_tokens`` / ``comp_mask [B, max_new_tokens]`` int32, ``adv [B]``,
  ``ref`` / ``old [B, max_new_tokens]`` float32. B = ``prompts_per_step x G``, N padded to a
  multiple of B x 2 x ``max_tiles`` as run_grpo pads it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from emit_jax.aot.abstract import Abstract
from emit_jax.aot.accounting import _key, _leaf_bytes
from emit_jax.aot.batches import Shapes, _sds, grpo_batch, sft_batch, split_layout
from emit_jax.training.config import SFT_STAGES

PROGRAMS = {"sft": ("train_step",), "grpo": ("sampler", "score", "train_step")}


def check_program_names(only, stages) -> None:
    """Refuse ``--programs`` names that no stage of ``stages`` compiles, in one line:
    ``--programs: unknown program 'nosuch'; choose from sampler, score, train_step`` (the
    programs of those stages, in the order a step runs them). Unknown stage names count as
    any stage (the stage itself is refused later, in its own words)."""
    from emit_jax.errors import AotError
    from emit_jax.training.config import STAGES

    kinds = {("sft" if s in SFT_STAGES else "grpo") for s in stages if s in STAGES}
    if not kinds or any(s not in STAGES for s in stages):
        kinds = set(PROGRAMS)
    choices = [n for n in PROGRAMS["grpo"] + PROGRAMS["sft"]
               if any(n in PROGRAMS[k] for k in kinds)]
    choices = list(dict.fromkeys(choices))
    bad = list(dict.fromkeys(n for n in only if n not in choices))
    if bad:
        names = ", ".join(repr(n) for n in bad)
        raise AotError(f"--programs: unknown program{'s' if len(bad) > 1 else ''} {names}; "
                       f"choose from {', '.join(choices)}")


@dataclasses.dataclass
class Program:
    """One program to compile: ``fn`` a ``sharded_jit``, ``args`` its (abstract) arguments,
    ``roles`` what its graph-node arguments are (``policy``, ``reference``, ``optimizer``), in
    order; ``prepare`` what the training code does to the nodes before calling it (train /
    eval mode)."""
    name: str
    fn: Any
    args: tuple
    roles: tuple
    prepare: Any = None


@dataclasses.dataclass
class Stage:
    """The programs of a stage and the arrays it keeps on every device throughout:
    ``resident`` maps each buffer (``(role, path)``) to its per-device bytes; ``shared`` are the
    reference's paths whose arrays are the policy's (no step changes them)."""
    programs: list
    resident: dict
    shared: frozenset


def stage_programs(cfg, stage: str, ab: Abstract, sh: Shapes, mesh) -> Stage:
    """The stage's programs with their abstract arguments, in the order a step runs them."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding

    from emit_jax.parallel import _var_axes, logical_to_spec, sharded_jit

    # the reference shares the policy's arrays except those a step replaces (trained ones,
    # BatchNorm statistics: the train step returns new arrays for them)
    stepped = nnx.Any(ab.wrt, nnx.Not(nnx.Param))
    changed = {p for p, _ in nnx.to_flat_state(nnx.state(ab.policy, stepped))}
    shared = frozenset(ab.shared - changed)
    nodes = {"policy": ab.policy, "optimizer": ab.optimizer}
    if ab.model is not ab.policy:
        nodes["reference"] = ab.model
    resident: dict = {}
    for role, node in nodes.items():
        for path, v in nnx.to_flat_state(nnx.state(node)):
            val = v.get_value()
            if hasattr(val, "shape"):
                sharding = NamedSharding(mesh, logical_to_spec(_var_axes(v), val.shape, mesh))
                resident.setdefault(_key((role,), (0,) + tuple(path), shared),
                                    _leaf_bytes(val.shape, val.dtype, sharding))

    if stage in SFT_STAGES:
        from emit_jax.training.sft import make_train_step

        kw = {"micro_batches": sh.micro} if sh.micro > 1 else {}
        return Stage([Program("train_step", make_train_step(ab.wrt, mesh, **kw),
                              (ab.policy, ab.optimizer, split_layout(sft_batch(sh, stage), sh)),
                              ("policy", "optimizer"))], resident, shared)

    from emit_jax.ops.sampling import _sharded_sample
    from emit_jax.parallel import sampler_mesh
    from emit_jax.training.config import GRPOConfig
    from emit_jax.training.grpo import _freeze_heatmap_bn, make_grpo_fns, merges_lora

    g = GRPOConfig.from_section(cfg.grpo)
    B, N = sh.batch, sh.new_tokens
    b = grpo_batch(sh)

    def train_mode():  # run_grpo: policy.train() (+ the heat-map BatchNorm frozen) before both
        ab.policy.train()
        if g.bn == "frozen":
            _freeze_heatmap_bn(ab.policy)

    kw = {"micro_batches": sh.micro} if sh.micro > 1 else {}
    score, train_step = make_grpo_fns(g, ab.wrt, mesh=mesh, **kw)
    rng = jax.eval_shape(lambda: jax.random.key(0))
    # score and train_step take the step in micro-batches (run_grpo's _step_inputs); the
    # sampler the whole batch
    mb = split_layout({**b, "comp_tokens": _sds((B, N), jnp.int32),
                       "comp_mask": _sds((B, N), jnp.int32), "adv": _sds((B,), jnp.float32),
                       "lp": _sds((B, N), jnp.float32)}, sh)
    ctoks, cmask, adv, lp = (mb.pop(k) for k in ("comp_tokens", "comp_mask", "adv", "lp"))
    # what the rollout samples from (Rollout.sampler_model): the policy, or a copy of it with
    # LoRA merged (the reference's structure) and / or on the sampler's own mesh
    smesh = sampler_mesh(mesh, g.sampler.mesh)
    merged = ab.model is not ab.policy and merges_lora(ab.policy, g)
    sampled = ab.model if merged else ab.policy
    role = "sampler" if merged or smesh is not mesh else "policy"

    def eval_mode():
        ab.policy.eval()
        sampled.eval()

    # the sampler's ids: <|im_end|> / <|endoftext|> of the Qwen2 vocabulary (static constants)
    return Stage([
        Program("sampler", sharded_jit(_sharded_sample, smesh, mutable=nnx.Not(nnx.Param)),
                (sampled, _sds((B, sh.prompt_len), jnp.int32),
                 _sds((B, sh.prompt_len), jnp.bool_), b["pixel_values"], b["ce_pixels"], rng,
                 int(g.max_new_tokens), 151645, 151643, float(g.temperature), int(g.top_k),
                 float(g.top_p)), (role,), prepare=eval_mode),
        Program("score", score, (ab.policy, ab.model, mb, ctoks, cmask), ("policy", "reference"),
                prepare=train_mode),
        Program("train_step", train_step,
                (ab.policy, ab.optimizer, mb, ctoks, cmask, adv, lp, lp),
                ("policy", "optimizer"), prepare=train_mode),
    ], resident, shared)
