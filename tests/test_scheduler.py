"""Scheduling decisions over a real ledger file (the evaluator's processes are tested elsewhere)."""

import os
import subprocess
import sys

from evaluator.scheduler import MAX_ATTEMPTS, claim_next
from shared.protocol import Ledger, Status, current_owner


def dead_owner():
    pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout)
    return {"host": os.uname().nodename, "pid": pid, "start": None}


def test_newest_first_skips_older(tmp_path):
    ledger = Ledger(tmp_path)
    claim = claim_next(ledger, [2, 4, 6], backfill=False, newest_first=True)
    assert claim.step == 6 and not claim.interrupted
    entries = ledger.read()
    assert entries[6]["status"] == Status.RUNNING and entries[6]["owner"]["pid"] == os.getpid()
    assert entries[2]["status"] == entries[4]["status"] == Status.SKIPPED
    assert "passed over for newer step 6" in entries[2]["reason"]
    assert claim_next(ledger, [2, 4, 6], backfill=False, newest_first=True) is None  # 6 is ours, running


def test_backfill_takes_passed_over_steps_newest_first_when_nothing_newer(tmp_path):
    ledger = Ledger(tmp_path)
    assert claim_next(ledger, [2, 4, 6], backfill=True, newest_first=True).step == 6
    assert ledger.read()[2]["status"] == Status.PENDING
    ledger.set(6, Status.DONE)
    # a newer step arrives: it goes first, then the back-fill, newest first
    assert claim_next(ledger, [2, 4, 6, 8], backfill=True, newest_first=True).step == 8
    ledger.set(8, Status.DONE)
    assert claim_next(ledger, [2, 4, 6, 8], backfill=True, newest_first=True).step == 4
    ledger.set(4, Status.DONE)
    assert claim_next(ledger, [2, 4, 6, 8], backfill=True, newest_first=True).step == 2
    ledger.set(2, Status.DONE)
    assert claim_next(ledger, [2, 4, 6, 8], backfill=True, newest_first=True) is None


def test_after_the_fact_fills_in_everything_missing_oldest_first(tmp_path):
    ledger = Ledger(tmp_path)
    ledger.set(2, Status.DONE)
    ledger.set(4, Status.SKIPPED)
    ledger.set(6, Status.FAILED, reason="bad")
    order = []
    while (claim := claim_next(ledger, [2, 4, 6, 8, 10], backfill=False, newest_first=False)) is not None:
        order.append(claim.step)
        ledger.set(claim.step, Status.DONE)
    assert order == [4, 8, 10]  # failed ones are not retried automatically


def test_interrupted_step_is_retried_once_then_failed(tmp_path):
    ledger = Ledger(tmp_path)
    ledger.set(4, Status.RUNNING, owner=dead_owner(), attempts=1)
    ledger.set(2, Status.DONE)
    claim = claim_next(ledger, [2, 4, 6], backfill=False, newest_first=True)
    assert (claim.step, claim.interrupted) == (4, True)  # before the newer 6
    assert ledger.read()[4]["attempts"] == MAX_ATTEMPTS
    ledger.update(lambda e: e[4].update(owner=dead_owner()))
    claim = claim_next(ledger, [2, 4, 6], backfill=False, newest_first=True)
    assert claim.step == 6
    assert ledger.read()[4]["status"] == Status.FAILED


def test_live_owner_keeps_its_claim(tmp_path):
    ledger = Ledger(tmp_path)
    ledger.set(6, Status.RUNNING, owner=current_owner())
    assert claim_next(ledger, [6], backfill=False, newest_first=True) is None
    assert claim_next(ledger, [6], backfill=False, newest_first=False) is None


def test_force_re_evaluates_done_steps(tmp_path):
    ledger = Ledger(tmp_path)
    ledger.set(2, Status.DONE)
    assert claim_next(ledger, [2], backfill=False, newest_first=False) is None
    assert claim_next(ledger, [2], backfill=False, newest_first=False, force=frozenset({2})).step == 2
