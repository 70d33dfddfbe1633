"""Ledger: what one evaluation (run + eval name) did with each step, in `ledger.json` under a filelock.

Invariants:
- Every read-modify-write holds the ledger's lock, so two evaluators of one evaluation never both claim a step.
- Entries carry the `weights_id` they are about: an entry about other weights than a step's folder holds now
  does not count for that step. Claims and results also carry their `eval_config_id`: an entry of another
  evaluation config does not count as evaluated under this one (`entry_for`).
- An entry's `attempts` counts claims that did not end in a stop; `failed_attempts` lists the transient failures
  (time, attempt, reason) that gave the step back before it was done or failed.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock

from shared.protocol.durable import atomic_write_json
from shared.protocol.layout import RunLayout, step_dirname

_FAULT_LEDGER_HOLD_ENV = "MATH_SFT_FAULT_LEDGER_HOLD_S"
"""Tests: seconds to wait inside a ledger update, between reading and writing (widens any race)."""


class ClaimLost(RuntimeError):
    """This process no longer owns the step it evaluated (it went stale and another evaluator took it)."""


class Status:
    RUNNING = "running"
    DONE = "done"
    SKIPPED = "skipped"
    PENDING = "pending"  # passed over for a newer checkpoint (back-fill), or given back by a stopped evaluator
    FAILED = "failed"
    DELETED = "deleted"  # removed by the trainer's retention before this evaluation saw it


class Ledger:
    """What one evaluation (run + eval name) did with each step, in `ledger.json` under a filelock.

    All read-modify-write goes through `update`, which holds the lock, so two evaluators on the same
    eval name never both claim a step. Entries carry the `weights_id` they refer to."""

    def __init__(self, eval_dir: Path):
        self.path = Path(eval_dir) / "ledger.json"
        self.lock = FileLock(str(self.path) + ".lock")

    def read(self) -> dict[int, dict[str, Any]]:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError as exc:
            raise ValueError(
                f"{self.path}: corrupted ledger ({exc}); move it away to start this evaluation afresh"
            ) from None
        if not isinstance(raw, dict):
            raise ValueError(
                f"{self.path}: corrupted ledger (not a mapping); move it away to start this evaluation afresh"
            )
        entries = {}
        for key, entry in raw.items():
            if not key.isdigit() or not isinstance(entry, dict) or "status" not in entry:
                raise ValueError(
                    f"{self.path}: corrupted ledger (entry {key!r} is not a step with a status); "
                    "move it away to start this evaluation afresh"
                )
            entries[int(key)] = entry
        return entries

    def update(self, fn: Callable[[dict[int, dict[str, Any]]], Any]) -> Any:
        """Run `fn(entries)` under the lock; it may modify entries in place. Returns fn's result."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.lock:
            return self.update_locked(fn)

    def update_locked(self, fn: Callable[[dict[int, dict[str, Any]]], Any]) -> Any:
        """`update` for a caller that already holds `self.lock`."""
        entries = self.read()
        before = json.dumps(entries, sort_keys=True)
        hold_s = float(os.environ.get(_FAULT_LEDGER_HOLD_ENV, "0") or 0)
        if hold_s:
            time.sleep(hold_s)
        result = fn(entries)
        if json.dumps(entries, sort_keys=True) != before:
            atomic_write_json(self.path, {step_dirname(k)[5:]: v for k, v in sorted(entries.items())})
        return result

    def set(self, step: int, status: str, **info: Any) -> None:
        """Replace `step`'s entry under the lock, keeping only its `attempts` count (evaluator/averaging.py records
        the averaged checkpoints' outcomes with it)."""

        def apply(entries: dict[int, dict[str, Any]]) -> None:
            kept = {k: v for k, v in entries.get(step, {}).items() if k == "attempts"}
            entries[step] = {**kept, "status": status, "time": time.time(), **info}

        self.update(apply)


def entry_for(
    entries: dict[int, dict[str, Any]], step: int, weights: str | None, config_id: str | None = None
) -> dict[str, Any] | None:
    """The ledger entry of `step` if it is about these weights and this evaluation config; None when the step is
    unseen, or its entry speaks of other weights (the step folder was replaced, e.g. after a corrupt one was moved
    aside), or is a result of another evaluation config (`eval_config_id`: another prompt template, problems,
    sampling, backend or grader; the step is not yet evaluated under this one). Only results are of a config: a
    claim, a step given back or passed over is about the step whatever the config. `config_id` None: any config
    (retention: has any evaluation finished with the step); a result naming no config matches any."""
    entry = entries.get(step)
    if entry is not None and weights is not None and entry.get("weights_id") not in (None, weights):
        return None
    if (
        entry is not None
        and config_id is not None
        and entry["status"] == Status.DONE
        and entry.get("eval_config_id") not in (None, config_id)
    ):
        return None
    return entry


def iter_ledgers(layout: RunLayout) -> Iterator[Ledger]:
    root = layout.evals_dir
    if root.is_dir():
        for eval_dir in sorted(root.iterdir()):
            if (eval_dir / "ledger.json").is_file():
                yield Ledger(eval_dir)
