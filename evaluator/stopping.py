"""Stopping the evaluator: SIGINT/SIGTERM raise `Stop`, except while records are being written.

Invariant: results, ledger and W&B of one step are written together or not at all; a stop requested inside
`stop_deferred()` is raised when that block ends.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager


class Stop(BaseException):
    """SIGINT/SIGTERM: stop taking work, drop the evaluation in progress, exit 0. A BaseException, like
    KeyboardInterrupt: the `except Exception` of a loader or an engine start must not turn it into a failure."""


_stop_state = {"deferred": False, "requested": False}


def _raise_stop(signum, frame):
    if _stop_state["deferred"]:
        _stop_state["requested"] = True  # raised when the records being written are complete
        return
    raise Stop()


@contextmanager
def stop_deferred() -> Iterator[None]:
    """Results, ledger and W&B are written together or not at all: a stop waits for the end of this block."""
    _stop_state["deferred"] = True
    try:
        yield
    finally:
        _stop_state["deferred"] = False
        requested, _stop_state["requested"] = _stop_state["requested"], False
        if requested:
            raise Stop()


def install_stop_handlers() -> None:
    signal.signal(signal.SIGINT, _raise_stop)
    signal.signal(signal.SIGTERM, _raise_stop)
