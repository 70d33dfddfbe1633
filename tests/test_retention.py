"""Retention is local and bounded (shared/protocol/retention.py), and saves check free space first
(trainer/checkpoint.py): real files, real ledgers and filelocks, in-process, plus a real second process that
freezes inside a lock."""

import json
import logging
import shutil
import subprocess
import sys
import time

import pytest
import torch
from filelock import Timeout

import shared.protocol.retention as retention
from conftest import start_service
from shared.config import TrainingConfig
from shared.protocol import (
    READY,
    BestRule,
    CheckpointWriteError,
    Ledger,
    RunLayout,
    Status,
    list_ready_checkpoints,
    publish_checkpoint,
    read_manifest,
    unpublish_old_checkpoints,
    weights_id,
)
from trainer.checkpoint import AsyncCheckpointer


@pytest.fixture
def layout(tmp_path):
    layout = RunLayout(tmp_path / "run")
    layout.checkpoints_dir.mkdir(parents=True)
    return layout


def publish(layout: RunLayout, step: int) -> str:
    """A published checkpoint with its own weights; returns its weights id."""
    tmp = layout.tmp_checkpoint_dir(step)
    (tmp / "trainer_state").mkdir(parents=True)
    (tmp / "model.safetensors").write_bytes(bytes([step % 256]) * 1000)
    (tmp / "trainer_state" / "state.json").write_text("{}")
    publish_checkpoint(tmp, layout.checkpoint_dir(step), step, "cfg")
    return weights_id(read_manifest(layout.checkpoint_dir(step)))


def ready(layout: RunLayout) -> list[int]:
    return list(list_ready_checkpoints(layout.checkpoints_dir))


def test_an_evaluator_that_never_finishes_pins_nothing_beyond_the_bound(layout, caplog):
    """A running claim (its owner hung, or alive: retention never asks) and a pending entry no longer keep their
    steps: at most keep_last + max_unevaluated checkpoints stay, save after save; the deleted ones are logged as
    warnings and recorded `deleted` in the ledger, with the reason (a running claim is left to its evaluator)."""
    ledger = Ledger(layout.eval_dir("default"))
    ids = {step: publish(layout, step) for step in (2, 4, 6, 8)}
    ledger.set(4, Status.RUNNING, owner={"id": "hung-evaluator"}, weights_id=ids[4], attempts=1)
    ledger.set(6, Status.PENDING, weights_id=ids[6])
    caplog.set_level(logging.WARNING, logger="shared.protocol.retention")
    outcome = unpublish_old_checkpoints(layout, keep_last=1, max_unevaluated=1, eval_names=["default"])
    assert outcome.deleted == [2, 4] and list(outcome.kept_for) == [6] and "not yet evaluated" in outcome.kept_for[6]
    for step in (10, 12, 14):
        ids[step] = publish(layout, step)
        unpublish_old_checkpoints(layout, keep_last=1, max_unevaluated=1, eval_names=["default"])
        assert ready(layout) == [step - 2, step]
    entries = ledger.read()
    for step in (2, 6, 8, 10):
        assert entries[step]["status"] == Status.DELETED and entries[step]["weights_id"] == ids[step]
        assert "max_unevaluated=1" in entries[step]["reason"]
    for step in (2, 4, 6, 8, 10):
        assert any(f"deleted step {step} before evaluation(s) default finished it" in r.message for r in caplog.records)
    # the running claim stays (its evaluator evaluates a snapshot and records the result; if it died, whoever takes
    # the claim over finds the folder gone): its step went all the same
    assert entries[4]["status"] == Status.RUNNING and entries[4]["owner"] == {"id": "hung-evaluator"}
    assert "default evaluating it from a snapshot: that claim stays" in caplog.text
    assert all(r.levelno == logging.WARNING for r in caplog.records)


def test_keep_best_steps_are_kept_beyond_the_bound(layout):
    ids = {step: publish(layout, step) for step in (2, 4, 6, 8)}
    for step, accuracy in {2: 0.9, 4: 0.1, 6: 0.2}.items():
        result = {"weights_id": ids[step], "sets": {"s": {"metrics": {"accuracy": accuracy}}}}
        layout.result_path("default", step).parent.mkdir(parents=True, exist_ok=True)
        layout.result_path("default", step).write_text(json.dumps(result))
        Ledger(layout.eval_dir("default")).set(step, Status.DONE, weights_id=ids[step])
    outcome = unpublish_old_checkpoints(layout, 1, 0, ["default"], BestRule("default", "s", "accuracy", 1))
    assert ready(layout) == [2, 8] and outcome.deleted == [4, 6] and "best" in outcome.kept_for[2]
    assert outcome.unseen_by == {}  # 4 and 6 were evaluated: nothing to record
    assert layout.best_path.resolve() == layout.checkpoint_dir(2).resolve()


def test_a_step_every_evaluation_finished_goes_and_one_some_evaluation_has_not_stays(layout):
    """Evaluations: the trainer's ('default') and every ledger in the run ('other'). Step 2 is done by both (or
    skipped: finished too); step 4 is done by 'default' only, and step 6's 'done' is about other weights."""
    ids = {step: publish(layout, step) for step in (2, 4, 6, 8)}
    default, other = Ledger(layout.eval_dir("default")), Ledger(layout.eval_dir("other"))
    default.set(2, Status.DONE, weights_id=ids[2])
    other.set(2, Status.SKIPPED, weights_id=ids[2])
    default.set(4, Status.DONE, weights_id=ids[4])
    default.set(6, Status.DONE, weights_id="weights that were in this folder before")
    other.set(6, Status.DONE, weights_id=ids[6])
    outcome = unpublish_old_checkpoints(layout, keep_last=1, max_unevaluated=1, eval_names=["default"])
    assert outcome.deleted == [2, 4] and "default" in outcome.kept_for[6]
    assert outcome.unseen_by == {4: ["other"]}
    assert default.read()[4]["status"] == Status.DONE and other.read()[4]["status"] == Status.DELETED
    assert other.read()[2]["status"] == Status.SKIPPED  # a finished entry is never overwritten
    assert ready(layout) == [6, 8]


def test_max_unevaluated_zero_keeps_only_keep_last(layout):
    for step in (2, 4, 6):
        publish(layout, step)
    outcome = unpublish_old_checkpoints(layout, keep_last=1, max_unevaluated=0, eval_names=["default"])
    assert outcome.deleted == [2, 4] and ready(layout) == [6]
    assert sorted(Ledger(layout.eval_dir("default")).read()) == [2, 4]


def hold_lock_in_another_process(path):
    """A real second process that takes the filelock and freezes inside it."""
    code = (
        "import sys, time; from filelock import FileLock; lock = FileLock(sys.argv[1]); lock.acquire();"
        " print('held', flush=True); time.sleep(120)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


@pytest.mark.parametrize("which", ["ledger", "best"])
def test_a_lock_held_by_a_frozen_process_skips_the_pass_with_a_warning(layout, monkeypatch, caplog, which):
    """Retention gives up on the lock after its bounded wait, deletes nothing, and the checkpointer warns and goes
    on (the next save tries again); it neither blocks nor raises."""
    monkeypatch.setattr(retention, "RETENTION_LOCK_TIMEOUT_S", 0.3)
    for step in (2, 4, 6):
        publish(layout, step)
    ledger = Ledger(layout.eval_dir("default"))
    ledger.path.parent.mkdir(parents=True)
    holder = hold_lock_in_another_process(ledger.lock.lock_file if which == "ledger" else layout.best_lock_path)
    try:
        with pytest.raises(Timeout):
            unpublish_old_checkpoints(layout, 1, 0, ["default"])
        assert ready(layout) == [2, 4, 6]
        checkpointer = AsyncCheckpointer(layout, "cfg", None, 1, eval_backfill={"default": False}, max_unevaluated=0)
        caplog.set_level(logging.WARNING)
        checkpointer._retention_pass("after step 6")
        assert ready(layout) == [2, 4, 6]
        assert "retention after step 6 skipped" in caplog.text and "tried again at the next save" in caplog.text
    finally:
        holder.kill()
        holder.wait()
    checkpointer._retention_pass("after step 8")  # the lock is free again: this pass deletes
    assert ready(layout) == [6] and not layout.checkpoint_dir(2).exists()


# ---------------------------------------------------------------- free space before each save


class Disk:
    """shutil.disk_usage of a disk of `size` bytes (a real disk cannot be shrunk in a unit test): what is used is
    what the checkpoints folder holds, measured on the real files."""

    def __init__(self, layout: RunLayout, size: int):
        self.layout, self.size = layout, size
        self.real = shutil.disk_usage

    def __call__(self, path):
        used = sum(p.stat().st_size for p in self.layout.checkpoints_dir.rglob("*") if p.is_file())
        return self.real(path)._replace(total=self.size, used=used, free=max(0, self.size - used))


def tiny_training():
    torch.manual_seed(0)
    model = torch.nn.Linear(256, 256)  # 257 KiB of weights, 514 KiB of AdamW state: ~0.8 MB a checkpoint
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 256)).sum().backward()
    optimizer.step()
    return model, optimizer


def save(checkpointer, step, model, optimizer, final=False):
    saved = checkpointer.save(step, model, optimizer, {"step": step}, final=final)
    checkpointer.wait()
    return saved


def test_a_save_that_does_not_fit_is_skipped_with_the_bytes_and_the_last_one_still_lands(layout, monkeypatch, caplog):
    from trainer.checkpoint import FREE_SPACE_MARGIN_BYTES

    model, optimizer = tiny_training()
    checkpointer = AsyncCheckpointer(layout, "cfg", None, None)  # keep_last null: retention frees nothing
    disk = Disk(layout, size=FREE_SPACE_MARGIN_BYTES + 2_000_000)  # room for two checkpoints and the margin
    monkeypatch.setattr(shutil, "disk_usage", disk)
    caplog.set_level(logging.WARNING, logger="trainer.checkpoint")
    assert "skipped" not in save(checkpointer, 2, model, optimizer)
    assert "skipped" not in save(checkpointer, 4, model, optimizer)
    saved = save(checkpointer, 6, model, optimizer)
    assert saved["cause"] == "no_space" and "bytes free" in saved["skipped"] and "needed" in saved["skipped"]
    assert "step 6 not saved: not enough free space in" in caplog.text and ready(layout) == [2, 4]
    free = disk(layout.checkpoints_dir).free
    assert f"{free} bytes free" in caplog.text
    with pytest.raises(CheckpointWriteError, match=rf"final checkpoint of step 8: .*{free} bytes free, \d+ needed"):
        save(checkpointer, 8, model, optimizer, final=True)
    assert ready(layout) == [2, 4] and not layout.tmp_checkpoint_dir(8).exists()
    shutil.rmtree(layout.checkpoint_dir(2))  # room again: the final save lands
    assert "skipped" not in save(checkpointer, 8, model, optimizer, final=True)
    assert ready(layout) == [4, 8] and (layout.checkpoint_dir(8) / READY).is_file()


def test_retention_runs_before_a_save_is_skipped_for_space(layout, monkeypatch, caplog):
    """The disk holds two checkpoints and the margin; keep_last=1, max_unevaluated=0. The retention pass after
    step 4's publish is skipped (a frozen lock holder), so 2 and 4 fill the disk: step 6's save runs retention
    again when it finds the space short, and fits."""
    from trainer.checkpoint import FREE_SPACE_MARGIN_BYTES

    monkeypatch.setattr(retention, "RETENTION_LOCK_TIMEOUT_S", 0.3)
    model, optimizer = tiny_training()
    checkpointer = AsyncCheckpointer(layout, "cfg", None, 1, eval_backfill={"default": False}, max_unevaluated=0)
    monkeypatch.setattr(shutil, "disk_usage", Disk(layout, size=FREE_SPACE_MARGIN_BYTES + 2_000_000))
    save(checkpointer, 2, model, optimizer)
    Ledger(layout.eval_dir("default")).path.parent.mkdir(parents=True)
    holder = hold_lock_in_another_process(layout.best_lock_path)
    try:
        save(checkpointer, 4, model, optimizer)  # its retention pass is skipped: 2 and 4 stay
    finally:
        holder.kill()
        holder.wait()
    assert ready(layout) == [2, 4]
    assert "skipped" not in save(checkpointer, 6, model, optimizer)  # retention first made room (2 went)
    assert ready(layout) == [6]


def test_the_final_save_makes_room_by_deleting_unevaluated_checkpoints(layout, monkeypatch, caplog):
    """keep_last=1, max_unevaluated=2, a disk for two checkpoints: step 2 (never evaluated) stays beyond keep_last
    and a middle save that does not fit is skipped; the run's last save does not spare the evaluators' backlog:
    step 2 goes (recorded `deleted`, logged) and the final checkpoint lands."""
    from trainer.checkpoint import FREE_SPACE_MARGIN_BYTES

    model, optimizer = tiny_training()
    checkpointer = AsyncCheckpointer(layout, "cfg", None, 1, eval_backfill={"default": False}, max_unevaluated=2)
    monkeypatch.setattr(shutil, "disk_usage", Disk(layout, size=FREE_SPACE_MARGIN_BYTES + 2_000_000))
    caplog.set_level(logging.WARNING)
    save(checkpointer, 2, model, optimizer)
    save(checkpointer, 4, model, optimizer)
    assert save(checkpointer, 6, model, optimizer)["cause"] == "no_space" and ready(layout) == [2, 4]
    assert "skipped" not in save(checkpointer, 6, model, optimizer, final=True)
    assert ready(layout) == [4, 6] and not layout.checkpoint_dir(2).exists()
    assert Ledger(layout.eval_dir("default")).read()[2]["status"] == Status.DELETED
    assert "retention keeps no unevaluated checkpoint beyond keep_last=1 to make room" in caplog.text
    assert "deleted step 2 before evaluation(s) default finished it" in caplog.text


# ---------------------------------------------------------------- the real services


def test_a_slow_evaluator_with_backfill_never_holds_more_than_the_bound(tmp_path, make_config):
    """A real trainer (keep_last=1, max_unevaluated at its default, 2) and a real evaluator with backfill on,
    slowed to seconds per generate call (MATH_SFT_FAULT_GENERATE_DELAY_S): it falls behind, and its pending steps no
    longer pin checkpoints. Polled while both run, the published checkpoints never exceed keep_last +
    max_unevaluated, plus the one just published before the retention pass after it. Training exits 0; each
    deleted step is recorded `deleted` in the evaluation's ledger and logged by the trainer."""
    keep_last, max_unevaluated = 1, TrainingConfig.max_unevaluated
    train = {"max_steps": 16, "keep_last": keep_last}
    cfg = make_config({"training": train, "evaluation": {"backfill": True, "rescan_s": 0.5}})
    layout = RunLayout(tmp_path / "runs" / "tiny")
    slow = {"MATH_SFT_FAULT_GENERATE_DELAY_S": "3", "MATH_SFT_FAULT_SLOW_SAVE_S": "0.2"}
    evaluator = start_service("evaluator", "--config", cfg, log=tmp_path / "eval.log", env_extra=slow)
    trainer = start_service("trainer", "--config", cfg, log=tmp_path / "train.log", env_extra=slow)
    most = 0
    try:
        while trainer.poll() is None:
            most = max(most, len(list_ready_checkpoints(layout.checkpoints_dir)))
            time.sleep(0.05)
        assert trainer.returncode == 0, (tmp_path / "train.log").read_text()
    finally:
        evaluator.kill()
        evaluator.wait()
    assert most <= keep_last + max_unevaluated + 1
    assert len(list_ready_checkpoints(layout.checkpoints_dir)) <= keep_last + max_unevaluated
    entries = Ledger(layout.eval_dir("default")).read()
    deleted = sorted(step for step, entry in entries.items() if entry["status"] == Status.DELETED)
    assert deleted, f"the evaluator kept up, nothing to show: {entries}"
    log = (tmp_path / "train.log").read_text()
    for step in deleted:
        assert not layout.checkpoint_dir(step).exists()
        assert f"retention: deleted step {step} before evaluation(s) default finished it" in log
