"""emit_jax.plan: per-device memory from abstract shapes and logical shardings."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from emit_jax import plan
from emit_jax.plan import command as plan_command
from emit_jax import configs
from emit_jax.models import architectures
from emit_jax.models.emit import EMIT, EMITConfig
from emit_jax.models.internvl import InternVL
from emit_jax.training.config import LoRAConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "grpo.py")
GRPO_8B = os.path.join(ROOT, "configs", "internvl3_8b_grpo.py")
SFT_8B = os.path.join(ROOT, "configs", "internvl3_8b_sft.py")
GiB = 2 ** 30


def row(p, name):
    return next(r for r in p.rows if r.name == name)


def nbytes(tree) -> int:
    return sum(int(x.nbytes) for x in jax.tree.leaves(tree))


def test_tiny_weights_and_optimizer_equal_the_real_model():
    cfg = configs.load(TINY)
    ecfg = EMITConfig(max_readout=cfg.emit.max_readout)  # the embedded recipe's projector
    # the model train builds from random weights: tiny's, its vocabulary fitted to the tiny
    # tokenizer (planned at its bound, 4,096 entries: <COMP_CONTEXT> last, <IMG_CONTEXT> 4082)
    tiny = architectures.get_config("tiny")
    tiny = tiny.replace(text=dataclasses.replace(tiny.text, vocab_size=4095), image_token_id=4082)
    real = EMIT.create(InternVL(tiny, rngs=nnx.Rngs(0)), ecfg, hint_ids=[1, 2])
    assert real.projector.max_proj is not None
    # stage 1 (EMIT: soft prompt + projector trained), one device
    p = plan.plan_stage(cfg, plan.stage_setup(cfg, "sft", (1, 1, 1)))
    w = row(p, "weights")
    assert w.per_device == w.whole == nbytes(nnx.state(real))
    from emit_jax.training.config import OptimConfig
    from emit_jax.training.optim import make_optimizer

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
    from emit_jax.training.lora import LORA_METHODS, lora_provider

    targets = configs.load(TINY).grpo.lora.targets
    cfg = architectures.tiny()
    cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, image_size=56, num_hidden_layers=2),
                      text=dataclasses.replace(cfg.text, vocab_size=65, num_hidden_layers=2),
                      image_token_id=63)
    lcfg = LoRAConfig(rank=4, alpha=16.0, dropout=0.0, targets=targets, weight_qtype="nf4")

    def build():
        m = EMIT(InternVL(cfg, rngs=nnx.Rngs(0)), EMITConfig(comp_token_id=64), rngs=nnx.Rngs(0))
        m.eval()
        ids = np.full((1, 30), 5, np.int32)
        ids[0, 2:6] = 63
        ids[0, 8:8 + m.num_comp_slots] = 64
        return qwix.apply_lora_to_model(m, lora_provider(lcfg), jnp.asarray(ids),
                                        jnp.zeros((1, 3, 56, 56)), jnp.ones((1, 30), jnp.int32),
                                        rngs=nnx.Rngs(1),
                                      methods=LORA_METHODS, ce_pixels=jnp.zeros((1, 2, 3, 56, 56)))

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
    cfg = configs.load(GRPO_8B)
    p1 = plan.plan_stage(cfg, plan.stage_setup(cfg, "grpo", (1, 1, 1)))
    p8 = plan.plan_stage(cfg, plan.stage_setup(cfg, "grpo", (1, 8, 1), reference="copy"))
    w1, w8 = row(p1, "weights"), row(p8, "weights")
    assert w1.per_device == w1.whole == w8.whole
    assert 15.5e9 < w8.whole < 16.5e9  # 7.94 B bf16 parameters
    # exactly: sharded arrays / 8 + the replicated small ones (norms, biases, layer scales), the
    # trained ones (soft prompt, projector, mlp1) in float32
    from emit_jax.training.lora import TRAINED_IN_FULL

    variables = [plan._master(v) if v.kind == "Param" and plan._in_full(v.path, TRAINED_IN_FULL)
                 else v for v in plan.abstract_variables(plan.model_config(cfg, True), True, 9)]
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
    # the reference: --reference copy is a separate sharded copy on a mesh; shared (the code,
    # the default) only the pre-update fully trained modules, on a mesh as on one device
    assert row(p8, "reference").per_device == w8.per_device
    shared = plan.plan_stage(cfg, dataclasses.replace(p8.setup, reference="shared"))
    assert row(shared, "reference").whole == row(p1, "reference").whole < 0.01 * w8.whole


def _parts(rep):
    return {ph: sum(r["per_device"] for r in rep["rows"] if r["phase"] == ph)
            for ph in ("resident", "rollout", "train")}


def test_8b_grpo_on_8_a100s(capsys):
    """Without gradient accumulation the paper's step (64 completions of up to 10,752 tokens)
    does not fit 8 x 80 GB; the plan says so and offers micro-batches first."""
    cfg = configs.load(GRPO_8B, ["grpo.micro_batch_size=0", "memory.vit_chunk=0",
                                     "memory.attention_chunk=1024"])
    rep = plan.make_report(cfg, GRPO_8B, (1, 8, 1), "a100-80g", 10.0)
    p = rep["plan"]
    assert (p.setup.remat, p.setup.attention_chunk, p.setup.micro_batches) == (True, 1024, 1)
    parts = _parts(rep)
    assert rep["resident"] == parts["resident"] == sum(
        row(p, n).per_device for n in ("weights", "reference", "lora", "optimizer"))
    assert rep["train"] == parts["train"] == sum(
        row(p, n).per_device for n in ("gradients", "activations", "logits"))
    assert rep["rollout"] == parts["rollout"] == row(p, "kv cache").per_device + row(p, "prefill").per_device
    assert rep["total"] == parts["resident"] + max(parts["rollout"], parts["train"])
    assert rep["usable"] == int(80 * GiB * 0.9)
    # remat + 1024-query chunks at 8 x 10752 tokens per device: ~150 GiB, not 80
    assert not rep["fits"] and 100 * GiB < rep["total"] < 250 * GiB
    text = "; ".join(rep["suggestions"])
    assert text.startswith("gradient accumulation: --set grpo.micro_batch_size=")
    assert "fewer G: --set grpo.G=" in text and "smaller attention chunks" in text
    assert "memory.remat=True" not in text  # already on
    assert plan_command.main(["--config", GRPO_8B, "--mesh", "fsdp=8", "--device", "a100-80g",
                      "--set", "grpo.micro_batch_size=0"]) == 0
    out = capsys.readouterr().out
    assert "memory: remat on, attention_chunk 512, vit_chunk 64" in out
    assert "does not fit on a100-80g" in out and "suggestions:" in out


@pytest.mark.parametrize("config,stage", [(GRPO_8B, "grpo"), (SFT_8B, "sft")])
@pytest.mark.parametrize("mesh,device", [((1, 8, 1), "a100-80g"), ((1, 8, 1), "h100-80g"),
                                         ((1, 4, 1), "v5p")])
def test_8b_configs_fit_8_x_80gb_and_a_v5p_8(config, stage, mesh, device):
    """As shipped (micro-batches of 16, remat, 512-query chunks, ViT chunks of 64) both 8B
    stages fit 8 x 80 GB and a TPU v5p-8 (4 chips) with the 10 % headroom and more to spare."""
    cfg = configs.load(config)
    rep = plan.make_report(cfg, config, mesh, device, 10.0)
    p = rep["plan"]
    assert rep["stage"] == stage and p.setup.micro_batches == 4 and p.setup.train_rows == 16
    assert rep["fits"] and rep["total"] < 0.85 * rep["usable"], rep["total"] / GiB
    # the trained arrays are float32 (master weights), AdamW's moments too
    assert "float32" in row(p, "weights").note


def test_remat_and_chunks_each_reduce_the_8b_activations(capsys):
    """Each memory switch lowers the 8B grpo train step (and chunking the prefill); with both
    off the materialised attention matrices dominate and the suggestions offer the switches."""
    cfg = configs.load(GRPO_8B, ["memory.remat=False", "memory.attention_chunk=0",
                                     "memory.vit_chunk=0", "grpo.micro_batch_size=0"])
    off = plan.stage_setup(cfg, "grpo", (1, 8, 1))
    assert (off.remat, off.attention_chunk) == (False, 0)
    plans = {(r, c): plan.plan_stage(cfg, dataclasses.replace(off, remat=r, attention_chunk=c))
             for r in (False, True) for c in (0, 1024, 256)}
    act = {k: row(p, "activations").per_device for k, p in plans.items()}
    for c in (0, 1024, 256):
        assert act[True, c] < act[False, c], c  # remat
    for r in (False, True):
        assert act[r, 256] < act[r, 1024] < act[r, 0], r  # chunking, smaller chunks
    assert act[True, 1024] < 0.02 * act[False, 0]
    pre = {k: row(p, "prefill").per_device for k, p in plans.items()}
    assert pre[False, 256] < pre[False, 1024] < pre[False, 0] == pre[True, 0]
    for p in plans.values():  # still the sum of the parts; the rest does not move
        assert p.train == sum(r.per_device for r in p.rows if r.phase == "train")
        assert p.total == p.resident + max(p.rollout, p.train)
        assert p.resident == plans[False, 0].resident
        assert row(p, "logits").per_device == row(plans[False, 0], "logits").per_device
    rep = plan.make_report(cfg, GRPO_8B, (1, 8, 1), "a100-80g", 10.0)
    assert not rep["fits"] and rep["total"] > 1000 * GiB
    assert rep["info"]["attention_saved"] > 0.5 * rep["train"]
    text = "; ".join(rep["suggestions"])
    assert "--set memory.remat=True" in text and "--set memory.attention_chunk=" in text
    # --set reaches the plan through the CLI too
    assert plan_command.main(["--config", GRPO_8B, "--mesh", "fsdp=8", "--json", "--set", "memory.remat=False",
                      "--set", "memory.attention_chunk=0", "--set", "memory.vit_chunk=0",
                      "--set", "grpo.micro_batch_size=0"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["total"] == rep["total"] and got["info"]["remat"] is False
    assert got["setup"]["attention_chunk"] == 0


def test_small_step_fits(capsys):
    """A short-prompt plan of the tiny recipe fits a CPU host and says so."""
    assert plan_command.main(["--config", TINY, "--mesh", "fsdp=1", "--device", "cpu", "--stage", "sft",
                      "--prompt_len", "512", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["fits"] and rep["stage"] == "sft" and rep["suggestions"] == []
    by_phase = {}
    for r in rep["rows"]:
        by_phase[r["phase"]] = by_phase.get(r["phase"], 0) + r["per_device"]
    assert rep["total"] == by_phase["resident"] + max(by_phase.get("rollout", 0), by_phase["train"])
    assert rep["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}
    assert plan_command.main(["--config", TINY, "--mesh", "fsdp=1", "--device", "cpu", "--stage", "sft",
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
    (["--config", TINY, "--set", "grpo.GG=4"], "config grpo.GG: no such field"),
    (["--config", TINY, "--set", "memory.attention_chunk=-8"], "memory.attention_chunk -8"),
    (["--config", TINY, "--set", "memory.remat=maybe"], "memory.remat=maybe"),
    (["--config", TINY, "--bogus"], "unrecognized arguments"),
])
def test_bad_input_exits_2_with_one_line(capsys, argv, needle):
    assert plan_command.main(argv) == 2
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


@pytest.mark.parametrize("remat, chunk, lo, hi", [(False, 0, 1.0, 1.7), (False, 128, 1.0, 1.7),
                                                   (True, 128, 0.85, 1.3)])
def test_activation_formula_against_xla(remat, chunk, lo, hi):
    """The train-step activation estimate against XLA's own buffer assignment (CPU
    memory_analysis of the compiled value-and-grad of the SFT loss of a small model, 4 decoder
    layers of width 256, at 1 x 1024 tokens), without and with the memory switches (traced
    under ``memory_options``): within [lo, hi] x XLA's temporaries. Without remat the formula
    is an upper-side estimate; with remat + chunks it tracks XLA closely."""
    from emit_jax.models.memory import memory_options
    from emit_jax.training.sft import sft_loss

    mcfg = architectures.get_config("tiny")
    mcfg = mcfg.replace(vision=dataclasses.replace(mcfg.vision, image_size=56, num_hidden_layers=1),
                        text=dataclasses.replace(mcfg.text, hidden_size=256, intermediate_size=1024,
                                                 vocab_size=4096), image_token_id=4000)
    B, T, K, tiles = 1, 1024, 16, 2
    graphdef, params = nnx.split(nnx.eval_shape(lambda: InternVL(mcfg, rngs=nnx.Rngs(0))))

    def step(params, b):
        return nnx.value_and_grad(lambda m: sft_loss(m, b)[0])(nnx.merge(graphdef, params))

    S = jax.ShapeDtypeStruct
    b = {"input_ids": S((B, T), jnp.int32), "attention_mask": S((B, T), jnp.int32),
         "pixel_values": S((tiles, 3, 56, 56), jnp.float32), "label_pos": S((B, K), jnp.int32),
         "label_ids": S((B, K), jnp.int32), "label_mask": S((B, K), bool)}
    with memory_options(remat=remat, attention_chunk=chunk):  # read at trace time
        temp = jax.jit(step).lower(params, b).compile().memory_analysis().temp_size_in_bytes
    s = plan.Setup(stage="base", mesh=(1, 1, 1), batch=B, prompt_len=T, new_tokens=0,
                   label_tokens=K, images_per_sample=1, max_tiles=1, tile_bucket=tiles,
                   remat=remat, attention_chunk=chunk)
    p = plan.plan_stage(None, s, mcfg=mcfg, variables=plan.abstract_variables(mcfg, False))
    est = row(p, "activations").per_device + row(p, "logits").per_device
    assert lo <= est / temp <= hi, (est, temp)
    np.testing.assert_equal(p.info["batch_per_device"], 1)
