"""MVTec-style reading, the four tasks, the 3x3 rule, references and EMIT's JSONL."""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from emit_jax.data import jsonl, prompts, tasks
from emit_jax.data.records import build
from emit_jax.data.mvtec import DataError, Report, scan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _img(path, rgb, size=48, mode="RGB"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, (size, size), rgb).save(path)


def make_mvtec(root, classes=("widget", "bolt")):
    """An exact MVTec AD layout: train/good, test/good, test/<defect>, ground_truth masks.
    Defect 'dent' sits in the top-left cell, 'smear' spans right + bottom right (more pixels
    in bottom right)."""
    for ci, c in enumerate(classes):
        for i in range(4):
            _img(f"{root}/{c}/train/good/{i:03d}.png", (200 - 10 * i, 180, 160 + ci * 20))
        for i in range(2):
            _img(f"{root}/{c}/test/good/{i:03d}.png", (190, 182 + i, 160 + ci * 20))
        for d, boxes in (("dent", [(2, 2, 10, 10)]), ("smear", [(34, 20, 46, 30), (34, 33, 46, 47)])):
            for i in range(2):
                img = Image.new("RGB", (48, 48), (200, 180, 160 + ci * 20))
                mask = Image.new("L", (48, 48), 0)
                for b in boxes:
                    img.paste((20, 20, 20), b)
                    mask.paste(255, b)
                os.makedirs(f"{root}/{c}/test/{d}", exist_ok=True)
                os.makedirs(f"{root}/{c}/ground_truth/{d}", exist_ok=True)
                img.save(f"{root}/{c}/test/{d}/{i:03d}.png")
                mask.save(f"{root}/{c}/ground_truth/{d}/{i:03d}_mask.png")
    return str(root)


def test_scan_reads_the_mvtec_layout(tmp_path):
    items = scan(make_mvtec(tmp_path / "ds"))
    assert len(items) == 2 * (4 + 2 + 4)
    anomalies = [i for i in items if i.is_anomalous]
    assert len(anomalies) == 8 and all(i.mask_path.endswith("_mask.png") for i in anomalies)
    assert {i.defect for i in anomalies} == {"dent", "smear"}
    assert all(i.dataset == "ds" for i in items)


def test_missing_mask_error_and_skip(tmp_path):
    root = make_mvtec(tmp_path / "ds", classes=("widget",))
    os.remove(f"{root}/widget/ground_truth/dent/001_mask.png")
    with pytest.raises(DataError, match="001.png: no mask"):
        scan(root)
    report = Report("skip")
    items = scan(root, report=report)
    assert len(report.skipped) == 1 and len(items) == 9


def test_mask_to_grid_rule():
    m = np.zeros((10, 11), np.uint8)  # rows [0,3) [3,6) [6,10); cols [0,3) [3,7) [7,11)
    m[0:2, 0:2] = 1  # top left: 4 px
    m[7:10, 8:11] = 255  # bottom right: 9 px
    counts = tasks.mask_cell_counts(m)
    assert counts.tolist() == [4, 0, 0, 0, 0, 0, 0, 0, 9]
    assert tasks.defect_regions(counts) == ["bottom right", "top left"]
    opts, idx = tasks.localization_options(counts, random.Random(0))
    assert opts[idx] in prompts.REGION_SYNONYMS["bottom right"]
    others = [o for i, o in enumerate(opts) if i != idx]
    assert not any(o in prompts.REGION_SYNONYMS["top left"] for o in others)  # defect cells excluded
    assert tasks.localization_options(np.zeros(9, int), random.Random(0)) is None
    assert tasks.localization_options(np.ones(9, int), random.Random(0)) is None
    # fewer than 3 free cells: drawn with replacement (the official quirk)
    c = np.array([1, 1, 1, 1, 1, 1, 1, 0, 0])
    opts, idx = tasks.localization_options(c, random.Random(1))
    assert len(opts) == 4


def test_process_string_and_qblock():
    assert prompts.process_string("missing_parts") == "Missing parts."
    assert prompts.process_string("PCB_1") == "Pcb."
    assert prompts.qblock("Q?", ["Yes.", "No."]) == "Q? \nA. Yes.\nB. No.\n"


def test_questions_per_image_and_seeded(tmp_path):
    items = scan(make_mvtec(tmp_path / "ds"))
    refs = tasks.select_references(items, tasks.pixel_embedder())
    dk = {"widget": {"good": "A widget.", "dent": "A dent\nis dark."}, "bolt": {"good": "A bolt."}}
    qs = tasks.build_questions(items, stage=2, seed=3, references=refs, domain_knowledge=dk)
    by_task = {}
    for q in qs:
        by_task.setdefault(q.task, []).append(q)
    assert len(by_task["anomaly_discrimination"]) == 20  # every image
    assert len(by_task["defect_classification"]) == 8 and len(by_task["defect_localization"]) == 8
    assert len(by_task["object_classification"]) == 12  # normal images
    for q in by_task["defect_localization"]:
        region = "top left" if q.meta["anomaly_type"] == "dent" else "bottom right"
        assert q.options[ord(q.answer) - 65] in prompts.REGION_SYNONYMS[region]
    for q in by_task["anomaly_discrimination"]:
        want = "Yes." if q.meta["adlabel"] else "No."
        assert q.options[ord(q.answer) - 65] == want and len(q.images) == 2
        assert q.images[0] != q.images[1] and "widget" in q.images[0] or "bolt" in q.images[0]
        assert prompts.INSTR_THINK in q.user and "Image-1: <image>\nImage-2: <image>\n" in q.user
    oc = by_task["object_classification"][0]
    assert oc.images == (oc.images[0],) and oc.user.startswith("Query image: <image>\n")
    widget_q = next(q for q in qs if q.meta["object_type"] == "widget" and q.task != "object_classification")
    assert "<Normal Characteristics>\n Description: A widget." in widget_q.user
    assert "<Dent Defect>\n Description: A dent is dark." in widget_q.user
    again = tasks.build_questions(items, stage=2, seed=3, references=refs, domain_knowledge=dk)
    assert [q.user for q in again] == [q.user for q in qs]
    other = tasks.build_questions(items, stage=2, seed=4, references=refs, domain_knowledge=dk)
    assert [q.answer for q in other] != [q.answer for q in qs]


def test_stage1_is_ad_and_dl_direct(tmp_path):
    items = scan(make_mvtec(tmp_path / "ds"))
    refs = tasks.select_references(items, tasks.pixel_embedder())
    qs = tasks.build_questions(items, stage=1, references=refs)
    assert {q.task for q in qs} == {"anomaly_discrimination", "defect_localization"}
    assert all(prompts.INSTR_DIRECT in q.user for q in qs)


def test_reference_selection_rules():
    from emit_jax.data.mvtec import ImageItem

    def item(name, anomalous=False):
        return ImageItem(path=name, dataset="d", object_type="c", split="test", defect=None,
                         is_anomalous=anomalous)
    vec = {"n0": [1, 0], "n1": [0.9, 0.1], "n2": [0, 1], "a": [1, 0.01]}
    embed = lambda paths: np.array([vec[p] for p in paths])  # noqa: E731
    items = [item("n0"), item("n1"), item("n2"), item("a", True)]
    refs = tasks.select_references(items, embed)
    assert refs["n0"] == "n1" and refs["n2"] == "n1" and refs["a"] == "n0"
    official = tasks.select_references(items, embed, skip_rank1_for_anomalous=True)
    assert official["a"] == "n1" and official["n0"] == "n1"  # rank 2 for the anomaly


def test_mask_size_mismatch_is_reported(tmp_path):
    root = make_mvtec(tmp_path / "ds", classes=("widget",))
    Image.new("L", (20, 20), 255).save(f"{root}/widget/ground_truth/dent/000_mask.png")
    items = scan(root)
    refs = tasks.select_references(items, tasks.pixel_embedder())
    with pytest.raises(DataError, match="000_mask.png: mask is 20x20"):
        tasks.build_questions(items, stage=2, references=refs)
    report = Report("skip")
    tasks.build_questions(items, stage=2, references=refs, report=report)
    assert len(report.skipped) == 1


def test_empty_mask_is_relabelled_normal(tmp_path):
    root = make_mvtec(tmp_path / "ds")
    Image.new("L", (48, 48), 0).save(f"{root}/widget/ground_truth/dent/000_mask.png")
    items = scan(root)
    refs = tasks.select_references(items, tasks.pixel_embedder())
    qs = [q for q in tasks.build_questions(items, stage=2, references=refs)
          if q.meta.get("mask_path", "") and q.meta["mask_path"].endswith("widget/ground_truth/dent/000_mask.png")]
    assert {q.task for q in qs} == {"anomaly_discrimination", "object_classification"}
    assert all(q.meta["adlabel"] == 0 for q in qs)
    report = Report()  # the relabelling is counted, and said once by the CLIs
    tasks.build_questions(items, stage=2, references=refs, report=report)
    assert report.relabelled == [f"{root}/widget/test/dent/000.png"]
    assert report.relabelled_note().startswith("note: 1 anomalous image(s) have an all-black mask")
    r = subprocess.run([sys.executable, "-m", "emit_jax.data.build", "--source", root, "--out",
                        str(tmp_path / "o.jsonl"), "--stage", "2"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["relabelled_normal"] == 1
    assert r.stderr.count("all-black mask") == 1, r.stderr


def test_build_cli_writes_emit_jsonl(tmp_path):
    root = make_mvtec(tmp_path / "ds")
    out = tmp_path / "train.jsonl"
    r = subprocess.run([sys.executable, "-m", "emit_jax.data.build", "--source", root, "--out",
                        str(out), "--stage", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    recs = list(jsonl.read_jsonl(out))
    assert summary["records"] == len(recs) == 48
    rec = recs[0]
    assert set(rec) >= {"id", "images", "messages", "solution", "task_type", "adlabel", "mask_path",
                        "defect_location", "object_type", "anomaly_type", "chat_type"}
    assert rec["messages"][0]["role"] == "user" and len(rec["messages"]) == 1
    out1 = tmp_path / "sft.jsonl"
    assert build(root, str(out1), 1)["records"] == 20 + 8
    rec1 = next(jsonl.read_jsonl(out1))
    assert rec1["messages"][1]["role"] == "assistant" and rec1["messages"][1]["content"] in "AB"


@pytest.mark.parametrize("line,needle", [
    ('{"images": [], "messages": [{"role": "user", "content": "hi"}], "solution": "E"}', "not one of"),
    ('{"images": ["a.png"], "messages": [{"role": "user", "content": "no tag"}]}', "<image> tags"),
    ('{"images": [], "messages": [{"role": "user", "content": "x"}], "task_type": "dance"}', "unknown task_type"),
    ('{"images": [], "messages": [', "malformed JSON"),
    ('{"images": ["../../etc/passwd"], "messages": [{"role": "user", "content": "<image>"}]}', "outside the data root"),
])
def test_jsonl_bad_lines_name_file_and_line(tmp_path, line, needle):
    good = '{"id": "a", "images": [], "messages": [{"role": "user", "content": "x"}], "solution": "A"}'
    path = tmp_path / "bad.jsonl"
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(DataError, match=f"bad.jsonl:2: .*{needle}"):
        list(jsonl.read_jsonl(path, data_root=str(tmp_path)))
    report = Report("skip")
    assert len(list(jsonl.read_jsonl(path, data_root=str(tmp_path), report=report))) == 1
    assert len(report.skipped) == 1


def test_duplicate_ids(tmp_path):
    good = '{"id": "a", "images": [], "messages": [{"role": "user", "content": "x"}], "solution": "A"}'
    path = tmp_path / "dup.jsonl"
    path.write_text(good + "\n" + good + "\n")
    with pytest.raises(DataError, match="dup.jsonl:2: duplicate id"):
        list(jsonl.read_jsonl(path))


def test_text_as_query_samples_from_real_pill_descriptions(tmp_path):
    """The EMIT authors' real object descriptions (.txt beside the pill images) stand in for the
    query image: one image (the reference), the description in the prompt, no CE."""
    import importlib.resources
    import shutil

    from emit_jax.models.emit import use_comp

    assets = importlib.resources.files("emit_jax.data").joinpath("embedded_assets/pill")
    good = tmp_path / "ds" / "pill" / "train" / "good"
    good.mkdir(parents=True)
    names = sorted(n.name for n in assets.iterdir() if n.name.endswith(".png"))[:4]
    for n in names:
        for ext in (".png", ".txt"):
            with assets.joinpath(n[:-4] + ext).open("rb") as src, open(good / (n[:-4] + ext), "wb") as dst:
                shutil.copyfileobj(src, dst)
    items = scan(tmp_path / "ds")
    assert all(it.description for it in items)
    refs = tasks.select_references(items, tasks.pixel_embedder())
    qs = tasks.build_questions(items, stage=2, references=refs, text_samples=True)
    text_qs = [q for q in qs if q.meta["chat_type"] == "text"]
    assert len(text_qs) == 4 and all(q.task == "anomaly_discrimination" for q in text_qs)
    for q in text_qs:
        desc = next(it.description for it in items if it.path == q.meta["query"])
        assert " ".join(desc.split("\n")) in q.user and q.meta["query"] not in q.images
        assert len(q.images) == 1 and q.user.count("<image>") == 1
        assert "Description of the second product: " in q.user
        assert not use_comp(len(q.images), q.user)
        assert q.options[ord(q.answer) - 65] == "No."


def test_references_under_the_models_own_vit(tmp_path):
    """The default embedding with a checkpoint: the model's ViT (mean patch token); the build
    CLI picks it with --checkpoint."""
    import dataclasses

    from flax import nnx

    from emit_jax import checkpoint
    from emit_jax.models import architectures
    from emit_jax.models.internvl import InternVL

    cfg = architectures.tiny()
    cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, image_size=28, num_hidden_layers=1),
                      text=dataclasses.replace(cfg.text, vocab_size=64, num_hidden_layers=1),
                      image_token_id=63)
    model = InternVL(cfg, rngs=nnx.Rngs(0))
    root = make_mvtec(tmp_path / "ds")
    items = scan(root)
    embed = tasks.vit_embedder(model)
    vecs = embed([items[0].path, items[1].path])
    assert vecs.shape == (2, cfg.vision.hidden_size)
    refs = tasks.select_references(items, embed)
    assert all(refs[it.path] != it.path for it in items)
    ckpt = tmp_path / "ck"
    checkpoint.save_model(model, ckpt)
    summary = build(root, str(tmp_path / "o.jsonl"), 2, vit_model=checkpoint.load_model(ckpt)[0])
    assert summary["embedding"] == "vit" and summary["records"] == 48


def test_ad_order_yes_no_makes_the_letter_the_label(tmp_path):
    """``ad_order='yes_no'``: every AD question lists A. Yes. / B. No. (MMAD's order), so the
    letter is A exactly for anomalous images; the other tasks' questions are unchanged."""
    items = scan(make_mvtec(tmp_path / "ds"))
    refs = tasks.select_references(items, tasks.pixel_embedder())
    shuffled = tasks.build_questions(items, stage=2, seed=3, references=refs)
    fixed = tasks.build_questions(items, stage=2, seed=3, references=refs, ad_order="yes_no")
    assert len(fixed) == len(shuffled)
    ad = [q for q in fixed if q.task == "anomaly_discrimination"]
    assert len(ad) == 20 and {q.meta["adlabel"] for q in ad} == {0, 1}
    for q in ad:
        assert q.options == ("Yes.", "No.") and q.answer == ("A" if q.meta["adlabel"] else "B")
        assert "? \nA. Yes.\nB. No.\n" in q.user
    assert {q.options for q in shuffled if q.task == "anomaly_discrimination"} == \
        {("Yes.", "No."), ("No.", "Yes.")}
    for a, b in zip(shuffled, fixed):
        if a.task != "anomaly_discrimination":
            assert (a.user, a.answer) == (b.user, b.answer)
    with pytest.raises(ValueError, match="ad_order must be one of"):
        tasks.build_questions(items, stage=2, references=refs, ad_order="no_yes")


def test_stage_records_refuse_a_workdir_built_with_another_ad_order(tmp_path):
    from emit_jax.training.data import stage_records

    ds = make_mvtec(tmp_path / "ds", classes=("widget",))
    work = tmp_path / "work"
    recs = stage_records(ds, str(work), text_samples=False, ad_order="yes_no")
    options = json.loads((work / "data" / "options.json").read_text())
    assert {k: options[k] for k in ("ad_order", "rationale")} == {"ad_order": "yes_no",
                                                                  "rationale": "brief"}
    assert set(options["digests"]) == {"warmup", "base", "sft", "grpo", "validation", "test"}
    assert all(r["options"] == ["Yes.", "No."] for r in recs["test"]
               if r["task_type"] == "anomaly_discrimination")
    again = stage_records(ds, str(work), text_samples=False, ad_order="yes_no")  # the cache
    assert again["sft"] == recs["sft"]
    with pytest.raises(DataError, match=r"work/data: the records were built with "
                                        r"ad_order='yes_no', the config asks for 'shuffled'"):
        stage_records(ds, str(work), text_samples=False)
    (work / "data" / "options.json").unlink()  # how the records were built is unknown now
    with pytest.raises(DataError, match=r"work/data/options.json: missing, so how the records "
                                        r"beside it were built \(ad_order, rationale\)"):
        stage_records(ds, str(work), text_samples=False)


def test_records_changed_in_a_workdir_are_refused(tmp_path):
    """Eighth probe. Before: ``data/base.jsonl`` replaced by another records file, or cut by a
    record or ten, in an interrupted workdir: the rerun resumed on them (the checkpoint's data
    position pointing into other records) without a word."""
    from emit_jax.training.data import stage_records

    ds = make_mvtec(tmp_path / "ds", classes=("widget",))
    work = tmp_path / "work"
    stage_records(ds, str(work), text_samples=False)
    base = work / "data" / "base.jsonl"
    lines = base.read_text().splitlines(keepends=True)
    base.write_text("".join(lines[1:]))
    with pytest.raises(DataError, match=r"base.jsonl: changed since this workdir built it"):
        stage_records(ds, str(work), text_samples=False)
    base.write_text("".join(lines))  # restored: read again
    stage_records(ds, str(work), text_samples=False)


def test_the_same_dataset_in_another_folder_asks_the_same_questions(tmp_path):
    """The draws of each question (option order, distractors, domain-knowledge sentences) are
    keyed by the image's path inside the dataset: a copy elsewhere builds the same records, only
    the image paths differ (before: keyed by the absolute path, so each folder asked others)."""
    import shutil
    a = make_mvtec(tmp_path / "a" / "ds")
    b = str(tmp_path / "elsewhere" / "deeper" / "ds")
    shutil.copytree(a, b)
    outs = []
    for root, name in ((a, "a.jsonl"), (b, "b.jsonl")):
        build(root, str(tmp_path / name), 2)
        with open(tmp_path / name) as f:
            outs.append([json.loads(line) for line in f])
    assert len(outs[0]) == len(outs[1]) > 20
    strip = lambda r: json.loads(json.dumps(r).replace(b, "ROOT").replace(a, "ROOT"))
    assert [strip(r) for r in outs[0]] == [strip(r) for r in outs[1]]
    # and the draws do depend on the image: not every question has its answer at one letter
    answers = {r["messages"][-1]["content"] for r in outs[0]}
    assert len(answers) > 1


def test_a_dataset_changed_under_a_workdir_is_said(tmp_path, capsys):
    """Twenty-second probe S04: an image added to the dataset and another rewritten in place
    after a workdir built its records: the rerun went on with the old questions, reading the
    rewritten image's new pixels, without a word."""
    from PIL import Image

    from emit_jax.training.data import SOURCE_FILES, stage_records

    ds = make_mvtec(tmp_path / "ds", classes=("widget",))
    work = tmp_path / "work"
    recs = stage_records(ds, str(work), text_samples=False)
    assert (work / "data" / SOURCE_FILES).is_file()
    capsys.readouterr()
    assert stage_records(ds, str(work), text_samples=False) == recs
    assert "changed since" not in capsys.readouterr().err
    good = os.path.join(ds, "widget", "train", "good")
    first = sorted(os.listdir(good))[0]
    Image.new("RGB", (32, 32), (1, 2, 3)).save(os.path.join(good, "zz_new.png"))
    with Image.open(os.path.join(good, first)) as im:
        rotated = im.rotate(90)
    rotated.save(os.path.join(good, first))
    os.utime(os.path.join(good, first), ns=(1, 1))  # written since, whatever its size
    assert stage_records(ds, str(work), text_samples=False) == recs  # the records are kept
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"note: {ds} changed since this workdir built its records from it (1 file(s) "
                   "added, 1 written since, 0 removed; e.g. widget/train/good/zz_new.png): the "
                   "stages go on with the questions built then, reading a changed image as it "
                   f"is now; to build them from the dataset as it is, move {work / 'data'} out "
                   "of the workdir (the stages are kept; --config.restart=True trains them "
                   "again)"], err
    (work / "data" / SOURCE_FILES).unlink()  # a workdir from before the listing: kept now
    stage_records(ds, str(work), text_samples=False)
    assert capsys.readouterr().err == "" and (work / "data" / SOURCE_FILES).is_file()
    stage_records(ds, str(work), text_samples=False)
    assert capsys.readouterr().err == ""
