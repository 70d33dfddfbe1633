"""The on-disk protocol between the trainer and the evaluator. Both import this module and nothing else
decides a path, a marker or a file format.

    runs/<run>/
      config.yaml                        resolved config of the trainer's latest start
      .trainer.lock (+ .trainer.json)    held by the one trainer of this run (an OS lock: gone when it dies)
      checkpoints/
        .tmp_step_00000500/              being written; never read by anyone
        step_00000500/                   model files (safetensors, config, tokenizer) + trainer_state/
          READY                          JSON manifest, written last: the only signal a checkpoint is complete
        corrupt_step_00000500/           a published checkpoint that failed verification, moved aside on resume
      leases/<owner-id>.json             one per evaluator process: heartbeat, the steps it holds (leases),
                                         the evaluation it serves (+ .lock: serialises leases and retention)
      best -> checkpoints/step_00000500  with training.keep_best: the best checkpoint by the evaluation's
                                         results (a symlink, replaced atomically)
      eval/<eval_name>/
        ledger.json (+ .lock)            per step: running | done | skipped | pending | failed | deleted
        <set>/step_00000500.samples.jsonl   one line per sample (problem, sample index, response, rewards...)
        <set>/step_00000500.json         that set's metrics
        step_00000500.json               every set's metrics under "sets" (written last, atomically: it
                                         implies the files above exist)

Invariants:
- A checkpoint directory is complete iff its READY manifest verifies: every file listed with its size
  and SHA-256 (per 64 MiB chunk since version 2, hashed while written), nothing listed missing.
  READY is written (atomically) only after the directory was
  renamed into place and fsynced, so a crash at any point leaves either no READY or a valid one.
- Temporary directories start with `.tmp_`; only the trainer creates them and it removes leftovers
  when it starts, so a reader ignores them.
- Every file is replaced by rename, never rewritten in place, so a reader sees old or new, never half.
- A result is tied to the weights it measured (`weights_id`, a hash of the model files' hashes), never to
  a step number alone: a step folder replaced by other weights is evaluated again.
- An owner (evaluator process) is alive while its heartbeat is fresh. Within one kernel and pid namespace a
  vanished pid proves it dead sooner; across hosts and containers only the heartbeat counts, so clocks must
  agree to well within `timeout_s`. A frozen owner goes stale and loses its claims; it checks its claim
  before recording anything, so a stale owner's result is discarded, never recorded over another's.
- Retention decides under the leases lock and every ledger's lock, and READY goes first; a step is
  leased or claimed under those same locks, so it is never deleted between being chosen and being held.

Imports neither torch nor vllm (tests check this).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from filelock import FileLock

if TYPE_CHECKING:
    from shared.config import Config

READY = "READY"
TMP_PREFIX = ".tmp_"
CORRUPT_PREFIX = "corrupt_"
TRAINER_STATE_DIR = "trainer_state"
MANIFEST_VERSION = 2
"""1: one SHA-256 per file. 2: SHA-256 per CHUNK_BYTES chunk of each file, computed while the file is written
and verified chunk by chunk in parallel threads. Readers take both; a newer version is refused."""
CHUNK_BYTES = 64 << 20
_STEP_RE = re.compile(r"^step_(\d{8})$")
_HASH_CHUNK_BYTES = 8 << 20
_HASH_THREADS = min(32, os.cpu_count() or 1)
_FILE_MODE = 0o644
"""Every published file, whatever wrote it (safetensors writes 0600): readable by the group, like the rest."""
_FAULT_LEDGER_HOLD_ENV = "MATH_SFT_FAULT_LEDGER_HOLD_S"
"""Tests: seconds to wait inside a ledger update, between reading and writing (widens any race)."""


class CheckpointInvalid(Exception):
    """A checkpoint directory failed verification; the message says exactly what is wrong."""


class CheckpointWriteError(RuntimeError):
    """The trainer could not write a checkpoint; earlier checkpoints are intact."""


class ResumeError(ValueError):
    """A run cannot be resumed as configured (e.g. another number of training processes)."""


class RunInUse(RuntimeError):
    """Another trainer holds the run directory."""


class ClaimLost(RuntimeError):
    """This process no longer owns the step it evaluated (it went stale and another evaluator took it)."""


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
    def best_path(self) -> Path:
        return self.run_dir / "best"

    @property
    def trainer_lock_path(self) -> Path:
        return self.run_dir / ".trainer.lock"

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
        return result_file(self.eval_dir(eval_name), step)


# Result files of an evaluation folder (a run's eval/<name>/, or --out's): the layout above.


def result_file(eval_dir: Path, step: int, set_name: str | None = None) -> Path:
    """step_N.json, every set's metrics; with `set_name`, <set>/step_N.json, that set's."""
    return (eval_dir / set_name if set_name else eval_dir) / f"{step_dirname(step)}.json"


def samples_file(eval_dir: Path, set_name: str, step: int) -> Path:
    return eval_dir / set_name / f"{step_dirname(step)}.samples.jsonl"


def result_steps(eval_dir: Path, set_name: str | None = None) -> dict[int, Path]:
    """{step: its result file} of the steps with one (every set's, or `set_name`'s), in step order."""
    folder = eval_dir / set_name if set_name else eval_dir
    found = {parse_step(path.stem): path for path in folder.glob("step_*.json")}
    return {step: found[step] for step in sorted(s for s in found if s is not None)}


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


class ChunkHasher:
    """A write-only file object that hashes what passes through it, per `chunk_bytes` chunk: a file is hashed
    as it is written, never read back. Within each `write`, the pieces of a large write are hashed by a thread
    pool (one thread hashes ~1 GB/s, slower than the disks we write to) while the bytes go to the file, and all
    of it ends before `write` returns: the caller may reuse its buffer at once (torch.save does)."""

    def __init__(self, f, chunk_bytes: int = CHUNK_BYTES):
        self.f, self.chunk_bytes = f, chunk_bytes
        self._pool = ThreadPoolExecutor(max_workers=_HASH_THREADS)
        self._full: list = []  # hash objects of complete chunks, in file order
        self._hash, self._filled = hashlib.sha256(), 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        pending = []
        pos = 0
        while pos < len(view):
            take = min(self.chunk_bytes - self._filled, len(view) - pos)
            piece = view[pos : pos + take]
            if take >= 1 << 20:  # each hash object gets one piece per call: no two threads ever share one
                pending.append(self._pool.submit(self._hash.update, piece))
            else:
                self._hash.update(piece)
            self._filled += take
            pos += take
            if self._filled == self.chunk_bytes:
                self._full.append(self._hash)
                self._hash, self._filled = hashlib.sha256(), 0
        self.f.write(view)
        for future in pending:
            future.result()
        return len(view)

    def flush(self) -> None:
        self.f.flush()

    def finish(self) -> list[str]:
        self._pool.shutdown()
        digests = [h.hexdigest() for h in self._full]
        if self._filled or not digests:
            digests.append(self._hash.hexdigest())
        return digests


def write_hashed(path: Path, data: bytes, chunk_bytes: int = CHUNK_BYTES) -> list[str]:
    """Write `data` to `path` (in place: for files inside a temporary checkpoint folder); its chunk digests."""
    with open(path, "wb") as f:
        hasher = ChunkHasher(f, chunk_bytes)
        hasher.write(data)
        return hasher.finish()


def _chunk_digest(path: Path, index: int, chunk_bytes: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(index * chunk_bytes)
        left = chunk_bytes
        while left and (block := f.read(min(left, _HASH_CHUNK_BYTES))):
            h.update(block)
            left -= len(block)
    return h.hexdigest()


def chunk_digests(paths: list[Path], chunk_bytes: int = CHUNK_BYTES) -> list[list[str]]:
    """Chunk digests of each file, every chunk of every file hashed in parallel (hashlib releases the GIL)."""
    tasks = [
        (i, path, k) for i, path in enumerate(paths) for k in range(max(1, -(-path.stat().st_size // chunk_bytes)))
    ]
    with ThreadPoolExecutor(max_workers=min(_HASH_THREADS, max(1, len(tasks)))) as pool:
        digests = list(pool.map(lambda task: _chunk_digest(task[1], task[2], chunk_bytes), tasks))
    out: list[list[str]] = [[] for _ in paths]
    for (i, _, _), digest in zip(tasks, digests):
        out[i].append(digest)
    return out


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
    hashed = {**hashed, **dict(zip(missing, chunk_digests([directory / rel for rel in missing], chunk_bytes)))}
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
    version = manifest.get("version")
    if not isinstance(version, int) or version > MANIFEST_VERSION:
        raise CheckpointInvalid(
            f"{marker}: manifest version {version!r} is newer than this code reads "
            f"(<= {MANIFEST_VERSION}); update the code that reads it"
        )
    return manifest


def verify_checkpoint(directory: Path, check_hashes: bool = True, model_only: bool = False) -> dict[str, Any]:
    """Return the manifest if every file matches it; raise CheckpointInvalid naming the first problem.
    `model_only`: hash only what a model loader reads (the evaluator), sizes of everything still checked."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    whole, chunked = [], []  # version 1 entries (one digest a file), version 2 entries (a digest a chunk)
    for rel, meta in sorted(manifest["files"].items()):
        path = directory / rel
        if not path.is_file():
            raise CheckpointInvalid(f"{path}: missing file listed in {READY}")
        size = path.stat().st_size
        if size != meta["size_bytes"]:
            raise CheckpointInvalid(f"{path}: size mismatch ({size} bytes on disk, {meta['size_bytes']} in {READY})")
        if check_hashes and not (model_only and rel.startswith(TRAINER_STATE_DIR + "/")):
            (whole if "sha256" in meta else chunked).append((path, meta))
    with ThreadPoolExecutor(max_workers=min(_HASH_THREADS, max(1, len(whole)))) as pool:
        whole_digests = list(pool.map(lambda item: file_sha256(item[0]), whole))
    chunk_lists = chunk_digests([path for path, _ in chunked], manifest.get("chunk_bytes", CHUNK_BYTES))
    found = [(path, meta.get("sha256"), digest) for (path, meta), digest in zip(whole, whole_digests)]
    found += [(path, meta.get("sha256_chunks"), digests) for (path, meta), digests in zip(chunked, chunk_lists)]
    for path, expected, digest in found:
        if digest != expected:
            raise CheckpointInvalid(f"{path}: content hash mismatch (file changed or corrupted after it was written)")
    return manifest


def _is_model_file(rel: str) -> bool:
    return not rel.startswith(TRAINER_STATE_DIR + "/") and rel != READY


def _weights_id_of(sha256_by_file: dict[str, str]) -> str:
    model = {rel: digest for rel, digest in sha256_by_file.items() if _is_model_file(rel)}
    return hashlib.sha256(json.dumps(model, sort_keys=True).encode()).hexdigest()[:16]


def _file_digest(meta: dict[str, Any]) -> str:
    return meta.get("sha256") or hashlib.sha256("".join(meta["sha256_chunks"]).encode()).hexdigest()


def weights_id(manifest: dict[str, Any]) -> str:
    """What a result measured: a hash of the model files' hashes (trainer state left out). The same files give
    the same id from a version-2 manifest and from `folder_weights_id` (a version-1 manifest, hashing whole
    files, gives another id for the same bytes: its results are evaluated again once)."""
    return _weights_id_of({rel: _file_digest(meta) for rel, meta in manifest["files"].items()})


def folder_weights_id(directory: Path) -> str:
    """`weights_id` of a plain model folder (no READY), from its contents: reads every file once, in parallel."""
    rels = [rel for rel in _listed_files(directory) if _is_model_file(rel) and not rel.startswith(".")]
    digests = chunk_digests([directory / rel for rel in rels])
    return _weights_id_of({rel: _file_digest({"sha256_chunks": d}) for rel, d in zip(rels, digests)})


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


# --------------------------------------------------------------------------------------
# Owners: who holds a claim or a lease, and whether it is still alive


def _read_first_line(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.readline().strip() or None
    except OSError:
        return None


def proc_stat(pid: int | str) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (field 3, the state, first); None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _process_start_ticks(pid: int) -> str | None:
    # Field 22 of /proc/<pid>/stat is the start time; it tells a reused pid from the original.
    fields = proc_stat(pid)
    return fields[19] if fields and len(fields) > 19 else None


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


_OWNER_ID = uuid.uuid4().hex[:16]


def current_owner() -> dict[str, Any]:
    """This process: a random id (unique across hosts and containers) plus what lets a process on the
    same kernel and pid namespace prove it dead early."""
    return {
        "id": _OWNER_ID,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "start": _process_start_ticks(os.getpid()),
        "boot_id": _read_first_line("/proc/sys/kernel/random/boot_id"),
        "pid_ns": _pid_namespace(),
    }


def _provably_gone(owner: dict[str, Any]) -> bool:
    """True only where we share the owner's kernel and pid namespace and its process no longer exists."""
    me = current_owner()
    if not owner.get("boot_id") or owner.get("boot_id") != me["boot_id"] or owner.get("pid_ns") != me["pid_ns"]:
        return False
    pid = owner.get("pid")
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    start = _process_start_ticks(pid)
    return owner.get("start") is not None and start is not None and start != owner["start"]


def describe_owner(owner: dict[str, Any]) -> str:
    return f"pid {owner.get('pid')} on {owner.get('host')} (owner {owner.get('id')})"


# --------------------------------------------------------------------------------------
# Presence: one heartbeat file per evaluator process and run; leases are the steps it lists.

DEFAULT_HEARTBEAT_TIMEOUT_S = 60.0


def _presence_alive(record: dict[str, Any], now: float) -> bool:
    try:
        fresh = now - float(record["heartbeat_time"]) <= float(record["timeout_s"])
    except (KeyError, TypeError, ValueError):
        return False
    return fresh and not _provably_gone(record.get("owner", {}))


def live_presences(layout: RunLayout) -> dict[str, dict[str, Any]]:
    """{owner id: presence record} of the evaluator processes of this run whose heartbeat is fresh.
    Files of owners provably dead are removed; stale ones (frozen, or on a host that died) are ignored."""
    found: dict[str, dict[str, Any]] = {}
    if not layout.leases_dir.is_dir():
        return found
    now = time.time()
    for path in layout.leases_dir.glob("*.json"):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # being replaced right now: the next look sees it
        if not isinstance(record, dict):
            continue
        if _presence_alive(record, now):
            found[record["owner"]["id"]] = record
        elif _provably_gone(record.get("owner", {})):
            path.unlink(missing_ok=True)
    return found


def owner_alive(layout: RunLayout, owner: dict[str, Any]) -> bool:
    """Is the evaluator that claimed something (its ledger entry's owner) still alive?"""
    return owner.get("id") in live_presences(layout)


class Presence:
    """An evaluator process's heartbeat in a run (`leases/<owner id>.json`), rewritten every
    timeout_s / 6 by a thread, and the steps it holds against deletion (`with presence.lease(step)`).

    `watching`: a watcher of the run (its evaluation `eval_name` counts as attached: the trainer's
    retention keeps steps it has not seen); `backfill`: it means to evaluate every step."""

    def __init__(
        self,
        layout: RunLayout,
        eval_name: str | None,
        *,
        watching: bool,
        backfill: bool,
        timeout_s: float = DEFAULT_HEARTBEAT_TIMEOUT_S,
    ):
        self.layout = layout
        self.owner = current_owner()
        self.path = layout.leases_dir / f"{self.owner['id']}.json"
        self.info = {"eval_name": eval_name, "watching": watching, "backfill": backfill, "timeout_s": timeout_s}
        self.steps: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self) -> None:
        with self._lock:
            record = {**self.info, "owner": self.owner, "steps": sorted(self.steps), "heartbeat_time": time.time()}
            self.path.parent.mkdir(
                parents=True, exist_ok=True
            )  # removed meanwhile (a run folder deleted and made again)
            atomic_write_json(self.path, record)

    def start(self) -> "Presence":
        self.layout.leases_dir.mkdir(parents=True, exist_ok=True)
        self._write()
        self._thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.info["timeout_s"] / 6):
            try:
                self._write()
            except OSError as exc:  # a full or vanished disk: we go stale, and say so
                print(f"warning: heartbeat {self.path}: {exc}")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.path.unlink(missing_ok=True)

    def lease(self, step: int) -> "_Lease":
        return _Lease(self, step)


class _Lease:
    def __init__(self, presence: Presence, step: int):
        self.presence, self.step = presence, step

    def __enter__(self) -> "_Lease":
        """Hold the step, then check it still exists: retention decides under the same lock, so a step
        seen here is kept until __exit__."""
        layout = self.presence.layout
        with FileLock(str(layout.leases_dir / ".lock")):
            with self.presence._lock:
                self.presence.steps.add(self.step)
            try:
                self.presence._write()
            except BaseException:
                with self.presence._lock:
                    self.presence.steps.discard(self.step)
                raise
            if not (layout.checkpoint_dir(self.step) / READY).exists():
                self.__exit__()
                raise CheckpointInvalid(f"{layout.checkpoint_dir(self.step)}: deleted before it could be evaluated")
        return self

    def __exit__(self, *exc: Any) -> None:
        with self.presence._lock:
            self.presence.steps.discard(self.step)
        self.presence._write()


# --------------------------------------------------------------------------------------
# Evaluation ledger


class Status:
    RUNNING = "running"
    DONE = "done"
    SKIPPED = "skipped"
    PENDING = "pending"  # passed over for a newer checkpoint (back-fill), or given back by a stopped evaluator
    FAILED = "failed"
    DELETED = "deleted"  # removed by the trainer's retention before this evaluation saw it


class Ledger:
    """What one evaluation (run + eval name) did with each step, in `ledger.json` under a filelock.

    All read-modify-write goes through `update`, which holds the lock, so two evaluators on the same
    eval name never both claim a step. Entries carry the `weights_id` they refer to."""

    def __init__(self, eval_dir: Path):
        self.path = Path(eval_dir) / "ledger.json"
        self.lock = FileLock(str(self.path) + ".lock")

    def read(self) -> dict[int, dict[str, Any]]:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError as exc:
            raise ValueError(
                f"{self.path}: corrupted ledger ({exc}); move it away to start this evaluation afresh"
            ) from None
        if not isinstance(raw, dict):
            raise ValueError(
                f"{self.path}: corrupted ledger (not a mapping); move it away to start this evaluation afresh"
            )
        entries = {}
        for key, entry in raw.items():
            if not key.isdigit() or not isinstance(entry, dict) or "status" not in entry:
                raise ValueError(
                    f"{self.path}: corrupted ledger (entry {key!r} is not a step with a status); "
                    "move it away to start this evaluation afresh"
                )
            entries[int(key)] = entry
        return entries

    def update(self, fn: Callable[[dict[int, dict[str, Any]]], Any]) -> Any:
        """Run `fn(entries)` under the lock; it may modify entries in place. Returns fn's result."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.lock:
            return self.update_locked(fn)

    def update_locked(self, fn: Callable[[dict[int, dict[str, Any]]], Any]) -> Any:
        """`update` for a caller that already holds `self.lock`."""
        entries = self.read()
        before = json.dumps(entries, sort_keys=True)
        hold_s = float(os.environ.get(_FAULT_LEDGER_HOLD_ENV, "0") or 0)
        if hold_s:
            time.sleep(hold_s)
        result = fn(entries)
        if json.dumps(entries, sort_keys=True) != before:
            atomic_write_json(self.path, {step_dirname(k)[5:]: v for k, v in sorted(entries.items())})
        return result

    def set(self, step: int, status: str, **info: Any) -> None:
        def apply(entries: dict[int, dict[str, Any]]) -> None:
            kept = {k: v for k, v in entries.get(step, {}).items() if k == "attempts"}
            entries[step] = {**kept, "status": status, "time": time.time(), **info}

        self.update(apply)


def entry_for(entries: dict[int, dict[str, Any]], step: int, weights: str | None) -> dict[str, Any] | None:
    """The ledger entry of `step` if it is about these weights; None when the step is unseen, or its entry
    speaks of other weights (the step folder was replaced, e.g. after a corrupt one was moved aside)."""
    entry = entries.get(step)
    if entry is not None and weights is not None and entry.get("weights_id") not in (None, weights):
        return None
    return entry


def iter_ledgers(layout: RunLayout) -> Iterator[Ledger]:
    root = layout.run_dir / "eval"
    if root.is_dir():
        for eval_dir in sorted(root.iterdir()):
            if (eval_dir / "ledger.json").is_file():
                yield Ledger(eval_dir)


# --------------------------------------------------------------------------------------
# Retention (the trainer's): which published steps may go, decided under every lock that matters


RETENTION_LOCK_TIMEOUT_S = 5.0
"""How long retention (and pointing `best`) waits for the leases and ledger locks. A live process holds them for
milliseconds; one frozen inside them (SIGSTOP, a stalled disk) costs the trainer's writer at most this per save,
and retention is tried again at the next save."""


@dataclass(frozen=True)
class RetentionResult:
    deleted: list[int]
    kept_for: dict[int, str]
    """Steps past keep_last that were kept, with why."""
    unseen_by: dict[int, list[str]]
    """Deleted steps that an evaluation never evaluated (recorded `deleted` in its ledger)."""


@dataclass(frozen=True)
class BestRule:
    """training.keep_best: keep the k published steps with the highest `metric` of `set_name` in the
    results of evaluation `eval_name`."""

    eval_name: str
    set_name: str
    metric: str
    k: int

    @classmethod
    def of(cls, cfg: Config) -> BestRule | None:
        """The config's training.keep_best, resolved (its evaluation, its set); None when off."""
        best = cfg.training.keep_best
        return cls(cfg.evaluation.name, cfg.best_set(), best.metric, best.k) if best else None


def unpublish_old_checkpoints(
    layout: RunLayout, keep_last: int, eval_backfill: dict[str, bool], best: BestRule | None = None
) -> RetentionResult:
    """Unpublish (remove READY of) every step but the newest `keep_last`, except steps that an evaluator
    holds (a lease, or a running claim), means to evaluate (pending, or a dead evaluator's claim to retry),
    or has not seen yet while its evaluation is attached (a live watcher) or back-fills (`eval_backfill`:
    {eval name: backfill} from the trainer's config; a live watcher's own setting counts too), and the
    `best` rule's k best steps of each group of comparable results (the `best` link is pointed anew, see
    rank_and_point). Deleted steps an evaluation never saw are recorded `deleted` in its ledger. The caller
    removes the folders.

    All of it happens under the leases lock and every ledger's lock (taken in name order, the only
    place that holds more than one), so nothing is claimed or leased between deciding and unpublishing."""
    layout.leases_dir.mkdir(parents=True, exist_ok=True)
    ready = ready_weights_ids(layout.checkpoints_dir)
    candidates = sorted(ready)[:-keep_last] if keep_last else sorted(ready)
    if not candidates:  # nothing to delete: only the link to point
        update_best(layout, best)
        return RetentionResult([], {}, {})
    # Bounded waits: an evaluator frozen while holding a lock must not stop training (retention is retried later).
    with FileLock(str(layout.leases_dir / ".lock"), timeout=RETENTION_LOCK_TIMEOUT_S):
        presences = live_presences(layout)
        backfill = dict(eval_backfill)
        attached = set()
        for record in presences.values():
            if record.get("watching") and record.get("eval_name"):
                attached.add(record["eval_name"])
                backfill[record["eval_name"]] = backfill.get(record["eval_name"], False) or bool(record.get("backfill"))
        leased = {s for record in presences.values() for s in record.get("steps", [])}
        names = sorted(set(backfill) | attached | {ledger.path.parent.name for ledger in iter_ledgers(layout)})
        if best is not None:
            names = sorted(set(names) | {best.eval_name})
        ledgers = [Ledger(layout.eval_dir(name)) for name in names]
        for ledger in ledgers:
            ledger.path.parent.mkdir(parents=True, exist_ok=True)
        with _all_locked([ledger.lock for ledger in ledgers]):
            entries_by_name = {name: ledger.read() for name, ledger in zip(names, ledgers)}
            kept_for: dict[int, str] = {}
            # Ranked under the ledger locks: a result being recorded is either complete (ranked) or its step is
            # still a live claim (kept below), never half-seen.
            # The k best of every group of comparable results: a result under a newer evaluation config does not
            # unprotect the best steps measured under an older one (only re-evaluating them would compare them).
            for i, group in enumerate(rank_and_point(layout, best)):
                earlier = " under an earlier evaluation config" if i else ""
                for value, step in group[: best.k]:
                    if step in candidates:
                        kept_for[step] = (
                            f"one of the {best.k} best by {best.set_name} {best.metric} ({value:.4g}){earlier}"
                        )
            for step in candidates:
                if step in kept_for:
                    continue
                if step in leased:
                    kept_for[step] = "leased by an evaluator"
                    continue
                for name, entries in entries_by_name.items():
                    entry = entry_for(entries, step, ready[step])
                    status = entry["status"] if entry else None
                    if status == Status.RUNNING and entry.get("owner", {}).get("id") in presences:
                        kept_for[step] = f"being evaluated by evaluation '{name}'"
                    elif status in (Status.PENDING, Status.RUNNING):  # to back-fill, given back, or to retry
                        kept_for[step] = f"evaluation '{name}' means to evaluate it ({status})"
                    elif status is None and (name in attached or backfill.get(name)):
                        why = "attached" if name in attached else "backfill on"
                        kept_for[step] = f"not yet evaluated by evaluation '{name}' ({why})"
                    if step in kept_for:
                        break
            deleted = [s for s in candidates if s not in kept_for]
            unseen_by: dict[int, list[str]] = {}
            for step in deleted:
                # READY goes first: a half-deleted directory must never look valid.
                (layout.checkpoint_dir(step) / READY).unlink(missing_ok=True)
                for name, entries in entries_by_name.items():
                    entry = entry_for(entries, step, ready[step])
                    if entry is None or entry["status"] in (Status.PENDING, Status.RUNNING):
                        unseen_by.setdefault(step, []).append(name)
            for name, ledger in zip(names, ledgers):

                def mark(entries: dict[int, dict[str, Any]], name: str = name) -> None:
                    for step, evals in unseen_by.items():
                        if name in evals:
                            entries[step] = {
                                "status": Status.DELETED,
                                "time": time.time(),
                                "weights_id": ready[step],
                                "reason": f"deleted by the trainer's retention (keep_last={keep_last}) "
                                "before evaluation",
                            }

                ledger.update_locked(mark)
    return RetentionResult(deleted, kept_for, unseen_by)


COMPARED_SAMPLING = ("n", "temperature", "top_p", "max_tokens", "stop")
"""Sampling settings two results of a set must share to be compared (the seed aside: it only draws anew)."""


def comparable_as(set_result: dict[str, Any]) -> tuple:
    """What a set's result at one step must share with another step's for the two to be compared (ranked, or
    counted as learned/forgotten): the same problems (`problems_id`) and the same COMPARED_SAMPLING. After the
    evaluation config changes (more problems, longer max_tokens), old results measure another test."""
    sampling = set_result.get("sampling", {})
    return (set_result.get("problems_id"), *(json.dumps(sampling.get(key)) for key in COMPARED_SAMPLING))


def ranked_results(layout: RunLayout, eval_name: str, set_name: str, metric: str) -> list[list[tuple[float, int]]]:
    """The published steps whose result (for the weights now in their folder) has the metric, in groups of
    comparable results (`comparable_as`: the same problems and sampling), the group evaluated most recently
    first; in each group (metric value, step), best first, a later step first among equals. Results under
    different evaluation configs measure different tests: they are never ranked against each other."""
    groups: dict[tuple, list[tuple[float, int]]] = {}
    newest: dict[tuple, tuple[float, int]] = {}
    for step, weights in ready_weights_ids(layout.checkpoints_dir).items():
        try:
            result = json.loads(layout.result_path(eval_name, step).read_text())
            set_result = result["sets"][set_name]
            value = set_result["metrics"][metric]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not evaluated (yet), or another evaluation's layout
        if result.get("weights_id") == weights and isinstance(value, (int, float)):
            key = comparable_as(set_result)
            groups.setdefault(key, []).append((float(value), step))
            newest[key] = max(newest.get(key, (0.0, -1)), (float(result.get("time") or 0.0), step))
    return [sorted(groups[key], reverse=True) for key in sorted(groups, key=newest.__getitem__, reverse=True)]


def rank_and_point(layout: RunLayout, best: BestRule | None) -> list[list[tuple[float, int]]]:
    """Rank the published steps by `best` (ranked_results) and make runs/<run>/best link to the best of the
    most recently evaluated group (a symlink replaced by rename: readers see old or new); no link when nothing
    ranks or keep_best is off. The caller holds the leases lock (retention also every ledger's), so two callers
    never interleave. Returns the groups."""
    groups = ranked_results(layout, best.eval_name, best.set_name, best.metric) if best else []
    link = layout.best_path
    if not groups:  # nothing evaluated holds the weights it names (or keep_best is off): no stale link
        if link.is_symlink():
            link.unlink()
        return groups
    target = Path("checkpoints") / step_dirname(groups[0][0][1])
    if not (link.is_symlink() and Path(os.readlink(link)) == target):
        tmp = link.with_name(f"{TMP_PREFIX}best-{uuid.uuid4().hex[:8]}")
        os.symlink(target, tmp)
        os.replace(tmp, link)
    return groups


def update_best(layout: RunLayout, best: BestRule | None) -> int | None:
    """Point `best` anew (removed when `best` is None), under the leases lock: the evaluator's call after
    recording a result, and retention's when it has nothing to delete. Returns the best step, if any."""
    layout.leases_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(layout.leases_dir / ".lock"), timeout=RETENTION_LOCK_TIMEOUT_S):
        groups = rank_and_point(layout, best)
    return groups[0][0][1] if groups else None


class _all_locked:
    def __init__(self, locks: list[FileLock]):
        self.locks = locks

    def __enter__(self) -> None:
        for i, lock in enumerate(self.locks):
            try:
                lock.acquire(timeout=RETENTION_LOCK_TIMEOUT_S)
            except BaseException:
                for held in self.locks[:i]:
                    held.release()
                raise

    def __exit__(self, *exc: Any) -> None:
        for lock in reversed(self.locks):
            lock.release()


# --------------------------------------------------------------------------------------
# The one trainer of a run


class TrainerLock:
    """`with TrainerLock(layout): ...` or RunInUse naming the holder. An OS file lock: released by the
    kernel when the holder dies, so a crash never leaves the run locked."""

    def __init__(self, layout: RunLayout):
        self.layout = layout
        self.info_path = layout.run_dir / ".trainer.json"
        self._lock = FileLock(str(layout.trainer_lock_path))

    def __enter__(self) -> "TrainerLock":
        from filelock import Timeout

        self.layout.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            try:
                holder = json.loads(self.info_path.read_text())
                started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["time"]))
                who = f"{describe_owner(holder)}, started {started}"
            except (OSError, ValueError, KeyError):
                who = "another process"
            raise RunInUse(
                f"{self.layout.run_dir}: another trainer is training this run ({who}); "
                "stop it first, or choose another run_name"
            ) from None
        atomic_write_json(self.info_path, {**current_owner(), "time": time.time()})
        return self

    def __exit__(self, *exc: Any) -> None:
        self.info_path.unlink(missing_ok=True)
        self._lock.release()
