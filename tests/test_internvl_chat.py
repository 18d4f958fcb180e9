"""The EMIT authors' ``internvl_chat`` format, both ways (issue 28).

Reference folders are written here from a transformers ``InternVLForConditionalGeneration`` by a
test-side converter that follows the published key table, with the authors' key names and config
fields as data (tests/fixtures/internvl_chat/authors_format.json): imported, the base model must
give transformers' logits; the EMIT parts must equal NumPy's BatchNorm + conv; export -> import
must give every tensor back bit for bit under exactly the authors' names.
"""

import json
import os
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import hf_config, hf_positions, make_hf_model, token_batch
from test_interop import read_all
from emit_jax import checkpoint, hf, internvl_chat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORMAT = json.load(open(os.path.join(ROOT, "tests", "fixtures", "internvl_chat",
                                     "authors_format.json")))

# transformers (in-memory names) -> the authors' names: the table of the issue, as regexes
HF_TO_CHAT = [
    (r"^model\.language_model\.", "language_model.model."),
    (r"^lm_head\.weight$", "language_model.lm_head.weight"),
    (r"^model\.vision_tower\.embeddings\.cls_token$", "vision_model.embeddings.class_embedding"),
    (r"^model\.vision_tower\.embeddings\.patch_embeddings\.projection\.",
     "vision_model.embeddings.patch_embedding."),
    (r"^model\.vision_tower\.embeddings\.position_embeddings$",
     "vision_model.embeddings.position_embedding"),
    (r"^model\.vision_tower\.encoder\.layer\.(\d+)\.attention\.projection_layer\.",
     r"vision_model.encoder.layers.\1.attn.proj."),
    (r"^model\.vision_tower\.encoder\.layer\.(\d+)\.attention\.(q_norm|k_norm)\.",
     r"vision_model.encoder.layers.\1.attn.\2."),
    (r"^model\.vision_tower\.encoder\.layer\.(\d+)\.layernorm_before\.",
     r"vision_model.encoder.layers.\1.norm1."),
    (r"^model\.vision_tower\.encoder\.layer\.(\d+)\.layernorm_after\.",
     r"vision_model.encoder.layers.\1.norm2."),
    (r"^model\.vision_tower\.encoder\.layer\.(\d+)\.lambda_1$", r"vision_model.encoder.layers.\1.ls1"),
    (r"^model\.vision_tower\.encoder\.layer\.(\d+)\.lambda_2$", r"vision_model.encoder.layers.\1.ls2"),
    (r"^model\.vision_tower\.encoder\.layer\.(\d+)\.mlp\.", r"vision_model.encoder.layers.\1.mlp."),
    (r"^model\.multi_modal_projector\.layer_norm\.", "mlp1.0."),
    (r"^model\.multi_modal_projector\.linear_1\.", "mlp1.1."),
    (r"^model\.multi_modal_projector\.linear_2\.", "mlp1.3."),
]
QKV = re.compile(r"^model\.vision_tower\.encoder\.layer\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)$")


def chat_state_dict(model):
    """A transformers InternVL's tensors under the authors' names (q, k, v rows fused)."""
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    out, qkv = {}, {}
    for k, v in sd.items():
        m = QKV.match(k)
        if m:
            qkv.setdefault((m[1], m[3]), {})[m[2]] = v
            continue
        for pat, rep in HF_TO_CHAT:
            if re.match(pat, k):
                out[re.sub(pat, rep, k)] = v
                break
        else:
            raise AssertionError(f"no authors' name for {k}")
    for (i, w), parts in qkv.items():
        out[f"vision_model.encoder.layers.{i}.attn.qkv.{w}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]], 0)
    if "language_model.lm_head.weight" not in out:  # theirs is never tied
        out["language_model.lm_head.weight"] = out["language_model.model.embed_tokens.weight"].clone()
    return out


def chat_config_json(cfg, dtype="float32", emit=True):
    """InternVL3-8B's config.json at toy size (the fields their classes read)."""
    v, t = cfg.vision_config, cfg.text_config
    return {
        "architectures": ["CustomizedInternVLChatModel" if emit else "InternVLChatModel"],
        "auto_map": FORMAT["config"]["auto_map"], "model_type": "internvl_chat",
        "downsample_ratio": 0.5, "dynamic_image_size": True, "force_image_size": v.image_size[0],
        "max_dynamic_patch": 12, "min_dynamic_patch": 1, "pad2square": False, "ps_version": "v2",
        "select_layer": -1, "template": "internvl2_5", "tie_word_embeddings": False,
        "torch_dtype": dtype, "use_backbone_lora": 0, "use_llm_lora": 0, "use_thumbnail": True,
        "llm_config": {
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
            "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers, "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads, "vocab_size": t.vocab_size,
            "rms_norm_eps": t.rms_norm_eps, "rope_theta": 10000.0, "rope_scaling": None,
            "max_position_embeddings": t.max_position_embeddings, "hidden_act": "silu",
            "tie_word_embeddings": False, "use_sliding_window": False, "torch_dtype": dtype,
            "bos_token_id": 0, "eos_token_id": 1},
        "vision_config": {
            "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b",
            "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
            "num_hidden_layers": v.num_hidden_layers, "num_attention_heads": v.num_attention_heads,
            "image_size": v.image_size[0], "patch_size": v.patch_size[0], "num_channels": 3,
            "norm_type": v.norm_type, "qk_normalization": v.use_qk_norm,
            "qkv_bias": v.attention_bias, "layer_norm_eps": v.layer_norm_eps,
            "hidden_act": "gelu", "initializer_factor": 1.0, "initializer_range": 0.02,
            "drop_path_rate": 0.1, "dropout": 0.0, "attention_dropout": 0.0,
            "use_flash_attn": True, "torch_dtype": dtype},
    }


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """The tiny byte-level BPE with EMIT's tokens (<IMG_CONTEXT>, <COMP_CONTEXT>)."""
    from emit_jax.data.tokenizer import train_tiny_tokenizer

    folder = tmp_path_factory.mktemp("tok")
    tok = train_tiny_tokenizer(None, folder, vocab_size=600)
    return str(folder), tok


def emit_tensors(hidden, seed=0, soft=9, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {
        "soft_prompt.weight": torch.randn(soft, hidden, generator=g).to(dtype),
        "projector.0.weight": torch.tensor([1.3]).to(dtype),
        "projector.0.bias": torch.tensor([-0.2]).to(dtype),
        "projector.0.running_mean": torch.tensor([0.05]).to(dtype),
        "projector.0.running_var": torch.tensor([0.02]).to(dtype),
        "projector.0.num_batches_tracked": torch.tensor(6000, dtype=torch.int64),
        "projector.1.weight": (torch.randn(hidden, 1, 4, 4, generator=g) * 0.3).to(dtype),
        "projector.1.bias": (torch.randn(hidden, generator=g) * 0.1).to(dtype),
    }


def write_chat_folder(folder, model, cfg, tok_dir, *, emit=None, dtype="float32", shards=1,
                      config_edit=None):
    """The authors' folder: safetensors (``shards`` files + index), config.json, tokenizer."""
    from emit_jax.hf import copy_assets

    os.makedirs(folder, exist_ok=True)
    sd = chat_state_dict(model)
    sd.update(emit or {})
    keys = sorted(sd)
    if shards == 1:
        save_file(sd, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for s in range(shards):
            name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: sd[k] for k in keys[s::shards]}
            save_file(part, os.path.join(folder, name), metadata={"format": "pt"})
            weight_map.update({k: name for k in part})
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    conf = chat_config_json(cfg, dtype, emit=emit is not None)
    if config_edit:
        config_edit(conf)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(conf, f, indent=2)
    if tok_dir:
        copy_assets(tok_dir, folder)
    return str(folder)


def toy(tok, *, vision_layers=2, image_size=56, seed=0, dtype=None, vit="layer_norm"):
    vocab = len(tok)
    cfg = hf_config(vocab=vocab, image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
                    vision_layers=vision_layers, image_size=image_size, vit=vit)
    return cfg, make_hf_model(cfg, seed=seed, dtype=dtype)


def golden_keys(vision_layers, text_layers, emit=True):
    keys = set(FORMAT["vision"]) | set(FORMAT["llm"]) | set(FORMAT["mlp1"])
    keys |= {k.format(i=i) for k in FORMAT["vision_layer"] for i in range(vision_layers)}
    keys |= {k.format(i=i) for k in FORMAT["llm_layer"] for i in range(text_layers)}
    if emit:
        keys |= set(FORMAT["emit"])
    return keys


def torch_logits(model, ids, mask, pix):
    """transformers' logits for left-padded ids with pixel tiles (generate's positions)."""
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(hf_positions(mask)),
                     pixel_values=torch.tensor(pix)).logits.numpy()


def cli(*args):
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def _assert_cli_error(r, *needles):
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in r.stderr, r.stderr[-2000:]
    for n in needles:
        assert n in lines[0], lines[0]


# ------------------------------------------------------------------ the key table
def test_key_names_both_ways_cover_the_authors_layout():
    for k in FORMAT["vision"] + FORMAT["mlp1"] + FORMAT["llm"] + \
            [k.format(i=3) for k in FORMAT["vision_layer"] + FORMAT["llm_layer"]]:
        if ".attn.qkv." in k:
            continue
        h = internvl_chat.to_hf_key(k)
        assert h is not None, k
        assert internvl_chat.to_chat_key(h) == k
    assert internvl_chat.to_chat_key("vision_tower.encoder.layer.7.attention.k_proj.bias") == \
        "vision_model.encoder.layers.7.attn.qkv.bias"
    assert set(internvl_chat.EMIT_KEYS) == set(FORMAT["emit"])


INTERNVL3_8B = {  # OpenGVLab/InternVL3-8B's config.json, the fields the port reads
    "architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "downsample_ratio": 0.5,
    "force_image_size": 448, "ps_version": "v2", "select_layer": -1, "template": "internvl2_5",
    "torch_dtype": "bfloat16",
    "llm_config": {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 3584,
                   "intermediate_size": 18944, "max_position_embeddings": 32768,
                   "model_type": "qwen2", "num_attention_heads": 28, "num_hidden_layers": 28,
                   "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
                   "rope_scaling": {"factor": 2.0, "rope_type": "dynamic", "type": "dynamic"},
                   "rope_theta": 1000000.0, "vocab_size": 151675, "torch_dtype": "bfloat16"},
    "vision_config": {"architectures": ["InternVisionModel"], "hidden_size": 1024,
                      "image_size": 448, "intermediate_size": 4096, "model_type": "intern_vit_6b",
                      "norm_type": "layer_norm", "num_attention_heads": 16,
                      "num_hidden_layers": 24, "patch_size": 14, "qk_normalization": False,
                      "qkv_bias": True, "layer_norm_eps": 1e-6},
}


def test_emit_8b_shape_has_exactly_the_authors_keys():
    """At EMIT-8B's real shape (abstract, nothing allocated): the config translates, the model is
    exportable without a warning, 265 CE + SP slots, and the export names are exactly the
    authors' 693 keys (24 ViT and 28 LLM layers)."""
    from flax import nnx

    from emit_jax.models.emit import EMIT
    from emit_jax.models.internvl import InternVL

    cfg = internvl_chat.config_from_chat(INTERNVL3_8B, image_token_id=151667)
    assert (cfg.text.rope_type, cfg.text.rope_factor, cfg.vision.use_qk_norm,
            cfg.vision.attention_bias, cfg.tokens_per_tile) == ("dynamic", 2.0, False, True, 256)
    ecfg = internvl_chat.emit_config_for(cfg, comp_token_id=151674, soft_tokens=9)
    model = nnx.eval_shape(lambda: EMIT(InternVL(cfg, rngs=nnx.Rngs(0)), ecfg, rngs=nnx.Rngs(0)))
    assert internvl_chat.check_exportable(model) == [] and model.num_comp_slots == 265
    names = [n for n, _, _ in internvl_chat.chat_tensors(model)]
    assert len(names) == len(set(names)) == 693
    assert set(names) == golden_keys(24, 28)


# ------------------------------------------------------------------ import
@pytest.mark.parametrize("vit", ["layer_norm", "rms_norm"])
def test_import_plain_internvl_matches_transformers(vit, tokenizer_dir, tmp_path):
    """OpenGVLab's format (no EMIT tensors) imports as a plain InternVL with transformers' logits."""
    tok_dir, tok = tokenizer_dir
    cfg, model = toy(tok, vit=vit, seed=3)
    src = write_chat_folder(tmp_path / "chat", model, cfg, tok_dir, shards=2)
    jm, info = internvl_chat.load(src)
    assert type(jm).__name__ == "InternVL" and info["num_batches_tracked"] is None
    assert not jm.config.tie_word_embeddings
    per_image = (56 // 14 // 2) ** 2
    ids, mask = token_batch(cfg.text_config.vocab_size, cfg.image_token_id,
                            (2 * per_image, per_image), length=2 * per_image + 12, pad=(0, 4))
    pix = np.random.RandomState(0).randn(3, 3, 56, 56).astype(np.float32)
    ref = torch_logits(model, ids, mask, pix)
    out = np.asarray(jm(jnp.asarray(ids), jnp.asarray(pix), jnp.asarray(mask)))
    real = mask.astype(bool)
    assert np.abs(ref[real]).max() > 1.0
    assert np.abs(out - ref)[real].max() < 1e-4
    if vit == "layer_norm":  # twenty-second probe X52/X55: EMIT's flags on a plain InternVL
        for flags in (["--window", "3"], ["--ce-layers", "1,2", "--bn-mode", "standard"]):
            _assert_cli_error(cli("emit_jax.convert", "--hf", src, "--out",
                                  str(tmp_path / "out"), *flags),
                              f"{src}: {' / '.join(f for f in flags if f.startswith('--'))} set "
                              "EMIT's heat map, and this internvl_chat folder holds no EMIT "
                              "tensors (soft_prompt, projector): a plain InternVL; leave the "
                              "flags out")
            assert not (tmp_path / "out").exists()


def _numpy_projector(heat, t):
    """BatchNorm2d(1) in eval mode + Conv2d(1 -> D, 4, stride 2, padding 1), the authors'
    projector, in NumPy: heat [B, h, w] -> tokens [B, (h/2)(w/2), D] (row-major cells)."""
    w, b = t["projector.0.weight"].float().numpy(), t["projector.0.bias"].float().numpy()
    mean, var = t["projector.0.running_mean"].float().numpy(), t["projector.0.running_var"].float().numpy()
    y = (heat - mean[0]) / np.sqrt(var[0] + 1e-5) * w[0] + b[0]
    k = t["projector.1.weight"].float().numpy()[:, 0]  # [D, 4, 4]
    bias = t["projector.1.bias"].float().numpy()
    B, h, wd = y.shape
    p = np.pad(y, ((0, 0), (1, 1), (1, 1)))
    out = np.zeros((B, h // 2, wd // 2, k.shape[0]))
    for i in range(h // 2):
        for j in range(wd // 2):
            patch = p[:, 2 * i:2 * i + 4, 2 * j:2 * j + 4]  # [B, 4, 4]
            out[:, i, j] = np.einsum("bxy,dxy->bd", patch, k) + bias
    return out.reshape(B, -1, k.shape[0])


def test_import_emit_uses_the_authors_constants_and_numpy_projector(tokenizer_dir, tmp_path):
    tok_dir, tok = tokenizer_dir
    cfg, model = toy(tok, vision_layers=20, image_size=112, seed=1)
    extra = emit_tensors(cfg.text_config.hidden_size)
    src = write_chat_folder(tmp_path / "emit", model, cfg, tok_dir, emit=extra)
    r = cli("emit_jax.convert", "--hf", src, "--out", str(tmp_path / "ckpt"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "internvl_chat" in r.stdout and "EMIT" in r.stdout
    em, meta = checkpoint.load_model(str(tmp_path / "ckpt"))
    e = em.emit_config
    assert e.ce_layers == (4, 8, 16, 20) and e.window == 6 and e.rotations == 4
    assert e.num_soft_tokens == 9 and e.zero_fill and e.bn_mode == "official"
    assert e.comp_token_id == tok.convert_tokens_to_ids("<COMP_CONTEXT>")
    assert em.num_comp_slots == 9 + (112 // 14 // 2) ** 2
    assert meta["internvl_chat"]["num_batches_tracked"] == 6000
    assert meta["internvl_chat"]["config"]["template"] == "internvl2_5"
    np.testing.assert_array_equal(np.asarray(em.soft_prompt[...]), extra["soft_prompt.weight"].numpy())
    em.eval()
    heat = np.random.RandomState(0).rand(2, 8, 8).astype(np.float32)
    ours = np.asarray(em.projector(jnp.asarray(heat)))
    np.testing.assert_allclose(ours, _numpy_projector(heat, extra), rtol=1e-5, atol=1e-5)
    # the InternVL part is transformers' model
    ids, mask = token_batch(cfg.text_config.vocab_size, cfg.image_token_id, (16, 0), length=28,
                            pad=(0, 3))
    pix = np.random.RandomState(1).randn(1, 3, 112, 112).astype(np.float32)
    ref = torch_logits(model, ids, mask, pix)
    out = np.asarray(em.mllm(jnp.asarray(ids), jnp.asarray(pix), jnp.asarray(mask)))
    assert np.abs(out - ref)[mask.astype(bool)].max() < 1e-4
    # overrides: the window of NEIGHBOR_DIS=3, other blocks
    r = cli("emit_jax.convert", "--hf", src, "--out", str(tmp_path / "ckpt2"), "--window", "3",
            "--ce-layers", "2,4,6,8", "--bn-mode", "standard")
    assert r.returncode == 0, r.stderr[-3000:]
    e2 = checkpoint.load_model(str(tmp_path / "ckpt2"))[0].emit_config
    assert (e2.window, e2.ce_layers, e2.bn_mode) == (3, (2, 4, 6, 8), "standard")


# ------------------------------------------------------------------ export and the round trip
def test_import_export_import_round_trip_bit_for_bit(tokenizer_dir, tmp_path):
    tok_dir, tok = tokenizer_dir
    cfg, model = toy(tok, vision_layers=20, image_size=112, seed=2, dtype=torch.bfloat16)
    extra = emit_tensors(cfg.text_config.hidden_size, dtype=torch.bfloat16)
    src = write_chat_folder(tmp_path / "src", model, cfg, tok_dir, emit=extra, dtype="bfloat16",
                            shards=3)
    ck = str(tmp_path / "ckpt")
    assert cli("emit_jax.convert", "--hf", src, "--out", ck).returncode == 0
    out = str(tmp_path / "out")
    r = cli("emit_jax.export", "--checkpoint", ck, "--out", out, "--format", "internvl_chat",
            "--max-shard-size", "200KB")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "warning" not in r.stderr
    a, b = read_all(src), read_all(out)
    # exactly the authors' names: nothing missing, nothing unexpected
    assert set(b) == golden_keys(20, 2)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == b[k], k
    assert b["projector.0.num_batches_tracked"][:2] == ("int64", ())
    assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    conf = json.load(open(os.path.join(out, "config.json")))
    for k, v in FORMAT["config"].items():
        assert conf[k] == v, k
    assert set(FORMAT["config_fields"]) <= set(conf)
    assert set(FORMAT["vision_config_fields"]) <= set(conf["vision_config"])
    for sub in ("vision_config", "llm_config"):
        for k, v in FORMAT[sub].items():
            assert conf[sub][k] == v, (sub, k)
    src_conf = json.load(open(os.path.join(src, "config.json")))
    assert conf == src_conf  # every field of the source survives
    # and back again: the same parameters
    ck2 = str(tmp_path / "ckpt2")
    assert cli("emit_jax.convert", "--hf", out, "--out", ck2).returncode == 0
    m1, _ = checkpoint.load_model(ck)
    m2, meta2 = checkpoint.load_model(ck2)
    from flax import nnx
    s1, s2 = nnx.to_flat_state(nnx.state(m1)), nnx.to_flat_state(nnx.state(m2))
    assert [p for p, _ in s1] == [p for p, _ in s2]
    for (p, x), (_, y) in zip(s1, s2):
        x, y = np.asarray(x.get_value()), np.asarray(y.get_value())
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), p
    assert m2.emit_config == m1.emit_config and meta2["internvl_chat"]["num_batches_tracked"] == 6000


def test_exported_tokenizer_loads_slow_and_fast_with_comp_token(tokenizer_dir, tmp_path):
    """Their evaluation loads the tokenizer with use_fast=False: the slow files alone
    (vocab.json, merges.txt, added tokens) must give the same ids as the fast tokenizer."""
    from transformers import AutoTokenizer

    tok_dir, tok = tokenizer_dir
    cfg, model = toy(tok, vision_layers=20, image_size=112, seed=4)
    src = write_chat_folder(tmp_path / "src", model, cfg, tok_dir,
                            emit=emit_tensors(cfg.text_config.hidden_size))
    ck, out = str(tmp_path / "ck"), str(tmp_path / "out")
    assert cli("emit_jax.convert", "--hf", src, "--out", ck).returncode == 0
    r = cli("emit_jax.export", "--checkpoint", ck, "--out", out, "--format", "internvl_chat")
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("vocab.json", "merges.txt", "added_tokens.json", "tokenizer_config.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    tc = json.load(open(os.path.join(out, "tokenizer_config.json")))
    assert tc["tokenizer_class"] == "Qwen2Tokenizer"
    assert "<COMP_CONTEXT>" in {t["content"] for t in tc["added_tokens_decoder"].values()}
    slow_only = tmp_path / "slow"
    slow_only.mkdir()
    for name in ("vocab.json", "merges.txt", "added_tokens.json", "tokenizer_config.json",
                 "special_tokens_map.json"):
        if os.path.isfile(os.path.join(out, name)):
            (slow_only / name).write_bytes(open(os.path.join(out, name), "rb").read())
    slow = AutoTokenizer.from_pretrained(str(slow_only), use_fast=False, local_files_only=True)
    text = ("<|im_start|>user\nImage-1: <img><IMG_CONTEXT><IMG_CONTEXT></img>\nIs there any "
            "defect in the object? A crack on the pill.<COMP_CONTEXT><|im_end|>\n")
    assert slow(text)["input_ids"] == tok(text)["input_ids"]
    assert slow.convert_tokens_to_ids("<COMP_CONTEXT>") == tok.convert_tokens_to_ids("<COMP_CONTEXT>")


def test_plain_internvl_exports_for_opengvlab_class(tokenizer_dir, save_hf, tmp_path):
    """A transformers InternVL (tied embeddings) -> internvl_chat: untied lm_head, no EMIT keys,
    InternVLChatModel; importing it back gives the same logits."""
    tok_dir, tok = tokenizer_dir
    cfg = hf_config(vocab=len(tok), image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
                    tied=True)
    model = make_hf_model(cfg, seed=5)
    src = save_hf(model, "hfsrc")
    from emit_jax.hf import copy_assets
    copy_assets(tok_dir, src)
    ck, out = str(tmp_path / "ck"), str(tmp_path / "out")
    assert cli("emit_jax.convert", "--hf", src, "--out", ck).returncode == 0
    r = cli("emit_jax.export", "--checkpoint", ck, "--out", out, "--format", "internvl_chat")
    assert r.returncode == 0, r.stderr[-3000:]
    assert set(read_all(out)) == golden_keys(2, 2, emit=False)
    conf = json.load(open(os.path.join(out, "config.json")))
    assert conf["architectures"] == ["InternVLChatModel"] and conf["tie_word_embeddings"] is False
    back = hf.load(out)  # hf.load reads the internvl_chat folder too
    ids, mask = token_batch(cfg.text_config.vocab_size, cfg.image_token_id, (4, 0), length=16)
    pix = np.random.RandomState(2).randn(1, 3, 56, 56).astype(np.float32)
    ref = torch_logits(model, ids, mask, pix)
    got = np.asarray(back(jnp.asarray(ids), jnp.asarray(pix), jnp.asarray(mask)))
    assert np.abs(got - ref)[mask.astype(bool)].max() < 1e-4


# ------------------------------------------------------------------ what is refused
def test_export_refuses_what_their_code_cannot_represent(tokenizer_dir, tmp_path):
    """The tiny EMIT (a 6-block ViT: CE layers 1, 2, 4, 5) cannot be their model; max_readout
    cannot either; a window other than 6 exports with a NEIGHBOR_DIS warning."""
    from flax import nnx

    from emit_jax.models.architectures import get_config
    from emit_jax.models.emit import EMIT, EMITConfig
    from emit_jax.models.internvl import InternVL

    tok_dir, tok = tokenizer_dir
    comp = tok.convert_tokens_to_ids("<COMP_CONTEXT>")
    cfg = get_config("tiny").replace(
        text=get_config("tiny").text.__class__(**{**get_config("tiny").text.__dict__,
                                                  "vocab_size": len(tok)}),
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"))
    tiny = EMIT(InternVL(cfg, rngs=nnx.Rngs(0)), EMITConfig(comp_token_id=comp), rngs=nnx.Rngs(0))
    with pytest.raises(internvl_chat.ConfigError, match=r"CE layers \(1, 2, 4, 5\)"):
        internvl_chat.check_exportable(tiny)
    ck = str(tmp_path / "tiny")
    checkpoint.save_model(tiny, ck, assets_from=tok_dir)
    r = cli("emit_jax.export", "--checkpoint", ck, "--out", str(tmp_path / "o"), "--format",
            "internvl_chat")
    _assert_cli_error(r, "CE layers (1, 2, 4, 5)", "--format transformers")
    assert not os.path.exists(tmp_path / "o")

    cfg24 = cfg.replace(vision=cfg.vision.__class__(**{**cfg.vision.__dict__,
                                                       "num_hidden_layers": 20}))
    readout = EMIT(InternVL(cfg24, rngs=nnx.Rngs(0)),
                   EMITConfig(comp_token_id=comp, max_readout=True), rngs=nnx.Rngs(0))
    with pytest.raises(internvl_chat.ConfigError, match="max_readout"):
        internvl_chat.check_exportable(readout)
    located = EMIT(InternVL(cfg24, rngs=nnx.Rngs(0)),
                   EMITConfig(comp_token_id=comp, peak_location=True), rngs=nnx.Rngs(0))
    with pytest.raises(internvl_chat.ConfigError, match="peak_location"):
        internvl_chat.check_exportable(located)
    hot = EMIT(InternVL(cfg24, rngs=nnx.Rngs(0)),
               EMITConfig(comp_token_id=comp, hot_patches=8), rngs=nnx.Rngs(0))
    with pytest.raises(internvl_chat.ConfigError, match="hot_patches"):
        internvl_chat.check_exportable(hot)
    turning = EMIT(InternVL(cfg24, rngs=nnx.Rngs(0)),
                   EMITConfig(comp_token_id=comp, ce_layers=(4, 8, 16, 20), reference_turns=4),
                   rngs=nnx.Rngs(0))
    with pytest.raises(internvl_chat.ConfigError, match="reference_turns 4; theirs turn the "
                       "reference by rot90 only"):
        internvl_chat.check_exportable(turning)
    turning = EMIT(InternVL(cfg24, rngs=nnx.Rngs(0)),
                   EMITConfig(comp_token_id=comp, ce_layers=(4, 8, 16, 20), feature_turns=2),
                   rngs=nnx.Rngs(0))
    with pytest.raises(internvl_chat.ConfigError, match="feature_turns 2; theirs"):
        internvl_chat.check_exportable(turning)
    soft = EMIT(InternVL(cfg24, rngs=nnx.Rngs(0)),
                EMITConfig(comp_token_id=comp, ce_layers=(4, 8, 16, 20), num_soft_tokens=4),
                rngs=nnx.Rngs(0))
    with pytest.raises(internvl_chat.ConfigError, match="4 soft-prompt tokens"):
        internvl_chat.check_exportable(soft)
    # the window scaled to the 16-patch grid is 3: exportable, with the NEIGHBOR_DIS to use
    ok = EMIT(InternVL(cfg24, rngs=nnx.Rngs(0)),
              EMITConfig(comp_token_id=comp, ce_layers=(4, 8, 16, 20)), rngs=nnx.Rngs(0))
    warnings = internvl_chat.check_exportable(ok)
    assert len(warnings) == 1 and "NEIGHBOR_DIS=3" in warnings[0]


@pytest.mark.parametrize("edit,needle", [
    (lambda c: c.update(ps_version="v1"), "ps_version 'v1'"),
    (lambda c: c.pop("ps_version"), "ps_version 'v1'"),  # InternVLChatConfig's default
    (lambda c: c["llm_config"].update(architectures=["InternLM2ForCausalLM"]), "InternLM2ForCausalLM"),
    (lambda c: c.update(force_image_size=448), "force_image_size 448"),
])
def test_convert_refuses_unsupported_configs(edit, needle, tokenizer_dir, tmp_path):
    tok_dir, tok = tokenizer_dir
    cfg, model = toy(tok)
    src = write_chat_folder(tmp_path / "bad", model, cfg, tok_dir, config_edit=edit)
    r = cli("emit_jax.convert", "--hf", src, "--out", str(tmp_path / "ck"))
    _assert_cli_error(r, "config.json", needle)
    assert not os.path.exists(tmp_path / "ck")


def test_convert_refuses_incomplete_emit_and_missing_comp_token(tokenizer_dir, tmp_path):
    tok_dir, tok = tokenizer_dir
    cfg, model = toy(tok, vision_layers=20, image_size=112)
    extra = emit_tensors(cfg.text_config.hidden_size)
    del extra["projector.1.bias"]
    src = write_chat_folder(tmp_path / "partial", model, cfg, tok_dir, emit=extra)
    _assert_cli_error(cli("emit_jax.convert", "--hf", src, "--out", str(tmp_path / "a")),
                      "projector.1.bias missing")
    # a tokenizer without <COMP_CONTEXT>: the id cannot be known
    src2 = write_chat_folder(tmp_path / "nocomp", model, cfg, None,
                             emit=emit_tensors(cfg.text_config.hidden_size))
    img = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    with open(os.path.join(src2, "added_tokens.json"), "w") as f:
        json.dump({"<IMG_CONTEXT>": img}, f)
    _assert_cli_error(cli("emit_jax.convert", "--hf", src2, "--out", str(tmp_path / "b")),
                      "<COMP_CONTEXT>")
    # a negative window is refused at the flag
    r = cli("emit_jax.convert", "--hf", src, "--out", str(tmp_path / "c"), "--window", "-1")
    assert r.returncode == 2 and "--window: must be >= 0" in r.stderr.strip().splitlines()[-1]


# ------------------------------------------------------------------ evaluation on their folder
def test_evaluate_runs_the_authors_folder_directly_with_ce(tokenizer_dir, tmp_path):
    """`evaluate --checkpoint` takes the released folder as it is (no convert step); the first
    fixture question (DS-MVTec, "Is there any defect in the object?") goes through CE + SP."""
    tok_dir, tok = tokenizer_dir
    cfg = hf_config(vocab=len(tok), image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
                    vision_layers=20, image_size=112)
    cfg.text_config.max_position_embeddings = 4096
    model = make_hf_model(cfg, seed=7)
    src = write_chat_folder(tmp_path / "emit", model, cfg, tok_dir,
                            emit=emit_tensors(cfg.text_config.hidden_size))
    out = tmp_path / "r.json"
    r = cli("emit_jax.evaluate", "--checkpoint", src, "--data",
            os.path.join(ROOT, "tests", "fixtures", "mmad"), "--limit", "3", "--max-tiles", "1",
            "--max-new-tokens", "2", "--parse", "mmad", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.load(open(out))
    assert res["questions"] == 3 and res["parse"] == "mmad"
    assert res["answers"][0]["question_type"] == "Anomaly Detection"
    assert all(a["gpt_answer"] in "ABCDE" for a in res["answers"])
