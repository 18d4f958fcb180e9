"""EMIT's training prompt text (docs/reference/emit.md 9.3-9.5), exact strings: they are data.

The two-image template serves Anomaly Discrimination, Defect Classification and Defect
Localization; the single-image template Object Classification. ``INSTR_THINK`` is the stage-2 /
``--think`` instruction, ``INSTR_DIRECT`` the stage-1 / default one.
"""

from __future__ import annotations

import random
import re
from typing import Mapping, Sequence

# docs/reference/emit.md 4.1: sysprompt.txt, 62 bytes, no trailing newline; both stages and evaluation.
SYSTEM_PROMPT = "You are an industrial inspector who checks products by images."

TWO_IMAGE_TEMPLATE = (
    "Image-1: <image>\nImage-2: <image>\nI have uploaded two images for review, each featuring a "
    "product. The product shown in the first image appears to be in perfect condition, free of any "
    "defects. To answer a multiple-choice question, please inspect the product in the second image. "
    "There is only one correct option.\nThe following provides domain knowledge regarding the "
    "characteristics of a normal product, as well as the various possible types of defects: {dk}\n"
    "Select your answer by responding with the letter corresponding to the correct option, such as "
    "'A'. {instr}\n\nQuestion: {qblock}")

SINGLE_IMAGE_TEMPLATE = (
    "Query image: <image>\nTo answer a multiple-choice question, please inspect the product in the "
    "given image. There is only one correct option.\nSelect your answer by responding with the "
    "letter corresponding to the correct option, such as 'A'. {instr}\n\nQuestion: {qblock}")

# Text-as-query samples (docs/reference/emit.md 9.7): the paper describes them but the authors' code has no
# prompt for them, so this wording is ours [DEVIATION]: the reference image stays, the query image
# is replaced by its description; one image only, so CE + SP never switch on.
TEXT_QUERY_TEMPLATE = (
    "Image-1: <image>\nDescription of the second product: {description}\nI have uploaded one image "
    "and one description for review, each featuring a product. The product shown in the image "
    "appears to be in perfect condition, free of any defects. To answer a multiple-choice question, "
    "please inspect the product described in the text. There is only one correct option.\nThe "
    "following provides domain knowledge regarding the characteristics of a normal product, as well "
    "as the various possible types of defects: {dk}\nSelect your answer by responding with the "
    "letter corresponding to the correct option, such as 'A'. {instr}\n\nQuestion: {qblock}")

INSTR_THINK = (
    "Begin by documenting your analysis process within <think> </think> tags. Conclude with your "
    "final answer enclosed in <answer> </answer> tags. The final answer should be either 'A' or 'B' "
    "or 'C' or 'D'. The output format should be as follows: <think>...</think><answer>...</answer>. "
    "Please adhere strictly to the prescribed format.")
INSTR_DIRECT = "Do not include any text in your response."

Q_ANOMALY = "Is there any defect in the object?"
Q_DEFECT_TYPE = "There is a defect in the object. What is the type of the defect?"
Q_LOCATION = "There is a defect in the object. Where is the defect?"
Q_OBJECT = "What kind of product is in the image?"

# docs/reference/emit.md 7: two-image prompts holding one of these get CE + SP; at MMAD evaluation only for
# these sub-datasets (DS-MVTec read as MVTec).
TRIGGER_PHRASES = ("Where is the defect?", "Is there any defect in the object?")
EVAL_CE_DATASETS = ("MVTec", "VisA")

TASKS = ("anomaly_discrimination", "defect_classification", "defect_localization",
         "object_classification")
QUESTIONS = dict(zip(TASKS, (Q_ANOMALY, Q_DEFECT_TYPE, Q_LOCATION, Q_OBJECT)))
LETTERS = "ABCD"

REGIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom",
           "bottom right")
REGION_SYNONYMS: Mapping[str, tuple[str, ...]] = {
    "top left": ("Top left.", "Left top.", "Upper left.", "Left upper."),
    "top": ("Top.", "Top center.", "Summit."),
    "top right": ("Top right.", "Right top.", "Upper right.", "Right upper."),
    "left": ("Left.", "Leftward.", "Left-hand."),
    "center": ("Center.", "Middle."),
    "right": ("Right.", "Rightward.", "Right-hand."),
    "bottom left": ("Bottom left.", "Left bottom.", "Lower left.", "Left lower."),
    "bottom": ("Bottom.", "Bottom center.", "Below."),
    "bottom right": ("Bottom right.", "Right bottom.", "Lower right.", "Right lower."),
}
#: each synonym's region (``"Left-hand."`` -> ``"left"``)
REGION_OF = {syn: region for region, syns in REGION_SYNONYMS.items() for syn in syns}


def process_string(name: str) -> str:
    """EMIT's option normaliser: drop digits, ``_`` -> space, ``capitalize``, strip, add ``.``
    (``missing_parts`` -> ``Missing parts.``, ``PCB_1`` -> ``Pcb.``)."""
    s = re.sub(r"\d", "", name).replace("_", " ").capitalize().strip()
    return s + "."


def qblock(question: str, options: Sequence[str]) -> str:
    """``{question} \\n`` + ``A. opt`` lines joined by ``\\n`` + trailing ``\\n``."""
    lines = [f"{LETTERS[i]}. {o}" for i, o in enumerate(options)]
    return f"{question} \n" + "\n".join(lines) + "\n"


def first_sentences(text: str, n: int) -> str:
    """The first ``n`` sentences of ``text`` (``n <= 0``: all of it)."""
    if n <= 0:
        return text
    parts = re.split(r"(?<=[.!?])\s+", text.strip())
    return " ".join(parts[:n])


def domain_knowledge_text(entries: Mapping[str, str], rng: random.Random,
                          max_sentences: int = 0) -> str:
    """Format one class's domain knowledge (``{defect: text, 'good': text}``) as EMIT does:
    ``<Normal Characteristics>`` / ``<{Title} Defect>`` entries, newlines inside the text turned
    into spaces, shuffled per prompt, joined with ``\\n``. A defect key ``None``/``"None"`` is
    titled ``General``. ``max_sentences`` > 0 keeps only that many sentences of each entry (a
    length budget for small models; EMIT uses the full text)."""
    items = []
    for key, text in entries.items():
        body = first_sentences(" ".join(str(text).split("\n")), max_sentences)
        if key == "good":
            items.append(f"<Normal Characteristics>\n Description: {body}")
        else:
            title = "General" if key in (None, "None", "null") else \
                str(key).replace("_", " ").title()
            items.append(f"<{title} Defect>\n Description: {body}")
    rng.shuffle(items)
    return "\n".join(items)


def render(task: str, options: Sequence[str], *, think: bool, dk: str = "",
           description: str | None = None) -> str:
    """The user turn for one question (with ``<image>`` placeholders)."""
    instr = INSTR_THINK if think else INSTR_DIRECT
    block = qblock(QUESTIONS[task], options)
    if task == "object_classification":
        return SINGLE_IMAGE_TEMPLATE.format(instr=instr, qblock=block)
    if description is not None:
        return TEXT_QUERY_TEMPLATE.format(description=" ".join(description.split("\n")), dk=dk,
                                          instr=instr, qblock=block)
    return TWO_IMAGE_TEMPLATE.format(dk=dk, instr=instr, qblock=block)
