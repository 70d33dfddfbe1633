"""Which checkpoint to evaluate next: pure logic over (what is ready on disk, what the ledger says).

Invariants this relies on:
- The trainer publishes steps in ascending order and never rewrites a published step, so a step
  number identifies one checkpoint for the life of the run.
- The ledger is the only record of work done; claims go through Ledger.update (a filelock), so
  two evaluators of the same eval name never claim the same step.
- Results files are written before the ledger says `done`, so `done` implies results exist.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from shared.protocol import Ledger, Status, current_owner, owner_alive

MAX_ATTEMPTS = 2
"""A step whose evaluator died this many times is marked failed rather than retried forever."""


@dataclass(frozen=True)
class Claim:
    step: int
    interrupted: bool
    """A previous evaluator died while evaluating this step; this is its one retry."""


def _claimable(entry: dict[str, Any] | None, force: bool) -> tuple[bool, bool]:
    """(may we take this step, was it interrupted)."""
    if entry is None:
        return True, False
    status = entry["status"]
    if status == Status.RUNNING:  # even --force never takes a step from a live evaluator
        dead = not owner_alive(entry.get("owner", {}))
        return dead, dead
    return force or status == Status.PENDING, False


def claim_next(ledger: Ledger, ready: list[int], *, backfill: bool, newest_first: bool, force: frozenset[int] = frozenset()) -> Claim | None:
    """Pick the next step among `ready` and mark it running, atomically.

    Watching (newest_first): an interrupted step first (it was already claimed once), then the
    newest unseen step; unseen steps older than it are marked pending (backfill) or skipped. With
    nothing unseen, pending steps are taken newest first. After the fact (not newest_first): the
    oldest step not yet evaluated, skipped ones included ("fill in what is missing")."""

    def pick(entries: dict[int, dict[str, Any]]) -> Claim | None:
        interrupted, unseen, pending = [], [], []
        for step in ready:
            entry = entries.get(step)
            ok, was_interrupted = _claimable(entry, step in force)
            if was_interrupted:
                interrupted.append(step)
            elif ok and (entry is None or step in force):
                unseen.append(step)
            elif ok or (not newest_first and entry["status"] == Status.SKIPPED):
                pending.append(step)
        for step in [s for s in interrupted if entries[s].get("attempts", 1) >= MAX_ATTEMPTS]:
            interrupted.remove(step)
            entries[step] = {**entries[step], "status": Status.FAILED, "time": time.time(),
                             "reason": f"evaluator died {MAX_ATTEMPTS} times while evaluating it"}
        if interrupted:
            choice, was_interrupted = min(interrupted), True
        elif not newest_first:
            candidates = sorted(unseen + pending)
            if not candidates:
                return None
            choice, was_interrupted = candidates[0], False
        elif unseen:
            choice, was_interrupted = max(unseen), False
            for older in unseen:
                if older < choice:
                    entries[older] = {"status": Status.PENDING if backfill else Status.SKIPPED, "time": time.time(),
                                      "reason": f"passed over for newer step {choice}"}
        elif pending and backfill:
            choice, was_interrupted = max(pending), False
        else:
            return None
        previous = entries.get(choice, {})
        entries[choice] = {
            "status": Status.RUNNING,
            "owner": current_owner(),
            "attempts": previous.get("attempts", 0) + 1,
            "time": time.time(),
        }
        return Claim(choice, was_interrupted)

    return ledger.update(pick)
