"""`make demo` (`python -m demo`): the trainer and the evaluator as two processes on one fresh run, then a report.

The evaluator starts first and watches; the trainer trains and publishes; when the trainer is done
the demo waits for the evaluation of the last checkpoint, stops the evaluator (SIGINT), prints the
accuracy table and writes a plot into the run directory. It orchestrates both services, so it lives
above them, not in `shared/` (which imports neither).

One terminal, one readable display: both services' lines come prefixed ([train], [eval]), their progress
bars off, and the training progress is one line every few seconds read from the trainer's log.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from shared.config import load_config
from shared.launch import UsageError, physical_gpu_count, run_main
from shared.protocol import Ledger, RunLayout, Status


def _gpu_overrides() -> list[str]:
    """One GPU: both services share it; none: both on CPU (the config's GPU lists are ignored)."""
    return ["evaluation.gpus=[0]"] if physical_gpu_count() == 1 else []


def _start(tag: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
    """Start a service whose every output line is printed whole, prefixed with its tag."""
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)

    def pump() -> None:
        for line in proc.stdout:
            print(f"[{tag}] {line.rstrip()}", flush=True)

    threading.Thread(target=pump, daemon=True).start()
    return proc


def _print_progress(log_path: Path, max_steps: int, done: threading.Event, every_s: float = 10.0) -> None:
    while not done.wait(every_s):
        try:
            last = json.loads(log_path.read_text().splitlines()[-1])
        except (OSError, IndexError, ValueError):
            continue
        print(
            f"[train] step {last['train_step']}/{max_steps}  loss {last['train/loss']:.4f}  "
            f"lr {last['train/lr']:.2e}  {last['train/tokens_per_s']:.0f} tok/s",
            flush=True,
        )


def run_demo(config: str | None, user_overrides: list[str]) -> tuple[RunLayout, list[dict]]:
    """Train and evaluate one fresh run with two processes; returns the run and its results."""
    run_name = f"{Path(config).stem if config else 'demo'}-{time.strftime('%Y%m%d-%H%M%S')}"
    overrides = [f"run_name={run_name}", *_gpu_overrides(), *user_overrides]
    cfg = load_config(config, overrides)  # validates before anything starts
    layout = RunLayout(cfg.run_dir)
    config_args = (["--config", config] if config else []) + overrides
    t0 = time.perf_counter()
    sets = ", ".join(
        f"{s.name} ({s.num_samples or 'all'} problems x {s.n} sample{'s' if s.n > 1 else ''})"
        for s in cfg.evaluation.eval_sets()
    )
    print(
        f"demo: run {cfg.run_dir}: {cfg.training.max_steps} steps, a checkpoint every {cfg.training.eval_every} "
        f"and at step 0; evaluation sets: {sets}"
    )
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    evaluator = _start("eval", [sys.executable, "-m", "evaluator", *config_args], env)
    done = threading.Event()
    progress = threading.Thread(
        target=_print_progress, args=(layout.run_dir / "train_log.jsonl", cfg.training.max_steps, done), daemon=True
    )
    try:
        trainer = _start("train", [sys.executable, "-m", "trainer", *config_args], env)
        progress.start()
        trainer.wait()
        done.set()
        if trainer.returncode != 0:
            raise UsageError(f"the trainer failed (exit {trainer.returncode}); see its output above")
        last = cfg.training.max_steps
        ledger = Ledger(layout.eval_dir(cfg.evaluation.name))
        print(f"demo: training done; waiting for the evaluation of step {last}")
        while ledger.read().get(last, {}).get("status") not in (Status.DONE, Status.FAILED):
            if evaluator.poll() is not None:
                raise UsageError(f"the evaluator exited ({evaluator.returncode}) before evaluating step {last}")
            time.sleep(0.2)
    finally:
        if evaluator.poll() is None:
            evaluator.send_signal(signal.SIGINT)
            try:
                evaluator.wait(60)
            except subprocess.TimeoutExpired:
                evaluator.kill()

    from evaluator.report import format_table, load_results, write_report

    results = load_results(layout.eval_dir(cfg.evaluation.name))
    print()
    print(format_table(results))
    png, page = write_report(layout.run_dir, cfg.evaluation.name, results)
    steps = [r["step"] for r in results]
    print(
        f"\nreport: {page}\nfigure: {png}\nrun:    {layout.run_dir}   (demo took {time.perf_counter() - t0:.0f}s)\n"
        "what changed between two checkpoints: "
        f"python -m evaluator.report {layout.run_dir} --diff {steps[0]} {steps[-1]}"
    )
    return layout, results


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__)
    parser.add_argument("--config", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    run_demo(args.config, args.overrides)
    return 0


if __name__ == "__main__":
    run_main(main, (ValueError, OSError))
