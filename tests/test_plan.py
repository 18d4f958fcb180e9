"""emit_jax.plan: per-device memory from abstract shapes and logical shardings."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from emit_jax import plan
from emit_jax.models import architectures
from emit_jax.models.emit import EMIT
from emit_jax.models.internvl import InternVL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "grpo.py")
GRPO_8B = os.path.join(ROOT, "configs", "internvl3_8b_grpo.py")
GiB = 2 ** 30


def row(p, name):
    return next(r for r in p.rows if r.name == name)


def nbytes(tree) -> int:
    return sum(int(x.nbytes) for x in jax.tree.leaves(tree))


def test_tiny_weights_and_optimizer_equal_the_real_model():
    cfg = plan.load_config(TINY)
    real = EMIT.create(InternVL(architectures.get_config("tiny"), rngs=nnx.Rngs(0)), hint_ids=[1, 2])
    # stage 1 (EMIT: soft prompt + projector trained), one device
    p = plan.plan_stage(cfg, plan.stage_setup(cfg, "sft", (1, 1, 1)))
    w = row(p, "weights")
    assert w.per_device == w.whole == nbytes(nnx.state(real))
    from emit_jax.training.sft import OptimConfig, make_optimizer

    wrt = nnx.All(nnx.Param, nnx.Any(nnx.PathContains("soft_prompt"), nnx.PathContains("projector")))
    opt = nnx.Optimizer(real, make_optimizer(OptimConfig()), wrt=wrt)
    assert row(p, "optimizer").per_device == nbytes(nnx.state(opt))
    assert row(p, "gradients").per_device == nbytes(nnx.state(real, wrt))
    # the base stage plans the plain InternVL (no <COMP_CONTEXT> row, no EMIT modules)
    pb = plan.plan_stage(cfg, plan.stage_setup(cfg, "base", (1, 1, 1)))
    assert row(pb, "weights").per_device == nbytes(nnx.state(real.mllm)) - \
        real.config.text.hidden_size * 4 * (1 if real.config.tie_word_embeddings else 2)


def test_lora_analytic_matches_qwix():
    """The analytic LoRA factors (paths, shapes, logical axes, dtypes) are the ones qwix
    creates, and QLoRA's quantized copy has qwix's qvalue / per-column scale shapes (qwix
    applied to a small EMIT model inside nnx.eval_shape: traced, nothing computed)."""
    import qwix

    from emit_jax.models.emit import EMITConfig
    from emit_jax.training.grpo import lora_provider

    targets = plan.load_config(TINY).grpo.lora.targets
    cfg = architectures.tiny()
    cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, image_size=56, num_hidden_layers=2),
                      text=dataclasses.replace(cfg.text, vocab_size=65, num_hidden_layers=2),
                      image_token_id=63)
    lcfg = ml_collections.ConfigDict(dict(rank=4, alpha=16.0, dropout=0.0, targets=targets,
                                          weight_qtype="nf4"))

    def build():
        m = EMIT(InternVL(cfg, rngs=nnx.Rngs(0)), EMITConfig(comp_token_id=64), rngs=nnx.Rngs(0))
        m.eval()
        ids = np.full((1, 30), 5, np.int32)
        ids[0, 2:6] = 63
        ids[0, 8:8 + m.num_comp_slots] = 64
        return qwix.apply_lora_to_model(m, lora_provider(lcfg), jnp.asarray(ids),
                                        jnp.zeros((1, 3, 56, 56)), jnp.ones((1, 30), jnp.int32),
                                        rngs=nnx.Rngs(1), ce_pixels=jnp.zeros((1, 2, 3, 56, 56)))

    got = {}
    for path, v in nnx.to_flat_state(nnx.state(nnx.eval_shape(build))):
        key = "/".join(map(str, path))
        if key.endswith(("_lora_a", "_lora_b")) or "/array/" in key:
            val = v.get_value()
            got[key.replace("/array/", "/")] = (tuple(val.shape), tuple(v.get_metadata()["out_sharding"]),
                                                jnp.dtype(val.dtype).name)
    names = {4: "uint4", 32: "float32"}
    want = {}
    for kernel, a, b in plan.lora_factors(plan.abstract_variables(cfg, True, 9), targets, 4):
        for x in (a, b) + plan.qlora_arrays(kernel, "nf4", None):
            want[x.path] = (x.shape, x.axes, names[x.bits])
    assert want == got
    assert len([k for k in want if k.endswith("_lora_a")]) == 2 * 7 + 2 * 6


def test_fsdp8_divides_the_8b_weights_and_batch():
    cfg = plan.load_config(GRPO_8B)
    p1 = plan.plan_stage(cfg, plan.stage_setup(cfg, "grpo", (1, 1, 1)))
    p8 = plan.plan_stage(cfg, plan.stage_setup(cfg, "grpo", (1, 8, 1)))
    w1, w8 = row(p1, "weights"), row(p8, "weights")
    assert w1.per_device == w1.whole == w8.whole
    assert 15.5e9 < w8.whole < 16.5e9  # 7.94 B bf16 parameters
    # exactly: sharded arrays / 8 + the replicated small ones (norms, biases, layer scales)
    variables = plan.abstract_variables(plan.model_config(cfg, True), True, 9)
    mesh = plan.abstract_mesh((1, 8, 1))
    replicated = sum(plan.array_bytes(v.shape, v.bits, v.axes, mesh)[1] for v in variables
                     if plan.shards(v.axes or (), v.shape, mesh) == 1)
    assert w8.per_device == (w8.whole - replicated) // 8 + replicated
    assert 0 < replicated < 0.001 * w8.whole
    assert abs(w8.per_device * 8 / w8.whole - 1) < 0.01
    # the batch (64 sequences) splits over fsdp: activations, logits and KV cache divide by 8
    for name in ("activations", "logits", "kv cache"):
        r = row(p8, name)
        assert abs(r.per_device * 8 - r.whole) <= 8, name
        assert row(p1, name).per_device == r.whole
    # LoRA A's input side is fsdp-sharded, B's output side (heads / mlp: tensor) is not
    assert row(p8, "lora").whole / 8 < row(p8, "lora").per_device < row(p8, "lora").whole
    # the reference: a separate copy on a mesh (the code as it is), shared arrays on one device
    assert row(p8, "reference").per_device == w8.per_device
    shared = plan.plan_stage(cfg, dataclasses.replace(p8.setup, reference="shared"))
    assert row(shared, "reference").whole == row(p1, "reference").whole < 0.01 * w8.whole


def test_8b_grpo_on_8_a100s(capsys):
    rep = plan.make_report(plan.load_config(GRPO_8B), GRPO_8B, (1, 8, 1), "a100-80g", 10.0)
    p = rep["plan"]
    parts = {ph: sum(r["per_device"] for r in rep["rows"] if r["phase"] == ph)
             for ph in ("resident", "rollout", "train")}
    assert rep["resident"] == parts["resident"] == sum(
        row(p, n).per_device for n in ("weights", "reference", "lora", "optimizer"))
    assert rep["total"] == parts["resident"] + max(parts["rollout"], parts["train"])
    assert rep["usable"] == int(80 * GiB * 0.9)
    # the 10240-token bucket with materialised attention matrices: far beyond 80 GB
    assert not rep["fits"] and rep["total"] > 1000 * GiB
    assert p.info["attention_saved"] > 0.5 * rep["train"]
    assert rep["suggestions"]
    assert plan.main(["--config", GRPO_8B, "--mesh", "fsdp=8", "--device", "a100-80g"]) == 0
    out = capsys.readouterr().out
    assert "does not fit on a100-80g" in out and "suggestions:" in out
    last = out.strip().splitlines()[-1]
    assert f"needs {rep['total'] / GiB:.2f} GiB" in last


def test_small_step_fits(capsys):
    """A short-prompt plan of the tiny recipe fits a CPU host and says so."""
    assert plan.main(["--config", TINY, "--mesh", "fsdp=1", "--device", "cpu", "--stage", "sft",
                      "--prompt_len", "512", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["fits"] and rep["stage"] == "sft" and rep["suggestions"] == []
    by_phase = {}
    for r in rep["rows"]:
        by_phase[r["phase"]] = by_phase.get(r["phase"], 0) + r["per_device"]
    assert rep["total"] == by_phase["resident"] + max(by_phase.get("rollout", 0), by_phase["train"])
    assert rep["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}
    assert plan.main(["--config", TINY, "--mesh", "fsdp=1", "--device", "cpu", "--stage", "sft",
                      "--prompt_len", "512"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("fits on cpu (")


@pytest.mark.parametrize("argv, needle", [
    (["--config", TINY, "--device", "tpu-v9"], "unknown device 'tpu-v9'"),
    (["--config", TINY, "--mesh", "fsdp=x"], "bad --mesh 'fsdp=x'"),
    (["--config", TINY, "--mesh", "fsdp=2,model=2"], "unknown axes"),
    (["--config", TINY, "--mesh", "data=2,fsdp=-1"], "pass --devices"),
    (["--config", TINY, "--mesh", "data=2,fsdp=-1", "--devices", "3"], "do not divide"),
    (["--config", "configs/nope.py"], "config file not found: configs/nope.py"),
    (["--config", TINY, "--stage", "rlhf"], "unknown stage 'rlhf'"),
    (["--config", TINY, "--set", "grpo.GG=4"], "no config field 'grpo.GG'"),
    (["--config", TINY, "--bogus"], "unrecognized arguments"),
])
def test_bad_input_exits_2_with_one_line(capsys, argv, needle):
    assert plan.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], captured.err


def test_cli_subprocess_exit_code():
    r = subprocess.run([sys.executable, "-m", "emit_jax.plan", "--config", TINY, "--device", "gpu9"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "unknown device 'gpu9'" in r.stderr


def test_activation_formula_against_xla():
    """The train-step activation estimate against XLA's own buffer assignment (CPU
    memory_analysis of the compiled value-and-grad of the tiny model's SFT loss at 1 x 1024
    tokens): the formula is an upper-side estimate, within 1x..1.7x of XLA's temporaries."""
    from emit_jax.training.sft import sft_loss

    mcfg = architectures.get_config("tiny")
    B, T, K, tiles = 1, 1024, 16, 2
    graphdef, params = nnx.split(nnx.eval_shape(lambda: InternVL(mcfg, rngs=nnx.Rngs(0))))

    def step(params, b):
        return nnx.value_and_grad(lambda m: sft_loss(m, b)[0])(nnx.merge(graphdef, params))

    S = jax.ShapeDtypeStruct
    b = {"input_ids": S((B, T), jnp.int32), "attention_mask": S((B, T), jnp.int32),
         "pixel_values": S((tiles, 3, 224, 224), jnp.float32), "label_pos": S((B, K), jnp.int32),
         "label_ids": S((B, K), jnp.int32), "label_mask": S((B, K), bool)}
    temp = jax.jit(step).lower(params, b).compile().memory_analysis().temp_size_in_bytes
    s = plan.Setup(stage="base", mesh=(1, 1, 1), batch=B, prompt_len=T, new_tokens=0,
                   label_tokens=K, images_per_sample=1, max_tiles=1, tile_bucket=tiles)
    p = plan.plan_stage(None, s, mcfg=mcfg, variables=plan.abstract_variables(mcfg, False))
    est = row(p, "activations").per_device + row(p, "logits").per_device
    assert 1.0 <= est / temp <= 1.7, (est, temp)
    np.testing.assert_equal(p.info["batch_per_device"], 1)
