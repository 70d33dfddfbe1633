"""Grader throughput and audit: 5,000 realistic MATH-style responses (right, wrong and badly formatted), graded
with 1 worker and with every core, with the audit on and off (the audit's cost), and our verdicts' agreement with
math-verify alone and with a plain string match.   python -m bench.bench_grader [--num 5000]"""

from __future__ import annotations

import argparse
import os
import random
import time

from bench.common import report
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


def make_cases(num: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    responses, truths = [], []
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
    return responses, truths


def _timed(workers: int, audit: bool, responses: list[str], truths: list[str]) -> tuple[float, list, list]:
    pool = GraderPool(workers, timeout_s=5.0, audit=audit)
    try:
        pool.grade(responses[:50], truths[:50])  # warm the workers' imports and caches
        t0 = time.perf_counter()
        grades, problems = pool.grade(responses, truths)
        return time.perf_counter() - t0, grades, problems
    finally:
        pool.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num", type=int, default=5000)
    args = parser.parse_args()
    responses, truths = make_cases(args.num)
    figures = {}
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
            **{k: round(v, 4) if isinstance(v, float) else v for k, v in audit.items()},
        }
    report("grader", num=args.num, grader_version=grader_version(), **figures, command="python -m bench.bench_grader")


if __name__ == "__main__":
    main()
