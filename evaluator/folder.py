"""One checkpoint (or model folder) evaluated after the fact: `python -m evaluator --ckpt DIR`.

Invariant: the results are claimed and recorded in the results folder's ledger like a watcher's, tied to the
folder's weights; an unpublished folder's results never enter a run's ledger.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from evaluator.evaluation import Evaluator, summary_line
from evaluator.recording import record
from evaluator.scheduler import claim_step, give_back
from evaluator.serving import advance, evaluate_snapshot, point_best, record_exception
from evaluator.stopping import Stop
from shared.config import Config
from shared.protocol import (
    CHECKPOINTS_DIRNAME,
    READY,
    TMP_PREFIX,
    CheckpointInvalid,
    Ledger,
    Liveness,
    Presence,
    RunLayout,
    folder_weights_id,
    parse_step,
    read_manifest,
    result_file,
    weights_id,
)

log = logging.getLogger(__name__)


def _run_of(ckpt_dir: Path) -> RunLayout | None:
    """The run a checkpoint folder belongs to, if it sits in one's checkpoints/ folder."""
    return RunLayout(ckpt_dir.parent.parent) if ckpt_dir.parent.name == CHECKPOINTS_DIRNAME else None


def _folder_id(path: Path) -> str:
    return f"{path.name}-{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]}"


def results_dir_for(cfg: Config, ckpt_dir: Path, out: str | None) -> Path:
    """--out, else the run's eval folder (a published step of a run), else eval/<name>/<folder>-<hash> beside
    the folder (anything else: an unpublished folder's results never enter the run's ledger)."""
    if out:
        return Path(out)
    run = _run_of(ckpt_dir)
    if run is not None and (ckpt_dir / READY).exists():
        return run.eval_dir(cfg.evaluation.name)
    return RunLayout(ckpt_dir.parent).eval_dir(cfg.evaluation.name) / _folder_id(ckpt_dir)


def _identify(ckpt_dir: Path) -> tuple[bool, int, str]:
    """(published, step, weights id) of a folder to evaluate; CheckpointInvalid for what is not one."""
    if not ckpt_dir.is_dir():
        raise CheckpointInvalid(f"{ckpt_dir}: no such checkpoint directory")
    if ckpt_dir.name.startswith(TMP_PREFIX):
        raise CheckpointInvalid(f"{ckpt_dir}: a checkpoint still being written (or left by a crash); not evaluated")
    if (ckpt_dir / READY).exists():
        manifest = read_manifest(ckpt_dir)
        return True, int(manifest["step"]), weights_id(manifest)
    if not (ckpt_dir / "config.json").is_file():
        raise CheckpointInvalid(f"{ckpt_dir}: not a model folder (no config.json) and no {READY} marker")
    log.warning("%s has no %s manifest: its integrity cannot be checked", ckpt_dir, READY)
    return False, parse_step(ckpt_dir.name) or 0, folder_weights_id(ckpt_dir)


def _evaluate_claimed_folder(
    ckpt_dir: Path, ledger: Ledger, evaluator: Evaluator, presence: Presence | None, step: int, weights: str
) -> tuple[dict, dict]:
    """Evaluate a claimed folder: a published one from its snapshot, a plain model folder as it is."""
    try:
        if presence is not None or (ckpt_dir / READY).exists():
            return evaluate_snapshot(ckpt_dir, ledger, evaluator, presence, step, weights)
        return evaluator.evaluate(step, ckpt_dir, weights, ledger.path.parent)
    except (Stop, KeyboardInterrupt):
        give_back(ledger, step, evaluator.owner_id)
        raise
    except Exception as exc:
        record_exception(ledger, evaluator, step, ckpt_dir, exc)
        raise


def evaluate_folder(cfg: Config, ckpt_dir: Path, evaluator: Evaluator, out_dir: Path, force: bool) -> Path | None:
    """Evaluate one folder: a published checkpoint (verified) or a plain model folder (warned). Results
    are claimed and recorded in `out_dir`'s ledger like a watcher's, tied to the folder's weights."""
    published, step, weights = _identify(ckpt_dir)
    run = _run_of(ckpt_dir) if published else None
    ec = cfg.evaluation
    presence = Presence(run, None, watching=False, backfill=False, timeout_s=ec.heartbeat_timeout_s) if run else None
    alive = Liveness(run, ec.heartbeat_timeout_s, evaluator.owner_id).alive if run else (lambda owner: False)
    ledger = Ledger(out_dir)
    try:
        if presence is not None:
            presence.start()
        claimed, why_not = claim_step(ledger, step, weights, alive=alive, force=force, config_id=evaluator.config_id)
        result_path = result_file(out_dir, step)
        if not claimed and why_not == "already evaluated":
            log.info("already evaluated: %s (same weights %s; use --force to evaluate again)", result_path, weights)
            log.info("%s", summary_line(json.loads(result_path.read_text())))
            return result_path
        if not claimed:
            raise CheckpointInvalid(why_not)
        result, samples = _evaluate_claimed_folder(ckpt_dir, ledger, evaluator, presence, step, weights)
        record(ledger, evaluator, step, result, samples)
        advance(presence, f"recorded step {step}", step)
    finally:
        if presence is not None:
            presence.stop()
    log.info("%s", summary_line(result))
    if run is not None and out_dir == run.eval_dir(cfg.evaluation.name):
        point_best(cfg, run)
    log.info("results: %s", result_path)
    return result_path
