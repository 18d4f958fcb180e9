"""AD-FM records on the embedded default (emit_jax.data.adfm): boxes in the model frame, labels,
prompt, and the templated answers scoring what the AD-FM rewards say they should."""

import numpy as np
import pytest

from emit_jax.data import adfm as D
from emit_jax.data.boxes import boxes_from_mask
from emit_jax.data.embedded import ensure_cached
from emit_jax.data.mvtec import scan
from emit_jax.data.tasks import pixel_embedder, read_mask, select_references
from emit_jax.rl import adfm as A
from emit_jax.rl import rewards as R

FRAME = (224, 224)


@pytest.fixture(scope="module")
def recs(tmp_path_factory):
    root = ensure_cached(str(tmp_path_factory.mktemp("cache")), seed=0)  # nothing in $HOME
    items = [it for it in scan(root) if it.object_type in ("pill", "screw")]
    refs = select_references(items, pixel_embedder())
    return items, D.records(items, references=refs, frame=FRAME)


def test_records_carry_boxes_in_the_model_frame_and_the_labels(recs):
    items, out = recs
    by_path = {it.path: it for it in items}
    anomalous = [r for r in out if r["solution"] == "A"]
    normal = [r for r in out if r["solution"] == "B"]
    assert anomalous and normal
    for r in out:
        it = by_path[r["query"]]
        assert r["images"][1] == it.path and r["images"][0] != it.path
        assert r["messages"][0]["content"].count("<image>") == 2
        assert "224x224" in r["messages"][0]["content"]
        assert r["options"] == ["Yes.", "No."] and r["frame"] == [224, 224]
        assert r["solution"] == ("A" if it.is_anomalous else "B")
        if it.is_anomalous:
            assert r["bbox_answer"] == boxes_from_mask(read_mask(it), FRAME)
            assert r["bbox_answer"], "every embedded defect mask has pixels"
            for x1, y1, x2, y2 in r["bbox_answer"]:
                assert 0 <= x1 < x2 <= 224 and 0 <= y1 < y2 <= 224
            # the box covers the mask's pixels (the embedded images are 224 x 224: no resize)
            m = read_mask(it) > 0
            ys, xs = np.nonzero(m)
            x1, y1, x2, y2 = r["bbox_answer"][0]
            assert x1 == xs.min() and y1 == ys.min() and x2 == xs.max() + 1 and y2 == ys.max() + 1
        else:
            assert r["bbox_answer"] == []


def test_templated_answers_score_the_reward_maximum(recs):
    """A templated answer for an anomalous record is a perfect AD-FM answer: R_cls 1, R_loc 1
    (exact boxes, right count), R_fmt 1.2 -> 3.2; a normal record's gets the focus term 0.5."""
    _, out = recs
    texts = [D.rationale(r) for r in out]
    kw = dict(solution=[r["solution"] for r in out], bbox_answer=[r["bbox_answer"] for r in out],
              coord_limit=225)
    total, parts = R.combine(["adfm_cls", "adfm_loc", "adfm_fmt"], [1.0, 1.0, 1.0], texts, **kw)
    for r, t in zip(out, total):
        assert t == pytest.approx(3.2 if r["solution"] == "A" else 2.7), D.rationale(r)
    assert all(A.is_correct(t, r["solution"]) for t, r in zip(texts, out))
    # the wrong letter: R_cls 0, so "incorrect" for difficulty-aware resampling
    flipped = [D.rationale(r, "B" if r["solution"] == "A" else "A") for r in out]
    assert not any(A.is_correct(t, r["solution"]) for t, r in zip(flipped, out))


def test_with_rationales_adds_the_assistant_turn(recs):
    _, out = recs
    sft = D.with_rationales(out[:3])
    assert [m["role"] for m in sft[0]["messages"]] == ["user", "assistant"]
    assert sft[0]["messages"][1]["content"] == D.rationale(out[0])
    assert "messages" in out[0] and len(out[0]["messages"]) == 1  # the input is not changed


def test_build_cli_writes_adfm_records(recs, tmp_path, capsys):
    """``python -m emit_jax.data.build --adfm-frame 448``: AD-FM records for a user's dataset,
    boxes in the 448 frame (the embedded 224 masks scaled x2)."""
    import json

    from emit_jax.data import build

    items, _ = recs
    root = items[0].path.split("/pill/")[0]
    out = tmp_path / "adfm.jsonl"
    assert build.main(["--source", root, "--out", str(out), "--stage", "2", "--split", "all",
                       "--max-per-type", "2", "--adfm-frame", "448"]) == 0
    summary = json.loads(capsys.readouterr().out)
    rows = [json.loads(line) for line in open(out, encoding="utf-8")]
    assert summary["records"] == len(rows) > 0 and summary["anomalous"] > 0
    for r in rows:
        assert r["frame"] == [448, 448] and "448x448" in r["messages"][0]["content"]
        for x1, y1, x2, y2 in r["bbox_answer"]:
            assert 0 <= x1 < x2 <= 448 and 0 <= y1 < y2 <= 448
    assert sum(len(r["bbox_answer"]) for r in rows) == summary["boxes"] > 0
