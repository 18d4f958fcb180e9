"""``vision_init``: a run's ViT from trained weights (``emit_jax.training.vision_init``), the
vision-tower file ``vit_asset`` writes, and the label-free ViT the package ships for the
embedded default."""

import dataclasses
import json
import os

import numpy as np
import pytest
from flax import nnx

from emit_jax.errors import ConfigError
from emit_jax.models import architectures
from emit_jax.models.internvl import InternVL
from emit_jax.training import vision_init as V


def _tiny(seed: int, scan: bool = False) -> InternVL:
    return InternVL(architectures.get_config("tiny").replace(scan_layers=scan), rngs=nnx.Rngs(seed))


def _flat(model) -> dict:
    return {"/".join(map(str, p)): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("scan", [False, True])
def test_a_vision_tower_file_moves_the_vit_and_nothing_else(tmp_path, scan):
    """Written from one model, read into another (unrolled or stacked layers): every ViT
    parameter equals the source's, every other parameter stays the target's."""
    src, path = _tiny(1), str(tmp_path / "vit.safetensors")
    V.save_vision(src, path, {"note": "seed 1"})
    assert V.metadata(path) == {"note": "seed 1"}
    tensors, where = V.read_vision(path)
    assert where == path and all(k.startswith("vision_tower.") for k in tensors)
    assert "vision_tower.encoder.layer.0.attention.q_proj.weight" in tensors  # transformers' keys
    target = _tiny(0, scan)
    before = _flat(target)
    assert V.apply_vision(target, tensors, where) > 0
    got = V.vision_tensors(target)
    want = V.vision_tensors(src)
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    after = _flat(target)
    moved = {k for k in after if not np.array_equal(after[k], before[k])}
    assert moved and all(k.startswith("vision_tower/") for k in moved)
    # a model folder is read the same way (its vision tower), an Orbax checkpoint or a Hugging
    # Face folder (checkpoint.load_model_folder tells them apart)
    from emit_jax import checkpoint, hf

    checkpoint.save_model(src, str(tmp_path / "model"))
    hf.save(src, str(tmp_path / "hf"))
    for name in ("model", "hf"):
        folder, _ = V.read_vision(str(tmp_path / name))
        assert folder.keys() == tensors.keys() and all(np.array_equal(folder[k], tensors[k])
                                                       for k in tensors), name


def test_the_packaged_vit_is_the_label_free_one_its_metadata_names():
    """The shipped file: written by vit_asset from a vit_pretrain checkpoint whose settings it
    records (600 steps, temperature 0.05, rotations within 180 degrees, the embedded default),
    for tiny's ViT; it loads into tiny and is not the random ViT of seed 0."""
    path = V.packaged_path()
    assert os.path.isfile(path), path
    meta = V.metadata(path)
    vp = meta["vit_pretrain"]
    assert (vp["steps"], vp["steps_done"], vp["temperature"], vp["rotate"], vp["data"],
            vp.get("fresh", 0), vp["seed"]) == (600, 600, 0.05, 180.0, "", 0, 0), vp
    assert "tiny" in meta["archs"]
    tensors, where = V.read_vision("embedded")
    assert where == path
    model = _tiny(0)
    random = V.vision_tensors(model)
    V.apply_vision(model, tensors, where)
    got = V.vision_tensors(model)
    assert all(not np.array_equal(got[k], random[k]) for k in got
               if k.endswith("q_proj.weight"))


def test_bad_vision_init_sources_are_one_line_naming_them(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"not a safetensors file")
    for source, needle in ((str(bad), f"config vision_init {bad}: "),
                           (str(tmp_path / "none"), "is not a file or folder")):
        with pytest.raises(ConfigError) as e:
            V.read_vision(source)
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
    # a plain safetensors file that is not a vision tower of emit_jax
    from safetensors.numpy import save_file

    plain = str(tmp_path / "plain.safetensors")
    save_file({"a": np.zeros(2, np.float32)}, plain)
    with pytest.raises(ConfigError, match="not a vision-tower file of emit_jax"):
        V.read_vision(plain)
    # another architecture's ViT: the keys or shapes do not match, one line
    import dataclasses

    cfg = architectures.get_config("tiny")
    for vision in (dataclasses.replace(cfg.vision, num_hidden_layers=4),  # keys missing
                   dataclasses.replace(cfg.vision, intermediate_size=128)):  # shapes differ
        other = InternVL(cfg.replace(vision=vision), rngs=nnx.Rngs(0))
        V.save_vision(other, str(tmp_path / "other.safetensors"), {})
        with pytest.raises(ConfigError) as e:
            V.apply_vision(_tiny(0), *V.read_vision(str(tmp_path / "other.safetensors")))
        assert "\n" not in str(e.value) and str(e.value).startswith(
            f"config vision_init {tmp_path / 'other.safetensors'}: ")
        assert ("does not match the model's" if vision.num_hidden_layers == 4 else "has shape") \
            in str(e.value), str(e.value)


def test_vision_init_in_the_config(tmp_path):
    """The main job's recipe starts from the packaged ViT; the key is checked before anything
    runs; beside init_from it is not used; the run's settings record it."""
    from emit_jax.configs import grpo
    from emit_jax.training.stages import MODEL_SETTINGS
    from emit_jax.training.validate import validate_config

    assert grpo.get_config().vision_init == "embedded" and "vision_init" in MODEL_SETTINGS
    cfg = grpo.get_config("smoke")
    validate_config(cfg, num_devices=1)
    cfg.vision_init = str(tmp_path / "missing.safetensors")
    with pytest.raises(ConfigError, match=r"^config vision_init: .* is not a file or folder"):
        validate_config(cfg, num_devices=1)
    cfg.vision_init, cfg.arch = "embedded", "internvl3_1b"  # a ViT of 1024 x 24
    with pytest.raises(ConfigError, match="packaged ViT of architecture 'tiny'"):
        validate_config(cfg, num_devices=1)


def test_vit_asset_writes_the_file_train_reads(tmp_path, capsys):
    from emit_jax import checkpoint, cli
    from emit_jax.experiments.vit_asset import PROG, main

    src = _tiny(3)
    checkpoint.save_model(src, str(tmp_path / "vit"), extra_meta={"vit_pretrain": {"steps": 7}})
    out = str(tmp_path / "a" / "vit.safetensors")
    assert main(["--checkpoint", str(tmp_path / "vit"), "--out", out, "--note", "n"]) == 0
    meta = V.metadata(out)
    assert meta["vit_pretrain"] == {"steps": 7} and meta["note"] == "n" and "tiny" in meta["archs"]
    assert json.dumps(meta)  # JSON all the way
    got, want = V.read_vision(out)[0], V.vision_tensors(src)
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    assert cli.run(main, ["--checkpoint", str(tmp_path / "vit"), "--out", str(tmp_path / "x.npz")],
                   prog=PROG) == 2
    assert "does not end in .safetensors" in capsys.readouterr().err


def test_another_image_size_gets_the_position_grid_resized():
    """A run at another ``image_size`` (the tests' 56) reads the packaged 224-pixel ViT: its
    16 x 16 position grid is resized bilinearly to the run's (4 x 4), the class token's kept."""
    cfg = architectures.get_config("tiny")
    model = InternVL(cfg.replace(vision=dataclasses.replace(cfg.vision, image_size=56)),
                     rngs=nnx.Rngs(0))
    tensors, where = V.read_vision("embedded")
    V.apply_vision(model, tensors, where)
    got = V.vision_tensors(model)["vision_tower.embeddings.position_embeddings"]
    src = tensors["vision_tower.embeddings.position_embeddings"]
    assert got.shape == (1, 17, src.shape[2])
    np.testing.assert_array_equal(got[:, 0], src[:, 0])
    # a constant grid stays constant; the resize is jax.image.resize's bilinear
    flat = np.concatenate([src[:, :1], np.ones_like(src[:, 1:])], axis=1)
    np.testing.assert_allclose(V.resize_positions(flat, (1, 17, src.shape[2]))[:, 1:], 1.0,
                               rtol=1e-6)


def test_the_packaged_vit_beside_a_users_dataset_is_said(tmp_path, capsys):
    """The packaged ViT saw the embedded default's images only: a run on another data.source
    still starts from it (it is the recipe's), and says so with the way out."""
    from emit_jax import configs
    from emit_jax.data import tokenizer as T
    from emit_jax.training.stages import build_initial_model

    tok = T.train_tiny_tokenizer(T.default_corpus(), tmp_path / "tok")
    for source, said in (("embedded", False), (str(tmp_path / "mvtec"), True)):
        cfg = configs.load("configs/grpo.py:smoke", [f"data.source={source}"])
        model = build_initial_model(cfg, tok)
        err = capsys.readouterr().err
        assert "[model] the ViT from" in err and err.count("\n") == 1 + said, err
        assert ("not on data.source " + source in err) is said, err
        assert ("--config.vision_init=''" in err) is said, err
        got = V.vision_tensors(model)
        want, _ = V.read_vision("embedded")
        assert all(np.array_equal(got[k], want[k]) for k in want)
