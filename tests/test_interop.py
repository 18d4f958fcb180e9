"""HF -> Flax -> HF reproduces every tensor bit for bit, directly and through the two CLIs."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

from conftest import hf_config, make_hf_model
from emit_jax import checkpoint, hf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_all(folder):
    """{key: (dtype name, shape, raw bytes)} over model.safetensors or its shards."""
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), "numpy") as f:
                for k in f.keys():
                    a = f.get_tensor(k)
                    out[k] = (a.dtype.name, a.shape, a.tobytes())
    return out


def write_tokenizer(folder):
    """A real (tiny) fast tokenizer + processor-ish files beside the weights."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["a pill with a crack", "a screw with a scratch"] * 10,
                            trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "<IMG_CONTEXT>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(folder)
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
        json.dump({"image_processor_type": "GotOcr2ImageProcessorFast", "size": {"height": 56,
                   "width": 56}}, f)


def cli(*args):
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.parametrize("dtype,tied", [(torch.float32, False), (torch.bfloat16, True),
                                        (torch.bfloat16, False)])
def test_hf_flax_hf_bit_exact(dtype, tied, save_hf, tmp_path):
    model = make_hf_model(hf_config(tied=tied, vit="rms_norm" if tied else "layer_norm"),
                          dtype=dtype)
    src = save_hf(model, "src")
    jm = hf.load(src)  # dtype=None keeps what is stored
    assert str(jm.language_model.embed_tokens.embedding[...].dtype) == str(dtype).split(".")[-1]
    out = hf.save(jm, tmp_path / "out")
    a, b = read_all(src), read_all(out)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == b[k], k
    reloaded, info = type(model).from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert reloaded.config.tie_word_embeddings == tied


def test_v5_in_memory_key_names_are_accepted(tmp_path):
    """Folders written with transformers' module names (model.language_model.*) load too."""
    from safetensors.torch import save_file

    model = make_hf_model(hf_config())
    folder = tmp_path / "v5names"
    model.save_pretrained(folder)
    os.remove(folder / "model.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    jm = hf.load(folder)
    out = hf.save(jm, tmp_path / "out")
    again = read_all(out)
    ref = read_all(hf.save(hf.load(folder), tmp_path / "out2"))
    assert again == ref and len(again) == len(model.state_dict())


def test_convert_and_export_clis_round_trip_sharded(save_hf, tmp_path):
    model = make_hf_model(hf_config(), dtype=torch.bfloat16)
    src = save_hf(model, "src", max_shard_size="40KB")
    assert os.path.exists(os.path.join(src, hf.SAFE_INDEX))  # the source itself is sharded
    write_tokenizer(src)
    ckpt, out = tmp_path / "ckpt", tmp_path / "exported"
    r = cli("emit_jax.convert", "--hf", src, "--out", str(ckpt))
    assert r.returncode == 0, r.stderr
    assert os.path.isfile(ckpt / checkpoint.META_FILE)
    assert os.path.isfile(ckpt / "assets" / "tokenizer.json")
    r = cli("emit_jax.export", "--checkpoint", str(ckpt), "--out", str(out), "--max-shard-size", "50KB")
    assert r.returncode == 0, r.stderr
    with open(out / hf.SAFE_INDEX) as f:
        index = json.load(f)
    assert len(set(index["weight_map"].values())) > 1
    a, b = read_all(src), read_all(out)
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
                 "generation_config.json"):
        assert os.path.isfile(out / name), name
    from transformers import AutoTokenizer, InternVLForConditionalGeneration
    assert AutoTokenizer.from_pretrained(out)("a pill with a crack")["input_ids"]
    reloaded, info = InternVLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert reloaded.dtype == torch.bfloat16
    with open(os.path.join(src, "config.json")) as f, open(out / "config.json") as g:
        src_cfg, out_cfg = json.load(f), json.load(g)
    assert out_cfg["text_config"]["vocab_size"] == src_cfg["text_config"]["vocab_size"]


def test_orbax_checkpoint_restores_identical_params(save_hf, tmp_path):
    jm = hf.load(save_hf(make_hf_model(hf_config(), dtype=torch.bfloat16)))
    checkpoint.save_model(jm, tmp_path / "ck")
    back, meta = checkpoint.load_model(tmp_path / "ck")
    assert back.config == jm.config
    from flax import nnx
    a = nnx.to_flat_state(nnx.state(jm, nnx.Param))
    b = dict(nnx.to_flat_state(nnx.state(back, nnx.Param)))
    for path, v in a:
        x, y = np.asarray(v.get_value()), np.asarray(b[path].get_value())
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), path
    as_f32, _ = checkpoint.load_model(tmp_path / "ck", dtype="float32")
    assert as_f32.language_model.norm.weight[...].dtype == np.float32


# ------------------------------------------------------------------ bad input, one line each
def _assert_cli_error(r, *needles):
    assert r.returncode != 0
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and "error:" in lines[0], r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_convert_rejects_other_architecture(tmp_path):
    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    r = cli("emit_jax.convert", "--hf", str(folder), "--out", str(tmp_path / "ck"))
    _assert_cli_error(r, "config.json", "llama")
    assert not os.path.exists(tmp_path / "ck")


def test_convert_rejects_truncated_safetensors(save_hf, tmp_path):
    src = save_hf(make_hf_model(hf_config()))
    path = os.path.join(src, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    r = cli("emit_jax.convert", "--hf", src, "--out", str(tmp_path / "ck"))
    _assert_cli_error(r, "model.safetensors")
    assert not os.path.exists(tmp_path / "ck")
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def test_convert_never_loads_pickles(tmp_path):
    folder = tmp_path / "pt"
    folder.mkdir()
    hf_config().save_pretrained(folder)
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    r = cli("emit_jax.convert", "--hf", str(folder), "--out", str(tmp_path / "ck"))
    _assert_cli_error(r, "pytorch_model.bin", "never loaded")


def test_weights_not_matching_config(save_hf, tmp_path):
    src = save_hf(make_hf_model(hf_config(text_layers=2)))
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg["text_config"]["num_hidden_layers"] = 3
    json.dump(cfg, open(os.path.join(src, "config.json"), "w"))
    with pytest.raises(hf.CheckpointError, match="missing"):
        hf.load(src)


def test_export_refuses_non_empty_target_and_missing_checkpoint(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep me")
    r = cli("emit_jax.export", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "busy"))
    _assert_cli_error(r, "nope")
    assert (tmp_path / "busy" / "x").read_text() == "keep me"
