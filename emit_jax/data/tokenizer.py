"""Tokenizers and EMIT's chat format (docs/reference/emit.md 2.3, 4, 9.3).

Two sources of tokenizers:

* **Real checkpoints.** :func:`load_tokenizer` opens the tokenizer of a local Hugging Face folder
  (InternVL3's is Qwen2.5's plus ``<img>``, ``</img>``, ``<IMG_CONTEXT>``, ``<quad>``/``<ref>``/
  ``<box>`` pairs; EMIT checkpoints also hold ``<COMP_CONTEXT>``) and checks that the tokens EMIT
  relies on are there. Nothing is ever fetched from the hub and no remote code runs.
* **The tiny default.** :func:`train_tiny_tokenizer` trains a small byte-level BPE with the
  ``tokenizers`` library, Qwen2-style: Qwen2's pre-tokenisation regex (digits split one by one,
  runs of newlines kept together, so ``"\\n\\n"`` can be one token as in Qwen) followed by the
  GPT-2 byte-to-unicode map, all 256 bytes in the alphabet, no normaliser and a ByteLevel
  decoder, so every string round-trips exactly. :func:`default_corpus` is what it is trained on
  when nothing else is given.

Id layout of the tiny tokenizer (deterministic; the same corpus gives the same ``tokenizer.json``
byte for byte). ``V`` is the size of the trained BPE vocabulary (``len(tokenizer) - 19``; at most
``vocab_size - 19``, smaller when the corpus runs out of merges). The added tokens follow in the
fixed order of :data:`TINY_ADDED_TOKENS`, mirroring Qwen2.5 -> InternVL3 -> EMIT:

====== ================= ======= =============================================
id     token             special role
====== ================= ======= =============================================
V+0    ``<|endoftext|>``  yes     pad
V+1    ``<|im_start|>``   yes     turn start
V+2    ``<|im_end|>``     yes     eos, turn end
V+3    ``<img>``          yes     image start
V+4    ``</img>``         yes     image end
V+5    ``<IMG_CONTEXT>``  yes     visual-token slot (model ``image_token_id``)
V+6    ``<quad>``         yes     InternVL grounding tags ...
V+7    ``</quad>``        yes
V+8    ``<ref>``          yes
V+9    ``</ref>``         yes
V+10   ``<box>``          yes
V+11   ``</box>``         yes     ... InternVL grounding tags
V+12   ``<think>``        no      reasoning tags: one token each, kept by
V+13   ``</think>``       no      ``decode(..., skip_special_tokens=True)``
V+14   ``<answer>``       no
V+15   ``</answer>``      no
V+16   ``<rethink>``      no
V+17   ``</rethink>``     no
V+18   ``<COMP_CONTEXT>`` yes     CE / soft-prompt slot (EMIT's ``comp_token_id``)
====== ================= ======= =============================================

``<COMP_CONTEXT>`` is last, as in EMIT (appended to InternVL3's 151,674 entries): a model built
with ``vocab_size = len(tokenizer) - 1`` gets exactly this id from
:func:`emit_jax.models.emit.add_comp_token`; or build it with ``len(tokenizer)`` rows and pass
``special_ids(tok)[COMP_TOKEN]`` as ``EMITConfig.comp_token_id``. Use :func:`special_ids` rather
than hard-coding ``V``.

Why the reasoning tags are *added, non-special* tokens: the tiny model should emit
``<think>``/``<answer>`` as one decision each (rewards and answer parsing read them), they must
never be split by BPE, and -- unlike ``<|im_end|>`` or ``<IMG_CONTEXT>`` -- they are part of the
response text, so ``skip_special_tokens=True`` decoding has to keep them (Qwen3 makes the same
choice). The real InternVL3 tokenizer has no such tokens and spells them with several BPE pieces;
nothing here depends on either.

Chat format (docs/reference/emit.md 4): :func:`chat_prompt` builds the ChatML text, :func:`expand_image_tags`
the ``<img><IMG_CONTEXT>*n</img>`` blocks (with the training-only extra ``"\\n"``), and
:func:`encode_chat` the ids and labels a trainer or sampler needs, with ``<COMP_CONTEXT>`` slots
when CE is on.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Iterable, Sequence

from emit_jax.errors import TokenizerError, show_path
from emit_jax.data import prompts
from emit_jax.data.comp import COMP_TOKEN, HINT_TEXT, insert_comp_slots

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------ constants
SYSTEM_PROMPT = prompts.SYSTEM_PROMPT  # 62 bytes

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<IMG_CONTEXT>"
IMAGE_TAG = "<image>"  # placeholder in user text, one per image (docs/reference/emit.md 4.3)
IGNORE_INDEX = -100

#: What EMIT cannot run without; :func:`load_tokenizer` checks these.
REQUIRED_TOKENS: tuple[str, ...] = (IM_START, IM_END, IMG_START, IMG_END, IMG_CONTEXT)

GROUNDING_TOKENS = ("<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")
REASONING_TOKENS = ("<think>", "</think>", "<answer>", "</answer>", "<rethink>", "</rethink>")

#: ``(token, special)`` in id order after the BPE vocabulary (see the module docstring).
TINY_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    *((t, True) for t in (ENDOFTEXT, IM_START, IM_END, IMG_START, IMG_END, IMG_CONTEXT)),
    *((t, True) for t in GROUNDING_TOKENS),
    *((t, False) for t in REASONING_TOKENS),
    (COMP_TOKEN, True),
)
#: Every token name :func:`special_ids` looks up.
EMIT_TOKENS: tuple[str, ...] = tuple(t for t, _ in TINY_ADDED_TOKENS)

# Qwen2's pre-tokenisation regex (its tokenizer.json "Split" pattern).
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+")

# ChatML as in docs/reference/emit.md 4.2; EMIT's system prompt when no system message is given. ``<image>``
# tags stay literal: expanding them needs the tile counts (:func:`expand_image_tags`).
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set rest = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system = '" + SYSTEM_PROMPT + "' -%}{%- set rest = messages -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>system\\n' + system + '<|im_end|>' -}}"
    "{%- for message in rest -%}"
    "{{- '\\n<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '\\n<|im_start|>assistant\\n' -}}{%- endif -%}")


# ------------------------------------------------------------------------------ real checkpoints
def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def token_id(tokenizer, token: str) -> int | None:
    """The id of ``token`` if the tokenizer holds it as one unsplittable entry, else ``None``."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or (tid == tokenizer.unk_token_id and token != tokenizer.unk_token):
        return None
    if list(tokenizer.encode(token, add_special_tokens=False)) != [tid]:
        return None
    return int(tid)


def special_ids(tokenizer) -> dict[str, int]:
    """``{token: id}`` for every token of :data:`EMIT_TOKENS` the tokenizer holds as a single id
    (absent ones are left out: the real InternVL3 tokenizer has no ``<think>``, a raw InternVL3
    one no ``<COMP_CONTEXT>``)."""
    out = {}
    for tok in EMIT_TOKENS:
        tid = token_id(tokenizer, tok)
        if tid is not None:
            out[tok] = tid
    return out


def missing_tokens(tokenizer, required: Sequence[str] = REQUIRED_TOKENS) -> list[str]:
    """The tokens of ``required`` that the tokenizer lacks (or would split)."""
    return [t for t in required if token_id(tokenizer, t) is None]


#: the files a tokenizer folder is read from (AutoTokenizer: a fast tokenizer, its config, or a
#: slow tokenizer's vocabulary); a folder with none of them has no tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def has_tokenizer_files(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds any of :data:`TOKENIZER_FILES`."""
    return any(os.path.isfile(os.path.join(folder, n)) for n in TOKENIZER_FILES)


def check_tokenizer_folder(path: str | os.PathLike) -> None:
    """The cheap check of a tokenizer folder, reading nothing: it exists and holds tokenizer
    files (:class:`TokenizerError` naming it otherwise)."""
    from emit_jax.fileio import not_a_file

    path = os.fspath(path)
    if os.path.lexists(path) and not os.path.isdir(path):  # (a file, /dev/null, a pipe)
        raise TokenizerError(f"{show_path(path)}: {not_a_file(path) or 'a file'}, not a "
                             "tokenizer folder")
    if not os.path.isdir(path):
        raise TokenizerError(f"{show_path(path)}: no such tokenizer folder")
    for name in TOKENIZER_FILES:  # there, but a folder or a pipe: transformers' text before
        if kind := not_a_file(os.path.join(path, name)):
            raise TokenizerError(f"{show_path(os.path.join(path, name))}: {kind}, not a "
                                 "tokenizer file")
    if not has_tokenizer_files(path):
        raise TokenizerError(f"{show_path(path)}: no tokenizer files "
                             f"({' / '.join(TOKENIZER_FILES)})")


def _quiet_transformers() -> None:
    """Before transformers is imported: without torch (the default install) its import says
    "PyTorch was not found. Models won't be available ..." (an advisory line about its
    PyTorch models, which emit_jax does not use; only its tokenizers). A user's own setting of
    ``TRANSFORMERS_NO_ADVISORY_WARNINGS`` is kept."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def load_tokenizer(path: str | os.PathLike, *, require_comp: bool = False):
    """Load the tokenizer of a local Hugging Face folder and check EMIT's tokens.

    Only local files are read (``local_files_only=True``); remote code is never trusted. The
    folder must hold ``<|im_start|>``, ``<|im_end|>``, ``<img>``, ``</img>`` and
    ``<IMG_CONTEXT>`` as single ids (and ``<COMP_CONTEXT>`` with ``require_comp=True``); whether
    ``<COMP_CONTEXT>`` is present is logged. A missing folder, one without tokenizer files
    (:func:`check_tokenizer_folder`), an unreadable tokenizer or a missing token raises
    :class:`TokenizerError` naming the folder (and the tokens).
    """
    _quiet_transformers()
    from transformers import AutoTokenizer

    path = os.fspath(path)
    check_tokenizer_folder(path)
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 -- transformers raises many types here
        raise TokenizerError(f"{path}: cannot load a tokenizer ({type(e).__name__}: "
                             f"{_one_line(e)[:200]})") from e
    required = REQUIRED_TOKENS + ((COMP_TOKEN,) if require_comp else ())
    missing = missing_tokens(tok, required)
    if missing:
        raise TokenizerError(f"{path}: tokenizer lacks EMIT special token(s) {', '.join(missing)}")
    comp = token_id(tok, COMP_TOKEN)
    log.info("%s: tokenizer with %d entries, %s", path, len(tok),
             f"{COMP_TOKEN} id {comp}" if comp is not None else f"no {COMP_TOKEN} yet")
    return tok


# ------------------------------------------------------------------------------ tiny tokenizer
def _split_added(texts: Iterable[str]) -> list[str]:
    """Corpus texts cut at the added tokens and ``<image>``: the BPE never sees them, exactly as
    at encoding time, where the added vocabulary is matched before BPE runs."""
    pattern = re.compile("|".join(re.escape(t) for t in EMIT_TOKENS + (IMAGE_TAG,)))
    out = []
    for text in texts:
        out.extend(p for p in pattern.split(text) if p)
    return out


def _bpe_backend(corpus: Sequence[str], bpe_size: int):
    """Train the byte-level BPE (a ``tokenizers.Tokenizer``) on ``corpus``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False,
                                              use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=bpe_size, min_frequency=2, show_progress=False,
                                  special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    return tok


def _add_tokens(tok) -> None:
    """Append :data:`TINY_ADDED_TOKENS` one by one, so their ids follow the given order."""
    from tokenizers import AddedToken

    for text, special in TINY_ADDED_TOKENS:
        added = AddedToken(text, special=special, normalized=False, lstrip=False, rstrip=False,
                           single_word=False)
        if special:
            tok.add_special_tokens([added])
        else:
            tok.add_tokens([added])


def train_tiny_tokenizer(corpus: Iterable[str] | None, out_dir: str | os.PathLike,
                         vocab_size: int = 4096):
    """Train the tiny byte-level BPE on ``corpus`` (``None``: :func:`default_corpus`) and save it
    as a Hugging Face tokenizer folder in ``out_dir``.

    ``vocab_size`` bounds ``len(tokenizer)``, the 19 added tokens included (id layout in the
    module docstring). Writes ``tokenizer.json``, ``tokenizer_config.json`` (eos
    ``<|im_end|>``, pad ``<|endoftext|>``, no bos, no space clean-up), ``special_tokens_map.json``
    and ``chat_template.jinja``. Returns the loaded ``PreTrainedTokenizerFast``.
    """
    _quiet_transformers()
    from transformers import PreTrainedTokenizerFast

    n_added = len(TINY_ADDED_TOKENS)
    if vocab_size < 256 + n_added:
        raise ValueError(f"vocab_size {vocab_size} < {256 + n_added} (256 bytes + {n_added} "
                         "added tokens)")
    texts = _split_added(default_corpus() if corpus is None else corpus)
    if not texts:
        raise ValueError("empty tokenizer corpus")
    backend = _bpe_backend(texts, vocab_size - n_added)
    _add_tokens(backend)
    specials = [t for t, s in TINY_ADDED_TOKENS if s and t not in (ENDOFTEXT, IM_END)]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=IM_END, pad_token=ENDOFTEXT,
        extra_special_tokens=specials, clean_up_tokenization_spaces=False,
        model_max_length=32768, chat_template=CHAT_TEMPLATE)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    tok.save_pretrained(out_dir)
    _write_special_tokens_map(out_dir, specials)
    return tok


def _write_special_tokens_map(out_dir: str, specials: Sequence[str]) -> None:
    """transformers 5 no longer writes this file; older readers and tools look for it."""
    data = {"eos_token": IM_END, "pad_token": ENDOFTEXT,
            "additional_special_tokens": list(specials)}
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")


# ------------------------------------------------------------------------------ default corpus
# docs/reference/emit.md 9.3 / 12.2, exact text (instructions, questions and regions from emit_jax.data.prompts;
# the templates here carry the evaluation-protocol variants as well).
_TWO_IMAGE = (
    "Image-1: <image>\nImage-2: <image>\nI have uploaded two images for review, each featuring "
    "a product. The product shown in the first image appears to be in perfect condition, free of "
    "any defects. To answer a multiple-choice question, please inspect the product in the second "
    "image. There is only one correct option.\n{dk_line}\nSelect your answer by responding with "
    "the letter corresponding to the correct option, such as 'A'. {instr}\n\nQuestion: {qblock}")
_DK_PREFIX = ("The following provides domain knowledge regarding the characteristics of a normal "
              "product, as well as the various possible types of defects:")
_SINGLE_IMAGE = (
    "Query image: <image>\nTo answer a multiple-choice question, please inspect the product in "
    "the given image. There is only one correct option.\n{dk_line}Select your answer by "
    "responding with the letter corresponding to the correct option, such as 'A'. {instr}\n\n"
    "Question:{space}{qblock}")
_INSTR_THINK = prompts.INSTR_THINK
_INSTR_DIRECT = prompts.INSTR_DIRECT
_QUESTIONS = (prompts.Q_ANOMALY, prompts.Q_DEFECT_TYPE, prompts.Q_LOCATION, prompts.Q_OBJECT)
_REGION_SYNONYMS = tuple(prompts.REGION_SYNONYMS[r] for r in prompts.REGIONS)
_DEFECTS = (
    "Scratch.", "Crack.", "Hole.", "Contamination.", "Color stain.", "Missing piece.", "Pit.",
    "Deformation.", "Abrasion.", "Damage.", "Missing parts.", "Foreign objects.", "Broken large.",
    "Broken small.", "Bent wire.", "Cable swap.", "Cut inner insulation.", "Cut lead.",
    "Faulty imprint.", "Poke.", "Squeeze.", "Color.", "Metal contamination.", "Thread.", "Glue.",
    "Oil.", "Rough.", "Print.", "Bent.", "Flip.", "Fabric border.", "Broken teeth.",
    "Split teeth.", "Squeezed teeth.", "Liquid.", "Misplaced.", "Bent lead.", "Rust.",
    "Manipulated front.", "Scratch head.", "Scratch neck.", "Thread side.", "Thread top.",
    "Burnt.", "Chip.", "Stuck.", "Wax melted.", "Spot.", "Dirt.")
_OBJECTS = (
    "Pill.", "Screw.", "Nut.", "Capsule.", "Tile.", "Cable.", "Washer.", "Bottle.", "Carpet.",
    "Grid.", "Hazelnut.", "Leather.", "Metal nut.", "Toothbrush.", "Transistor.", "Wood.",
    "Zipper.", "Candle.", "Capsules.", "Cashew.", "Chewinggum.", "Fryum.", "Macaroni.", "Pcb.",
    "Pipe fryum.", "Bracket black.", "Bracket brown.", "Bracket white.", "Connector.",
    "Metal plate.", "Tubes.", "Audiojack.", "Bottle cap.", "Button battery.", "End cap.",
    "Eraser.", "Fire hood.", "Mint.", "Mounts.", "Phone battery.", "Plastic nut.",
    "Plastic plug.", "Porcelain doll.", "Regulator.", "Switch.", "Tape.", "Terminalblock.",
    "Toy.", "Toy brick.", "Usb.", "Usb adaptor.", "Wooden beads.", "Woodstick.",
    "Breakfast box.", "Juice bottle.", "Pushpins.", "Screw bag.", "Splicing connectors.",
    "Drink bottle.", "Food box.")
_ENGLISH = (
    "The inspector compares the product with a reference image before deciding.",
    "A normal product has a uniform surface, sharp edges and consistent color.",
    "Small scratches on the surface are easy to miss under bright light.",
    "The crack starts near the edge and runs toward the center of the part.",
    "Check every region of the image: top, bottom, left, right and the center.",
    "A missing piece changes the outline of the object.",
    "Contamination appears as dark spots or foreign material on the surface.",
    "The screw thread should be regular, without dents or broken turns.",
    "The pill is white with red speckles and a printed imprint in the middle.",
    "The cable shows three wires, each with its own colored insulation.",
    "The capsule is printed with black letters; a faulty imprint is blurred or incomplete.",
    "The tile has a textured pattern, so a crack may look like part of the texture.",
    "The washer is a flat metal ring with a round hole in the middle.",
    "The nut has six flat sides and a threaded hole.",
    "If the second image matches the first one, the product is free of defects.",
    "Defects are rare, so most of the products on the line are in good condition.",
    "Look at the shape, the color, the texture and the position of every part.",
    "The defect is located in the upper right part of the object.",
    "The image shows a product on a plain background, photographed from above.",
    "Comparing the query with the template reveals a small hole near the bottom.",
    "The color stain is brownish and has an irregular boundary.",
    "The object in the image is a metal bracket with two mounting holes.",
    "A deformation bends the part so that it no longer lies flat.",
    "Both images show the same type of product under similar lighting.",
    "I cannot see any scratch, crack, hole or stain on this product.",
    "The answer is B because the surface in the second image has a visible scratch.",
    "Quality control on a production line needs fast and reliable inspection.",
    "An anomaly map highlights the regions that differ from the normal reference.",
    "There are 2 images, 4 options and 1 correct answer; 0 is not an option.",
    "Measurements: 12.5 mm wide, 30 mm long, 3 holes, 100% inspected.",
)
_THINK_RESPONSES = (
    "<think>The first image shows a normal {obj_l} and the second image shows the same {obj_l}. "
    "I compare them region by region and find no difference, so there is no defect.</think>"
    "<answer>{letter}</answer>",
    "<think>Compared with the reference, the {obj_l} in the second image has a {def_l} in the "
    "{region_l} region. The defect type is {def_l}.</think><answer>{letter}</answer>",
    "<think>The product in the image is a {obj_l}. Its shape and color match the option.</think>"
    "<answer>{letter}</answer>",
    "<think>At first glance the surface looks normal.</think><rethink>Looking again at the "
    "{region_l} region, there is a small {def_l}.</rethink><answer>{letter}</answer>",
)


def _lower(option: str) -> str:
    return option.rstrip(".").lower()


def _rotate(items: Sequence[str], start: int, k: int) -> list[str]:
    return [items[(start + j) % len(items)] for j in range(k)]


def _dk_entries(i: int) -> str:
    obj, d1, d2 = _lower(_OBJECTS[i % len(_OBJECTS)]), _DEFECTS[i % len(_DEFECTS)], \
        _DEFECTS[(i + 7) % len(_DEFECTS)]
    return "\n".join([
        f"<Normal Characteristics>\n Description: A standard {obj} is intact, clean and evenly "
        "colored, with a regular shape and smooth edges.",
        f"<{_lower(d1).title()} Defect>\n Description: A {_lower(d1)} appears as an irregular mark "
        f"that breaks the normal appearance of the {obj}.",
        f"<{_lower(d2).title()} Defect>\n Description: The {_lower(d2)} changes the surface or the "
        "outline in a small area."])


def _questions(i: int) -> list[tuple[str, list[str]]]:
    regions = [syn[i % len(syn)] for syn in _REGION_SYNONYMS]
    yes_no = ["Yes.", "No."] if i % 2 == 0 else ["No.", "Yes."]
    return [(_QUESTIONS[0], yes_no), (_QUESTIONS[1], _rotate(_DEFECTS, 4 * i, 4)),
            (_QUESTIONS[2], _rotate(regions, i, 4)), (_QUESTIONS[3], _rotate(_OBJECTS, 4 * i, 4))]


def _prompts(i: int) -> list[str]:
    """Training (9.3) and evaluation (12.2) user turns for the ``i``-th set of options."""
    out = []
    instr = _INSTR_THINK if i % 2 else _INSTR_DIRECT
    for question, options in _questions(i):
        block = prompts.qblock(question, options)
        if question == _QUESTIONS[3]:
            out.append(_SINGLE_IMAGE.format(dk_line="", instr=instr, space=" ", qblock=block))
            out.append(_SINGLE_IMAGE.format(dk_line="\n", instr=instr, space="", qblock=block))
        else:
            dk = _dk_entries(i)
            out.append(_TWO_IMAGE.format(dk_line=f"{_DK_PREFIX} {dk}", instr=instr, qblock=block))
            out.append(_TWO_IMAGE.format(dk_line=f"{_DK_PREFIX} {dk}", instr=instr, qblock=block)
                       .replace("\nImage-2", "\n\nImage-2"))
    return out


def _responses(i: int) -> list[str]:
    letter = "ABCD"[i % 4]
    fill = dict(obj_l=_lower(_OBJECTS[i % len(_OBJECTS)]),
                def_l=_lower(_DEFECTS[i % len(_DEFECTS)]),
                region_l=_lower(_REGION_SYNONYMS[i % 9][0]), letter=letter)
    return [letter, f"{letter}. {_OBJECTS[i % len(_OBJECTS)]}"] + \
        [t.format(**fill) for t in _THINK_RESPONSES]


def default_corpus() -> list[str]:
    """The tiny tokenizer's built-in training text (deterministic, no file reads).

    EMIT's exact prompt text (system prompt, the two- and one-image templates of docs/reference/emit.md 9.3
    in their training and evaluation variants, both instructions, the four questions), every
    option text (Yes./No., the 3x3 region synonyms of 9.5, defect and object names), domain
    knowledge entries in the ``<... Defect>\\n Description:`` form, think/answer/rethink
    responses (also as whole ChatML conversations), the soft-prompt hint sentence and generic
    English about product inspection.
    Callers may append their own texts (e.g. real domain knowledge) before training.
    """
    texts = [SYSTEM_PROMPT, HINT_TEXT, _INSTR_THINK, _INSTR_DIRECT, _DK_PREFIX, *_QUESTIONS,
             "Yes.", "No.", *(s for syn in _REGION_SYNONYMS for s in syn), *_DEFECTS, *_OBJECTS,
             *_ENGLISH]
    for i in range(max(len(_OBJECTS), len(_DEFECTS))):
        responses = _responses(i)
        for j, user in enumerate(_prompts(i)):  # whole conversations, as the model sees them
            texts.append(chat_prompt(user, SYSTEM_PROMPT, responses[j % len(responses)]))
        texts.extend(responses)
    return texts


# ------------------------------------------------------------------------------ chat format
def chat_prompt(user: str, system: str | None = SYSTEM_PROMPT, assistant: str | None = None) -> str:
    """ChatML text (docs/reference/emit.md 4.2):
    ``<|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{user}<|im_end|>\\n
    <|im_start|>assistant\\n`` plus ``{assistant}<|im_end|>`` when ``assistant`` is given.
    ``system=None`` leaves the system turn out."""
    head = f"{IM_START}system\n{system}{IM_END}\n" if system is not None else ""
    text = f"{head}{IM_START}user\n{user}{IM_END}\n{IM_START}assistant\n"
    return text if assistant is None else f"{text}{assistant}{IM_END}"


def _check_images(text: str, tiles_per_image: Sequence[int], tokens_per_tile: int,
                  mode: str) -> list[str]:
    """``text`` split at its ``<image>`` tags, after checking the arguments agree with it."""
    if mode not in ("train", "eval"):
        raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
    pieces = text.split(IMAGE_TAG)
    if len(pieces) - 1 != len(tiles_per_image):
        raise ValueError(f"text has {len(pieces) - 1} {IMAGE_TAG} tag(s) but tiles_per_image "
                         f"lists {len(tiles_per_image)} image(s)")
    if tokens_per_tile < 1 or any(int(n) < 1 for n in tiles_per_image):
        raise ValueError(f"need tokens_per_tile >= 1 and >= 1 tile per image; got "
                         f"{tokens_per_tile}, {list(tiles_per_image)}")
    return pieces


def expand_image_tags(text: str, tiles_per_image: Sequence[int], tokens_per_tile: int,
                      mode: str = "eval") -> str:
    """Replace the ``i``-th ``<image>`` by ``<img>`` + ``<IMG_CONTEXT>`` * (``tokens_per_tile``
    * ``tiles_per_image[i]``) + ``</img>`` (docs/reference/emit.md 4.3). ``mode='train'`` appends ``"\\n"``
    after each ``</img>`` as ms-swift does ([QUIRK]: evaluation has no such newline). The tag
    count must equal ``len(tiles_per_image)``."""
    pieces = _check_images(text, tiles_per_image, tokens_per_tile, mode)
    nl = "\n" if mode == "train" else ""
    out = [pieces[0]]
    for n, piece in zip(tiles_per_image, pieces[1:]):
        out.append(f"{IMG_START}{IMG_CONTEXT * (tokens_per_tile * int(n))}{IMG_END}{nl}{piece}")
    return "".join(out)


def _require_id(tokenizer, token: str) -> int:
    tid = token_id(tokenizer, token)
    if tid is None:
        raise TokenizerError(f"tokenizer lacks EMIT special token {token}")
    return tid


def _text_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def encode_prompt(tokenizer, text: str, *, tiles_per_image: Sequence[int], tokens_per_tile: int,
                  mode: str = "eval") -> list[int]:
    """Ids of ``text`` (a full prompt holding ``<image>`` tags) with the image blocks inserted as
    ids: equal to tokenising :func:`expand_image_tags`' string, without building it. ``<img>``
    and ``</img>`` are special tokens, so the text between them tokenises on its own; the
    training newline is prepended to the text after ``</img>`` (so ``"\\n" + "\\nImage-2"``
    tokenises as one ``"\\n\\n"`` run, as it does in the expanded string)."""
    pieces = _check_images(text, tiles_per_image, tokens_per_tile, mode)
    start, end, ctx = (_require_id(tokenizer, t) for t in (IMG_START, IMG_END, IMG_CONTEXT))
    nl = "\n" if mode == "train" else ""
    ids = _text_ids(tokenizer, pieces[0])
    for n, piece in zip(tiles_per_image, pieces[1:]):
        ids += [start] + [ctx] * (tokens_per_tile * int(n)) + [end]
        ids += _text_ids(tokenizer, nl + piece)
    return ids


def encode_chat(tokenizer, user: str, *, tiles_per_image: Sequence[int], tokens_per_tile: int,
                assistant: str | None = None, mode: str = "eval", comp_slots: int = 0,
                comp_token_id: int | None = None,
                system: str | None = SYSTEM_PROMPT) -> dict:
    """Token ids and labels of one conversation (docs/reference/emit.md 4.2-4.4).

    Returns ``{"input_ids": list[int], "labels": list[int], "prompt_length": int}``:

    * the prompt is :func:`chat_prompt` ``(user, system)`` (ending ``<|im_start|>assistant\\n``)
      with the ``<image>`` tags expanded as ids (:func:`encode_prompt`; ``mode`` picks the
      train/eval newline);
    * ``comp_slots > 0``: that many ``<COMP_CONTEXT>`` ids (``comp_token_id``, default the
      tokenizer's own) go right before the user turn's closing ``<|im_end|>``
      (:func:`emit_jax.data.comp.insert_comp_slots`);
    * ``assistant`` given: its tokens and a closing ``<|im_end|>`` follow. The response is
      tokenised on its own (as ms-swift encodes the response separately), so labels cover
      exactly the response tokens and that ``<|im_end|>``; everything else is -100. Without
      ``assistant`` all labels are -100 and ``prompt_length == len(input_ids)``.
    """
    im_end = _require_id(tokenizer, IM_END)
    ids = encode_prompt(tokenizer, chat_prompt(user, system), tiles_per_image=tiles_per_image,
                        tokens_per_tile=tokens_per_tile, mode=mode)
    if comp_slots < 0:
        raise ValueError(f"comp_slots must be >= 0, got {comp_slots}")
    if comp_slots:
        if comp_token_id is None:
            comp_token_id = _require_id(tokenizer, COMP_TOKEN)
        ids = insert_comp_slots(ids, comp_slots, comp_token_id, im_end)
    prompt_length = len(ids)
    labels = [IGNORE_INDEX] * prompt_length
    if assistant is not None:
        response = _text_ids(tokenizer, assistant) + [im_end]
        ids = ids + response
        labels = labels + response
    return {"input_ids": ids, "labels": labels, "prompt_length": prompt_length}
