"""The grader audit: every sample is graded by our rules (`reward`, `verdict`) and, independently, by math-verify
alone (`audit_math_verify`) and by a plain normalised string match (`audit_string`); see evaluator/grader.py.

Per set: `grader/agreement_<other>` is the share of the samples that grader had a verdict on (an answer it could
read) where its verdict equals ours, `grader/disagreements_<other>` their number, `grader/undecided_rate` the
share of all samples our rules left undecided (counted wrong). The disagreeing samples, with every verdict, go to
`<set>/step_N.disagreements.jsonl` beside the samples and to a W&B table. Samples graded before the audit existed
have no audit verdicts: their agreement is None (not measured), never 1.0.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from shared.protocol import atomic_write_bytes, samples_file

AUDITORS = {"math_verify": "audit_math_verify", "string": "audit_string"}
"""Audit grader name (as in the metric names) -> the sample key holding its verdict."""

TABLE_COLUMNS = ["problem", "sample", "reference answer", "answer", "verdict", "rule", "math_verify", "string"]
"""Columns of the W&B table of disagreements (`table_rows`)."""


def _ours(sample: dict[str, Any]) -> float:
    return 1.0 if sample["reward"] == 1.0 else 0.0


def disagrees_with(sample: dict[str, Any]) -> list[str]:
    """The audit graders whose verdict on this sample differs from ours (none without a verdict)."""
    return [name for name, key in AUDITORS.items() if sample.get(key) is not None and sample[key] != _ours(sample)]


def audit_metrics(samples: list[dict[str, Any]]) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    for name, key in AUDITORS.items():
        judged = [s for s in samples if s.get(key) is not None]
        agree = sum(s[key] == _ours(s) for s in judged)
        metrics[f"grader/agreement_{name}"] = agree / len(judged) if judged else None
        metrics[f"grader/disagreements_{name}"] = len(judged) - agree
    has_verdict = [s for s in samples if "verdict" in s]
    metrics["grader/undecided_rate"] = (
        sum(s["verdict"] == "undecided" for s in has_verdict) / len(samples) if has_verdict else None
    )
    return metrics


def disagreements(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The samples some audit grader judged otherwise, with every verdict (ours: reward, verdict, grader_rule)."""
    rows = []
    for s in samples:
        others = disagrees_with(s)
        if others:
            rows.append(
                {
                    "problem": s["problem"],
                    "sample": s["sample"],
                    "ground_truth": s.get("ground_truth"),
                    "answer": s.get("answer"),
                    "reward": s["reward"],
                    "verdict": s.get("verdict"),
                    "grader_rule": s.get("grader_rule"),
                    **{key: s.get(key) for key in AUDITORS.values()},
                    "disagrees_with": others,
                }
            )
    return rows


def problem_disagreements(samples: list[dict[str, Any]]) -> dict[int, list[str]]:
    """Problem index -> the audit graders that disagree with ours on at least one of its samples."""
    found: dict[int, list[str]] = {}
    for s in samples:
        for name in disagrees_with(s):
            if name not in found.setdefault(s["problem"], []):
                found[s["problem"]].append(name)
    return found


def disagreements_file(eval_dir: Path, set_name: str, step: int, grader_version: str | None = None) -> Path:
    """`<set>/step_N.disagreements.jsonl` beside the samples; a regrade's (`grader_version`):
    `<set>/step_N.grader-<version>.disagreements.jsonl`."""
    samples = samples_file(eval_dir, set_name, step)
    stem = samples.name.removesuffix(".samples.jsonl")
    middle = f".grader-{grader_version}" if grader_version else ""
    return samples.with_name(f"{stem}{middle}.disagreements.jsonl")


def write_disagreements(
    eval_dir: Path, set_name: str, step: int, samples: list[dict[str, Any]], grader_version: str | None = None
) -> Path:
    """Writes the set's disagreeing samples (JSON lines, possibly none) atomically; returns the file."""
    path = disagreements_file(eval_dir, set_name, step, grader_version)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, "".join(json.dumps(row) + "\n" for row in disagreements(samples)).encode())
    return path


def table_rows(samples: list[dict[str, Any]], max_rows: int | None = None) -> list[list[Any]]:
    """Rows of the W&B disagreement table (TABLE_COLUMNS), at most `max_rows`."""
    rows = [
        [
            d["problem"],
            d["sample"],
            d["ground_truth"],
            d["answer"],
            d["verdict"] or ("right" if d["reward"] == 1.0 else "wrong"),
            d["grader_rule"],
            d["audit_math_verify"],
            d["audit_string"],
        ]
        for d in disagreements(samples)
    ]
    return rows[:max_rows] if max_rows is not None else rows
