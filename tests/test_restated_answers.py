"""The restated-answer counts (emit_jax.experiments.restated_answers) on answers built by the
training data's own restate template, right and wrong in each way."""

import json
import subprocess
import sys

from emit_jax.experiments.restated_answers import count, owners, restated_lines
from emit_jax.training.data import restated

OPTS = ["Cable.", "Nut.", "Washer.", "Screw."]
LOC = ["Left upper.", "Right.", "Center.", "Below."]


def row(task, options, truth, think, letter):
    return {"question_type": task, "correct_answer": truth, "gpt_answer": letter,
            "response": f"<think>{think}</think><answer>{letter}</answer>"}


def test_counts_split_naming_from_the_letter_copy():
    oc = "Object Classification"
    right = restated("object_classification", OPTS, "B")  # ... The product is a Nut B
    misnamed = restated("object_classification", OPTS, "C")  # names Washer, copies C
    miscopied = right[:-1] + "D"  # names Nut, then the letter of Screw
    rows = [row(oc, OPTS, "B", right, "B"), row(oc, OPTS, "B", misnamed, "C"),
            row(oc, OPTS, "B", miscopied, "D"), row(oc, OPTS, "B", "A", "A"),
            row("Anomaly Detection", ["Yes.", "No."], "A", "x", "A")]
    assert count(rows) == {oc: {"questions": 4, "named_right": 2, "letter_copied": 2,
                                "correct": 1, "no_conclusion": 1}}


def test_localization_lines_are_matched_by_their_cell():
    text = restated("defect_localization", LOC, "A")  # A Left upper, top left A ... top left A
    assert restated_lines(text)["A"] == "A Left upper, top left A"
    assert owners("top left", restated_lines(text)) == ["A"]
    assert owners("left", restated_lines(text)) == []  # "right" and "top left" are other cells
    c = count([row("Defect Localization", LOC, "A", text, "A")])["Defect Localization"]
    assert (c["named_right"], c["letter_copied"], c["correct"]) == (1, 1, 1)


def test_cli_table_and_bad_file(tmp_path):
    res = tmp_path / "r.json"
    res.write_text(json.dumps({"answers": [row("Object Classification", OPTS, "B",
                                               restated("object_classification", OPTS, "B"),
                                               "B")]}))
    cmd = [sys.executable, "-m", "emit_jax.experiments.restated_answers"]
    r = subprocess.run(cmd + [str(res), "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["Object Classification"]["letter_copied"] == 1
    (tmp_path / "direct.json").write_text(json.dumps({"think": False, "answers": []}))
    r = subprocess.run(cmd + [str(tmp_path / "direct.json")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "was asked without --think" in r.stderr, r.stderr
    for text, needle in (("[]", "not an emit_jax.evaluate results file (no 'answers')"),
                         ("{}", "not an emit_jax.evaluate results file (no 'answers')"),
                         ('{"answers": 5}', "'answers' is a int, not a list of answers"),
                         ('{"answers": [{}]}', "answers[0] is not an evaluate answer"),
                         ('{"answers": [{"question_type": "x", "response": null, '
                          '"correct_answer": "A"}]}', "answers[0] is not an evaluate answer")):
        (tmp_path / "bad.json").write_text(text)  # before: the last three were tracebacks
        r = subprocess.run(cmd + [str(tmp_path / "bad.json")], capture_output=True, text=True,
                           timeout=120)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and needle in lines[0], r.stderr
