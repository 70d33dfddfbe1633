"""Which checkpoint to evaluate next: pure logic over (what is ready on disk, what the ledger says).

Invariants this relies on:
- A ledger entry is about the weights it names (`weights_id`): a step whose folder now holds other
  weights (replaced after a corrupt one was moved aside) is unseen again, never "already evaluated".
- The ledger is the only record of work done; claims go through Ledger.update (a filelock), so
  two evaluators of the same eval name never claim the same step. A claim is taken only while the
  step's READY still exists, checked under that lock (retention unpublishes under it too).
- Results files are written before the ledger says `done`, so `done` implies results exist.
- A step given back by a stopped evaluator is pending and taken first, like one whose evaluator died;
  only steps passed over for a newer one are skipped (or pending, with backfill), and each is reported.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from shared.protocol import Ledger, Status, current_owner, entry_for

MAX_ATTEMPTS = 2
"""A step whose evaluator died this many times is marked failed rather than retried forever."""


@dataclass(frozen=True)
class Claim:
    step: int
    weights_id: str | None
    interrupted: bool
    """A previous evaluator died or was stopped while evaluating this step."""
    replaced: bool = False
    """The step had been evaluated, but its folder now holds other weights."""
    passed_over: dict[int, str] = field(default_factory=dict)
    """Older steps this claim passed over, with what they became (skipped or pending)."""


def _running_claim(weights: str | None, attempts: int) -> dict[str, Any]:
    return {
        "status": Status.RUNNING,
        "owner": current_owner(),
        "attempts": attempts,
        "time": time.time(),
        "weights_id": weights,
    }


def claim_next(
    ledger: Ledger,
    ready: dict[int, str | None],
    *,
    alive: Callable[[dict[str, Any]], bool],
    backfill: bool,
    newest_first: bool,
    force: frozenset[int] = frozenset(),
    is_ready: Callable[[int], bool] = lambda step: True,
) -> Claim | None:
    """Pick the next step among `ready` ({step: weights_id}) and mark it running, atomically.

    Watching (newest_first): an interrupted or given-back step first, then the newest unseen step;
    unseen steps older than it become pending (backfill) or skipped. With nothing unseen, pending steps
    are taken newest first (backfill). After the fact (not newest_first): the oldest step not yet
    evaluated, skipped ones included ("fill in what is missing"). `alive(owner)`: does a claim's owner live."""

    def pick(entries: dict[int, dict[str, Any]]) -> Claim | None:
        interrupted, unseen, pending, replaced = [], [], [], set()
        for step, weights in ready.items():
            if not is_ready(step):
                continue
            entry = entry_for(entries, step, weights)
            if entry is None:
                unseen.append(step)
                if step in entries:
                    replaced.add(step)
                continue
            status = entry["status"]
            if status == Status.RUNNING:  # even --force never takes a step from a live evaluator
                if not alive(entry.get("owner", {})):
                    interrupted.append(step)
            elif status == Status.PENDING and entry.get("given_back"):
                interrupted.append(step)
            elif step in force:
                unseen.append(step)
            elif status == Status.PENDING or (not newest_first and status == Status.SKIPPED):
                pending.append(step)
        for step in [s for s in interrupted if entries[s].get("attempts", 1) >= MAX_ATTEMPTS]:
            interrupted.remove(step)
            entries[step] = {
                **entries[step],
                "status": Status.FAILED,
                "time": time.time(),
                "reason": f"evaluator died {MAX_ATTEMPTS} times while evaluating it",
            }
        passed_over: dict[int, str] = {}
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
                    passed_over[older] = Status.PENDING if backfill else Status.SKIPPED
                    entries[older] = {
                        "status": passed_over[older],
                        "time": time.time(),
                        "weights_id": ready[older],
                        "reason": f"passed over for newer step {choice}",
                    }
        elif pending and backfill:
            choice, was_interrupted = max(pending), False
        else:
            return None
        previous = entry_for(entries, choice, ready[choice]) or {}
        entries[choice] = _running_claim(ready[choice], previous.get("attempts", 0) + 1)
        return Claim(choice, ready[choice], was_interrupted, choice in replaced, passed_over)

    return ledger.update(pick)


def claim_step(
    ledger: Ledger, step: int, weights: str | None, *, alive: Callable[[dict[str, Any]], bool], force: bool
) -> tuple[bool, str]:
    """Claim one given step (evaluating a folder after the fact). (claimed, why not): never over a live
    evaluator's claim; never over results of the same weights (unless force) or of other weights at
    that step (unless force: they are replaced)."""

    def pick(entries: dict[int, dict[str, Any]]) -> tuple[bool, str]:
        entry = entries.get(step)
        if entry is not None and entry["status"] == Status.RUNNING and alive(entry.get("owner", {})):
            return (
                False,
                f"step {step} is being evaluated right now by {entry['owner'].get('host')} "
                f"pid {entry['owner'].get('pid')}",
            )
        if entry is not None and entry["status"] == Status.DONE and not force:
            if entry.get("weights_id") == weights:
                return False, "already evaluated"
            return False, (
                f"{ledger.path.parent} already holds results for step {step} of other weights "
                f"({entry.get('weights_id')}, from {entry.get('checkpoint')}); these are {weights}: "
                "give another --out, or --force to replace them"
            )
        entries[step] = _running_claim(weights, 1)
        return True, ""

    return ledger.update(pick)


def holds_claim(entry: dict[str, Any] | None, owner_id: str) -> bool:
    """Is `entry` a running claim of `owner_id`? The fence every change to a claimed step passes first."""
    return bool(entry) and entry["status"] == Status.RUNNING and entry.get("owner", {}).get("id") == owner_id


def give_back(ledger: Ledger, step: int, owner_id: str) -> None:
    """A stopped evaluator returns its claim: pending, first in line, and the attempt does not count."""

    def apply(entries: dict[int, dict[str, Any]]) -> None:
        entry = entries.get(step)
        if holds_claim(entry, owner_id):
            entries[step] = {
                **entry,
                "status": Status.PENDING,
                "given_back": True,
                "time": time.time(),
                "attempts": max(0, entry.get("attempts", 1) - 1),
                "reason": "given back by a stopped evaluator",
            }

    ledger.update(apply)
