"""Presence: who an evaluator process is, and whether its work still advances (liveness from progress).

Each evaluator process writes one record per run, `presence/<owner id>.json`, and rewrites it only when its work
advances (a claim, tokens generated, grading, recording): the record's `progress` counter then grows. No timer
keeps it fresh, so a process whose work is wedged (a hung engine, a stuck collective) goes stale like a dead one.

Invariants:
- Presence only avoids duplicate work: a running claim whose owner is stale may be taken by another evaluator of
  the same evaluation, and the stale owner, should it come back, finds its claim lost and records nothing. Nothing
  that keeps data safe reads presences (the evaluator evaluates its own hard-linked snapshot; retention decides
  from its own rules and the ledgers).
- Staleness never compares clocks across hosts: a reader (`Liveness`) remembers, per owner, the last `progress`
  counter it saw and when it saw it change, on its own `time.monotonic()`; the owner is stale once the counter has
  not changed for the timeout. A reader that never saw a change counts from its first look, so a dead owner looks
  alive to a new reader for at most the timeout. The record's wall-clock `time` is for people only.
- Within one kernel and pid namespace (same boot id and pid namespace) a vanished, reused or zombie pid proves the
  owner dead at once; a stopped (SIGSTOP) or wedged one is only found stale. Across hosts and containers only the
  counter counts.
- The owner writes at most one record per `MIN_WRITE_INTERVAL_S` (or a tenth of its timeout, if shorter);
  progress made meanwhile is written when that interval ends (a one-shot flush), so the last progress is never
  lost and a call after a pause writes at once. The timeout must exceed the longest gap between two progress
  calls (`evaluation.heartbeat_timeout_s` is checked against `generate_timeout_s` and `engine_start_timeout_s`,
  the bounds of the longest silent phases).
- A failed write (a full or vanished disk) is logged and never fails the work: the owner merely looks stale.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from shared.procfs import proc_stat
from shared.protocol.durable import atomic_write_json
from shared.protocol.layout import RunLayout

log = logging.getLogger(__name__)

MIN_WRITE_INTERVAL_S = 1.0
"""At most one presence record write per this many seconds, or per a tenth of the timeout if that is shorter
(progress comes per token step or graded response; a reader must see changes well within its timeout)."""

_FAULT_CLOCK_OFFSET_ENV = "MATH_SFT_FAULT_CLOCK_OFFSET_S"
"""Tests: seconds added to the wall-clock timestamps a presence record carries (a host whose clock is off)."""


def _wall_time() -> float:
    """The wall clock as this host reports it (shifted by the clock-offset fault hook, its one reader)."""
    return time.time() + float(os.environ.get(_FAULT_CLOCK_OFFSET_ENV) or 0)


def _read_first_line(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.readline().strip() or None
    except OSError:
        return None


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


_OWNER_ID = uuid.uuid4().hex[:16]


def current_owner() -> dict[str, Any]:
    """This process: a random id (unique across hosts and containers) plus what lets a process on the
    same kernel and pid namespace prove it dead early."""
    fields = proc_stat(os.getpid())
    return {
        "id": _OWNER_ID,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        # field 22 of stat, the start time: it tells a reused pid from the original
        "start": fields[19] if fields and len(fields) > 19 else None,
        "boot_id": _read_first_line("/proc/sys/kernel/random/boot_id"),
        "pid_ns": _pid_namespace(),
    }


def _provably_gone(owner: dict[str, Any]) -> bool:
    """True only where we share the owner's kernel and pid namespace and its process has exited (no such pid,
    a zombie, or another process under its pid)."""
    me = current_owner()
    if not owner.get("boot_id") or owner.get("boot_id") != me["boot_id"] or owner.get("pid_ns") != me["pid_ns"]:
        return False
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    fields = proc_stat(pid)
    if fields is None:
        return True
    if fields[0] in ("Z", "X"):  # exited, not yet reaped by its parent
        return True
    return owner.get("start") is not None and len(fields) > 19 and fields[19] != owner["start"]


def describe_owner(owner: dict[str, Any]) -> str:
    return f"pid {owner.get('pid')} on {owner.get('host')} (owner {owner.get('id')})"


def presence_path(layout: RunLayout, owner_id: str) -> Path:
    """The presence record of one evaluator process in a run."""
    return layout.presence_dir / f"{owner_id}.json"


def read_presence(layout: RunLayout, owner_id: str) -> dict[str, Any] | None:
    """An owner's presence record; None when it has none (stopped, or never started). Raises ValueError for a
    record that cannot be read right now (being replaced on a filesystem without atomic renames)."""
    path = presence_path(layout, owner_id)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable presence record ({exc})") from None
    if isinstance(record, dict):
        return record
    raise ValueError(f"{path}: a presence record must be a JSON object")


class Presence:
    """An evaluator process's presence record in a run. `start()` writes it, `progress(what, step)` advances it
    (each call grows the `progress` counter; writes are rate-limited, see the module's invariants), `stop()`
    removes it.

    `watching`: a watcher of the run; `backfill`: it means to evaluate every step; `timeout_s`: how long its work
    may go without progress (readers take it stale after that, or after their own timeout if longer)."""

    def __init__(self, layout: RunLayout, eval_name: str | None, *, watching: bool, backfill: bool, timeout_s: float):
        self.layout = layout
        self.owner = current_owner()
        self.path = presence_path(layout, self.owner["id"])
        self.info = {"eval_name": eval_name, "watching": watching, "backfill": backfill, "timeout_s": timeout_s}
        self.counter = 0
        self.what = "started"
        self.step: int | None = None
        self._started = _wall_time()
        self._lock = threading.Lock()
        self._last_write = float("-inf")  # time.monotonic() of the last write
        self._write_interval_s = min(MIN_WRITE_INTERVAL_S, timeout_s / 10)
        self._flush: threading.Timer | None = None
        self._stopped = False
        self._write_failed = False

    def start(self) -> Presence:
        with self._lock:
            self._write()
        return self

    def progress(self, what: str, step: int | None = None) -> None:
        """The work advanced: `what` it is doing now (e.g. "step 4 main generate"), on which step."""
        with self._lock:
            if self._stopped:
                return
            self.counter += 1
            self.what, self.step = what, step
            wait_s = self._last_write + self._write_interval_s - time.monotonic()
            if wait_s <= 0:
                self._write()
            elif self._flush is None:  # written when the interval ends: the last progress is never lost
                self._flush = threading.Timer(wait_s, self._flush_pending)
                self._flush.daemon = True
                self._flush.start()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            if self._flush is not None:
                self._flush.cancel()
            self.path.unlink(missing_ok=True)

    def _flush_pending(self) -> None:
        with self._lock:
            self._flush = None
            if not self._stopped:
                self._write()

    def _write(self) -> None:
        """Write the record now (the caller holds the lock). A failure is logged: the owner then looks stale."""
        record = {
            **self.info,
            "owner": self.owner,
            "progress": self.counter,
            "what": self.what,
            "step": self.step,
            "started": self._started,
            "time": _wall_time(),
        }
        self._last_write = time.monotonic()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)  # removed meanwhile (a run folder made again)
            atomic_write_json(self.path, record)
        except OSError as exc:
            if not self._write_failed:
                log.warning(
                    "presence %s: cannot write it (%s); other evaluators may take this one's claims", self.path, exc
                )
            self._write_failed = True
            return
        if self._write_failed:
            log.info("presence %s: written again", self.path)
        self._write_failed = False


class Liveness:
    """One reader's view of which claim owners still make progress (see the module's invariants).

    `alive(owner)`: the owner (a ledger entry's `owner`) is this process (`self_id`), or its presence record's
    counter changed within the timeout (the larger of `timeout_s` and the one its record declares) as this
    reader saw it. Keep one instance for as long as the reader runs: what it remembers is what makes it judge."""

    def __init__(self, layout: RunLayout, timeout_s: float, self_id: str):
        self.layout = layout
        self.timeout_s = timeout_s
        self.self_id = self_id
        self._seen: dict[str, tuple[Any, float]] = {}  # owner id -> (counter, monotonic time it was first seen)
        self._lock = threading.Lock()

    def alive(self, owner: dict[str, Any]) -> bool:
        owner_id = owner.get("id")
        if owner_id == self.self_id:
            return True
        if not isinstance(owner_id, str) or not owner_id or _provably_gone(owner):
            return False
        try:
            record = read_presence(self.layout, owner_id)
        except ValueError:
            record = {}  # unreadable for now: judged as unchanged
        now = time.monotonic()
        with self._lock:
            if record is None:  # stopped (or never started): nothing of it runs
                self._seen.pop(owner_id, None)
                return False
            counter = record.get("progress", self._seen.get(owner_id, (None, 0.0))[0])
            seen = self._seen.get(owner_id)
            if seen is None or seen[0] != counter:
                seen = self._seen[owner_id] = (counter, now)
        return now - seen[1] <= max(self.timeout_s, _declared_timeout_s(record))


def _declared_timeout_s(record: dict[str, Any]) -> float:
    value = record.get("timeout_s")
    return float(value) if isinstance(value, (int, float)) and value > 0 else 0.0
