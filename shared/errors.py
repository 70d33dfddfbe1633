"""The base class of every error a user can fix (bad config, data, path, checkpoint, a run in use...).

`shared.launch.run_main` prints a `UserError` as one line and exits 2; any other exception is a bug and keeps its
traceback (exit 1). Each package's own errors subclass it; this module imports nothing, so anything may use it.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; its message names the file, line, key or path, and says what to do."""
