"""The evaluator's own snapshot of the checkpoint it evaluates: the trainer's retention may delete the published
folder at any time, the evaluation goes on from the snapshot.

    eval/<name>/snapshots/step_00000500-<weights id[:12]>/   model files hard-linked (or copied), and a READY
                                                             listing exactly those files (the published one's
                                                             entries, trainer state left out)

Invariants:
- Published files never change in place (shared.protocol.manifest), so a hard link made while the folder is
  published holds the published bytes; the snapshot is verified against the manifest read before linking, and
  its weights id must be the one claimed: what is loaded is what the result names.
- A file gone before it could be linked means the step was deleted (by retention): `CheckpointDeleted`, never a
  result of other or partial weights.
- A snapshot exists only while its step is running under this evaluator's claim: removed once the outcome is
  recorded (or the claim is given back); one left by a dead evaluator is removed at the next start.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shared.protocol import (
    READY,
    SNAPSHOTS_DIRNAME,
    TRAINER_STATE_DIR,
    CheckpointInvalid,
    Ledger,
    Status,
    atomic_write_json,
    read_manifest,
    step_dirname,
    verify_checkpoint,
    weights_id,
)

log = logging.getLogger(__name__)

_SNAPSHOT_RE = re.compile(r"^step_(\d{8})-[0-9a-f]+$")
_FAULT_PAUSE_ENV = "MATH_SFT_FAULT_PAUSE_AFTER_SNAPSHOT_S"
"""Tests: seconds to wait after a snapshot is taken and verified, before the model is loaded from it."""

_copy_reason: dict[str, str] = {}  # why this process copies instead of linking (said once)


class CheckpointDeleted(CheckpointInvalid):
    """The published checkpoint went away (retention) before the snapshot held all its files."""


def snapshot_dir(eval_dir: Path, step: int, weights: str) -> Path:
    return Path(eval_dir) / SNAPSHOTS_DIRNAME / f"{step_dirname(step)}-{weights[:12]}"


def link_or_copy(src: Path, dest: Path) -> None:
    """Hard-link `src` to `dest`; where the filesystem refuses links (another filesystem, no link support),
    copy, and say so once per process. FileNotFoundError (the source is gone) passes through."""
    if not _copy_reason:
        try:
            os.link(src, dest)
            return
        except FileNotFoundError:
            raise
        except OSError as exc:
            why = errno.errorcode.get(exc.errno or 0, "error")
            _copy_reason["why"] = f"{why}: {exc.strerror or exc}"
            log.warning(
                "cannot hard-link %s into %s (%s): copying checkpoints into the evaluator's snapshots instead "
                "(slower, and the disk holds each evaluated checkpoint twice while it is evaluated)",
                *(src, dest.parent, _copy_reason["why"]),
            )
    shutil.copy2(src, dest)


def _deleted(ckpt_dir: Path, what: str) -> CheckpointDeleted | CheckpointInvalid:
    """Something of `ckpt_dir` is gone: deleted, when its READY is gone too (retention removes READY first, so a
    deleted step never looks like a whole one); a broken checkpoint (a file missing under READY) otherwise."""
    if (ckpt_dir / READY).exists():
        return CheckpointInvalid(f"{what}: missing file listed in {READY}")
    return CheckpointDeleted(f"{ckpt_dir}: deleted before it could be evaluated")


def _read_published(ckpt_dir: Path) -> dict[str, Any]:
    try:
        return read_manifest(ckpt_dir)
    except CheckpointInvalid as exc:
        if (ckpt_dir / READY).exists():
            raise
        raise _deleted(ckpt_dir, str(ckpt_dir)) from exc


def take_snapshot(ckpt_dir: Path, eval_dir: Path, step: int, weights: str | None) -> Path:
    """Link the published checkpoint's model files into this evaluation's snapshot of (step, weights), write its
    READY, verify it (model files hashed) and check the weights are those claimed. Returns the snapshot folder.
    CheckpointDeleted when the checkpoint went away first; CheckpointInvalid when it does not verify."""
    manifest = _read_published(ckpt_dir)
    if weights is not None and weights_id(manifest) != weights:
        raise CheckpointInvalid(f"{ckpt_dir}: its manifest changed after it was claimed")
    dest = snapshot_dir(eval_dir, step, weights_id(manifest))
    shutil.rmtree(dest, ignore_errors=True)  # a half-made one of this process's earlier attempt
    files = {rel: meta for rel, meta in manifest["files"].items() if not rel.startswith(TRAINER_STATE_DIR + "/")}
    try:
        for rel in sorted(files):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            link_or_copy(ckpt_dir / rel, dest / rel)
    except FileNotFoundError as exc:
        remove_snapshot(dest)
        raise _deleted(ckpt_dir, str(exc.filename)) from None
    atomic_write_json(dest / READY, {**manifest, "files": files, "snapshot_of": str(ckpt_dir)})
    try:
        verify_checkpoint(dest, model_only=True)
    except CheckpointInvalid as exc:
        remove_snapshot(dest)
        raise CheckpointInvalid(str(exc).replace(str(dest), str(ckpt_dir))) from None
    pause_s = float(os.environ.get(_FAULT_PAUSE_ENV, "0") or 0)
    if pause_s:
        time.sleep(pause_s)
    return dest


def remove_snapshot(path: Path | None) -> None:
    if path is not None and path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path is not None:
        path.unlink(missing_ok=True)


def remove_orphan_snapshots(ledger: Ledger, alive: Callable[[dict[str, Any]], bool]) -> list[Path]:
    """Remove the snapshots whose step is not running under a live owner (left by an evaluator that died),
    under the ledger's lock: no claim, and so no new snapshot, appears meanwhile. Returns those removed."""
    root = ledger.path.parent / SNAPSHOTS_DIRNAME

    def sweep(entries: dict[int, dict[str, Any]]) -> list[Path]:
        removed = []
        for path in sorted(root.iterdir()) if root.is_dir() else ():
            match = _SNAPSHOT_RE.match(path.name)
            entry = entries.get(int(match.group(1))) if match else None
            if entry and entry["status"] == Status.RUNNING and alive(entry.get("owner", {})):
                continue
            remove_snapshot(path)
            removed.append(path)
        return removed

    return ledger.update(sweep)
