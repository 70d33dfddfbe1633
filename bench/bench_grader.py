"""Grader throughput and audit: 5,000 realistic MATH-style responses (right, wrong and badly formatted), graded
with 1 worker and with every core, with the audit on and off (the audit's cost), our verdicts' agreement with
math-verify alone and with a plain string match, and their accuracy against the cases' construction labels (a
right answer written differently is right; a wrong one and a badly formatted one are wrong).

    python -m bench.bench_grader [--num 5000] [--before REV]

--before REV also grades the same cases with the grader of git revision REV (its evaluator/ and shared/ from
`git archive`, in a temporary folder, with every core): its throughput, its label accuracy and how many verdicts
differ from the current grader's."""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from bench.common import REPO, report
from evaluator.audit import audit_metrics
from evaluator.grader import GraderPool, grader_version

# (ground truth, a right answer written differently, a wrong answer), MATH-style.
ANSWERS = [
    ("\\frac{1}{2}", "0.5", "\\frac{1}{3}"),
    ("12", "12.0", "21"),
    ("2\\sqrt{3}", "\\sqrt{12}", "3\\sqrt{2}"),
    ("\\frac{\\pi}{4}", "\\pi/4", "\\frac{\\pi}{2}"),
    ("(1,-2)", "\\left(1, -2\\right)", "(-2,1)"),
    ("[0,3)", "[0, 3)", "(0,3]"),
    ("x^2+2x+1", "(x+1)^2", "x^2+1"),
    ("5", "x=5", "x=6"),
    ("\\{1,2,3\\}", "\\{3,2,1\\}", "\\{1,2\\}"),
    ("1000", "1,000", "100"),
    ("\\$18.50", "18.5", "18.05"),
    ("30^\\circ", "30", "60"),
    ("\\text{(B)}", "B", "C"),
    ("-\\frac{3}{4}", "-0.75", "\\frac{3}{4}"),
    (
        "\\begin{pmatrix}1\\\\2\\end{pmatrix}",
        "\\begin{pmatrix}1\\\\ 2\\end{pmatrix}",
        "\\begin{pmatrix}2\\\\1\\end{pmatrix}",
    ),
    ("3+2i", "2i+3", "3-2i"),
    ("\\frac{5}{2}", "2.5", "2.25"),
    ("7\\%", "7", "0.7"),
    ("1.5\\times10^{3}", "1500", "150"),
    ("\\infty", "\\infty", "0"),
]


def make_cases(num: int, seed: int = 0) -> tuple[list[str], list[str], list[float]]:
    """(responses, ground truths, labels): the reward a right grader gives (1.0 only for a formatted right answer)."""
    rng = random.Random(seed)
    responses, truths, labels = [], [], []
    reasoning = "We compute step by step. " * 20
    for i in range(num):
        gold, right, wrong = ANSWERS[i % len(ANSWERS)]
        kind = rng.random()
        if kind < 0.45:
            text = f"{reasoning}</think> <answer> \\boxed{{{right}}} </answer>"
        elif kind < 0.85:
            text = f"{reasoning}</think> <answer> {wrong} </answer>"
        elif kind < 0.95:
            text = f"{reasoning} so the answer is {right}"  # badly formatted
        else:
            text = reasoning * 20  # truncated, long
        responses.append(text)
        truths.append(gold)
        labels.append(1.0 if kind < 0.45 else 0.0)
    return responses, truths, labels


def _timed(workers: int, audit: bool, responses: list[str], truths: list[str]) -> tuple[float, list, list]:
    pool = GraderPool(workers, timeout_s=5.0, audit=audit)
    try:
        pool.grade(responses[:50], truths[:50])  # warm the workers' imports and caches
        t0 = time.perf_counter()
        grades, problems = pool.grade(responses, truths)
        return time.perf_counter() - t0, grades, problems
    finally:
        pool.close()


# Run inside the other revision's tree (cwd and PYTHONPATH): its GraderPool(num_workers, timeout_s) and grade().
_REVISION_GRADER = """
import json, sys, time
from evaluator.grader import GraderPool
cases = json.loads(open(sys.argv[1]).read())
pool = GraderPool(int(sys.argv[2]), 5.0)
try:
    pool.grade(cases["responses"][:50], cases["truths"][:50])
    t0 = time.perf_counter()
    grades, problems = pool.grade(cases["responses"], cases["truths"])
    seconds = time.perf_counter() - t0
finally:
    pool.close()
print(json.dumps({"seconds": seconds, "rewards": [g["reward"] for g in grades], "problems": problems}))
"""


def grade_with_revision(revision: str, workers: int, responses: list[str], truths: list[str]) -> dict:
    """{seconds, rewards, problems} of the grader of git revision `revision` on the cases (read-only: git archive)."""
    archive = subprocess.run(
        ["git", "archive", revision, "evaluator", "shared"], cwd=REPO, capture_output=True, check=True
    ).stdout
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tmp, filter="data")
        cases = Path(tmp) / "cases.json"
        cases.write_text(json.dumps({"responses": responses, "truths": truths}))
        proc = subprocess.run(
            [sys.executable, "-c", _REVISION_GRADER, str(cases), str(workers)],
            cwd=tmp,
            env={**os.environ, "PYTHONPATH": tmp},
            capture_output=True,
            text=True,
            check=True,
        )
    return json.loads(proc.stdout.splitlines()[-1])


def label_accuracy(rewards: list[float], labels: list[float]) -> float:
    return round(sum(r == y for r, y in zip(rewards, labels, strict=True)) / len(labels), 4)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num", type=int, default=5000)
    parser.add_argument("--before", default=None, metavar="REV", help="also grade with the grader of git revision REV")
    args = parser.parse_args()
    responses, truths, labels = make_cases(args.num)
    figures = {}
    rewards = []
    for workers in sorted({1, os.cpu_count() or 1}):
        plain_s, _, _ = _timed(workers, False, responses, truths)
        seconds, grades, problems = _timed(workers, True, responses, truths)
        samples = [{"problem": i, "sample": 0, **g} for i, g in enumerate(grades)]
        audit = audit_metrics(samples)
        figures[f"workers_{workers}"] = {
            "seconds_audit_off": round(plain_s, 2),
            "seconds_audit_on": round(seconds, 2),
            "audit_cost": f"+{100 * (seconds / plain_s - 1):.0f} %",
            "cases_per_s": round(args.num / seconds),
            "grader_timeouts": problems.count("timeout"),
            "grader_errors": problems.count("error"),
            "accuracy": round(sum(g["reward"] for g in grades) / args.num, 3),
            "label_accuracy": label_accuracy([g["reward"] for g in grades], labels),
            **{k: round(v, 4) if isinstance(v, float) else v for k, v in audit.items()},
        }
        rewards = [g["reward"] for g in grades]
    if args.before:
        workers = os.cpu_count() or 1
        before = grade_with_revision(args.before, workers, responses, truths)
        figures[f"before_{args.before}"] = {
            "workers": workers,
            "seconds": round(before["seconds"], 2),
            "cases_per_s": round(args.num / before["seconds"]),
            "grader_timeouts": before["problems"].count("timeout"),
            "accuracy": round(sum(before["rewards"]) / args.num, 3),
            "label_accuracy": label_accuracy(before["rewards"], labels),
            "verdicts_differing_from_current": sum(a != b for a, b in zip(before["rewards"], rewards, strict=True)),
        }
    command = "python -m bench.bench_grader" + (f" --before {args.before}" if args.before else "")
    report("grader", num=args.num, grader_version=grader_version(), **figures, command=command)


if __name__ == "__main__":
    main()
