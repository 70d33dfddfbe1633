"""`make gpu-check`: on a machine with two GPUs, run the product for real and print pass/fail.

1. A fine-tune (trainer on GPU 0) with the evaluator on GPU 1 using vLLM: one engine, every later
   checkpoint reloaded in place, accuracy rising across at least 5 checkpoints.
2. The GPU tests (`pytest -m gpu`): vLLM after an in-place reload generates what transformers generates.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from bench.common import REPO
from shared.launch import physical_gpu_count


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__)
    parser.add_argument("--config", default=str(REPO / "config" / "gpu-check.yaml"))
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args()
    checks: list[tuple[str, bool, str]] = []
    gpus = physical_gpu_count()
    checks.append(("two GPUs", gpus >= 2, f"{gpus} found"))
    if gpus >= 2:
        from demo.__main__ import run_demo

        layout, results = run_demo(args.config, [])
        loads = [r["load"] for r in results]
        acc = [r["metrics"]["accuracy"] for r in results]
        checks.append((">= 5 checkpoints evaluated", len(results) >= 5, f"{len(results)}"))
        checks.append(
            (
                "vLLM backend",
                all(r["backend"] == "vllm" for r in results),
                ", ".join(sorted({r["backend"] for r in results})),
            )
        )
        checks.append(("one engine, weights swapped in place", loads.count("new-engine") == 1, ", ".join(loads)))
        checks.append(
            ("accuracy rises", len(acc) >= 2 and acc[-1] >= acc[0] + 0.2, " -> ".join(f"{a:.2f}" for a in acc))
        )
    if not args.skip_tests:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"], cwd=REPO)
        checks.append(("pytest -m gpu", proc.returncode == 0, f"exit {proc.returncode}"))
    print("\ngpu-check summary")
    for name, ok, detail in checks:
        print(f"  {'PASS' if ok else 'FAIL'}  {name}: {detail}")
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
