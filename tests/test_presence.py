"""Liveness from progress (shared/protocol/presence.py) with real processes and real files: staleness is judged on
the reader's own monotonic clock, whatever the writer's wall clock says. Timings are bounds with generous slack,
never speed assertions."""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, wait_for
from evaluator.scheduler import claim_next, holds_claim
from shared.protocol import (
    Ledger,
    Liveness,
    Presence,
    RunLayout,
    Status,
    current_owner,
    publish_checkpoint,
    read_presence,
    ready_weights_ids,
)

TIMEOUT_S = 2.0
SLACK_S = 1.5
"""Below TIMEOUT_S on purpose: a reader that compared the writer's clock (off by 2 x TIMEOUT_S) with its own
would be wrong by more than the timeout, which the bounds below then catch."""

WRITER = """
import sys, time
sys.path.insert(0, {repo!r})
from pathlib import Path
import shared.protocol.presence as presence_module
if {other_namespace!r}:  # another container: its pid means nothing to the reader, only its progress counts
    presence_module._pid_namespace = lambda: "pid:[4026530000]"
presence = presence_module.Presence(
    presence_module.RunLayout(Path({run!r})), "default", watching=True, backfill=False, timeout_s={timeout}
).start()
print(presence.owner["id"], flush=True)
while True:
    time.sleep(0.1)
    presence.progress("step 2 main generate", 2)
"""


def start_writer(layout, *, clock_offset_s=0.0, other_namespace=True):
    """A real evaluator-like process that makes progress every 0.1 s; returns it and its owner record."""
    code = WRITER.format(repo=str(REPO), run=str(layout.run_dir), timeout=TIMEOUT_S, other_namespace=other_namespace)
    env = {**os.environ, "MATH_SFT_FAULT_CLOCK_OFFSET_S": str(clock_offset_s)}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    owner_id = proc.stdout.readline().strip()
    return proc, read_presence(layout, owner_id)["owner"]


def watch(liveness, owners, seconds):
    """Ask about every owner every 0.05 s for `seconds`; {owner id: answers}."""
    answers = {owner["id"]: [] for owner in owners}
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for owner in owners:
            answers[owner["id"]].append(liveness.alive(owner))
        time.sleep(0.05)
    return answers


def seconds_until_dead(liveness, owners, limit_s, since):
    """Seconds from `since` (this process's monotonic clock) until each owner is judged dead, asking about every
    owner every 0.05 s (a reader sees a change only when it looks: the bound is the timeout after its last look)."""
    dead_after = {}
    while len(dead_after) < len(owners):
        elapsed = time.monotonic() - since
        assert elapsed < limit_s, f"still alive {limit_s:g} s after it stopped making progress"
        for owner in owners:
            if owner["id"] not in dead_after and not liveness.alive(owner):
                dead_after[owner["id"]] = elapsed
        time.sleep(0.05)
    return [dead_after[owner["id"]] for owner in owners]


@pytest.fixture
def layout(tmp_path):
    run = RunLayout(tmp_path / "run")
    run.run_dir.mkdir()
    return run


@pytest.mark.parametrize("clock_offset_s", [2 * TIMEOUT_S, -2 * TIMEOUT_S], ids=["clock-ahead", "clock-behind"])
def test_a_skewed_clock_neither_kills_a_live_evaluator_nor_keeps_a_dead_one(layout, clock_offset_s):
    """Writers whose clock is 2 x timeout ahead or behind, in another pid namespace: alive while they progress
    (for longer than the timeout), dead within the timeout once killed or frozen (SIGSTOP), alive again when
    the frozen one resumes."""
    killed, killed_owner = start_writer(layout, clock_offset_s=clock_offset_s)
    frozen, frozen_owner = start_writer(layout, clock_offset_s=clock_offset_s)
    try:
        assert abs(read_presence(layout, killed_owner["id"])["time"] - time.time() - clock_offset_s) < 5
        liveness = Liveness(layout, TIMEOUT_S, self_id="reader")
        answers = watch(liveness, [killed_owner, frozen_owner], 1.5 * TIMEOUT_S)
        assert all(answers[killed_owner["id"]]) and all(answers[frozen_owner["id"]])
        stopped_at = time.monotonic()
        killed.kill()
        frozen.send_signal(signal.SIGSTOP)
        killed.wait()
        seconds_until_dead(liveness, [killed_owner, frozen_owner], TIMEOUT_S + SLACK_S, since=stopped_at)
        frozen.send_signal(signal.SIGCONT)
        time.sleep(0.5)  # it writes its progress again
        assert liveness.alive(frozen_owner)
    finally:
        for proc in (killed, frozen):
            proc.kill()
            proc.wait()


def test_a_reader_started_after_the_death_waits_at_most_the_timeout(layout):
    """A new reader has seen no change yet: it counts from its first look, so a dead owner (another namespace,
    its record left behind) looks alive to it for at most the timeout."""
    proc, owner = start_writer(layout)
    proc.kill()
    proc.wait()
    liveness = Liveness(layout, TIMEOUT_S, self_id="reader")
    first_look = time.monotonic()
    assert liveness.alive(owner)
    [dead_after] = seconds_until_dead(liveness, [owner], TIMEOUT_S + SLACK_S, since=first_look)
    assert dead_after >= TIMEOUT_S - 0.1


def test_in_the_same_pid_namespace_a_killed_owner_is_dead_at_once_and_a_frozen_one_after_the_timeout(layout):
    killed, killed_owner = start_writer(layout, other_namespace=False)
    frozen, frozen_owner = start_writer(layout, other_namespace=False)
    try:
        liveness = Liveness(layout, TIMEOUT_S, self_id="reader")
        assert liveness.alive(killed_owner) and liveness.alive(frozen_owner)
        killed.kill()
        killed.wait()
        assert not liveness.alive(killed_owner)  # its pid is gone: no need to wait for the timeout
        frozen.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        assert liveness.alive(frozen_owner)  # its pid exists: only its progress can tell
        [dead_after] = seconds_until_dead(liveness, [frozen_owner], TIMEOUT_S + SLACK_S, since=stopped_at)
        assert dead_after > TIMEOUT_S / 2
    finally:
        for proc in (killed, frozen):
            proc.kill()
            proc.wait()


def test_a_frozen_holder_goes_stale_its_claim_is_taken_and_resumed_it_finds_the_claim_gone(layout):
    """An evaluator frozen (SIGSTOP) while it holds a claim of a published step: the claim names the step's real
    weights id, so it is taken for its owner's staleness alone (a claim of other weights would not count for the
    step anyway). Kept while the owner makes progress, taken once it is judged dead; resumed, the owner is alive
    again and finds that the step is no longer its claim (the fence every change of a claimed step passes)."""
    tmp = layout.tmp_checkpoint_dir(2)
    tmp.mkdir(parents=True)
    (tmp / "model.safetensors").write_bytes(b"weights")
    publish_checkpoint(tmp, layout.checkpoint_dir(2), 2, "cfg")
    ready = ready_weights_ids(layout.checkpoints_dir)
    frozen, owner = start_writer(layout, other_namespace=False)
    try:
        ledger = Ledger(layout.eval_dir("default"))
        ledger.set(2, Status.RUNNING, owner=owner, weights_id=ready[2], attempts=1)
        liveness = Liveness(layout, TIMEOUT_S, self_id="reader")
        assert claim_next(ledger, ready, alive=liveness.alive, backfill=False, newest_first=True) is None
        frozen.send_signal(signal.SIGSTOP)
        seconds_until_dead(liveness, [owner], TIMEOUT_S + SLACK_S, since=time.monotonic())
        got = claim_next(ledger, ready, alive=liveness.alive, backfill=False, newest_first=True)
        assert (got.step, got.weights_id, got.interrupted) == (2, ready[2], True)
        frozen.send_signal(signal.SIGCONT)
        wait_for(lambda: liveness.alive(owner), TIMEOUT_S + SLACK_S, "the resumed owner's progress")
        entry = ledger.read()[2]
        assert not holds_claim(entry, owner["id"]) and holds_claim(entry, current_owner()["id"])
    finally:
        frozen.kill()
        frozen.wait()


def test_a_live_process_without_progress_goes_stale_and_progress_revives_it(layout):
    presence = Presence(layout, "default", watching=True, backfill=False, timeout_s=TIMEOUT_S).start()
    try:
        liveness = Liveness(layout, TIMEOUT_S, self_id="reader")
        first_look = time.monotonic()
        assert liveness.alive(presence.owner)
        [dead_after] = seconds_until_dead(liveness, [presence.owner], TIMEOUT_S + SLACK_S, since=first_look)
        assert dead_after >= TIMEOUT_S - 0.1
        presence.progress("step 2 main grade", 2)
        assert liveness.alive(presence.owner)
        assert Liveness(layout, TIMEOUT_S, self_id=presence.owner["id"]).alive(presence.owner)  # itself: always
    finally:
        presence.stop()
    assert read_presence(layout, presence.owner["id"]) is None
    assert not liveness.alive(presence.owner)  # stopped: its record is gone


def test_rate_limiting_writes_the_last_progress_and_a_call_after_a_pause_at_once(layout):
    presence = Presence(layout, "default", watching=True, backfill=False, timeout_s=60).start()
    try:
        for i in range(1, 51):
            presence.progress(f"graded {i}", 4)
        record = read_presence(layout, presence.owner["id"])
        assert record["progress"] <= 1  # the burst is not written call by call
        time.sleep(1.0 + SLACK_S)  # the write interval ends: the last progress is written without another call
        record = read_presence(layout, presence.owner["id"])
        assert (record["progress"], record["what"], record["step"]) == (50, "graded 50", 4)
        time.sleep(1.1)
        presence.progress("recording", 4)  # after a pause: written at once
        assert read_presence(layout, presence.owner["id"])["what"] == "recording"
    finally:
        presence.stop()


def test_a_failed_write_is_logged_and_never_raised(layout, caplog):
    layout.presence_dir.mkdir()
    presence = Presence(layout, "default", watching=True, backfill=False, timeout_s=60).start()
    try:
        presence.path.unlink()
        layout.presence_dir.rmdir()
        layout.presence_dir.write_text("not a folder")  # every write now fails
        with caplog.at_level(logging.WARNING):
            time.sleep(1.1)
            presence.progress("step 2 main generate", 2)
        assert "cannot write it" in caplog.text
        layout.presence_dir.unlink()
        time.sleep(1.1)
        presence.progress("step 2 main grade", 2)
        assert json.loads(presence.path.read_text())["what"] == "step 2 main grade"
    finally:
        presence.stop()
