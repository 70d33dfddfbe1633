import json
import multiprocessing as mp
import os
import subprocess
import sys

import pytest

from shared.protocol import (
    READY,
    CheckpointInvalid,
    Lease,
    Ledger,
    RunLayout,
    Status,
    leased_steps,
    list_ready_checkpoints,
    publish_checkpoint,
    remove_incomplete_checkpoints,
    steps_still_needed,
    verify_checkpoint,
)


def make_checkpoint(layout: RunLayout, step: int, payload: bytes = b"weights" * 100) -> None:
    tmp = layout.tmp_checkpoint_dir(step)
    (tmp / "trainer_state").mkdir(parents=True)
    (tmp / "model.safetensors").write_bytes(payload)
    (tmp / "config.json").write_text('{"a": 1}')
    (tmp / "trainer_state" / "state.json").write_text("{}")
    publish_checkpoint(tmp, layout.checkpoint_dir(step), step, "cfg123")


@pytest.fixture
def layout(tmp_path):
    layout = RunLayout(tmp_path / "run")
    layout.checkpoints_dir.mkdir(parents=True)
    return layout


def test_publish_writes_manifest_last_and_verifies(layout):
    make_checkpoint(layout, 5)
    ckpt = layout.checkpoint_dir(5)
    assert not layout.tmp_checkpoint_dir(5).exists()
    manifest = json.loads((ckpt / READY).read_text())
    assert manifest["step"] == 5 and manifest["config_hash"] == "cfg123"
    assert set(manifest["files"]) == {"model.safetensors", "config.json", "trainer_state/state.json"}
    assert manifest["files"]["model.safetensors"]["size_bytes"] == 700
    assert verify_checkpoint(ckpt)["step"] == 5
    assert list(list_ready_checkpoints(layout.checkpoints_dir)) == [5]


def test_truncated_file_is_caught(layout):
    make_checkpoint(layout, 1)
    path = layout.checkpoint_dir(1) / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(CheckpointInvalid, match=r"model.safetensors: size mismatch \(699 bytes on disk, 700 in READY\)"):
        verify_checkpoint(layout.checkpoint_dir(1))


def test_bit_flip_is_caught(layout):
    make_checkpoint(layout, 1)
    path = layout.checkpoint_dir(1) / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[10] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointInvalid, match="model.safetensors: content hash mismatch"):
        verify_checkpoint(layout.checkpoint_dir(1))
    # Size-only check does not read the content.
    verify_checkpoint(layout.checkpoint_dir(1), check_hashes=False)


def test_missing_marker_and_missing_file(layout):
    make_checkpoint(layout, 1)
    (layout.checkpoint_dir(1) / "trainer_state" / "state.json").unlink()
    with pytest.raises(CheckpointInvalid, match=r"state.json: missing file listed in READY"):
        verify_checkpoint(layout.checkpoint_dir(1))
    (layout.checkpoint_dir(1) / READY).unlink()
    with pytest.raises(CheckpointInvalid, match="missing READY marker"):
        verify_checkpoint(layout.checkpoint_dir(1))
    assert list_ready_checkpoints(layout.checkpoints_dir) == {}
    with pytest.raises(CheckpointInvalid, match="no such checkpoint directory"):
        verify_checkpoint(layout.checkpoint_dir(99))


def test_garbage_manifest(layout):
    make_checkpoint(layout, 1)
    (layout.checkpoint_dir(1) / READY).write_text("{not json")
    with pytest.raises(CheckpointInvalid, match="unreadable manifest"):
        verify_checkpoint(layout.checkpoint_dir(1))


def test_publish_refuses_to_overwrite(layout):
    make_checkpoint(layout, 1)
    with pytest.raises(FileExistsError):
        make_checkpoint(layout, 1)


def test_tmp_dirs_are_ignored_and_removed(layout):
    tmp = layout.tmp_checkpoint_dir(3)
    tmp.mkdir()
    (tmp / READY).write_text("{}")  # even a marker inside a temp dir never counts
    make_checkpoint(layout, 2)
    assert list(list_ready_checkpoints(layout.checkpoints_dir)) == [2]
    half = layout.checkpoint_dir(3)  # renamed into place, READY never written
    half.mkdir()
    assert sorted(remove_incomplete_checkpoints(layout.checkpoints_dir)) == sorted([tmp, half])
    assert not tmp.exists() and not half.exists() and layout.checkpoint_dir(2).exists()


def test_lease_of_live_and_dead_owner(layout):
    with Lease(layout, 7):
        assert leased_steps(layout) == {7}
    assert leased_steps(layout) == set()
    # A lease left by a process that died is not honoured (and is cleaned up).
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(proc.stdout)
    lease = Lease(layout, 8)
    lease.record["pid"] = dead_pid
    lease.__enter__()
    assert leased_steps(layout) == set()
    assert not lease.path.exists()


def test_steps_still_needed_reads_every_ledger(layout):
    ledger = Ledger(layout.eval_dir("a"))
    ledger.set(2, Status.PENDING)
    ledger.set(3, Status.DONE)
    ledger.set(4, Status.RUNNING, owner={"host": os.uname().nodename, "pid": os.getpid(), "start": None})
    Ledger(layout.eval_dir("b")).set(5, Status.SKIPPED)
    assert steps_still_needed(layout) == {2, 4}


def _claim_many(eval_dir, worker, n, out):
    ledger = Ledger(eval_dir)
    won = []
    for step in range(n):
        def claim(entries, step=step):
            if step not in entries:
                entries[step] = {"status": Status.RUNNING, "owner": worker}
                return True
            return False
        if ledger.update(claim):
            won.append(step)
    out.put(won)


def test_ledger_claims_are_exclusive_across_processes(tmp_path):
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_claim_many, args=(tmp_path / "eval", w, 40, out)) for w in range(3)]
    for p in procs:
        p.start()
    won = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join()
    flat = [s for w in won for s in w]
    assert sorted(flat) == list(range(40))  # every step claimed exactly once
    assert len(Ledger(tmp_path / "eval").read()) == 40


def test_corrupted_ledger_is_a_clear_error(tmp_path):
    (tmp_path / "ledger.json").write_text("{oops")
    with pytest.raises(ValueError, match="corrupted ledger"):
        Ledger(tmp_path).read()
