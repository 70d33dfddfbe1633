"""The evaluator service: find published checkpoints, evaluate each once, record and log the results."""

from __future__ import annotations

import hashlib
import json
import signal
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from tqdm import tqdm

from evaluator import audit
from evaluator.audit import write_disagreements
from evaluator.backends import EngineError
from evaluator.grader import GraderPool, extract_answer, grader_version, vote_key
from evaluator.metrics import breakdown_fields, changes, failure_kind, read_samples, result_sets, set_metrics
from evaluator.scheduler import claim_next, claim_step, give_back, holds_claim
from evaluator.watcher import CheckpointWatcher
from shared.config import Config, EvalSetConfig, reported_budgets
from shared.data import Example, load_dataset, load_prompt_template, render_prompt, seeded_subset
from shared.protocol import (
    READY,
    BestRule,
    TMP_PREFIX,
    CheckpointInvalid,
    ClaimLost,
    Ledger,
    Presence,
    RunLayout,
    Status,
    atomic_write_bytes,
    atomic_write_json,
    comparable_as,
    current_owner,
    folder_weights_id,
    owner_alive,
    parse_step,
    read_manifest,
    ready_weights_ids,
    result_file,
    result_steps,
    samples_file,
    update_best,
    verify_checkpoint,
    weights_id,
)
from shared.tracking import Tracker


class Stop(BaseException):
    """SIGINT/SIGTERM: stop taking work, drop the evaluation in progress, exit 0. A BaseException, like
    KeyboardInterrupt: the `except Exception` of a loader or an engine start must not turn it into a failure."""


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


def request_seed(seed: int, set_name: str, problem: int, sample: int) -> int:
    """The sampling seed of one request: a function of what it samples, never of what ran before."""
    digest = hashlib.sha256(f"{seed}:{set_name}:{problem}:{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@dataclass
class EvalSet:
    """One evaluation set, loaded: its config, problems and prompts (fixed for the evaluator's life)."""

    cfg: EvalSetConfig
    examples: list[Example]
    prompts: list[str]

    @property
    def name(self) -> str:
        return self.cfg.name

    @cached_property
    def fields_by_problem(self) -> dict[int, dict[str, Any]]:
        return {ex.index: ex.fields for ex in self.examples}

    @cached_property
    def problems_id(self) -> str:
        """Which problems the set holds (index and answer of each): flips are counted only between equal ones."""
        return hashlib.sha256(json.dumps([[ex.index, ex.answer] for ex in self.examples]).encode()).hexdigest()[:16]

    @cached_property
    def breakdown(self) -> list[str]:
        """The fields accuracy is broken down by: the set's choice, else those with few distinct values."""
        return breakdown_fields(self.fields_by_problem, self.cfg.breakdown_fields)


def load_eval_sets(cfg: Config) -> list[EvalSet]:
    template = load_prompt_template(cfg.prompt_template_path())
    sets = []
    for set_cfg in cfg.evaluation.eval_sets():
        examples = seeded_subset(load_dataset(set_cfg.data), set_cfg.num_samples, cfg.evaluation.seed)
        sets.append(EvalSet(set_cfg, examples, [render_prompt(template, ex) for ex in examples]))
    return sets


def previous_samples(eval_dir: Path, set_result: dict[str, Any]) -> tuple[int, list[dict[str, Any]]] | None:
    """(step, samples) of the nearest earlier step of this set with results on disk for the same problems
    and sampling (`comparable_as`), if any. A samples file that cannot be read is named in a warning and
    passed over."""
    name, step = set_result["set"], set_result["step"]
    earlier = [(other, path) for other, path in result_steps(eval_dir, name).items() if other < step]
    for other, path in reversed(earlier):
        try:
            before = json.loads(path.read_text())
            whole = json.loads(result_file(eval_dir, other).read_text())  # written last: the set's files are complete
            if comparable_as(before) != comparable_as(set_result) or before.get("weights_id") != whole.get(
                "weights_id"
            ):
                continue
            return other, read_samples(samples_file(eval_dir, name, other))
        except FileNotFoundError:
            continue  # the step's own result file is not there: a recording that did not finish
        except (ValueError, KeyError) as exc:
            print(f"warning: {path}: not used to count learned/forgotten problems: {exc}")
    return None


class Evaluator:
    def __init__(self, cfg: Config, backend, tracker: Tracker | None):
        ec = cfg.evaluation
        self.cfg = cfg
        self.backend = backend
        self.tracker = tracker
        self.sets = load_eval_sets(cfg)
        for es in self.sets:  # what a set inherited from the section is visible before any result
            sc = es.cfg
            print(
                f"evaluation set {sc.name}: {len(es.examples)} problems x {sc.n} sample{'s' if sc.n > 1 else ''}, "
                f"temperature {sc.temperature:g}, top_p {sc.top_p:g}, max_tokens {sc.max_tokens} ({sc.data.path}); "
                f"accuracy by {', '.join(es.breakdown) or 'no field'}"
            )
        self.grader = GraderPool(ec.num_grader_workers, ec.grader_timeout_s)
        self.owner_id = current_owner()["id"]  # who claims steps and records results: this process
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
        probe = self.sets[0].prompts[0]
        fingerprint = self.backend.fingerprint(probe)
        stale = how == "in-place" and self.last_fingerprint == fingerprint and weights_id != self.last_weights_id
        if stale:
            print(
                f"warning: {ckpt_dir}: outputs unchanged after an in-place reload of different weights; rebuilding the engine"
            )
            self.backend.close()
            how = self.backend.load(ckpt_dir)
            fingerprint = self.backend.fingerprint(probe)
        self.last_fingerprint, self.last_weights_id = fingerprint, weights_id
        return how, time.perf_counter() - t0

    def evaluate(
        self, step: int, ckpt_dir: Path, weights_id: str, eval_dir: Path
    ) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
        """Every set on this checkpoint, with one weight load: (result, samples by set). Learned and
        forgotten problems are counted against the nearest earlier step with results in `eval_dir`."""
        ec = self.cfg.evaluation
        t_start = time.perf_counter()
        how, reload_s = self._load_checked(ckpt_dir, weights_id)
        results, samples = {}, {}
        for eval_set in self.sets:
            results[eval_set.name], samples[eval_set.name] = self._evaluate_set(step, eval_set, eval_dir)
        generate_s = sum(r["timings_s"]["generation"] for r in results.values())
        result = {
            "step": step,
            "checkpoint": str(ckpt_dir),
            "weights_id": weights_id,
            "config_hash": self.cfg.hash(),
            "eval_name": ec.name,
            "backend": self.backend.name,
            "load": how,
            "seed": ec.seed,
            "grader_version": grader_version(),
            "sets": results,
            "timings_s": {
                "reload": reload_s,
                "generation": generate_s,
                "grading": sum(r["timings_s"]["grading"] for r in results.values()),
                "total": time.perf_counter() - t_start,
            },
            "generated_tokens_per_s": sum(r["generated_tokens"] for r in results.values()) / max(generate_s, 1e-9),
            "time": time.time(),
        }
        return result, samples

    def _evaluate_set(
        self, step: int, eval_set: EvalSet, eval_dir: Path
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        sc, seed = eval_set.cfg, self.cfg.evaluation.seed
        # n requests per problem, each with its own seed: the samples depend on the set's requests, not on history.
        requests = [(ex, prompt, j) for ex, prompt in zip(eval_set.examples, eval_set.prompts) for j in range(sc.n)]
        prompts = [prompt for _, prompt, _ in requests]
        seeds = [request_seed(seed, sc.name, ex.index, j) for ex, _, j in requests]
        t0 = time.perf_counter()
        desc = f"step {step} {sc.name}"
        with tqdm(total=len(prompts), desc=f"{desc} generate", leave=False, dynamic_ncols=True) as bar:
            generations = self.backend.generate(prompts, seeds, sc, bar.update)
        generate_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        with tqdm(total=len(prompts), desc=f"{desc} grade", leave=False, dynamic_ncols=True) as bar:
            rewards, problems = self.grader.grade(
                [g.text for g in generations], [ex.answer for ex, _, _ in requests], bar.update
            )
        grade_s = time.perf_counter() - t0

        samples = []
        for (ex, prompt, j), g, r, problem in zip(requests, generations, rewards, problems, strict=True):
            answer = extract_answer(g.text)
            vote = vote_key(answer) if answer is not None else None
            samples.append(
                {
                    "problem": ex.index,
                    "sample": j,
                    "prompt": prompt,
                    "response": g.text,
                    "ground_truth": ex.answer,
                    "answer": answer,
                    "vote": vote,
                    "num_tokens": g.num_tokens,
                    "truncated": g.truncated,
                    **r,
                    "failure": failure_kind(r["reward"], r["format_reward"], g.truncated, problem, vote),
                    "grader": problem,
                }
            )
        ec = self.cfg.evaluation
        metrics = set_metrics(
            samples,
            sc.n,
            eval_set.fields_by_problem,
            eval_set.breakdown,
            token_budgets=reported_budgets(sc.max_tokens, ec.token_budgets),
            num_resamples=ec.ci_num_resamples,
            seed=seed,
            select_fraction=sc.select_fraction,
        )
        generated_tokens = sum(g.num_tokens for g in generations)
        if metrics["grader_timeouts"] or metrics["grader_errors"]:
            print(
                f"warning: step {step}, set {sc.name}: the grader timed out on {metrics['grader_timeouts']} and "
                f"failed on {metrics['grader_errors']} of {len(samples)} samples (timeouts after a retry); they "
                "count as wrong (failure kinds grader_timeout, grader_error)"
            )
        set_result = {
            "step": step,
            "set": sc.name,
            "data": sc.data.path,
            "problems_id": eval_set.problems_id,
            "sampling": {
                "n": sc.n,
                "temperature": sc.temperature,
                "top_p": sc.top_p,
                "max_tokens": sc.max_tokens,
                "stop": sc.stop,
                "seed": seed,
                "select_fraction": sc.select_fraction,
            },
            "grader_version": grader_version(),
            "metrics": metrics,
            "timings_s": {"generation": generate_s, "grading": grade_s},
            "generated_tokens": generated_tokens,
            "generated_tokens_per_s": generated_tokens / max(generate_s, 1e-9),
        }
        # Flips against the nearest earlier step evaluated so far (named: with newest-first or back-fill order
        # it may not be the step just before; the report counts between consecutive steps).
        previous = previous_samples(eval_dir, set_result)
        flips = changes(previous[1], samples) if previous else {"learned": [], "forgotten": []}
        set_result["changes"] = {"vs_step": previous[0] if previous else None, **flips}
        if previous:
            set_result["metrics"].update(learned=len(flips["learned"]), forgotten=len(flips["forgotten"]))
        return set_result, samples

    # -- recording -------------------------------------------------------------------------------

    def log(self, result: dict[str, Any], samples: dict[str, list[dict[str, Any]]] | None) -> None:
        if self.tracker is None:
            return
        row: dict[str, Any] = {"train_step": result["step"], "eval/weights_id": result["weights_id"]}
        row.update({f"eval/time_{k}_s": v for k, v in result["timings_s"].items()})
        for name, set_result in result["sets"].items():
            row.update({f"eval/{name}/{k}": v for k, v in set_result["metrics"].items() if v is not None})
            if set_result["changes"]["vs_step"] is not None:  # learned/forgotten are counted since that step
                row[f"eval/{name}/changes_vs_step"] = set_result["changes"]["vs_step"]
        self.tracker.log(row)
        for name, set_samples in (samples or {}).items():
            self._log_tables(result["step"], name, result["sets"][name], set_samples)

    def _log_tables(self, step: int, name: str, set_result: dict[str, Any], samples: list[dict[str, Any]]) -> None:
        rows = [
            [s["problem"], s["sample"], s["prompt"][-300:], s["response"], s["ground_truth"], s["answer"]]
            + [s["reward"], s["format_reward"], s["failure"] or "right"]
            for s in samples[: self.cfg.evaluation.num_logged_samples]
        ]
        columns = ["problem", "sample", "prompt (end)", "response", "reference answer", "answer"]
        self.tracker.log_table(f"eval/{name}/samples", columns + ["reward", "format_reward", "failure"], rows, step)
        num_rows = self.cfg.evaluation.num_logged_samples
        self.tracker.log_table(
            f"eval/{name}/grader_disagreements", audit.TABLE_COLUMNS, audit.table_rows(samples, num_rows), step
        )
        flips = set_result["changes"]
        if flips["vs_step"] is None or not (flips["learned"] or flips["forgotten"]):
            return
        first = {s["problem"]: s for s in samples if s["sample"] == 0}
        flip_rows = [
            [p, change, flips["vs_step"], first[p]["ground_truth"], first[p]["response"]]
            for change in ("learned", "forgotten")
            for p in flips[change]
        ]
        self.tracker.log_table(
            f"eval/{name}/flips",
            ["problem", "change", "since step", "reference answer", "response now"],
            flip_rows,
            step,
        )


def summary_line(result: dict[str, Any]) -> str:
    t = result["timings_s"]
    parts = []
    for name, r in result_sets(result).items():
        m, n = r["metrics"], r["sampling"]["n"]
        sampled = f" pass@{n} {m[f'pass@{n}']:.3f} maj@{n} {m[f'maj@{n}']:.3f}" if n > 1 else ""
        flips = f" +{m['learned']}/-{m['forgotten']}" if "learned" in m else ""
        parts.append(
            f"{name}: acc {m['accuracy']:.3f}{sampled} fmt {m['format_rate']:.2f} len {m['mean_response_tokens']:.0f}"
            f" trunc {m['truncation_rate']:.2f}{flips}"
        )
    return (
        f"step {result['step']:>8}: {' | '.join(parts)}  "
        f"({t['total']:.1f}s: reload {t['reload']:.2f}s [{result['load']}])"
    )


def write_result(eval_dir: Path, result: dict[str, Any], samples: dict[str, list[dict[str, Any]]]) -> Path:
    """Per set its samples, then its result; the step's result file last: it implies all the others exist."""
    step = result["step"]
    for set_name, set_samples in samples.items():
        (eval_dir / set_name).mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(
            samples_file(eval_dir, set_name, step), "".join(json.dumps(s) + "\n" for s in set_samples).encode()
        )
        write_disagreements(eval_dir, set_name, step, set_samples)
        set_result = {k: result[k] for k in ("checkpoint", "weights_id", "eval_name", "time")}
        atomic_write_json(result_file(eval_dir, step, set_name), {**result["sets"][set_name], **set_result})
    atomic_write_json(result_file(eval_dir, step), result)
    return result_file(eval_dir, step)


# --------------------------------------------------------------------------------------------------
# Recording: the one path from a finished evaluation to results on disk, the ledger and W&B.
#
# Invariants: a result is recorded only by the owner of the step's running claim, checked under the
# ledger lock, and the result files are written under that same lock before the entry says `done`;
# samples are written before metrics. W&B is logged by whoever holds the entry's `log_owner` (the
# recorder, or after a crash the one evaluator that takes it over) and `logged` is set once W&B's
# service has written the row to its file. After a crash between those two, the evaluator that takes the
# duty over reads W&B's files: a row already there (same train_step and weights_id) is marked, not logged
# again; one that is not is logged, into the same resumed W&B run. So each result is logged exactly once,
# as far as W&B's files on this machine tell (where they cannot be read, at least once, never lost).


def _record(
    ledger: Ledger, evaluator: Evaluator, step: int, result: dict[str, Any], samples: dict[str, list[dict[str, Any]]]
) -> None:
    eval_dir = ledger.path.parent

    def commit(entries: dict[int, dict[str, Any]]) -> None:
        entry = entries.get(step, {})
        if not holds_claim(entry, evaluator.owner_id):
            raise ClaimLost(
                f"step {step}: result discarded: this evaluator no longer holds the step "
                f"(now {entry.get('status', 'unclaimed')}; its heartbeat went stale and another evaluator took it)"
            )
        result_path = write_result(eval_dir, result, samples)
        entries[step] = {
            "status": Status.DONE,
            "time": time.time(),
            "weights_id": result["weights_id"],
            "attempts": entry.get("attempts", 1),
            "checkpoint": result["checkpoint"],
            "result": str(result_path),
            "logged": False,
            "log_owner": entry["owner"],
        }

    with stop_deferred():
        ledger.update(commit)
        _log_once(ledger, evaluator, step, result, samples)


def _record_failure(ledger: Ledger, evaluator: Evaluator, step: int, reason: str) -> None:
    def commit(entries: dict[int, dict[str, Any]]) -> bool:
        entry = entries.get(step, {})
        if not holds_claim(entry, evaluator.owner_id):
            return False
        entries[step] = {**entry, "status": Status.FAILED, "time": time.time(), "reason": reason}
        return True

    if ledger.update(commit):
        print(f"step {step}: not evaluated: {reason}")
    else:
        print(f"step {step}: failure not recorded (this evaluator no longer holds the step): {reason}")


def _log_once(
    ledger: Ledger,
    evaluator: Evaluator,
    step: int,
    result: dict[str, Any],
    samples: dict[str, list[dict[str, Any]]] | None,
) -> None:
    def still_mine(entries: dict[int, dict[str, Any]]) -> bool:
        entry = entries.get(step) or {}
        return (
            entry.get("status") == Status.DONE
            and not entry.get("logged")
            and entry.get("log_owner", {}).get("id") == evaluator.owner_id
        )

    if not ledger.update(still_mine):  # frozen meanwhile, and another evaluator took the logging over
        print(f"step {step}: not logged here: another evaluator took over logging it")
        return
    evaluator.log(result, samples)
    if evaluator.tracker is not None:
        evaluator.tracker.wait_durable()  # `logged` is set only once W&B's file holds the row
    _mark_logged(ledger, step, result["weights_id"])


def _mark_logged(ledger: Ledger, step: int, weights: str) -> None:
    def mark(entries: dict[int, dict[str, Any]]) -> None:
        entry = entries.get(step)
        if entry and entry["status"] == Status.DONE and entry.get("weights_id") == weights:
            entries[step] = {**{k: v for k, v in entry.items() if k != "log_owner"}, "logged": True}

    ledger.update(mark)


def _relog_unlogged(layout: RunLayout, ledger: Ledger, evaluator: Evaluator) -> None:
    """A previous evaluator wrote results but died before logging them: take over the logging duty of
    each such step (under the lock: of two evaluators starting together only one does) and log it."""
    alive = _alive_fn(layout, evaluator)

    def take(entries: dict[int, dict[str, Any]]) -> list[int]:
        taken = []
        for step, entry in entries.items():
            if entry["status"] == Status.DONE and not entry.get("logged") and not alive(entry.get("log_owner", {})):
                entries[step] = {**entry, "log_owner": {"id": evaluator.owner_id}}
                taken.append(step)
        return sorted(taken)

    taken = ledger.update(take)
    in_wandb = evaluator.tracker.logged_rows() if taken and evaluator.tracker is not None else None
    for step in taken:
        result = json.loads(result_file(ledger.path.parent, step).read_text())
        if in_wandb is not None and any(
            row.get("train_step") == step and row.get("eval/weights_id") == result["weights_id"] for row in in_wandb
        ):
            # It died after W&B wrote the row, before the ledger said so: mark it, do not log it twice.
            print(f"step {step}: already in W&B's files; marked logged")
            _mark_logged(ledger, step, result["weights_id"])
            continue
        print(f"step {step}: logging results that an earlier evaluator wrote but did not log")
        with stop_deferred():
            _log_once(ledger, evaluator, step, result, None)


def _alive_fn(layout: RunLayout | None, evaluator: Evaluator):
    """owner -> alive?, by the run's heartbeats (this process is alive by definition)."""

    def alive(owner: dict[str, Any]) -> bool:
        if owner.get("id") == evaluator.owner_id:
            return True
        return layout is not None and owner_alive(layout, owner)

    return alive


# --------------------------------------------------------------------------------------------------
# Serving a run: watch (or scan once), claim, evaluate, record.


def check_run_dir(run_dir: Path) -> RunLayout:
    """A run folder is one the trainer made: it has its config or its checkpoints folder."""
    layout = RunLayout(run_dir)
    if not layout.config_path.is_file() and not layout.checkpoints_dir.is_dir():
        raise CheckpointInvalid(
            f"{run_dir}: not a run folder (no config.yaml and no checkpoints/); "
            "start the trainer first, or check the path"
        )
    return layout


def serve_run(cfg: Config, layout: RunLayout, evaluator: Evaluator, *, once: bool, force: bool) -> int:
    ec = cfg.evaluation
    ledger = Ledger(layout.eval_dir(ec.name))
    presence = Presence(
        layout, ec.name, watching=not once, backfill=ec.backfill, timeout_s=ec.heartbeat_timeout_s
    ).start()
    alive = _alive_fn(layout, evaluator)
    watcher = None
    counts = {"evaluated": 0, "failed": 0}
    try:
        _relog_unlogged(layout, ledger, evaluator)
        forced = frozenset(ready_weights_ids(layout.checkpoints_dir)) if force else frozenset()
        if not once:
            layout.checkpoints_dir.mkdir(parents=True, exist_ok=True)
            watcher = CheckpointWatcher(layout.checkpoints_dir, ec.observer)
            print(f"evaluator: watching {layout.checkpoints_dir} ({watcher.kind}; rescan every {ec.rescan_s:g}s)")
        while True:
            ready = ready_weights_ids(layout.checkpoints_dir)
            claim = claim_next(
                ledger,
                ready,
                alive=alive,
                backfill=ec.backfill,
                newest_first=not once,
                force=forced,
                is_ready=lambda step: (layout.checkpoint_dir(step) / READY).exists(),
            )
            if claim is None:
                if once:
                    print(
                        f"evaluator: {layout.run_dir}: {summarize(ledger, ready)}; "
                        f"evaluated {counts['evaluated']} now, {counts['failed']} failed"
                    )
                    return 0
                watcher.wait(ec.rescan_s)
                continue
            forced -= {claim.step}
            for older, status in sorted(claim.passed_over.items()):
                print(f"step {older}: {status} (passed over for newer step {claim.step})")
            if claim.interrupted:
                print(f"step {claim.step}: evaluating again (the evaluator that had it was stopped or died)")
            if claim.replaced:
                print(f"step {claim.step}: its folder holds new weights since it was last seen; evaluating them")
            ok = _evaluate_claimed(layout, ledger, evaluator, presence, claim.step, claim.weights_id)
            counts["evaluated" if ok else "failed"] += 1
    except Stop:
        print("evaluator: stopped")
        return 0
    finally:
        if watcher is not None:
            watcher.stop()
        presence.stop()


def summarize(ledger: Ledger, ready: dict[int, str]) -> str:
    entries = ledger.read()
    by_status: dict[str, int] = defaultdict(int)
    for entry in entries.values():
        by_status[entry["status"]] += 1
    parts = ", ".join(f"{n} {status}" for status, n in sorted(by_status.items()))
    return f"{len(ready)} checkpoint(s) on disk; ledger: {parts or 'empty'}"


def _evaluate_claimed(
    layout: RunLayout, ledger: Ledger, evaluator: Evaluator, presence: Presence, step: int, weights: str | None
) -> bool:
    """Evaluate a claimed step and record the outcome; True if results were recorded."""
    ckpt_dir = layout.checkpoint_dir(step)
    try:
        with presence.lease(step):  # taken before verifying: retention can no longer delete it
            verify_s = _verify_claimed(ckpt_dir, weights)
            result, samples = evaluator.evaluate(step, ckpt_dir, weights, ledger.path.parent)
            result["timings_s"]["verify"] = verify_s
    except (Stop, KeyboardInterrupt):
        give_back(ledger, step, evaluator.owner_id)  # pending, first in line for the next evaluator
        raise
    except Exception as exc:  # noqa: BLE001 - a bad checkpoint (or an engine failure) must not stop the service
        if not (ckpt_dir / READY).exists():
            reason = f"{ckpt_dir}: deleted before or while being evaluated"
        elif isinstance(exc, (CheckpointInvalid, EngineError)):
            reason = str(exc)
        else:
            reason = f"{ckpt_dir}: {type(exc).__name__}: {exc}"
        _record_failure(ledger, evaluator, step, reason)
        return False
    try:
        _record(ledger, evaluator, step, result, samples)
    except ClaimLost as exc:
        print(exc)
        return False
    print(summary_line(result))
    _point_best(evaluator.cfg, layout)
    return True


def _verify_claimed(ckpt_dir: Path, weights: str | None) -> float:
    """Check a claimed checkpoint's model files against its manifest, and that the manifest is still the one
    claimed (the weights `weights`); seconds taken. CheckpointInvalid otherwise."""
    t0 = time.perf_counter()
    if weights_id(verify_checkpoint(ckpt_dir, model_only=True)) != weights:
        raise CheckpointInvalid(f"{ckpt_dir}: its manifest changed after it was claimed")
    return time.perf_counter() - t0


def _point_best(cfg: Config, layout: RunLayout) -> None:
    """With training.keep_best, runs/<run>/best follows the results as they come (not only the trainer's saves)."""
    best = BestRule.of(cfg)
    if best is None:
        return
    try:
        step = update_best(layout, best)
    except Exception as exc:  # noqa: BLE001 - a pointer must not stop the evaluation service
        print(f"warning: could not update {layout.best_path}: {type(exc).__name__}: {exc}")
        return
    if step is not None:
        print(f"best: step {step} by {best.set_name} {best.metric} ({layout.best_path})")


# --------------------------------------------------------------------------------------------------
# One checkpoint, after the fact


def _run_of(ckpt_dir: Path) -> RunLayout | None:
    """The run a checkpoint folder belongs to, if it sits in one's checkpoints/ folder."""
    return RunLayout(ckpt_dir.parent.parent) if ckpt_dir.parent.name == "checkpoints" else None


def results_dir_for(cfg: Config, ckpt_dir: Path, out: str | None) -> Path:
    """--out, else the run's eval folder (a published step of a run), else eval/<name>/<folder>-<hash> beside
    the folder (anything else: an unpublished folder's results never enter the run's ledger)."""
    if out:
        return Path(out)
    run = _run_of(ckpt_dir)
    if run is not None and (ckpt_dir / READY).exists():
        return run.eval_dir(cfg.evaluation.name)
    return ckpt_dir.parent / "eval" / cfg.evaluation.name / _folder_id(ckpt_dir)


def evaluate_folder(cfg: Config, ckpt_dir: Path, evaluator: Evaluator, out_dir: Path, force: bool) -> Path | None:
    """Evaluate one folder: a published checkpoint (verified) or a plain model folder (warned). Results
    are claimed and recorded in `out_dir`'s ledger like a watcher's, tied to the folder's weights."""
    if not ckpt_dir.is_dir():
        raise CheckpointInvalid(f"{ckpt_dir}: no such checkpoint directory")
    if ckpt_dir.name.startswith(TMP_PREFIX):
        raise CheckpointInvalid(f"{ckpt_dir}: a checkpoint still being written (or left by a crash); not evaluated")
    published = (ckpt_dir / READY).exists()
    if published:
        manifest = read_manifest(ckpt_dir)
        step, weights = int(manifest["step"]), weights_id(manifest)
    else:
        if not (ckpt_dir / "config.json").is_file():
            raise CheckpointInvalid(f"{ckpt_dir}: not a model folder (no config.json) and no {READY} marker")
        print(f"warning: {ckpt_dir} has no {READY} manifest: its integrity cannot be checked")
        step, weights = parse_step(ckpt_dir.name) or 0, folder_weights_id(ckpt_dir)
    run = _run_of(ckpt_dir) if published else None
    presence = (
        Presence(run, None, watching=False, backfill=False, timeout_s=cfg.evaluation.heartbeat_timeout_s).start()
        if run
        else None
    )
    ledger = Ledger(out_dir)
    try:
        claimed, why_not = claim_step(ledger, step, weights, alive=_alive_fn(run, evaluator), force=force)
        result_path = result_file(out_dir, step)
        if not claimed and why_not == "already evaluated":
            print(f"already evaluated: {result_path} (same weights {weights}; use --force to evaluate again)")
            print(summary_line(json.loads(result_path.read_text())))
            return result_path
        if not claimed:
            raise CheckpointInvalid(why_not)
        try:
            with presence.lease(step) if presence else nullcontext():  # before verifying: retention keeps it
                if published:
                    _verify_claimed(ckpt_dir, weights)
                result, samples = evaluator.evaluate(step, ckpt_dir, weights, out_dir)
        except (Stop, KeyboardInterrupt):
            give_back(ledger, step, evaluator.owner_id)
            raise
        except Exception as exc:
            _record_failure(
                ledger,
                evaluator,
                step,
                str(exc) if isinstance(exc, CheckpointInvalid) else f"{type(exc).__name__}: {exc}",
            )
            raise
        _record(ledger, evaluator, step, result, samples)
    finally:
        if presence is not None:
            presence.stop()
    print(summary_line(result))
    if run is not None and out_dir == run.eval_dir(cfg.evaluation.name):
        _point_best(cfg, run)
    print(f"results: {result_path}")
    return result_path


def _folder_id(path: Path) -> str:
    return f"{path.name}-{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]}"


def install_stop_handlers() -> None:
    signal.signal(signal.SIGINT, _raise_stop)
    signal.signal(signal.SIGTERM, _raise_stop)
