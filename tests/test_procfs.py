"""shared.procfs on real processes: a child whose command name holds spaces and parentheses is still found."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from shared.procfs import child_pids, parent_pids, proc_stat


def test_fields_parent_and_children_of_real_processes(tmp_path):
    odd = tmp_path / "a b) (c"  # the command name /proc shows: spaces and parentheses inside its own
    shutil.copy(sys.executable, odd)
    odd.chmod(0o755)
    code = "import subprocess, sys, time; subprocess.Popen(['sleep', '30']); print('ok', flush=True); time.sleep(30)"
    proc = subprocess.Popen([str(odd), "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ok"
        fields = proc_stat(proc.pid)
        assert fields is not None and fields[0] in "RS" and int(fields[1]) == os.getpid()
        assert proc.pid in child_pids(os.getpid()) and parent_pids()[proc.pid] == os.getpid()
        (grandchild,) = child_pids(proc.pid)
        assert proc_stat(grandchild)[1] == str(proc.pid)
    finally:
        for pid in child_pids(proc.pid):
            os.kill(pid, 9)
        proc.kill()
        proc.wait()
    assert proc_stat(proc.pid) is None and proc.pid not in child_pids(os.getpid())
