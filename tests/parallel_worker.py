"""Worker for tests/test_parallel.py, run in a subprocess so it can choose its device count.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/parallel_worker.py equivalence

``equivalence``: one SFT step and one GRPO step (LoRA policy, stored old log-probs, KL to the
reference) on a small EMIT model, first on one device without a mesh, then on each mesh of
MESHES; prints one JSON object with, per mesh, the loss difference, the largest parameter
difference, the size of the update itself, and the shardings the arrays ended up with.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from emit_jax import parallel  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_lora import TARGETS, small_emit  # noqa: E402  (the LoRA tests' small EMIT model)

MESHES = ("data=8", "fsdp=8", "data=2,fsdp=2,tensor=2", "fsdp=4,tensor=2")
B, T = 8, 32


def make_batch(model) -> dict:
    from emit_jax.data.pipeline import label_positions

    rs = np.random.RandomState(1)
    ids = rs.randint(3, 60, (B, T)).astype(np.int32)
    ids[:, 2:6] = 63  # one tile of 4 visual tokens
    ids[:, 8:8 + model.num_comp_slots] = model.emit_config.comp_token_id
    labels = np.full((B, T), -100, np.int64)
    labels[:, T - 6:] = ids[:, T - 6:]
    b = {"input_ids": ids, "attention_mask": np.ones((B, T), np.int32),
         "pixel_values": rs.randn(B, 3, 56, 56).astype(np.float32),
         "ce_pixels": rs.randn(B, 2, 3, 56, 56).astype(np.float32), "num_ce": np.int32(B)}
    b.update(label_positions(labels))
    return {k: jnp.asarray(v) for k, v in b.items()}


def params(node) -> dict[str, np.ndarray]:
    return {"/".join(map(str, p)): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(node, nnx.Param))}


def sharding_report(node) -> dict[str, str]:
    out = {}
    for p, v in nnx.to_flat_state(nnx.state(node)):
        val = v.get_value()
        if isinstance(val, jax.Array) and val.ndim:
            shard = val.addressable_shards[0].data.shape
            out["/".join(map(str, p))] = f"{val.sharding.spec} {tuple(val.shape)}->{tuple(shard)}"
    return out


def sft_step(mesh_spec):
    from emit_jax.training.sft import make_train_step

    model = small_emit()
    model.train()
    # plain SGD: the update is linear in the gradient, so parameter differences measure
    # gradient differences (Adam's first step would turn 1e-12 gradients into +-lr)
    opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    mesh = parallel.make_mesh(mesh_spec) if mesh_spec else None
    if mesh is not None:
        parallel.shard_module((model, opt), mesh)
    loss, _, _, _ = make_train_step(nnx.Param, mesh)(model, opt, make_batch(model))
    return float(loss), model, opt


def grpo_step(mesh_spec):
    import qwix

    from emit_jax.training.config import GRPOConfig, LoRAConfig
    from emit_jax.training.grpo import make_grpo_fns
    from emit_jax.training.lora import LORA_METHODS, lora_provider, trainable_filter

    ref = small_emit()
    ref.eval()
    b = make_batch(ref)
    lcfg = LoRAConfig(rank=4, alpha=16.0, dropout=0.0, targets=TARGETS, weight_qtype="")
    policy = qwix.apply_lora_to_model(ref, lora_provider(lcfg), b["input_ids"][:1],
                                      b["pixel_values"][:1], b["attention_mask"][:1],
                                      rngs=nnx.Rngs(1),
                                      methods=LORA_METHODS, ce_pixels=b["ce_pixels"][:1])
    policy._emit_lora_scale = 4.0
    for p, v in nnx.to_flat_state(nnx.state(policy, nnx.LoRAParam)):
        if p[-1].endswith("lora_b"):  # adapters on: the policy differs from the reference
            v.set_value(0.01 * jnp.ones_like(v.get_value()))
    wrt = trainable_filter()
    opt = nnx.Optimizer(policy, optax.sgd(0.1), wrt=wrt)
    mesh = parallel.make_mesh(mesh_spec) if mesh_spec else None
    if mesh is not None:  # together, as run_grpo does: the shared base weights stay one copy
        parallel.shard_module((policy, ref, opt), mesh)
    g = GRPOConfig(iterations=2, beta=0.04, eps_low=0.2, eps_high=0.28, kl="k3", agg="token_mean")
    score, step = make_grpo_fns(g, wrt, mesh=mesh)
    rs = np.random.RandomState(3)
    comp = jnp.asarray(rs.randint(3, 60, (B, 6)), jnp.int32)
    cmask = jnp.ones((B, 6), jnp.int32).at[:, 4:].set(0)
    adv = jnp.asarray(rs.randn(B), jnp.float32)
    policy.train()
    before = params(policy)
    ref_lp, old_lp = score(policy, ref, b, comp, cmask)
    loss, metrics, _ = step(policy, opt, b, comp, cmask, adv, ref_lp, old_lp)
    update = max(float(np.abs(v - before[k]).max()) for k, v in params(policy).items())
    pk = policy.mllm.language_model.layers[0].mlp.up_proj.kernel.get_value()
    rk = ref.mllm.language_model.layers[0].mlp.up_proj.kernel.get_value()
    policy.shares_base = bool(pk is rk or (pk.unsafe_buffer_pointer() == rk.unsafe_buffer_pointer()
                                           if pk.is_fully_addressable and len(pk.devices()) == 1
                                           else all(a.data.unsafe_buffer_pointer()
                                                    == b.data.unsafe_buffer_pointer()
                                                    for a, b in zip(pk.addressable_shards,
                                                                    rk.addressable_shards))))
    return float(loss), policy, opt, np.asarray(ref_lp), float(metrics["kl"]), update


def equivalence() -> dict:
    out = {"devices": jax.device_count(), "sft": {}, "grpo": {}}
    init = params(small_emit())
    loss0, m0, _ = sft_step(None)
    p0 = params(m0)
    out["sft_update"] = max(float(np.abs(p0[k] - init[k]).max()) for k in p0)
    for spec in MESHES:
        loss, m, opt = sft_step(spec)
        p = params(m)
        out["sft"][spec] = {
            "loss_diff": abs(loss - loss0),
            "param_diff": max(float(np.abs(p[k] - p0[k]).max()) for k in p0),
            "shardings": sharding_report(m), "opt_shardings": sharding_report(opt)}
    gl0, g0, _, ref0, kl0, out["grpo_update"] = grpo_step(None)
    gp0 = params(g0)
    for spec in MESHES:
        loss, pol, opt, ref_lp, kl, _ = grpo_step(spec)
        p = params(pol)
        out["grpo"][spec] = {
            "loss_diff": abs(loss - gl0), "kl_diff": abs(kl - kl0),
            "ref_logprob_diff": float(np.abs(ref_lp - ref0).max()),
            "param_diff": max(float(np.abs(p[k] - gp0[k]).max()) for k in gp0),
            "shares_base_weights": pol.shares_base,
            "shardings": sharding_report(pol), "opt_shardings": sharding_report(opt)}
    return out


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "equivalence"
    if mode == "equivalence":
        print("RESULT " + json.dumps(equivalence()))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
