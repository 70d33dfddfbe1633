"""The grader audit: agreement with math-verify alone and with a string match, from real grades (worker process)."""

import json

from evaluator.audit import (
    TABLE_COLUMNS,
    audit_metrics,
    disagreements,
    problem_disagreements,
    table_rows,
    write_disagreements,
)
from evaluator.grader import r1_zero_reward
from shared.protocol import samples_file


def graded(problem: int, answer: str | None, gold: str) -> dict:
    response = f"r </think> <answer> {answer} </answer>" if answer is not None else "no format"
    return {"problem": problem, "sample": 0, "ground_truth": gold, "answer": answer, **r1_zero_reward(response, gold)}


def samples() -> list[dict]:
    return [
        graded(0, "1.414214", "\\sqrt{2}"),  # ours wrong; math-verify alone right; string wrong (agrees)
        graded(1, "0.5", "\\frac{1}{2}"),  # ours right; math-verify right; string wrong
        graded(2, "7", "7"),  # all right
        graded(3, None, "7"),  # no answer: no audit verdict
        graded(4, "0.5\\%", "0.5"),  # ours undecided
    ]


def test_audit_metrics_count_agreement_over_the_samples_each_grader_judged():
    m = audit_metrics(samples())
    mv_judged = [s for s in samples() if s["audit_math_verify"] is not None]
    assert len(mv_judged) == 4
    assert m["grader/disagreements_math_verify"] == 1 and m["grader/agreement_math_verify"] == 3 / 4
    assert m["grader/disagreements_string"] == 1 and m["grader/agreement_string"] == 3 / 4
    assert m["grader/undecided_rate"] == 1 / 5


def test_samples_without_audit_verdicts_are_not_measured():
    old = [{"problem": 0, "sample": 0, "reward": 1.0}]
    assert audit_metrics(old) == {
        "grader/agreement_math_verify": None,
        "grader/disagreements_math_verify": 0,
        "grader/agreement_string": None,
        "grader/disagreements_string": 0,
        "grader/undecided_rate": None,
    }


def test_disagreements_file_and_table_hold_both_verdicts(tmp_path):
    rows = disagreements(samples())
    assert [(r["problem"], r["disagrees_with"]) for r in rows] == [(0, ["math_verify"]), (1, ["string"])]
    assert rows[0]["reward"] == 0.0 and rows[0]["audit_math_verify"] == 1.0 and rows[0]["verdict"] == "wrong"
    path = write_disagreements(tmp_path, "math500", 500, samples())
    assert path == samples_file(tmp_path, "math500", 500).with_name("step_00000500.disagreements.jsonl")
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows
    table = table_rows(samples())
    assert len(table) == 2 and all(len(row) == len(TABLE_COLUMNS) for row in table)
    assert table[0][TABLE_COLUMNS.index("math_verify")] == 1.0 and table[0][TABLE_COLUMNS.index("verdict")] == "wrong"
    assert len(table_rows(samples(), max_rows=1)) == 1
    assert problem_disagreements(samples()) == {0: ["math_verify"], 1: ["string"]}
