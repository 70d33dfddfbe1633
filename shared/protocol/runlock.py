"""The run lock: one trainer per run directory.

Invariant: the lock is an OS file lock, released by the kernel when its holder dies, so a crash never leaves
the run locked.
"""

from __future__ import annotations

import json
import time
from typing import Any

from filelock import FileLock

from shared.protocol.durable import atomic_write_json
from shared.protocol.layout import RunLayout
from shared.protocol.presence import current_owner, describe_owner


class ResumeError(ValueError):
    """A run cannot be resumed as configured (e.g. another number of training processes)."""


class RunInUse(RuntimeError):
    """Another trainer holds the run directory."""


class TrainerLock:
    """`with TrainerLock(layout): ...` or RunInUse naming the holder. An OS file lock: released by the
    kernel when the holder dies, so a crash never leaves the run locked."""

    def __init__(self, layout: RunLayout):
        self.layout = layout
        self.info_path = layout.run_dir / ".trainer.json"
        self._lock = FileLock(str(layout.trainer_lock_path))

    def __enter__(self) -> "TrainerLock":
        from filelock import Timeout

        self.layout.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            try:
                holder = json.loads(self.info_path.read_text())
                started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["time"]))
                who = f"{describe_owner(holder)}, started {started}"
            except (OSError, ValueError, KeyError):
                who = "another process"
            raise RunInUse(
                f"{self.layout.run_dir}: another trainer is training this run ({who}); "
                "stop it first, or choose another run_name"
            ) from None
        atomic_write_json(self.info_path, {**current_owner(), "time": time.time()})
        return self

    def __exit__(self, *exc: Any) -> None:
        self.info_path.unlink(missing_ok=True)
        self._lock.release()
