"""`python -m evaluator.report runs/x`: what a run learned, as a table, one PNG and one HTML page.

    python -m evaluator.report runs/x [--name default]        table; writes report.png and report.html
    python -m evaluator.report runs/x --diff 500 1000 [--set S] the paired difference between two steps, and
                                                                the problems learned and forgotten

The page holds train loss and learning rate, accuracy, pass@k and maj@k per set with their 95 % intervals as
bands, accuracy by token budget, accuracy by subject and level over steps (heatmaps), response length and
truncation, failure kinds, and the problems learned and forgotten between consecutive evaluations. Each step's
change from the step before is tested (paired, on the same problems) and marked when it is not distinguishable
from noise; the best step's score is given on the held-out part of a split set, or said to be chosen on the
set it is reported on. It is self-contained (inline SVG): mail it, open it offline.
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
from evaluator.metrics import FAILURE_KINDS, by_problem, changes, read_samples, result_sets
from shared.protocol import RunLayout, comparable_as, result_steps, samples_file

PAIRED_RESAMPLES = 2000
"""Bootstrap replicates of the report's paired comparisons (seeded: the same samples, the same verdict)."""

NOISE_MARK = "~"
"""Marks a step whose accuracy change from the line above is not distinguishable from noise."""


def paired_accuracy(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> stats.PairedComparison:
    """`after`'s accuracy minus `before`'s on the problems both have (stats.paired_comparison)."""
    old, new = by_problem(before), by_problem(after)
    common = sorted(set(old) & set(new))
    rewards = [[[s["reward"] for s in side[p]] for p in common] for side in (old, new)]
    return stats.paired_comparison(rewards[0], rewards[1], PAIRED_RESAMPLES, seed=0)


def load_results(eval_dir: Path) -> list[dict[str, Any]]:
    """The step result files of an evaluation, by step, with learned/forgotten counted again against the line
    above (each result records them against the nearest earlier step evaluated before it, which is another
    step when evaluations ran out of order: newest first, back-fill). Where the line above has no samples, or
    other problems or sampling, no counts are shown."""
    results = []
    for path in result_steps(eval_dir).values():
        try:
            results.append(json.loads(path.read_text()))
        except ValueError as exc:
            raise ValueError(f"{path}: not a readable result ({exc})") from None
    for name in set_names(results):
        previous = None  # (step, samples, comparable_as) of the set's line above
        for r in results:
            set_result = result_sets(r).get(name)
            if set_result is None:
                continue
            # The stored counts may be against another step (the evaluator's order): never shown as they are.
            set_result["changes"] = {"vs_step": None, "learned": [], "forgotten": []}
            for key in ("learned", "forgotten"):
                set_result["metrics"].pop(key, None)
            path = samples_file(eval_dir, name, r["step"])
            samples = read_samples(path) if path.is_file() else None
            key = comparable_as(set_result)
            if samples is not None and previous is not None and previous[2] == key:
                flips = changes(previous[1], samples)
                paired = paired_accuracy(previous[1], samples)
                set_result["changes"] = {"vs_step": previous[0], **flips, "paired": paired}
                set_result["metrics"].update(learned=len(flips["learned"]), forgotten=len(flips["forgotten"]))
            if "average" not in r:  # an averaged checkpoint is no step of the line: the next is compared past it
                previous = (r["step"], samples, key) if samples is not None else None
    return results


def load_train_log(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "train_log.jsonl"
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
        names += [n for n in result_sets(r) if n not in names]
    return names


def _series(results: list[dict[str, Any]], set_name: str, metric: str) -> tuple[list[int], list[float]]:
    """The metric over the trained steps (averaged checkpoints left out: they are drawn apart)."""
    steps, values = [], []
    for r in results:
        if "average" in r:
            continue
        value = result_sets(r).get(set_name, {}).get("metrics", {}).get(metric)
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


def best_choice(results: list[dict[str, Any]], set_name: str, metric: str) -> str | None:
    """Which step best/keep_best choose in the newest comparable results, and how far its score can be trusted:
    on the held-out part of a split set, else said to be chosen on the very problems it is reported on."""
    rows = [r for r in results if set_name in result_sets(r)]
    if not rows:
        return None
    newest = comparable_as(result_sets(rows[-1])[set_name])
    rows = [r for r in rows if comparable_as(result_sets(r)[set_name]) == newest]
    split = all(f"select/{metric}" in result_sets(r)[set_name]["metrics"] for r in rows)
    rank_key = f"select/{metric}" if split else metric
    scored = [
        (m[rank_key], r["step"], r)
        for r in rows
        if isinstance((m := result_sets(r)[set_name]["metrics"]).get(rank_key), (int, float))
    ]
    if not scored:
        return None
    value, _, chosen = max(scored, key=lambda t: (t[0], t[1]))
    m, label = result_sets(chosen)[set_name]["metrics"], step_label(chosen)
    if not split:
        return (
            f"best: step {label} by {metric} {value:.3f}{_interval(m, metric)}, chosen on the same "
            f"{m['num_problems']} problems it is reported on (optimistic; set select_fraction to hold problems out)"
        )
    return (
        f"best: step {label} by {metric} on the selection part ({m['select/num_problems']} problems): {value:.3f}; "
        f"held out ({m['heldout/num_problems']} problems, not used to choose): {m[f'heldout/{metric}']:.3f}"
        f"{_interval(m, f'heldout/{metric}')}"
    )


def _interval(metrics: dict[str, Any], name: str) -> str:
    low, high = metrics.get(f"{name}_ci_low"), metrics.get(f"{name}_ci_high")
    return f" [{low:.3f}, {high:.3f}]" if low is not None and high is not None else ""


def best_metrics(run_dir: Path, set_names_: list[str]) -> dict[str, str]:
    """The metric each set's best step is chosen by: training.keep_best's for its set, accuracy elsewhere."""
    chosen = dict.fromkeys(set_names_, "accuracy")
    try:
        saved = yaml.safe_load((RunLayout(run_dir).config_path).read_text()) or {}
        keep_best = saved["training"]["keep_best"]
        sets = list((saved["evaluation"].get("sets") or {"main": {}}).keys())
        chosen[keep_best.get("set") or sets[0]] = keep_best["metric"]
    except (OSError, KeyError, TypeError, IndexError, AttributeError, yaml.YAMLError):
        pass  # no saved config, or no keep_best: every set by accuracy
    return {name: metric for name, metric in chosen.items() if name in set_names_}


def _largest_n(results: list[dict[str, Any]], set_name: str) -> int:
    return max(result_sets(r)[set_name]["sampling"].get("n", 1) for r in results if set_name in result_sets(r))


# --------------------------------------------------------------------------------------------------
# Table


def format_table(results: list[dict[str, Any]], best_by: dict[str, str] | None = None) -> str:
    """A table per set; `best_by`: the metric each set's best step is chosen by (best_metrics), for its line."""
    blocks = []
    for name in set_names(results):
        n = _largest_n(results, name)
        sampled = [f"pass@{n}", f"maj@{n}"] if n > 1 else []
        head = ["step", "accuracy", "95% CI", *sampled, "format", "length", "trunc", "learned", "forgot", "vs prev"]
        # learned / forgot: problems that flipped since the step on the line above
        lines = [f"[{name}] n={n}", "  ".join(f"{h:>11}" for h in [*head, "top failure"])]
        for r in results:
            if name not in result_sets(r):
                continue
            m = result_sets(r)[name]["metrics"]
            failures = {k: m.get(f"failure_rate/{k}", 0.0) for k in FAILURE_KINDS}
            top = max(failures, key=failures.get)
            ci = f"{m['accuracy_ci_low']:.3f}-{m['accuracy_ci_high']:.3f}" if "accuracy_ci_low" in m else ""
            cells = [
                f"{step_label(r):>11}",
                f"{m['accuracy']:>11.3f}",
                f"{ci:>11}",
                *(f"{m.get(k, float('nan')):>11.3f}" for k in sampled),
                f"{m['format_rate']:>11.3f}",
                f"{m['mean_response_tokens']:>11.1f}",
                f"{m['truncation_rate']:>11.2f}",
                f"{m.get('learned', ''):>11}",
                f"{m.get('forgotten', ''):>11}",
                f"{_paired_cell(result_sets(r)[name]):>11}",
                f"{top} {failures[top]:.2f}" if failures[top] else "-",
            ]
            lines.append("  ".join(cells))
        lines.append(
            f"vs prev: accuracy minus the line above's on the same problems; {NOISE_MARK} = not distinguishable "
            f"from noise (p >= {stats.NOISE_P:g}: exact McNemar for n = 1, else paired bootstrap)"
        )
        note = best_choice(results, name, (best_by or {}).get(name, "accuracy"))
        lines += [note] if note else []
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


# --------------------------------------------------------------------------------------------------
# Per-problem changes between two steps


def read_set_samples(eval_dir: Path, set_name: str, step: int) -> list[dict[str, Any]]:
    path = samples_file(eval_dir, set_name, step)
    if not path.is_file():
        raise ValueError(f"{path}: no samples of set {set_name!r} at step {step} (evaluated steps: see the table)")
    return read_samples(path)


def _side_by_side(left: str, right: str, width: int) -> list[str]:
    col = (width - 3) // 2

    def wrapped(text: str) -> list[str]:
        return [w for para in text.splitlines() for w in (textwrap.wrap(para, col) or [""])]

    a, b = wrapped(left), wrapped(right)
    a += [""] * (len(b) - len(a))
    b += [""] * (len(a) - len(b))
    return [f"{x:<{col}} | {y}" for x, y in zip(a, b)]


def format_diff(eval_dir: Path, set_name: str, before: int, after: int, width: int = 140) -> str:
    old, new = read_set_samples(eval_dir, set_name, before), read_set_samples(eval_dir, set_name, after)
    flips = changes(old, new)
    old_by, new_by = by_problem(old), by_problem(new)
    out = [
        f"[{set_name}] step {before} -> step {after}: {paired_accuracy(old, new).verdict()}",
        (
            f"[{set_name}] step {before} -> step {after}: {len(flips['learned'])} learned, "
            f"{len(flips['forgotten'])} forgotten (a problem is solved when at least half its samples are right)"
        ),
    ]
    for change in ("learned", "forgotten"):
        for p in flips[change]:
            a, b = old_by[p], new_by[p]
            right_a, right_b = sum(s["reward"] == 1.0 for s in a), sum(s["reward"] == 1.0 for s in b)
            out += [
                "",
                f"== {change.upper()}: problem {p}   reference answer: {b[0]['ground_truth']}",
                *_side_by_side(
                    f"step {before} ({right_a}/{len(a)} right; sample 0, {a[0]['failure'] or 'right'}):",
                    f"step {after} ({right_b}/{len(b)} right; sample 0, {b[0]['failure'] or 'right'}):",
                    width,
                ),
                *_side_by_side(a[0]["response"], b[0]["response"], width),
            ]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------
# Figures


def _panels(results: list[dict[str, Any]], train_rows: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    """(title, draw(ax)) for each panel of the report, in reading order."""
    panels: list[tuple[str, Any]] = []
    if train_rows:

        def draw_train(ax):
            steps = [r["train_step"] for r in train_rows]
            ax.plot(steps, [r["train/loss"] for r in train_rows], color="tab:blue", lw=1)
            ax.set_ylabel("train loss", color="tab:blue")
            lr = ax.twinx()
            lr.plot(steps, [r["train/lr"] for r in train_rows], color="tab:orange", lw=1)
            lr.set_ylabel("learning rate", color="tab:orange")

        panels.append(("Training: loss and learning rate", draw_train))
    for name in set_names(results):
        n = _largest_n(results, name)

        def draw_acc(ax, name=name, n=n):
            for metric, style in (("accuracy", "o-"), (f"pass@{n}", "s--"), (f"maj@{n}", "^:")):
                steps, values = _series(results, name, metric)
                if values and (metric == "accuracy" or n > 1):
                    (line,) = ax.plot(steps, values, style, label=_curve_label(metric, n))
                    _band(ax, results, name, metric, line.get_color())
            _mark_noise(ax, results, name)
            averaged = [(r["step"], result_sets(r)[name]["metrics"]["accuracy"]) for r in _averaged(results, name)]
            if averaged:
                ax.plot(*zip(*averaged), "*", ms=9, color="tab:purple", label="averaged checkpoints (accuracy)")
            steps, values = _series(results, name, "format_rate")
            ax.plot(steps, values, "x-", color="grey", alpha=0.6, label="format rate")
            ax.set_ylim(-0.02, 1.02)
            ax.legend(fontsize=7, loc="best")

        panels.append((f"{name}: accuracy, pass@k, maj@k (bands: 95 % intervals)", draw_acc))
        if _budgets(results, name):
            panels.append(
                (
                    f"{name}: accuracy by token budget (the same generations, cut at b)",
                    partial(_draw_budgets, results, name),
                )
            )
        for field in _breakdown_fields(results, name):

            def draw_heat(ax, name=name, field=field):
                steps = [r["step"] for r in results if name in result_sets(r)]
                prefix = f"accuracy_by/{field}/"
                values = sorted(
                    {
                        k[len(prefix) :]
                        for r in results
                        for k in result_sets(r).get(name, {}).get("metrics", {})
                        if k.startswith(prefix)
                    },
                    key=_natural,
                )
                grid = [
                    [
                        result_sets(r)[name]["metrics"].get(prefix + v, float("nan"))
                        for r in results
                        if name in result_sets(r)
                    ]
                    for v in values
                ]
                image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
                ax.set_yticks(range(len(values)), values, fontsize=7)
                ax.set_xticks(range(len(steps)), [str(s) for s in steps], fontsize=7, rotation=45)
                ax.figure.colorbar(image, ax=ax, fraction=0.04)

            panels.append((f"{name}: accuracy by {field} over steps", draw_heat))

        def draw_length(ax, name=name):
            steps, lengths = _series(results, name, "mean_response_tokens")
            ax.plot(steps, lengths, "o-", color="tab:green")
            ax.set_ylabel("mean response tokens", color="tab:green")
            trunc = ax.twinx()
            steps, rates = _series(results, name, "truncation_rate")
            trunc.plot(steps, rates, "s--", color="tab:red")
            trunc.set_ylabel("truncation rate", color="tab:red")
            trunc.set_ylim(-0.02, 1.02)

        panels.append((f"{name}: response length and truncation", draw_length))

        def draw_failures(ax, name=name):
            steps = [r["step"] for r in results if name in result_sets(r)]
            x = range(len(steps))
            bottom = [0.0] * len(steps)
            for kind in FAILURE_KINDS:
                rates = [
                    result_sets(r)[name]["metrics"].get(f"failure_rate/{kind}", 0.0)
                    for r in results
                    if name in result_sets(r)
                ]
                ax.bar(x, rates, bottom=bottom, label=kind)
                bottom = [b + v for b, v in zip(bottom, rates)]
            ax.set_xticks(list(x), [str(s) for s in steps], fontsize=7, rotation=45)
            ax.set_ylim(0, 1)
            ax.legend(fontsize=6, ncol=3, loc="upper right")

        panels.append((f"{name}: why samples are wrong (share of samples)", draw_failures))

        def draw_flips(ax, name=name):
            steps, learned = _series(results, name, "learned")
            _, forgotten = _series(results, name, "forgotten")
            x = range(len(steps))
            ax.bar(x, learned, color="tab:green", label="learned")
            ax.bar(x, [-f for f in forgotten], color="tab:red", label="forgotten")
            ax.axhline(0, color="black", lw=0.5)
            ax.set_xticks(list(x), [str(s) for s in steps], fontsize=7, rotation=45)
            ax.legend(fontsize=7)

        panels.append((f"{name}: problems learned / forgotten since the previous evaluation", draw_flips))
    return panels


def _curve_label(metric: str, n: int) -> str:
    return metric if metric != "accuracy" else f"accuracy (mean@{n})"


def _averaged(results: list[dict[str, Any]], set_name: str) -> list[dict[str, Any]]:
    return [r for r in results if "average" in r and set_name in result_sets(r)]


def _band(ax, results: list[dict[str, Any]], set_name: str, metric: str, color: str) -> None:
    """The metric's 95 % interval at each step, shaded."""
    steps, lows = _series(results, set_name, f"{metric}_ci_low")
    _, highs = _series(results, set_name, f"{metric}_ci_high")
    if lows and len(lows) == len(highs):
        ax.fill_between(steps, lows, highs, color=color, alpha=0.18, lw=0)


def _mark_noise(ax, results: list[dict[str, Any]], set_name: str) -> None:
    """A hollow grey ring on each step whose accuracy change from the step before is within the noise."""
    noise = [
        (r["step"], result_sets(r)[set_name]["metrics"]["accuracy"])
        for r in results
        if "average" not in r
        and set_name in result_sets(r)
        and (paired := (result_sets(r)[set_name].get("changes") or {}).get("paired")) is not None
        and not paired.distinguishable
    ]
    if noise:
        ax.plot(*zip(*noise), "o", ms=11, mfc="none", mec="grey", label="change from the step before: noise")


def _budgets(results: list[dict[str, Any]], set_name: str) -> list[int]:
    prefix = "accuracy_at_budget/"
    return sorted(
        {
            int(k[len(prefix) :])
            for r in results
            for k in result_sets(r).get(set_name, {}).get("metrics", {})
            if k.startswith(prefix)
        }
    )


def _draw_budgets(results: list[dict[str, Any]], set_name: str, ax) -> None:
    """Accuracy against the token budget, one line per step: the first, the last and up to 4 between."""
    rows = [r for r in results if "average" not in r and set_name in result_sets(r)]
    rows = [rows[i] for i in sorted({round(i * (len(rows) - 1) / 5) for i in range(6)})] if len(rows) > 6 else rows
    for r in rows:
        metrics = result_sets(r)[set_name]["metrics"]
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
        for k in result_sets(r).get(set_name, {}).get("metrics", {})
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
    for ax, (panel_title, draw) in zip(axes.flat, panels):
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


def _html_table(results: list[dict[str, Any]], name: str) -> str:
    n = _largest_n(results, name)
    metrics = ["accuracy", "accuracy_ci_low", "accuracy_ci_high", *([f"pass@{n}", f"maj@{n}"] if n > 1 else [])]
    metrics += ["format_rate", "mean_response_tokens"]
    metrics += ["truncation_rate", "accuracy_truncated", "accuracy_completed", "learned", "forgotten"]
    metrics += [f"failure_rate/{k}" for k in FAILURE_KINDS]
    head = "".join(f"<th>{html.escape(m)}</th>" for m in ["step", *metrics, "vs prev (accuracy)"])
    rows = []
    for r in results:
        if name not in result_sets(r):
            continue
        m = result_sets(r)[name]["metrics"]
        cells = "".join(
            f"<td>{m[k]:.3f}</td>" if isinstance(m.get(k), float) else f"<td>{'' if m.get(k) is None else m[k]}</td>"
            for k in metrics
        )
        paired = (result_sets(r)[name].get("changes") or {}).get("paired")
        verdict = "" if paired is None else html.escape(_paired_cell(result_sets(r)[name]))
        noise = paired is not None and not paired.distinguishable
        title = f" title='{html.escape(paired.verdict())}'" if paired is not None else ""
        paired_td = f"<td class='{'noise' if noise else 'signal'}'{title}>{verdict}{' noise' if noise else ''}</td>"
        rows.append(f"<tr><td>{html.escape(step_label(r))}</td>{cells}{paired_td}</tr>")
    return f"<div class='wide'><table><tr>{head}</tr>{''.join(rows)}</table></div>"


def write_html(
    panels: list[tuple[str, Any]],
    results: list[dict[str, Any]],
    eval_dir: Path,
    out: Path,
    title: str,
    best_by: dict[str, str],
) -> Path:
    flips = []
    for name in set_names(results):
        for r in results:
            c = result_sets(r).get(name, {}).get("changes") or {}
            if c.get("vs_step") is not None and (c.get("learned") or c.get("forgotten")):
                flips.append(
                    f"<li>{html.escape(name)} step {c['vs_step']} &rarr; {r['step']}: learned {c['learned']}, "
                    f"forgotten {c['forgotten']} <code>python -m evaluator.report "
                    f"{html.escape(str(eval_dir.parent.parent))}"
                    f" --name {html.escape(eval_dir.name)} --diff {c['vs_step']} {r['step']} --set {html.escape(name)}"
                    "</code></li>"
                )
    figures = "".join(f"<figure>{_svg(t, d)}</figure>" for t, d in panels)
    tables = "".join(
        f"<h2>{html.escape(n)}</h2><p class='best'>{html.escape(best_choice(results, n, best_by.get(n, 'accuracy')) or '')}"
        f"</p>{_html_table(results, n)}"
        for n in set_names(results)
    )
    verdicts = [
        f"<li class='{'signal' if c['paired'].distinguishable else 'noise'}'>{html.escape(name)} step {c['vs_step']} "
        f"&rarr; {r['step']}: {html.escape(c['paired'].verdict())}</li>"
        for name in set_names(results)
        for r in results
        if (c := result_sets(r).get(name, {}).get("changes") or {}).get("paired") is not None
    ]
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
.grid {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: 0.8em; }}
figure {{ margin: 0; border: 1px solid #ddd; border-radius: 6px; padding: 4px; }}
figure svg {{ width: 100%; height: auto; }}
table {{ border-collapse: collapse; font-size: 12px; margin-bottom: 1em; }}
td, th {{ border: 1px solid #ccc; padding: 2px 6px; text-align: right; }}
code {{ font-size: 11px; }}
.wide {{ overflow-x: auto; }}
.noise {{ color: #888; }}
.signal {{ font-weight: bold; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<div class="grid">{figures}</div>
<h2>Changes between consecutive steps (paired, on the same problems)</h2><ul>{"".join(verdicts) or "<li>none yet</li>"}</ul>
<h2>Problems that flipped</h2><ul>{"".join(flips) or "<li>none yet</li>"}</ul>
{tables}
</body></html>
"""
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(page)
    tmp.replace(out)
    return out


def write_report(run_dir: Path, eval_name: str, results: list[dict[str, Any]]) -> tuple[Path, Path]:
    """report.png and report.html in the evaluation's folder, from its `load_results`."""
    import matplotlib

    matplotlib.use("Agg")
    eval_dir = RunLayout(run_dir).eval_dir(eval_name)
    if not results:
        raise ValueError(f"{eval_dir}: no evaluation results yet")
    panels = _panels(results, load_train_log(run_dir))
    title = f"{run_dir.name} / {eval_name}"
    best_by = best_metrics(run_dir, set_names(results))
    return write_png(panels, eval_dir / "report.png", title), write_html(
        panels, results, eval_dir, eval_dir / "report.html", title, best_by
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m evaluator.report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", help="run directory")
    parser.add_argument("--name", default="default", help="evaluation name (evaluation.name)")
    parser.add_argument("--diff", nargs=2, type=int, metavar=("STEP_A", "STEP_B"), help="problems that flipped")
    parser.add_argument("--set", default=None, help="with --diff: the evaluation set (default: the first)")
    args = parser.parse_args()
    run_dir = Path(args.run)
    eval_dir = RunLayout(run_dir).eval_dir(args.name)
    try:
        results = load_results(eval_dir)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    if not results:
        raise SystemExit(f"error: {eval_dir}: no evaluation results")
    if args.diff:
        names = set_names(results)
        set_name = args.set or names[0]
        if set_name not in names:
            raise SystemExit(f"error: --set {set_name}: no such set in {eval_dir} (sets: {', '.join(names)})")
        try:
            print(format_diff(eval_dir, set_name, *args.diff, width=shutil.get_terminal_size((140, 40)).columns))
        except ValueError as exc:
            raise SystemExit(f"error: {exc}") from None
        return 0
    print(format_table(results, best_metrics(run_dir, set_names(results))))
    png, page = write_report(run_dir, args.name, results)
    print(f"report: {page}\nfigure: {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
