"""The ``<COMP_CONTEXT>`` sequence rules (docs/reference/emit.md 7): which samples get contrastive tokens,
where their slots go in the prompt's token ids, the token itself and the hint text the soft
prompt starts from. Data-side rules: the tokenizer and the pipeline apply them, the model
(:mod:`emit_jax.models.emit`) fills the slots.
"""

from __future__ import annotations

from typing import Sequence

from emit_jax.data.prompts import EVAL_CE_DATASETS, TRIGGER_PHRASES

HINT_TEXT = "Below are some hints for your reference:"
COMP_TOKEN = "<COMP_CONTEXT>"


def use_comp(num_images: int, text: str, *, mode: str = "train", image_path: str | None = None) -> bool:
    """docs/reference/emit.md 7. Train: exactly two images and a trigger phrase in the user turn. Eval
    (MMAD): also the sub-dataset (first path component, ``DS-MVTec`` read as ``MVTec``) must be
    MVTec or VisA."""
    if num_images != 2 or not any(p in text for p in TRIGGER_PHRASES):
        return False
    if mode == "train":
        return True
    if mode != "eval":
        raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
    if image_path is None:
        raise ValueError("use_comp(mode='eval') needs the query's image_path")
    first = image_path.replace("\\", "/").lstrip("./").split("/")[0]
    return ("MVTec" if first == "DS-MVTec" else first) in EVAL_CE_DATASETS


def comp_insert_index(prompt_ids: Sequence[int], im_end_id: int) -> int:
    """Where the comp slots go: before the last ``<|im_end|>`` of the prompt (the user turn's
    closing tag when the prompt ends with ``<|im_end|>\\n<|im_start|>assistant\\n``; there it
    equals the training code's ``len - 5``)."""
    ids = list(prompt_ids)
    for i in range(len(ids) - 1, -1, -1):
        if ids[i] == im_end_id:
            return i
    raise ValueError(f"no <|im_end|> (id {im_end_id}) in the prompt")


def insert_comp_slots(prompt_ids: Sequence[int], n_slots: int, comp_token_id: int,
                      im_end_id: int) -> list[int]:
    """``prompt_ids`` with ``n_slots`` ``<COMP_CONTEXT>`` ids before the user turn's close."""
    i = comp_insert_index(prompt_ids, im_end_id)
    ids = list(prompt_ids)
    return ids[:i] + [comp_token_id] * n_slots + ids[i:]


def add_comp_token_to_tokenizer(tokenizer, expected_id: int | None = None) -> int:
    """Register ``<COMP_CONTEXT>`` as a special token of a transformers tokenizer and return its
    id; with ``expected_id`` (the model's ``comp_token_id``) a mismatch is an error, since the
    model's added row must be the token's row."""
    tokenizer.add_special_tokens({"additional_special_tokens": [COMP_TOKEN]},
                                 replace_extra_special_tokens=False)
    tid = tokenizer.convert_tokens_to_ids(COMP_TOKEN)
    if expected_id is not None and tid != expected_id:
        raise ValueError(f"tokenizer gives {COMP_TOKEN} id {tid}, the model expects {expected_id} "
                         f"(tokenizer has {len(tokenizer)} entries; the model's vocabulary must be "
                         "the tokenizer's before the token is added)")
    return tid


def hint_token_ids(tokenizer, text: str = HINT_TEXT) -> list[int]:
    """The hint text's token ids (no special tokens)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
