"""Scheduling decisions over a real ledger file and real heartbeats (the evaluator's processes are tested elsewhere)."""

import json
import os
import uuid

import pytest

from evaluator.scheduler import MAX_ATTEMPTS, claim_next, claim_step, give_back
from shared.protocol import Ledger, Presence, RunLayout, Status, current_owner, owner_alive


@pytest.fixture
def run(tmp_path):
    layout = RunLayout(tmp_path / "run")
    layout.checkpoints_dir.mkdir(parents=True)
    return layout


def alive_in(layout):
    return lambda owner: owner.get("id") == current_owner()["id"] or owner_alive(layout, owner)


def ready(*steps, weights="w1"):
    return {s: weights for s in steps}


def dead_owner():
    """An owner with no heartbeat anywhere: a process that died (or a host that went away)."""
    return {"id": uuid.uuid4().hex[:16], "host": "elsewhere", "pid": 1, "start": None}


def claim(ledger, layout, steps, **kw):
    kw.setdefault("backfill", False)
    kw.setdefault("newest_first", True)
    return claim_next(ledger, steps, alive=alive_in(layout), **kw)


def test_newest_first_skips_older_and_reports_it(run):
    ledger = Ledger(run.eval_dir("default"))
    got = claim(ledger, run, ready(2, 4, 6))
    assert got.step == 6 and not got.interrupted and got.passed_over == {2: Status.SKIPPED, 4: Status.SKIPPED}
    entries = ledger.read()
    assert entries[6]["status"] == Status.RUNNING and entries[6]["owner"]["pid"] == os.getpid()
    assert entries[6]["weights_id"] == "w1"
    assert entries[2]["status"] == entries[4]["status"] == Status.SKIPPED
    assert "passed over for newer step 6" in entries[2]["reason"]
    assert claim(ledger, run, ready(2, 4, 6)) is None  # 6 is ours, running


def test_backfill_takes_passed_over_steps_newest_first_when_nothing_newer(run):
    ledger = Ledger(run.eval_dir("default"))
    assert claim(ledger, run, ready(2, 4, 6), backfill=True).step == 6
    assert ledger.read()[2]["status"] == Status.PENDING
    ledger.set(6, Status.DONE, weights_id="w1")
    # a newer step arrives: it goes first, then the back-fill, newest first
    assert claim(ledger, run, ready(2, 4, 6, 8), backfill=True).step == 8
    ledger.set(8, Status.DONE, weights_id="w1")
    assert claim(ledger, run, ready(2, 4, 6, 8), backfill=True).step == 4
    ledger.set(4, Status.DONE, weights_id="w1")
    assert claim(ledger, run, ready(2, 4, 6, 8), backfill=True).step == 2
    ledger.set(2, Status.DONE, weights_id="w1")
    assert claim(ledger, run, ready(2, 4, 6, 8), backfill=True) is None


def test_after_the_fact_fills_in_everything_missing_oldest_first(run):
    ledger = Ledger(run.eval_dir("default"))
    ledger.set(2, Status.DONE, weights_id="w1")
    ledger.set(4, Status.SKIPPED, weights_id="w1")
    ledger.set(6, Status.FAILED, reason="bad", weights_id="w1")
    order = []
    while (got := claim(ledger, run, ready(2, 4, 6, 8, 10), newest_first=False)) is not None:
        order.append(got.step)
        ledger.set(got.step, Status.DONE, weights_id="w1")
    assert order == [4, 8, 10]  # failed ones are not retried automatically


def test_interrupted_step_is_retried_once_then_failed(run):
    ledger = Ledger(run.eval_dir("default"))
    ledger.set(4, Status.RUNNING, owner=dead_owner(), attempts=1, weights_id="w1")
    ledger.set(2, Status.DONE, weights_id="w1")
    got = claim(ledger, run, ready(2, 4, 6))
    assert (got.step, got.interrupted) == (4, True)  # before the newer 6
    assert ledger.read()[4]["attempts"] == MAX_ATTEMPTS
    ledger.update(lambda e: e[4].update(owner=dead_owner()))
    got = claim(ledger, run, ready(2, 4, 6))
    assert got.step == 6
    assert ledger.read()[4]["status"] == Status.FAILED


def test_a_claim_is_alive_while_its_owner_heartbeats_and_dead_when_it_goes_stale(run):
    ledger = Ledger(run.eval_dir("default"))
    other = Presence(run, "default", watching=True, backfill=False, timeout_s=60).start()
    try:
        owner = {**other.owner, "id": "someone-else"}
        other.owner = owner  # a second evaluator: its own id, its own heartbeat file
        other.path = run.leases_dir / "someone-else.json"
        other._write()
        ledger.set(6, Status.RUNNING, owner=owner, attempts=1, weights_id="w1")
        assert claim(ledger, run, ready(6)) is None
        assert claim(ledger, run, ready(6), newest_first=False) is None
        stale = {**json.loads(other.path.read_text()), "heartbeat_time": 0}
        other.stop()
        other.path.write_text(json.dumps(stale))  # frozen: the file is there, the heartbeat is old
        got = claim(ledger, run, ready(6))
        assert (got.step, got.interrupted) == (6, True)
    finally:
        other.stop()


def test_given_back_step_is_first_pending_and_not_an_attempt(run):
    ledger = Ledger(run.eval_dir("default"))
    assert claim(ledger, run, ready(4)).step == 4
    give_back(ledger, 4, current_owner()["id"])
    entry = ledger.read()[4]
    assert entry["status"] == Status.PENDING and entry["given_back"] and entry["attempts"] == 0
    got = claim(ledger, run, ready(4, 6))  # before the newer unseen 6, and 4 is not skipped
    assert (got.step, got.interrupted) == (4, True) and ledger.read()[4]["attempts"] == 1
    assert 6 not in ledger.read()


def test_replaced_weights_are_evaluated_again(run):
    ledger = Ledger(run.eval_dir("default"))
    ledger.set(4, Status.DONE, weights_id="old")
    assert claim(ledger, run, ready(4, weights="old")) is None
    got = claim(ledger, run, ready(4, weights="new"))
    assert got.step == 4 and got.replaced and ledger.read()[4]["weights_id"] == "new"


def test_a_step_whose_ready_vanished_is_not_claimed(run):
    ledger = Ledger(run.eval_dir("default"))
    assert claim(ledger, run, ready(2, 4), is_ready=lambda step: step != 4).step == 2


def test_force_re_evaluates_done_steps(run):
    ledger = Ledger(run.eval_dir("default"))
    ledger.set(2, Status.DONE, weights_id="w1")
    assert claim(ledger, run, ready(2), newest_first=False) is None
    assert claim(ledger, run, ready(2), newest_first=False, force=frozenset({2})).step == 2


def test_claim_step_never_over_a_live_claim_or_other_weights(run):
    ledger = Ledger(run.eval_dir("default"))
    alive = alive_in(run)
    ledger.set(3, Status.RUNNING, owner=current_owner(), weights_id="a")  # a live evaluator (this process)
    assert claim_step(ledger, 3, "a", alive=lambda o: True, force=True)[0] is False
    ledger.set(3, Status.DONE, weights_id="a")
    assert claim_step(ledger, 3, "a", alive=alive, force=False) == (False, "already evaluated")
    claimed, why = claim_step(ledger, 3, "b", alive=alive, force=False)
    assert not claimed and "other weights (a" in why and "--force" in why
    assert claim_step(ledger, 3, "b", alive=alive, force=True) == (True, "")
    assert ledger.read()[3]["weights_id"] == "b"
