import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import shared.protocol as protocol
from evaluator.scheduler import claim_next
from shared.protocol import (
    READY,
    CheckpointInvalid,
    Ledger,
    RunInUse,
    RunLayout,
    Status,
    TrainerLock,
    atomic_write_json,
    folder_weights_id,
    list_ready_checkpoints,
    publish_checkpoint,
    ranked_results,
    read_manifest,
    remove_incomplete_checkpoints,
    unpublish_old_checkpoints,
    verify_checkpoint,
    weights_id,
)

REPO = Path(__file__).resolve().parent.parent


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


def test_publish_writes_manifest_last_and_verifies(layout, monkeypatch):
    at_ready_write = {}
    real_write = protocol.atomic_write_json

    def spy(path, obj):  # the real write, after noting what the disk looked like at that moment
        if Path(path).name == READY:
            final = Path(path).parent
            at_ready_write.update(
                renamed=final.is_dir() and not layout.tmp_checkpoint_dir(5).exists(),
                files={rel: (final / rel).stat().st_size for rel in obj["files"]},
            )
        real_write(path, obj)

    monkeypatch.setattr(protocol.manifest, "atomic_write_json", spy)
    make_checkpoint(layout, 5)
    ckpt = layout.checkpoint_dir(5)
    assert at_ready_write["renamed"], "READY was written before the folder was renamed into place"
    manifest = json.loads((ckpt / READY).read_text())
    assert at_ready_write["files"] == {rel: meta["size_bytes"] for rel, meta in manifest["files"].items()}
    assert (
        manifest["step"] == 5
        and manifest["config_hash"] == "cfg123"
        and manifest["version"] == protocol.MANIFEST_VERSION
    )
    assert set(manifest["files"]) == {"model.safetensors", "config.json", "trainer_state/state.json"}
    on_disk = {str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name != READY}
    assert set(manifest["files"]) == on_disk  # nothing in the folder is left out of the manifest
    assert manifest["files"]["model.safetensors"]["size_bytes"] == 700
    assert {oct(p.stat().st_mode & 0o777) for p in ckpt.rglob("*") if p.is_file() and p.name != READY} == {"0o644"}
    assert verify_checkpoint(ckpt)["step"] == 5
    assert list(list_ready_checkpoints(layout.checkpoints_dir)) == [5]


def test_files_are_replaced_by_rename_never_rewritten_in_place(tmp_path):
    path = tmp_path / "x.json"
    atomic_write_json(path, {"v": 1})
    with open(path) as reader:  # a reader that opened the old file keeps reading the old file, whole
        inode = path.stat().st_ino
        atomic_write_json(path, {"v": 2})
        assert path.stat().st_ino != inode
        assert json.loads(reader.read()) == {"v": 1} and json.loads(path.read_text()) == {"v": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temporary file left


def test_newer_manifest_version_is_a_clear_error(layout):
    make_checkpoint(layout, 1)
    marker = layout.checkpoint_dir(1) / READY
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "version": protocol.MANIFEST_VERSION + 1}))
    with pytest.raises(
        CheckpointInvalid, match=rf"manifest version {protocol.MANIFEST_VERSION + 1} is newer than this code reads"
    ):
        verify_checkpoint(layout.checkpoint_dir(1))


@pytest.mark.parametrize("version", [protocol.MANIFEST_VERSION - 1, None, "2"])
def test_older_or_unknown_manifest_version_is_refused_naming_the_file(layout, version):
    """Only the current version is read: an older one (one SHA-256 a file, never shipped) is refused, not guessed at."""
    make_checkpoint(layout, 1)
    marker = layout.checkpoint_dir(1) / READY
    manifest = {k: v for k, v in json.loads(marker.read_text()).items() if k != "version"}
    marker.write_text(json.dumps(manifest if version is None else {**manifest, "version": version}))
    expected = rf"^{re.escape(str(marker))}: manifest version {re.escape(repr(version))} is not one this code reads"
    with pytest.raises(CheckpointInvalid, match=expected):
        verify_checkpoint(layout.checkpoint_dir(1))


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 53])
def test_hashing_while_writing_equals_hashing_the_disk_by_chunk(tmp_path, size):
    data = bytes(range(256))[:size] if size <= 256 else os.urandom(size)
    path = tmp_path / "f"
    with open(path, "wb") as f:
        hasher = protocol.ChunkHasher(f, chunk_bytes=16)
        for i in range(0, size, 7):  # writes that straddle chunk boundaries
            hasher.write(data[i : i + 7])
        written = hasher.finish()
    assert written == protocol.chunk_digests([path], chunk_bytes=16)[0]
    assert len(written) == max(1, -(-size // 16))


def test_a_flipped_byte_in_any_chunk_is_found(layout):
    tmp = layout.tmp_checkpoint_dir(3)
    (tmp / "trainer_state").mkdir(parents=True)
    payload = os.urandom(100)
    (tmp / "model.safetensors").write_bytes(payload)
    hashed = {"model.safetensors": protocol.chunk_digests([tmp / "model.safetensors"], chunk_bytes=16)[0]}
    manifest = protocol.build_manifest(tmp, 3, "c", hashed, chunk_bytes=16)
    assert len(manifest["files"]["model.safetensors"]["sha256_chunks"]) == 7 and manifest["chunk_bytes"] == 16
    (tmp / READY).write_text(json.dumps(manifest))
    verify_checkpoint(tmp)
    for position in (0, 40, 99):
        damaged = bytearray(payload)
        damaged[position] ^= 0x80
        (tmp / "model.safetensors").write_bytes(bytes(damaged))
        with pytest.raises(CheckpointInvalid, match="content hash mismatch"):
            verify_checkpoint(tmp)


def test_weights_id_is_the_content_of_the_model_files(layout, tmp_path):
    make_checkpoint(layout, 1)
    make_checkpoint(layout, 2)
    make_checkpoint(layout, 3, payload=b"other weights")
    ids = {s: weights_id(read_manifest(layout.checkpoint_dir(s))) for s in (1, 2, 3)}
    assert ids[1] == ids[2] != ids[3]  # same bytes, same id, whatever the step
    plain = tmp_path / "plain"
    shutil.copytree(layout.checkpoint_dir(1), plain, ignore=shutil.ignore_patterns(READY, "trainer_state"))
    assert folder_weights_id(plain) == ids[1]  # a plain folder of the same files: the same id
    (plain / "model.safetensors").write_bytes(b"x")
    assert folder_weights_id(plain) != ids[1]


def test_truncated_file_is_caught(layout):
    make_checkpoint(layout, 1)
    path = layout.checkpoint_dir(1) / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(
        CheckpointInvalid, match=r"model.safetensors: size mismatch \(699 bytes on disk, 700 in READY\)"
    ):
        verify_checkpoint(layout.checkpoint_dir(1))


def test_bit_flip_is_caught(layout):
    make_checkpoint(layout, 1)
    path = layout.checkpoint_dir(1) / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[10] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointInvalid, match=r"model\.safetensors: content hash mismatch"):
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


def _claim_loop(eval_dir, run_dir, steps, out):
    from shared.protocol import RunLayout

    ledger, won = Ledger(Path(eval_dir)), []
    layout = RunLayout(Path(run_dir))
    while (
        got := claim_next(
            ledger, dict.fromkeys(range(steps), "w"), alive=lambda o: True, backfill=False, newest_first=False
        )
    ) is not None:
        won.append(got.step)
        ledger.set(got.step, Status.DONE, weights_id="w")
    out.write_text(json.dumps(won))
    del layout


def test_claim_next_is_exclusive_across_processes(tmp_path):
    """Three processes claim from one ledger, each claim held open 20 ms between read and write: without
    the lock they would take the same steps."""
    outs = [tmp_path / f"won{i}.json" for i in range(3)]
    code = (
        "import sys; from pathlib import Path; sys.path.insert(0, {repo!r}); "
        "from tests.test_protocol import _claim_loop; "
        "_claim_loop({eval!r}, {run!r}, 12, Path(sys.argv[1]))"
    )
    code = code.format(repo=str(REPO), eval=str(tmp_path / "eval"), run=str(tmp_path))
    env = {**os.environ, "MATH_SFT_FAULT_LEDGER_HOLD_S": "0.02"}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(out)], env=env, cwd=REPO) for out in outs]
    assert [p.wait(120) for p in procs] == [0, 0, 0]
    won = [s for out in outs for s in json.loads(out.read_text())]
    assert sorted(won) == list(range(12))  # every step claimed exactly once


def test_one_trainer_per_run(tmp_path):
    layout = RunLayout(tmp_path / "run")
    code = (
        "import sys, time; sys.path.insert(0, {repo!r}); from shared.protocol import TrainerLock, RunLayout; "
        "from pathlib import Path\nwith TrainerLock(RunLayout(Path({run!r}))):\n"
        "    print('locked', flush=True); time.sleep(600)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code.format(repo=str(REPO), run=str(layout.run_dir))], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with (
            pytest.raises(RunInUse, match=rf"another trainer is training this run \(pid {holder.pid} on"),
            TrainerLock(layout),
        ):
            pass
    finally:
        holder.kill()
        holder.wait()
    with TrainerLock(layout):  # the kernel released a dead holder's lock
        pass


def test_a_new_run_appears_with_its_lock_held_and_a_refused_trainer_deletes_nothing(tmp_path):
    """The run directory is made under a temporary name with the lock taken inside, then renamed into place:
    whoever sees it sees it locked. A second TrainerLock (another process) is refused and removes nothing."""
    layout = RunLayout(tmp_path / "runs" / "new")
    code = (
        "import sys, time; sys.path.insert(0, {repo!r}); from shared.protocol import TrainerLock, RunLayout; "
        "from pathlib import Path\nwith TrainerLock(RunLayout(Path({run!r}))) as lock:\n"
        "    print('locked', lock.created, flush=True); time.sleep(600)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code.format(repo=str(REPO), run=str(layout.run_dir))], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().split() == ["locked", "True"]
        assert sorted(p.name for p in layout.run_dir.iterdir()) == [".trainer.json", ".trainer.lock"]
        assert [p.name for p in layout.run_dir.parent.iterdir()] == ["new"]  # no temporary folder left
        with (
            pytest.raises(RunInUse, match=rf"another trainer is training this run \(pid {holder.pid} on"),
            TrainerLock(layout),
        ):
            raise AssertionError("not reached")
        assert sorted(p.name for p in layout.run_dir.iterdir()) == [".trainer.json", ".trainer.lock"]
    finally:
        holder.kill()
        holder.wait()


def test_a_failed_start_removes_only_a_run_it_created(tmp_path):
    layout = RunLayout(tmp_path / "run")
    with pytest.raises(ZeroDivisionError), TrainerLock(layout) as lock:
        assert lock.created and layout.run_dir.is_dir()
        with TrainerLock(layout) as inner:  # python -m trainer takes the lock, then train() does: it nests
            assert not inner.created
        raise ZeroDivisionError("the start failed")
    assert not layout.run_dir.exists()  # made by this start, nothing of value in it: gone again
    layout.checkpoints_dir.mkdir(parents=True)
    with pytest.raises(ZeroDivisionError), TrainerLock(layout) as lock:
        assert not lock.created
        raise ZeroDivisionError("the start failed")
    assert layout.checkpoints_dir.is_dir() and layout.trainer_lock_path.is_file()  # not this start's: kept
    (layout.run_dir / "eval").mkdir()
    shutil.rmtree(layout.checkpoints_dir)
    with TrainerLock(layout):  # the lock is free again after each
        pass


def test_corrupted_ledger_is_a_clear_error(tmp_path):
    (tmp_path / "ledger.json").write_text("{oops")
    with pytest.raises(ValueError, match="corrupted ledger"):
        Ledger(tmp_path).read()
    (tmp_path / "ledger.json").write_text(json.dumps({"abc": {"status": "done"}}))
    with pytest.raises(ValueError, match=r"corrupted ledger \(entry 'abc' is not a step with a status\)"):
        Ledger(tmp_path).read()


def test_torch_save_through_the_hashing_file_hashes_what_is_on_disk(tmp_path):
    """torch.save hands the writer temporary buffers (its zip directory) and frees them at once: the digests must
    be taken before write() returns (deferring them read freed memory: wrong hashes, or a crash, at 40k tensors)."""
    import torch

    state = {"state": {i: {"exp_avg": torch.full((3,), float(i)), "step": torch.tensor(i)} for i in range(20000)}}
    path = tmp_path / "state.pt"
    with open(path, "wb") as f:
        hasher = protocol.ChunkHasher(f, chunk_bytes=1 << 20)
        torch.save(state, hasher)
    assert hasher.finish() == protocol.chunk_digests([path], chunk_bytes=1 << 20)[0]
    assert torch.load(path, weights_only=True)["state"][19999]["step"] == 19999


def test_best_ranks_only_results_of_the_weights_on_disk_and_the_link_follows(layout):
    from shared.protocol import BestRule, update_best

    for step in (2, 4, 6):
        make_checkpoint(layout, step, payload=bytes([step]) * 100)

    def result(step, accuracy, weights=None):
        weights = weights or weights_id(read_manifest(layout.checkpoint_dir(step)))
        path = layout.result_path("default", step)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"weights_id": weights, "sets": {"s": {"metrics": {"accuracy": accuracy}}}}))

    rule = BestRule("default", "s", "accuracy", 1)
    assert update_best(layout, rule) is None and not layout.best_path.is_symlink()
    result(2, 0.9, weights="other weights")  # a result about weights no longer in step 2's folder: not ranked
    result(4, 0.5)
    result(6, 0.7)
    assert update_best(layout, rule) == 6
    assert layout.best_path.resolve() == layout.checkpoint_dir(6).resolve()
    outcome = unpublish_old_checkpoints(layout, 1, 0, (), rule)
    assert outcome.deleted == [2, 4] and outcome.kept_for == {}  # 6: the newest and the best, kept anyway
    # keep_best turned off: no link to a step retention no longer protects
    unpublish_old_checkpoints(layout, 1, 0)
    assert not layout.best_path.is_symlink()


def test_best_compares_only_results_of_one_evaluation_config_and_retention_keeps_each_configs_best(layout):
    """Step 2 was evaluated with max_tokens 512 before the config changed to 1024: its 0.9 measures another test.
    `best` points within the newest config's results; retention keeps the best of each config (k=1 here) until
    step 2 is evaluated again under the new one. Equal times (or none, in old results) do not break the order."""
    from shared.protocol import BestRule, update_best

    for step in (2, 4, 6, 8):
        make_checkpoint(layout, step, payload=bytes([step]) * 100)

    def result(step, accuracy, max_tokens, time):
        path = layout.result_path("default", step)
        path.parent.mkdir(parents=True, exist_ok=True)
        sampling = {"n": 1, "max_tokens": max_tokens}
        set_result = {"problems_id": "p", "sampling": sampling, "metrics": {"accuracy": accuracy}}
        weights = weights_id(read_manifest(layout.checkpoint_dir(step)))
        path.write_text(json.dumps({"weights_id": weights, "time": time, "sets": {"s": set_result}}))

    rule = BestRule("default", "s", "accuracy", 1)
    result(2, 0.9, 512, time=1.0)
    result(4, 0.5, 1024, time=2.0)
    result(6, 0.7, 1024, time=2.0)
    assert ranked_results(layout, "default", "s", "accuracy") == [[(0.7, 6), (0.5, 4)], [(0.9, 2)]]
    assert update_best(layout, rule) == 6
    outcome = unpublish_old_checkpoints(layout, 1, 0, (), rule)
    assert outcome.deleted == [4] and "under an earlier evaluation config" in outcome.kept_for[2]
    assert 6 in outcome.kept_for and sorted(list_ready_checkpoints(layout.checkpoints_dir)) == [2, 6, 8]
    result(2, 0.8, 1024, time=3.0)
    assert update_best(layout, rule) == 2
    assert unpublish_old_checkpoints(layout, 1, 0, (), rule).deleted == [6]
