"""The on-disk protocol between the trainer and the evaluator: both import this package, and nothing else
decides a path, a marker or a file format. One module a concern, each opening with its invariants:

- `layout`: every path of a run directory.
- `durable`: writes that reach the disk whole (temporary file, fsync, rename, fsync of the folder) and hashing.
- `manifest`: the READY manifest of a published checkpoint, its verification and the weights id.
- `presence`: evaluator processes' heartbeats and the steps they hold.
- `ledger`: what each evaluation did with each step.
- `ranking`: which evaluated steps are best, and the `best` link.
- `retention`: which checkpoints the trainer may delete.
- `runlock`: the one trainer of a run.

Imports neither torch nor vllm (tests check this).
"""

from shared.protocol.durable import (
    CHUNK_BYTES,
    HASH_THREADS,
    ChunkHasher,
    atomic_write_bytes,
    atomic_write_json,
    chunk_digests,
    file_sha256,
    fsync_dir,
    write_hashed,
)
from shared.protocol.layout import (
    CORRUPT_PREFIX,
    READY,
    TMP_PREFIX,
    TRAINER_STATE_DIR,
    RunLayout,
    parse_step,
    result_file,
    result_steps,
    samples_file,
    step_dirname,
)
from shared.protocol.ledger import (
    ClaimLost,
    Ledger,
    Status,
    entry_for,
    iter_ledgers,
)
from shared.protocol.manifest import (
    MANIFEST_VERSION,
    CheckpointInvalid,
    CheckpointWriteError,
    build_manifest,
    folder_weights_id,
    list_ready_checkpoints,
    move_aside_corrupt,
    publish_checkpoint,
    read_manifest,
    ready_weights_ids,
    remove_incomplete_checkpoints,
    verify_checkpoint,
    weights_id,
)
from shared.protocol.presence import (
    DEFAULT_HEARTBEAT_TIMEOUT_S,
    Presence,
    current_owner,
    describe_owner,
    live_presences,
    owner_alive,
    proc_stat,
)
from shared.protocol.ranking import (
    COMPARED_SAMPLING,
    RETENTION_LOCK_TIMEOUT_S,
    BestRule,
    comparable_as,
    rank_and_point,
    ranked_results,
    update_best,
)
from shared.protocol.retention import RetentionResult, unpublish_old_checkpoints
from shared.protocol.runlock import (
    ResumeError,
    RunInUse,
    TrainerLock,
)

__all__ = [
    "READY",
    "TMP_PREFIX",
    "CORRUPT_PREFIX",
    "TRAINER_STATE_DIR",
    "step_dirname",
    "parse_step",
    "RunLayout",
    "result_file",
    "samples_file",
    "result_steps",
    "CHUNK_BYTES",
    "HASH_THREADS",
    "fsync_dir",
    "atomic_write_bytes",
    "atomic_write_json",
    "file_sha256",
    "ChunkHasher",
    "write_hashed",
    "chunk_digests",
    "MANIFEST_VERSION",
    "CheckpointInvalid",
    "CheckpointWriteError",
    "build_manifest",
    "publish_checkpoint",
    "read_manifest",
    "verify_checkpoint",
    "weights_id",
    "folder_weights_id",
    "ready_weights_ids",
    "list_ready_checkpoints",
    "move_aside_corrupt",
    "remove_incomplete_checkpoints",
    "proc_stat",
    "current_owner",
    "describe_owner",
    "DEFAULT_HEARTBEAT_TIMEOUT_S",
    "live_presences",
    "owner_alive",
    "Presence",
    "ClaimLost",
    "Status",
    "Ledger",
    "entry_for",
    "iter_ledgers",
    "RETENTION_LOCK_TIMEOUT_S",
    "RetentionResult",
    "BestRule",
    "unpublish_old_checkpoints",
    "COMPARED_SAMPLING",
    "comparable_as",
    "ranked_results",
    "rank_and_point",
    "update_best",
    "ResumeError",
    "RunInUse",
    "TrainerLock",
]
