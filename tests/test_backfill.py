"""The backfill promise, end to end on a CPU: the real demo (trainer and evaluator processes) with
evaluation.backfill on and an evaluator slower than the trainer evaluates every published step before it stops
the evaluator, or says which were left and why."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, service_env
from shared.protocol import Ledger, RunLayout, result_steps


def run_demo(config, *overrides: str, delay_s: float) -> tuple[subprocess.CompletedProcess, RunLayout]:
    proc = subprocess.run(
        [sys.executable, "-m", "demo", "--config", str(config), *overrides],
        cwd=REPO,
        env=service_env(MATH_SFT_FAULT_GENERATE_DELAY_S=str(delay_s)),
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, f"demo exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    (run_dir,) = (config.parent / "runs").iterdir()
    return proc, RunLayout(run_dir)


def _evaluated_out_of_order(eval_dir) -> bool:
    """Some step was evaluated after a later one: the evaluator passed it over and came back (the backfill case)."""
    times = [json.loads(path.read_text())["time"] for path in result_steps(eval_dir).values()]
    return times != sorted(times)


# The trainer publishes steps 0, 2, 4, 6 within seconds; each evaluation takes >= 2 s (one generate call), so
# the evaluator passes older steps over for newer ones and must come back for them.
BACKFILL = {"evaluation": {"backfill": True, "num_samples": 8}}


def test_the_demo_waits_until_backfill_evaluated_every_published_step(make_config):
    proc, layout = run_demo(make_config(BACKFILL), delay_s=2.0)
    eval_dir = layout.eval_dir("default")
    entries = Ledger(eval_dir).read()
    assert sorted(entries) == [0, 2, 4, 6], entries
    assert {step: e["status"] for step, e in entries.items()} == dict.fromkeys([0, 2, 4, 6], "done")
    assert sorted(result_steps(eval_dir)) == [0, 2, 4, 6]
    assert _evaluated_out_of_order(eval_dir), "the evaluator never passed a step over: the case is not tested"
    assert "backfill: waiting for the evaluation of step(s)" in proc.stdout
    assert "every published step was evaluated" in proc.stdout


@pytest.mark.slow  # ~20 s: a second demo run; the case above is the essential one
def test_a_step_retention_deleted_first_is_recorded_deleted_and_the_demo_says_so(make_config):
    # keep_last 1 and no room for unevaluated checkpoints: retention deletes the steps passed over at once.
    config = make_config({**BACKFILL, "training": {"keep_last": 1, "max_unevaluated": 0}})
    proc, layout = run_demo(config, delay_s=2.0)
    entries = Ledger(layout.eval_dir("default")).read()
    deleted = sorted(step for step, e in entries.items() if e["status"] == "deleted")
    assert deleted, f"retention deleted no unevaluated step: the case is not tested ({entries})"
    assert all(entries[step]["status"] in ("done", "deleted") for step in (0, 2, 4, 6)), entries
    assert "published step(s) left unevaluated" in proc.stderr
    for step in deleted:
        assert f"{step} (deleted: " in proc.stderr
