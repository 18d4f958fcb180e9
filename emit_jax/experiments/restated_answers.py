"""Where a restated four-option answer goes wrong: naming the option, or copying its letter.

    python -m emit_jax.experiments.restated_answers RESULTS.json [--json]

``RESULTS.json`` is an ``emit_jax.evaluate --think --out`` file of a model trained on restated
answers (``data.rationale=restate``, :func:`emit_jax.training.data.restated`)::

    <think>A Cable A
    B Nut B
    C Washer C
    D Screw D
    The product is a Nut B</think><answer>B</answer>

For each of the three four-option tasks it counts the answers whose conclusion names the right
option (the words of the correct option's restated line), whose letter is the one the answer's
own restatement put after the named words (the induction copy), and that are correct, so a
low score splits into what the image side did not tell and what the letter copy lost.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from typing import Iterable, Mapping

from emit_jax import cli
from emit_jax.errors import DataError
from emit_jax.fileio import read_json

TASKS = ("Defect Classification", "Defect Localization", "Object Classification")
_CONCLUSION = re.compile(r"The (?:defect|product) is (?:a |at the )?(.*?) ([A-D])</think>")
_LINE = re.compile(r"^([A-D]) ")


def restated_lines(response: str) -> dict[str, str]:
    """The restated option lines of a think answer: letter -> its line (``A Cable A``)."""
    think = response.split("<think>", 1)[-1].split("</think>", 1)[0]
    return {m.group(1): line for line in think.split("\n") if (m := _LINE.match(line))}


def owners(name: str, lines: Mapping[str, str]) -> list[str]:
    """The letters whose restated line ends with ``name`` then a letter (``Cable A``, or the
    cell after the comma of a localization line, ``Left upper, top left A``)."""
    pat = re.compile(r"(^[a-d] |, )" + re.escape(name.strip().lower()) + r" [a-d]$")
    return [letter for letter, line in lines.items() if pat.search(line.lower())]


def count(rows: Iterable[Mapping]) -> dict[str, dict[str, int]]:
    """Per task: ``questions``, ``no_conclusion``, ``named_right``, ``letter_copied``,
    ``correct`` over evaluate's answer rows (``question_type``, ``response``,
    ``correct_answer``, ``gpt_answer``)."""
    out: dict[str, Counter] = {t: Counter() for t in TASKS}
    for r in rows:
        c = out.get(r["question_type"])
        if c is None:
            continue
        c["questions"] += 1
        c["correct"] += r.get("gpt_answer") == r["correct_answer"]
        m = _CONCLUSION.search(r["response"])
        if not m:
            c["no_conclusion"] += 1
            continue
        who = owners(m.group(1), restated_lines(r["response"]))
        c["named_right"] += r["correct_answer"] in who
        c["letter_copied"] += m.group(2) in who
    keys = ("questions", "named_right", "letter_copied", "correct", "no_conclusion")
    return {t: {k: int(c[k]) for k in keys} for t, c in out.items() if c["questions"]}


def check_rows(rows, path: str) -> None:
    """Raise ``DataError`` naming ``path`` and the first answer row that is not one of
    evaluate's (an object with string ``question_type``, ``response`` and ``correct_answer``)."""
    if not isinstance(rows, list):
        raise DataError(f"{path}: 'answers' is a {type(rows).__name__}, not a list of answers")
    for i, r in enumerate(rows):
        bad = not isinstance(r, dict) or any(
            not isinstance(r.get(k), str) for k in ("question_type", "response", "correct_answer"))
        if bad:
            raise DataError(f"{path}: answers[{i}] is not an evaluate answer (an object with "
                            "text question_type, response and correct_answer)")


def main(argv=None) -> int:
    p = cli.Parser(prog="python -m emit_jax.experiments.restated_answers", description=__doc__,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", help="an emit_jax.evaluate --out file")
    p.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    a = p.parse_args(argv)
    # every way the file fails to read or parse (nesting too deep included) is one line
    results = read_json(a.results, error=DataError, what="an emit_jax.evaluate results file")
    if not isinstance(results, dict) or "answers" not in results:
        raise DataError(f"{a.results}: not an emit_jax.evaluate results file (no 'answers')")
    rows = results["answers"]
    check_rows(rows, a.results)
    if results.get("think") is False:  # direct answers have no restatement to count
        print(f"note: {a.results} was asked without --think: its answers have no restated "
              "options, so every one counts as 'no conclusion'", file=sys.stderr)
    counts = count(rows)
    if not counts:  # before: a table header and no row, without a word
        print(f"note: {a.results} holds no four-option answer to count (DC, DL, OC)",
              file=sys.stderr)
    if a.json:
        print(json.dumps(counts))
        return 0
    print("| task | questions | named the right option | letter copied from its restatement "
          "| correct | no conclusion |\n|---|---:|---:|---:|---:|---:|")
    for t, c in counts.items():
        print(f"| {t} | {c['questions']} | {c['named_right']} | {c['letter_copied']} | "
              f"{c['correct']} | {c['no_conclusion']} |")
    return 0


if __name__ == "__main__":
    cli.command(main, prog="python -m emit_jax.experiments.restated_answers")
