"""Evaluating one checkpoint: load it, generate each set's samples, grade them, compute the metrics.

Invariants:
- A request's sampling seed depends on what it samples (set, problem, sample), never on what ran before.
- The engine runs the weights it was given: after an in-place reload the output fingerprint must move when the
  weights did, else the engine is rebuilt.
- Every result names its evaluation-config id (`eval_config_id`): the problems, compared sampling, prompt template,
  backend and grader it was measured with. Results are compared only with results of the same id.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from tqdm import tqdm

from evaluator import audit
from evaluator.backends import Generation
from evaluator.grader import GraderError, GraderPool, extract_answer, grader_version, vote_key
from evaluator.metrics import breakdown_fields, changes, failure_kind, read_samples, set_metrics
from shared.config import Config, EvalSetConfig, reported_budgets
from shared.data import Example, load_dataset, load_prompt_template, render_prompt, seeded_subset
from shared.protocol import COMPARED_SAMPLING, comparable_as, current_owner, result_file, result_steps, samples_file

log = logging.getLogger(__name__)

_FAULT_GRADER_START_ENV = "MATH_SFT_FAULT_GRADER_START_FAILS"
"""Tests: N, this process's first N gradings fail as when the pool's workers cannot start (GraderError, a transient
failure: the pool is started anew for the next attempt)."""

Progress = Callable[[str], None]
"""Told what advanced (e.g. "step 4 main generate"), each time generation or grading advances."""


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

    def sampling(self, seed: int) -> dict[str, Any]:
        sc = self.cfg
        return {
            "n": sc.n,
            "temperature": sc.temperature,
            "top_p": sc.top_p,
            "max_tokens": sc.max_tokens,
            "stop": sc.stop,
            "seed": seed,
            "select_fraction": sc.select_fraction,
        }


def load_eval_sets(cfg: Config) -> tuple[str, list[EvalSet]]:
    """(the prompt template's text, the sets)."""
    template = load_prompt_template(cfg.prompt_template_path())
    sets = []
    for set_cfg in cfg.evaluation.eval_sets():
        examples = seeded_subset(load_dataset(set_cfg.data), set_cfg.num_samples, cfg.evaluation.seed)
        sets.append(EvalSet(set_cfg, examples, [render_prompt(template, ex) for ex in examples]))
    return template, sets


def eval_config_id(sets: list[EvalSet], seed: int, template: str, backend_name: str) -> str:
    """What a result was measured with: per set its problems and COMPARED_SAMPLING, the prompt template's text,
    the backend and the grader version (16 hex digits). A step evaluated under another id is not yet evaluated."""
    what = {
        "sets": [[es.name, es.problems_id, [es.sampling(seed)[key] for key in COMPARED_SAMPLING]] for es in sets],
        "template": template,
        "backend": backend_name,
        "grader": grader_version(),
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def previous_samples(eval_dir: Path, set_result: dict[str, Any]) -> tuple[int, list[dict[str, Any]]] | None:
    """(step, samples) of the nearest earlier step of this set with results on disk for the same problems,
    sampling and config (`comparable_as`), if any. A samples file that cannot be read is named in a warning and
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
            log.warning("%s: not used to count learned/forgotten problems: %s", path, exc)
    return None


def _sample_record(ex: Example, prompt: str, j: int, g: Generation, r: dict[str, Any], problem: str | None) -> dict:
    answer = extract_answer(g.text)
    vote = vote_key(answer) if answer is not None else None
    return {
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


def _table_row(s: dict[str, Any]) -> list[Any]:
    """One sample as a row of the W&B samples table."""
    what = [s["problem"], s["sample"], s["prompt"][-300:], s["response"], s["ground_truth"], s["answer"]]
    return [*what, s["reward"], s["format_reward"], s["failure"] or "right"]


def _with_progress(bar: tqdm, progress: Progress | None, what: str) -> Callable[[int], None]:
    def advance(k: int) -> None:
        bar.update(k)
        if progress is not None:
            progress(what)

    return advance


class Evaluator:
    def __init__(self, cfg: Config, backend, tracker):
        self.cfg = cfg
        self.backend = backend
        self.tracker = tracker
        template, self.sets = load_eval_sets(cfg)
        for es in self.sets:  # what a set inherited from the section is visible before any result
            sc = es.cfg
            log.info(
                "evaluation set %s: %d problems x %d sample%s, temperature %g, top_p %g, max_tokens %d (%s); "
                "accuracy by %s",
                *(sc.name, len(es.examples), sc.n, "s" if sc.n > 1 else "", sc.temperature, sc.top_p, sc.max_tokens),
                *(sc.data.path, ", ".join(es.breakdown) or "no field"),
            )
        self.template = template
        self.grader: GraderPool | None = None
        self.gradings = 0
        self._grader_pool()
        self.owner_id = current_owner()["id"]  # who claims steps and records results: this process
        self.last_fingerprint: list[float] | None = None
        self.last_weights_id: str | None = None

    @cached_property
    def config_id(self) -> str:
        return eval_config_id(self.sets, self.cfg.evaluation.seed, self.template, self.backend.name)

    def close(self) -> None:
        if self.grader is not None:
            self.grader.close()
        self.backend.close()

    def _grader_pool(self) -> GraderPool:
        """The grader pool: started with the evaluator, and again after one failed (GraderError)."""
        if self.grader is None:
            ec = self.cfg.evaluation
            self.grader = GraderPool(ec.num_grader_workers, ec.grader_timeout_s)
        return self.grader

    def _grade(self, responses: list[str], answers: list, advance: Callable[[int], None]):
        try:
            self.gradings += 1
            if self.gradings <= int(os.environ.get(_FAULT_GRADER_START_ENV, "0") or 0):
                raise GraderError(f"grader workers failed to start ({_FAULT_GRADER_START_ENV})")
            return self._grader_pool().grade(responses, answers, advance)
        except GraderError:
            if self.grader is not None:  # its workers may be half gone: the next attempt starts a new pool
                self.grader.close()
                self.grader = None
            raise

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
            log.warning(
                "%s: outputs unchanged after an in-place reload of different weights; rebuilding the engine", ckpt_dir
            )
            self.backend.close()
            how = self.backend.load(ckpt_dir)
            fingerprint = self.backend.fingerprint(probe)
        self.last_fingerprint, self.last_weights_id = fingerprint, weights_id
        return how, time.perf_counter() - t0

    def evaluate(
        self, step: int, ckpt_dir: Path, weights_id: str, eval_dir: Path, progress: Progress | None = None
    ) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
        """Every set on this checkpoint, with one weight load: (result, samples by set). Learned and
        forgotten problems are counted against the nearest earlier step with results in `eval_dir`."""
        ec = self.cfg.evaluation
        t_start = time.perf_counter()
        how, reload_s = self._load_checked(ckpt_dir, weights_id)
        results, samples = {}, {}
        for eval_set in self.sets:
            results[eval_set.name], samples[eval_set.name] = self._evaluate_set(step, eval_set, eval_dir, progress)
        generate_s = sum(r["timings_s"]["generation"] for r in results.values())
        result = {
            "step": step,
            "checkpoint": str(ckpt_dir),
            "weights_id": weights_id,
            "eval_config_id": self.config_id,
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

    def _generate_and_grade(
        self, step: int, eval_set: EvalSet, progress: Progress | None
    ) -> tuple[list[dict[str, Any]], float, float, int]:
        """(samples, generation s, grading s, generated tokens) of one set."""
        sc, seed = eval_set.cfg, self.cfg.evaluation.seed
        # n requests per problem, each with its own seed: the samples depend on the set's requests, not on history.
        requests = [
            (ex, prompt, j) for ex, prompt in zip(eval_set.examples, eval_set.prompts, strict=True) for j in range(sc.n)
        ]
        prompts = [prompt for _, prompt, _ in requests]
        seeds = [request_seed(seed, sc.name, ex.index, j) for ex, _, j in requests]
        desc = f"step {step} {sc.name}"
        t0 = time.perf_counter()
        with tqdm(total=len(prompts), desc=f"{desc} generate", leave=False, dynamic_ncols=True) as bar:
            generations = self.backend.generate(prompts, seeds, sc, _with_progress(bar, progress, f"{desc} generate"))
        generate_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        with tqdm(total=len(prompts), desc=f"{desc} grade", leave=False, dynamic_ncols=True) as bar:
            rewards, problems = self._grade(
                [g.text for g in generations],
                [ex.answer for ex, _, _ in requests],
                _with_progress(bar, progress, f"{desc} grade"),
            )
        grade_s = time.perf_counter() - t0
        samples = [
            _sample_record(ex, prompt, j, g, r, problem)
            for (ex, prompt, j), g, r, problem in zip(requests, generations, rewards, problems, strict=True)
        ]
        return samples, generate_s, grade_s, sum(g.num_tokens for g in generations)

    def _evaluate_set(
        self, step: int, eval_set: EvalSet, eval_dir: Path, progress: Progress | None = None
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        sc, ec = eval_set.cfg, self.cfg.evaluation
        samples, generate_s, grade_s, generated_tokens = self._generate_and_grade(step, eval_set, progress)
        metrics = set_metrics(
            samples,
            sc.n,
            eval_set.fields_by_problem,
            eval_set.breakdown,
            token_budgets=reported_budgets(sc.max_tokens, ec.token_budgets),
            num_resamples=ec.ci_num_resamples,
            seed=ec.seed,
            select_fraction=sc.select_fraction,
        )
        if metrics["grader_timeouts"] or metrics["grader_errors"]:
            log.warning(
                "step %d, set %s: the grader timed out on %d and failed on %d of %d samples (timeouts after a "
                "retry); they count as wrong (failure kinds grader_timeout, grader_error)",
                *(step, sc.name, metrics["grader_timeouts"], metrics["grader_errors"], len(samples)),
            )
        set_result = {
            "step": step,
            "set": sc.name,
            "data": sc.data.path,
            "problems_id": eval_set.problems_id,
            "sampling": eval_set.sampling(ec.seed),
            "eval_config_id": self.config_id,
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

    # -- W&B ---------------------------------------------------------------------------------------

    def log(self, result: dict[str, Any], samples: dict[str, list[dict[str, Any]]] | None) -> None:
        """One W&B row of the step's metrics, then per set its samples, disagreements and flips tables."""
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

    def log_average(self, result: dict[str, Any]) -> None:
        """One W&B row of an averaged checkpoint's metrics, under avg_last_<k>/ (its train_step is the newest
        step averaged; the eval/ keys stay the trained steps'). Logged once when evaluated, not taken over after a
        crash: at most once, while its result file stays on disk."""
        if self.tracker is None:
            return
        prefix = f"avg_last_{result['average']['last']}"
        row: dict[str, Any] = {"train_step": result["step"], f"{prefix}/weights_id": result["weights_id"]}
        for name, set_result in result["sets"].items():
            row.update({f"{prefix}/{name}/{k}": v for k, v in set_result["metrics"].items() if v is not None})
        self.tracker.log(row)

    def _log_tables(self, step: int, name: str, set_result: dict[str, Any], samples: list[dict[str, Any]]) -> None:
        num_rows = self.cfg.evaluation.num_logged_samples
        rows = [_table_row(s) for s in samples[:num_rows]]
        columns = ["problem", "sample", "prompt (end)", "response", "reference answer", "answer"]
        self.tracker.log_table(f"eval/{name}/samples", [*columns, "reward", "format_reward", "failure"], rows, step)
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
        columns = ["problem", "change", "since step", "reference answer", "response now"]
        self.tracker.log_table(f"eval/{name}/flips", columns, flip_rows, step)


def summary_line(result: dict[str, Any]) -> str:
    t = result["timings_s"]
    parts = []
    for name, r in result["sets"].items():
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
