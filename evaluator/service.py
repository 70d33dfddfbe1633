"""The evaluator service: find published checkpoints, evaluate each once, record and log the results."""

from __future__ import annotations

import hashlib
import json
import signal
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from tqdm import tqdm

from evaluator.backends import EngineError, Generation
from evaluator.grader import GraderPool
from evaluator.scheduler import claim_next
from evaluator.watcher import CheckpointWatcher
from shared.config import Config
from shared.data import Example, load_dataset, load_prompt_template, render_prompt, seeded_subset
from shared.protocol import (
    READY,
    CheckpointInvalid,
    Lease,
    Ledger,
    RunLayout,
    Status,
    atomic_write_bytes,
    atomic_write_json,
    list_ready_checkpoints,
    manifest_hash,
    parse_step,
    step_dirname,
    verify_checkpoint,
)
from shared.tracking import Tracker


class Stop(Exception):
    """SIGINT/SIGTERM: stop taking work, drop the evaluation in progress, exit 0."""


_stop_state = {"deferred": False, "requested": False}


def _raise_stop(signum, frame):
    if _stop_state["deferred"]:
        _stop_state["requested"] = True  # raised when the records being written are complete
        return
    raise Stop()


@contextmanager
def stop_deferred():
    """Results, ledger and W&B are written together or not at all: a stop waits for the end of this block."""
    _stop_state["deferred"] = True
    try:
        yield
    finally:
        _stop_state["deferred"] = False
        requested, _stop_state["requested"] = _stop_state["requested"], False
        if requested:
            raise Stop()


def compute_metrics(examples: list[Example], generations: list[Generation], rewards: list[dict[str, float]]) -> dict[str, float]:
    n = len(examples)
    formatted = [r for r in rewards if r["format_reward"] == 1.0]
    metrics = {
        "accuracy": sum(r["reward"] for r in rewards) / n,
        "format_rate": len(formatted) / n,
        "answer_accuracy": sum(r["answer_reward"] for r in formatted) / len(formatted) if formatted else 0.0,
        "mean_response_tokens": sum(g.num_tokens for g in generations) / n,
        "truncation_rate": sum(g.truncated for g in generations) / n,
        "num_samples": n,
    }
    by_category: dict[str, list[float]] = defaultdict(list)
    for ex, r in zip(examples, rewards):
        if ex.category:
            by_category[ex.category].append(r["reward"])
    for category, values in sorted(by_category.items()):
        metrics[f"accuracy_by_category/{category}"] = sum(values) / len(values)
    return metrics


class Evaluator:
    def __init__(self, cfg: Config, backend, tracker: Tracker | None):
        ec = cfg.evaluation
        self.cfg = cfg
        self.backend = backend
        self.tracker = tracker
        template = load_prompt_template(cfg.prompt_template_path())
        self.examples = seeded_subset(load_dataset(ec.data), ec.num_samples, ec.seed)
        self.prompts = [render_prompt(template, ex) for ex in self.examples]
        self.grader = GraderPool(ec.num_grader_workers, ec.grader_timeout_s)
        self.last_fingerprint: list[float] | None = None
        self.last_weights_id: str | None = None

    def close(self) -> None:
        self.grader.close()
        self.backend.close()

    # -- one checkpoint -------------------------------------------------------------------------

    def _load_checked(self, ckpt_dir: Path, weights_id: str | None) -> tuple[str, float]:
        """Load weights and prove the engine now runs them: the fingerprint must move when the
        weights did (stale weights after an in-place reload are a known vLLM failure)."""
        t0 = time.perf_counter()
        how = self.backend.load(ckpt_dir)
        fingerprint = self.backend.fingerprint(self.prompts[0])
        stale = (how == "in-place" and self.last_fingerprint == fingerprint and weights_id != self.last_weights_id)
        if stale:
            print(f"warning: {ckpt_dir}: outputs unchanged after an in-place reload of different weights; rebuilding the engine")
            self.backend.close()
            how = self.backend.load(ckpt_dir)
            fingerprint = self.backend.fingerprint(self.prompts[0])
        self.last_fingerprint, self.last_weights_id = fingerprint, weights_id
        return how, time.perf_counter() - t0

    def evaluate(self, step: int, ckpt_dir: Path, manifest: dict[str, Any] | None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        ec = self.cfg.evaluation
        weights_id = manifest_hash(manifest) if manifest else None
        t_start = time.perf_counter()
        how, reload_s = self._load_checked(ckpt_dir, weights_id)

        t0 = time.perf_counter()
        with tqdm(total=len(self.prompts), desc=f"step {step} generate", leave=False, dynamic_ncols=True) as bar:
            generations = self.backend.generate(self.prompts, bar.update)
        generate_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        with tqdm(total=len(self.prompts), desc=f"step {step} grade", leave=False, dynamic_ncols=True) as bar:
            rewards, grader_stats = self.grader.grade([g.text for g in generations], [ex.answer for ex in self.examples], bar.update)
        grade_s = time.perf_counter() - t0

        metrics = compute_metrics(self.examples, generations, rewards)
        metrics.update(grader_stats)
        generated_tokens = sum(g.num_tokens for g in generations)
        result = {
            "step": step,
            "checkpoint": str(ckpt_dir),
            "checkpoint_manifest_hash": weights_id,
            "config_hash": self.cfg.hash(),
            "eval_name": ec.name,
            "backend": self.backend.name,
            "load": how,
            "sampling": {"temperature": ec.temperature, "top_p": ec.top_p, "max_tokens": ec.max_tokens, "stop": ec.stop, "seed": ec.seed},
            "metrics": metrics,
            "timings_s": {"reload": reload_s, "generation": generate_s, "grading": grade_s, "total": time.perf_counter() - t_start},
            "generated_tokens_per_s": generated_tokens / max(generate_s, 1e-9),
            "time": time.time(),
        }
        samples = [
            {"prompt": p, "response": g.text, "ground_truth": ex.answer, "num_tokens": g.num_tokens, "truncated": g.truncated, **r}
            for p, g, ex, r in zip(self.prompts, generations, self.examples, rewards)
        ]
        return result, samples

    # -- recording -------------------------------------------------------------------------------

    def log(self, result: dict[str, Any], samples: list[dict[str, Any]] | None) -> None:
        if self.tracker is None:
            return
        self.tracker.log({"train_step": result["step"], **{f"eval/{k}": v for k, v in result["metrics"].items()},
                          **{f"eval/time_{k}_s": v for k, v in result["timings_s"].items()}})
        if samples:
            rows = [[s["prompt"][-200:], s["response"], s["ground_truth"], s["reward"]] for s in samples[: self.cfg.evaluation.num_logged_samples]]
            self.tracker.log_table("eval/samples", ["prompt (end)", "response", "ground_truth", "reward"], rows, result["step"])


def summary_line(result: dict[str, Any]) -> str:
    m, t = result["metrics"], result["timings_s"]
    return (f"step {result['step']:>8}: accuracy {m['accuracy']:.3f}  format {m['format_rate']:.3f}  "
            f"answer {m['answer_accuracy']:.3f}  len {m['mean_response_tokens']:.1f}  trunc {m['truncation_rate']:.2f}  "
            f"({t['total']:.1f}s: reload {t['reload']:.2f}s [{result['load']}], generate {t['generation']:.1f}s, grade {t['grading']:.1f}s)")


def write_result(result_path: Path, samples_path: Path, result: dict[str, Any], samples: list[dict[str, Any]]) -> None:
    """Samples first, then the metrics file: a result file implies its samples exist."""
    result_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(samples_path, "".join(json.dumps(s) + "\n" for s in samples).encode())
    atomic_write_json(result_path, result)


# --------------------------------------------------------------------------------------------------
# Serving a run: watch (or scan once), claim, evaluate, record.


def serve_run(cfg: Config, run_dir: Path, evaluator: Evaluator, *, once: bool, force: bool) -> int:
    ec = cfg.evaluation
    layout = RunLayout(run_dir)
    eval_dir = layout.eval_dir(ec.name)
    ledger = Ledger(eval_dir)
    _relog_unlogged(layout, ledger, evaluator)
    forced = frozenset(list_ready_checkpoints(layout.checkpoints_dir)) if force else frozenset()
    watcher = None
    if not once:
        layout.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        watcher = CheckpointWatcher(layout.checkpoints_dir, ec.observer)
        print(f"evaluator: watching {layout.checkpoints_dir} ({watcher.kind}; rescan every {ec.rescan_s:g}s)")
    try:
        while True:
            ready = sorted(list_ready_checkpoints(layout.checkpoints_dir))
            claim = claim_next(ledger, ready, backfill=ec.backfill, newest_first=not once, force=forced)
            if claim is None:
                if once:
                    return 0
                watcher.wait(ec.rescan_s)
                continue
            forced -= {claim.step}
            if claim.interrupted:
                print(f"step {claim.step}: evaluating again (the evaluator that had it was interrupted)")
            _evaluate_claimed(layout, ledger, evaluator, claim.step)
    except Stop:
        print("evaluator: stopped")
        return 0
    finally:
        if watcher is not None:
            watcher.stop()


def _evaluate_claimed(layout: RunLayout, ledger: Ledger, evaluator: Evaluator, step: int) -> None:
    name = evaluator.cfg.evaluation.name
    ckpt_dir = layout.checkpoint_dir(step)
    try:
        with Lease(layout, step):
            t0 = time.perf_counter()
            manifest = verify_checkpoint(ckpt_dir, model_only=True)
            verify_s = time.perf_counter() - t0
            result, samples = evaluator.evaluate(step, ckpt_dir, manifest)
            result["timings_s"]["verify"] = verify_s
    except (Stop, KeyboardInterrupt):
        # Interrupted: give the claim back so the step is evaluated later.
        ledger.update(lambda entries: entries.pop(step, None))
        raise
    except Exception as exc:  # noqa: BLE001 - a bad checkpoint (or an engine failure) must not stop the service
        if not (ckpt_dir / READY).exists():
            reason = f"{ckpt_dir}: deleted before or while being evaluated"
        elif isinstance(exc, (CheckpointInvalid, EngineError)):
            reason = str(exc)
        else:
            reason = f"{ckpt_dir}: {type(exc).__name__}: {exc}"
        ledger.set(step, Status.FAILED, reason=reason)
        print(f"step {step}: not evaluated: {reason}")
        return
    with stop_deferred():
        write_result(layout.result_path(name, step), layout.samples_path(name, step), result, samples)
        ledger.set(step, Status.DONE, result=str(layout.result_path(name, step)), logged=False)
        evaluator.log(result, samples)
        ledger.set(step, Status.DONE, result=str(layout.result_path(name, step)), logged=True)
    print(summary_line(result))


def _relog_unlogged(layout: RunLayout, ledger: Ledger, evaluator: Evaluator) -> None:
    """A previous evaluator wrote results but died before logging them: log them now, once."""
    for step, entry in sorted(ledger.read().items()):
        if entry["status"] == Status.DONE and not entry.get("logged"):
            path = layout.result_path(evaluator.cfg.evaluation.name, step)
            evaluator.log(json.loads(path.read_text()), None)
            ledger.set(step, Status.DONE, result=str(path), logged=True)


# --------------------------------------------------------------------------------------------------
# One checkpoint, after the fact


def _run_of(ckpt_dir: Path) -> RunLayout | None:
    """The run a checkpoint folder belongs to, if it sits in one's checkpoints/ folder."""
    return RunLayout(ckpt_dir.parent.parent) if ckpt_dir.parent.name == "checkpoints" else None


def results_dir_for(cfg: Config, ckpt_dir: Path, out: str | None) -> Path:
    """--out, else the run's eval folder, else eval/<name>/<folder>-<hash> beside the folder."""
    if out:
        return Path(out)
    run = _run_of(ckpt_dir)
    if run is not None:
        return run.eval_dir(cfg.evaluation.name)
    return ckpt_dir.parent / "eval" / cfg.evaluation.name / _folder_id(ckpt_dir)


def evaluate_folder(cfg: Config, ckpt_dir: Path, evaluator: Evaluator, out_dir: Path, force: bool) -> Path:
    """Evaluate one folder: a published checkpoint (verified) or a plain model folder (warned)."""
    if not ckpt_dir.is_dir():
        raise CheckpointInvalid(f"{ckpt_dir}: no such checkpoint directory")
    if (ckpt_dir / READY).exists():
        manifest = verify_checkpoint(ckpt_dir, model_only=True)
        step = int(manifest["step"])
    else:
        if not (ckpt_dir / "config.json").is_file():
            raise CheckpointInvalid(f"{ckpt_dir}: not a model folder (no config.json) and no {READY} marker")
        print(f"warning: {ckpt_dir} has no {READY} manifest: its integrity cannot be checked")
        manifest = None
        step = parse_step(ckpt_dir.name) or 0
    result_path = out_dir / f"{step_dirname(step)}.json"
    if result_path.exists() and not force:
        print(f"already evaluated: {result_path} (use --force to evaluate again)")
        print(summary_line(json.loads(result_path.read_text())))
        return result_path
    run = _run_of(ckpt_dir)
    with Lease(run, step) if run is not None else nullcontext():  # the trainer's retention keeps it meanwhile
        result, samples = evaluator.evaluate(step, ckpt_dir, manifest)
    with stop_deferred():
        write_result(result_path, out_dir / f"{step_dirname(step)}.samples.jsonl", result, samples)
        evaluator.log(result, samples)
        if run is not None and out_dir == run.eval_dir(cfg.evaluation.name) and manifest is not None:
            Ledger(out_dir).set(step, Status.DONE, result=str(result_path), logged=True)  # a watcher of the run need not redo it
    print(summary_line(result))
    print(f"results: {result_path}")
    return result_path


def _folder_id(path: Path) -> str:
    return f"{path.name}-{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]}"


def install_stop_handlers() -> None:
    signal.signal(signal.SIGINT, _raise_stop)
    signal.signal(signal.SIGTERM, _raise_stop)
