"""Linux's /proc/<pid>/stat, read in one place: a process's fields, its parent, a process's children.

The command name (field 2) is in parentheses and may itself hold spaces and parentheses: the fields are what follows
its last ")". A process that ends while it is read is simply not there (None, or left out of a listing).
"""

from __future__ import annotations

import os
from pathlib import Path

PROC = Path("/proc")


def proc_stat(pid: int | str) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (field 3, the state, first); None if gone."""
    try:
        return (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def parent_pids() -> dict[int, int]:
    """Every process's parent pid (field 4 of its stat), by pid."""
    parents = {}
    for entry in os.scandir(PROC):
        if entry.name.isdigit() and (fields := proc_stat(entry.name)) is not None:
            parents[int(entry.name)] = int(fields[1])
    return parents


def child_pids(parent: int) -> list[int]:
    """The processes whose parent is `parent`, in pid order."""
    return sorted(pid for pid, ppid in parent_pids().items() if ppid == parent)
