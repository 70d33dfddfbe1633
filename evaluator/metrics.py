"""Metrics of one evaluation set at one checkpoint, computed from its graded samples.

A sample is a dict (one line of `eval/<name>/<set>/step_N.samples.jsonl`) with at least `problem` (the
problem's index in its data set), `sample` (0..n-1), `reward`, `format_reward`, `truncated`, `num_tokens`,
`vote` (the grader-normalised answer, None when there is none), `failure` (see `failure_kind`) and `grader`
(None, "timeout" or "error": the grader's own trouble with it, whatever its failure kind).

Definitions (the same for every set, backend and n):
- accuracy: mean reward over all n samples of all problems (mean@n).
- pass@k: the unbiased estimator 1 - C(n-c, k) / C(n, k) per problem with c correct of n, averaged.
- maj@k: majority vote over the first k samples' normalised answers (samples without an answer do not
  vote); an answer is right when a sample giving it was graded right; a tie between answers counts the
  fraction of the tied answers that are right (the expected accuracy of breaking the tie at random).
- A problem is solved at a checkpoint when at least half of its samples are right; learned = unsolved at
  the earlier checkpoint and solved at the later one, forgotten = the reverse.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterable

from shared.config import reported_ks
from shared.data import jsonl_records

FAILURE_KINDS = ("truncated", "format", "grader_timeout", "grader_error", "no_answer", "wrong")
"""Why a sample is wrong, first match in this order: cut at max_tokens; no or broken r1_zero format;
the grader ran out of time or failed; the answer block holds nothing to compare; a wrong answer."""

MAX_BREAKDOWN_VALUES = 50
"""A field breaks accuracy down automatically only with 2..50 distinct values (subject, level; not ids)."""


def failure_kind(
    reward: float, format_reward: float, truncated: bool, grader_problem: str | None, vote: str | None
) -> str | None:
    """None for a right sample, else one of FAILURE_KINDS."""
    if reward == 1.0:
        return None
    if truncated:
        return "truncated"
    if format_reward == 0.0:
        return "format"
    if grader_problem is not None:
        return f"grader_{grader_problem}"
    return "no_answer" if vote is None else "wrong"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c right) is right.
    Defined for k <= n only: with fewer samples than k, "at least one of k" cannot be estimated."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs 1 <= k <= n and 0 <= c <= n (n={n}, c={c})")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def majority_at_k(votes: list[str | None], rewards: list[float], k: int) -> float:
    counts = Counter(v for v in votes[:k] if v is not None)
    if not counts:
        return 0.0
    top = max(counts.values())
    winners = [v for v, c in counts.items() if c == top]
    right = {v for v, r in zip(votes[:k], rewards[:k]) if v is not None and r == 1.0}
    return sum(v in right for v in winners) / len(winners)


def read_samples(path: Path) -> list[dict[str, Any]]:
    """A samples file (JSON lines); DataError (a ValueError) naming the file and line when one is not JSON."""
    return [record for _, record in jsonl_records(path)]


def by_problem(samples: Iterable[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    """Samples grouped per problem index, each group in sample order."""
    groups: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for s in samples:
        groups[s["problem"]].append(s)
    return {p: sorted(g, key=lambda s: s["sample"]) for p, g in sorted(groups.items())}


def solved(group: list[dict[str, Any]]) -> bool:
    return 2 * sum(s["reward"] for s in group) >= len(group)


def breakdown_fields(fields_by_problem: dict[int, dict[str, Any]], chosen: list[str] | None) -> list[str]:
    """`chosen`, else every field with 2..MAX_BREAKDOWN_VALUES distinct values, fewer than the problems."""
    if chosen is not None:
        return chosen
    values: dict[str, set] = defaultdict(set)
    for fields in fields_by_problem.values():
        for name, value in fields.items():
            values[name].add(value)
    limit = min(MAX_BREAKDOWN_VALUES, len(fields_by_problem) - 1)
    return sorted(name for name, vs in values.items() if 2 <= len(vs) <= limit)


def set_metrics(
    samples: list[dict[str, Any]], n: int, fields_by_problem: dict[int, dict[str, Any]], breakdown: list[str]
) -> dict[str, Any]:
    groups = by_problem(samples)
    # Every problem has exactly samples 0..n-1: with fewer, pass@k and maj@k would be computed on what is there
    # (pass@4 of three wrong samples would read 1.0).
    for problem, group in groups.items():
        if [s["sample"] for s in group] != list(range(n)):
            raise ValueError(f"problem {problem}: samples {[s['sample'] for s in group]}, expected 0..{n - 1} (n={n})")
    num = len(samples)
    rewards = [s["reward"] for s in samples]
    formatted = [s["reward"] for s in samples if s["format_reward"] == 1.0]
    truncated = [s["reward"] for s in samples if s["truncated"]]
    completed = [s["reward"] for s in samples if not s["truncated"]]
    failures = Counter(s["failure"] for s in samples if s["failure"])
    metrics: dict[str, Any] = {
        "accuracy": sum(rewards) / num,
        "num_problems": len(groups),
        "n": n,
        "format_rate": len(formatted) / num,
        "answer_accuracy": sum(formatted) / len(formatted) if formatted else 0.0,
        "mean_response_tokens": sum(s["num_tokens"] for s in samples) / num,
        "truncation_rate": len(truncated) / num,
        "accuracy_truncated": sum(truncated) / len(truncated) if truncated else None,
        "accuracy_completed": sum(completed) / len(completed) if completed else None,
        "grader_timeouts": sum(s.get("grader") == "timeout" for s in samples),
        "grader_errors": sum(s.get("grader") == "error" for s in samples),
    }
    for k in reported_ks(n):
        metrics[f"pass@{k}"] = sum(
            pass_at_k(len(g), sum(s["reward"] == 1.0 for s in g), k) for g in groups.values()
        ) / len(groups)
        metrics[f"maj@{k}"] = sum(
            majority_at_k([s["vote"] for s in g], [s["reward"] for s in g], k) for g in groups.values()
        ) / len(groups)
    for kind in FAILURE_KINDS:
        metrics[f"failure_rate/{kind}"] = failures[kind] / num
    for name in breakdown:
        per_value: dict[Any, list[float]] = defaultdict(list)
        for problem, group in groups.items():
            value = fields_by_problem.get(problem, {}).get(name)
            if value is not None:
                per_value[value].extend(s["reward"] for s in group)
        for value, values in sorted(per_value.items(), key=lambda kv: str(kv[0])):
            metrics[f"accuracy_by/{name}/{value}"] = sum(values) / len(values)
    return metrics


def result_sets(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A result's sets; a result written before sets existed reads as its one set, `main`."""
    if "sets" in result:
        return result["sets"]
    sampling = {"n": 1, **result.get("sampling", {})}
    return {"main": {"metrics": result["metrics"], "sampling": sampling, "changes": {"vs_step": None}}}


def changes(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> dict[str, list[int]]:
    """Problems (present at both checkpoints) learned and forgotten between them."""
    old, new = by_problem(before), by_problem(after)
    common = sorted(set(old) & set(new))
    return {
        "learned": [p for p in common if not solved(old[p]) and solved(new[p])],
        "forgotten": [p for p in common if solved(old[p]) and not solved(new[p])],
    }
