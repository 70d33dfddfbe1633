"""Manifest (READY): what a published checkpoint holds, and its verification.

Invariants:
- A checkpoint directory is complete iff its READY manifest verifies: every file listed with its size and
  SHA-256 per 64 MiB chunk (hashed while written), nothing listed missing.
- READY is written (atomically) only after every file and folder was fsynced, the directory renamed into place
  and its parent fsynced: a crash at any point leaves either no READY or a valid one.
- Published files never change in place: a reader may hard-link them and keep reading after the folder goes.
- A result is tied to the weights it measured (`weights_id`, a hash of the model files' hashes), never to a step
  number alone: a step folder replaced by other weights is evaluated again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from shared.errors import UserError
from shared.protocol.durable import (
    CHUNK_BYTES,
    atomic_write_json,
    chunk_digests,
    fsync_dir,
    fsync_tree,
)
from shared.protocol.layout import CORRUPT_PREFIX, READY, TMP_PREFIX, TRAINER_STATE_DIR, parse_step

MANIFEST_VERSION = 2
"""SHA-256 per `chunk_bytes` chunk of each file, computed while the file is written and verified chunk by chunk
in parallel threads. The only version this code writes or reads: any other is refused, naming the READY file."""
_FILE_MODE = 0o644
"""Every published file, whatever wrote it (safetensors writes 0600): readable by the group, like the rest."""


class CheckpointInvalid(UserError):
    """A checkpoint directory failed verification; the message says exactly what is wrong."""


class CheckpointWriteError(UserError, RuntimeError):
    """The trainer could not write a checkpoint; earlier checkpoints are intact."""


def _listed_files(directory: Path) -> list[str]:
    files = []
    for root, _, names in os.walk(directory):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), directory)
            if rel != READY:
                files.append(rel)
    return sorted(files)


def build_manifest(
    directory: Path,
    step: int,
    config_hash: str,
    hashed: dict[str, list[str]] | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> dict[str, Any]:
    """Manifest of every file in `directory`. `hashed`: chunk digests computed while writing (by the writer, at
    this chunk size); any other file is hashed from the disk, all its chunks in parallel."""
    rels = _listed_files(directory)
    hashed = hashed or {}
    missing = [rel for rel in rels if rel not in hashed]
    hashed = {
        **hashed,
        **dict(zip(missing, chunk_digests([directory / rel for rel in missing], chunk_bytes), strict=True)),
    }
    files = {rel: {"size_bytes": (directory / rel).stat().st_size, "sha256_chunks": hashed[rel]} for rel in rels}
    return {
        "version": MANIFEST_VERSION,
        "step": step,
        "time": time.time(),
        "config_hash": config_hash,
        "chunk_bytes": chunk_bytes,
        "files": files,
    }


def publish_checkpoint(
    tmp_dir: Path, final_dir: Path, step: int, config_hash: str, hashed: dict[str, list[str]] | None = None
) -> dict[str, Any]:
    """Make a fully written `tmp_dir` visible as `final_dir`, then mark it READY (`hashed`: see build_manifest).

    Order matters: fsync files -> rename -> fsync parent -> write READY atomically. A crash before the
    last step leaves a directory without READY, which no reader trusts."""
    manifest = build_manifest(tmp_dir, step, config_hash, hashed)
    for rel in manifest["files"]:
        os.chmod(tmp_dir / rel, _FILE_MODE)
    fsync_tree(tmp_dir)
    if final_dir.exists():
        raise FileExistsError(f"{final_dir} already exists; refusing to overwrite a published checkpoint")
    os.rename(tmp_dir, final_dir)
    fsync_dir(final_dir.parent)
    atomic_write_json(final_dir / READY, manifest)
    return manifest


def read_manifest(directory: Path) -> dict[str, Any]:
    """The READY manifest of `directory`, not verified. CheckpointInvalid, one line naming READY, where it is
    missing, unreadable, or of a version other than MANIFEST_VERSION."""
    marker = Path(directory) / READY
    if not Path(directory).is_dir():
        raise CheckpointInvalid(f"{directory}: no such checkpoint directory")
    if not marker.is_file():
        raise CheckpointInvalid(f"{directory}: missing {READY} marker (checkpoint incomplete or not from this trainer)")
    try:
        manifest = json.loads(marker.read_text())
        version = manifest.get("version")
    except (ValueError, AttributeError) as exc:
        raise CheckpointInvalid(f"{marker}: unreadable manifest ({exc})") from None
    if isinstance(version, int) and version > MANIFEST_VERSION:
        raise CheckpointInvalid(
            f"{marker}: manifest version {version} is newer than this code reads "
            f"({MANIFEST_VERSION}); update the code that reads it"
        )
    if version != MANIFEST_VERSION:
        raise CheckpointInvalid(
            f"{marker}: manifest version {version!r} is not one this code reads ({MANIFEST_VERSION})"
        )
    missing = [key for key in ("files", "step", "chunk_bytes") if key not in manifest]
    if missing:
        raise CheckpointInvalid(f"{marker}: unreadable manifest (no {missing[0]!r} key)")
    if not isinstance(manifest["files"], dict):
        raise CheckpointInvalid(f"{marker}: unreadable manifest ('files' is not a mapping)")
    return manifest


def verify_checkpoint(directory: Path, check_hashes: bool = True, model_only: bool = False) -> dict[str, Any]:
    """Return the manifest if every file matches it; raise CheckpointInvalid naming the first problem.
    `model_only`: hash only what a model loader reads (the evaluator), sizes of everything still checked."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    hashed = []
    for rel, meta in sorted(manifest["files"].items()):
        path = directory / rel
        if not path.is_file():
            raise CheckpointInvalid(f"{path}: missing file listed in {READY}")
        size = path.stat().st_size
        if size != meta["size_bytes"]:
            raise CheckpointInvalid(f"{path}: size mismatch ({size} bytes on disk, {meta['size_bytes']} in {READY})")
        if check_hashes and not (model_only and rel.startswith(TRAINER_STATE_DIR + "/")):
            hashed.append((path, meta["sha256_chunks"]))
    digests = chunk_digests([path for path, _ in hashed], manifest["chunk_bytes"])
    for (path, expected), found in zip(hashed, digests, strict=True):
        if found != expected:
            raise CheckpointInvalid(f"{path}: content hash mismatch (file changed or corrupted after it was written)")
    return manifest


def _is_model_file(rel: str) -> bool:
    return not rel.startswith(TRAINER_STATE_DIR + "/") and rel != READY


def _weights_id_of(sha256_by_file: dict[str, str]) -> str:
    model = {rel: digest for rel, digest in sha256_by_file.items() if _is_model_file(rel)}
    return hashlib.sha256(json.dumps(model, sort_keys=True).encode()).hexdigest()[:16]


def _file_digest(chunks: list[str]) -> str:
    return hashlib.sha256("".join(chunks).encode()).hexdigest()


def weights_id(manifest: dict[str, Any]) -> str:
    """What a result measured: a hash of the model files' hashes (trainer state left out). The same files give
    the same id from a manifest written at the default CHUNK_BYTES (the trainer's) and from `folder_weights_id`."""
    return _weights_id_of({rel: _file_digest(meta["sha256_chunks"]) for rel, meta in manifest["files"].items()})


def folder_weights_id(directory: Path) -> str:
    """`weights_id` of a plain model folder (no READY), from its contents: reads every file once, in parallel."""
    rels = [rel for rel in _listed_files(directory) if _is_model_file(rel) and not rel.startswith(".")]
    digests = chunk_digests([directory / rel for rel in rels])
    return _weights_id_of({rel: _file_digest(d) for rel, d in zip(rels, digests, strict=True)})


def ready_weights_ids(checkpoints_dir: Path) -> dict[int, str]:
    """{step: weights_id} of the steps with a readable READY (not verified: a cheap look at the disk)."""
    found = {}
    for step, path in list_ready_checkpoints(checkpoints_dir).items():
        try:
            found[step] = weights_id(read_manifest(path))
        except CheckpointInvalid:
            continue  # being replaced, or broken: verification reports it when it is claimed
    return found


def list_ready_checkpoints(checkpoints_dir: Path) -> dict[int, Path]:
    """Steps whose directory has a READY marker (not yet verified), by step."""
    found = {}
    try:
        entries = list(os.scandir(checkpoints_dir))
    except FileNotFoundError:
        return {}
    for entry in entries:
        step = parse_step(entry.name)
        if step is not None and os.path.isfile(os.path.join(entry.path, READY)):
            found[step] = Path(entry.path)
    return dict(sorted(found.items()))


def move_aside_corrupt(checkpoint_dir: Path) -> Path:
    """Rename a published checkpoint that failed verification to corrupt_step_N (corrupt_step_N.2, ...)
    so that the step can be written again; READY goes first, so nobody trusts it meanwhile."""
    target = checkpoint_dir.with_name(CORRUPT_PREFIX + checkpoint_dir.name)
    n = 1
    while target.exists():
        n += 1
        target = checkpoint_dir.with_name(f"{CORRUPT_PREFIX}{checkpoint_dir.name}.{n}")
    (checkpoint_dir / READY).unlink(missing_ok=True)
    os.rename(checkpoint_dir, target)
    return target


def remove_incomplete_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Remove leftovers of interrupted saves: temporary folders, and step folders renamed into place
    whose READY was never written. Only the trainer (the only writer) may call this."""
    removed = []
    if checkpoints_dir.is_dir():
        for entry in checkpoints_dir.iterdir():
            unpublished = parse_step(entry.name) is not None and not (entry / READY).exists()
            if entry.name.startswith(TMP_PREFIX) or unpublished:
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
                removed.append(entry)
    return removed
