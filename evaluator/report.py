"""`python -m evaluator.report runs/x`: what a run learned, as a table, one PNG and one HTML page.

    python -m evaluator.report runs/x [--name default]        table; writes report.png and report.html
    python -m evaluator.report runs/x --diff 500 1000 [--set S] the paired difference between two steps, and
                                                                the problems learned and forgotten
    python -m evaluator.report runs/x --grader <version>       the metrics of that grader version (a regrade's,
                                                                python -m evaluator.regrade) instead of the original

The page holds train loss and learning rate, accuracy, pass@k and maj@k per set with their 95 % intervals as
bands, accuracy by token budget, accuracy by subject and level over steps (heatmaps), response length and
truncation, failure kinds, the grader audit (agreement of our verdicts with math-verify alone and with a string
match, undecided rate) and the problems learned and forgotten between consecutive evaluations; a flip on a
problem where the graders disagree (at either step) is marked `*`: it may be the grader's, not the model's.
Each step's change from the step before is tested (paired, on the same problems) and marked when it is not
distinguishable from noise; the best step's score is given on the held-out part of a split set, or said to be
chosen on the set it is reported on. Averaged checkpoints (eval/<name>/average_last_<k>/) are drawn and ranked
beside the trained steps, marked as averages.

Grader versions never mix unnoticed: without --grader each result shows the metrics its own grader gave; where
one set's results were graded by several versions, a WARNING line says so, accuracy is drawn as one series per
version, and no flip or paired change is counted across two versions. With --grader every step shows that
version's metrics and samples; the steps that have none are left out and named. It is self-contained (inline
SVG): mail it, open it offline.
"""

from __future__ import annotations

import argparse
import html
import io
import json
import shutil
import textwrap
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from evaluator import stats
from evaluator.audit import disagreements_file, problem_disagreements
from evaluator.metrics import FAILURE_KINDS, by_problem, changes, read_samples, read_step_result
from evaluator.regrade import average_dirs, graded_samples_file, own_version, select_grader, versions_of
from shared.config import IMPLICIT_SET
from shared.protocol import REPORT_NAME, RunLayout, comparable_as, result_steps, samples_file

PAIRED_RESAMPLES = 2000
"""Bootstrap replicates of the report's paired comparisons (seeded: the same samples, the same verdict)."""

NOISE_MARK = "~"
"""Marks a step whose accuracy change from the line above is not distinguishable from noise."""

DISPUTED_MARK = "*"
"""Marks a learned/forgotten problem on which the graders disagree: on one of its samples, at either step, our
verdict differs from math-verify's alone or from the string match's. The flip may be the grader's, not the model's."""

DISPUTED_NOTE = (
    f"{DISPUTED_MARK} graders disagree (on a sample of the problem, at either step, our verdict differs from "
    "math-verify's or the string match's): the flip may be the grader's, not the model's"
)

AUDIT_CURVES = (
    ("grader/agreement_math_verify", "o-", "agreement with math-verify alone"),
    ("grader/agreement_string", "s--", "agreement with the string match"),
    ("grader/undecided_rate", "x:", "undecided rate (counted wrong)"),
)
"""The grader audit's metrics (evaluator/audit.py) as drawn: (metric, line style, label)."""


def paired_accuracy(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> stats.PairedComparison:
    """`after`'s accuracy minus `before`'s on the problems both have (stats.paired_comparison)."""
    old, new = by_problem(before), by_problem(after)
    common = sorted(set(old) & set(new))
    rewards = [[[s["reward"] for s in side[p]] for p in common] for side in (old, new)]
    return stats.paired_comparison(rewards[0], rewards[1], PAIRED_RESAMPLES, seed=0)


# --------------------------------------------------------------------------------------------------
# Loading: results, averaged checkpoints, one grader version per curve


def result_folder(result: dict[str, Any]) -> Path:
    """The folder a loaded result and its samples lie in (an averaged checkpoint's: eval/<name>/average_last_<k>/)."""
    return Path(result["loaded_from"]).parent


def read_results(eval_dir: Path) -> list[dict[str, Any]]:
    """The step results of an evaluation and of its averaged checkpoints, in step order (an average after the
    trained step it ends at). Each carries `loaded_from`, its file."""
    results = []
    for folder in (eval_dir, *average_dirs(eval_dir)):
        for path in result_steps(folder).values():
            result = read_step_result(path)
            if folder != eval_dir and "average" not in result:
                raise ValueError(f"{path}: in an averaged checkpoint's folder but without an 'average' entry")
            result["loaded_from"] = str(path)
            results.append(result)
    return sorted(results, key=lambda r: (r["step"], r.get("average", {}).get("last", 0)))


def load_graded(eval_dir: Path, grader: str | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """The results as the report shows them, and its WARNING lines. Without `grader`, each set result shows its
    own grader's metrics (a warning names the sets graded by several versions); with it, every set result shows
    grader `grader`'s metrics (regrade.select_grader) and those without are left out, each named in a warning.
    Every set result gets `graded_by`; learned/forgotten are counted again (count_changes)."""
    results = read_results(eval_dir)
    if grader is None:
        for r in results:
            for set_result in r["sets"].values():
                set_result.update(graded_by=own_version(r, set_result), samples_path=None)
        warnings = mixed_version_warnings(results)
    else:
        known = versions_of(results)
        if results and grader not in known:
            raise ValueError(
                f"--grader {grader}: no result in {eval_dir} has metrics of that version "
                f"(versions there: {', '.join(sorted(known))}; python -m evaluator.regrade adds the current one)"
            )
        warnings = [f"WARNING: left out: {line}" for line in select_grader(results, grader)]
    count_changes(results)
    return results, warnings


def load_results(eval_dir: Path) -> list[dict[str, Any]]:
    """The results as graded by their own grader (load_graded without a version), warnings aside."""
    return load_graded(eval_dir)[0]


def mixed_version_warnings(results: list[dict[str, Any]]) -> list[str]:
    """One WARNING line per set whose results were graded by more than one grader version."""
    lines = []
    for name in set_names(results):
        rows = [r for r in results if name in r["sets"]]
        by_version: dict[str, list[str]] = {}
        for r in rows:
            by_version.setdefault(r["sets"][name]["graded_by"], []).append(step_label(r))
        if len(by_version) < 2:
            continue
        everywhere = set.intersection(
            *({own_version(r, r["sets"][name]), *r["sets"][name].get("regraded", {})} for r in rows)
        )
        hint = (
            f"--grader {min(everywhere)} shows one version at every step"
            if everywhere
            else "python -m evaluator.regrade regrades every step with the current grader; then --grader <its version>"
        )
        graded = "; ".join(f"grader {v}: steps {', '.join(labels)}" for v, labels in by_version.items())
        lines.append(
            f"WARNING: [{name}] results graded by {len(by_version)} grader versions ({graded}). Accuracy is drawn "
            f"as one series per version; no flip or paired change is counted across versions. {hint}"
        )
    return lines


def count_changes(results: list[dict[str, Any]]) -> None:
    """Learned/forgotten counted again (in place) against the line above, each result recording them against the
    nearest earlier step evaluated before it, which is another step when evaluations ran out of order (newest
    first, back-fill). Where the line above has no samples, other problems or sampling, or another grader
    version, no counts are shown. An averaged checkpoint is compared with the line above but is none itself."""
    for name in set_names(results):
        previous = None  # {step, samples, key} of the set's line above
        for r in results:
            set_result = r["sets"].get(name)
            if set_result is None:
                continue
            # The stored counts may be against another step (the evaluator's order): never shown as they are.
            set_result["changes"] = {"vs_step": None, "learned": [], "forgotten": [], "disputed": []}
            for key in ("learned", "forgotten"):
                set_result["metrics"].pop(key, None)
            path = graded_samples_file(result_folder(r), name, r["step"], set_result)
            samples = read_samples(path) if path.is_file() else None
            key = (*comparable_as(set_result), set_result["graded_by"])  # never across grader versions
            if samples is not None and previous is not None and previous["key"] == key:
                found = flips_between(previous["samples"], samples)
                set_result["changes"] = {"vs_step": previous["step"], **found}
                set_result["metrics"].update(learned=len(found["learned"]), forgotten=len(found["forgotten"]))
            if "average" not in r:
                previous = {"step": r["step"], "samples": samples, "key": key} if samples is not None else None


def flips_between(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> dict[str, Any]:
    """learned, forgotten (metrics.changes), disputed (those of them the graders disagree on, at either step:
    DISPUTED_MARK) and paired (the paired accuracy comparison)."""
    found = changes(before, after)
    disagreed = set(problem_disagreements(before)) | set(problem_disagreements(after))
    disputed = sorted(p for p in found["learned"] + found["forgotten"] if p in disagreed)
    return {**found, "disputed": disputed, "paired": paired_accuracy(before, after)}


def load_train_log(run_dir: Path) -> list[dict[str, Any]]:
    path = RunLayout(run_dir).train_log_file
    if not path.is_file():
        return []
    kept: list[dict[str, Any]] = []
    for line in path.read_text().splitlines():
        row = json.loads(line) if line.strip() else {}
        if "train/loss" not in row:
            continue
        # A step at or before the last one kept starts a resumed run: what the abandoned run logged from there on
        # was trained over again, so only the resumed run's rows stay.
        while kept and kept[-1]["train_step"] >= row["train_step"]:
            kept.pop()
        kept.append(row)
    return kept


def set_names(results: list[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for r in results:
        names += [n for n in r["sets"] if n not in names]
    return names


def _versions(results: list[dict[str, Any]], set_name: str) -> list[str]:
    """The grader versions of a set's results (`graded_by`), in step order."""
    found: list[str] = []
    for r in results:
        version = r["sets"].get(set_name, {}).get("graded_by")
        if version is not None and version not in found:
            found.append(version)
    return found


def _series(
    results: list[dict[str, Any]], set_name: str, metric: str, version: str | None = None
) -> tuple[list[int], list[float]]:
    """The metric over the trained steps (averaged checkpoints left out: they are drawn apart), of the results
    graded by `version` (None: all)."""
    steps, values = [], []
    for r in results:
        set_result = r["sets"].get(set_name, {})
        if "average" in r or (version is not None and set_result.get("graded_by") != version):
            continue
        value = set_result.get("metrics", {}).get(metric)
        if isinstance(value, (int, float)):
            steps.append(r["step"])
            values.append(value)
    return steps, values


def step_label(result: dict[str, Any]) -> str:
    """The step, or for an averaged checkpoint avg_last_<k>@<step> (the average of the k checkpoints up to it)."""
    average = result.get("average")
    return f"avg_last_{average['last']}@{result['step']}" if average else str(result["step"])


def _paired_cell(set_result: dict[str, Any]) -> str:
    paired = (set_result.get("changes") or {}).get("paired")
    if paired is None:
        return ""
    return f"{paired.difference:+.3f}{'' if paired.distinguishable else NOISE_MARK}"


def _comparable(set_result: dict[str, Any]) -> tuple:
    """What two steps' set results share to be ranked or compared: comparable_as, and the grader version."""
    return (*comparable_as(set_result), set_result.get("graded_by"))


def _top(rows: list[dict[str, Any]], set_name: str, rank_key: str) -> tuple[float, dict[str, Any]] | None:
    """(score, result) of the best row by `rank_key`: a later step among equals, a trained step before an average."""
    scored = [
        (value, r["step"], "average" not in r, r)
        for r in rows
        if isinstance(value := r["sets"][set_name]["metrics"].get(rank_key), (int, float))
    ]
    if not scored:
        return None
    value, _, _, chosen = max(scored, key=lambda t: t[:3])
    return value, chosen


def _chosen_label(result: dict[str, Any]) -> str:
    average = result.get("average")
    if not average:
        return f"step {step_label(result)}"
    steps = ", ".join(str(s) for s in average.get("steps", [])) or "?"
    return f"{step_label(result)} (an averaged checkpoint: the mean of the weights of steps {steps})"


def best_choice(results: list[dict[str, Any]], set_name: str, metric: str) -> str | None:
    """Which step best/keep_best choose in the newest comparable results (the same problems, sampling and grader
    version), averaged checkpoints included and marked so, and how far its score can be trusted: on the held-out
    part of a split set, else said to be chosen on the very problems it is reported on."""
    rows = [r for r in results if set_name in r["sets"]]
    if not rows:
        return None
    newest = _comparable(rows[-1]["sets"][set_name])
    rows = [r for r in rows if _comparable(r["sets"][set_name]) == newest]
    split = all(f"select/{metric}" in r["sets"][set_name]["metrics"] for r in rows)
    rank_key = f"select/{metric}" if split else metric
    top = _top(rows, set_name, rank_key)
    if top is None:
        return None
    value, chosen = top
    m = chosen["sets"][set_name]["metrics"]
    if not split:
        line = (
            f"best: {_chosen_label(chosen)} by {metric} {value:.3f}{_interval(m, metric)}, chosen on the same "
            f"{m['num_problems']} problems it is reported on (optimistic; set select_fraction to hold problems out)"
        )
    else:
        line = (
            f"best: {_chosen_label(chosen)} by {metric} on the selection part ({m['select/num_problems']} problems): "
            f"{value:.3f}; held out ({m['heldout/num_problems']} problems, not used to choose): "
            f"{m[f'heldout/{metric}']:.3f}{_interval(m, f'heldout/{metric}')}"
        )
    trained = _top([r for r in rows if "average" not in r], set_name, rank_key) if "average" in chosen else None
    return line + (f"; the best trained step: {trained[1]['step']} ({trained[0]:.3f})" if trained else "")


def _interval(metrics: dict[str, Any], name: str) -> str:
    low, high = metrics.get(f"{name}_ci_low"), metrics.get(f"{name}_ci_high")
    return f" [{low:.3f}, {high:.3f}]" if low is not None and high is not None else ""


def best_metrics(run_dir: Path, set_names_: list[str]) -> dict[str, str]:
    """The metric each set's best step is chosen by: training.keep_best's for its set, accuracy elsewhere."""
    chosen = dict.fromkeys(set_names_, "accuracy")
    try:
        saved = yaml.safe_load((RunLayout(run_dir).config_path).read_text()) or {}
        keep_best = saved["training"]["keep_best"]
        sets = list((saved["evaluation"].get("sets") or {IMPLICIT_SET: {}}).keys())
        chosen[keep_best.get("set") or sets[0]] = keep_best["metric"]
    except (OSError, KeyError, TypeError, IndexError, AttributeError, yaml.YAMLError):
        pass  # no keep_best, or no config.yaml (results of a folder evaluated with --ckpt): every set by accuracy
    return {name: metric for name, metric in chosen.items() if name in set_names_}


def _largest_n(results: list[dict[str, Any]], set_name: str) -> int:
    return max(r["sets"][set_name]["sampling"].get("n", 1) for r in results if set_name in r["sets"])


def _fraction(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "-"


def disagreements_path(result: dict[str, Any], set_name: str) -> Path:
    """The disagreements file of a set result as shown (a regrade's when its metrics are a regrade's)."""
    set_result = result["sets"][set_name]
    regraded = set_result.get("samples_path") is not None
    version = set_result["graded_by"] if regraded else None
    return disagreements_file(result_folder(result), set_name, result["step"], version)


def audit_line(results: list[dict[str, Any]], set_name: str) -> str:
    """The grader audit of the newest result of a set that has one: agreements, disagreements, undecided, file."""
    rows = [
        r
        for r in results
        if set_name in r["sets"] and r["sets"][set_name]["metrics"].get("grader/agreement_math_verify") is not None
    ]
    if not rows:
        return "grader audit: not measured (samples graded before the audit; python -m evaluator.regrade audits them)"
    r = rows[-1]
    m = r["sets"][set_name]["metrics"]
    return (
        f"grader audit at step {step_label(r)} (grader {r['sets'][set_name]['graded_by']}): our verdicts agree with "
        f"math-verify alone on {_fraction(m['grader/agreement_math_verify'])} of the samples it judged "
        f"(disagreeing on {m['grader/disagreements_math_verify']}), with the string match on "
        f"{_fraction(m.get('grader/agreement_string'))} (disagreeing on {m.get('grader/disagreements_string', 0)}); "
        f"undecided {_fraction(m.get('grader/undecided_rate'))}. The disagreeing samples: "
        f"{disagreements_path(r, set_name)}"
    )


# --------------------------------------------------------------------------------------------------
# Table


def _table_head(sampled: list[str], mixed: bool) -> list[str]:
    # learned / forgot: problems that flipped since the step on the line above; agree_mv / agree_str: the grader
    # audit's agreement with math-verify alone / the string match; disagree: the two disagreement counts
    head = ["step", "accuracy", "95% CI", *sampled, "format", "length", "trunc", "learned", "forgot", "vs prev"]
    return [*head, "agree_mv", "agree_str", "disagree", "undecided", *(["grader"] if mixed else []), "top failure"]


def _table_row(r: dict[str, Any], name: str, sampled: list[str], mixed: bool) -> str:
    set_result = r["sets"][name]
    m = set_result["metrics"]
    failures = {k: m.get(f"failure_rate/{k}", 0.0) for k in FAILURE_KINDS}
    top = max(failures, key=failures.get)
    ci = f"{m['accuracy_ci_low']:.3f}-{m['accuracy_ci_high']:.3f}" if "accuracy_ci_low" in m else ""
    disagree = f"{m.get('grader/disagreements_math_verify', '-')}/{m.get('grader/disagreements_string', '-')}"
    cells = [
        step_label(r),
        f"{m['accuracy']:.3f}",
        ci,
        *(f"{m.get(k, float('nan')):.3f}" for k in sampled),
        f"{m['format_rate']:.3f}",
        f"{m['mean_response_tokens']:.1f}",
        f"{m['truncation_rate']:.2f}",
        m.get("learned", ""),
        m.get("forgotten", ""),
        _paired_cell(set_result),
        _fraction(m.get("grader/agreement_math_verify")),
        _fraction(m.get("grader/agreement_string")),
        disagree,
        _fraction(m.get("grader/undecided_rate")),
        *([set_result["graded_by"]] if mixed else []),
    ]
    return "  ".join([*(f"{c:>11}" for c in cells), f"{top} {failures[top]:.2f}" if failures[top] else "-"])


def format_table(results: list[dict[str, Any]], best_by: dict[str, str] | None = None) -> str:
    """A table per set; `best_by`: the metric each set's best step is chosen by (best_metrics), for its line."""
    blocks = []
    for name in set_names(results):
        n = _largest_n(results, name)
        sampled = [f"pass@{n}", f"maj@{n}"] if n > 1 else []
        mixed = len(_versions(results, name)) > 1
        lines = [f"[{name}] n={n}", "  ".join(f"{h:>11}" for h in _table_head(sampled, mixed))]
        lines += [_table_row(r, name, sampled, mixed) for r in results if name in r["sets"]]
        lines.append(
            f"vs prev: accuracy minus the line above's on the same problems; {NOISE_MARK} = not distinguishable "
            f"from noise (p >= {stats.NOISE_P:g}: exact McNemar for n = 1, else paired bootstrap)"
        )
        lines.append(audit_line(results, name))
        note = best_choice(results, name, (best_by or {}).get(name, "accuracy"))
        lines += [note] if note else []
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


# --------------------------------------------------------------------------------------------------
# Per-problem changes between two steps


def read_set_samples(
    eval_dir: Path, set_name: str, step: int, results: list[dict[str, Any]] | None = None, grader: str | None = None
) -> tuple[list[dict[str, Any]], str | None]:
    """The samples behind a trained step's metrics as the report shows them (`results` from load_graded: with
    `grader`, that version's regraded samples), and the grader version that graded them (None: not known)."""
    set_result = next(
        (
            r["sets"][set_name]
            for r in results or []
            if r["step"] == step and "average" not in r and set_name in r["sets"]
        ),
        None,
    )
    if set_result is None and grader is not None:
        raise ValueError(
            f"step {step} [{set_name}]: no metrics of grader {grader} (python -m evaluator.regrade regrades it; "
            "evaluated steps: see the table)"
        )
    path = (
        graded_samples_file(eval_dir, set_name, step, set_result)
        if set_result
        else samples_file(eval_dir, set_name, step)
    )
    if not path.is_file():
        raise ValueError(f"{path}: no samples of set {set_name!r} at step {step} (evaluated steps: see the table)")
    return read_samples(path), set_result["graded_by"] if set_result else None


def _side_by_side(left: str, right: str, width: int) -> list[str]:
    col = (width - 3) // 2

    def wrapped(text: str) -> list[str]:
        return [w for para in text.splitlines() for w in (textwrap.wrap(para, col) or [""])]

    a, b = wrapped(left), wrapped(right)
    a += [""] * (len(b) - len(a))
    b += [""] * (len(a) - len(b))
    return [f"{x:<{col}} | {y}" for x, y in zip(a, b, strict=True)]


def _flip_block(change: str, p: int, sides: list[tuple[int, list[dict[str, Any]], dict[int, list[str]]]], width: int):
    """One flipped problem: its heading (marked when the graders disagree on it) and both steps' sample 0."""
    (before, a, disputed_a), (after, b, disputed_b) = sides
    where = [f"{', '.join(d[p])} at step {s}" for s, d in ((before, disputed_a), (after, disputed_b)) if p in d]
    right_a, right_b = sum(s["reward"] == 1.0 for s in a), sum(s["reward"] == 1.0 for s in b)
    return [
        "",
        f"== {change.upper()}{DISPUTED_MARK if where else ''}: problem {p}   reference answer: {b[0]['ground_truth']}",
        *([f"   {DISPUTED_MARK} graders disagree: {'; '.join(where)} (see the disagreements files)"] if where else []),
        *_side_by_side(
            f"step {before} ({right_a}/{len(a)} right; sample 0, {a[0]['failure'] or 'right'}):",
            f"step {after} ({right_b}/{len(b)} right; sample 0, {b[0]['failure'] or 'right'}):",
            width,
        ),
        *_side_by_side(a[0]["response"], b[0]["response"], width),
    ]


def format_diff(
    eval_dir: Path,
    set_name: str,
    before: int,
    after: int,
    width: int = 140,
    results: list[dict[str, Any]] | None = None,
    grader: str | None = None,
) -> str:
    """The paired comparison of two trained steps and their learned and forgotten problems side by side, a flip
    the graders disagree on marked DISPUTED_MARK; `results`/`grader` as in read_set_samples."""
    old, old_version = read_set_samples(eval_dir, set_name, before, results, grader)
    new, new_version = read_set_samples(eval_dir, set_name, after, results, grader)
    flips = changes(old, new)
    old_by, new_by = by_problem(old), by_problem(new)
    disputed_old, disputed_new = problem_disagreements(old), problem_disagreements(new)
    head = f"[{set_name}] step {before} -> step {after}"
    out = [
        f"{head}: {paired_accuracy(old, new).verdict()}",
        (
            f"{head}: {len(flips['learned'])} learned, {len(flips['forgotten'])} forgotten (a problem is solved "
            "when at least half its samples are right)"
        ),
    ]
    flipped = flips["learned"] + flips["forgotten"]
    marked = [p for p in flipped if p in disputed_old or p in disputed_new]
    if marked:
        out.append(f"{head}: {len(marked)} of the {len(flipped)} flips marked {DISPUTED_NOTE}")
    if old_version != new_version:
        out.append(
            f"WARNING: step {before} was graded by grader {old_version}, step {after} by {new_version}: a flip may be "
            "the grader's change; --grader <version> compares one version (python -m evaluator.regrade adds one)"
        )
    for change in ("learned", "forgotten"):
        for p in flips[change]:
            sides = [(before, old_by[p], disputed_old), (after, new_by[p], disputed_new)]
            out += _flip_block(change, p, sides, width)
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------
# Figures: one panel per (title, draw(ax))


def _panels(results: list[dict[str, Any]], train_rows: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    """(title, draw(ax)) for each panel of the report, in reading order."""
    panels = [("Training: loss and learning rate", partial(_draw_train, train_rows))] if train_rows else []
    for name in set_names(results):
        panels += _set_panels(results, name)
    return panels


def _set_panels(results: list[dict[str, Any]], name: str) -> list[tuple[str, Any]]:
    n = _largest_n(results, name)
    panels = [(f"{name}: accuracy, pass@k, maj@k (bands: 95 % intervals)", partial(_draw_accuracy, results, name, n))]
    if _budgets(results, name):
        title = f"{name}: accuracy by token budget (the same generations, cut at b)"
        panels.append((title, partial(_draw_budgets, results, name)))
    for field in _breakdown_fields(results, name):
        panels.append((f"{name}: accuracy by {field} over steps", partial(_draw_heatmap, results, name, field)))
    panels.append((f"{name}: response length and truncation", partial(_draw_length, results, name)))
    panels.append((f"{name}: why samples are wrong (share of samples)", partial(_draw_failures, results, name)))
    if any(_series(results, name, metric)[1] for metric, _, _ in AUDIT_CURVES):
        title = f"{name}: grader audit (agreement of our verdicts with two independent graders)"
        panels.append((title, partial(_draw_audit, results, name)))
    title = f"{name}: problems learned / forgotten since the previous evaluation"
    panels.append((title, partial(_draw_flips, results, name)))
    return panels


def _draw_train(train_rows: list[dict[str, Any]], ax) -> None:
    steps = [r["train_step"] for r in train_rows]
    ax.plot(steps, [r["train/loss"] for r in train_rows], color="tab:blue", lw=1)
    ax.set_ylabel("train loss", color="tab:blue")
    lr = ax.twinx()
    lr.plot(steps, [r["train/lr"] for r in train_rows], color="tab:orange", lw=1)
    lr.set_ylabel("learning rate", color="tab:orange")


def _plot_by_version(ax, results: list[dict[str, Any]], name: str, metric: str, style: str, label: str, band: bool):
    """The metric's curve, one series per grader version (a curve never joins two graders' numbers)."""
    versions = _versions(results, name)
    for version in versions:
        steps, values = _series(results, name, metric, version)
        if values:
            suffix = f" [grader {version}]" if len(versions) > 1 else ""
            (line,) = ax.plot(steps, values, style, label=label + suffix)
            if band:
                _band(ax, results, name, metric, line.get_color(), version)


def _draw_accuracy(results: list[dict[str, Any]], name: str, n: int, ax) -> None:
    for metric, style in (("accuracy", "o-"), (f"pass@{n}", "s--"), (f"maj@{n}", "^:")):
        if metric == "accuracy" or n > 1:
            _plot_by_version(ax, results, name, metric, style, _curve_label(metric, n), band=True)
    _mark_noise(ax, results, name)
    averaged = [(r["step"], r["sets"][name]["metrics"]["accuracy"]) for r in _averaged(results, name)]
    if averaged:
        ax.plot(*zip(*averaged, strict=True), "*", ms=9, color="tab:purple", label="averaged checkpoints (accuracy)")
    steps, values = _series(results, name, "format_rate")
    ax.plot(steps, values, "x-", color="grey", alpha=0.6, label="format rate")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7, loc="best")


def _draw_audit(results: list[dict[str, Any]], name: str, ax) -> None:
    for metric, style, label in AUDIT_CURVES:
        _plot_by_version(ax, results, name, metric, style, label, band=False)
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7, loc="best")


def _step_ticks(ax, rows: list[dict[str, Any]]) -> None:
    ax.set_xticks(range(len(rows)), [step_label(r) for r in rows], fontsize=7, rotation=45)


def _draw_heatmap(results: list[dict[str, Any]], name: str, field: str, ax) -> None:
    rows = [r for r in results if name in r["sets"]]
    prefix = f"accuracy_by/{field}/"
    values = sorted(
        {k[len(prefix) :] for r in rows for k in r["sets"][name]["metrics"] if k.startswith(prefix)}, key=_natural
    )
    grid = [[r["sets"][name]["metrics"].get(prefix + v, float("nan")) for r in rows] for v in values]
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks(range(len(values)), values, fontsize=7)
    _step_ticks(ax, rows)
    ax.figure.colorbar(image, ax=ax, fraction=0.04)


def _draw_length(results: list[dict[str, Any]], name: str, ax) -> None:
    steps, lengths = _series(results, name, "mean_response_tokens")
    ax.plot(steps, lengths, "o-", color="tab:green")
    ax.set_ylabel("mean response tokens", color="tab:green")
    trunc = ax.twinx()
    steps, rates = _series(results, name, "truncation_rate")
    trunc.plot(steps, rates, "s--", color="tab:red")
    trunc.set_ylabel("truncation rate", color="tab:red")
    trunc.set_ylim(-0.02, 1.02)


def _draw_failures(results: list[dict[str, Any]], name: str, ax) -> None:
    rows = [r for r in results if name in r["sets"]]
    bottom = [0.0] * len(rows)
    for kind in FAILURE_KINDS:
        rates = [r["sets"][name]["metrics"].get(f"failure_rate/{kind}", 0.0) for r in rows]
        ax.bar(range(len(rows)), rates, bottom=bottom, label=kind)
        bottom = [b + v for b, v in zip(bottom, rates, strict=True)]
    _step_ticks(ax, rows)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=6, ncol=3, loc="upper right")


def _draw_flips(results: list[dict[str, Any]], name: str, ax) -> None:
    steps, learned = _series(results, name, "learned")
    _, forgotten = _series(results, name, "forgotten")
    x = range(len(steps))
    ax.bar(x, learned, color="tab:green", label="learned")
    ax.bar(x, [-f for f in forgotten], color="tab:red", label="forgotten")
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xticks(list(x), [str(s) for s in steps], fontsize=7, rotation=45)
    ax.legend(fontsize=7)


def _curve_label(metric: str, n: int) -> str:
    return metric if metric != "accuracy" else f"accuracy (mean@{n})"


def _averaged(results: list[dict[str, Any]], set_name: str) -> list[dict[str, Any]]:
    return [r for r in results if "average" in r and set_name in r["sets"]]


def _band(ax, results: list[dict[str, Any]], set_name: str, metric: str, color: str, version: str | None) -> None:
    """The metric's 95 % interval at each step (of the results graded by `version`), shaded."""
    steps, lows = _series(results, set_name, f"{metric}_ci_low", version)
    _, highs = _series(results, set_name, f"{metric}_ci_high", version)
    if lows and len(lows) == len(highs):
        ax.fill_between(steps, lows, highs, color=color, alpha=0.18, lw=0)


def _mark_noise(ax, results: list[dict[str, Any]], set_name: str) -> None:
    """A hollow grey ring on each step whose accuracy change from the step before is within the noise."""
    noise = [
        (r["step"], r["sets"][set_name]["metrics"]["accuracy"])
        for r in results
        if "average" not in r
        and set_name in r["sets"]
        and (paired := (r["sets"][set_name].get("changes") or {}).get("paired")) is not None
        and not paired.distinguishable
    ]
    if noise:
        ax.plot(
            *zip(*noise, strict=True), "o", ms=11, mfc="none", mec="grey", label="change from the step before: noise"
        )


def _budgets(results: list[dict[str, Any]], set_name: str) -> list[int]:
    prefix = "accuracy_at_budget/"
    return sorted(
        {
            int(k[len(prefix) :])
            for r in results
            for k in r["sets"].get(set_name, {}).get("metrics", {})
            if k.startswith(prefix)
        }
    )


def _draw_budgets(results: list[dict[str, Any]], set_name: str, ax) -> None:
    """Accuracy against the token budget, one line per step: the first, the last and up to 4 between."""
    rows = [r for r in results if "average" not in r and set_name in r["sets"]]
    rows = [rows[i] for i in sorted({round(i * (len(rows) - 1) / 5) for i in range(6)})] if len(rows) > 6 else rows
    for r in rows:
        metrics = r["sets"][set_name]["metrics"]
        budgets = _budgets([r], set_name)
        ax.plot(budgets, [metrics[f"accuracy_at_budget/{b}"] for b in budgets], "o-", ms=3, label=f"step {r['step']}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("token budget")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7, loc="best")


def _natural(value: str) -> tuple:
    return (0, float(value), value) if value.replace(".", "", 1).lstrip("-").isdigit() else (1, 0.0, value)


def _breakdown_fields(results: list[dict[str, Any]], set_name: str) -> list[str]:
    fields = {
        k.split("/")[1]
        for r in results
        for k in r["sets"].get(set_name, {}).get("metrics", {})
        if k.startswith("accuracy_by/")
    }
    return sorted(fields)


def _figure(title: str, draw, size: tuple[float, float]):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size, dpi=110)
    draw(ax)
    ax.set_title(title, fontsize=9)
    if not ax.get_xlabel():  # a panel that names its own x axis (the token budget) keeps it
        ax.set_xlabel("training step" if "heatmap" not in title else "")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def write_png(panels: list[tuple[str, Any]], out: Path, title: str) -> Path:
    import matplotlib.pyplot as plt

    cols = 2
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(12, 3.4 * rows), dpi=100, squeeze=False)
    for ax, (panel_title, draw) in zip(axes.flat, panels, strict=False):  # more axes than panels: the rest are off
        draw(ax)
        ax.set_title(panel_title, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.985))  # room for the title
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out)
    return out


def _svg(title: str, draw) -> str:
    import matplotlib.pyplot as plt

    fig = _figure(title, draw, (6.2, 3.4))
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    plt.close(fig)
    return buf.getvalue().split("?>", 1)[-1]  # drop the XML declaration: the SVG sits inside HTML


# --------------------------------------------------------------------------------------------------
# The HTML page

HTML_METRICS = [
    "format_rate",
    "mean_response_tokens",
    "truncation_rate",
    "accuracy_truncated",
    "accuracy_completed",
    "learned",
    "forgotten",
    "grader/agreement_math_verify",
    "grader/agreement_string",
    "grader/disagreements_math_verify",
    "grader/disagreements_string",
    "grader/undecided_rate",
    *(f"failure_rate/{k}" for k in FAILURE_KINDS),
]
"""The HTML table's columns after accuracy, its interval and pass@k/maj@k."""

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: 0.8em; }
figure { margin: 0; border: 1px solid #ddd; border-radius: 6px; padding: 4px; }
figure svg { width: 100%; height: auto; }
table { border-collapse: collapse; font-size: 12px; margin-bottom: 1em; }
td, th { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
code { font-size: 11px; }
.wide { overflow-x: auto; }
.noise { color: #888; }
.signal { font-weight: bold; }
.disputed { color: #a0522d; font-weight: bold; }
.warning { color: #b00000; font-weight: bold; border: 2px solid #b00000; padding: 0.4em 0.6em; }
"""


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"<td>{value:.3f}</td>"
    return f"<td>{'' if value is None else html.escape(str(value))}</td>"


def _html_table(results: list[dict[str, Any]], name: str) -> str:
    n = _largest_n(results, name)
    metrics = ["accuracy", "accuracy_ci_low", "accuracy_ci_high", *([f"pass@{n}", f"maj@{n}"] if n > 1 else [])]
    metrics += HTML_METRICS
    head = "".join(f"<th>{html.escape(m)}</th>" for m in ["step", *metrics, "vs prev (accuracy)", "grader"])
    rows = []
    for r in results:
        if name not in r["sets"]:
            continue
        set_result = r["sets"][name]
        cells = "".join(_cell(set_result["metrics"].get(k)) for k in metrics)
        paired = (set_result.get("changes") or {}).get("paired")
        verdict = "" if paired is None else html.escape(_paired_cell(set_result))
        noise = paired is not None and not paired.distinguishable
        title = f" title='{html.escape(paired.verdict())}'" if paired is not None else ""
        paired_td = f"<td class='{'noise' if noise else 'signal'}'{title}>{verdict}{' noise' if noise else ''}</td>"
        grader_td = _cell(set_result.get("graded_by"))
        rows.append(f"<tr><td>{html.escape(step_label(r))}</td>{cells}{paired_td}{grader_td}</tr>")
    return f"<div class='wide'><table><tr>{head}</tr>{''.join(rows)}</table></div>"


def _marked(problems: list[int], disputed: list[int]) -> str:
    """[2*, 5]: the problems, those the graders disagree on marked."""
    items = [f"<span class='disputed'>{p}{DISPUTED_MARK}</span>" if p in disputed else str(p) for p in problems]
    return f"[{', '.join(items)}]"


def _html_flips(results: list[dict[str, Any]], eval_dir: Path, grader: str | None) -> tuple[list[str], bool]:
    """The list items of the problems that flipped, each with its --diff command, and whether any is disputed."""
    items, any_disputed = [], False
    run = html.escape(str(eval_dir.parent.parent))
    chosen = f" --grader {html.escape(grader)}" if grader else ""
    for name in set_names(results):
        for r in results:
            c = r["sets"].get(name, {}).get("changes") or {}
            if c.get("vs_step") is None or not (c.get("learned") or c.get("forgotten")):
                continue
            disputed = c.get("disputed", [])
            any_disputed = any_disputed or bool(disputed)
            command = (
                ""
                if "average" in r  # --diff compares trained steps
                else f" <code>python -m evaluator.report {run} --name {html.escape(eval_dir.name)} --diff "
                f"{c['vs_step']} {r['step']} --set {html.escape(name)}{chosen}</code>"
            )
            items.append(
                f"<li>{html.escape(name)} step {c['vs_step']} &rarr; {html.escape(step_label(r))}: learned "
                f"{_marked(c['learned'], disputed)}, forgotten {_marked(c['forgotten'], disputed)}{command}</li>"
            )
    return items, any_disputed


def _html_verdicts(results: list[dict[str, Any]]) -> list[str]:
    return [
        f"<li class='{'signal' if c['paired'].distinguishable else 'noise'}'>{html.escape(name)} step {c['vs_step']} "
        f"&rarr; {html.escape(step_label(r))}: {html.escape(c['paired'].verdict())}</li>"
        for name in set_names(results)
        for r in results
        if (c := r["sets"].get(name, {}).get("changes") or {}).get("paired") is not None
    ]


def _html_sets(results: list[dict[str, Any]], best_by: dict[str, str]) -> str:
    """Per set: its best line, its grader audit line and its table."""
    return "".join(
        f"<h2>{html.escape(n)}</h2>"
        f"<p class='best'>{html.escape(best_choice(results, n, best_by.get(n, 'accuracy')) or '')}</p>"
        f"<p class='audit'>{html.escape(audit_line(results, n))}</p>{_html_table(results, n)}"
        for n in set_names(results)
    )


def write_html(
    panels: list[tuple[str, Any]],
    results: list[dict[str, Any]],
    eval_dir: Path,
    out: Path,
    title: str,
    best_by: dict[str, str],
    warnings: list[str] | None = None,
    grader: str | None = None,
) -> Path:
    flips, any_disputed = _html_flips(results, eval_dir, grader)
    figures = "".join(f"<figure>{_svg(t, d)}</figure>" for t, d in panels)
    warned = "".join(f"<p class='warning'>{html.escape(line)}</p>" for line in warnings or [])
    shown = f"<p>Grader: {html.escape(grader)} at every step shown (--grader).</p>" if grader else ""
    note = f"<p class='disputed'>{html.escape(DISPUTED_NOTE)}</p>" if any_disputed else ""
    verdicts = "".join(_html_verdicts(results))
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{STYLE}</style></head><body>
<h1>{html.escape(title)}</h1>
{warned}{shown}
<div class="grid">{figures}</div>
<h2>Changes between consecutive steps (paired, on the same problems)</h2><ul>{verdicts or "<li>none yet</li>"}</ul>
<h2>Problems that flipped</h2><ul>{"".join(flips) or "<li>none yet</li>"}</ul>{note}
{_html_sets(results, best_by)}
</body></html>
"""
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(page)
    tmp.replace(out)
    return out


def write_report(
    run_dir: Path,
    eval_name: str,
    results: list[dict[str, Any]],
    warnings: list[str] | None = None,
    grader: str | None = None,
) -> tuple[Path, Path]:
    """report.png and report.html in the evaluation's folder, from its `load_graded` (with `grader`:
    report.grader-<version>.png and .html, beside the original's)."""
    import matplotlib

    matplotlib.use("Agg")
    eval_dir = RunLayout(run_dir).eval_dir(eval_name)
    if not results:
        raise ValueError(f"{eval_dir}: no evaluation results yet")
    panels = _panels(results, load_train_log(run_dir))
    title = f"{run_dir.name} / {eval_name}" + (f" (grader {grader})" if grader else "")
    best_by = best_metrics(run_dir, set_names(results))
    stem = f"{REPORT_NAME}.grader-{grader}" if grader else REPORT_NAME
    png = write_png(panels, eval_dir / f"{stem}.png", title)
    return png, write_html(panels, results, eval_dir, eval_dir / f"{stem}.html", title, best_by, warnings, grader)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m evaluator.report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", help="run directory")
    parser.add_argument("--name", default="default", help="evaluation name (evaluation.name)")
    parser.add_argument("--diff", nargs=2, type=int, metavar=("STEP_A", "STEP_B"), help="problems that flipped")
    parser.add_argument("--set", default=None, help="with --diff: the evaluation set (default: the first)")
    parser.add_argument("--grader", default=None, metavar="VERSION", help="show this grader version's metrics")
    args = parser.parse_args(argv)
    run_dir = Path(args.run)
    eval_dir = RunLayout(run_dir).eval_dir(args.name)
    try:
        results, warnings = load_graded(eval_dir, args.grader)
        if not results:
            raise ValueError(f"{eval_dir}: no evaluation results")
        names = set_names(results)
        if args.diff:
            set_name = args.set or names[0]
            if set_name not in names:
                raise ValueError(f"--set {set_name}: no such set in {eval_dir} (sets: {', '.join(names)})")
            width = shutil.get_terminal_size((140, 40)).columns
            print(format_diff(eval_dir, set_name, *args.diff, width=width, results=results, grader=args.grader))
            return 0
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    if args.grader:
        print(f"grader {args.grader}: every step shown has that grader's metrics")
    print(format_table(results, best_metrics(run_dir, names)))
    for line in warnings:  # last, where the eye ends: the table above is read with them
        print(line)
    png, page = write_report(run_dir, args.name, results, warnings, args.grader)
    print(f"report: {page}\nfigure: {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
