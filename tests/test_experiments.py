"""Pure parts of the experiment scripts."""

import json
import os

import numpy as np
import pytest

from emit_jax.experiments.heatmap_auroc import auroc, reduce_map

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_auroc_equals_the_mann_whitney_statistic():
    rng = np.random.default_rng(0)
    s = np.round(rng.normal(size=60), 1)  # rounded: ties happen
    y = rng.integers(0, 2, size=60)
    pos, neg = s[y == 1], s[y == 0]
    # rank-sum form with mid-ranks for ties
    order = np.argsort(s, kind="stable")
    ranks = np.empty(60)
    ranks[order] = np.arange(1, 61)
    for v in np.unique(s):
        ranks[s == v] = ranks[s == v].mean()
    u = ranks[y == 1].sum() - len(pos) * (len(pos) + 1) / 2
    assert auroc(s, y) == pytest.approx(u / (len(pos) * len(neg)))
    assert auroc([1, 2, 3], [0, 0, 1]) == 1.0 and auroc([3, 2, 1], [0, 0, 1]) == 0.0
    assert np.isnan(auroc([1, 2], [1, 1]))


def test_threshold_balanced_accuracy_matches_a_brute_force_search():
    from emit_jax.experiments.heatmap_auroc import balanced_accuracy, best_threshold

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, size=50)
    s = np.round(rng.normal(size=50) + 1.2 * y, 1)  # rounded: ties happen
    brute = max(0.5 * ((s[y == 1] >= t).mean() + (s[y == 0] < t).mean())
                for t in np.concatenate([s, [np.inf]]))
    t, acc = best_threshold(s, y)
    assert acc == pytest.approx(brute) and balanced_accuracy(s, y, t) == pytest.approx(acc)
    # recall of anomalous 2/3, of normal 1/2; a separable split reaches 1.0
    assert balanced_accuracy([0, 2, 3, 1, 0.5], [1, 1, 1, 0, 0], 1.5) == pytest.approx(
        0.5 * (2 / 3 + 1.0))
    assert best_threshold([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == (pytest.approx(0.5), 1.0)
    assert np.isnan(best_threshold([1, 2], [1, 1])[1]) and np.isnan(balanced_accuracy([1], [0], 0))


def test_class_thresholds_judge_each_class_by_its_own():
    from emit_jax.experiments.heatmap_auroc import best_threshold, class_accuracy, class_thresholds

    # class a's anomalies score above 1, class b's above 5: one threshold cannot separate both
    c = ["a"] * 4 + ["b"] * 4 + ["z"] * 2
    s = [0.0, 0.5, 1.5, 2.0, 4.0, 4.5, 5.5, 6.0, 0.2, 9.0]
    y = [0, 0, 1, 1, 0, 0, 1, 1, 0, 1]
    per = class_thresholds(c[:8], s[:8], y[:8])  # "z" unseen: it falls back
    assert per == {"a": pytest.approx(1.0), "b": pytest.approx(5.0)}
    assert class_accuracy(c, s, y, per, fallback=3.0) == 1.0
    assert best_threshold(s, y)[1] < 1.0
    assert class_thresholds(["a", "a"], [1, 2], [1, 1]) == {}  # one label: none


def test_reduce_map():
    h = np.arange(256, dtype=np.float32).reshape(16, 16)
    r = reduce_map(h)
    assert r["max"] == 255 and r["top8_mean"] == pytest.approx(251.5) and r["mean"] == pytest.approx(127.5)


def test_adfm_compare_summary_and_row_configs():
    """The AD-FM comparison: every row shares the base stage's data and evaluation settings,
    and the table gives mean ± std (population) per row and column, '–' where a value is
    missing (a NaN mean IoU when no anomalous image was evaluated)."""
    from emit_jax.experiments import adfm_compare as C

    cfgs = {row: C.row_config(row, {"grpo.steps": 3}, 1) for row in C.ROWS}
    for row, cfg in cfgs.items():
        assert cfg.data.adfm and cfg.base.adfm and cfg.seed == 1 and cfg.grpo.steps == 3
        assert cfg.eval_adfm == cfgs["AD-FM"].eval_adfm and cfg.eval_adfm_tokens == 64
        assert cfg.stages[0] == "base" and not cfg.export_hf
    assert cfgs["EMIT"].stages == ("base", "sft", "grpo")
    assert cfgs["EMIT"].grpo.get("records", "grpo") == "grpo"
    assert cfgs["AD-FM"].grpo.records == "adfm" and not cfgs["AD-FM"].grpo.resample
    assert cfgs["AD-FM + difficulty-aware GRPO"].grpo.resample
    assert cfgs["AD-FM + difficulty-aware GRPO"].grpo.correct == "adfm_cls"
    runs = [{"row": "AD-FM", "seed": s, "average": a, "tasks": {"Anomaly Discrimination": a},
             "adfm": {"accuracy": a, "mean_iou": iou}}
            for s, a, iou in ((0, 50.0, 10.0), (1, 60.0, float("nan")))]
    table, data = C.summarize(runs)
    assert data["AD-FM"]["Anomaly Discrimination"]["mean"] == 55.0
    assert data["AD-FM"]["Anomaly Discrimination"]["std"] == 5.0
    assert data["AD-FM"]["mean IoU"]["values"] == [10.0]
    assert "| AD-FM | 55.0 ± 5.0 |" in table and "–" in table


def test_table1_reports_every_task_asked_on_the_unseen_images():
    """``eval_unseen_tasks=()`` (the embedded recipe): the table adds the unseen images' four
    tasks per row, mean ± std (population) over seeds, with their average; a run that asked
    AD alone there adds nothing but the main table's unseen column."""
    from emit_jax.experiments import table1 as T

    four = dict(zip(T.TASK_COLUMNS, (80.0, 30.0, 25.0, 100.0)))
    runs = [{"row": "+ stage 1 (SP + CE)", "seed": s, "average": 50.0, "letters": {"A": 1, "B": 1},
             "tasks": dict(four), "unseen_ad": four["Anomaly Discrimination"] + d,
             "unseen_questions": 1008,
             "unseen_tasks": {**four, "Anomaly Discrimination": four["Anomaly Discrimination"] + d}}
            for s, d in ((0, -2.0), (1, 2.0))]
    table, data = T.summarize(runs)
    rows = data[T.UNSEEN_TABLE]["+ stage 1 (SP + CE)"]
    assert rows["Anomaly Discrimination"] == {"mean": 80.0, "std": 2.0, "values": [78.0, 82.0]}
    assert rows["Object Classification"]["mean"] == 100.0
    assert rows["Average"]["values"] == [np.mean([78.0, 30.0, 25.0, 100.0]),
                                         np.mean([82.0, 30.0, 25.0, 100.0])]
    assert "1008 questions" in table
    assert "| + stage 1 (SP + CE) | 80.0 ± 2.0 | 30.0 ± 0.0 | 25.0 ± 0.0 | 100.0 ± 0.0 | 58.8 ± 0.5 |" \
        in table.split("Unseen images")[1]
    ad_only = [dict(r, unseen_tasks={"Anomaly Discrimination": r["unseen_ad"]}) for r in runs]
    table, data = T.summarize(ad_only)
    assert T.UNSEEN_TABLE not in data and "Unseen images" not in table
    assert data["+ stage 1 (SP + CE)"][T.UNSEEN_COLUMN]["mean"] == 80.0


def test_fresh_images_records_and_fixed_option_order(tmp_path):
    """The extra datasets' AD questions: one per image, each with its own reference; with the
    options fixed to No / Yes the answer letter is the label (B exactly for anomalous images),
    whatever order the builder drew."""
    from emit_jax.data.comp import use_comp
    from emit_jax.experiments.fresh_images import fixed_ad_order
    from emit_jax.training.data import fresh_records

    recs = fresh_records([1], cache_dir=str(tmp_path))
    assert len(recs) > 300 and all(r["task_type"] == "anomaly_discrimination" for r in recs)
    assert all(r["id"].startswith("fresh1-") and r["images"][0] != r["images"][1] for r in recs)
    orders = {tuple(r["options"]) for r in recs}
    assert orders == {("Yes.", "No."), ("No.", "Yes.")}  # the builder shuffles
    for r in recs:
        f = fixed_ad_order(r)
        assert f["options"] == ["No.", "Yes."]
        assert f["messages"][0]["content"].endswith("A. No.\nB. Yes.\n")
        assert f["messages"][1]["content"] == ("B" if r["adlabel"] else "A")
        letter = r["messages"][1]["content"]
        assert r["options"]["AB".index(letter)] == ("Yes." if r["adlabel"] else "No.")
    yes_no = fresh_records([1], cache_dir=str(tmp_path), ad_order="yes_no")  # the cached dataset
    assert [r["images"] for r in yes_no] == [r["images"] for r in recs]
    assert all(r["options"] == ["Yes.", "No."] and r["messages"][1]["content"]
               == ("A" if r["adlabel"] else "B") for r in yes_no)
    think = dict(recs[0], options=["Yes.", "No."], solution="B",
                 messages=[{"role": "user", "content": "Q\nA. Yes.\nB. No.\nthink first"},
                           {"role": "assistant", "content": "<think>ok</think><answer>B</answer>"}])
    f = fixed_ad_order(think)
    assert f["solution"] == "A" and f["messages"][1]["content"].endswith("<answer>A</answer>")
    assert f["messages"][0]["content"] == "Q\nA. No.\nB. Yes.\nthink first"
    assert think["solution"] == "B"  # the input is not changed
    # sft.fresh_tasks: other tasks of the same images; DL's with the two images the CE rule needs
    more = fresh_records([1], tasks_=("anomaly_discrimination", "defect_localization"),
                         cache_dir=str(tmp_path))
    dl = [r for r in more if r["task_type"] == "defect_localization"]
    assert [r["images"] for r in more if r not in dl] == [r["images"] for r in recs]
    assert 100 < len(dl) < len(recs) and all(r["adlabel"] == 1 and len(r["images"]) == 2 and
                                             use_comp(2, r["messages"][0]["content"]) for r in dl)
    with pytest.raises(ValueError, match="seed 0"):
        fresh_records([0])
    with pytest.raises(ValueError, match="not Yes./No."):
        fixed_ad_order(dict(recs[0], options=["Maybe.", "No."]))


def test_stage1_with_the_llm_trains_the_language_model_too():
    """``sft.train_llm`` (issue 29's stage 1 that trains the LLM to read the contrastive
    tokens): the trainable set adds exactly the language model's parameters to EMIT's soft
    prompt and projector."""
    from flax import nnx

    from emit_jax.models.emit import EMIT
    from emit_jax.training.stages import stage1_trainable
    from test_emit import small_mllm

    model = EMIT.create(small_mllm(), hint_ids=[1])
    paths = lambda f: {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(  # noqa: E731
        nnx.state(model, f))}
    emit_only, with_llm, every = paths(stage1_trainable()), paths(stage1_trainable(True)), \
        paths(nnx.Param)
    assert emit_only and all("soft_prompt" in p or "projector" in p for p in emit_only)
    llm = {p for p in every if "language_model" in p}
    assert llm and with_llm == emit_only | llm


def test_unseen_records_ask_every_image_of_an_untrained_dataset_as_the_test_split_does(tmp_path):
    """``eval_unseen``'s records: every image of embedded seed 1000 once, AD only, built like the
    test split (stage-2 prompt, direct answer), references normal images of the query's class."""
    from emit_jax.data.embedded import ensure_cached
    from emit_jax.data.mvtec import scan
    from emit_jax.training.data import UNSEEN_SEED0, stage_records, unseen_records

    recs = unseen_records(1, cache_dir=str(tmp_path), ad_order="yes_no")
    items = scan(ensure_cached(str(tmp_path), seed=UNSEEN_SEED0))
    by_path = {it.path: it for it in items}
    assert sorted(r["images"][-1] for r in recs) == sorted(by_path)
    assert all(r["id"].startswith(f"unseen{UNSEEN_SEED0}-") for r in recs)
    for r in recs:
        q, ref = by_path[r["images"][-1]], by_path[r["images"][0]]
        assert r["task_type"] == "anomaly_discrimination" and r["options"] == ["Yes.", "No."]
        assert r["solution"] == ("A" if q.is_anomalous else "B")
        assert not ref.is_anomalous and ref.path != q.path and ref.object_type == q.object_type
    # the prompt is the test split's (stage 2, no think instruction): same text as seed 0's test
    # AD questions up to the object's name
    test = [r for r in stage_records(ensure_cached(str(tmp_path), seed=0), str(tmp_path / "w"),
                                     ad_order="yes_no", domain_knowledge=False)["test"]
            if r["task_type"] == "anomaly_discrimination"]
    tail = lambda r: r["messages"][0]["content"].rsplit("?", 1)[-1]  # noqa: E731
    assert {tail(r) for r in recs} == {tail(r) for r in test}
    assert unseen_records(0) == []


def test_pointer_tasks_are_what_they_say(tmp_path):
    """experiments.pointer: the lookup labels are the letters before the words, the enumerating
    rationale stops at the option that the stated fact maps to and ends with its letter, the
    restating one ends with the letter that followed the fact's word."""
    import random

    from emit_jax.data import tokenizer as T
    from emit_jax.experiments.pointer import Tasks, batch

    tok = T.train_tiny_tokenizer(T.default_corpus(), tmp_path / "tok")
    tasks = Tasks(tok, 8)
    rng = random.Random(0)
    ids, labels = tasks.lookup(rng)
    letters = {w: tasks.letters[i] for i, w in enumerate(ids[j] for j in range(2, 16, 4))}
    asked = [(ids[k - 2], labels[k]) for k in range(len(ids)) if labels[k] >= 0]
    assert len(asked) == 4 and all(letters[w] == y for w, y in asked)
    for _ in range(20):
        ids, labels = tasks.enumerate(rng)
        fact = tasks.options[tasks.facts.index(ids[len(tasks.head)])]
        block = ids.index(tasks.letters[0])
        words = [ids[block + 2 + 4 * i] for i in range(4)]
        answer = tasks.letters[words.index(fact)]
        assert ids[-1] == labels[-1] == answer
        assert ids.count(tasks.yes[0]) == 1
        assert ids.count(tasks.no[0]) == words.index(fact)
    # restate: the options word then letter, then the fact's option word and its letter,
    # which is the letter that followed the same word in the restatement (an induction copy)
    same = Tasks(tok, 8, same_words=True)
    for _ in range(20):
        ids, labels = same.restate(rng)
        fact = ids[len(same.head)]
        block = ids.index(same.letters[0])
        words = [ids[block + 2 + 4 * i] for i in range(4)]
        answer = same.letters[words.index(fact)]
        assert ids[-1] == labels[-1] == answer
        start = ids.index(same.tags[0])
        restated = ids[start + 1:start + 1 + 16]
        assert restated == [t for i, w in enumerate(words)
                            for t in (same.letters[i], w, same.letters[i], *same.line)]
        # the letter after the fact word (index answer_pos - 3, as scores() reads it)
        assert ids[-5:-3] == [fact, answer] and labels[-4] == answer
    for task in ("copy", "restate+copy"):
        b = batch(same, task, rng, 4)
        assert b[0].shape == b[1].shape == b[2].shape and b[3].shape == (4,)


def test_feature_probe_parts():
    """The linear probe separates separable classes and is at chance on noise labels; the grid
    cell of a mask's centroid and of a heat map's maximum follow one convention (row-major,
    0 = top left); the map's shape numbers are what they say."""
    from emit_jax.experiments.feature_probes import cell_of, hottest_cell, map_shape, softmax_probe

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 12)) * 3
    y = rng.integers(0, 5, size=400)
    x = centres[y] + rng.normal(size=(400, 12))
    acc, chance = softmax_probe(x[:300], list(y[:300]), x[300:], list(y[300:]))
    assert acc > 0.95 and chance == 0.2
    noise = rng.integers(0, 5, size=400)
    acc, _ = softmax_probe(x[:300], list(noise[:300]), x[300:], list(noise[300:]))
    assert acc < 0.4
    for cell in range(9):
        r, c = divmod(cell, 3)
        mask = np.zeros((224, 224), bool)
        mask[r * 75 + 20:r * 75 + 40, c * 75 + 20:c * 75 + 40] = True
        heat = np.zeros((16, 16))
        heat[r * 5 + 2, c * 5 + 2] = 1.0
        assert cell_of(mask) == cell and hottest_cell(heat) == cell
    heat = np.arange(16.0).reshape(4, 4)
    shape = map_shape(heat)
    assert shape[0] == 15 and shape[1] == pytest.approx(11.5) and shape[2] == pytest.approx(7.5)
    assert shape[3] == pytest.approx(8 / 16) and shape[4] == pytest.approx(heat.std())
    with pytest.raises(ValueError):
        cell_of(np.zeros((4, 4), bool))


def test_pixel_heatmap_is_the_heat_map_of_raw_patches():
    """``heatmap_auroc --features pixels``: each patch's raw pixels (channel-major, as the ViT's
    patch embedding reads them) in the features' place, the reference in its four rotations;
    checked against the literal NumPy definition (tests/test_heatmap.py) on patches cut here."""
    from emit_jax.experiments.heatmap_auroc import pixel_heatmap
    from test_heatmap import numpy_reference

    rng = np.random.default_rng(0)
    p, g, n = 4, 5, 2
    ce = rng.normal(size=(n, 2, 3, g * p, g * p)).astype(np.float32)

    def cut(img):  # [3, H, W] -> [g, g, 3 * p * p]
        return np.stack([np.stack([img[:, i * p:(i + 1) * p, j * p:(j + 1) * p].reshape(-1)
                                   for j in range(g)]) for i in range(g)])

    q = np.stack([cut(ce[b, 1]) for b in range(n)])[None]
    r = np.stack([np.stack([cut(np.rot90(ce[b, 0], k, axes=(1, 2))) for k in range(4)])
                  for b in range(n)])[None]
    want = numpy_reference(q, r, window=1, zero_fill=True)
    got = np.asarray(pixel_heatmap(ce, p, 1))
    np.testing.assert_allclose(got, want, atol=1e-5)
    same = np.stack([ce[:, 0], ce[:, 0]], 1)  # the query is its reference: nothing anomalous
    np.testing.assert_allclose(np.asarray(pixel_heatmap(same, p, 1)), 0.0, atol=1e-5)


def test_heatmap_auroc_breakdown_by_class_and_defect():
    from emit_jax.experiments.heatmap_auroc import breakdown

    every = [("pill", "good", 0, 0.1), ("pill", "crack", 1, 0.9), ("pill", "good", 0, 0.5),
             ("pill", "hole", 1, 0.4), ("nut", "good", 0, 0.3), ("nut", "crack", 1, 0.2)]
    by_class, by_defect = breakdown(every)
    assert by_class == {
        "nut": {"questions": 2, "anomalous": 1, "auroc_max": 0.0},
        "pill": {"questions": 4, "anomalous": 2, "auroc_max": auroc([0.1, 0.9, 0.5, 0.4],
                                                                   [0, 1, 0, 1])}}
    assert by_class["pill"]["auroc_max"] == 0.75
    # each defect type against every normal query (0.1, 0.5, 0.3)
    assert by_defect == {"crack": {"anomalous": 2, "auroc_max": 4 / 6},
                         "hole": {"anomalous": 1, "auroc_max": 2 / 3}}


def test_the_pointer_experiment_says_a_diverged_run(capsys):
    """Twenty-sixth probe PT4: ``experiments.pointer --lr 1e9`` printed "loss nan" as a result
    and ended with exit 0, without a word about the learning rate."""
    from emit_jax.experiments.pointer import main

    prog = "python -m emit_jax.experiments.pointer"
    rc = main(["--steps", "6", "--lr", "1e9", "--hidden", "16", "--layers", "1", "--batch", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 3, err
    assert err[0] == "warning: --lr 1e+09 is above 0.1: almost surely not meant (the default is 3e-3)"
    assert err[-1].startswith(f"{prog}: error: step ") and err[-1].endswith(
        ": the loss is nan; the run diverged (try a smaller --lr)"), err


# --------------------------------------------------------------------------- vit_pretrain
def test_vit_pretrain_warp_and_correspondence_agree():
    """``random_warp`` maps view pixels to source pixels; ``warp_image`` resamples through it;
    ``correspondence`` finds in view B the source point of each of view A's patch centres."""
    from emit_jax.experiments.vit_pretrain import correspondence, random_warp, warp_image

    rng = np.random.default_rng(0)
    img = rng.normal(size=(3, 28, 28)).astype(np.float32)
    ident = random_warp(rng, 28, 0.0, 0.0, 0.0)
    np.testing.assert_allclose(ident, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(warp_image(img, ident), img, atol=1e-6)
    shift = np.array([[1.0, 0, 7], [0, 1, 0], [0, 0, 1]])  # view x -> source x + 7
    np.testing.assert_allclose(warp_image(img, shift)[:, :, :21], img[:, :, 7:], atol=1e-6)
    # view B = source shifted by one 7-pixel patch: view A's patch (r, c) is B's (r, c - 1)
    pos, valid = correspondence(ident, shift, grid=4, patch=7)
    r, c = np.divmod(np.arange(16), 4)
    np.testing.assert_allclose(pos, np.stack([r, c - 1], -1), atol=1e-6)
    np.testing.assert_array_equal(valid, c >= 1)
    # random warps: both views' points go to the same source pixel
    for _ in range(5):
        ma, mb = (random_warp(rng, 224, 45.0, 14.0, 0.05) for _ in range(2))
        assert abs(np.linalg.det(ma[:2, :2]) - 1) < 0.12
        pos, valid = correspondence(ma, mb, grid=16, patch=14)
        rr, cc = np.divmod(np.arange(256), 16)
        xa = np.stack([(cc + 0.5) * 14 - 0.5, (rr + 0.5) * 14 - 0.5, np.ones(256)])
        xb = np.stack([(pos[:, 1] + 0.5) * 14 - 0.5, (pos[:, 0] + 0.5) * 14 - 0.5, np.ones(256)])
        np.testing.assert_allclose(ma @ xa, mb @ xb, atol=1e-3)
        assert 0.3 < valid.mean() <= 1.0


def test_vit_pretrain_bilinear_and_dense_infonce_match_numpy():
    import jax.numpy as jnp

    from emit_jax.experiments.vit_pretrain import bilinear, dense_infonce

    rng = np.random.default_rng(1)
    n, g, d = 2, 4, 5
    feats = rng.normal(size=(n, g, g, d)).astype(np.float32)
    pos = rng.uniform(-0.5, g - 0.5, size=(n, 6, 2)).astype(np.float32)
    want = np.zeros((n, 6, d), np.float32)
    for k in range(n):
        for i, (r, c) in enumerate(np.clip(pos[k], 0, g - 1)):
            r0, c0 = min(int(r), g - 2), min(int(c), g - 2)
            fr, fc = r - r0, c - c0
            want[k, i] = ((1 - fr) * (1 - fc) * feats[k, r0, c0] + (1 - fr) * fc * feats[k, r0, c0 + 1]
                          + fr * (1 - fc) * feats[k, r0 + 1, c0] + fr * fc * feats[k, r0 + 1, c0 + 1])
    np.testing.assert_allclose(bilinear(jnp.asarray(feats), jnp.asarray(pos)), want, atol=1e-5)
    # at integer points it is the grid itself
    ints = np.stack(np.divmod(np.arange(g * g), g), -1)[None].repeat(n, 0).astype(np.float32)
    np.testing.assert_allclose(bilinear(jnp.asarray(feats), jnp.asarray(ints)),
                               feats.reshape(n, g * g, d), atol=1e-6)

    fa, fb = rng.normal(size=(2, n, 6, d)).astype(np.float32)
    valid = np.array([[1, 1, 0, 1, 1, 1], [1, 0, 1, 1, 1, 1]], bool)
    tau, terms = 0.2, []
    for k in range(n):
        a = fa[k] / np.linalg.norm(fa[k], axis=1, keepdims=True)
        b = fb[k] / np.linalg.norm(fb[k], axis=1, keepdims=True)
        for i in np.flatnonzero(valid[k]):
            logits = a[i] @ b[valid[k]].T / tau
            j = list(np.flatnonzero(valid[k])).index(i)
            terms.append(-(logits[j] - np.log(np.exp(logits).sum())))
    got = float(dense_infonce(jnp.asarray(fa), jnp.asarray(fb), jnp.asarray(valid), tau))
    assert abs(got - np.mean(terms)) < 1e-4
    # matching features: the loss falls toward 0 as the temperature does
    assert float(dense_infonce(jnp.asarray(fa), jnp.asarray(fa), jnp.asarray(valid), 0.01)) < 0.05


def test_vit_pretrain_trains_the_vit_only_and_writes_a_model(tmp_path, capsys):
    """Two steps on the embedded default's training split: the ViT's weights move, the LLM's
    do not, and the checkpoint loads; an existing non-empty --out is refused in one line."""
    from flax import nnx, traverse_util

    from emit_jax import checkpoint, cli
    from emit_jax.data.embedded import ensure_cached
    from emit_jax.data.tokenizer import load_tokenizer
    from emit_jax.experiments.vit_pretrain import main, training_images
    from emit_jax.models import architectures
    from emit_jax.training.data import fresh_records, tokenizer_for
    from emit_jax.training.stages import fits_tokenizer, fitted_model

    out = tmp_path / "vit"
    # one step (twenty-ninth probe V12: --steps 1 left the cosine schedule no step, a traceback)
    assert main(["--out", str(out), "--steps", "1", "--batch", "2", "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["images"] > 50 and row["layers"] == [1, 2, 4, 5] and np.isfinite(row["loss_last"])
    # --fresh 1 adds every image of the fresh dataset of seed 1 (stage 1's first), not another
    paths = training_images(ensure_cached(), fresh=1)
    extra = {p for r in fresh_records([1]) for p in r["images"]}
    assert len(paths) == row["images"] + len(extra) and set(paths[row["images"]:]) == extra
    assert all("seed1" in p and "seed0" not in p for p in extra), sorted(extra)[:2]
    model = checkpoint.load_model(str(out))[0]
    # the model a training run on the dataset builds, its vocabulary fitted to the tokenizer
    # that rides along in the assets (before: the architecture's 151k-row vocabulary and no
    # tokenizer, so train --config.init_from trained its base stage with the image tokens never
    # replaced, then failed at stage 1)
    built = tokenizer_for(str(tmp_path / "tok"), ensure_cached())
    assert load_tokenizer(checkpoint.assets_dir(str(out))).get_vocab() == built.get_vocab()
    assert fits_tokenizer(model.config, built)
    init = fitted_model(architectures.get_config("tiny"), built, 0)
    got, ref = ({"/".join(map(str, k)): v for k, v in
                 traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(m))).items()}
                for m in (model, init))
    assert got.keys() == ref.keys()
    moved = {k for k in got if not np.array_equal(got[k], ref[k])}
    assert moved and all(k.startswith("vision_tower/") for k in moved)
    assert any("embeddings" in k for k in moved) and any("layers" in k for k in moved)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    prog = "python -m emit_jax.experiments.vit_pretrain"
    assert cli.run(main, ["--out", str(tmp_path / "full"), "--steps", "1"], prog=prog) == 2
    assert [x for x in capsys.readouterr().err.splitlines() if x.strip()] == [
        f"{prog}: error: argument --out: {tmp_path / 'full'}: exists and is not empty; choose a "
        "new checkpoint path"]
    assert cli.run(main, ["--out", "", "--steps", "1"], prog=prog) == 2
    assert "argument --out: empty path" in capsys.readouterr().err
    assert cli.run(main, ["--out", str(tmp_path / "new"), "--data", ensure_cached(), "--fresh",
                          "1"], prog=prog) == 2
    assert [x for x in capsys.readouterr().err.splitlines() if x.strip()] == [
        f"{prog}: error: argument --fresh: fresh datasets are drawn by the embedded generator; "
        "not used with --data"]
    assert not (tmp_path / "new").exists()
    # a training workdir's stage folder, which its runs replace (twenty-ninth probe V22)
    w = tmp_path / "w"
    (w / "data").mkdir(parents=True)
    (w / "data" / "options.json").write_text("{}")
    assert cli.run(main, ["--out", str(w / "sft" / "model"), "--steps", "1"], prog=prog) == 2
    [line] = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert line.startswith(f"{prog}: error: {w / 'sft' / 'model'}: ") and "workdir" in line, line
    assert os.listdir(w) == ["data"]
    assert (tmp_path / "full" / "x").read_text() == "keep"


def test_train_refuses_an_init_from_that_does_not_read_the_tokenizer(tmp_path):
    """An Orbax init_from of another vocabulary (the architecture's 151k rows, image token id
    151667) beside the embedded tokenizer: before, the base stage trained for minutes with the
    image tokens never replaced by the image, then stage 1 failed with a traceback; now one line
    before any stage trains, naming both and the way forward, and no stage folder."""
    from flax import nnx

    from conftest import train
    from emit_jax import checkpoint
    from emit_jax.data.embedded import ensure_cached
    from emit_jax.models import architectures
    from emit_jax.models.internvl import InternVL
    from emit_jax.training.data import tokenizer_for

    tokenizer_for(str(tmp_path / "tok"), ensure_cached())
    init = str(tmp_path / "init")
    checkpoint.save_model(InternVL(architectures.get_config("tiny"), rngs=nnx.Rngs(0)), init,
                          assets_from=str(tmp_path / "tok" / "tokenizer"))
    w = tmp_path / "w"
    r = train("--config", "configs/grpo.py:smoke", "--workdir", str(w), "--config.base.steps=1",
              f"--config.init_from={init}", "--config.eval_limit=0", "--config.eval_unseen=0",
              "--config.export_hf=False", timeout=600)
    assert r.returncode == 2, r.stderr[-3000:]
    [line] = [x for x in r.stderr.splitlines() if "error" in x]
    assert line.startswith(f"emit_jax.train: error: config init_from {init}: the model does not "
                           "read the tokenizer ("), line
    assert "image token id 151667" in line and "--config.tokenizer=DIR" in line, line
    assert not (w / "base").exists()


def test_vit_pretrain_refuses_an_out_another_run_is_writing(tmp_path, capsys):
    """29th probe U4: a second vit_pretrain on the same --out trained all its steps, then was
    refused at the write; export, convert and data.build refuse a second writer at once."""
    from emit_jax import cli
    from emit_jax.experiments import vit_pretrain
    from emit_jax.fileio import output_lock

    out = tmp_path / "vit"
    prog = "python -m emit_jax.experiments.vit_pretrain"
    with output_lock(str(out), what=f"--out {out}: another vit_pretrain is writing it",
                     hint="wait for it to end, or choose another --out"):
        assert cli.run(vit_pretrain.main, ["--out", str(out), "--steps", "1", "--batch", "1"],
                       prog=prog) == 2
    [line] = [x for x in capsys.readouterr().err.splitlines() if "error" in x]
    assert line.startswith(f"{prog}: error: --out {out}: another vit_pretrain is writing it ("), line
    assert line.endswith("; wait for it to end, or choose another --out"), line
    assert not out.exists()


def test_vit_pretrain_interrupted_writes_the_steps_done(tmp_path):
    """Thirtieth probe V22: Ctrl-C during vit_pretrain (25 minutes of steps at the recipe's
    size) ended with "nothing half-written is left" and nothing kept. It now stops after the
    step in progress and writes the ViT of the steps done, its meta saying how many."""
    import signal
    import subprocess
    import sys
    import time

    from emit_jax import checkpoint

    out = tmp_path / "vit"
    env = dict(os.environ, JAX_PLATFORMS="cpu", EMIT_JAX_CACHE=os.environ.get(
        "EMIT_JAX_CACHE", str(tmp_path / "cache")))
    p = subprocess.Popen([sys.executable, "-m", "emit_jax.experiments.vit_pretrain", "--out",
                          str(out), "--steps", "1000", "--batch", "2"], cwd=ROOT, env=env,
                         stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        deadline = time.time() + 300
        for line in p.stderr:
            lines.append(line)
            if line.startswith("step 1/1000") or time.time() > deadline:
                break
        time.sleep(1.0)  # a few more steps
        p.send_signal(signal.SIGINT)
        lines += p.stderr.readlines()
        p.wait(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    err = "".join(lines)
    assert p.returncode == 130, err[-2000:]
    last = err.rstrip().splitlines()[-1]
    prog = "python -m emit_jax.experiments.vit_pretrain"
    assert last.startswith(f"{prog}: interrupted (SIGINT) after step "), last
    done = int(last.split(" after step ")[1].split()[0])
    assert 1 <= done < 1000, last
    assert last.endswith(f"; wrote {out}, the ViT of step {done} (a new --out trains all 1000 "
                         "steps from the start)"), last
    assert "Traceback" not in err, err[-2000:]
    _, meta = checkpoint.load_model(str(out))
    assert meta["vit_pretrain"]["steps_done"] == done and meta["vit_pretrain"]["steps"] == 1000


@pytest.mark.parametrize("args, line", [
    (["--align-turn"], "argument --align-turn: align_turn: true with reference_turns 1 (one "
     "turn, nothing to choose from); set reference_turns above 1"),
    (["--features", "pixels", "--feature-turns", "2"],
     "argument --feature-turns: the pixel map compares the four rot90s only"),
    (["--features", "pixels", "--align-turn", "--reference-turns", "2"],
     "argument --reference-turns: the pixel map compares the four rot90s only"),
])
def test_heatmap_auroc_refuses_turns_it_cannot_use(args, line, capsys):
    """``--align-turn`` with one turn ran EMIT's map without a word; the pixel map has no turns."""
    from emit_jax import cli
    from emit_jax.experiments.heatmap_auroc import main

    prog = "python -m emit_jax.experiments.heatmap_auroc"
    assert cli.run(main, args, prog=prog) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert err == [f"{prog}: error: {line}"]


def test_eval_batch_names_what_the_workdir_lacks(tmp_path):
    """``python -m emit_jax.experiments.eval_batch`` needs a finished run's ``hf/`` and
    ``data/test.jsonl``, and says which is missing (the batched answers themselves:
    tests/test_evaluate.py::test_batched_answers_equal_one_by_one)."""
    from emit_jax.errors import ConfigError
    from emit_jax.experiments.eval_batch import main

    with pytest.raises(ConfigError, match="no hf "):
        main(["--workdir", str(tmp_path)])
    (tmp_path / "hf").mkdir()
    with pytest.raises(ConfigError, match="no data/test.jsonl"):
        main(["--workdir", str(tmp_path)])


def test_dl_ceiling_regions_and_scores():
    """The map's region is the 3 x 3 cell of its maximum (row-major, as prompts.REGIONS); a
    region's plain name is scored through EMIT's parser (the closest offered synonym), its
    offered synonym by identity."""
    from emit_jax.data.prompts import REGIONS
    from emit_jax.experiments.dl_ceiling import region_of, score

    for cell, region in enumerate(REGIONS):
        heat = np.zeros((16, 16))
        heat[(cell // 3) * 5 + 2, (cell % 3) * 5 + 2] = 1.0
        assert region_of(heat) == region
    options = {"A": "Bottom center.", "B": "Rightward.", "C": "Leftward.", "D": "Top."}
    assert score("left", options, "C") == (True, True)  # "Left." is closest to "Leftward."
    assert score("bottom", options, "A") == (True, True)  # "Bottom." -> "Bottom center."
    # "Top left." lands on "Top." (D); no synonym of top left is offered
    assert score("top left", options, "D") == (True, False)
    options = {"A": "Left upper.", "B": "Summit.", "C": "Right.", "D": "Middle."}
    assert score("top", options, "B") == (False, True)  # "Top." lands elsewhere, not on "Summit."


def test_dl_ceiling_among_the_options_compares_the_offered_cells():
    """``among_options`` picks the offered region whose cell holds the map's highest value,
    though the overall maximum sits in a cell no option offers; ``cell_maxima`` cuts the grid
    as ``region_of`` does."""
    from emit_jax.data.prompts import REGIONS
    from emit_jax.experiments.dl_ceiling import among_options, cell_maxima, region_of

    rng = np.random.default_rng(0)
    heat = rng.random((16, 16)) * 0.1
    heat[2, 2] = 1.0  # top left: the maximum, not offered
    heat[8, 13] = 0.5  # right
    heat[14, 1] = 0.3  # bottom left
    cells = cell_maxima(heat)
    assert cells.shape == (9,) and REGIONS[int(np.argmax(cells))] == region_of(heat)
    assert cells[REGIONS.index("right")] == 0.5
    options = {"A": "Bottom center.", "B": "Rightward.", "C": "Lower left.", "D": "Summit."}
    assert among_options(heat, options) == "B"
    heat[8, 13] = 0.0
    assert among_options(heat, options) == "C"


def test_dl_ceiling_follow_table_counts_answer_columns_against_the_maps(tmp_path):
    """``follow_table``: each record's DL answer (matched by its query image) lands in the row
    of the map's column and the column of the region it names (``none`` for a non-region);
    unanswered records are left out, answers of another split refused; the CLI reads
    ``--answers`` files and names a bad one in one line."""
    from emit_jax.errors import ConfigError
    from emit_jax.experiments.dl_ceiling import follow_table, main

    recs = [{"id": f"r{i}", "query": f"/data/embedded-v2-seed0/pill/test/crack/00{i}.png"}
            for i in range(4)]
    answers = [{"image": f"embedded-v2-seed0/pill/test/crack/00{i}.png",
                "question_type": "Defect Localization", "response": resp}
               for i, resp in enumerate(("Leftward.", "Right-hand.", "Crack."))]
    answers.append({"image": "embedded-v2-seed0/pill/test/crack/000.png",
                    "question_type": "Anomaly Detection", "response": "A"})
    table = follow_table(recs, [3, 0, 8, 4], answers)  # map: left, left, right, centre
    assert table.tolist() == [[1, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 1]]
    stray = answers + [{"image": "embedded-v2-seed0/pill/test/crack/009.png",
                        "question_type": "Defect Localization", "response": "Top."}]
    with pytest.raises(ValueError, match="1 of the 4 DL answers match no record"):
        follow_table(recs, [3, 0, 8, 4], stray)
    bad = tmp_path / "results.json"
    bad.write_text("{}")
    with pytest.raises(ConfigError, match="give --workdir too"):
        main(["--checkpoint", str(tmp_path), "--unseen", "1", "--answers", str(bad)])
    with pytest.raises(ConfigError, match=f"--answers {bad}: not a run's results.json"):
        main(["--checkpoint", str(tmp_path), "--workdir", str(tmp_path), "--answers", str(bad)])


def test_zoom_crops_touch_and_measure(tmp_path):
    """``zoom_crops``: a crop touches the mask when the map's maximum sits on the defect and
    not when it sits far from it; ``measure`` scores real embedded pairs for each map, and a
    block past the ViT is refused."""
    from flax import nnx

    from emit_jax.data.embedded import ensure_cached
    from emit_jax.data.mvtec import scan
    from emit_jax.experiments.zoom_crops import measure, touches
    from emit_jax.models import architectures
    from emit_jax.models.emit import EMITConfig
    from emit_jax.models.internvl import InternVL

    mask = np.zeros((100, 100), bool)
    mask[10:20, 70:80] = True  # top right
    heat = np.zeros((4, 4))
    heat[0, 3] = 1.0
    assert touches(mask, heat, 0.35)
    heat = np.zeros((4, 4))
    heat[3, 0] = 1.0  # bottom left: a 35 px crop there misses it
    assert not touches(mask, heat, 0.35)
    assert touches(mask, heat, 1.0)  # the whole image
    items = [it for it in scan(ensure_cached(seed=0)) if it.split == "test"]
    ref = next(it.path for it in items if not it.is_anomalous and it.object_type == "pill")
    pairs = [(it.path, ref, it.mask_path) for it in items
             if it.is_anomalous and it.object_type == "pill"][:3]
    vit = InternVL(architectures.get_config("tiny"), rngs=nnx.Rngs(0)).vision_tower
    rows = measure(vit, pairs, EMITConfig().validate(), [((1, 2), 1), ((1,), 2)], 1.0, batch=2)
    assert [(r["layers"], r["rotations"]) for r in rows] == [([1, 2], 1), ([1], 2)]
    assert all(r["touch"] == 100.0 and r["ms_per_pair"] > 0 for r in rows)  # share 1: always
    with pytest.raises(ValueError, match="outside the ViT's 1..6"):
        measure(vit, pairs, EMITConfig().validate(), [((7,), 1)], 0.35, batch=2)
