"""Which checkpoint to evaluate next: pure logic over (what is ready on disk, what the ledger says).

Invariants this relies on:
- A ledger entry is about the weights it names (`weights_id`) and the evaluation config it was measured under
  (`eval_config_id`): a step whose folder now holds other weights (replaced after a corrupt one was moved aside),
  or whose entry is of another config, is unseen again, never "already evaluated".
- The ledger is the only record of work done; claims go through Ledger.update (a filelock), so
  two evaluators of the same eval name never claim the same step. A claim is taken only while the
  step's READY still exists, checked under that lock (retention unpublishes under it too).
- Results files are written before the ledger says `done`, so `done` implies results exist.
- A step given back by a stopped evaluator (or after a transient failure) is pending and taken first, like one
  whose evaluator died; only steps passed over for a newer one are skipped (or pending, with backfill), and each
  is reported. Attempts are counted per claim: after `max_attempts` a step is failed, never retried forever.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shared.protocol import Ledger, Status, current_owner, entry_for


@dataclass(frozen=True)
class Claim:
    step: int
    weights_id: str | None
    interrupted: bool
    """A previous evaluator died or was stopped while evaluating this step."""
    replaced: bool = False
    """The step had been evaluated, but its folder now holds other weights."""
    reconfigured: bool = False
    """The step had been evaluated under another evaluation config (its results are superseded)."""
    passed_over: dict[int, str] = field(default_factory=dict)
    """Older steps this claim passed over, with what they became (skipped or pending)."""


def _running_claim(previous: dict[str, Any], weights: str | None, config_id: str | None) -> dict[str, Any]:
    """A running claim of this process, one attempt more than `previous` (the entry of these weights and
    config, if any) counted, its failed attempts kept."""
    claim = {
        "status": Status.RUNNING,
        "owner": current_owner(),
        "attempts": previous.get("attempts", 0) + 1,
        "time": time.time(),
        "weights_id": weights,
        "eval_config_id": config_id,
    }
    return {**claim, "failed_attempts": previous["failed_attempts"]} if previous.get("failed_attempts") else claim


@dataclass
class _Seen:
    """The ready steps sorted by what the ledger says of them (for these weights and this config)."""

    interrupted: list[int] = field(default_factory=list)
    unseen: list[int] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)
    replaced: set[int] = field(default_factory=set)
    reconfigured: set[int] = field(default_factory=set)


def _sort_ready(entries, ready, *, alive, newest_first, force, is_ready, config_id) -> _Seen:
    seen = _Seen()
    for step, weights in ready.items():
        if not is_ready(step):
            continue
        entry = entry_for(entries, step, weights, config_id)
        if entry is None:
            seen.unseen.append(step)
            if entry_for(entries, step, weights) is not None:
                seen.reconfigured.add(step)
            elif step in entries:
                seen.replaced.add(step)
            continue
        status = entry["status"]
        if status == Status.RUNNING:  # even --force never takes a step from a live evaluator
            if not alive(entry.get("owner", {})):
                seen.interrupted.append(step)
        elif status == Status.PENDING and entry.get("given_back"):
            seen.interrupted.append(step)
        elif step in force:
            seen.unseen.append(step)
        elif status == Status.PENDING or (not newest_first and status == Status.SKIPPED):
            seen.pending.append(step)
    return seen


def _fail_exhausted(entries: dict[int, dict[str, Any]], seen: _Seen, max_attempts: int) -> None:
    """Interrupted steps whose attempts are used up are failed (an evaluator died on each, or gave them back)."""
    for step in [s for s in seen.interrupted if entries[s].get("attempts", 1) >= max_attempts]:
        seen.interrupted.remove(step)
        entry = entries[step]
        last = (entry.get("failed_attempts") or [{}])[-1].get("reason")
        died = entry["status"] == Status.RUNNING
        reason = f"the evaluator died while evaluating it (attempt {entry.get('attempts', 1)})" if died else last
        entries[step] = {
            **entry,
            "status": Status.FAILED,
            "time": time.time(),
            "reason": f"{max_attempts} attempts failed; the last: {reason}",
        }


def _pass_over(entries, seen: _Seen, ready, choice: int, backfill: bool) -> dict[int, str]:
    passed_over: dict[int, str] = {}
    for older in seen.unseen:
        if older < choice:
            passed_over[older] = Status.PENDING if backfill else Status.SKIPPED
            entries[older] = {
                "status": passed_over[older],
                "time": time.time(),
                "weights_id": ready[older],
                "reason": f"passed over for newer step {choice}",
            }
    return passed_over


def claim_next(
    ledger: Ledger,
    ready: dict[int, str | None],
    *,
    alive: Callable[[dict[str, Any]], bool],
    backfill: bool,
    newest_first: bool,
    force: frozenset[int] = frozenset(),
    is_ready: Callable[[int], bool] = lambda step: True,
    config_id: str | None = None,
    max_attempts: int = 3,
) -> Claim | None:
    """Pick the next step among `ready` ({step: weights_id}) and mark it running, atomically.

    Watching (newest_first): an interrupted or given-back step first, then the newest unseen step;
    unseen steps older than it become pending (backfill) or skipped. With nothing unseen, pending steps
    are taken newest first (backfill). After the fact (not newest_first): the oldest step not yet
    evaluated, skipped ones included ("fill in what is missing"). `alive(owner)`: does a claim's owner live.
    `config_id`: this evaluation's config; entries of another config are not yet evaluated (None: any)."""

    def pick(entries: dict[int, dict[str, Any]]) -> Claim | None:
        seen = _sort_ready(
            entries, ready, alive=alive, newest_first=newest_first, force=force, is_ready=is_ready, config_id=config_id
        )
        _fail_exhausted(entries, seen, max_attempts)
        passed_over: dict[int, str] = {}
        if seen.interrupted:
            choice, was_interrupted = min(seen.interrupted), True
        elif not newest_first:
            candidates = sorted(seen.unseen + seen.pending)
            if not candidates:
                return None
            choice, was_interrupted = candidates[0], False
        elif seen.unseen:
            choice, was_interrupted = max(seen.unseen), False
            passed_over = _pass_over(entries, seen, ready, choice, backfill)
        elif seen.pending and backfill:
            choice, was_interrupted = max(seen.pending), False
        else:
            return None
        previous = entry_for(entries, choice, ready[choice], config_id) or {}
        entries[choice] = _running_claim(previous, ready[choice], config_id)
        replaced, reconfigured = choice in seen.replaced, choice in seen.reconfigured
        return Claim(choice, ready[choice], was_interrupted, replaced, reconfigured, passed_over)

    return ledger.update(pick)


def claim_step(
    ledger: Ledger,
    step: int,
    weights: str | None,
    *,
    alive: Callable[[dict[str, Any]], bool],
    force: bool,
    config_id: str | None = None,
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
        # results of these weights under another evaluation config: not yet evaluated (they are superseded)
        reconfigured = (
            entry_for(entries, step, weights) is not None and entry_for(entries, step, weights, config_id) is None
        )
        if entry is not None and entry["status"] == Status.DONE and not force and not reconfigured:
            if entry.get("weights_id") == weights:
                return False, "already evaluated"
            return False, (
                f"{ledger.path.parent} already holds results for step {step} of other weights "
                f"({entry.get('weights_id')}, from {entry.get('checkpoint')}); these are {weights}: "
                "give another --out, or --force to replace them"
            )
        entries[step] = _running_claim({}, weights, config_id)
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


def give_back_failed(ledger: Ledger, step: int, owner_id: str, reason: str, max_attempts: int) -> str | None:
    """A transient failure of a claimed step: its reason appended to the entry's `failed_attempts` (time, attempt,
    reason); pending and first in line while attempts are left, else failed. The status it got (None: the claim
    was no longer this process's, nothing changed)."""

    def apply(entries: dict[int, dict[str, Any]]) -> str | None:
        entry = entries.get(step)
        if not holds_claim(entry, owner_id):
            return None
        attempts = entry.get("attempts", 1)
        failed = [*entry.get("failed_attempts", []), {"time": time.time(), "attempt": attempts, "reason": reason}]
        exhausted = attempts >= max_attempts
        entries[step] = {
            **entry,
            "status": Status.FAILED if exhausted else Status.PENDING,
            "given_back": not exhausted,
            "time": time.time(),
            "failed_attempts": failed,
            "reason": f"{attempts} attempts failed; the last: {reason}" if exhausted else reason,
        }
        return entries[step]["status"]

    return ledger.update(apply)
