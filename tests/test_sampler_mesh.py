"""GRPO's sampler (issue 27, item 3): LoRA merged once per step, the sampler's own mesh (no
weight all-gather inside the decode loop: the compiled HLO on 8 simulated CPU devices, and the
same program compiled for an abstract TPU slice when libtpu is installed), and resampling
rounds that generate only for the failed groups.

Run as a script (``XLA_FLAGS=--xla_force_host_platform_device_count=8 python
tests/test_sampler_mesh.py``) it is the 8-device worker: one JSON line, read by
:func:`mesh_results`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from test_lora import TARGETS, inputs, small_emit  # noqa: E402

from emit_jax.errors import ConfigError  # noqa: E402
from emit_jax.ops.sampling import generate  # noqa: E402
from emit_jax.training.config import GRPOConfig, LoRAConfig, SamplerConfig  # noqa: E402

N_NEW = 6


def lora_policy(ref, seed: int = 0):
    """``ref``'s LoRA policy (rank 4, alpha 16) with random non-zero B factors, so that merging
    changes the kernels."""
    import qwix

    from emit_jax.training.lora import LORA_METHODS, lora_provider

    ids, pix, mask, ce = inputs(ref)
    lcfg = LoRAConfig(rank=4, alpha=16.0, dropout=0.0, targets=TARGETS)
    policy = qwix.apply_lora_to_model(ref, lora_provider(lcfg), ids, pix, mask,
                                      rngs=nnx.Rngs(1), methods=LORA_METHODS, ce_pixels=ce)
    policy._emit_lora_scale = lcfg.scale
    rs = np.random.RandomState(seed)
    for path, v in nnx.to_flat_state(nnx.state(policy, nnx.LoRAParam)):
        if path[-1].endswith("_lora_b"):  # zero at init
            v.set_value(jnp.asarray(0.05 * rs.randn(*v.get_value().shape), jnp.float32))
    policy.eval()
    return policy


def prompts(model, rows: int, seed: int = 1) -> dict:
    """``rows`` different prompts of 24 tokens: one tile (4 image tokens), the CE slots."""
    rs = np.random.RandomState(seed)
    ids = rs.randint(3, 60, (rows, 24)).astype(np.int32)
    ids[:, 2:6] = 63
    ids[:, 8:8 + model.num_comp_slots] = model.emit_config.comp_token_id
    return {"ids": jnp.asarray(ids), "mask": jnp.ones((rows, 24), bool),
            "pix": jnp.asarray(rs.randn(rows, 3, 56, 56), jnp.float32),
            "ce": jnp.asarray(rs.randn(rows, 2, 3, 56, 56), jnp.float32)}


def sample(model, p, mesh=None, **kw):
    kw = {"max_new_tokens": N_NEW, "temperature": 0.0, **kw}
    return np.asarray(generate(model, p["ids"], p["mask"], p["pix"], ce_pixels=p["ce"],
                               mesh=mesh, **kw).tokens)


def stub_rollout(policy, g: GRPOConfig, mesh=None, reference=None):
    """A :class:`Rollout` without a tokenizer (only its sampler side is used)."""
    from emit_jax.data.pipeline import PipelineConfig
    from emit_jax.training.grpo import Rollout

    tok = types.SimpleNamespace(pad_token_id=0, convert_tokens_to_ids=lambda t: 1)
    return Rollout(policy, tok, PipelineConfig(), g, seed=0, mesh=mesh, reference=reference)


# ------------------------------------------------------------------------- 1: LoRA merged
def test_merged_sampler_gives_the_unmerged_policys_greedy_tokens():
    from emit_jax.training.lora import adapted_kernels

    ref = small_emit()
    ref.eval()
    policy = lora_policy(ref)
    before = {k: np.asarray(v) for k, v in adapted_kernels(policy).items()}
    p = prompts(ref, 4)
    rollout = stub_rollout(policy, GRPOConfig(), reference=ref)
    assert rollout.merge
    merged = rollout.sampler_model()
    assert merged is not policy and not hasattr(type(merged), "_unquantized_type")  # plain
    assert not nnx.state(merged, nnx.LoRAParam)
    # the merge matters: the reference samples something else
    want = sample(policy, p)
    assert not np.array_equal(sample(ref, p), want)
    np.testing.assert_array_equal(sample(merged, p), want)
    logits = lambda m: np.asarray(m.forward(p["ids"], p["pix"], p["mask"],
                                            ce_pixels=p["ce"]).logits)
    np.testing.assert_allclose(logits(merged), logits(policy), atol=2e-5)
    # the policy is untouched; arrays that need no merge are shared, not copied
    for k, v in adapted_kernels(policy).items():
        np.testing.assert_array_equal(np.asarray(v), before[k])
    emb = lambda m: m.mllm.language_model.embed_tokens.embedding.get_value()
    assert emb(merged) is emb(policy)
    # within sampling(): one copy for all rounds, dropped on exit
    with rollout.sampling():
        assert rollout._model is not None
    assert rollout._model is None


def test_merge_lora_modes():
    from emit_jax.training.grpo import merges_lora

    ref = small_emit()
    policy = lora_policy(ref)
    g = lambda mode, qtype="": GRPOConfig(sampler=SamplerConfig(merge_lora=mode),
                                          lora=LoRAConfig(weight_qtype=qtype))
    assert merges_lora(policy, g("float32")) and merges_lora(policy, g("always"))
    assert not merges_lora(policy, g("never")) and not merges_lora(policy, g("float32", "nf4"))
    assert stub_rollout(policy, g("float32")).merge is False  # no reference: nothing to merge into
    up = policy.mllm.language_model.layers[0].mlp.up_proj.kernel
    up.set_value(up.get_value().astype(jnp.bfloat16))  # a bfloat16 kernel: the merge would round
    assert not merges_lora(policy, g("float32")) and merges_lora(policy, g("always"))


# ------------------------------------------------------------------ 3: resampling rounds
def test_round_sizes():
    from emit_jax.training.grpo import round_size

    assert [round_size(n, 32, "pow2") for n in (1, 2, 3, 5, 9, 17, 32)] == [1, 2, 4, 8, 16, 32, 32]
    assert [round_size(n, 6, "pow2") for n in (1, 3, 5, 6)] == [1, 4, 6, 6]
    assert {round_size(n, 32, "full") for n in (1, 7, 32)} == {32}


class CountingRollout:
    """Completions that depend only on (step, round, prompt, row), like the real sampler's
    (the draws of a row do not depend on the batch size); records the prompts per call."""

    def __init__(self, g, fixed_by: dict):
        self.g, self.fixed_by, self.calls = g, fixed_by, []

    def __call__(self, recs, step, round_):
        self.calls.append((round_, len(recs)))
        toks = np.array([[r["id"], step, round_, j] for r in recs for j in range(self.g.G)])
        lens = np.full(len(toks), 4)
        texts = [("right" if r["id"] in self.fixed_by.get(round_, ()) else "wrong")
                 for r in recs for _ in range(self.g.G)]
        return {"round": round_}, toks, lens, texts


@pytest.mark.parametrize("pad,sizes", [("pow2", [(0, 32), (1, 4), (2, 2), (3, 1)]),
                                       ("full", [(0, 32), (1, 32), (2, 32), (3, 32)])])
def test_resampling_rounds_generate_only_for_the_failed_groups(pad, sizes):
    from emit_jax.rl.grpo import resample_groups
    from emit_jax.training.grpo import rollout_groups

    g = GRPOConfig(prompts_per_step=32, G=4, sampler=SamplerConfig(resample_pad=pad))
    recs = [{"id": i} for i in range(32)]
    # 3 groups fail at first, one recovers in each round
    rollout = CountingRollout(g, {0: set(range(29)), 1: {29}, 2: {30}, 3: {31}})

    def run():
        first = {}
        res = resample_groups(rollout_groups(rollout, recs, 7, first), recs, g.G,
                              lambda r, c: c[0] == "right", max_resample_times=3,
                              on_failure="keep", pass_round=True)
        assert first["b"] == {"round": 0}
        return res
    res = run()
    assert rollout.calls == sizes
    assert res.groups_resampled == 3 and res.groups_without_correct == 0
    # each resampled group holds its own prompt's completions from the round that fixed it
    for i, rnd in ((29, 1), (30, 2), (31, 3)):
        assert [tuple(c[1][:3]) for c in res.completions[i]] == [(i, 7, rnd)] * g.G
    # deterministic: the same step gives the same completions
    assert [c[1].tolist() for c in run().flat_completions()] == \
        [c[1].tolist() for c in res.flat_completions()]


def test_a_rounds_rows_do_not_depend_on_its_padding():
    """The sampler's draws for a row depend on the row and the round's key, not on how many
    rows the round has: a round padded to 2 prompts gives the failed prompt's G rows exactly
    as the round padded to all 8 did (temperature 1, top-k 50, top-p 0.9 as in grpo)."""
    ref = small_emit()
    ref.eval()
    G = 4
    p = prompts(ref, 8)
    full = {k: jnp.repeat(v, G, 0) for k, v in p.items()}
    kw = dict(temperature=1.0, top_k=50, top_p=0.9, rng=jax.random.key(3))
    want = sample(ref, full, **kw)
    part = {k: v[:2 * G] for k, v in full.items()}  # the failed prompt 0 and its padding copy
    np.testing.assert_array_equal(sample(ref, part, **kw), want[:2 * G])


def test_round_pipeline_scales_the_pixel_buckets():
    from emit_jax.data.pipeline import PipelineConfig

    g = GRPOConfig(prompts_per_step=8, G=4)
    r = stub_rollout(None, g)
    r.pcfg = PipelineConfig(tile_bucket=g.rows * 2, ce_bucket=g.rows)
    assert r.pipeline(8) is r.pcfg
    assert (r.pipeline(2).tile_bucket, r.pipeline(2).ce_bucket) == (2 * 4 * 2, 2 * 4)


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize("key,value,needle", [
    ("merge_lora", "sometimes", "grpo.sampler.merge_lora: 'sometimes' must be one of"),
    ("mesh", "fsdp", "grpo.sampler.mesh: 'fsdp' must be one of ('learner', 'replicated'"),
    ("resample_pad", "pow3", "grpo.sampler.resample_pad: 'pow3' must be one of"),
])
def test_bad_sampler_settings_are_one_line(key, value, needle):
    from test_bad_inputs import smoke_config

    from emit_jax.training.validate import validate_config

    cfg = smoke_config()
    cfg.grpo.sampler[key] = value
    with pytest.raises(ConfigError) as e:
        validate_config(cfg, num_devices=1)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_replicated_sampler_needs_rows_over_all_devices():
    from test_bad_inputs import smoke_config

    from emit_jax.training.validate import validate_config

    cfg = smoke_config()  # 2 prompts x G 4 = 8 sequences
    cfg.grpo.sampler.mesh = "replicated"
    validate_config(cfg, num_devices=8)
    cfg.grpo.prompts_per_step = 3  # 12 sequences: 2 learner batch shards, but not 8 devices
    cfg.mesh.fsdp, cfg.mesh.tensor = 2, 4
    with pytest.raises(ConfigError, match=re.escape("'replicated' splits the 12 sequences")):
        validate_config(cfg, num_devices=8)
    assert GRPOConfig.from_section(smoke_config().grpo).sampler == SamplerConfig()


# ------------------------------------------------------------ 2: the sampler's mesh (8 CPUs)
@pytest.fixture(scope="module")
def mesh_results():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], capture_output=True,
                          text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


CASES = [("fsdp=8", "learner", "never"), ("fsdp=8", "learner", "float32"),
         ("fsdp=8", "replicated", "float32"), ("fsdp=8", "tensor", "float32"),
         ("fsdp=8", "replicated", "never"), ("data=2,fsdp=2,tensor=2", "tensor", "float32")]


@pytest.mark.parametrize("learner,mode,merge", CASES)
def test_sampler_mesh_tokens_and_decode_loop_gathers(mesh_results, learner, mode, merge):
    """Greedy tokens equal the unmerged policy's on one device. No weight is all-gathered
    inside the decode loop: XLA:CPU hoists FSDP's gathers out of it (before the loop, every
    call: the test sees them there), the TPU compiler (libtpu, an abstract v5p slice) keeps
    them in the loop body on the learner's mesh and has none with the sampler's meshes."""
    r = mesh_results[f"{learner} {mode} {merge}"]
    assert r["tokens_equal"], r
    assert r["merged"] == (merge != "never")
    assert not r["cpu_loop_gathers"], r
    if mode == "learner":
        assert r["cpu_weight_gathers"], r
    if "tpu_loop_gathers" not in r:
        pytest.skip("libtpu is not installed: the TPU compiler's decode loop is not checked")
    assert bool(r["tpu_loop_gathers"]) == (mode == "learner"), r


def _computations(hlo: str) -> dict[str, list[str]]:
    """HLO text -> {computation name: its instruction lines}."""
    comps, name = {}, None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if head and not line.startswith(" "):
            name = head.group(1)
            comps[name] = []
        elif line.startswith("}"):
            name = None
        elif name is not None:
            comps[name].append(line)
    return comps


_CALLED = re.compile(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)|"
                     r"(?:branch_computations|called_computations)=\{([^}]*)\}")


def weight_gathers(hlo: str, weight_sizes: set[int], loops_only: bool) -> list[str]:
    """The all-gathers of ``hlo`` (only those inside the bodies of its while loops and what
    they call, with ``loops_only``) whose result has as many elements as some weight."""
    comps = _computations(hlo)
    todo = [m for lines in comps.values() for l in lines
            for m in re.findall(r"body=%?([\w.\-]+)", l)] if loops_only else list(comps)
    seen = set()
    while todo:
        c = todo.pop()
        if c in seen or c not in comps:
            continue
        seen.add(c)
        for l in comps[c]:
            for one, many in _CALLED.findall(l):
                todo += [one] if one else [x.strip().lstrip("%") for x in many.split(",")]
    out = []
    for c in seen:
        for l in comps[c]:
            m = re.search(r"=\s*(.*?)\s*all-gather(?:-start)?\(", l)
            if m:
                dims = re.findall(r"\[([\d,]*)\]", m.group(1))[-1]
                if int(np.prod([int(d) for d in dims.split(",") if d])) in weight_sizes:
                    out.append(l.strip()[:160])
    return out


def _tpu_mesh(mesh):
    """``mesh``'s shape over the 8 chips of an abstract TPU v5p slice (libtpu's compiler), or
    None without libtpu."""
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:
        return None
    from emit_jax.aot.tpu import topology

    devices = np.asarray(topology("v5p:2x2x2").devices).reshape(mesh.devices.shape)
    return jax.sharding.Mesh(devices, mesh.axis_names)


def _sampler_hlo(model, p, mesh) -> str:
    """The compiled sampler program (``generate``'s, greedy) for ``model`` over ``mesh``."""
    from emit_jax.ops.sampling import sharded_sampler

    return sharded_sampler(mesh).lower(model, p["ids"], p["mask"], p["pix"], p["ce"],
                                       jax.random.key(0), N_NEW, None, 0, 0.0, 0,
                                       1.0).compile().as_text()


def _worker() -> dict:
    import dataclasses

    from emit_jax import parallel

    ref = small_emit()
    ref.eval()
    p = prompts(ref, 8)
    want = sample(lora_policy(ref), p)  # today's path on one device: the unmerged policy
    out = {}
    for learner, mode, merge in CASES:
        ref = small_emit()
        ref.eval()
        policy = lora_policy(ref)
        mesh = parallel.make_mesh(learner)
        parallel.shard_module((policy, ref), mesh)
        g = GRPOConfig(sampler=SamplerConfig(merge_lora=merge, mesh=mode))
        rollout = stub_rollout(policy, g, mesh=mesh, reference=ref)
        model = rollout.sampler_model()
        tokens = sample(model, p, rollout.sampler_mesh)
        sizes = {int(np.prod(v.get_value().shape)) for _, v in
                 nnx.to_flat_state(nnx.state(model, nnx.Param)) if v.get_value().ndim >= 2}
        hlo = _sampler_hlo(model, p, rollout.sampler_mesh)
        r = out[f"{learner} {mode} {merge}"] = {
            "tokens_equal": bool(np.array_equal(tokens, want)), "merged": rollout.merge,
            "sampler_mesh": dict(rollout.sampler_mesh.shape),
            "cpu_weight_gathers": weight_gathers(hlo, sizes, loops_only=False),
            "cpu_loop_gathers": weight_gathers(hlo, sizes, loops_only=True)}
        tpu = _tpu_mesh(rollout.sampler_mesh)
        if tpu is not None:  # the same program for TPU: the fused CPU heat-map kernel is CPU's
            model = nnx.merge(*nnx.split(model))
            model.emit_config = dataclasses.replace(model.emit_config, heatmap_strategy="banded")
            r["tpu_loop_gathers"] = weight_gathers(_sampler_hlo(model, p, tpu), sizes,
                                                   loops_only=True)
    return out


if __name__ == "__main__":
    print("RESULT " + json.dumps(_worker()), flush=True)
