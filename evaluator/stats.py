"""How far an evaluation number can be trusted: seeded bootstrap intervals over problems, the paired comparison
of two checkpoints on the same problems, McNemar's exact test.

Resampling: each bootstrap replicate draws the problems with replacement and, within each drawn problem, its n
samples again in a random order (without replacement). Order-free statistics (accuracy = mean@n, pass@k) are
unchanged by the order, so for them the replicate is a draw of problems; maj@k of the first k samples depends
on the order, and the order is part of its noise. Drawing the samples *with* replacement would count the
within-problem noise twice and bias pass@k downwards (pass@n of a problem with 2 right of 4 is 1, of a redraw
with no right sample 0). The interval is the percentile interval of the replicates: seeded, so the same samples
and seed give the same interval; zero-wide when every problem scores the same (all right, all wrong, one problem).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
"""Coverage of every interval the evaluator reports."""

NOISE_P = 0.05
"""A paired difference with a p-value at or above this is "not distinguishable from noise"."""

_CHUNK = 64
"""Replicates computed at once for maj@k (memory: chunk x problems x k x n booleans)."""


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(np.random.PCG64(seed))


def problem_draws(num_problems: int, num_resamples: int, seed: int) -> np.ndarray:
    """[num_resamples, num_problems] problem indices drawn with replacement; the same for the same seed."""
    return _rng(seed).integers(0, num_problems, size=(num_resamples, num_problems))


def sample_orders(num_resamples: int, num_problems: int, n: int, seed: int) -> np.ndarray:
    """[num_resamples, num_problems, n]: a random order of the n samples of each drawn problem."""
    return np.argsort(_rng(seed + 1).random((num_resamples, num_problems, n)), axis=2)


def percentile_interval(replicates: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    tail = (1 - confidence) / 2
    low, high = np.quantile(replicates, [tail, 1 - tail])
    return float(low), float(high)


def mean_interval(
    per_problem: Sequence[float], num_resamples: int, seed: int, confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """Interval of the mean of an order-free per-problem score (a problem's accuracy, its pass@k estimate)."""
    values = np.asarray(per_problem, dtype=np.float64)
    draws = problem_draws(len(values), num_resamples, seed)
    return percentile_interval(values[draws].mean(axis=1), confidence)


def _vote_codes(votes: list[list[str | None]], rewards: list[list[float]]) -> tuple[np.ndarray, np.ndarray]:
    """Per problem, each sample's answer as the index of the first sample giving it (-1: no answer), and
    whether the answer of code c is right (a sample giving it was graded right, as in `majority_at_k`)."""
    num_problems, n = len(votes), len(votes[0])
    codes = np.full((num_problems, n), -1, dtype=np.int64)
    right = np.zeros((num_problems, n), dtype=bool)
    for p, (vs, rs) in enumerate(zip(votes, rewards, strict=True)):
        first: dict[str, int] = {}
        for j, (v, r) in enumerate(zip(vs, rs, strict=True)):
            if v is None:
                continue
            code = first.setdefault(v, j)
            codes[p, j] = code
            right[p, code] |= r == 1.0
    return codes, right


def majority_replicates(
    votes: list[list[str | None]], rewards: list[list[float]], k: int, num_resamples: int, seed: int
) -> np.ndarray:
    """maj@k of each bootstrap replicate (problems drawn, samples reordered); ties count the right share."""
    codes, right = _vote_codes(votes, rewards)
    num_problems, n = codes.shape
    draws = problem_draws(num_problems, num_resamples, seed)
    orders = sample_orders(num_resamples, num_problems, n, seed)
    out = np.empty(num_resamples)
    for start in range(0, num_resamples, _CHUNK):
        d, o = draws[start : start + _CHUNK], orders[start : start + _CHUNK, :, :k]
        chosen = codes[d[..., None], o]  # [chunk, problems, k]
        counts = (chosen[..., None] == np.arange(n)).sum(axis=2)  # votes per answer code
        top = counts.max(axis=2, keepdims=True)
        winners = (counts == top) & (top > 0)
        right_winners = (winners & right[d]).sum(axis=2)
        out[start : start + _CHUNK] = (right_winners / np.maximum(winners.sum(axis=2), 1)).mean(axis=1)
    return out


def majority_interval(
    votes: list[list[str | None]],
    rewards: list[list[float]],
    k: int,
    num_resamples: int,
    seed: int,
    confidence: float = CONFIDENCE,
) -> tuple[float, float]:
    return percentile_interval(majority_replicates(votes, rewards, k, num_resamples, seed), confidence)


def mcnemar_exact_p(before_only: int, after_only: int) -> float:
    """Two-sided exact McNemar p-value: of the problems solved at one checkpoint only, `before_only` at the
    first and `after_only` at the second; under no change each is a fair coin's side."""
    discordant = before_only + after_only
    if discordant == 0:
        return 1.0
    tail = sum(math.comb(discordant, i) for i in range(min(before_only, after_only) + 1)) / 2**discordant
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class PairedComparison:
    """A checkpoint's accuracy minus another's on the same problems."""

    difference: float
    low: float
    high: float
    p_value: float
    test: str
    num_problems: int

    @property
    def distinguishable(self) -> bool:
        return self.p_value < NOISE_P

    def verdict(self) -> str:
        """One sentence: the difference, its interval, the p-value and whether it stands out of the noise."""
        words = "distinguishable from noise" if self.distinguishable else "not distinguishable from noise"
        return (
            f"accuracy {100 * self.difference:+.1f} points ({CONFIDENCE:.0%} interval {100 * self.low:+.1f} to "
            f"{100 * self.high:+.1f}), p = {self.p_value:.3g} ({self.test}, {self.num_problems} problems): "
            f"{words} at the {NOISE_P:g} level"
        )


def paired_comparison(
    before: Sequence[Sequence[float]], after: Sequence[Sequence[float]], num_resamples: int, seed: int
) -> PairedComparison:
    """`after` minus `before`: each a list, per problem (the same problems in the same order), of its samples'
    rewards. The interval is a paired bootstrap over problems; the p-value McNemar's exact test for one sample a
    problem, else the paired bootstrap's (the share of centred replicates at least as far from 0 as observed)."""
    if len(before) != len(after) or not before:
        raise ValueError(f"paired comparison needs the same problems on both sides ({len(before)} vs {len(after)})")
    a = np.array([np.mean(rs) for rs in before])
    b = np.array([np.mean(rs) for rs in after])
    deltas = b - a
    observed = float(deltas.mean())
    replicates = deltas[problem_draws(len(deltas), num_resamples, seed)].mean(axis=1)
    low, high = percentile_interval(replicates)
    if all(len(rs) == 1 for rs in (*before, *after)):
        p_value = mcnemar_exact_p(int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum()))
        test = "exact McNemar"
    else:
        far = np.abs(replicates - observed) >= abs(observed) - 1e-12
        p_value = float((1 + far.sum()) / (1 + num_resamples))
        test = "paired bootstrap"
    return PairedComparison(observed, low, high, min(1.0, p_value), test, len(deltas))
