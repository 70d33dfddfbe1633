"""Retention (the trainer's): which published steps may go, and the `best` link.

Invariants:
- Retention decides under the leases lock and every ledger's lock, and READY goes first; a step is leased or
  claimed under those same locks, so it is never deleted between being chosen and being held.
- Which steps are best is ranking's (`shared.protocol.ranking`); retention keeps them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from filelock import FileLock

from shared.protocol.layout import READY, RunLayout
from shared.protocol.ledger import Ledger, Status, entry_for, iter_ledgers
from shared.protocol.manifest import ready_weights_ids
from shared.protocol.presence import live_presences
from shared.protocol.ranking import RETENTION_LOCK_TIMEOUT_S, BestRule, rank_and_point, update_best


@dataclass(frozen=True)
class RetentionResult:
    deleted: list[int]
    kept_for: dict[int, str]
    """Steps past keep_last that were kept, with why."""
    unseen_by: dict[int, list[str]]
    """Deleted steps that an evaluation never evaluated (recorded `deleted` in its ledger)."""


def unpublish_old_checkpoints(
    layout: RunLayout, keep_last: int, eval_backfill: dict[str, bool], best: BestRule | None = None
) -> RetentionResult:
    """Unpublish (remove READY of) every step but the newest `keep_last`, except steps that an evaluator
    holds (a lease, or a running claim), means to evaluate (pending, or a dead evaluator's claim to retry),
    or has not seen yet while its evaluation is attached (a live watcher) or back-fills (`eval_backfill`:
    {eval name: backfill} from the trainer's config; a live watcher's own setting counts too), and the
    `best` rule's k best steps of each group of comparable results (the `best` link is pointed anew, see
    rank_and_point). Deleted steps an evaluation never saw are recorded `deleted` in its ledger. The caller
    removes the folders.

    All of it happens under the leases lock and every ledger's lock (taken in name order, the only
    place that holds more than one), so nothing is claimed or leased between deciding and unpublishing."""
    layout.leases_dir.mkdir(parents=True, exist_ok=True)
    ready = ready_weights_ids(layout.checkpoints_dir)
    candidates = sorted(ready)[:-keep_last] if keep_last else sorted(ready)
    if not candidates:  # nothing to delete: only the link to point
        update_best(layout, best)
        return RetentionResult([], {}, {})
    # Bounded waits: an evaluator frozen while holding a lock must not stop training (retention is retried later).
    with FileLock(str(layout.leases_dir / ".lock"), timeout=RETENTION_LOCK_TIMEOUT_S):
        presences = live_presences(layout)
        backfill = dict(eval_backfill)
        attached = set()
        for record in presences.values():
            if record.get("watching") and record.get("eval_name"):
                attached.add(record["eval_name"])
                backfill[record["eval_name"]] = backfill.get(record["eval_name"], False) or bool(record.get("backfill"))
        leased = {s for record in presences.values() for s in record.get("steps", [])}
        names = sorted(set(backfill) | attached | {ledger.path.parent.name for ledger in iter_ledgers(layout)})
        if best is not None:
            names = sorted(set(names) | {best.eval_name})
        ledgers = [Ledger(layout.eval_dir(name)) for name in names]
        for ledger in ledgers:
            ledger.path.parent.mkdir(parents=True, exist_ok=True)
        with _all_locked([ledger.lock for ledger in ledgers]):
            entries_by_name = {name: ledger.read() for name, ledger in zip(names, ledgers)}
            kept_for: dict[int, str] = {}
            # Ranked under the ledger locks: a result being recorded is either complete (ranked) or its step is
            # still a live claim (kept below), never half-seen.
            # The k best of every group of comparable results: a result under a newer evaluation config does not
            # unprotect the best steps measured under an older one (only re-evaluating them would compare them).
            for i, group in enumerate(rank_and_point(layout, best)):
                earlier = " under an earlier evaluation config" if i else ""
                for value, step in group[: best.k]:
                    if step in candidates:
                        kept_for[step] = (
                            f"one of the {best.k} best by {best.set_name} {best.metric} ({value:.4g}){earlier}"
                        )
            for step in candidates:
                if step in kept_for:
                    continue
                if step in leased:
                    kept_for[step] = "leased by an evaluator"
                    continue
                for name, entries in entries_by_name.items():
                    entry = entry_for(entries, step, ready[step])
                    status = entry["status"] if entry else None
                    if status == Status.RUNNING and entry.get("owner", {}).get("id") in presences:
                        kept_for[step] = f"being evaluated by evaluation '{name}'"
                    elif status in (Status.PENDING, Status.RUNNING):  # to back-fill, given back, or to retry
                        kept_for[step] = f"evaluation '{name}' means to evaluate it ({status})"
                    elif status is None and (name in attached or backfill.get(name)):
                        why = "attached" if name in attached else "backfill on"
                        kept_for[step] = f"not yet evaluated by evaluation '{name}' ({why})"
                    if step in kept_for:
                        break
            deleted = [s for s in candidates if s not in kept_for]
            unseen_by: dict[int, list[str]] = {}
            for step in deleted:
                # READY goes first: a half-deleted directory must never look valid.
                (layout.checkpoint_dir(step) / READY).unlink(missing_ok=True)
                for name, entries in entries_by_name.items():
                    entry = entry_for(entries, step, ready[step])
                    if entry is None or entry["status"] in (Status.PENDING, Status.RUNNING):
                        unseen_by.setdefault(step, []).append(name)
            for name, ledger in zip(names, ledgers):

                def mark(entries: dict[int, dict[str, Any]], name: str = name) -> None:
                    for step, evals in unseen_by.items():
                        if name in evals:
                            entries[step] = {
                                "status": Status.DELETED,
                                "time": time.time(),
                                "weights_id": ready[step],
                                "reason": f"deleted by the trainer's retention (keep_last={keep_last}) "
                                "before evaluation",
                            }

                ledger.update_locked(mark)
    return RetentionResult(deleted, kept_for, unseen_by)


class _all_locked:
    def __init__(self, locks: list[FileLock]):
        self.locks = locks

    def __enter__(self) -> None:
        for i, lock in enumerate(self.locks):
            try:
                lock.acquire(timeout=RETENTION_LOCK_TIMEOUT_S)
            except BaseException:
                for held in self.locks[:i]:
                    held.release()
                raise

    def __exit__(self, *exc: Any) -> None:
        for lock in reversed(self.locks):
            lock.release()
