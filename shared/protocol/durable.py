"""Durable writes: a file is replaced by rename, never rewritten in place, and reaches the disk before its name.

Invariants:
- `atomic_write_*`: write a temporary file beside the target, fsync it, rename it over the target, fsync the
  folder. A reader sees the old file or the whole new one, never a part; a crash leaves one of the two.
- Hashes are SHA-256 per CHUNK_BYTES chunk, computed while a file is written (ChunkHasher) or read back in
  parallel threads (chunk_digests): both give the same digests for the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from shared.protocol.layout import TMP_PREFIX

CHUNK_BYTES = 64 << 20
_HASH_CHUNK_BYTES = 8 << 20
HASH_THREADS = min(32, os.cpu_count() or 1)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under `root`, then every folder under it (their entries): the tree is on disk before a rename
    makes it visible."""
    for folder, _, names in os.walk(root):
        for name in names:
            with open(Path(folder) / name, "rb") as f:
                os.fsync(f.fileno())
    for folder, _, _ in os.walk(root):
        fsync_dir(Path(folder))


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
    """One SHA-256 of a whole file, read back: no manifest uses it; bench.bench_checkpoint times it as the
    baseline that chunk digests (hashed while written, verified in parallel) replaced."""
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
        self._pool = ThreadPoolExecutor(max_workers=HASH_THREADS)
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
    with ThreadPoolExecutor(max_workers=min(HASH_THREADS, max(1, len(tasks)))) as pool:
        digests = list(pool.map(lambda task: _chunk_digest(task[1], task[2], chunk_bytes), tasks))
    out: list[list[str]] = [[] for _ in paths]
    for (i, _, _), digest in zip(tasks, digests, strict=True):
        out[i].append(digest)
    return out
