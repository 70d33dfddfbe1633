"""Recording: the one path from a finished evaluation to results on disk, the ledger and W&B.

Invariants: a result is recorded only by the owner of the step's running claim, checked under the
ledger lock, and the result files are written under that same lock before the entry says `done`;
samples are written before metrics. W&B is logged by whoever holds the entry's `log_owner` (the
recorder, or after a crash the one evaluator that takes it over) and `logged` is set once W&B's
service has written the row to its file. After a crash between those two, the evaluator that takes the
duty over reads W&B's files: a row already there (same train_step and weights_id) is marked, not logged
again; one that is not is logged, with its samples and flips tables read back from the result files. Any
evaluator of the evaluation takes the duty over, at its start and at each rescan, from an owner that is not alive
(`Liveness`). So each result is logged exactly once, as far as W&B's files under the evaluation's folder tell
(where they cannot be read, at least once, never lost). Results of another evaluation config are moved aside to
superseded/<config id>/ under the ledger lock before the new ones are written.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from evaluator.audit import write_disagreements
from evaluator.evaluation import Evaluator
from evaluator.metrics import read_samples
from evaluator.scheduler import give_back_failed, holds_claim
from evaluator.stopping import stop_deferred
from shared.protocol import (
    SUPERSEDED_DIRNAME,
    ClaimLost,
    Ledger,
    Status,
    atomic_write_bytes,
    atomic_write_json,
    result_file,
    samples_file,
)

log = logging.getLogger(__name__)


def _superseded_files(eval_dir: Path, step: int) -> list[Path]:
    """The result files of `step` (every set's, then the step's own: the order they are written in)."""
    name = result_file(eval_dir, step).name[: -len(".json")]
    sets = [p for d in sorted(eval_dir.iterdir()) if d.is_dir() for p in sorted(d.glob(f"{name}.*"))]
    return [*sets, result_file(eval_dir, step)]


def move_superseded(eval_dir: Path, step: int, config_id: str) -> Path | None:
    """Results of `step` measured under another evaluation config are moved (not lost) to
    superseded/<their config id>/, same names, before this config's results take their place. Their folder."""
    try:
        before = json.loads(result_file(eval_dir, step).read_text()).get("eval_config_id") or "unknown"
    except (OSError, ValueError):
        return None  # none (or unreadable: replaced as after any interrupted recording)
    if before == config_id:
        return None
    aside = eval_dir / SUPERSEDED_DIRNAME / before
    for path in _superseded_files(eval_dir, step):
        target = aside / path.relative_to(eval_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        path.replace(target)
    return aside


def write_result(eval_dir: Path, result: dict[str, Any], samples: dict[str, list[dict[str, Any]]]) -> Path:
    """Per set its samples, then its result; the step's result file last: it implies all the others exist."""
    step = result["step"]
    for set_name, set_samples in samples.items():
        (eval_dir / set_name).mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(
            samples_file(eval_dir, set_name, step), "".join(json.dumps(s) + "\n" for s in set_samples).encode()
        )
        write_disagreements(eval_dir, set_name, step, set_samples)
        set_result = {k: result[k] for k in ("checkpoint", "weights_id", "eval_name", "time")}
        atomic_write_json(result_file(eval_dir, step, set_name), {**result["sets"][set_name], **set_result})
    atomic_write_json(result_file(eval_dir, step), result)
    return result_file(eval_dir, step)


def record(
    ledger: Ledger, evaluator: Evaluator, step: int, result: dict[str, Any], samples: dict[str, list[dict[str, Any]]]
) -> None:
    eval_dir = ledger.path.parent

    def commit(entries: dict[int, dict[str, Any]]) -> Path | None:
        entry = entries.get(step, {})
        if not holds_claim(entry, evaluator.owner_id):
            raise ClaimLost(
                f"step {step}: result discarded: this evaluator no longer holds the step "
                f"(now {entry.get('status', 'unclaimed')}; its heartbeat went stale and another evaluator took it)"
            )
        aside = move_superseded(eval_dir, step, result["eval_config_id"])
        result_path = write_result(eval_dir, result, samples)
        entries[step] = {
            "status": Status.DONE,
            "time": time.time(),
            "weights_id": result["weights_id"],
            "eval_config_id": result["eval_config_id"],
            "attempts": entry.get("attempts", 1),
            **({"failed_attempts": entry["failed_attempts"]} if entry.get("failed_attempts") else {}),
            "checkpoint": result["checkpoint"],
            "result": str(result_path),
            "logged": False,
            "log_owner": entry["owner"],
        }
        return aside

    with stop_deferred():
        aside = ledger.update(commit)
        if aside is not None:
            log.info("step %d: results of another evaluation config moved to %s", step, aside)
        log_once(ledger, evaluator, step, result, samples)


def _end_claim(ledger: Ledger, evaluator: Evaluator, step: int, status: str, reason: str) -> bool:
    def commit(entries: dict[int, dict[str, Any]]) -> bool:
        entry = entries.get(step, {})
        if not holds_claim(entry, evaluator.owner_id):
            return False
        entries[step] = {**entry, "status": status, "time": time.time(), "reason": reason}
        return True

    return ledger.update(commit)


def record_failure(ledger: Ledger, evaluator: Evaluator, step: int, reason: str) -> None:
    """A deterministic failure (the checkpoint does not verify): failed at once, it would fail again."""
    if _end_claim(ledger, evaluator, step, Status.FAILED, reason):
        log.info("step %d: not evaluated: %s", step, reason)
    else:
        log.info("step %d: failure not recorded (this evaluator no longer holds the step): %s", step, reason)


def record_deleted(ledger: Ledger, evaluator: Evaluator, step: int, reason: str) -> None:
    """The checkpoint was deleted (retention) before the snapshot held it: `deleted`, never a result."""
    if _end_claim(ledger, evaluator, step, Status.DELETED, reason):
        log.info("step %d: deleted: %s", step, reason)


def record_transient_failure(ledger: Ledger, evaluator: Evaluator, step: int, reason: str) -> None:
    """A failure that another attempt may not meet (engine, memory, grader workers): given back, the attempt and
    its reason in the ledger, until evaluation.max_attempts; then failed."""
    max_attempts = evaluator.cfg.evaluation.max_attempts
    status = give_back_failed(ledger, step, evaluator.owner_id, reason, max_attempts)
    if status == Status.PENDING:
        log.warning("step %d: attempt failed, to be tried again: %s", step, reason)
    elif status == Status.FAILED:
        log.warning("step %d: not evaluated: %d attempts failed; the last: %s", step, max_attempts, reason)
    else:
        log.info("step %d: failure not recorded (this evaluator no longer holds the step): %s", step, reason)


# -- W&B ---------------------------------------------------------------------------------------


def log_once(
    ledger: Ledger,
    evaluator: Evaluator,
    step: int,
    result: dict[str, Any],
    samples: dict[str, list[dict[str, Any]]] | None,
) -> None:
    def still_mine(entries: dict[int, dict[str, Any]]) -> bool:
        entry = entries.get(step) or {}
        return (
            entry.get("status") == Status.DONE
            and not entry.get("logged")
            and entry.get("log_owner", {}).get("id") == evaluator.owner_id
        )

    if not ledger.update(still_mine):  # frozen meanwhile, and another evaluator took the logging over
        log.info("step %d: not logged here: another evaluator took over logging it", step)
        return
    evaluator.log(result, samples)
    if evaluator.tracker is not None:
        evaluator.tracker.wait_durable()  # `logged` is set only once W&B's file holds the row
    mark_logged(ledger, step, result["weights_id"])


def mark_logged(ledger: Ledger, step: int, weights: str) -> None:
    def mark(entries: dict[int, dict[str, Any]]) -> None:
        entry = entries.get(step)
        if entry and entry["status"] == Status.DONE and entry.get("weights_id") == weights:
            entries[step] = {**{k: v for k, v in entry.items() if k != "log_owner"}, "logged": True}

    ledger.update(mark)


def _samples_on_disk(eval_dir: Path, step: int, result: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Each set's samples of a recorded result, read back (a set whose file cannot be read is named and left out:
    its row is logged without its tables)."""
    found = {}
    for name in result["sets"]:
        try:
            found[name] = read_samples(samples_file(eval_dir, name, step))
        except (OSError, ValueError) as exc:
            log.warning("step %d, set %s: samples not logged (%s)", step, name, exc)
    return found


def relog_unlogged(ledger: Ledger, evaluator: Evaluator, alive: Callable[[dict[str, Any]], bool]) -> None:
    """Another evaluator wrote results but died (or froze) before logging them: take over the logging duty of
    each such step (under the lock: of two evaluators looking at once only one does) and log it, its samples and
    flips tables read back from the result files. Called at start and at every rescan."""

    def take(entries: dict[int, dict[str, Any]]) -> list[int]:
        taken = []
        for step, entry in entries.items():
            if entry["status"] == Status.DONE and not entry.get("logged") and not alive(entry.get("log_owner", {})):
                entries[step] = {**entry, "log_owner": {"id": evaluator.owner_id}}
                taken.append(step)
        return sorted(taken)

    taken = ledger.update(take)
    in_wandb = evaluator.tracker.logged_rows() if taken and evaluator.tracker is not None else None
    for step in taken:
        result = json.loads(result_file(ledger.path.parent, step).read_text())
        if in_wandb is not None and any(
            row.get("train_step") == step and row.get("eval/weights_id") == result["weights_id"] for row in in_wandb
        ):
            # It died after W&B wrote the row, before the ledger said so: mark it, do not log it twice.
            log.info("step %d: already in W&B's files; marked logged", step)
            mark_logged(ledger, step, result["weights_id"])
            continue
        log.info("step %d: logging results that an earlier evaluator wrote but did not log", step)
        samples = _samples_on_disk(ledger.path.parent, step, result)
        with stop_deferred():
            log_once(ledger, evaluator, step, result, samples)
