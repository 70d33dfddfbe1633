"""Non-blocking checkpoints: snapshot tensors off the accelerator, write and publish in a background thread.

The training loop pays only for the snapshot. On GPU the copies run on a side CUDA stream into pinned
buffers that are reused from save to save, so even that overlaps with the next forward/backward; the
loop waits for the copy (on the device, not the host) just before the next optimizer step changes
the weights. At most one save is in flight. A save due while the previous one is still at work (writing, then
retention) either is skipped (when_busy="skip": the loop is not held for the disk) or waits for it ("wait"); a
final save always waits. A save that does not fit on the disk (free space against the checkpoint's size, after
retention) is skipped too, whatever when_busy; a final one that does not fit fails with the free and needed bytes.
Every skip is returned to the loop, which says so: a skipped step is never silent.

Everything on disk goes through shared.protocol: write into .tmp_step_N, publish (fsync, rename,
fsync, READY). A failed write removes the temporary directory and is re-raised in the training loop.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from filelock import Timeout

from shared.config import TrainingConfig
from shared.hf_models import tied_weight_names
from shared.protocol import (
    READY,
    RETENTION_LOCK_TIMEOUT_S,
    TRAINER_STATE_DIR,
    BestRule,
    CheckpointInvalid,
    CheckpointWriteError,
    ChunkHasher,
    ResumeError,
    RunLayout,
    publish_checkpoint,
    unpublish_old_checkpoints,
    write_hashed,
)
from trainer.distributed import Dist, all_reduce, barrier, full_model_state_on_rank0, local_optimizer_state

logger = logging.getLogger(__name__)

MAX_SHARD_BYTES = 5 << 30
FREE_SPACE_MARGIN_BYTES = 8 << 20
"""Free space a save leaves beyond the checkpoint's estimated size (READY, ledgers, logs, results written meanwhile);
2 % of the size is added on top."""
# Fault injection for tests of a crash mid-save: seconds to sleep after each file written.
_SLOW_SAVE_ENV = "MATH_SFT_FAULT_SLOW_SAVE_S"


def untied_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors with tied copies dropped (safetensors refuses shared storage);
    loaders re-tie them from the config, as with save_pretrained."""
    tied = tied_weight_names(model)
    state, seen = {}, {}
    for name, tensor in model.state_dict().items():
        ptr = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if ptr in seen and name in tied:
            continue
        if ptr in seen and seen[ptr] in tied:
            del state[seen[ptr]]
        seen[ptr] = name
        state[name] = tensor
    return state


def _tensors_of(obj: Any, out: list[torch.Tensor]) -> None:
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _tensors_of(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _tensors_of(v, out)


def _replace_tensors(obj: Any, it) -> Any:
    if isinstance(obj, torch.Tensor):
        return next(it)
    if isinstance(obj, dict):
        return {k: _replace_tensors(v, it) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_replace_tensors(v, it) for v in obj)
    return obj


class _Snapshot:
    """Host copies of a tree of tensors (model weights, optimizer state), into reusable buffers."""

    def __init__(self) -> None:
        self.buffers: list[torch.Tensor] = []
        self.stream = torch.cuda.Stream() if torch.cuda.is_available() else None
        self.done: torch.cuda.Event | None = None

    def allocate(self, tree: Any) -> None:
        """Host buffers shaped like `tree`'s tensors (pinned on GPU machines: pinning 10 GB takes seconds)."""
        sources: list[torch.Tensor] = []
        _tensors_of(tree, sources)
        shapes = [(t.shape, t.dtype) for t in sources]
        if [(b.shape, b.dtype) for b in self.buffers] != shapes:
            pin = self.stream is not None
            self.buffers = [torch.empty(s, dtype=d, device="cpu", pin_memory=pin) for s, d in shapes]

    def take(self, tree: Any) -> Any:
        sources: list[torch.Tensor] = []
        _tensors_of(tree, sources)
        self.allocate(tree)
        if self.stream is None:
            for buf, src in zip(self.buffers, sources, strict=True):
                buf.copy_(src.detach())
        else:
            # Copies must see the finished optimizer step, and must end before the next one starts.
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                for buf, src in zip(self.buffers, sources, strict=True):
                    buf.copy_(src.detach(), non_blocking=True)
            self.done = torch.cuda.Event()
            self.done.record(self.stream)
        return _replace_tensors(tree, iter(self.buffers))

    def before_update(self) -> None:
        """Make the next kernels on the compute stream wait for the copy (no host wait)."""
        if self.done is not None:
            torch.cuda.current_stream().wait_event(self.done)

    def wait_host(self) -> None:
        if self.done is not None:
            self.done.synchronize()


class AsyncCheckpointer:
    def __init__(
        self,
        layout: RunLayout,
        config_hash: str,
        model_files_dir: Path | None,
        keep_last: int | None,
        d: Dist | None = None,
        eval_backfill: dict[str, bool] | None = None,
        master_weights: list[torch.Tensor] | None = None,
        keep_best: BestRule | None = None,
        when_busy: str = "skip",
        max_unevaluated: int = TrainingConfig.max_unevaluated,
    ):
        """`model_files_dir`: a folder holding config.json, generation_config.json and the tokenizer
        files; they are copied into every checkpoint (weights come from the snapshot). With several
        processes (`d`), rank 0 writes the model and publishes; every rank writes its optimizer shard.
        Retention (keep_last, `keep_best`, `max_unevaluated`) answers to the evaluations named by `eval_backfill`'s
        keys ({evaluation name: backfill} of the run's config; backfill no longer changes what is kept) and to every
        evaluation with a ledger in the run.
        `master_weights`: the fp32 masters of a bf16 model (trainer/master.py), saved with the optimizer state
        for an exact resume. `when_busy`: "skip" or "wait", what a save due during the previous one's write does."""
        self.d = d if d is not None else Dist()
        self.when_busy = when_busy
        self.layout = layout
        self.config_hash = config_hash
        self.keep_last = keep_last
        self.eval_backfill = eval_backfill or {}
        self.keep_best = keep_best
        self.max_unevaluated = max_unevaluated
        self.master_weights = master_weights
        self._last_bytes = 0
        """Bytes of the last checkpoint published (its manifest's sizes): the next one's size, at least."""
        self._announced_kept: set[int] = set()
        self.static_files = {
            p.name: p.read_bytes()
            for p in (sorted(model_files_dir.iterdir()) if model_files_dir else [])
            if p.is_file()
            and not p.name.endswith((".safetensors", ".safetensors.index.json", ".bin", ".pt"))
            and p.name != READY
        }
        self._model_snapshot = _Snapshot()
        self._state_snapshot = _Snapshot()
        self._thread: threading.Thread | None = None
        self._busy_with: str | None = None
        """What the thread in flight does, for a skipped save's warning: "writing step N", "deleting old checkpoints
        after step N"; None while only the buffer allocation runs (a save then waits for it)."""
        self._error: BaseException | None = None
        self.last_published: int | None = None

    # -- called from the training loop ------------------------------------------------------

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Allocate the snapshot buffers in the background (once the optimizer has its state), so the
        first save does not stall on pinning memory. `save` waits for it if it is still running."""
        if self._model_snapshot.stream is None:
            return  # CPU: plain buffers, allocated on first use in no time
        # Sharded: weights are gathered to rank 0 at save time, only this rank's state is snapshotted.
        weights = {} if self.d.enabled else untied_state_dict(model)
        self._thread = threading.Thread(
            target=self._allocate,
            args=(self._thread, weights, self._state_tree(optimizer)),
            name="ckpt-alloc",
            daemon=True,
        )
        self._thread.start()

    def _allocate(
        self, in_flight: threading.Thread | None, weights: dict[str, torch.Tensor], state: dict[str, Any]
    ) -> None:
        """After the save in flight (step 0's: it still reads the buffers), buffers for the full state."""
        if in_flight is not None:
            in_flight.join()
        self._busy_with = None  # a save due from now on waits for the allocation; it is not skipped
        try:
            self._model_snapshot.allocate(weights)
            self._state_snapshot.allocate(state)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the training loop
            self._error = CheckpointWriteError(f"allocating checkpoint buffers failed: {exc}")

    def save(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        trainer_state: dict[str, Any],
        final: bool = False,
    ) -> dict[str, Any]:
        """Start saving `step`. Returns {blocked_s, waited_for_previous_s}: how long the loop was held; or, when
        the previous save is still at work (writing, or retention after it), when_busy is "skip" and this save is
        not `final`: {skipped: what the checkpointer is still doing, cause: "busy"}; or, when the checkpoint does
        not fit on the disk after retention and this save is not `final`: {skipped: why, with the free and needed
        bytes, cause: "no_space"} (logged as a WARNING); nothing is saved then. A `final` save that does not fit
        raises CheckpointWriteError naming the free and needed bytes. Collective with several ranks."""
        t0 = time.perf_counter()
        busy = self._busy_with  # read before is_alive: a thread ending in between is then idle, never "busy"
        if self._thread is None or not self._thread.is_alive():
            busy = None
        # Ranks decide together: one rank skipping while another saves would leave a torn checkpoint.
        if self.when_busy == "skip" and not final and all_reduce(busy is not None, self.d, op="max"):
            return {"skipped": busy or "another rank is still writing its optimizer shard", "cause": "busy"}
        waited = self.wait()
        no_room = self._no_room(step, model, optimizer, final)
        if no_room and final:
            raise CheckpointWriteError(f"cannot write the final checkpoint of step {step}: {no_room}")
        if no_room:
            logger.warning("step %d not saved: %s", step, no_room)
            return {"skipped": no_room, "cause": "no_space"}
        if self.d.enabled:
            if self.d.is_main:  # the one creator of the temporary directory, before any rank writes into it
                tmp = self.layout.tmp_checkpoint_dir(step)
                shutil.rmtree(tmp, ignore_errors=True)
                (tmp / TRAINER_STATE_DIR).mkdir(parents=True)
            barrier(self.d)
            weights = full_model_state_on_rank0(model)  # collective; already host copies
            trainer_state = {**trainer_state, "world_size": self.d.world}
        else:
            weights = self._model_snapshot.take(untied_state_dict(model))
        state = self._state_snapshot.take(self._state_tree(optimizer))
        self._thread = threading.Thread(
            target=self._write, args=(step, weights, state, trainer_state), name=f"ckpt-{step}", daemon=True
        )
        self._busy_with = f"writing step {step}"
        self._thread.start()
        return {"blocked_s": time.perf_counter() - t0, "waited_for_previous_s": waited}

    def _no_room(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, final: bool) -> str | None:
        """Why the checkpoint of `step` does not fit on the checkpoints' disk (free and needed bytes), retention
        having run first; None when it fits. Retention runs here only when the space is short: it already ran
        after the previous publish, and its lock waits would hold the loop. For the `final` save it keeps no
        unevaluated checkpoints beyond keep_last (and keep_best's): the run's last checkpoint matters more than an
        evaluator's backlog. Rank 0 decides for every rank."""
        why = None
        if self.d.is_main:
            needed = self._estimated_bytes(model, optimizer)
            needed += needed // 50 + FREE_SPACE_MARGIN_BYTES
            free = shutil.disk_usage(self.layout.checkpoints_dir).free
            if free < needed and self.keep_last is not None:
                if final and self.max_unevaluated:
                    logger.warning(
                        "the final checkpoint of step %d needs %d bytes and %d are free: retention keeps no "
                        "unevaluated checkpoint beyond keep_last=%d to make room",
                        step,
                        needed,
                        free,
                        self.keep_last,
                    )
                self._retention_pass(f"before saving step {step}", max_unevaluated=0 if final else None)
                free = shutil.disk_usage(self.layout.checkpoints_dir).free
            if free < needed:
                why = (
                    f"not enough free space in {self.layout.checkpoints_dir}: {free} bytes free, {needed} needed "
                    f"(the checkpoint's estimated size + a margin), after retention (keep_last={self.keep_last}, "
                    f"max_unevaluated={self.max_unevaluated}); free space on that disk or lower those"
                )
        if all_reduce(why is not None, self.d, op="max"):
            return why or "rank 0 found too little free space for it"
        return None

    def _estimated_bytes(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
        """The next checkpoint's size: the last one's, or (the first save, or more state since: step 0 has no
        optimizer state) the bytes of the weights, the optimizer state of every rank and the model files."""
        weights = model.state_dict() if self.d.enabled else untied_state_dict(model)
        tensors: list[torch.Tensor] = []
        _tensors_of(self._state_tree(optimizer), tensors)
        state_bytes = sum(t.numel() * t.element_size() for t in tensors) * self.d.world
        weight_bytes = sum(t.numel() * t.element_size() for t in weights.values())
        files_bytes = sum(len(data) for data in self.static_files.values())
        return max(self._last_bytes, weight_bytes + state_bytes + files_bytes)

    def _state_tree(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """What this rank saves for resume: its optimizer state (its shard, when sharded) and RNG."""
        optimizer_state = local_optimizer_state(optimizer) if self.d.enabled else optimizer.state_dict()
        tree = {"optimizer": optimizer_state, "rng": _rng_state()}
        if self.master_weights is not None:
            tree["master_weights"] = [t.detach() for t in self.master_weights]
        return tree

    def before_optimizer_step(self) -> None:
        self._model_snapshot.before_update()
        self._state_snapshot.before_update()

    def wait(self) -> float:
        """Block until the save in flight (if any) is published; re-raise its error. Returns seconds waited."""
        t0 = time.perf_counter()
        if self._thread is not None:
            self._thread.join()
            self._thread, self._busy_with = None, None
        self.raise_if_failed()
        return time.perf_counter() - t0

    def raise_if_failed(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    # -- background thread -------------------------------------------------------------------

    def _write(
        self, step: int, weights: dict[str, torch.Tensor], state: dict[str, Any], trainer_state: dict[str, Any]
    ) -> None:
        tmp = self.layout.tmp_checkpoint_dir(step)
        try:
            self._model_snapshot.wait_host()
            self._state_snapshot.wait_host()
            if not self.d.enabled:
                shutil.rmtree(tmp, ignore_errors=True)
                (tmp / TRAINER_STATE_DIR).mkdir(parents=True)
            # One pass over the bytes: every file is hashed as it is written (never read back), and the weights
            # and this rank's optimizer state are written at the same time, by two threads.
            hashed: dict[str, list[str]] = {}
            with ThreadPoolExecutor(max_workers=2) as pool:
                state_done = pool.submit(self._write_state, tmp, state)
                if self.d.is_main:
                    hashed.update(_write_safetensors(weights, tmp))
                    for name, data in self.static_files.items():
                        hashed[name] = write_hashed(tmp / name, data)
                        _fault_pause()
                    meta = json.dumps(trainer_state, indent=2, sort_keys=True).encode()
                    hashed[f"{TRAINER_STATE_DIR}/trainer_state.json"] = write_hashed(
                        tmp / TRAINER_STATE_DIR / "trainer_state.json", meta
                    )
                hashed.update(state_done.result())
            if not self.d.is_main:
                self.last_published = step
                return
            self._wait_for_shards(tmp)
            manifest = publish_checkpoint(tmp, self.layout.checkpoint_dir(step), step, self.config_hash, hashed)
            self._last_bytes = sum(meta["size_bytes"] for meta in manifest["files"].values())
            self.last_published = step
            self._busy_with = f"deleting old checkpoints after step {step}"
        except BaseException as exc:  # noqa: BLE001 - re-raised in the training loop
            if self.d.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            self._error = CheckpointWriteError(f"saving checkpoint {step} to {tmp} failed: {exc}{_space_note(tmp)}")
            self._error.__cause__ = exc
            return
        self._retention_pass(f"after step {step}")

    def _write_state(self, tmp: Path, state: dict[str, Any]) -> dict[str, list[str]]:
        """This rank's optimizer state and RNG. It appears under its final name only when complete (rename),
        which is what rank 0 waits for before publishing; rank 0 hashes other ranks' shards from the disk."""
        shard = tmp / TRAINER_STATE_DIR / state_file_name(self.d)
        with open(shard.with_suffix(".partial"), "wb") as f:
            hasher = ChunkHasher(f)
            torch.save(state, hasher)
        shard.with_suffix(".partial").rename(shard)
        _fault_pause()
        return {f"{TRAINER_STATE_DIR}/{shard.name}": hasher.finish()}

    def _wait_for_shards(self, tmp: Path, timeout_s: float = 600.0) -> None:
        deadline = time.monotonic() + timeout_s
        names = [state_file_name(Dist(rank, self.d.world)) for rank in range(self.d.world)]
        while not all((tmp / TRAINER_STATE_DIR / n).exists() for n in names):
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"other ranks did not write their optimizer shards into {tmp} within {timeout_s:.0f}s"
                )
            time.sleep(0.05)

    def _retention_pass(self, when: str, max_unevaluated: int | None = None) -> None:
        """Retention (keep_last, keep_best, max_unevaluated: shared.protocol.retention; `max_unevaluated` instead
        of the configured one), the deleted folders removed; say what is kept beyond keep_last (once per step).
        Never stops or holds training: a lock not got in RETENTION_LOCK_TIMEOUT_S, or any failure, skips this pass
        with a warning (the next save tries again)."""
        if self.keep_last is None:
            return
        bound = self.max_unevaluated if max_unevaluated is None else max_unevaluated
        try:
            outcome = unpublish_old_checkpoints(
                self.layout, self.keep_last, bound, list(self.eval_backfill), self.keep_best
            )
        except Timeout as exc:
            logger.warning(
                "retention %s skipped: %s was not free within %.0fs (a process frozen inside it?); nothing deleted "
                "this time, tried again at the next save",
                when,
                exc.lock_file,
                RETENTION_LOCK_TIMEOUT_S,
            )
            return
        except Exception as exc:  # noqa: BLE001 - retention must not stop training
            logger.warning("retention %s failed, nothing more deleted this time: %s: %s", when, type(exc).__name__, exc)
            return
        for step in outcome.deleted:
            shutil.rmtree(self.layout.checkpoint_dir(step), ignore_errors=True)
        for step, why in sorted(outcome.kept_for.items()):
            if step not in self._announced_kept:
                logger.info("retention: keeping step %d beyond keep_last=%d: %s", step, self.keep_last, why)
                self._announced_kept.add(step)


def _space_note(tmp: Path) -> str:
    """For a write that failed on a full disk: how much is free there now."""
    try:
        return f" ({shutil.disk_usage(tmp.parent).free} bytes free in {tmp.parent} now)"
    except OSError:
        return ""


def _fault_pause() -> None:
    delay = float(os.environ.get(_SLOW_SAVE_ENV, "0") or 0)
    if delay:
        time.sleep(delay)


_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> list[str]:
    """The safetensors format (8-byte header length, JSON header, then the tensors' bytes), written in one pass
    with large writes straight from the host buffers and hashed on the way; returns the chunk digests."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as the format's own writer does
    with open(path, "wb") as f:
        hasher = ChunkHasher(f)
        hasher.write(struct.pack("<Q", len(encoded)) + encoded)
        for tensor in tensors.values():
            flat = tensor.detach().contiguous().view(-1)
            if flat.numel():
                hasher.write(flat.view(torch.uint8).numpy())
        return hasher.finish()


def _write_safetensors(weights: dict[str, torch.Tensor], out: Path) -> dict[str, list[str]]:
    """model.safetensors, or shards + index past MAX_SHARD_BYTES (the Hugging Face layout); {file: chunk digests}."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in weights.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        hashed = {"model.safetensors": _save_safetensors(shards[0], out / "model.safetensors")}
        _fault_pause()
        return hashed
    weight_map, hashed = {}, {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        hashed[fname] = _save_safetensors(shard, out / fname)
        weight_map.update(dict.fromkeys(shard, fname))
        _fault_pause()
    total = sum(t.numel() * t.element_size() for t in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    hashed["model.safetensors.index.json"] = write_hashed(
        out / "model.safetensors.index.json", json.dumps(index, indent=2, sort_keys=True).encode()
    )
    return hashed


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def state_file_name(d: Dist) -> str:
    return f"state_rank{d.rank:05d}.pt" if d.enabled else "state.pt"


def read_trainer_meta(checkpoint_dir: Path) -> dict[str, Any]:
    """trainer_state.json of a verified checkpoint: step, config, world size."""
    return json.loads((checkpoint_dir / TRAINER_STATE_DIR / "trainer_state.json").read_text())


def load_trainer_state(checkpoint_dir: Path, d: Dist | None = None) -> dict[str, Any]:
    """Tensor state {optimizer, rng} of this rank, from a verified checkpoint. Plain tensors only:
    anything else in the file (a pickled object) is refused, never run."""
    d = d if d is not None else Dist()
    saved_world = read_trainer_meta(checkpoint_dir).get("world_size", 1)
    if saved_world != d.world:
        raise ResumeError(
            f"{checkpoint_dir} was written by {saved_world} training process(es) and this run has {d.world}; "
            f"resume with {saved_world} GPU(s) in training.gpus, or start a new run_name"
        )
    path = checkpoint_dir / TRAINER_STATE_DIR / state_file_name(d)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's own text advises weights_only=False; only its line naming the offending object is kept.
        lines = [
            ln.strip()
            for ln in str(exc).splitlines()
            if ln.strip() and "weights_only" not in ln and "documentation" not in ln
        ]
        reason = lines[0].rstrip(".") if lines else "it holds more than tensors"
        raise CheckpointInvalid(
            f"{path}: refused: not a plain tensor file ({reason}); "
            "a file that runs code when loaded is never loaded here"
        ) from None


def restore_rng(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
