"""`python -m evaluator.report runs/x [--name default]`: table and plot of a run's evaluation results."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from shared.protocol import RunLayout, parse_step


def load_results(eval_dir: Path) -> list[dict[str, Any]]:
    results = []
    for path in sorted(eval_dir.glob("step_*.json")):
        if parse_step(path.stem) is not None:
            results.append(json.loads(path.read_text()))
    return sorted(results, key=lambda r: r["step"])


def format_table(results: list[dict[str, Any]]) -> str:
    lines = [f"{'step':>8}  {'accuracy':>8}  {'format':>6}  {'answer acc':>10}  {'seconds':>7}"]
    for r in results:
        m = r["metrics"]
        lines.append(
            f"{r['step']:>8}  {m['accuracy']:>8.3f}  {m['format_rate']:>6.3f}  {m['answer_accuracy']:>10.3f}  {r['timings_s']['total']:>7.2f}"
        )
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in results]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    ax.plot(steps, [r["metrics"]["accuracy"] for r in results], marker="o", label="accuracy (held out)")
    ax.plot(steps, [r["metrics"]["format_rate"] for r in results], marker="s", linestyle="--", label="format rate")
    ax.set_xlabel("training step")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(out.parent.parent.parent.name if out.parent.parent.name == "eval" else "evaluation")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluator.report", description=__doc__)
    parser.add_argument("run", help="run directory")
    parser.add_argument("--name", default="default", help="evaluation name (evaluation.name)")
    args = parser.parse_args()
    eval_dir = RunLayout(Path(args.run)).eval_dir(args.name)
    results = load_results(eval_dir)
    if not results:
        raise SystemExit(f"error: no results in {eval_dir}")
    print(format_table(results))
    print(f"plot: {plot(results, eval_dir / 'accuracy.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
