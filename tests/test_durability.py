"""Durability: what reaches the disk before a name makes it visible. A spy on os.fsync, os.rename and os.replace
records the calls (each fsync by the path its descriptor names) while a checkpoint is published, and the publish
order is checked: every file fsynced, every folder fsynced, the rename into place, the parent fsynced, READY
written to a temporary file, fsynced, renamed over READY, and its folder fsynced. Without the fsyncs (os.fsync a
no-op) the same check fails: the last test shows it."""

import os
from pathlib import Path

import pytest

from shared.protocol import READY, RunLayout, atomic_write_json, publish_checkpoint


class Spy:
    """Records ("fsync", path), ("rename", src, dst) and ("replace", src, dst), then does the real call."""

    def __init__(self, monkeypatch):
        self.events: list[tuple] = []
        real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

        def fsync(fd):
            self.events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}"))))
            real_fsync(fd)

        def rename(src, dst, **kw):
            self.events.append(("rename", Path(src), Path(dst)))
            real_rename(src, dst, **kw)

        def replace(src, dst, **kw):
            self.events.append(("replace", Path(src), Path(dst)))
            real_replace(src, dst, **kw)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "rename", rename)
        monkeypatch.setattr(os, "replace", replace)

    def index(self, event: tuple, after: int = -1) -> int:
        """Position of the first `event` after position `after`; AssertionError naming it when there is none."""
        for i in range(after + 1, len(self.events)):
            if self.events[i] == event:
                return i
        raise AssertionError(f"{event} missing after position {after} in {self.events}")


def write_tmp_checkpoint(layout: RunLayout, step: int) -> Path:
    tmp = layout.tmp_checkpoint_dir(step)
    (tmp / "trainer_state").mkdir(parents=True)
    (tmp / "model.safetensors").write_bytes(b"w" * 1000)
    (tmp / "config.json").write_text("{}")
    (tmp / "trainer_state" / "state.pt").write_bytes(b"s" * 100)
    return tmp


def check_publish_order(spy: Spy, tmp: Path, final: Path, files: list[str]) -> None:
    """The order publish_checkpoint promises (shared/protocol/manifest.py)."""
    renamed = spy.index(("rename", tmp, final))
    for rel in files:
        assert spy.index(("fsync", tmp / rel)) < renamed, f"{rel} was not fsynced before the rename into place"
    for folder in (tmp, tmp / "trainer_state"):
        assert spy.index(("fsync", folder)) < renamed, f"{folder} was not fsynced before the rename into place"
    parent_synced = spy.index(("fsync", final.parent), after=renamed)
    replaced = next(
        (i for i, e in enumerate(spy.events) if e[0] == "replace" and e[2] == final / READY), None
    )  # READY: a temporary file renamed over it
    assert replaced is not None and replaced > parent_synced, "READY was not written after the parent's fsync"
    ready_tmp = spy.events[replaced][1]
    assert ready_tmp.parent == final and ready_tmp.name.startswith(".tmp_READY")
    assert parent_synced < spy.index(("fsync", ready_tmp), after=parent_synced) < replaced, "READY not fsynced"
    spy.index(("fsync", final), after=replaced)  # and the folder holding READY, after the rename


def publish_with_spy(tmp_path, monkeypatch) -> tuple[Spy, Path, Path]:
    layout = RunLayout(tmp_path / "run")
    layout.checkpoints_dir.mkdir(parents=True)
    tmp = write_tmp_checkpoint(layout, 3)
    spy = Spy(monkeypatch)
    publish_checkpoint(tmp, layout.checkpoint_dir(3), 3, "cfg")
    return spy, tmp, layout.checkpoint_dir(3)


FILES = ["model.safetensors", "config.json", "trainer_state/state.pt"]


def test_publish_order_files_folders_rename_parent_ready(tmp_path, monkeypatch):
    spy, tmp, final = publish_with_spy(tmp_path, monkeypatch)
    check_publish_order(spy, tmp, final, FILES)
    assert (final / READY).is_file() and not tmp.exists()


def test_an_atomic_write_fsyncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    spy = Spy(monkeypatch)
    target = tmp_path / "ledger.json"
    atomic_write_json(target, {"a": 1})
    ((_, temporary, dst),) = [e for e in spy.events if e[0] == "replace"]
    replaced = spy.events.index(("replace", temporary, dst))
    assert dst == target and spy.index(("fsync", temporary)) < replaced
    spy.index(("fsync", tmp_path), after=replaced)


def test_with_fsync_a_no_op_the_publish_order_check_fails(tmp_path, monkeypatch):
    """os.fsync replaced by a no-op (over the spy): nothing reaches the disk before its name, and the check of the
    first test fails. A check that stayed green here could not tell a durable publish from one that is not."""
    layout = RunLayout(tmp_path / "run")
    layout.checkpoints_dir.mkdir(parents=True)
    tmp = write_tmp_checkpoint(layout, 3)
    spy = Spy(monkeypatch)
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    publish_checkpoint(tmp, layout.checkpoint_dir(3), 3, "cfg")
    with pytest.raises(AssertionError, match="fsync"):
        check_publish_order(spy, tmp, layout.checkpoint_dir(3), FILES)


def test_base_model_is_published_whole_past_a_crash_leftover_and_kept(tmp_path, monkeypatch):
    """base_model (the embedded model, or a hub model's config and tokenizer) is written into a temporary folder,
    fsynced and renamed into place; what a crash left in the temporary folder is removed first; once there, it
    is kept as it is."""
    from trainer.train import publish_base_model

    layout = RunLayout(tmp_path / "run")
    (layout.tmp_base_model_dir / "sub").mkdir(parents=True)
    (layout.tmp_base_model_dir / "half-written.bin").write_bytes(b"x")  # a crash's leftover

    def write(out: Path) -> None:
        (out / "sub").mkdir(exist_ok=True)
        (out / "config.json").write_text("{}")
        (out / "sub" / "tokenizer.json").write_text("{}")

    spy = Spy(monkeypatch)
    assert publish_base_model(layout, write) == layout.base_model_dir
    renamed = spy.index(("rename", layout.tmp_base_model_dir, layout.base_model_dir))
    for path in ("config.json", "sub/tokenizer.json", "sub", ""):
        assert spy.index(("fsync", layout.tmp_base_model_dir / path)) < renamed, f"{path} not fsynced before"
    spy.index(("fsync", layout.run_dir), after=renamed)
    files = sorted(str(p.relative_to(layout.base_model_dir)) for p in layout.base_model_dir.rglob("*"))
    assert files == ["config.json", "sub", "sub/tokenizer.json"] and not layout.tmp_base_model_dir.exists()
    publish_base_model(layout, lambda out: pytest.fail("base_model is written again"))
