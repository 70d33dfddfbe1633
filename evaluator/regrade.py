"""`python -m evaluator.regrade runs/x [--name default] [--set S]`: grade the stored samples of every evaluated
checkpoint again with the current grader, without generating.

Per step and set (the averaged checkpoints' too, in eval/<name>/average_last_<k>/) it writes the regraded
samples (`<set>/step_N.grader-<version>.samples.jsonl`), their grader disagreements
(`<set>/step_N.grader-<version>.disagreements.jsonl`) and, in both the step's result file and the set's, the new
metrics beside the old: `regraded: {<grader version>: {metrics, samples, flipped, time}}`. The
original metrics and samples stay as they were. It prints, per step, the accuracy before and after and the
samples whose verdict flipped.

Grader versions never mix in one curve: a result's own metrics were graded by its `grader_version` (results from
before versions read as "unversioned"), and `select_grader` gives the report one version for every step, leaving
out (and naming) the steps that have no metrics of that version.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from evaluator.audit import write_disagreements
from evaluator.grader import GraderPool, extract_answer, grader_version, vote_key
from evaluator.metrics import failure_kind, read_samples, read_step_result, set_metrics
from shared.protocol import (
    AVERAGE_RESULTS_PREFIX,
    RunLayout,
    atomic_write_bytes,
    atomic_write_json,
    result_file,
    result_steps,
    samples_file,
)

UNVERSIONED = "unversioned"
"""The grader version of a result written before results carried one."""

MAX_PRINTED_FLIPS = 20
"""Flipped samples printed per step and set; all of them are in the result (`flipped`)."""


def average_dirs(eval_dir: Path) -> list[Path]:
    """The averaged checkpoints' result folders inside an evaluation folder, by k: regraded and reported with it."""
    found = [
        path
        for path in eval_dir.glob(f"{AVERAGE_RESULTS_PREFIX}*")
        if path.is_dir() and path.name.removeprefix(AVERAGE_RESULTS_PREFIX).isdigit()
    ]
    return sorted(found, key=lambda path: int(path.name.removeprefix(AVERAGE_RESULTS_PREFIX)))


def own_version(result: dict[str, Any], set_result: dict[str, Any]) -> str:
    """The grader version a set result's own metrics were graded with."""
    return set_result.get("grader_version") or result.get("grader_version") or UNVERSIONED


def regraded_samples_file(eval_dir: Path, set_name: str, step: int, version: str) -> Path:
    path = samples_file(eval_dir, set_name, step)
    return path.with_name(path.name.replace(".samples.jsonl", f".grader-{version}.samples.jsonl"))


def regrade_samples(pool: GraderPool, samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The samples graded again: rewards, verdict, audit verdicts, vote, failure kind and grader problem anew."""
    grades, problems = pool.grade([s["response"] for s in samples], [s["ground_truth"] for s in samples])
    regraded = []
    for s, g, problem in zip(samples, grades, problems, strict=True):
        answer = extract_answer(s["response"])
        vote = vote_key(answer) if answer is not None else None
        failure = failure_kind(g["reward"], g["format_reward"], s["truncated"], problem, vote)
        regraded.append({**s, **g, "answer": answer, "vote": vote, "failure": failure, "grader": problem})
    return regraded


def _flips(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "problem": a["problem"],
            "sample": a["sample"],
            "before": "right" if b["reward"] == 1.0 else b.get("verdict") or "wrong",
            "after": a["verdict"],
            "rule": a.get("grader_rule"),
            "answer": a["answer"],
            "ground_truth": a["ground_truth"],
        }
        for b, a in zip(before, after, strict=True)
        if (b["reward"] == 1.0) != (a["reward"] == 1.0)
    ]


def regrade_set(
    pool: GraderPool, eval_dir: Path, step: int, set_name: str, set_result: dict[str, Any], version: str
) -> dict[str, Any]:
    """Regrades one set at one step; writes its samples and disagreements; returns its `regraded` entry."""
    path = samples_file(eval_dir, set_name, step)
    if not path.is_file():
        raise ValueError(f"{path}: no samples to regrade (the result names set {set_name!r} at step {step})")
    before = read_samples(path)
    after = regrade_samples(pool, before)
    n = set_result.get("sampling", {}).get("n", 1)
    try:
        metrics = set_metrics(after, n, {}, [])
    except (ValueError, KeyError) as exc:
        raise ValueError(f"{path}: {exc}") from None
    out = regraded_samples_file(eval_dir, set_name, step, version)
    atomic_write_bytes(out, "".join(json.dumps(s) + "\n" for s in after).encode())
    write_disagreements(eval_dir, set_name, step, after, version)
    return {"metrics": metrics, "samples": out.name, "flipped": _flips(before, after), "time": time.time()}


def _print_entry(step: int, set_name: str, old: dict[str, Any], entry: dict[str, Any], versions: str) -> None:
    flipped = entry["flipped"]
    print(
        f"step {step:>8} [{set_name}]: accuracy {old['accuracy']:.4f} -> {entry['metrics']['accuracy']:.4f} "
        f"(grader {versions}); {len(flipped)} sample{'s' if len(flipped) != 1 else ''} flipped"
    )
    for f in flipped[:MAX_PRINTED_FLIPS]:
        print(
            f"    problem {f['problem']} sample {f['sample']}: {f['before']} -> {f['after']} ({f['rule']}); "
            f"answer {f['answer']!r}, reference {f['ground_truth']!r}"
        )
    if len(flipped) > MAX_PRINTED_FLIPS:
        print(f"    ... and {len(flipped) - MAX_PRINTED_FLIPS} more (in the result's regraded.<version>.flipped)")


def regrade_all(eval_dir: Path, set_filter: str | None, pool: GraderPool) -> int:
    """`regrade` on the evaluation folder, then on each of its averaged checkpoints' folders that has results."""
    done = regrade(eval_dir, set_filter, pool)
    for folder in average_dirs(eval_dir):
        if result_steps(folder):
            print(f"averaged checkpoints, {folder}:")
            done += regrade(folder, set_filter, pool, missing_set_ok=True)
    return done


def regrade(eval_dir: Path, set_filter: str | None, pool: GraderPool, missing_set_ok: bool = False) -> int:
    """Regrades every step of `eval_dir` (the sets named `set_filter`, or all); returns how many sets it regraded.
    A `set_filter` no result has is an error unless `missing_set_ok`."""
    version = grader_version()
    steps = result_steps(eval_dir)
    if not steps:
        raise ValueError(f"{eval_dir}: no evaluation results to regrade")
    # every result read before any is written: a bad file stops nothing halfway
    results = {step: read_step_result(path) for step, path in steps.items()}
    if set_filter is not None and not missing_set_ok and not any(set_filter in r["sets"] for r in results.values()):
        raise ValueError(f"--set {set_filter}: no such set in {eval_dir}")
    done = 0
    for step, result in results.items():
        for set_name, set_result in result["sets"].items():
            if set_filter is not None and set_name != set_filter:
                continue
            own = own_version(result, set_result)
            if own == version:
                print(f"step {step:>8} [{set_name}]: already graded by grader {version}")
                continue
            entry = regrade_set(pool, eval_dir, step, set_name, set_result, version)
            set_result.setdefault("regraded", {})[version] = entry
            _record_in_set_file(eval_dir, step, set_name, version, entry)
            _print_entry(step, set_name, set_result["metrics"], entry, f"{own} -> {version}")
            done += 1
        atomic_write_json(steps[step], result)  # the step's file last, as the evaluator writes them
    return done


def _record_in_set_file(eval_dir: Path, step: int, set_name: str, version: str, entry: dict[str, Any]) -> None:
    path = result_file(eval_dir, step, set_name)
    if path.is_file():
        try:
            set_result = json.loads(path.read_text())
        except ValueError as exc:
            raise ValueError(f"{path}: not a readable result ({exc})") from None
        set_result.setdefault("regraded", {})[version] = entry
        atomic_write_json(path, set_result)


# --------------------------------------------------------------------------------------------------
# One grader version per report


def versions_of(results: list[dict[str, Any]]) -> set[str]:
    """Every grader version some set of these results has metrics of (its own, or regraded)."""
    found = set()
    for r in results:
        for set_result in r["sets"].values():
            found.add(own_version(r, set_result))
            found.update(set_result.get("regraded", {}))
    return found


def default_version(results: list[dict[str, Any]]) -> str:
    """The current grader's version where some result has its metrics, else the newest result's own version."""
    current = grader_version()
    if current in versions_of(results):
        return current
    newest = max(results, key=lambda r: r["step"])
    return own_version(newest, next(iter(newest["sets"].values())))


def select_grader(results: list[dict[str, Any]], version: str) -> list[str]:
    """Makes every set result show the metrics of grader `version` (in place), removing the sets that have none;
    `graded_by` names the version and `samples_path` the samples file it was graded from (None: the original).
    Returns one line per removed (step, set), for the report to print."""
    left_out = []
    for r in results:
        sets = r["sets"]
        for name in list(sets):
            set_result = sets[name]
            if own_version(r, set_result) == version:
                set_result.update(graded_by=version, samples_path=None)
            elif version in set_result.get("regraded", {}):
                entry = set_result["regraded"][version]
                set_result.update(metrics=dict(entry["metrics"]), graded_by=version, samples_path=entry["samples"])
            else:
                del sets[name]
                left_out.append(
                    f"step {r['step']} [{name}]: graded by {own_version(r, set_result)}, not by {version} "
                    "(python -m evaluator.regrade regrades it)"
                )
    return left_out


def graded_samples_file(eval_dir: Path, set_name: str, step: int, set_result: dict[str, Any]) -> Path:
    """The samples file behind a set result's metrics after `select_grader`: the regraded one where it chose one."""
    name = set_result.get("samples_path")
    return samples_file(eval_dir, set_name, step).with_name(name) if name else samples_file(eval_dir, set_name, step)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m evaluator.regrade", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", help="run directory (or an evaluation results folder, as written by --out)")
    parser.add_argument("--name", default="default", help="evaluation name (evaluation.name)")
    parser.add_argument("--set", default=None, help="only this evaluation set")
    parser.add_argument("--workers", type=int, default=None, help="grading processes (default: one per core)")
    parser.add_argument("--timeout-s", type=float, default=5.0, help="bound of one grade, seconds")
    args = parser.parse_args(argv)
    run = Path(args.run)
    eval_dir = run if result_steps(run) else RunLayout(run).eval_dir(args.name)
    pool = GraderPool(args.workers, args.timeout_s)
    try:
        done = regrade_all(eval_dir, args.set, pool)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        pool.close()
    print(f"regraded {done} set result{'s' if done != 1 else ''} in {eval_dir} with grader {grader_version()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
