"""The stages' optimizer: ``llm_lr_scale`` moves the language model slower than the rest."""

import jax
import numpy as np
import pytest
from flax import nnx

from emit_jax.data.pipeline import IGNORE
from emit_jax.models.emit import EMIT
from emit_jax.training.config import OptimConfig
from emit_jax.training.optim import make_optimizer
from emit_jax.training.sft import make_train_step, to_device
from emit_jax.training.stages import stage1_trainable
from test_emit import prompt_with_slots, small_mllm


def _params(model) -> dict:
    return {jax.tree_util.keystr(k): np.array(v) for k, v in jax.tree_util.tree_leaves_with_path(
        nnx.to_pure_dict(nnx.state(model, nnx.Param)))}


def _deltas(scale: float) -> tuple[dict, dict]:
    """One stage-1 step with the LLM trained too (``sft.train_llm``) at ``llm_lr_scale=scale``:
    (parameters before, their change)."""
    model = EMIT.create(small_mllm(), hint_ids=[1])
    ids, mask = prompt_with_slots(model, [1, 1])
    labels = np.full_like(ids, IGNORE)
    labels[:, -2:] = ids[:, -2:]
    ce = np.random.RandomState(0).randn(2, 2, 3, 56, 56).astype(np.float32)
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask, "ce_pixels": ce,
             "num_ce": np.int32(2)}
    wrt = stage1_trainable(train_llm=True)
    opt = nnx.Optimizer(model, make_optimizer(OptimConfig(steps=10, lr=1e-2, warmup_ratio=0.0,
                                                          llm_lr_scale=scale)), wrt=wrt)
    before = _params(model)
    _, _, _, ok = make_train_step(wrt)(model, opt, to_device(batch))
    assert bool(ok)
    after = _params(model)
    return before, {k: after[k] - before[k] for k in before}


def test_llm_lr_scale_scales_the_language_models_updates_only():
    before, full = _deltas(1.0)
    b2, slow = _deltas(0.1)
    assert before.keys() == b2.keys() and all(np.array_equal(before[k], b2[k]) for k in before)
    llm = [k for k in full if "'language_model'" in k]
    rest = [k for k in full if "'language_model'" not in k and np.any(full[k])]
    assert llm and rest  # the LLM and the soft prompt / projector both trained
    assert any("projector" in k for k in rest) and any("soft_prompt" in k for k in rest)
    moved = [k for k in llm if np.any(full[k])]
    assert moved
    for k in moved:  # AdamW's update, then x 0.1 (its decoupled decay too)
        np.testing.assert_allclose(slow[k], 0.1 * full[k], rtol=1e-4, atol=1e-9)
    for k in rest:
        np.testing.assert_array_equal(slow[k], full[k])
    # the vision tower is not in stage 1's set: unchanged either way
    assert not any(np.any(full[k]) for k in full if "vision_tower" in k)


@pytest.mark.parametrize("bad", [1.5, -0.1])
def test_llm_lr_scale_out_of_range_names_the_key(bad):
    from emit_jax.errors import ConfigError

    with pytest.raises(ConfigError, match=r"sft\.llm_lr_scale"):
        OptimConfig(llm_lr_scale=bad, name="sft")
