"""The on-disk protocol between the trainer and the evaluator: both import this package, and nothing else
decides a path, a marker or a file format. One module a concern, each opening with its invariants:

- `layout`: every path of a run directory.
- `durable`: writes that reach the disk whole (temporary file, fsync, rename, fsync of the folder) and hashing.
- `manifest`: the READY manifest of a published checkpoint, its verification and the weights id.
- `presence`: evaluator processes' presence records, advanced by their progress, and who judges them stale.
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
    fsync_tree,
    write_hashed,
)
from shared.protocol.layout import (
    AVERAGE_DIRNAME,
    AVERAGE_RESULTS_PREFIX,
    CHECKPOINTS_DIRNAME,
    CORRUPT_PREFIX,
    READY,
    REPORT_NAME,
    SNAPSHOTS_DIRNAME,
    SUPERSEDED_DIRNAME,
    TMP_PREFIX,
    TRAINER_STATE_DIR,
    WANDB_DIRNAME,
    RunLayout,
    parse_step,
    result_file,
    result_steps,
    rows_log_file,
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
    MIN_WRITE_INTERVAL_S,
    Liveness,
    Presence,
    current_owner,
    describe_owner,
    presence_path,
    proc_stat,
    read_presence,
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
    "AVERAGE_DIRNAME",
    "AVERAGE_RESULTS_PREFIX",
    "CHECKPOINTS_DIRNAME",
    "CHUNK_BYTES",
    "COMPARED_SAMPLING",
    "CORRUPT_PREFIX",
    "HASH_THREADS",
    "MANIFEST_VERSION",
    "MIN_WRITE_INTERVAL_S",
    "READY",
    "REPORT_NAME",
    "RETENTION_LOCK_TIMEOUT_S",
    "SNAPSHOTS_DIRNAME",
    "SUPERSEDED_DIRNAME",
    "TMP_PREFIX",
    "TRAINER_STATE_DIR",
    "WANDB_DIRNAME",
    "BestRule",
    "CheckpointInvalid",
    "CheckpointWriteError",
    "ChunkHasher",
    "ClaimLost",
    "Ledger",
    "Liveness",
    "Presence",
    "ResumeError",
    "RetentionResult",
    "RunInUse",
    "RunLayout",
    "Status",
    "TrainerLock",
    "atomic_write_bytes",
    "atomic_write_json",
    "build_manifest",
    "chunk_digests",
    "comparable_as",
    "current_owner",
    "describe_owner",
    "entry_for",
    "file_sha256",
    "folder_weights_id",
    "fsync_dir",
    "fsync_tree",
    "iter_ledgers",
    "list_ready_checkpoints",
    "move_aside_corrupt",
    "parse_step",
    "presence_path",
    "proc_stat",
    "publish_checkpoint",
    "rank_and_point",
    "ranked_results",
    "read_manifest",
    "read_presence",
    "ready_weights_ids",
    "remove_incomplete_checkpoints",
    "result_file",
    "result_steps",
    "rows_log_file",
    "samples_file",
    "step_dirname",
    "unpublish_old_checkpoints",
    "update_best",
    "verify_checkpoint",
    "weights_id",
    "write_hashed",
]
