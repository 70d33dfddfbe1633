"""`make demo` (`python -m demo`): the trainer and the evaluator as two processes on one fresh run, then a report.

The evaluator starts first and watches; the trainer trains and publishes; when the trainer is done
the demo waits for the evaluation of the last checkpoint (with evaluation.backfill: of every published
checkpoint, bounded, see `wait_for_backfill`), stops the evaluator (SIGINT), says which published steps were
left unevaluated and why, prints the accuracy table and writes a plot into the run directory. It orchestrates
both services, so it lives above them, not in `shared/` (which imports neither).

One terminal, one readable display: both services' lines come prefixed ([train], [eval]), their progress
bars off, and the training progress is one line every few seconds read from the trainer's log.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from shared.config import Config, load_config
from shared.launch import UsageError, physical_gpu_count, run_main
from shared.protocol import Ledger, RunLayout, Status, list_ready_checkpoints

log = logging.getLogger(__name__)

WAITED_FOR = (Status.PENDING, Status.RUNNING)
"""Ledger statuses of a step that an evaluation with backfill still evaluates."""


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


def published_steps(layout: RunLayout, ledger: Ledger) -> dict[int, dict | None]:
    """Every step the trainer published, with this evaluation's ledger entry (None: never seen). A step is on
    disk (READY), or its entry says what became of it: retention records `deleted` in every evaluation's ledger
    for a step it removes before the evaluation finished it."""
    entries = ledger.read()
    steps = set(list_ready_checkpoints(layout.checkpoints_dir)) | set(entries)
    return {step: entries.get(step) for step in sorted(steps)}


def describe_steps(steps: dict[int, dict | None]) -> str:
    """'500 (pending: passed over for newer step 1500), 1000 (not seen yet)' for the given steps."""
    parts = []
    for step, entry in steps.items():
        if entry is None:
            parts.append(f"{step} (not seen by the evaluator yet)")
        else:
            reason = f": {entry['reason']}" if entry.get("reason") else ""
            parts.append(f"{step} ({entry['status']}{reason})")
    return ", ".join(parts)


def backfill_stall_s(cfg: Config) -> float:
    """How long the demo waits for backfill without any step's evaluation moving on: an engine start, one
    generate call up to its watchdog's limit, and two rescans (the evaluator's own bounds on one step)."""
    ec = cfg.evaluation
    return ec.engine_start_timeout_s + ec.generate_timeout_s + 2 * ec.rescan_s


def wait_for_backfill(cfg: Config, layout: RunLayout, evaluator: subprocess.Popen) -> None:
    """Wait until no published step is unseen, pending or running in the evaluation's ledger; bounded: it gives
    up (with a warning) after backfill_stall_s without a change, or when the evaluator exits."""
    ledger = Ledger(layout.eval_dir(cfg.evaluation.name))
    stall_s = backfill_stall_s(cfg)
    waiting_before, deadline = None, time.monotonic() + stall_s
    while True:
        steps = published_steps(layout, ledger)
        waiting = {s: e for s, e in steps.items() if e is None or e["status"] in WAITED_FOR}
        if not waiting:
            return
        if evaluator.poll() is not None:
            log.warning(
                "the evaluator exited (%s) with steps left to evaluate: %s",
                evaluator.returncode,
                describe_steps(waiting),
            )
            return
        statuses = {step: entry and entry["status"] for step, entry in waiting.items()}
        if statuses != waiting_before:  # a step moved on: the bound starts again
            log.info("backfill: waiting for the evaluation of step(s) %s", describe_steps(waiting))
            waiting_before, deadline = statuses, time.monotonic() + stall_s
        elif time.monotonic() > deadline:
            log.warning("backfill: no step's evaluation moved on for %.0fs; stopping the wait", stall_s)
            return
        time.sleep(0.2)


def _wait_for_evaluations(cfg: Config, layout: RunLayout, evaluator: subprocess.Popen) -> None:
    """With backfill, for every published step (wait_for_backfill); without, for the last one."""
    last = cfg.training.max_steps
    if cfg.evaluation.backfill:
        print("demo: training done; backfill is on: waiting for the evaluation of every published step")
        wait_for_backfill(cfg, layout, evaluator)
        return
    ledger = Ledger(layout.eval_dir(cfg.evaluation.name))
    print(f"demo: training done; waiting for the evaluation of step {last}")
    while ledger.read().get(last, {}).get("status") not in (Status.DONE, Status.FAILED):
        if evaluator.poll() is not None:
            raise UsageError(f"the evaluator exited ({evaluator.returncode}) before evaluating step {last}")
        time.sleep(0.2)


def unevaluated_steps(cfg: Config, layout: RunLayout) -> dict[int, dict | None]:
    """The published steps without a result of this evaluation, with their ledger entries (None: never seen)."""
    steps = published_steps(layout, Ledger(layout.eval_dir(cfg.evaluation.name)))
    return {step: entry for step, entry in steps.items() if entry is None or entry["status"] != Status.DONE}


def report_unevaluated(cfg: Config, layout: RunLayout) -> dict[int, dict | None]:
    """Say which published steps were left unevaluated and why (a warning when backfill promised them)."""
    left = unevaluated_steps(cfg, layout)
    if left:
        level = logging.WARNING if cfg.evaluation.backfill else logging.INFO
        why = "" if cfg.evaluation.backfill else " (backfill is off: passed-over steps are skipped)"
        log.log(level, "%d published step(s) left unevaluated%s: %s", len(left), why, describe_steps(left))
    elif cfg.evaluation.backfill:
        log.info("backfill: every published step was evaluated")
    return left


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
        target=_print_progress, args=(layout.train_log_file, cfg.training.max_steps, done), daemon=True
    )
    try:
        trainer = _start("train", [sys.executable, "-m", "trainer", *config_args], env)
        progress.start()
        trainer.wait()
        done.set()
        if trainer.returncode != 0:
            raise UsageError(f"the trainer failed (exit {trainer.returncode}); see its output above")
        _wait_for_evaluations(cfg, layout, evaluator)
    finally:
        if evaluator.poll() is None:
            evaluator.send_signal(signal.SIGINT)
            try:
                evaluator.wait(60)
            except subprocess.TimeoutExpired:
                evaluator.kill()
    report_unevaluated(cfg, layout)

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
    run_main(main, "demo")
