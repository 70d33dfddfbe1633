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
- <metric>_ci_low / <metric>_ci_high (accuracy, pass@k, maj@k): the 95 % bootstrap interval (evaluator/stats.py).
- accuracy_at_budget/<b>: accuracy had generation stopped at b tokens: a sample is right at b when it is right
  and used at most b tokens (a longer one would have been cut: truncated, wrong). From the same samples.
- With a split (select_fraction): select/<metric> on the selection part (what best/keep_best rank by) and
  heldout/<metric> (with its interval) on the rest; a problem is on one side only, the same at every step.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from evaluator import stats
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
    right = {v for v, r in zip(votes[:k], rewards[:k], strict=True) if v is not None and r == 1.0}
    return sum(v in right for v in winners) / len(winners)


def read_samples(path: Path) -> list[dict[str, Any]]:
    """A samples file (JSON lines); DataError (a ValueError) naming the file and line when one is not JSON."""
    return [record for _, record in jsonl_records(path)]


def read_step_result(path: Path) -> dict[str, Any]:
    """A step's result file (step_N.json, every set's metrics under "sets"); ValueError naming the file when it
    is not JSON, or not a step result."""
    try:
        result = json.loads(Path(path).read_text())
    except ValueError as exc:
        raise ValueError(f"{path}: not a readable result ({exc})") from None
    if not isinstance(result, dict) or type(result.get("step")) is not int:
        raise ValueError(f"{path}: not a step result (no integer 'step')")
    if not isinstance(result.get("sets"), dict):
        raise ValueError(f"{path}: not a step result (no 'sets' mapping)")
    return result


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
    samples: list[dict[str, Any]],
    n: int,
    fields_by_problem: dict[int, dict[str, Any]],
    breakdown: list[str],
    *,
    token_budgets: list[int] | None = None,
    num_resamples: int = 1000,
    seed: int = 0,
    select_fraction: float | None = None,
) -> dict[str, Any]:
    """Every metric of the module docstring. `token_budgets`: the b of accuracy_at_budget/<b> (none without);
    `num_resamples`: bootstrap replicates of the intervals (0: none); `seed`: of the intervals and the split;
    `select_fraction`: the share of problems in the selection part (None: no split)."""
    groups = by_problem(samples)
    # Every problem has exactly samples 0..n-1: with fewer, pass@k and maj@k would be computed on what is there
    # (pass@4 of three wrong samples would read 1.0).
    for problem, group in groups.items():
        if [s["sample"] for s in group] != list(range(n)):
            raise ValueError(f"problem {problem}: samples {[s['sample'] for s in group]}, expected 0..{n - 1} (n={n})")
    metrics = _sample_rates(samples, len(groups), n)
    from evaluator.audit import audit_metrics  # grader/agreement_*, grader/disagreements_*, grader/undecided_rate

    metrics.update(audit_metrics(samples))
    metrics.update(_k_metrics(groups, n))
    failures = Counter(s["failure"] for s in samples if s["failure"])
    metrics.update({f"failure_rate/{kind}": failures[kind] / len(samples) for kind in FAILURE_KINDS})
    metrics.update(_breakdown_accuracy(groups, fields_by_problem, breakdown))
    metrics.update(score_intervals(groups, n, num_resamples, seed))
    metrics.update(budget_accuracy(samples, token_budgets or []))
    if select_fraction is not None:
        metrics.update(split_metrics(groups, n, fields_by_problem, breakdown, select_fraction, num_resamples, seed))
    return metrics


def _sample_rates(samples: list[dict[str, Any]], num_problems: int, n: int) -> dict[str, Any]:
    """The per-sample figures: accuracy, format, length and truncation, grader problems."""
    num = len(samples)
    rewards = [s["reward"] for s in samples]
    formatted = [s["reward"] for s in samples if s["format_reward"] == 1.0]
    truncated = [s["reward"] for s in samples if s["truncated"]]
    completed = [s["reward"] for s in samples if not s["truncated"]]
    return {
        "accuracy": sum(rewards) / num,
        "num_problems": num_problems,
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


def _k_metrics(groups: dict[int, list[dict[str, Any]]], n: int) -> dict[str, float]:
    """pass@k and maj@k for every reported k, averaged over problems."""
    metrics = {}
    for k in reported_ks(n):
        metrics[f"pass@{k}"] = sum(
            pass_at_k(len(g), sum(s["reward"] == 1.0 for s in g), k) for g in groups.values()
        ) / len(groups)
        metrics[f"maj@{k}"] = sum(
            majority_at_k([s["vote"] for s in g], [s["reward"] for s in g], k) for g in groups.values()
        ) / len(groups)
    return metrics


def _breakdown_accuracy(
    groups: dict[int, list[dict[str, Any]]], fields_by_problem: dict[int, dict[str, Any]], breakdown: list[str]
) -> dict[str, float]:
    """accuracy_by/<field>/<value>: the accuracy of the samples of the problems with that value of the field."""
    metrics = {}
    for name in breakdown:
        per_value: dict[Any, list[float]] = defaultdict(list)
        for problem, group in groups.items():
            value = fields_by_problem.get(problem, {}).get(name)
            if value is not None:
                per_value[value].extend(s["reward"] for s in group)
        for value, values in sorted(per_value.items(), key=lambda kv: str(kv[0])):
            metrics[f"accuracy_by/{name}/{value}"] = sum(values) / len(values)
    return metrics


def score_intervals(groups: dict[int, list[dict[str, Any]]], n: int, num_resamples: int, seed: int) -> dict[str, float]:
    """<metric>_ci_low / _ci_high of accuracy, pass@k and maj@k (stats.py: problems drawn, samples reordered)."""
    if num_resamples == 0:
        return {}
    rewards = [[s["reward"] for s in g] for g in groups.values()]
    votes = [[s["vote"] for s in g] for g in groups.values()]
    bounds = {"accuracy": stats.mean_interval([sum(r) / len(r) for r in rewards], num_resamples, seed)}
    for k in reported_ks(n):
        passes = [pass_at_k(len(r), sum(x == 1.0 for x in r), k) for r in rewards]
        bounds[f"pass@{k}"] = stats.mean_interval(passes, num_resamples, seed)
        bounds[f"maj@{k}"] = stats.majority_interval(votes, rewards, k, num_resamples, seed)
    out = {}
    for name, (low, high) in bounds.items():
        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = low, high
    return out


def budget_accuracy(samples: list[dict[str, Any]], budgets: list[int]) -> dict[str, float]:
    """accuracy_at_budget/<b>: a sample counts right at b when it is right within b tokens; one longer would
    have been cut at b (truncated, wrong). Generation is token by token, so its first b tokens are the same."""
    return {
        f"accuracy_at_budget/{b}": sum(s["reward"] for s in samples if s["num_tokens"] <= b) / len(samples)
        for b in budgets
    }


def split_problems(problems: Iterable[int], select_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(selection part, held-out part) of a set's problem indices: ranked by a seeded hash of the index, the
    first round(fraction x problems) select. Each problem is on one side only; the same problems and seed give
    the same split at every step, whatever order the samples came in."""
    ranked = sorted(problems, key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).hexdigest())
    if len(ranked) < 2:
        raise ValueError(f"select_fraction: a split needs at least 2 problems, the set has {len(ranked)}")
    num_select = min(len(ranked) - 1, max(1, round(select_fraction * len(ranked))))
    return sorted(ranked[:num_select]), sorted(ranked[num_select:])


def split_metrics(
    groups: dict[int, list[dict[str, Any]]],
    n: int,
    fields_by_problem: dict[int, dict[str, Any]],
    breakdown: list[str],
    select_fraction: float,
    num_resamples: int,
    seed: int,
) -> dict[str, Any]:
    """select/<metric> and heldout/<metric>: every metric of set_metrics, on each part of the split."""
    out: dict[str, Any] = {}
    for part, problems in zip(("select", "heldout"), split_problems(groups, select_fraction, seed), strict=True):
        part_samples = [s for p in problems for s in groups[p]]
        part_metrics = set_metrics(
            part_samples, n, fields_by_problem, breakdown, num_resamples=num_resamples, seed=seed
        )
        out.update({f"{part}/{key}": value for key, value in part_metrics.items()})
    return out


def changes(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> dict[str, list[int]]:
    """Problems (present at both checkpoints) learned and forgotten between them."""
    old, new = by_problem(before), by_problem(after)
    common = sorted(set(old) & set(new))
    return {
        "learned": [p for p in common if not solved(old[p]) and solved(new[p])],
        "forgotten": [p for p in common if solved(old[p]) and not solved(new[p])],
    }
