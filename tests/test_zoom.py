"""The zoom image (``data.zoom``, emit_jax.training.zoom): the crop's geometry, the prompt's
third image, and crops cut where EMIT's heat map (recomputed here from its definition's pieces)
peaks, on real embedded images, encoded by the real pipeline."""

import os

import numpy as np
import pytest
from PIL import Image

from emit_jax.training.zoom import (QUERY_LINE, REGION_LINE, ZOOM_LINE, Zoomer, crop_at,
                                    hot_crop, hottest_cell, region_text, vit_digest,
                                    wants_region, wants_zoom, zoom_text)


def test_crop_geometry():
    im = Image.fromarray(np.arange(100 * 100, dtype=np.uint32).reshape(100, 100).astype(np.int32),
                         mode="I")
    heat = np.zeros((4, 4))
    heat[1, 2] = 1.0  # the patch centred at (37.5, 62.5) px
    crop = hot_crop(im, heat, share=0.2)  # a 20 px square centred there
    assert crop.size == (20, 20)
    assert np.asarray(crop)[0, 0] == 28 * 100 + 52  # its top left pixel: row 28, column 52
    corner = crop_at(im, 0.0, 1.0, share=0.3)  # moved inside at the top right corner
    assert np.asarray(corner)[0, 0] == 70 and corner.size == (30, 30)
    wide = Image.new("RGB", (200, 100))
    assert crop_at(wide, 0.5, 0.5, 0.5).size == (50, 50)  # a share of the shorter side


def test_zoom_text_names_the_third_image_after_the_query():
    from emit_jax.data.prompts import render

    two = render("defect_classification", ["A", "B", "C", "D"], think=False)
    out = zoom_text(two)
    assert out.startswith("Image-1: <image>\n" + QUERY_LINE + ZOOM_LINE)
    assert out.count("<image>") == 3 and out.replace(ZOOM_LINE, "") == two
    with pytest.raises(ValueError, match="Image-2"):
        zoom_text(render("object_classification", ["A", "B", "C", "D"], think=False))
    rec = {"task_type": "defect_classification", "images": ["r.png", "q.png"],
           "messages": [{"role": "user", "content": two}]}
    assert wants_zoom(rec)
    assert not wants_zoom(dict(rec, task_type="anomaly_discrimination"))  # keeps EMIT's pair
    assert not wants_zoom(dict(rec, images=["r.png", "q.png", "z.png"]))  # already zoomed


@pytest.fixture(scope="module")
def records():
    """Real questions of every task on an embedded dataset (seed 1)."""
    from emit_jax.data.prompts import TASKS
    from emit_jax.training.data import fresh_records

    recs = fresh_records([1], tasks_=TASKS)
    picked = []
    for task, n in (("defect_classification", 3), ("anomaly_discrimination", 1),
                    ("defect_localization", 1), ("object_classification", 1)):
        picked += [r for r in recs if r["task_type"] == task][:n]
    return picked


def test_zoomer_crops_where_the_heat_map_peaks(tmp_path, records):
    import jax.numpy as jnp
    from flax import nnx

    from emit_jax.data.image import load_image, to_tile
    from emit_jax.models import architectures
    from emit_jax.models.emit import EMITConfig, contrastive_heatmap
    from emit_jax.models.internvl import InternVL

    model = InternVL(architectures.get_config("tiny"), rngs=nnx.Rngs(0))
    vit = model.vision_tower
    folder = tmp_path / "zoom"
    zoomer = Zoomer(vit, EMITConfig().validate(), str(folder), 0.35, batch=2)
    out = zoomer(records)
    assert len(out) == len(records)
    for rec, new in zip(records, out):
        if rec["task_type"] != "defect_classification":
            assert new is rec
            continue
        ref, query = rec["images"]
        assert new["images"][:2] == [ref, query] and new["query"] == query
        assert new["messages"][0]["content"] == zoom_text(rec["messages"][0]["content"])
        assert new["messages"][1:] == rec["messages"][1:] and rec["images"] == [ref, query]
        # EMIT's map for the 6-block tiny ViT: blocks (1, 2, 4, 5), window 3, four rotations
        ce = np.stack([to_tile(load_image(ref), 224), to_tile(load_image(query), 224)])[None]
        heat = np.asarray(contrastive_heatmap(vit, jnp.asarray(ce), (1, 2, 4, 5), 3))[0]
        want = np.asarray(hot_crop(load_image(query), heat, 0.35))
        got = np.asarray(load_image(new["images"][2]))
        assert got.shape == want.shape == (78, 78, 3) and (got == want).all()
        assert zoomer.cell(ref, query) == hottest_cell(heat)
    made = sorted(os.listdir(folder))
    assert len(made) == 6 and sum(p.endswith(".json") for p in made) == 3  # crop + cell a pair
    stamps = {p: os.stat(folder / p).st_mtime_ns for p in made}
    again = zoomer(records)  # cut once: the files are reused
    assert again == out and {p: os.stat(folder / p).st_mtime_ns for p in made} == stamps
    other = Zoomer(vit, EMITConfig().validate(), str(folder), 0.5, batch=2)(records[:1])
    assert other[0]["images"][2] not in {r["images"][-1] for r in out}  # another share, another file
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="zoom share"):
            Zoomer(vit, EMITConfig().validate(), str(folder), bad)


def test_the_peak_region_names_the_maps_cell_in_the_localization_questions(tmp_path, records):
    """``data.peak_region``: each defect-localization question gets the line naming the region
    of its pair's map maximum, its two images (and so EMIT's contrastive tokens) kept; with no
    zoom share the DC questions stay as they were."""
    import jax.numpy as jnp
    from flax import nnx

    from emit_jax.data.comp import use_comp
    from emit_jax.data.image import load_image, to_tile
    from emit_jax.data.prompts import REGIONS
    from emit_jax.models import architectures
    from emit_jax.models.emit import EMITConfig, contrastive_heatmap
    from emit_jax.models.internvl import InternVL

    vit = InternVL(architectures.get_config("tiny"), rngs=nnx.Rngs(0)).vision_tower
    zoomer = Zoomer(vit, EMITConfig().validate(), str(tmp_path), 0.0, region=True)
    out = zoomer(records)
    for rec, new in zip(records, out):
        if not wants_region(rec):
            assert new is rec  # DC too: no share, no crop
            continue
        ref, query = rec["images"]
        ce = np.stack([to_tile(load_image(ref), 224), to_tile(load_image(query), 224)])[None]
        heat = np.asarray(contrastive_heatmap(vit, jnp.asarray(ce), (1, 2, 4, 5), 3))[0]
        line = REGION_LINE.format(region=REGIONS[hottest_cell(heat)])
        text = new["messages"][0]["content"]
        assert text == rec["messages"][0]["content"].replace(QUERY_LINE, QUERY_LINE + line)
        assert new["images"] == [ref, query] and use_comp(2, text)
    assert not any(p.endswith(".png") for p in os.listdir(tmp_path))  # cells only
    assert zoomer(out) == out  # a question that has its line takes no second one
    assert region_text(QUERY_LINE, 8) == QUERY_LINE + REGION_LINE.format(region="bottom right")
    heat = np.zeros((16, 16))
    for cell in range(9):
        heat[:] = 0.0
        heat[(cell // 3) * 5 + 2, (cell % 3) * 5 + 2] = 1.0
        assert hottest_cell(heat) == cell


def test_a_zoomed_question_encodes_three_images_without_the_contrastive_pair(tmp_path, records):
    from flax import nnx

    from emit_jax.data import jsonl
    from emit_jax.data.pipeline import PipelineConfig, RecordEncoder
    from emit_jax.data.tokenizer import train_tiny_tokenizer
    from emit_jax.models import architectures
    from emit_jax.models.emit import EMITConfig
    from emit_jax.models.internvl import InternVL

    model = InternVL(architectures.get_config("tiny"), rngs=nnx.Rngs(0))
    zoomed = Zoomer(model.vision_tower, EMITConfig().validate(), str(tmp_path), 0.35)(records)
    path = tmp_path / "z.jsonl"
    jsonl.write_jsonl(zoomed, path)
    back = list(jsonl.read_jsonl(path))  # the record checks pass: three tags, three images
    dc = back[0]
    tok = train_tiny_tokenizer(None, tmp_path / "tok")
    img = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    enc = RecordEncoder(tok, PipelineConfig(image_size=224, max_tiles=1, tokens_per_tile=64,
                                            comp_slots=73, comp_token_id=len(tok), train=False))
    ex = enc(dc)
    assert ex["pixel_values"].shape == (3, 3, 224, 224)
    assert int((ex["input_ids"] == img).sum()) == 3 * 64
    assert not ex["use_comp"] and "ce_pixels" not in ex  # DC never had EMIT's pair
    ad = enc(back[3])  # anomaly discrimination: EMIT's two images and its contrastive tokens
    assert ad["use_comp"] and ad["pixel_values"].shape[0] == 2


def test_a_lazy_sequence_cuts_only_the_crops_of_the_records_read(tmp_path, records):
    """What the trainer hands a stage (``Run.zoomed``): the records planned as they are read,
    each crop cut then, the same files as the eager cut; a grain pipeline reads it."""
    from flax import nnx

    from emit_jax.data.pipeline import PipelineConfig, make_dataset
    from emit_jax.data.tokenizer import train_tiny_tokenizer
    from emit_jax.models import architectures
    from emit_jax.models.emit import EMITConfig
    from emit_jax.models.internvl import InternVL

    model = InternVL(architectures.get_config("tiny"), rngs=nnx.Rngs(0))
    zoomer = Zoomer(model.vision_tower, EMITConfig().validate(), str(tmp_path / "z"), 0.35)
    lazy = zoomer.lazy(records)
    assert len(lazy) == len(records) and not (tmp_path / "z").exists()  # nothing cut yet
    assert lazy[5] is records[5]  # object classification: as it was
    first = lazy[1]
    crop = os.path.basename(first["images"][2])  # that pair only: its crop and its cell
    assert sorted(os.listdir(tmp_path / "z")) == sorted([crop, crop.replace(".png", ".json")])
    assert first == zoomer.plan(records[1])
    eager = Zoomer(model.vision_tower, EMITConfig().validate(), str(tmp_path / "e"), 0.35)(records)
    for a, b in zip(lazy[:3], eager[:3]):  # a batch of one cuts what a batch of sixteen cuts
        assert np.array_equal(np.asarray(Image.open(a["images"][2])),
                              np.asarray(Image.open(b["images"][2])))
    tok = train_tiny_tokenizer(None, tmp_path / "tok")
    cfg = PipelineConfig(image_size=224, max_tiles=1, tokens_per_tile=64, train=False,
                         length_buckets=(1024,))
    batch = next(iter(make_dataset(zoomer.lazy(records[:3]), tok, cfg, batch_size=3,
                                   shuffle=False)))
    assert batch["pixel_values"].shape[0] >= 9  # three images a question


def test_the_trainers_zoomer_uses_the_vit_the_run_starts_from(tmp_path):
    """``stages.make_zoomer``: off at ``data.zoom`` 0; else the initial model's ViT (the
    embedded recipe's: the packaged one, tensor for tensor), ``data.zoom_layers`` in the map's
    CE layers, a block past the ViT's depth one clear error."""
    from emit_jax.configs import grpo
    from emit_jax.data.tokenizer import train_tiny_tokenizer
    from emit_jax.errors import ConfigError
    from emit_jax.training import stages, vision_init

    cfg = grpo.get_config("smoke")
    tok = train_tiny_tokenizer(None, tmp_path / "tok")
    cfg.data.zoom, cfg.data.peak_region = 0.0, False
    assert stages.make_zoomer(cfg, tok, str(tmp_path)) is None
    cfg.data.peak_region = True
    assert stages.make_zoomer(cfg, tok, str(tmp_path)).region
    cfg.data.zoom, cfg.data.zoom_layers = 0.35, (1, 2)
    zoomer = stages.make_zoomer(cfg, tok, str(tmp_path))
    assert zoomer.folder == str(tmp_path / "zoom") and zoomer.share == 0.35
    assert "'ce_layers': [1, 2]" in zoomer.tag
    start = stages.build_initial_model(cfg, tok)  # the packaged ViT (vision_init), the rest new
    packaged, _ = vision_init.read_vision("embedded")
    assert all(np.array_equal(packaged[k], v) for k, v in vision_init.vision_tensors(start).items())
    assert vit_digest(zoomer.vit) == vit_digest(start.vision_tower)
    with cfg.unlocked():
        cfg.vision_init = ""
    assert stages.make_zoomer(cfg, tok, str(tmp_path)).tag != zoomer.tag  # another ViT's crops
    cfg.data.zoom_layers = (9,)
    with pytest.raises(ConfigError, match=r"data.zoom_layers: \(9,\) outside the ViT's 1..6"):
        stages.make_zoomer(cfg, tok, str(tmp_path))
