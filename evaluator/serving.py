"""Serving a run: watch (or scan once), claim, evaluate, record.

Invariants: a step is evaluated only under this process's running claim in the ledger (evaluator.scheduler);
its outcome is recorded through evaluator.recording; a stop gives the claim back (pending, first in line).
"""

from __future__ import annotations

import functools
import logging
import os
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from evaluator.averaging import AverageWindow, average_window, evaluate_average
from evaluator.backends import EngineError
from evaluator.evaluation import Evaluator, summary_line
from evaluator.recording import (
    record,
    record_deleted,
    record_failure,
    record_transient_failure,
    relog_unlogged,
)
from evaluator.scheduler import Claim, claim_next, give_back
from evaluator.snapshot import (
    CheckpointDeleted,
    remove_orphan_snapshots,
    remove_snapshot,
    snapshot_dir,
    take_snapshot,
)
from evaluator.stopping import Stop
from evaluator.watcher import CheckpointWatcher
from shared.config import Config
from shared.protocol import (
    READY,
    BestRule,
    CheckpointInvalid,
    ClaimLost,
    Ledger,
    Liveness,
    Presence,
    RunLayout,
    ready_weights_ids,
    update_best,
)

log = logging.getLogger(__name__)

_FAULT_PRESENCE_ENV = "MATH_SFT_FAULT_PRESENCE_WRITE_FAILS"
"""Tests: when set, the first presence write after a result is recorded raises OSError (as a full disk would)."""


def check_run_dir(run_dir: Path) -> RunLayout:
    """A run folder is one the trainer made: it has its config or its checkpoints folder."""
    layout = RunLayout(run_dir)
    if not layout.config_path.is_file() and not layout.checkpoints_dir.is_dir():
        raise CheckpointInvalid(
            f"{run_dir}: not a run folder (no config.yaml and no checkpoints/); "
            "start the trainer first, or check the path"
        )
    return layout


def _say_claimed(claim: Claim) -> None:
    for older, status in sorted(claim.passed_over.items()):
        log.info("step %d: %s (passed over for newer step %d)", older, status, claim.step)
    if claim.interrupted:
        log.info("step %d: evaluating again (the evaluator that had it was stopped, failed or died)", claim.step)
    if claim.replaced:
        log.info("step %d: its folder holds new weights since it was last seen; evaluating them", claim.step)
    if claim.reconfigured:
        log.info("step %d: evaluated under another evaluation config (eval_config_id); evaluating it again", claim.step)


def advance(presence: Presence | None, what: str, step: int | None = None) -> None:
    """Tell the presence record the work advanced. A failed write is a warning, never a lost result: it only
    makes this evaluator look stale to others for a while (who may then take its claim; the ledger fences that)."""
    if presence is None:
        return
    try:
        if _FAULT_PRESENCE_ENV in os.environ and what.startswith("recorded"):
            os.environ.pop(_FAULT_PRESENCE_ENV)
            raise OSError(f"cannot write the presence record ({_FAULT_PRESENCE_ENV})")
        presence.progress(what, step)
    except Exception as exc:  # noqa: BLE001 - a presence write must not undo work already recorded
        log.warning("presence of %s: not advanced (%s): %s", what, type(exc).__name__, exc)


def serve_run(cfg: Config, layout: RunLayout, evaluator: Evaluator, *, once: bool, force: bool) -> int:
    ec = cfg.evaluation
    ledger = Ledger(layout.eval_dir(ec.name))
    presence = Presence(
        layout, ec.name, watching=not once, backfill=ec.backfill, timeout_s=ec.heartbeat_timeout_s
    ).start()
    alive = Liveness(layout, ec.heartbeat_timeout_s, evaluator.owner_id).alive
    window = average_window(cfg, ledger.path.parent)  # None unless evaluation.average is set
    watcher = None
    counts = {"evaluated": 0, "failed": 0}
    try:
        for path in remove_orphan_snapshots(ledger, alive):
            log.info("removed %s (left by an evaluator that is gone)", path)
        forced = frozenset(ready_weights_ids(layout.checkpoints_dir)) if force else frozenset()
        if not once:
            layout.checkpoints_dir.mkdir(parents=True, exist_ok=True)
            watcher = CheckpointWatcher(layout.checkpoints_dir, ec.observer)
            log.info("evaluator: watching %s (%s; rescan every %gs)", layout.checkpoints_dir, watcher.kind, ec.rescan_s)
        while True:
            relog_unlogged(ledger, evaluator, alive)  # the logging duty of evaluators that are gone
            ready = ready_weights_ids(layout.checkpoints_dir)
            claim = claim_next(
                ledger,
                ready,
                alive=alive,
                backfill=ec.backfill,
                newest_first=not once,
                force=forced,
                is_ready=lambda step: (layout.checkpoint_dir(step) / READY).exists(),
                config_id=evaluator.config_id,
                max_attempts=ec.max_attempts,
            )
            if claim is None:
                if once:
                    log.info(
                        "evaluator: %s: %s; evaluated %d now, %d failed",
                        *(layout.run_dir, summarize(ledger, ready), counts["evaluated"], counts["failed"]),
                    )
                    return 0
                watcher.wait(ec.rescan_s)
                continue
            forced -= {claim.step}
            _say_claimed(claim)
            ok = _evaluate_claimed(layout, ledger, evaluator, presence, claim, window)
            counts["evaluated" if ok else "failed"] += 1
    except Stop:
        log.info("evaluator: stopped")
        return 0
    finally:
        if watcher is not None:
            watcher.stop()
        try:
            presence.stop()
        except OSError as exc:  # what was recorded stays recorded; others see this evaluator gone later
            log.warning("presence %s: not removed: %s", presence.path, exc)


def summarize(ledger: Ledger, ready: dict[int, str]) -> str:
    entries = ledger.read()
    by_status: dict[str, int] = defaultdict(int)
    for entry in entries.values():
        by_status[entry["status"]] += 1
    parts = ", ".join(f"{n} {status}" for status, n in sorted(by_status.items()))
    return f"{len(ready)} checkpoint(s) on disk; ledger: {parts or 'empty'}"


def evaluate_snapshot(
    ckpt_dir: Path,
    ledger: Ledger,
    evaluator: Evaluator,
    presence: Presence | None,
    step: int,
    weights: str,
    window: AverageWindow | None = None,
) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """Snapshot the claimed checkpoint into the evaluation's folder (verified: the weights claimed), evaluate it
    from there and remove the snapshot, whatever happens: (result, samples). Retention may delete the published
    folder meanwhile; the result still names the published folder and the weights it had. With an averaging
    `window`, the evaluated snapshot's files join it (linked) before the snapshot goes."""
    eval_dir = ledger.path.parent
    t0 = time.perf_counter()
    snapshot = take_snapshot(ckpt_dir, eval_dir, step, weights)
    try:
        verify_s = time.perf_counter() - t0
        advance(presence, f"step {step} snapshot", step)
        progress = functools.partial(advance, presence, step=step)
        result, samples = evaluator.evaluate(step, snapshot, weights, eval_dir, progress)
        if window is not None:
            window.add(step, weights, snapshot)
    finally:
        remove_snapshot(snapshot)
    result["checkpoint"] = str(ckpt_dir)
    result["timings_s"]["verify"] = verify_s
    return result, samples


def record_exception(ledger: Ledger, evaluator: Evaluator, step: int, ckpt_dir: Path, exc: Exception) -> None:
    """Deleted (the snapshot could not be taken); failed (the checkpoint is bad: it would fail again); else a
    transient failure (engine, memory, grader workers, a hung generation), tried again up to max_attempts.
    Reasons name the published folder, not the snapshot it was loaded from."""
    snapshots = str(snapshot_dir(ledger.path.parent, step, "")).rstrip("-")
    message = re.sub(re.escape(snapshots) + r"-[0-9a-f]+", str(ckpt_dir), str(exc))
    if isinstance(exc, CheckpointDeleted):
        record_deleted(ledger, evaluator, step, message)
    elif isinstance(exc, CheckpointInvalid):
        record_failure(ledger, evaluator, step, message)
    elif isinstance(exc, EngineError):
        record_transient_failure(ledger, evaluator, step, message)
    else:
        record_transient_failure(ledger, evaluator, step, f"{ckpt_dir}: {type(exc).__name__}: {message}")


def _evaluate_claimed(
    layout: RunLayout,
    ledger: Ledger,
    evaluator: Evaluator,
    presence: Presence,
    claim: Claim,
    window: AverageWindow | None,
) -> bool:
    """Evaluate a claimed step and record the outcome, then the average it completes, if any; True if the
    step's results were recorded."""
    step = claim.step
    ckpt_dir = layout.checkpoint_dir(step)
    advance(presence, f"step {step} claimed", step)
    try:
        result, samples = evaluate_snapshot(ckpt_dir, ledger, evaluator, presence, step, claim.weights_id, window)
    except (Stop, KeyboardInterrupt):
        give_back(ledger, step, evaluator.owner_id)  # pending, first in line for the next evaluator
        raise
    except Exception as exc:  # noqa: BLE001 - a bad checkpoint (or an engine failure) must not stop the service
        record_exception(ledger, evaluator, step, ckpt_dir, exc)
        return False
    try:
        record(ledger, evaluator, step, result, samples)
    except ClaimLost as exc:
        log.info("%s", exc)
        return False
    advance(presence, f"recorded step {step}", step)
    log.info("%s", summary_line(result))
    point_best(evaluator.cfg, layout)
    if window is not None:
        evaluate_average(evaluator, window, ledger.path.parent, step)
        advance(presence, f"averaged up to step {step}", step)
    return True


def point_best(cfg: Config, layout: RunLayout) -> None:
    """With training.keep_best, runs/<run>/best follows the results as they come (not only the trainer's saves)."""
    best = BestRule.of(cfg)
    if best is None:
        return
    try:
        step = update_best(layout, best)
    except Exception as exc:  # noqa: BLE001 - a pointer must not stop the evaluation service
        log.warning("could not update %s: %s: %s", layout.best_path, type(exc).__name__, exc)
        return
    if step is not None:
        log.info("best: step %d by %s %s (%s)", step, best.set_name, best.metric, layout.best_path)
