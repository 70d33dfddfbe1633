"""Process start-up shared by both services: GPU pinning, logging, and one line for a user's error.

`pin_gpus` must run before torch is imported: CUDA reads CUDA_VISIBLE_DEVICES once, at its first use.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable

from shared.errors import UserError
from shared.logs import debug_requested, setup_logging

log = logging.getLogger(__name__)


class UsageError(UserError):
    """A bad command line or machine for it (a path that is not there, a GPU that does not exist...)."""


def physical_gpu_count() -> int:
    """GPUs on this machine, read without importing torch (nvidia-smi); 0 when there is none."""
    if not shutil.which("nvidia-smi"):
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], check=False, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def pin_gpus(gpus: list[int], key: str) -> str:
    """Set CUDA_VISIBLE_DEVICES from the config unless the user already set it. Returns a description."""
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']} (set by you; {key} ignored)"
    count = physical_gpu_count()
    if count == 0:
        return "no GPU found: running on CPU"
    missing = [g for g in gpus if g >= count]
    if missing:
        raise UsageError(f"{key}={gpus}: GPU {missing[0]} does not exist; this machine has {count} (0-{count - 1})")
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
    return f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']} (from {key})"


def run_main(main: Callable[[], int | None], service: str) -> None:
    """Run a service's main with the project's logging (`--debug` or MATH_SFT_DEBUG=1: DEBUG lines).

    A `UserError` (the project's own errors: config, data, checkpoint, run in use, engine...) is one line on
    stderr and exit status 2, its traceback only with debug; any other exception is a bug: it keeps its traceback
    and says so, exit status 1. `main` may call `setup_logging` again once it knows the run directory.
    """
    debug = debug_requested()
    setup_logging(service, debug=debug)
    try:
        sys.exit(main() or 0)
    except KeyboardInterrupt:  # Ctrl-C before the service installed its own handling
        log.warning("interrupted")
        sys.exit(130)
    except UserError as exc:
        log.error("%s", exc, exc_info=debug)
        sys.exit(2)
    except Exception as exc:
        log.critical(
            "a bug in %s, not a problem with your input: %s: %s (the traceback follows; please report it)",
            service,
            type(exc).__name__,
            exc,
            exc_info=True,
        )
        sys.exit(1)
