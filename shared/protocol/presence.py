"""Presence: who an evaluator process is, its heartbeat file, and the steps it holds (leases).

Invariants:
- An owner (evaluator process) is alive while its heartbeat is fresh. Within one kernel and pid namespace a
  vanished pid proves it dead sooner; across hosts and containers only the heartbeat counts.
- A frozen owner goes stale and loses its claims; it checks its claim before recording anything, so a stale
  owner's result is discarded, never recorded over another's.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from filelock import FileLock

from shared.protocol.durable import atomic_write_json
from shared.protocol.layout import READY, RunLayout
from shared.protocol.manifest import CheckpointInvalid


def _read_first_line(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.readline().strip() or None
    except OSError:
        return None


def proc_stat(pid: int | str) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (field 3, the state, first); None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _process_start_ticks(pid: int) -> str | None:
    # Field 22 of /proc/<pid>/stat is the start time; it tells a reused pid from the original.
    fields = proc_stat(pid)
    return fields[19] if fields and len(fields) > 19 else None


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


_OWNER_ID = uuid.uuid4().hex[:16]


def current_owner() -> dict[str, Any]:
    """This process: a random id (unique across hosts and containers) plus what lets a process on the
    same kernel and pid namespace prove it dead early."""
    return {
        "id": _OWNER_ID,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "start": _process_start_ticks(os.getpid()),
        "boot_id": _read_first_line("/proc/sys/kernel/random/boot_id"),
        "pid_ns": _pid_namespace(),
    }


def _provably_gone(owner: dict[str, Any]) -> bool:
    """True only where we share the owner's kernel and pid namespace and its process no longer exists."""
    me = current_owner()
    if not owner.get("boot_id") or owner.get("boot_id") != me["boot_id"] or owner.get("pid_ns") != me["pid_ns"]:
        return False
    pid = owner.get("pid")
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    start = _process_start_ticks(pid)
    return owner.get("start") is not None and start is not None and start != owner["start"]


def describe_owner(owner: dict[str, Any]) -> str:
    return f"pid {owner.get('pid')} on {owner.get('host')} (owner {owner.get('id')})"


# --------------------------------------------------------------------------------------
# Presence: one heartbeat file per evaluator process and run; leases are the steps it lists.

DEFAULT_HEARTBEAT_TIMEOUT_S = 60.0


def _presence_alive(record: dict[str, Any], now: float) -> bool:
    try:
        fresh = now - float(record["heartbeat_time"]) <= float(record["timeout_s"])
    except (KeyError, TypeError, ValueError):
        return False
    return fresh and not _provably_gone(record.get("owner", {}))


def live_presences(layout: RunLayout) -> dict[str, dict[str, Any]]:
    """{owner id: presence record} of the evaluator processes of this run whose heartbeat is fresh.
    Files of owners provably dead are removed; stale ones (frozen, or on a host that died) are ignored."""
    found: dict[str, dict[str, Any]] = {}
    if not layout.leases_dir.is_dir():
        return found
    now = time.time()
    for path in layout.leases_dir.glob("*.json"):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # being replaced right now: the next look sees it
        if not isinstance(record, dict):
            continue
        if _presence_alive(record, now):
            found[record["owner"]["id"]] = record
        elif _provably_gone(record.get("owner", {})):
            path.unlink(missing_ok=True)
    return found


def owner_alive(layout: RunLayout, owner: dict[str, Any]) -> bool:
    """Is the evaluator that claimed something (its ledger entry's owner) still alive?"""
    return owner.get("id") in live_presences(layout)


class Presence:
    """An evaluator process's heartbeat in a run (`leases/<owner id>.json`), rewritten every
    timeout_s / 6 by a thread, and the steps it holds against deletion (`with presence.lease(step)`).

    `watching`: a watcher of the run (its evaluation `eval_name` counts as attached: the trainer's
    retention keeps steps it has not seen); `backfill`: it means to evaluate every step."""

    def __init__(
        self,
        layout: RunLayout,
        eval_name: str | None,
        *,
        watching: bool,
        backfill: bool,
        timeout_s: float = DEFAULT_HEARTBEAT_TIMEOUT_S,
    ):
        self.layout = layout
        self.owner = current_owner()
        self.path = layout.leases_dir / f"{self.owner['id']}.json"
        self.info = {"eval_name": eval_name, "watching": watching, "backfill": backfill, "timeout_s": timeout_s}
        self.steps: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self) -> None:
        with self._lock:
            record = {**self.info, "owner": self.owner, "steps": sorted(self.steps), "heartbeat_time": time.time()}
            self.path.parent.mkdir(
                parents=True, exist_ok=True
            )  # removed meanwhile (a run folder deleted and made again)
            atomic_write_json(self.path, record)

    def start(self) -> "Presence":
        self.layout.leases_dir.mkdir(parents=True, exist_ok=True)
        self._write()
        self._thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.info["timeout_s"] / 6):
            try:
                self._write()
            except OSError as exc:  # a full or vanished disk: we go stale, and say so
                print(f"warning: heartbeat {self.path}: {exc}")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.path.unlink(missing_ok=True)

    def lease(self, step: int) -> "_Lease":
        return _Lease(self, step)


class _Lease:
    def __init__(self, presence: Presence, step: int):
        self.presence, self.step = presence, step

    def __enter__(self) -> "_Lease":
        """Hold the step, then check it still exists: retention decides under the same lock, so a step
        seen here is kept until __exit__."""
        layout = self.presence.layout
        with FileLock(str(layout.leases_dir / ".lock")):
            with self.presence._lock:
                self.presence.steps.add(self.step)
            try:
                self.presence._write()
            except BaseException:
                with self.presence._lock:
                    self.presence.steps.discard(self.step)
                raise
            if not (layout.checkpoint_dir(self.step) / READY).exists():
                self.__exit__()
                raise CheckpointInvalid(f"{layout.checkpoint_dir(self.step)}: deleted before it could be evaluated")
        return self

    def __exit__(self, *exc: Any) -> None:
        with self.presence._lock:
            self.presence.steps.discard(self.step)
        self.presence._write()
