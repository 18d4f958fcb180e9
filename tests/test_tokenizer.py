"""The tiny byte-level BPE tokenizer, checkpoint tokenizer validation and EMIT's chat format."""

from __future__ import annotations

import os
import time

import pytest

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from emit_jax.data import tokenizer as T  # noqa: E402
from emit_jax.models.emit import COMP_TOKEN, add_comp_token_to_tokenizer  # noqa: E402

SPECIAL = [t for t, special in T.TINY_ADDED_TOKENS if special]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_tok")
    T.train_tiny_tokenizer(T.default_corpus(), path)
    return str(path)


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return T.load_tokenizer(tiny_dir, require_comp=True)


def ids_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def user_text(question="Is there any defect in the object?"):
    return ("Image-1: <image>\nImage-2: <image>\nInspect the second image. é ✓\n\nQuestion: "
            f"{question} \nA. Yes.\nB. No.\n")


# ------------------------------------------------------------------------------ tiny tokenizer
def test_files_written_and_reloaded(tiny_dir, tok):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "chat_template.jinja"):
        assert os.path.isfile(os.path.join(tiny_dir, name)), name
    assert len(tok) <= 4096
    assert tok.eos_token == T.IM_END and tok.pad_token == T.ENDOFTEXT and tok.bos_token is None


def test_id_layout(tok):
    ids = T.special_ids(tok)
    n = len(T.TINY_ADDED_TOKENS)
    v = len(tok) - n
    assert list(ids) == list(T.EMIT_TOKENS)
    assert [ids[t] for t, _ in T.TINY_ADDED_TOKENS] == list(range(v, v + n))
    assert ids[COMP_TOKEN] == len(tok) - 1  # last, as EMIT appends it
    assert ids[T.IMG_CONTEXT] == v + 5
    # the BPE part is plain byte-level BPE: every one of the 256 bytes is an entry
    assert v >= 256


def test_vocab_size_is_an_upper_bound(tmp_path):
    small = T.train_tiny_tokenizer(T.default_corpus(), tmp_path / "small", vocab_size=300)
    assert len(small) == 300
    assert T.special_ids(small)[COMP_TOKEN] == 299
    with pytest.raises(ValueError, match="vocab_size"):
        T.train_tiny_tokenizer(["abc"], tmp_path / "bad", vocab_size=200)


@pytest.mark.parametrize("text", [
    "Image-1: <image>\nImage-2: <image>\n\nQuestion: Is there any defect in the object? \n"
    "A. Yes.\n",
    "  leading and trailing spaces  \n\n\n\ttabs\r\nand CRLF ",
    "unicode: héllo wörld, 日本語のテキスト, emoji 🔩🧪, math ≤ ≥ ∑, zero\u200bwidth",
    "digits 0123456789 and 3.14159, 100% 'quotes' \"double\" `back` {braces} [x] (y)",
    "",
])
def test_round_trip_exact(tok, text):
    ids = ids_of(tok, text)
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_round_trip_of_a_chat_with_special_tokens(tok):
    text = T.chat_prompt(user_text(), assistant="<think>Scratch on top.</think><answer>A</answer>")
    ids = ids_of(tok, text)
    assert tok.decode(ids) == text


def test_each_added_token_is_one_id(tok):
    ids = T.special_ids(tok)
    for token in T.EMIT_TOKENS:
        assert ids_of(tok, token) == [ids[token]], token
        # also inside running text, with no spaces around it
        inner = ids_of(tok, f"abc{token}def")
        assert inner.count(ids[token]) == 1 and tok.decode(inner) == f"abc{token}def"
    assert set(tok.all_special_ids) == {ids[t] for t in SPECIAL}


def test_reasoning_tags_are_single_ids_kept_by_skip_special(tok):
    ids = T.special_ids(tok)
    for tag in T.REASONING_TOKENS:
        assert ids[tag] not in tok.all_special_ids
    response = "<think>The surface has a crack.</think><rethink>Yes.</rethink><answer>B</answer>"
    seq = ids_of(tok, T.IM_START + "assistant\n" + response + T.IM_END + T.IMG_CONTEXT)
    assert tok.decode(seq, skip_special_tokens=True) == "assistant\n" + response
    assert seq.count(ids["<think>"]) == 1 and seq.count(ids["</answer>"]) == 1


def test_training_is_deterministic(tmp_path):
    corpus = T.default_corpus() + ["Extra domain knowledge: a bent lead on the transistor."]
    T.train_tiny_tokenizer(corpus, tmp_path / "a")
    T.train_tiny_tokenizer(corpus, tmp_path / "b")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "chat_template.jinja"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    T.train_tiny_tokenizer(["a different corpus " * 3, "with other words"], tmp_path / "c")
    assert (tmp_path / "c" / "tokenizer.json").read_bytes() != \
        (tmp_path / "a" / "tokenizer.json").read_bytes()


def test_default_corpus():
    corpus = T.default_corpus()
    assert corpus == T.default_corpus() and all(isinstance(t, str) for t in corpus)
    joined = "\n".join(corpus)
    for s in (T.SYSTEM_PROMPT, "Do not include any text in your response.",
              "The output format should be as follows: <think>...</think><answer>...</answer>.",
              "I have uploaded two images for review, each featuring a product.",
              "There is a defect in the object. Where is the defect?",
              "\n\nSelect your answer", "Question:What kind of product", "Left-hand.",
              "Right lower.", "Summit.",
              "Color stain.", "Missing piece.", "Washer.", "Capsule.", "Yes.", "No.",
              "<Normal Characteristics>\n Description:", "<answer>"):
        assert s in joined, s


def test_comp_token_helper_agrees(tok):
    assert add_comp_token_to_tokenizer(tok) == T.special_ids(tok)[COMP_TOKEN]
    assert add_comp_token_to_tokenizer(tok, expected_id=len(tok) - 1) == len(tok) - 1


# ------------------------------------------------------------------------------ load_tokenizer
def save_tokenizer_without(path, drop: str) -> str:
    """A real byte-level BPE tokenizer folder holding every EMIT token but ``drop``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(
        ["an image of a product", "inspect the product"],
        trainers.BpeTrainer(vocab_size=300, show_progress=False,
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    keep = [t for t in T.EMIT_TOKENS if t != drop]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in keep])
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=T.IM_END).save_pretrained(path)
    return str(path)


def test_load_tokenizer_missing_img_context(tmp_path):
    folder = save_tokenizer_without(tmp_path / "no_ctx", T.IMG_CONTEXT)
    with pytest.raises(T.TokenizerError) as err:
        T.load_tokenizer(folder)
    msg = str(err.value)
    assert folder in msg and T.IMG_CONTEXT in msg and "\n" not in msg
    assert T.IM_END not in msg and T.IMG_START not in msg
    assert isinstance(err.value, ValueError)


def test_load_tokenizer_comp_optional_unless_required(tmp_path):
    folder = save_tokenizer_without(tmp_path / "no_comp", COMP_TOKEN)
    tok = T.load_tokenizer(folder)
    assert COMP_TOKEN not in T.special_ids(tok) and T.IMG_CONTEXT in T.special_ids(tok)
    with pytest.raises(T.TokenizerError, match=COMP_TOKEN):
        T.load_tokenizer(folder, require_comp=True)


def test_load_tokenizer_bad_folders(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(T.TokenizerError, match="no such tokenizer folder") as err:
        T.load_tokenizer(missing)
    assert missing in str(err.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(T.TokenizerError) as err:
        T.load_tokenizer(empty)
    assert str(err.value) == (f"{empty}: no tokenizer files (tokenizer.json / "
                              "tokenizer_config.json / tokenizer.model / vocab.json)")


# ------------------------------------------------------------------------------ chat format
def test_system_prompt_is_62_bytes():
    assert len(T.SYSTEM_PROMPT.encode("utf-8")) == 62
    assert T.SYSTEM_PROMPT == "You are an industrial inspector who checks products by images."


def test_chat_prompt_exact():
    assert T.chat_prompt("Q?") == (
        "<|im_start|>system\nYou are an industrial inspector who checks products by images."
        "<|im_end|>\n<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n")
    assert T.chat_prompt("Q?", system="S", assistant="B") == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ?<|im_end|>\n"
        "<|im_start|>assistant\nB<|im_end|>")
    assert T.chat_prompt("Q?", system=None) == \
        "<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n"


def test_saved_chat_template_matches_chat_prompt(tok):
    user = user_text()
    msgs = [{"role": "user", "content": user}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        T.chat_prompt(user)
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": user},
            {"role": "assistant", "content": "B"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == T.chat_prompt(user, "S", "B")


def test_expand_image_tags_train_vs_eval():
    text = "Image-1: <image>\nImage-2: <image>\nQ"
    ev = T.expand_image_tags(text, [1, 2], 2, mode="eval")
    tr = T.expand_image_tags(text, [1, 2], 2, mode="train")
    c = T.IMG_CONTEXT
    assert ev == f"Image-1: <img>{c * 2}</img>\nImage-2: <img>{c * 4}</img>\nQ"
    assert tr == f"Image-1: <img>{c * 2}</img>\n\nImage-2: <img>{c * 4}</img>\n\nQ"
    assert T.expand_image_tags("no images", [], 4) == "no images"
    with pytest.raises(ValueError, match="2 <image> tag"):
        T.expand_image_tags(text, [1], 2)
    with pytest.raises(ValueError, match="mode"):
        T.expand_image_tags(text, [1, 1], 2, mode="test")
    with pytest.raises(ValueError):
        T.expand_image_tags(text, [1, 0], 2)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_encode_prompt_equals_tokenising_the_expanded_string(tok, mode):
    prompt = T.chat_prompt(user_text())
    tiles = [1, 3]
    ids = T.encode_prompt(tok, prompt, tiles_per_image=tiles, tokens_per_tile=4, mode=mode)
    assert ids == ids_of(tok, T.expand_image_tags(prompt, tiles, 4, mode=mode))
    sid = T.special_ids(tok)
    assert ids.count(sid[T.IMG_CONTEXT]) == 16
    after = ids[ids.index(sid[T.IMG_END]) + 1]  # what follows the first </img>
    assert tok.decode([after]) == ("\n\n" if mode == "train" else "\n")


def test_encode_chat_labels_cover_response_and_im_end(tok):
    answer = "<think>A crack at the top.</think><answer>A</answer>"
    out = T.encode_chat(tok, user_text(), tiles_per_image=[2, 2], tokens_per_tile=3,
                        assistant=answer, mode="train")
    ids, labels, n = out["input_ids"], out["labels"], out["prompt_length"]
    assert len(ids) == len(labels)
    assert all(l == T.IGNORE_INDEX for l in labels[:n])
    assert labels[n:] == ids[n:]
    assert ids[n:] == ids_of(tok, answer) + [tok.convert_tokens_to_ids(T.IM_END)]
    assert tok.decode(ids[n:]) == answer + T.IM_END
    assert tok.decode(ids[:n]) == T.expand_image_tags(T.chat_prompt(user_text()), [2, 2], 3,
                                                      mode="train")
    assert tok.decode(ids) == T.expand_image_tags(T.chat_prompt(user_text(), assistant=answer),
                                                  [2, 2], 3, mode="train")
    bare = T.encode_chat(tok, user_text(), tiles_per_image=[2, 2], tokens_per_tile=3,
                         mode="train")
    assert bare["input_ids"] == ids[:n] and bare["prompt_length"] == n
    assert set(bare["labels"]) == {T.IGNORE_INDEX}


def test_comp_slots_before_user_im_end(tok):
    sid = T.special_ids(tok)
    comp, im_end = sid[COMP_TOKEN], sid[T.IM_END]
    kw = dict(tiles_per_image=[1, 1], tokens_per_tile=2, mode="eval")
    plain = T.encode_chat(tok, user_text(), **kw)["input_ids"]
    out = T.encode_chat(tok, user_text(), assistant="B", comp_slots=7, **kw)
    ids, labels, n = out["input_ids"], out["labels"], out["prompt_length"]
    i = len(plain) - 5  # the training code's rule: the last 5 prompt tokens close the user turn
    assert tok.decode(plain[i:]) == "<|im_end|>\n<|im_start|>assistant\n"
    assert ids[:i] == plain[:i] and ids[i:i + 7] == [comp] * 7 and ids[i + 7] == im_end
    assert ids[i + 7:n] == plain[i:] and n == len(plain) + 7
    assert tok.decode(ids[:i]).endswith("B. No.\n")  # ... "B. No.\n" · slots · <|im_end|>
    assert labels[:n] == [T.IGNORE_INDEX] * n
    assert labels[n:] == ids[n:] == ids_of(tok, "B") + [im_end]
    explicit = T.encode_chat(tok, user_text(), comp_slots=3, comp_token_id=99, **kw)["input_ids"]
    assert explicit[i:i + 3] == [99, 99, 99]


def test_encode_chat_is_fast_for_full_size_images(tok):
    sid = T.special_ids(tok)
    t0 = time.perf_counter()
    out = T.encode_chat(tok, user_text(), tiles_per_image=[7, 7], tokens_per_tile=256,
                        assistant="B", mode="train", comp_slots=265)
    elapsed = time.perf_counter() - t0
    ids = out["input_ids"]
    assert ids.count(sid[T.IMG_CONTEXT]) == 2 * 7 * 256
    assert ids.count(sid[COMP_TOKEN]) == 265
    assert elapsed < 1.0


def test_encode_chat_argument_errors(tok):
    with pytest.raises(ValueError, match="tag"):
        T.encode_chat(tok, user_text(), tiles_per_image=[1], tokens_per_tile=4)
    with pytest.raises(ValueError, match="comp_slots"):
        T.encode_chat(tok, user_text(), tiles_per_image=[1, 1], tokens_per_tile=4, comp_slots=-1)
