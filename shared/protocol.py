"""The on-disk protocol between the trainer and the evaluator. Both import this module and nothing else
decides a path, a marker or a file format.

    runs/<run>/
      config.yaml                        resolved config of the trainer (written once per start)
      checkpoints/
        .tmp_step_00000500/              being written; never read by anyone
        step_00000500/                   model files (safetensors, config, tokenizer) + trainer_state/
          READY                          JSON manifest, written last: the only signal a checkpoint is complete
      leases/step_00000500.<owner>.json  an evaluator is using that checkpoint: retention must not delete it
      eval/<eval_name>/
        ledger.json (+ .lock)            per step: running | done | skipped | pending | failed, under a filelock
        step_00000500.json               metrics (written after the samples, atomically)
        step_00000500.samples.jsonl

Invariants:
- A checkpoint directory is complete iff its READY manifest verifies: every file listed with its size
  and sha256, nothing listed missing. READY is written (atomically) only after the directory was
  renamed into place and fsynced, so a crash at any point leaves either no READY or a valid one.
- Temporary directories start with `.tmp_`; only the trainer creates them and it removes leftovers
  when it starts, so a reader ignores them.
- Every file is replaced by rename, never rewritten in place, so a reader sees old or new, never half.

Imports neither torch nor vllm (tests check this).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from filelock import FileLock

READY = "READY"
TMP_PREFIX = ".tmp_"
TRAINER_STATE_DIR = "trainer_state"
MANIFEST_VERSION = 1
_STEP_RE = re.compile(r"^step_(\d{8})$")
_HASH_CHUNK_BYTES = 8 << 20


class CheckpointInvalid(Exception):
    """A checkpoint directory failed verification; the message says exactly what is wrong."""


class CheckpointWriteError(RuntimeError):
    """The trainer could not write a checkpoint; earlier checkpoints are intact."""


class ResumeError(ValueError):
    """A run cannot be resumed as configured (e.g. another number of training processes)."""


def step_dirname(step: int) -> str:
    return f"step_{step:08d}"


def parse_step(name: str) -> int | None:
    match = _STEP_RE.match(name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run directory."""

    run_dir: Path

    @property
    def config_path(self) -> Path:
        return self.run_dir / "config.yaml"

    @property
    def checkpoints_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def leases_dir(self) -> Path:
        return self.run_dir / "leases"

    @property
    def base_model_dir(self) -> Path:
        """Where the trainer saves the embedded model it built, so every process loads the same one."""
        return self.run_dir / "base_model"

    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints_dir / step_dirname(step)

    def tmp_checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints_dir / (TMP_PREFIX + step_dirname(step))

    def eval_dir(self, name: str) -> Path:
        return self.run_dir / "eval" / name

    def result_path(self, eval_name: str, step: int) -> Path:
        return self.eval_dir(eval_name) / f"{step_dirname(step)}.json"

    def samples_path(self, eval_name: str, step: int) -> Path:
        return self.eval_dir(eval_name) / f"{step_dirname(step)}.samples.jsonl"


# --------------------------------------------------------------------------------------
# Durable writes


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `path` so that readers see the old file or the whole new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------
# Manifest (READY) and verification


def _listed_files(directory: Path) -> list[str]:
    files = []
    for root, _, names in os.walk(directory):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), directory)
            if rel != READY:
                files.append(rel)
    return sorted(files)


def build_manifest(directory: Path, step: int, config_hash: str) -> dict[str, Any]:
    rels = _listed_files(directory)
    # hashlib releases the GIL on large buffers: big files hash in parallel.
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(rels)))) as pool:
        digests = list(pool.map(lambda rel: file_sha256(directory / rel), rels))
    files = {rel: {"size_bytes": (directory / rel).stat().st_size, "sha256": d} for rel, d in zip(rels, digests)}
    return {"version": MANIFEST_VERSION, "step": step, "time": time.time(), "config_hash": config_hash, "files": files}


def publish_checkpoint(tmp_dir: Path, final_dir: Path, step: int, config_hash: str) -> dict[str, Any]:
    """Make a fully written `tmp_dir` visible as `final_dir`, then mark it READY.

    Order matters: fsync files -> rename -> fsync parent -> write READY atomically. A crash before the
    last step leaves a directory without READY, which no reader trusts."""
    manifest = build_manifest(tmp_dir, step, config_hash)
    for rel in manifest["files"]:
        with open(tmp_dir / rel, "rb") as f:
            os.fsync(f.fileno())
    for root, _, _ in os.walk(tmp_dir):
        fsync_dir(Path(root))
    if final_dir.exists():
        raise FileExistsError(f"{final_dir} already exists; refusing to overwrite a published checkpoint")
    os.rename(tmp_dir, final_dir)
    fsync_dir(final_dir.parent)
    atomic_write_json(final_dir / READY, manifest)
    return manifest


def read_manifest(directory: Path) -> dict[str, Any]:
    marker = Path(directory) / READY
    if not Path(directory).is_dir():
        raise CheckpointInvalid(f"{directory}: no such checkpoint directory")
    if not marker.is_file():
        raise CheckpointInvalid(f"{directory}: missing {READY} marker (checkpoint incomplete or not from this trainer)")
    try:
        manifest = json.loads(marker.read_text())
        files = manifest["files"]
        manifest["step"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointInvalid(f"{marker}: unreadable manifest ({exc})") from None
    if not isinstance(files, dict):
        raise CheckpointInvalid(f"{marker}: unreadable manifest ('files' is not a mapping)")
    return manifest


def verify_checkpoint(directory: Path, check_hashes: bool = True, model_only: bool = False) -> dict[str, Any]:
    """Return the manifest if every file matches it; raise CheckpointInvalid naming the first problem.
    `model_only`: hash only what a model loader reads (the evaluator), sizes of everything still checked."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    to_hash = []
    for rel, meta in sorted(manifest["files"].items()):
        path = directory / rel
        if not path.is_file():
            raise CheckpointInvalid(f"{path}: missing file listed in {READY}")
        size = path.stat().st_size
        if size != meta["size_bytes"]:
            raise CheckpointInvalid(f"{path}: size mismatch ({size} bytes on disk, {meta['size_bytes']} in {READY})")
        if check_hashes and not (model_only and rel.startswith(TRAINER_STATE_DIR + "/")):
            to_hash.append((rel, path, meta["sha256"]))
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(to_hash)))) as pool:
        digests = list(pool.map(lambda item: file_sha256(item[1]), to_hash))
    for (rel, path, expected), digest in zip(to_hash, digests):
        if digest != expected:
            raise CheckpointInvalid(f"{path}: content hash mismatch (file changed or corrupted after it was written)")
    return manifest


def manifest_hash(manifest: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode()).hexdigest()[:16]


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


# --------------------------------------------------------------------------------------
# Process identity (leases and ledger claims name their owner so a dead owner can be detected)


def _process_start_ticks(pid: int) -> str | None:
    try:
        # Field 22 of /proc/<pid>/stat is the start time; it tells a reused pid from the original.
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def current_owner() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _process_start_ticks(os.getpid())}


def owner_alive(owner: dict[str, Any]) -> bool:
    """False only when the owner is provably gone (same host, process missing or pid reused).
    An owner on another host is assumed alive: we cannot see its processes."""
    if owner.get("host") != socket.gethostname():
        return True
    pid = owner.get("pid")
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    start = _process_start_ticks(pid)
    return owner.get("start") is None or start is None or start == owner["start"]


# --------------------------------------------------------------------------------------
# Leases: an evaluator marks a checkpoint it is using; the trainer's retention honours them.


class Lease:
    """`with Lease(layout, step): ...` holds the checkpoint of `step` against deletion."""

    def __init__(self, layout: RunLayout, step: int):
        owner = current_owner()
        self.path = layout.leases_dir / f"{step_dirname(step)}.{owner['host']}-{owner['pid']}.json"
        self.record = {"step": step, "time": time.time(), **owner}

    def __enter__(self) -> "Lease":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, self.record)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.path.unlink(missing_ok=True)


def leased_steps(layout: RunLayout) -> set[int]:
    """Steps with a lease whose owner may still be alive. Leases of dead owners are removed."""
    steps = set()
    if not layout.leases_dir.is_dir():
        return steps
    for path in layout.leases_dir.glob("step_*.json"):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # being replaced right now: the next look sees it
        if owner_alive(record):
            steps.add(int(record["step"]))
        else:
            path.unlink(missing_ok=True)
    return steps


# --------------------------------------------------------------------------------------
# Evaluation ledger


class Status:
    RUNNING = "running"
    DONE = "done"
    SKIPPED = "skipped"
    PENDING = "pending"  # passed over for a newer checkpoint, to be back-filled
    FAILED = "failed"


class Ledger:
    """What one evaluation (run + eval name) did with each step, in `ledger.json` under a filelock.

    All read-modify-write goes through `update`, which holds the lock, so two evaluators on the same
    eval name never both claim a step."""

    def __init__(self, eval_dir: Path):
        self.path = Path(eval_dir) / "ledger.json"
        self._lock = FileLock(str(self.path) + ".lock")

    def read(self) -> dict[int, dict[str, Any]]:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError as exc:
            raise ValueError(f"{self.path}: corrupted ledger ({exc}); move it away to start this evaluation afresh") from None
        return {int(k): v for k, v in raw.items()}

    def update(self, fn: Callable[[dict[int, dict[str, Any]]], Any]) -> Any:
        """Run `fn(entries)` under the lock; it may modify entries in place. Returns fn's result."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            entries = self.read()
            before = json.dumps(entries, sort_keys=True)
            result = fn(entries)
            if json.dumps(entries, sort_keys=True) != before:
                atomic_write_json(self.path, {step_dirname(k)[5:]: v for k, v in sorted(entries.items())})
            return result

    def set(self, step: int, status: str, **info: Any) -> None:
        def apply(entries: dict[int, dict[str, Any]]) -> None:
            kept = {k: v for k, v in entries.get(step, {}).items() if k == "attempts"}
            entries[step] = {**kept, "status": status, "time": time.time(), **info}

        self.update(apply)


def iter_ledgers(layout: RunLayout) -> Iterator[Ledger]:
    root = layout.run_dir / "eval"
    if root.is_dir():
        for eval_dir in sorted(root.iterdir()):
            if (eval_dir / "ledger.json").is_file():
                yield Ledger(eval_dir)


def steps_still_needed(layout: RunLayout) -> set[int]:
    """Steps some evaluation is running or still means to evaluate (pending back-fill)."""
    needed = set()
    for ledger in iter_ledgers(layout):
        try:
            entries = ledger.read()
        except ValueError:
            continue
        for step, entry in entries.items():
            if entry["status"] == Status.PENDING or (entry["status"] == Status.RUNNING and owner_alive(entry.get("owner", {}))):
                needed.add(step)
    return needed
