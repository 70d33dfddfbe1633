"""Ranking: which evaluated steps are best, and the `best` link that points at the best one.

Invariants:
- Results are ranked only against results of the same problems, sampling and evaluation-config id
  (`comparable_as`): results under different evaluation configs measure different tests.
- With a split set (`select_fraction`), steps are ranked on the selection part only (`select/<metric>`).
- The `best` link is a symlink replaced by rename: a reader sees the old target or the new one.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock

from shared.protocol.layout import CHECKPOINTS_DIRNAME, TMP_PREFIX, RunLayout, step_dirname
from shared.protocol.manifest import ready_weights_ids

if TYPE_CHECKING:
    from shared.config import Config


RETENTION_LOCK_TIMEOUT_S = 5.0
"""How long retention (and pointing `best`) waits for the best lock and the ledger locks. A live process holds them for
milliseconds; one frozen inside them (SIGSTOP, a stalled disk) costs the trainer's writer at most this per save,
and retention is tried again at the next save."""


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


COMPARED_SAMPLING = ("n", "temperature", "top_p", "max_tokens", "stop", "select_fraction")
"""Sampling settings two results of a set must share to be compared (the seed aside: it only draws anew)."""


def comparable_as(set_result: dict[str, Any]) -> tuple:
    """What a set's result at one step must share with another step's for the two to be compared (ranked, or
    counted as learned/forgotten): the same problems (`problems_id`), the same COMPARED_SAMPLING and the same
    evaluation-config id (`eval_config_id`: these plus the prompt template, backend and grader version). After the
    evaluation config changes (more problems, longer max_tokens, another template), old results measure another
    test. A result without a config id (written before ids existed) compares only with others without one."""
    sampling = set_result.get("sampling", {})
    return (
        set_result.get("problems_id"),
        *(json.dumps(sampling.get(key)) for key in COMPARED_SAMPLING),
        set_result.get("eval_config_id"),
    )


def ranked_results(layout: RunLayout, eval_name: str, set_name: str, metric: str) -> list[list[tuple[float, int]]]:
    """The published steps whose result (for the weights now in their folder) has the metric, in groups of
    comparable results (`comparable_as`: the same problems, sampling and config), the group evaluated most recently
    first; in each group (metric value, step), best first, a later step first among equals. Results under
    different evaluation configs measure different tests: they are never ranked against each other."""
    groups: dict[tuple, list[tuple[float, int]]] = {}
    newest: dict[tuple, tuple[float, int]] = {}
    for step, weights in ready_weights_ids(layout.checkpoints_dir).items():
        try:
            result = json.loads(layout.result_path(eval_name, step).read_text())
            set_result = result["sets"][set_name]
            # With a split (select_fraction), rank on the selection part only: the held-out part stays honest.
            value = set_result["metrics"].get(f"select/{metric}", set_result["metrics"][metric])
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
    ranks or keep_best is off. The caller holds the best lock (retention also every ledger's), so two callers
    never interleave. Returns the groups."""
    groups = ranked_results(layout, best.eval_name, best.set_name, best.metric) if best else []
    link = layout.best_path
    if not groups:  # nothing evaluated holds the weights it names (or keep_best is off): no stale link
        if link.is_symlink():
            link.unlink()
        return groups
    target = Path(CHECKPOINTS_DIRNAME) / step_dirname(groups[0][0][1])
    if not (link.is_symlink() and Path(os.readlink(link)) == target):
        tmp = link.with_name(f"{TMP_PREFIX}best-{uuid.uuid4().hex[:8]}")
        os.symlink(target, tmp)
        os.replace(tmp, link)
    return groups


def update_best(layout: RunLayout, best: BestRule | None) -> int | None:
    """Point `best` anew (removed when `best` is None), under the best lock: the evaluator's call after
    recording a result, and retention's when it has nothing to delete. Returns the best step, if any."""
    layout.best_lock_path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(layout.best_lock_path), timeout=RETENTION_LOCK_TIMEOUT_S):
        groups = rank_and_point(layout, best)
    return groups[0][0][1] if groups else None
