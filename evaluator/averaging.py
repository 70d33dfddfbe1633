"""Averaged checkpoints (`evaluation.average: {last: k}`): the element-wise mean of the weights of the last k
evaluated checkpoints, evaluated as a checkpoint of its own, entirely on the evaluator's side.

    eval/<name>/average/
      .lock                               serialises the window, the build and the averaged evaluation
      window/step_00000500/               hard links (copies where links fail) of that checkpoint's model files
        .weights_id                       the weights id of the checkpoint they are
      model/                              the newest averaged model (replaced by the next; its config and
                                          tokenizer files are the newest checkpoint's)
    eval/<name>/average_last_<k>/         an evaluation folder like eval/<name>/ (ledger.json, step_N.json,
                                          <set>/step_N.json, <set>/step_N.samples.jsonl); step N is the
                                          newest checkpoint of the average, and step_N.json carries
                                          "average": {"last": k, "steps": [...], "weights_ids": [...]}

Invariants:
- The window holds the k highest steps added, whatever the order they were evaluated in (newest first,
  back-fill): a step older than a full window's oldest is not added. A checkpoint that the trainer deletes
  after `add` does not matter: published files never change in place, so the links keep the verified bytes.
- The averaged model.safetensors is the mean in float32 (float64 for float64 tensors) cast back to each
  tensor's dtype; tensors that are not floating point must be equal across the window. Its header names the
  steps averaged, so its weights id (`folder_weights_id`) is its own, never one of the checkpoints'.
- Nothing here runs on the trainer's side or waits on it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from filelock import FileLock

from evaluator.recording import write_result
from evaluator.snapshot import link_or_copy
from shared.protocol import (
    AVERAGE_DIRNAME,
    AVERAGE_RESULTS_PREFIX,
    READY,
    TMP_PREFIX,
    Ledger,
    Status,
    current_owner,
    folder_weights_id,
    fsync_dir,
    fsync_tree,
    parse_step,
    step_dirname,
)

logger = logging.getLogger(__name__)

WEIGHTS_ID_FILE = ".weights_id"
METADATA_KEY = "math_sft_average"
"""Key of the averaged model.safetensors header's metadata naming what was averaged."""


class AverageError(ValueError):
    """The checkpoints of a window cannot be averaged; the message names the tensor and the steps."""


def average_eval_dir(eval_dir: Path, k: int) -> Path:
    """Where the results of averages of the last k checkpoints of evaluation folder `eval_dir` go."""
    return Path(eval_dir) / f"{AVERAGE_RESULTS_PREFIX}{k}"


def _model_files(model_dir: Path) -> list[Path]:
    """What a model loader reads: the folder's files but READY and hidden ones (trainer_state/ is a folder)."""
    return sorted(p for p in model_dir.iterdir() if p.is_file() and not p.name.startswith(".") and p.name != READY)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Put the complete, fsynced folder `tmp` at `final` (an old `final` is moved aside, then removed)."""
    old = final.with_name(f"{TMP_PREFIX}old_{final.name}.{os.getpid()}")
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


class AverageWindow:
    """The model files of the last k evaluated checkpoints, kept by the evaluator (see the module's layout)."""

    def __init__(self, eval_dir: Path, k: int):
        if k < 2:
            raise ValueError(f"an average needs at least 2 checkpoints, got k={k}")
        self.k = k
        self.root = Path(eval_dir) / AVERAGE_DIRNAME
        self.window_dir = self.root / "window"
        self.window_dir.mkdir(parents=True, exist_ok=True)
        self.lock = FileLock(str(self.root / ".lock"))

    def members(self) -> dict[int, str]:
        """{step: weights_id} of the window, in step order (complete entries only: each was renamed in whole)."""
        found = {}
        for path in self.window_dir.iterdir():
            step = parse_step(path.name)
            if step is not None and (path / WEIGHTS_ID_FILE).is_file():
                found[step] = (path / WEIGHTS_ID_FILE).read_text().strip()
        return dict(sorted(found.items()))

    @property
    def steps(self) -> list[int]:
        return list(self.members())

    def add(self, step: int, weights_id: str, model_dir: Path) -> bool:
        """Link `model_dir`'s model files into the window as `step` and drop the oldest beyond k; True if the
        step is in the window now (False, with a warning, when the files could not be linked or copied). Give it
        verified files: the evaluator's snapshot of the step (evaluator/snapshot.py) before it is removed."""
        with self.lock:
            members = self.members()
            if members.get(step) == weights_id:
                return True
            if len(members) >= self.k and step not in members and step < min(members):
                return False  # older than a full window: an average of the last k never includes it
            tmp = self.window_dir / f"{TMP_PREFIX}{step_dirname(step)}.{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            try:
                for src in _model_files(Path(model_dir)):
                    link_or_copy(src, tmp / src.name)
                (tmp / WEIGHTS_ID_FILE).write_text(weights_id + "\n")
                fsync_tree(tmp)
                _replace_dir(tmp, self.window_dir / step_dirname(step))
            except OSError as exc:  # a source gone, a full disk: no average over this step, the service goes on
                shutil.rmtree(tmp, ignore_errors=True)
                logger.warning("step %d: not added to the window of averaged checkpoints: %s", step, exc)
                return False
            for old in list(self.members())[: -self.k]:
                shutil.rmtree(self.window_dir / step_dirname(old))
            fsync_dir(self.window_dir)
            return step in self.members()

    def build(self, out_dir: Path) -> tuple[str, list[int]]:
        """Write the mean of the window's checkpoints to `out_dir` (replaced whole); (its weights id, the steps)."""
        out_dir = Path(out_dir)
        with self.lock:
            members = self.members()
            if len(members) < self.k:
                raise AverageError(f"{self.window_dir}: {len(members)} checkpoint(s) in the window, {self.k} needed")
            folders = {step: self.window_dir / step_dirname(step) for step in members}
            tmp = out_dir.with_name(f"{TMP_PREFIX}{out_dir.name}.{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            try:
                metadata = {"last": self.k, "steps": list(members), "weights_ids": list(members.values())}
                _write_mean(folders, tmp, {"format": "pt", METADATA_KEY: json.dumps(metadata)})
                newest = folders[max(folders)]
                for src in _model_files(newest):
                    if not src.name.endswith(".safetensors"):
                        shutil.copy2(src, tmp / src.name)
                fsync_tree(tmp)
                weights = folder_weights_id(tmp)
                _replace_dir(tmp, out_dir)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            return weights, list(members)


def average_window(cfg: Any, eval_dir: Path) -> AverageWindow | None:
    """The window of evaluation folder `eval_dir` when `cfg.evaluation.average` asks for averages, else None."""
    average = cfg.evaluation.average
    return AverageWindow(eval_dir, average.last) if average is not None and average.last else None


def _tensor_files(folder: Path) -> dict[str, str]:
    """{tensor name: the .safetensors file of `folder` holding it}."""
    from safetensors import safe_open

    where = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            where.update(dict.fromkeys(f.keys(), path.name))
    if not where:
        raise AverageError(f"{folder}: no .safetensors weights to average")
    return where


def _write_mean(folders: dict[int, Path], out: Path, metadata: dict[str, str]) -> None:
    """The element-wise mean of `folders`' tensors, in the newest folder's files (its shard layout)."""
    from safetensors.torch import save_file

    layouts = {step: _tensor_files(folder) for step, folder in folders.items()}
    newest = max(folders)
    for step, layout in layouts.items():
        if set(layout) != set(layouts[newest]):
            only = sorted(set(layout) ^ set(layouts[newest]))
            raise AverageError(f"tensor {only[0]}: in one of steps {step} and {newest} only; cannot average them")
    for file_name in sorted(set(layouts[newest].values())):
        names = [name for name, f in layouts[newest].items() if f == file_name]
        tensors = {name: _mean_tensor(name, folders, layouts) for name in names}
        save_file(tensors, str(out / file_name), metadata=metadata)


def _mean_tensor(name: str, folders: dict[int, Path], layouts: dict[int, dict[str, str]]):
    import torch
    from safetensors import safe_open

    total, first = None, None
    for step, folder in folders.items():
        with safe_open(folder / layouts[step][name], framework="pt") as f:
            tensor = f.get_tensor(name)
        if first is None:
            first = (step, tensor)
        elif tensor.shape != first[1].shape or tensor.dtype != first[1].dtype:
            raise AverageError(
                f"tensor {name}: {tuple(tensor.shape)} {tensor.dtype} at step {step}, "
                f"{tuple(first[1].shape)} {first[1].dtype} at step {first[0]}; cannot average them"
            )
        if not tensor.is_floating_point():
            if not torch.equal(tensor, first[1]):
                raise AverageError(f"tensor {name} ({tensor.dtype}): differs between steps {first[0]} and {step}")
            continue
        acc_dtype = torch.float64 if tensor.dtype == torch.float64 else torch.float32
        total = tensor.to(acc_dtype) if total is None else total.add_(tensor.to(acc_dtype))
    if total is None:
        return first[1].clone()
    return (total / len(folders)).to(first[1].dtype).contiguous()


# --------------------------------------------------------------------------------------------------
# Evaluating the average after a step was recorded


def _done_entry(ledger: Ledger, step: int, sources: dict[str, str], config_id: str | None) -> Path | None:
    """The result of this very average (same steps and weights, same evaluation config) if already recorded."""
    entry = ledger.read().get(step) or {}
    same = entry.get("sources") == sources and entry.get("eval_config_id") == config_id
    if entry.get("status") == Status.DONE and same and Path(entry["result"]).is_file():
        return Path(entry["result"])
    return None


def evaluate_average(
    evaluator: Any,
    window: AverageWindow,
    eval_dir: Path,
    step: int,
) -> Path | None:
    """After step `step` was recorded in `eval_dir` and added to `window`: when the window is full and holds
    `step`, evaluate the average of its k checkpoints into eval_dir/average_last_<k>/ as the window's newest
    step (skipped when that very average is recorded already). Returns the result file, or None when there is
    no average to evaluate or it failed (a warning says why; its ledger entry is `failed` with the reason).
    A stop (KeyboardInterrupt or the service's Stop) leaves the entry `pending` and propagates."""
    with window.lock:  # two evaluators of one evaluation: one builds and evaluates an average at a time
        members = window.members()
        if len(members) < window.k or step not in members:
            return None
        newest = max(members)
        avg_eval_dir = average_eval_dir(eval_dir, window.k)
        ledger = Ledger(avg_eval_dir)
        sources = {str(s): w for s, w in members.items()}
        config_id = getattr(evaluator, "config_id", None)  # what the evaluation measures (sets, sampling...)
        done = _done_entry(ledger, newest, sources, config_id)
        if done is not None:
            return done
        average = {"last": window.k, "steps": list(members), "weights_ids": list(members.values())}
        ledger.set(newest, Status.RUNNING, owner=current_owner(), average=average, sources=sources)
        model_dir = window.root / "model"
        try:
            weights, _ = window.build(model_dir)
            result, samples = evaluator.evaluate(newest, model_dir, weights, avg_eval_dir)
        except Exception as exc:  # noqa: BLE001 - an average that cannot be built or run must not stop the service
            reason = f"{type(exc).__name__}: {exc}"
            ledger.set(newest, Status.FAILED, reason=reason, average=average, sources=sources)
            logger.warning("avg_last_%d@%d: not evaluated: %s", window.k, newest, reason)
            return None
        except BaseException:
            ledger.set(newest, Status.PENDING, reason="stopped while being evaluated", average=average, sources=sources)
            raise
        result["average"] = average
        path = write_result(avg_eval_dir, result, samples)
        ledger.set(
            newest,
            Status.DONE,
            weights_id=weights,
            checkpoint=str(model_dir),
            result=str(path),
            average=average,
            sources=sources,
            eval_config_id=config_id,
        )
    evaluator.log_average(result)
    logger.info("avg_last_%d@%d (the average of steps %s): %s", window.k, newest, average["steps"], path)
    return path
