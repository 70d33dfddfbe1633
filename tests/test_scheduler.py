"""Scheduling decisions over a real ledger file and real heartbeats (the evaluator's processes are tested elsewhere)."""

import os
import uuid

import pytest

from evaluator.scheduler import claim_next, claim_step, give_back, give_back_failed
from shared.protocol import Ledger, Liveness, Presence, RunLayout, Status, current_owner


@pytest.fixture
def run(tmp_path):
    layout = RunLayout(tmp_path / "run")
    layout.checkpoints_dir.mkdir(parents=True)
    return layout


def alive_in(layout, timeout_s=60.0):
    return Liveness(layout, timeout_s, current_owner()["id"]).alive


def ready(*steps, weights="w1"):
    return dict.fromkeys(steps, weights)


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


def test_interrupted_step_is_retried_until_max_attempts_then_failed(run):
    ledger = Ledger(run.eval_dir("default"))
    ledger.set(4, Status.RUNNING, owner=dead_owner(), attempts=1, weights_id="w1")
    ledger.set(2, Status.DONE, weights_id="w1")
    got = claim(ledger, run, ready(2, 4, 6), max_attempts=2)
    assert (got.step, got.interrupted) == (4, True)  # before the newer 6
    assert ledger.read()[4]["attempts"] == 2
    ledger.update(lambda e: e[4].update(owner=dead_owner()))
    got = claim(ledger, run, ready(2, 4, 6), max_attempts=2)
    assert got.step == 6
    assert ledger.read()[4]["status"] == Status.FAILED and "2 attempts failed" in ledger.read()[4]["reason"]


def test_a_claim_is_kept_while_its_owner_is_present_and_taken_once_it_is_gone(run):
    ledger = Ledger(run.eval_dir("default"))
    other = Presence(run, "default", watching=True, backfill=False, timeout_s=60)
    other.owner = {**other.owner, "id": "someone-else"}  # a second evaluator: its own id, its own record
    other.path = run.presence_dir / "someone-else.json"
    other.start()
    try:
        alive = alive_in(run)  # the staleness clock itself is tested in tests/test_presence.py
        ledger.set(6, Status.RUNNING, owner=other.owner, attempts=1, weights_id="w1")
        assert claim_next(ledger, ready(6), alive=alive, backfill=False, newest_first=True) is None
        assert claim_next(ledger, ready(6), alive=alive, backfill=False, newest_first=False) is None
    finally:
        other.stop()  # its record removed: nothing of it runs
    got = claim_next(ledger, ready(6), alive=alive, backfill=False, newest_first=True)
    assert (got.step, got.interrupted) == (6, True)


def test_a_transient_failure_gives_the_step_back_with_its_reason_until_max_attempts(run):
    ledger = Ledger(run.eval_dir("default"))
    me = current_owner()["id"]
    for attempt in (1, 2):
        got = claim(ledger, run, ready(4) if attempt == 1 else ready(4, 6), max_attempts=3)
        assert got.step == 4 and got.interrupted == (attempt > 1)  # given back: first, before the newer 6
        assert give_back_failed(ledger, 4, me, f"oom {attempt}", 3) == Status.PENDING
        entry = ledger.read()[4]
        assert entry["given_back"] and entry["attempts"] == attempt
        assert [a["reason"] for a in entry["failed_attempts"]] == [f"oom {n}" for n in range(1, attempt + 1)]
    got = claim(ledger, run, ready(4), max_attempts=3)
    assert (got.step, got.interrupted) == (4, True) and ledger.read()[4]["attempts"] == 3
    assert give_back_failed(ledger, 4, me, "oom 3", 3) == Status.FAILED
    entry = ledger.read()[4]
    assert entry["status"] == Status.FAILED and entry["reason"] == "3 attempts failed; the last: oom 3"
    assert len(entry["failed_attempts"]) == 3 and claim(ledger, run, ready(4), max_attempts=3) is None
    assert give_back_failed(ledger, 4, me, "late", 3) is None  # not held: nothing changes


def test_a_step_of_another_evaluation_config_is_not_yet_evaluated(run):
    ledger = Ledger(run.eval_dir("default"))
    ledger.set(4, Status.DONE, weights_id="w1", eval_config_id="old")
    assert claim(ledger, run, ready(4), config_id="old") is None
    got = claim(ledger, run, ready(4), config_id="new")
    assert got.step == 4 and got.reconfigured and not got.replaced
    assert ledger.read()[4]["eval_config_id"] == "new" and ledger.read()[4]["attempts"] == 1
    ledger.set(5, Status.DONE, weights_id="w1", eval_config_id="old")
    assert claim_step(ledger, 5, "w1", alive=alive_in(run), force=False, config_id="old") == (
        False,
        "already evaluated",
    )
    assert claim_step(ledger, 5, "w1", alive=alive_in(run), force=False, config_id="new") == (True, "")


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
