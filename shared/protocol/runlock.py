"""The run lock: one trainer per run directory.

Invariants:
- The lock is an OS file lock (flock) on runs/<run>/.trainer.lock, released by the kernel when its holder dies,
  so a crash never leaves the run locked. The lock file itself is never deleted while the run exists.
- A new run directory appears with its lock already held: it is made under a temporary name, locked inside and
  renamed into place (a rename onto an existing non-empty folder fails), so two trainers starting on a new run at
  the same moment never both think they created it; the one that loses only removes its own temporary folder.
- A refused trainer deletes nothing. A trainer that created the run and fails to start removes the run again
  unless something of value is in it (a published checkpoint, an evaluation's folder).
- Whoever locks a file checks that the locked file still is the run's lock file (the run may have been removed
  and made anew meanwhile); if not, it starts again.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from shared.errors import UserError
from shared.protocol.durable import atomic_write_json, fsync_dir
from shared.protocol.layout import TMP_PREFIX, RunLayout
from shared.protocol.manifest import list_ready_checkpoints

# Fault injection (tests of two trainers starting at once): the one reader of this variable. When set to a path,
# a trainer about to take the run lock creates <path>.<pid> (it has arrived), then waits until <path> exists.
_START_BARRIER_ENV = "MATH_SFT_FAULT_START_BARRIER"


class ResumeError(UserError, ValueError):
    """A run cannot be resumed as configured (e.g. another number of training processes)."""


class RunInUse(UserError, RuntimeError):
    """Another trainer holds the run directory."""


_HELD_HERE: dict[Path, TrainerLock] = {}
"""Run locks this process holds, by lock path: taking one again (python -m trainer takes it before train() does)
only nests."""


class TrainerLock:
    """`with TrainerLock(layout): ...` or RunInUse naming the holder. Creates the run directory when there is
    none, atomically with the lock (see the module's invariants). Nested use in one process only nests."""

    def __init__(self, layout: RunLayout):
        self.layout = layout
        self.created = False
        """True when this lock made the run directory (it then removes it again after a failed start)."""
        self._fd: int | None = None
        self._outer: TrainerLock | None = None

    def __enter__(self) -> TrainerLock:
        key = self.layout.trainer_lock_path.absolute()
        if key in _HELD_HERE:
            self._outer = _HELD_HERE[key]
            return self
        _wait_at_start_barrier()
        for _ in range(10):  # each round ends locked, refused, or on a run removed and made anew meanwhile
            if not self.layout.run_dir.exists() and self._create_locked():
                break
            if self._lock_existing():
                break
        else:
            raise RunInUse(f"{self.layout.run_dir}: the run directory keeps being removed and made again; retry")
        _HELD_HERE[key] = self
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if self._outer is not None:
            return
        del _HELD_HERE[self.layout.trainer_lock_path.absolute()]
        try:
            if exc_type is not None and self.created and not _worth_keeping(self.layout):
                shutil.rmtree(self.layout.run_dir, ignore_errors=True)  # a failed start leaves no half-made run
            else:
                self.layout.trainer_info_path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)  # releases the lock
            self._fd = None

    def _create_locked(self) -> bool:
        """Make the run directory with the lock held inside; False when another trainer's appeared first."""
        run_dir = self.layout.run_dir
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = run_dir.with_name(f"{TMP_PREFIX}{run_dir.name}.{uuid.uuid4().hex[:12]}")
        tmp.mkdir()
        fd = os.open(tmp / self.layout.trainer_lock_path.name, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # nobody else knows this folder: never refused
        atomic_write_json(tmp / self.layout.trainer_info_path.name, _holder())
        try:
            os.rename(tmp, run_dir)  # the lock (on the file, not its name) moves with it
        except OSError as exc:
            os.close(fd)
            shutil.rmtree(tmp, ignore_errors=True)
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                return False  # another trainer's run directory is there now: lock that one (and be refused)
            raise
        fsync_dir(run_dir.parent)
        self._fd, self.created = fd, True
        return True

    def _lock_existing(self) -> bool:
        """Lock the existing run's lock file; RunInUse naming the holder if another trainer has it. False when the
        file locked is no longer the run's lock file (the run was removed meanwhile): start again."""
        path = self.layout.trainer_lock_path
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            return False  # the run directory went away after we looked: start again
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunInUse(
                f"{self.layout.run_dir}: another trainer is training this run ({self._holder_text()}); "
                "stop it first, or choose another run_name"
            ) from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            return False
        atomic_write_json(self.layout.trainer_info_path, _holder())
        self._fd = fd
        return True

    def _holder_text(self) -> str:
        try:
            holder = json.loads(self.layout.trainer_info_path.read_text())
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["time"]))
            return f"pid {holder['pid']} on {holder['host']}, started {started}"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"


def _holder() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}


def _worth_keeping(layout: RunLayout) -> bool:
    """Something in the run that a failed start must not remove: a published checkpoint, an evaluation's folder
    (an evaluator may already work in the run), an evaluator's presence."""
    evaluated = layout.evals_dir.exists() or layout.presence_dir.exists()
    return evaluated or bool(list_ready_checkpoints(layout.checkpoints_dir))


def _wait_at_start_barrier() -> None:
    barrier = os.environ.get(_START_BARRIER_ENV)
    if not barrier:
        return
    Path(f"{barrier}.{os.getpid()}").touch()
    while not Path(barrier).exists():
        time.sleep(0.01)
