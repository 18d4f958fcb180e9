"""The grain input pipeline: JSONL -> padded batches, seeded, sharded, resumable."""

import numpy as np
import pytest

from test_tasks import make_mvtec
from emit_jax.data import jsonl
from emit_jax.data.records import build
from emit_jax.data.pipeline import IGNORE, PipelineConfig, bucket, make_dataset
from emit_jax.data.tokenizer import special_ids, train_tiny_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tiny_tokenizer(None, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    d = tmp_path_factory.mktemp("ds")
    root = make_mvtec(d / "ds")
    out = d / "sft.jsonl"
    build(root, str(out), 1)
    return list(jsonl.read_jsonl(out))


def cfg(**kw):
    base = dict(image_size=28, max_tiles=2, tokens_per_tile=4, length_buckets=(512, 1024, 2048),
                tile_bucket=4)
    base.update(kw)
    return PipelineConfig(**base)


def test_batches_shapes_labels_and_comp(tok, records):
    ids = special_ids(tok)
    c = cfg(comp_slots=5, comp_token_id=ids["<COMP_CONTEXT>"])
    batch = next(iter(make_dataset(records, tok, c, batch_size=4, seed=0)))
    b, L = batch["input_ids"].shape
    assert b == 4 and L in c.length_buckets
    assert batch["attention_mask"].sum(1).min() > 0
    # right padding: real tokens first; labels only on the answer letter + <|im_end|>
    for i in range(b):
        n = batch["attention_mask"][i].sum()
        assert batch["attention_mask"][i, :n].all() and not batch["attention_mask"][i, n:].any()
        lab = batch["labels"][i][batch["labels"][i] != IGNORE]
        assert len(lab) == 2 and lab[-1] == ids["<|im_end|>"]
        assert tok.decode([lab[0]]).strip() in ("A", "B", "C", "D")
    # every sample here has two images and a trigger phrase: CE + SP slots in each row
    assert batch["num_ce"] == 4 and batch["ce_pixels"].shape == (4, 2, 3, 28, 28)
    assert ((batch["input_ids"] == ids["<COMP_CONTEXT>"]).sum(1) == 5).all()
    n_img_tokens = (batch["input_ids"] == ids["<IMG_CONTEXT>"]).sum()
    assert n_img_tokens == batch["num_tiles"] * 4
    assert batch["pixel_values"].shape[0] % 4 == 0 and batch["pixel_values"].shape[0] >= batch["num_tiles"]


def test_left_padding_for_generation(tok, records):
    batch = next(iter(make_dataset(records, tok, cfg(pad_side="left", train=False),
                                   batch_size=3, seed=0)))
    m = batch["attention_mask"]
    assert m[:, -1].all()


def test_seeded_shuffle_sharding_and_resume(tok, records):
    c = cfg(train=False)

    def ids_of(ds, n):
        it = iter(ds)
        return [tuple(next(it)["id"]) for _ in range(n)]

    a = ids_of(make_dataset(records, tok, c, batch_size=2, seed=1), 3)
    assert a == ids_of(make_dataset(records, tok, c, batch_size=2, seed=1), 3)
    assert a != ids_of(make_dataset(records, tok, c, batch_size=2, seed=2), 3)
    # two processes see disjoint records of the same shuffle
    p0 = make_dataset(records, tok, c, batch_size=2, seed=1, num_epochs=1, process_index=0,
                      process_count=2)
    p1 = make_dataset(records, tok, c, batch_size=2, seed=1, num_epochs=1, process_index=1,
                      process_count=2)
    s0 = {i for b in p0 for i in b["id"]}
    s1 = {i for b in p1 for i in b["id"]}
    assert not s0 & s1 and len(s0 | s1) >= len(records) - 4
    # the iterator's state resumes exactly
    it = iter(make_dataset(records, tok, c, batch_size=2, seed=1))
    next(it)
    state = it.get_state()
    want = [tuple(next(it)["id"]) for _ in range(2)]
    it2 = iter(make_dataset(records, tok, c, batch_size=2, seed=1))
    it2.set_state(state)
    assert [tuple(next(it2)["id"]) for _ in range(2)] == want


def test_training_augmentation_is_seeded(tok, records):
    c = cfg(train=True)
    a = next(iter(make_dataset(records, tok, c, batch_size=2, seed=5)))["pixel_values"]
    b = next(iter(make_dataset(records, tok, c, batch_size=2, seed=5)))["pixel_values"]
    np.testing.assert_array_equal(a, b)


def test_processes_together_read_the_one_process_batch(tok, records):
    """Step s of 2 processes x batch 2 holds the records of step s of 1 process x batch 4, with
    the same (seeded, per-record) augmentation: multihost loading does not change the data."""
    ids = special_ids(tok)
    c = cfg(train=True, comp_slots=5, comp_token_id=ids["<COMP_CONTEXT>"])
    one = iter(make_dataset(records, tok, c, batch_size=4, seed=3))
    two = [iter(make_dataset(records, tok, c, batch_size=2, seed=3, process_index=p,
                             process_count=2)) for p in (0, 1)]
    for _ in range(3):
        whole, parts = next(one), [next(t) for t in two]
        assert sorted(whole["id"]) == sorted(i for part in parts for i in part["id"])
        for n, rid in enumerate(whole["id"]):  # the same tiles and CE pair for the same record
            part = next(p for p in parts if rid in p["id"])
            m = part["id"].index(rid)
            np.testing.assert_array_equal(_row_tiles(whole, n, ids), _row_tiles(part, m, ids))
            np.testing.assert_array_equal(whole["ce_pixels"][n], part["ce_pixels"][m])


def test_data_position_moves_to_another_process_count():
    from emit_jax.training.sft import _data_state

    saved = {"data": {"next_index": 8}, "data_processes": 2}  # 2 processes x 8 records each
    assert _data_state(saved, 1) == {"next_index": 16}
    assert _data_state(saved, 4) == {"next_index": 4}
    assert _data_state({"data": {"next_index": 5}}, 1) == {"next_index": 5}  # older checkpoints
    with pytest.raises(ValueError, match="does not split over 3 processes"):
        _data_state(saved, 3)


def _row_tiles(batch, row, ids, tokens_per_tile=4):
    """The tiles of ``row``: a collated batch stacks them in row order."""
    per_row = (batch["input_ids"] == ids["<IMG_CONTEXT>"]).sum(1) // tokens_per_tile
    start = int(per_row[:row].sum())
    return batch["pixel_values"][start:start + int(per_row[row])]


def test_bucket_overflow_is_an_error():
    assert bucket(300, (256, 512)) == 512
    with pytest.raises(ValueError, match="largest length bucket 512"):
        bucket(600, (256, 512))


def test_label_positions_give_the_full_cross_entropy(tok, records):
    """sft_loss on the gathered label positions (to_device adds them) equals the loss over the
    full [B, T, V] logits, on a real tiny model and batch."""
    from flax import nnx

    from emit_jax.models import architectures
    from emit_jax.models.internvl import InternVL
    from emit_jax.data.pipeline import label_positions
    from emit_jax.training.sft import sft_loss, to_device

    batch = next(iter(make_dataset(records, tok, cfg(), batch_size=3, seed=0)))
    lp = label_positions(batch["labels"])
    k = lp["label_pos"].shape[1]
    assert k == 8 and lp["label_mask"].sum() == (batch["labels"][:, 1:] != IGNORE).sum()
    for i in range(3):  # the gathered ids are the next tokens at those positions
        n = lp["label_mask"][i].sum()
        np.testing.assert_array_equal(batch["labels"][i, lp["label_pos"][i, :n] + 1],
                                      lp["label_ids"][i, :n])
    mcfg = architectures.get_config("tiny")
    mcfg = mcfg.replace(text=mcfg.text.__class__(**{**mcfg.text.__dict__,
                                                    "vocab_size": len(tok)}),
                        vision=mcfg.vision.__class__(**{**mcfg.vision.__dict__, "image_size": 28,
                                                        "patch_size": 7}),
                        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"))
    model = InternVL(mcfg.validate(), rngs=nnx.Rngs(0))
    gathered = to_device(batch)
    full = {k2: v for k2, v in gathered.items() if not k2.startswith("label_")}
    (l1, (n1, c1)), (l2, (n2, c2)) = sft_loss(model, gathered), sft_loss(model, full)
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-5)
    assert int(n1) == int(n2) == lp["label_mask"].sum() and int(c1) == int(c2)
    assert np.isfinite(float(l1)) and float(l1) > 0


def test_nll_and_correct_count_match_numpy():
    """The SFT loss's parts against NumPy: mean NLL over the masked tokens, and the count of
    tokens whose gold logit is the row's argmax (computed there as gold >= max)."""
    import jax.numpy as jnp

    from emit_jax.training.sft import _nll

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 7, 50)).astype(np.float32)
    targets = rng.integers(0, 50, (3, 7))
    targets[0, :4] = logits[0, :4].argmax(-1)  # some right answers
    mask = rng.random((3, 7)) > 0.3
    loss, (n, correct) = _nll(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    m = logits.max(-1, keepdims=True)
    logz = (m[..., 0] + np.log(np.exp(logits - m).sum(-1)))
    gold = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    want = ((logz - gold) * mask).sum() / mask.sum()
    assert float(loss) == pytest.approx(want, rel=1e-5)
    assert int(n) == mask.sum()
    assert int(correct) == ((logits.argmax(-1) == targets) & mask).sum() >= 1
