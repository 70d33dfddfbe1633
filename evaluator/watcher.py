"""Filesystem events as wake-up calls for the evaluator's main loop.

An event is a hint that something under the checkpoint folder changed, never a statement of what:
inotify reports `step_N/READY` created before the rename of `.tmp_step_N` that put it there, loses
events when its queue overflows, and sees nothing on network filesystems. So the handler only
wakes the main loop, which then looks at the disk (and rescans every `rescan_s` regardless).
The handler runs in the observer's thread and must never do work there.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import queue
import warnings
from pathlib import Path

from watchdog.events import EVENT_TYPE_CLOSED_NO_WRITE, EVENT_TYPE_OPENED, FileSystemEvent, FileSystemEventHandler
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from shared.protocol import READY, TMP_PREFIX

log = logging.getLogger(__name__)

# The trainer makes `.tmp_step_N` and `.tmp_step_N/trainer_state` microseconds apart; watchdog can then add the
# watch of the inner folder twice (its walk of the new folder and the inner folder's own event), gets the same
# watch back from the kernel and warns. Harmless, but the warning names a temporary folder in our log, and
# under `-W error` it would kill the observer's thread. Process-wide: the observer thread must see it too.
warnings.filterwarnings(
    "ignore", message=r"Callback with id .* already exists for watch", category=RuntimeWarning, module=r"watchdog\."
)

_WATCH_LIMIT_ERRNOS = {errno.ENOSPC, errno.EMFILE, errno.ENFILE}
_READS = {EVENT_TYPE_OPENED, EVENT_TYPE_CLOSED_NO_WRITE}


class _WakeHandler(FileSystemEventHandler):
    def __init__(self, wake: queue.Queue):
        self.wake = wake

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in _READS:
            return  # our own loop reads READY manifests: waking on reads would spin it forever
        paths = [event.src_path, getattr(event, "dest_path", "") or ""]
        names = [Path(p if isinstance(p, str) else p.decode()).name for p in paths if p]
        # READY appearing (created or moved into place) or a step folder renamed into place.
        if any(n == READY or (n.startswith("step_") and not n.startswith(TMP_PREFIX)) for n in names):
            with contextlib.suppress(queue.Full):  # a wake-up is already pending; the loop rescans the disk anyway
                self.wake.put_nowait(event.event_type)


class CheckpointWatcher:
    """Watches `directory` recursively; `wait(timeout_s)` returns when something may have changed."""

    def __init__(self, directory: Path, kind: str, polling_interval_s: float = 1.0):
        self.directory = directory
        self.wake: queue.Queue = queue.Queue(maxsize=1)
        self.kind, self.observer = self._start(kind, polling_interval_s)

    def _start(self, kind: str, polling_interval_s: float) -> tuple[str, BaseObserver]:
        if kind in ("auto", "inotify"):
            from watchdog.observers import Observer

            observer = Observer()
            try:
                observer.schedule(_WakeHandler(self.wake), str(self.directory), recursive=True)
                observer.start()
                return "native", observer
            except OSError as exc:
                if exc.errno not in _WATCH_LIMIT_ERRNOS:
                    raise
                log.warning(
                    "cannot watch %s with inotify (%s; raise fs.inotify.max_user_watches to fix): "
                    "falling back to polling",
                    *(self.directory, exc.strerror),
                )
        observer = PollingObserver(timeout=polling_interval_s)
        observer.schedule(_WakeHandler(self.wake), str(self.directory), recursive=True)
        observer.start()
        return "polling", observer

    def wait(self, timeout_s: float) -> bool:
        """True if an event arrived, False on timeout (time for a rescan)."""
        try:
            self.wake.get(timeout=timeout_s)
            return True
        except queue.Empty:
            return False

    def stop(self) -> None:
        self.observer.stop()
        self.observer.join(timeout=5)
