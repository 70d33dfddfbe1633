"""Process start-up shared by both services: GPU pinning and one-line errors.

`pin_gpus` must run before torch is imported: CUDA reads CUDA_VISIBLE_DEVICES once, at its first use.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import traceback
from typing import Callable


class UsageError(Exception):
    """A problem the user can fix (bad path, missing GPU...): printed as one line, exit status 2."""


def physical_gpu_count() -> int:
    """GPUs on this machine, read without importing torch (nvidia-smi); 0 when there is none."""
    if not shutil.which("nvidia-smi"):
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
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


def run_main(main: Callable[[], int | None], expected: tuple[type[BaseException], ...]) -> None:
    """Run a service's main; the expected errors print one line (a traceback only with --debug)."""
    debug = "--debug" in sys.argv or os.environ.get("MATH_SFT_DEBUG") == "1"
    try:
        sys.exit(main() or 0)
    except KeyboardInterrupt:  # Ctrl-C before the service installed its own handling
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except expected + (UsageError,) as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
