"""Regrading stored samples with the current grader: real files, the real command, real grading processes."""

import json
import subprocess
import sys
from pathlib import Path

from evaluator.grader import grader_version
from evaluator.regrade import graded_samples_file, select_grader
from shared.protocol import result_file, samples_file

REPO = Path(__file__).resolve().parent.parent


def resp(answer: str) -> str:
    return f"reasoning </think> <answer> {answer} </answer>"


# (answer, reference, reward of the grader that wrote them): the first two were false positives of that grader.
OLD = [("1.414214", "\\sqrt{2}", 1.0), ("2", "2m", 1.0), ("\\frac{1}{2}", "0.5", 1.0), ("7", "8", 0.0)]


def write_eval(eval_dir: Path, step: int, version: str | None) -> None:
    """One step of one set, n=1, as the evaluator writes it (samples, the set's result, the step's result)."""
    samples = [
        {
            "problem": i,
            "sample": 0,
            "prompt": "p",
            "response": resp(answer),
            "ground_truth": gold,
            "answer": answer,
            "vote": answer,
            "num_tokens": 10,
            "truncated": False,
            "format_reward": 1.0,
            "answer_reward": reward,
            "reward": reward,
            "failure": None if reward else "wrong",
            "grader": None,
        }
        for i, (answer, gold, reward) in enumerate(OLD)
    ]
    (eval_dir / "main").mkdir(parents=True, exist_ok=True)
    samples_file(eval_dir, "main", step).write_text("".join(json.dumps(s) + "\n" for s in samples))
    accuracy = sum(s["reward"] for s in samples) / len(samples)
    set_result = {"step": step, "set": "main", "sampling": {"n": 1}, "metrics": {"accuracy": accuracy}}
    if version:
        set_result["grader_version"] = version
    result_file(eval_dir, step, "main").write_text(json.dumps(set_result))
    whole = {"step": step, "sets": {"main": set_result}, **({"grader_version": version} if version else {})}
    result_file(eval_dir, step).write_text(json.dumps(whole))


def regrade(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "evaluator.regrade", *map(str, args), "--workers", "1"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        check=False,
    )


def test_regrade_writes_new_metrics_beside_the_old_and_prints_the_flips(tmp_path):
    eval_dir = tmp_path / "eval"
    write_eval(eval_dir, 100, None)
    write_eval(eval_dir, 200, None)
    average_dir = eval_dir / "average_last_2"  # an averaged checkpoint's results (evaluator/averaging.py's layout)
    write_eval(average_dir, 200, None)
    averaged = json.loads(result_file(average_dir, 200).read_text())
    result_file(average_dir, 200).write_text(json.dumps({**averaged, "average": {"last": 2, "steps": [100, 200]}}))
    proc = regrade(eval_dir)
    assert proc.returncode == 0, proc.stderr
    version = grader_version()
    assert "regraded 3 set results" in proc.stdout and f"averaged checkpoints, {average_dir}:" in proc.stdout
    entry = json.loads(result_file(average_dir, 200).read_text())["sets"]["main"]["regraded"][version]
    assert entry["metrics"]["accuracy"] == 0.25 and (average_dir / "main" / entry["samples"]).is_file()
    assert "accuracy 0.7500 -> 0.2500" in proc.stdout and f"unversioned -> {version}" in proc.stdout
    assert "problem 0 sample 0: right -> wrong" in proc.stdout and "problem 1 sample 0: right -> wrong" in proc.stdout
    for step in (100, 200):
        whole = json.loads(result_file(eval_dir, step).read_text())
        entry = whole["sets"]["main"]["regraded"][version]
        assert whole["sets"]["main"]["metrics"] == {"accuracy": 0.75}  # the old metrics stay
        assert entry["metrics"]["accuracy"] == 0.25 and [f["problem"] for f in entry["flipped"]] == [0, 1]
        assert json.loads(result_file(eval_dir, step, "main").read_text())["regraded"][version] == entry
        regraded = [json.loads(line) for line in (eval_dir / "main" / entry["samples"]).read_text().splitlines()]
        assert [s["reward"] for s in regraded] == [0.0, 0.0, 1.0, 0.0]
        assert all(s["verdict"] in ("right", "wrong", "undecided") for s in regraded)
        # math-verify alone takes the rounded sqrt(2): a disagreement, in its file with both verdicts
        rows = (eval_dir / "main" / f"step_{step:08d}.grader-{version}.disagreements.jsonl").read_text().splitlines()
        first = json.loads(rows[0])
        assert first["problem"] == 0 and first["reward"] == 0.0 and first["audit_math_verify"] == 1.0
        assert samples_file(eval_dir, "main", step).read_text().count('"reward": 1.0') == 3  # the originals stay


def test_regrade_errors_name_the_path(tmp_path):
    eval_dir = tmp_path / "eval"
    write_eval(eval_dir, 100, None)
    samples_file(eval_dir, "main", 100).unlink()
    proc = regrade(eval_dir)
    assert proc.returncode == 2 and str(samples_file(eval_dir, "main", 100)) in proc.stderr
    proc = regrade(eval_dir, "--set", "nope")
    assert proc.returncode == 2 and "--set nope" in proc.stderr
    result_file(eval_dir, 100).write_text("{not json")
    proc = regrade(eval_dir)
    assert proc.returncode == 2 and str(result_file(eval_dir, 100)) in proc.stderr


def test_a_report_shows_one_grader_version_never_a_mix(tmp_path):
    eval_dir = tmp_path / "eval"
    results = [
        {"step": 100, "sets": {"main": {"metrics": {"accuracy": 0.5}, "grader_version": "aaa"}}},
        {
            "step": 200,
            "sets": {
                "main": {
                    "metrics": {"accuracy": 0.6},
                    "grader_version": "aaa",
                    "regraded": {
                        "bbb": {"metrics": {"accuracy": 0.4}, "samples": "step_00000200.grader-bbb.samples.jsonl"}
                    },
                }
            },
        },
        {"step": 300, "sets": {"main": {"metrics": {"accuracy": 0.7}, "grader_version": "bbb"}}},
    ]
    as_bbb = json.loads(json.dumps(results))
    left_out = select_grader(as_bbb, "bbb")
    assert [r["sets"].get("main", {}).get("metrics") for r in as_bbb] == [None, {"accuracy": 0.4}, {"accuracy": 0.7}]
    assert len(left_out) == 1 and left_out[0].startswith("step 100 [main]: graded by aaa, not by bbb")
    assert graded_samples_file(eval_dir, "main", 200, as_bbb[1]["sets"]["main"]).name.endswith(
        "grader-bbb.samples.jsonl"
    )
    assert graded_samples_file(eval_dir, "main", 300, as_bbb[2]["sets"]["main"]) == samples_file(eval_dir, "main", 300)
    as_aaa = json.loads(json.dumps(results))
    assert len(select_grader(as_aaa, "aaa")) == 1
    assert [r["sets"].get("main", {}).get("metrics") for r in as_aaa] == [{"accuracy": 0.5}, {"accuracy": 0.6}, None]
