"""Retention (the trainer's): which published steps may go.

Invariants:
- Retention is local and bounded: it decides from its own rules (keep_last, keep_best, max_unevaluated) and the
  evaluations' results (ledger entries, result files) only, never from heartbeats, presences, leases, pending or
  running claims. A slow, hung or vanished evaluator can keep at most `max_unevaluated` checkpoints beyond
  keep_last and keep_best's, so it can never fill the trainer's disk.
- Deleting a checkpoint an evaluator is reading is safe: the evaluator evaluates a hard-linked snapshot of it
  (published files never change in place, and unlinking a name leaves a linked file whole). A step deleted before
  an evaluation finished it is logged and recorded `deleted` in that evaluation's ledger, with the reason, except
  where the evaluation has it `running`: that claim stays, so the evaluator records its result (from its snapshot);
  a claim whose evaluator died is taken over by another, which finds the checkpoint gone and records `deleted`.
- READY goes first: a half-deleted folder never looks valid. The caller removes the folders.
- Decisions and `deleted` records are taken under the `best` lock and every ledger's lock (name order, the only
  place that holds more than one), each waited for at most RETENTION_LOCK_TIMEOUT_S: a process frozen inside a
  lock makes retention skip this pass (filelock.Timeout, nothing deleted), never blocks training.
- Which steps are best is ranking's (`shared.protocol.ranking`); retention keeps them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from filelock import FileLock

from shared.protocol.layout import READY, RunLayout
from shared.protocol.ledger import Ledger, Status, entry_for, iter_ledgers
from shared.protocol.manifest import ready_weights_ids
from shared.protocol.ranking import RETENTION_LOCK_TIMEOUT_S, BestRule, rank_and_point, update_best

logger = logging.getLogger(__name__)

FINISHED = (Status.DONE, Status.SKIPPED, Status.FAILED)
"""Ledger statuses after which an evaluation will not evaluate a step (for the weights the entry names): done,
skipped (passed over for a newer step, backfill off) or failed (its attempts spent). Pending, running, deleted or
no entry: not finished."""


@dataclass(frozen=True)
class RetentionResult:
    deleted: list[int]
    kept_for: dict[int, str]
    """Steps past keep_last that were kept, with why."""
    unseen_by: dict[int, list[str]]
    """Deleted steps that an evaluation had not finished (recorded `deleted` in its ledger)."""


def evaluation_names(layout: RunLayout, eval_names: Iterable[str], best: BestRule | None) -> list[str]:
    """The evaluations retention answers to: `eval_names` (the trainer's config), every eval/<name>/ with a
    ledger in the run, and keep_best's evaluation."""
    names = set(eval_names) | {ledger.path.parent.name for ledger in iter_ledgers(layout)}
    return sorted(names | ({best.eval_name} if best else set()))


def unfinished_by(entries_by_name: dict[str, dict[int, dict[str, Any]]], step: int, weights: str) -> list[str]:
    """The evaluations that have not finished `step` (these weights): see FINISHED."""
    return [
        name
        for name, entries in entries_by_name.items()
        if (entry := entry_for(entries, step, weights)) is None or entry["status"] not in FINISHED
    ]


def unpublish_old_checkpoints(
    layout: RunLayout,
    keep_last: int,
    max_unevaluated: int,
    eval_names: Iterable[str] = (),
    best: BestRule | None = None,
) -> RetentionResult:
    """Unpublish (remove READY of) every step but the newest `keep_last`, except `best`'s k best of each group
    of comparable results (the `best` link is pointed anew, see rank_and_point) and the newest `max_unevaluated`
    of the remaining steps that some evaluation (`evaluation_names`) has not finished. Deleted steps an evaluation
    had not finished are logged (WARNING) and recorded `deleted` in its ledger (a `running` claim is left as it
    is: see the module's invariants). The caller removes the folders.
    Raises filelock.Timeout, having deleted nothing, when a lock is not got in RETENTION_LOCK_TIMEOUT_S."""
    ready = ready_weights_ids(layout.checkpoints_dir)
    candidates = sorted(ready)[:-keep_last] if keep_last else sorted(ready)
    if not candidates:  # nothing to delete: only the link to point
        update_best(layout, best)
        return RetentionResult([], {}, {})
    names = evaluation_names(layout, eval_names, best)
    ledgers = [Ledger(layout.eval_dir(name)) for name in names]
    for ledger in ledgers:
        ledger.path.parent.mkdir(parents=True, exist_ok=True)
    with (
        FileLock(str(layout.best_lock_path), timeout=RETENTION_LOCK_TIMEOUT_S),
        ExitStack() as held,
    ):
        for ledger in ledgers:  # each bounded: a timeout lets go of those taken (ExitStack) and skips this pass
            held.enter_context(ledger.lock.acquire(timeout=RETENTION_LOCK_TIMEOUT_S))
        entries_by_name = {name: ledger.read() for name, ledger in zip(names, ledgers, strict=True)}
        unfinished = {step: unfinished_by(entries_by_name, step, ready[step]) for step in candidates}
        kept_for = _kept_as_best(layout, best, candidates)
        unevaluated = [step for step in reversed(candidates) if step not in kept_for and unfinished[step]]
        for step in unevaluated[:max_unevaluated]:
            kept_for[step] = (
                f"not yet evaluated by {', '.join(unfinished[step])} "
                f"(one of the newest max_unevaluated={max_unevaluated} unevaluated checkpoints)"
            )
        deleted = [step for step in candidates if step not in kept_for]
        for step in deleted:
            (layout.checkpoint_dir(step) / READY).unlink(missing_ok=True)  # READY first: never a half folder
        unseen_by = {step: unfinished[step] for step in deleted if unfinished[step]}
        why = f"beyond keep_last={keep_last} and the newest max_unevaluated={max_unevaluated} unevaluated checkpoints"
        for name, ledger in zip(names, ledgers, strict=True):
            ledger.update_locked(lambda entries, name=name: _mark_deleted(entries, name, unseen_by, ready, why))
    for step, evals in unseen_by.items():
        claimed = [name for name in evals if _status(entries_by_name[name], step, ready[step]) == Status.RUNNING]
        logger.warning(
            "retention: deleted step %d before evaluation(s) %s finished it (%s); recorded `deleted` in the ledgers%s",
            step,
            ", ".join(evals),
            why,
            f" ({', '.join(claimed)} evaluating it from a snapshot: that claim stays)" if claimed else "",
        )
    return RetentionResult(deleted, kept_for, unseen_by)


def _status(entries: dict[int, dict[str, Any]], step: int, weights: str) -> str | None:
    entry = entry_for(entries, step, weights)
    return entry["status"] if entry else None


def _kept_as_best(layout: RunLayout, best: BestRule | None, candidates: list[int]) -> dict[int, str]:
    """The candidates among `best`'s k best of every group of comparable results, with why. A result under a newer
    evaluation config does not unprotect the best steps measured under an older one (only re-evaluating them
    would compare them)."""
    kept_for: dict[int, str] = {}
    for i, group in enumerate(rank_and_point(layout, best)):
        earlier = " under an earlier evaluation config" if i else ""
        for value, step in group[: best.k]:
            if step in candidates:
                kept_for[step] = f"one of the {best.k} best by {best.set_name} {best.metric} ({value:.4g}){earlier}"
    return kept_for


def _mark_deleted(
    entries: dict[int, dict[str, Any]], name: str, unseen_by: dict[int, list[str]], ready: dict[int, str], why: str
) -> None:
    """Record `deleted` (with the reason) for the deleted steps evaluation `name` had not finished, but for a
    `running` claim (its evaluator evaluates a snapshot, and records the result)."""
    for step, evals in unseen_by.items():
        if name in evals and _status(entries, step, ready[step]) != Status.RUNNING:
            kept = {k: v for k, v in entries.get(step, {}).items() if k == "attempts"}
            entries[step] = {
                **kept,
                "status": Status.DELETED,
                "time": time.time(),
                "weights_id": ready[step],
                "reason": f"deleted by the trainer's retention before this evaluation finished it ({why})",
            }
