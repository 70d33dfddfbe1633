"""`make gpu-check`: on a machine with two GPUs, run the product for real and print pass/fail.

1. A fine-tune (trainer on GPU 0) with the evaluator on GPU 1 using vLLM: one engine, every later
   checkpoint reloaded in place, step 0 (the base model) and at least 4 more checkpoints evaluated on two
   sets with n > 1, pass@k and maj@k in the results and in W&B's offline files, accuracy rising; with
   evaluation.backfill, every published step evaluated (the demo waits for them; a FAIL names those left).
2. Reproducibility: the last checkpoint evaluated again by two fresh evaluator processes gives the same samples.
3. The GPU tests (`pytest -m gpu`): vLLM after an in-place reload generates what transformers generates.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from bench.common import REPO
from shared.config import load_config
from shared.launch import physical_gpu_count
from shared.logs import setup_logging


def samples_after_restart(config: str, run_dir, step: int) -> list[str]:
    """The last checkpoint evaluated by two fresh evaluator processes: each set's samples file, twice."""
    texts = []
    for out in ("again-1", "again-2"):
        ckpt = run_dir / "checkpoints" / f"step_{step:08d}"
        command = [
            sys.executable,
            "-m",
            "evaluator",
            "--config",
            config,
            "--ckpt",
            str(ckpt),
            "--out",
            str(run_dir / out),
        ]
        subprocess.run([*command, "wandb.mode=disabled"], cwd=REPO, check=True)
        texts.append("".join(p.read_text() for p in sorted((run_dir / out).glob(f"*/step_{step:08d}.samples.jsonl"))))
    return texts


def product_checks(config: str) -> list[tuple[str, bool, str]]:
    """The demo on `config` for real, and what its results, W&B's files and a restart must show."""
    from demo.__main__ import describe_steps, run_demo, unevaluated_steps
    from shared.tracking import read_wandb_rows

    checks = []
    layout, results = run_demo(config, [])
    loads = [r["load"] for r in results]
    steps = [r["step"] for r in results]
    checks.append(("step 0 and >= 4 checkpoints evaluated", steps[:1] == [0] and len(steps) >= 5, f"{steps}"))
    cfg = load_config(config)
    if cfg.evaluation.backfill:
        left = unevaluated_steps(cfg, layout)
        checks.append(("backfill: every published step evaluated", not left, describe_steps(left) or "all"))
    backends = {r["backend"] for r in results}
    checks.append(("vLLM backend", backends == {"vllm"}, ", ".join(sorted(backends))))
    checks.append(("one engine, weights swapped in place", loads.count("new-engine") == 1, ", ".join(loads)))
    sets = results[-1]["sets"]
    for name, r in sets.items():
        n = r["sampling"]["n"]
        keys = {f"pass@{n}", f"maj@{n}"}
        checks.append((f"{name}: n > 1, pass@k and maj@k", n > 1 and keys <= set(r["metrics"]), f"n={n}"))
    first = next(iter(sets))
    acc = [r["sets"][first]["metrics"]["accuracy"] for r in results]
    checks.append(("accuracy rises", acc[-1] >= acc[0] + 0.2, " -> ".join(f"{a:.2f}" for a in acc)))
    rows = read_wandb_rows(layout.eval_dir(cfg.evaluation.name) / "wandb")
    logged = {row["train_step"] for row in rows if any(k.startswith(f"eval/{first}/pass@") for k in row)}
    checks.append(("W&B offline files: pass@k of every step", logged == set(steps), f"{sorted(logged)}"))
    a, b = samples_after_restart(config, layout.run_dir, steps[-1])
    lines_a, lines_b = a.splitlines(), b.splitlines()
    same = sum(x == y for x, y in zip(lines_a, lines_b, strict=False)) / max(1, len(lines_a))
    checks.append(("same samples after an evaluator restart", same == 1.0, f"{same:.1%} of {len(lines_a)}"))
    return checks


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__)
    parser.add_argument("--config", default=str(REPO / "config" / "gpu-check.yaml"))
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args()
    setup_logging("gpu-check")  # the demo's lines (what it waits for, what was left) are log records
    gpus = physical_gpu_count()
    checks = [("two GPUs", gpus >= 2, f"{gpus} found")]
    if gpus >= 2:
        checks += product_checks(args.config)
    if not args.skip_tests:
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"], cwd=REPO, check=False
        )
        checks.append(("pytest -m gpu", proc.returncode == 0, f"exit {proc.returncode}"))
    print("\ngpu-check summary")
    for name, ok, detail in checks:
        print(f"  {'PASS' if ok else 'FAIL'}  {name}: {detail}")
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
