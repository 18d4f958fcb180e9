"""Stage data of the embedded-default recipe: the text-only warm-up and the SFT-instead-of-GRPO
records (emit_jax.training.data)."""

from emit_jax.data import prompts
from emit_jax.data.tasks import Question
from emit_jax.training.data import rationale, warmup_records, with_rationales


def _q(task, options, answer, **meta):
    base = {"object_type": "metal_nut", "adlabel": 1, "anomaly_type": "color_stain",
            "defect_location": ["top left", "top"], "task_type": task}
    return Question(task, tuple(options), answer, ("ref.png", "q.png"), "user", {**base, **meta})


def test_warmup_letters_follow_the_shuffled_options():
    qs = [_q("defect_classification", ["Crack.", "Color stain.", "Hole.", "Scratch."], "B"),
          _q("anomaly_discrimination", ["Yes.", "No."], "B", adlabel=0, anomaly_type=None,
             defect_location=[])]
    recs = warmup_records(qs, seed=3, shuffles=4, think_every=2)
    assert len(recs) == 8 and all(r["images"] == [] for r in recs)
    orders = set()
    for r in recs:
        gold = "Color stain." if r["task_type"] == "defect_classification" else "No."
        assert r["options"][prompts.LETTERS.index(r["solution"])] == gold
        user, answer = r["messages"][0]["content"], r["messages"][1]["content"]
        assert "<image>" not in user
        # the statement closes the user turn (where the CE slots go) and says what the image shows
        last = user.rstrip().split("\n")[-1]
        assert last == ("The second product is a metal nut with a color stain at the top left."
                        if gold != "No." else "The second product is a metal nut in perfect condition.")
        assert answer == r["solution"] or answer.endswith(f"<answer>{r['solution']}</answer>")
        orders.add(tuple(r["options"]))
    assert len(orders) > 2  # the options really are reshuffled
    assert {r["messages"][1]["content"].startswith("<think>") for r in recs} == {True, False}
    assert warmup_records(qs, seed=3, shuffles=4, think_every=2) == recs
    assert all(not r['messages'][1]['content'].startswith('<') for r in warmup_records(qs))  # deterministic


def test_rationales_for_stage2_records():
    rec = {"messages": [{"role": "user", "content": "u"}], "solution": "C", "object_type": "cable",
           "adlabel": 1, "anomaly_type": "missing_piece", "defect_location": ["right"]}
    out = with_rationales([rec])[0]
    assert out["messages"][0] == rec["messages"][0] and "solution" in out
    assert out["messages"][1]["content"] == (
        "<think>The product is a cable. Compared with the reference there is a missing piece at "
        "the right.</think><answer>C</answer>")
    assert rationale(dict(rec, adlabel=0), "A").startswith(
        "<think>The product is a cable. Compared with the reference it looks normal")
    assert len(rec["messages"]) == 1  # the input record is not modified
