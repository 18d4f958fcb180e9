"""GRPO's G completions of a prompt share its prefix: the prompt batch collated once and
repeated (``repeat_rows``) is the batch of the repeated examples, and the step programs that run
each prompt once into a KV cache the group attends to (``make_grpo_fns(shared_prompts=True)``)
give the log-probs, loss, metrics and update of the programs that run every row in full."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from emit_jax.data.pipeline import PipelineConfig, collate, repeat_rows
from test_micro import assert_same_step, grpo_setup


def _examples(rs, S=8):
    out = []
    for i, (t, c) in enumerate([(1, True), (2, False), (0, True), (1, False)]):
        out.append({"input_ids": list(rs.randint(1, 50, 5 + i)), "labels": [-100] * (5 + i),
                    "pixel_values": rs.randn(t, 3, S, S).astype(np.float32),
                    "ce_pixels": rs.randn(2, 3, S, S).astype(np.float32), "use_comp": c,
                    "solution": "A", "task_type": "x", "id": str(i)})
    return out


@pytest.mark.parametrize("G", [1, 2, 4])
def test_repeat_rows_is_the_collation_of_the_repeated_examples(G):
    ex = _examples(np.random.RandomState(0))
    cfg = PipelineConfig(image_size=8, max_tiles=2, tokens_per_tile=4, train=False,
                         comp_slots=0, comp_token_id=0, with_answer=False, length_buckets=(16,),
                         tile_bucket=3, ce_bucket=3, pad_side="left")
    want = collate([e for e in ex for _ in range(G)],
                   dataclasses.replace(cfg, tile_bucket=3 * G, ce_bucket=3 * G))
    got = repeat_rows(collate(ex, cfg), G)
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)


@pytest.mark.parametrize("agg", ["token_mean", "sequence_mean"])
def test_shared_prompt_programs_equal_the_full_ones(agg):
    from emit_jax.training.grpo import make_grpo_fns

    G, N = 2, 8
    rs = np.random.RandomState(5)
    outs = {}
    for shared in (False, True):
        ref, policy, opt, wrt, g, b, _, _, _ = grpo_setup(agg)  # 6 prompts, a LoRA policy
        g = dataclasses.replace(g, G=G)
        if not outs:
            toks = rs.randint(1, 60, size=(6 * G, N)).astype(np.int32)
            lens = np.array([8, 3, 0, 5, 8, 1, 2, 8, 7, 4, 6, 1])
            cmask = (np.arange(N)[None] < lens[:, None]).astype(np.int32)
            adv = jnp.asarray(rs.randn(6 * G).astype(np.float32))
        init = nnx.to_pure_dict(nnx.state(policy, wrt))
        score, train_step = make_grpo_fns(g, wrt, shared_prompts=shared)
        batch = b if shared else repeat_rows(b, G)
        bb = {k: jnp.asarray(batch[k]) for k in ("input_ids", "attention_mask", "pixel_values",
                                                 "ce_pixels", "num_ce")}
        r, o = score(policy, ref, bb, jnp.asarray(toks), jnp.asarray(cmask))
        loss, metrics, ok = train_step(policy, opt, bb, jnp.asarray(toks), jnp.asarray(cmask),
                                       adv, r, o)
        assert bool(ok)
        delta = jax.tree.map(lambda a, c: np.asarray(a) - np.asarray(c), init,
                             nnx.to_pure_dict(nnx.state(policy, wrt)))
        outs[shared] = (np.asarray(r), float(loss), {k: float(v) for k, v in metrics.items()},
                        delta)
    (r0, l0, m0, d0), (r1, l1, m1, d1) = outs[False], outs[True]
    real = cmask.astype(bool)
    np.testing.assert_allclose(r1[real], r0[real], atol=2e-5)
    assert abs(l0) > 1e-3 and m0["kl"] > 0
    assert_same_step((l0, m0, d0), (l1, m1, d1), loss=(1e-4, 1e-6), metrics=(1e-4, 1e-6),
                     update=(1e-4, 2e-6))


def test_shared_prompts_need_one_micro_batch():
    from emit_jax.training.config import GRPOConfig
    from emit_jax.training.grpo import make_grpo_fns
    from emit_jax.training.lora import trainable_filter

    with pytest.raises(ValueError, match="one micro-batch"):
        make_grpo_fns(GRPOConfig(), trainable_filter(), micro_batches=2, shared_prompts=True)
