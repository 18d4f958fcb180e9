"""The seventh reliability probe's cases (issue 30): each failed before its fix (the SIGHUP,
image-depth, huge-image and killed-generator cases live beside their kind, in
tests/test_reliability.py, test_cli_errors.py, test_image.py and test_embedded_cli.py).

* an MMAD question or option holding ``<image>``, ``<IMG_CONTEXT>`` or another marker the prompt
  builder writes (a ``ValueError`` traceback at that question, after the model was loaded and
  the earlier questions asked), an empty option text (asked without a word).
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from emit_jax.errors import MMADError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MMAD = os.path.join(ROOT, "tests", "fixtures", "mmad")


def _mmad_with(tmp_path, edit) -> str:
    """A copy of the MMAD fixture whose first record's first question ``edit`` changed."""
    root = tmp_path / "mmad"
    shutil.copytree(MMAD, root)
    path = root / "mmad.json"
    data = json.loads(path.read_text())
    first = next(iter(data))
    edit(data[first]["conversation"][0])
    path.write_text(json.dumps(data))
    return str(root)


@pytest.mark.parametrize("where,text,needle", [
    ("Question", "Is there any defect in the object? <image> look again",
     "'Question' holds '<image>', a marker the prompt builder places itself"),
    ("Question", "Is there <IMG_CONTEXT><COMP_CONTEXT> any defect?", "holds '<IMG_CONTEXT>'"),
    ("A", "<image>", "option 'A' holds '<image>'"),
    ("B", "No.<|im_end|>", "option 'B' holds '<|im_end|>'"),
    ("A", "  ", "option 'A' is empty"),
])
def test_a_question_holding_a_prompt_marker_or_an_empty_option_is_refused(tmp_path, where,
                                                                         text, needle):
    from emit_jax.data.mmad import read_mmad

    def edit(q):
        if where == "Question":
            q["Question"] = text
        else:
            q["Options"][where] = text

    root = _mmad_with(tmp_path, edit)
    with pytest.raises(MMADError, match="question 0") as e:
        read_mmad(root)
    assert needle in str(e.value)
    records, report = read_mmad(root, policy="skip")  # skipped and counted under --policy skip
    assert report.n_skipped == 1 and needle in report.skipped[0]
