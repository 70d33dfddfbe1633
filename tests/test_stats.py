"""Intervals and paired tests (evaluator/stats.py): closed forms, slow references on small cases, coverage."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from evaluator import stats
from evaluator.metrics import majority_at_k, pass_at_k


def test_degenerate_sets_have_zero_wide_intervals_at_their_value():
    assert stats.mean_interval([1.0] * 30, 1000, 0) == (1.0, 1.0)  # all right
    assert stats.mean_interval([0.0] * 30, 1000, 0) == (0.0, 0.0)  # all wrong
    assert stats.mean_interval([0.5], 1000, 0) == (0.5, 0.5)  # one problem, 2 of 4 right: nothing to redraw
    # maj@k of one problem whose order matters: 2 of 4 samples say the right "a", so maj@1 varies with the order
    votes, rewards = [["a", "a", "b", "c"]], [[1.0, 1.0, 0.0, 0.0]]
    assert stats.majority_interval(votes, rewards, 1, 1000, 0) == (0.0, 1.0)
    assert stats.majority_interval(votes, rewards, 4, 1000, 0) == (1.0, 1.0)  # all four: "a" wins whatever order


def binomial_quantile(num: int, p: float, q: float) -> int:
    total = 0.0
    for i in range(num + 1):
        total += math.comb(num, i) * p**i * (1 - p) ** (num - i)
        if total >= q:
            return i
    return num


def test_one_sample_accuracy_interval_is_the_binomial_one():
    """n = 1: a replicate's accuracy is Binomial(P, c/P) / P, so the percentile interval is its quantiles."""
    num, right = 40, 16
    low, high = stats.mean_interval([1.0] * right + [0.0] * (num - right), 20000, 3)
    assert abs(low - binomial_quantile(num, right / num, 0.025) / num) <= 1 / num
    assert abs(high - binomial_quantile(num, right / num, 0.975) / num) <= 1 / num
    assert (low, high) == stats.mean_interval([1.0] * right + [0.0] * (num - right), 20000, 3)  # seeded
    assert (stats.problem_draws(num, 10, 3) == stats.problem_draws(num, 10, 3)).all()
    assert (stats.problem_draws(num, 10, 3) != stats.problem_draws(num, 10, 4)).any()


def test_majority_replicates_against_a_slow_reference():
    """Each replicate, redone in plain Python with the same draws: majority_at_k on the reordered samples."""
    rng = random.Random(1)
    n, num_problems, num_resamples = 4, 7, 50
    votes = [[rng.choice(["1", "2", "3", None]) for _ in range(n)] for _ in range(num_problems)]
    rewards = [[1.0 if v == "1" else 0.0 for v in vs] for vs in votes]
    draws = stats.problem_draws(num_problems, num_resamples, 5)
    orders = stats.sample_orders(num_resamples, num_problems, n, 5)
    for k in (1, 2, 3, 4):
        fast = stats.majority_replicates(votes, rewards, k, num_resamples, 5)
        for b in range(num_resamples):
            slow = [
                majority_at_k([votes[p][j] for j in orders[b, i]], [rewards[p][j] for j in orders[b, i]], k)
                for i, p in enumerate(draws[b])
            ]
            assert fast[b] == pytest.approx(sum(slow) / num_problems), (k, b)


def test_mcnemar_exact_against_closed_forms():
    assert stats.mcnemar_exact_p(0, 0) == 1.0
    assert stats.mcnemar_exact_p(0, 5) == pytest.approx(2 / 2**5)
    assert stats.mcnemar_exact_p(5, 0) == stats.mcnemar_exact_p(0, 5)
    assert stats.mcnemar_exact_p(1, 9) == pytest.approx(2 * (1 + 10) / 2**10)
    assert stats.mcnemar_exact_p(3, 3) == 1.0  # capped


def test_paired_comparison_one_sample_uses_mcnemar_on_discordant_problems():
    before = [[1.0]] * 10 + [[0.0]] * 10 + [[1.0]] * 1 + [[0.0]] * 9
    after = [[1.0]] * 10 + [[0.0]] * 10 + [[0.0]] * 1 + [[1.0]] * 9
    result = stats.paired_comparison(before, after, 2000, 0)
    assert result.test == "exact McNemar" and result.num_problems == 30
    assert result.difference == pytest.approx(8 / 30)
    assert result.p_value == pytest.approx(stats.mcnemar_exact_p(1, 9)) and result.distinguishable
    assert result.low < 8 / 30 < result.high
    assert "distinguishable from noise" in result.verdict() and "not" not in result.verdict()
    same = stats.paired_comparison(before, before, 2000, 0)
    assert same.difference == 0 and same.p_value == 1.0 and (same.low, same.high) == (0.0, 0.0)
    assert "not distinguishable from noise" in same.verdict()
    with pytest.raises(ValueError, match="same problems"):
        stats.paired_comparison(before, after[:-1], 100, 0)


def test_paired_bootstrap_against_a_slow_reference():
    """n > 1: the interval and p-value, recomputed in plain Python from the same problem draws."""
    rng = random.Random(2)
    before = [[float(rng.random() < 0.4) for _ in range(4)] for _ in range(25)]
    after = [[float(rng.random() < 0.6) for _ in range(4)] for _ in range(25)]
    result = stats.paired_comparison(before, after, 400, 9)
    deltas = [sum(b) / 4 - sum(a) / 4 for a, b in zip(before, after, strict=True)]
    observed = sum(deltas) / len(deltas)
    replicates = [sum(deltas[p] for p in row) / len(deltas) for row in stats.problem_draws(25, 400, 9)]
    far = sum(abs(r - observed) >= abs(observed) - 1e-12 for r in replicates)
    assert result.test == "paired bootstrap" and result.difference == pytest.approx(observed)
    assert result.p_value == pytest.approx((1 + far) / 401)
    assert (result.low, result.high) == pytest.approx(tuple(np.quantile(replicates, [0.025, 0.975])))


@pytest.mark.parametrize("n", [1, 4])
def test_intervals_cover_the_truth_at_about_the_nominal_rate(n):
    """Problems with a uniform chance p of a right sample: accuracy's truth is 1/2, pass@k's 1 - 1/(k+1)
    (E[1 - (1-p)^k]). Over 300 seeded simulated evaluations of 80 problems, about 95 % of the intervals cover it
    (a biased redraw, e.g. samples drawn with replacement, covers pass@n far less)."""
    rng = np.random.default_rng(11)
    ks = [k for k in (1, 2, 4) if k <= n]
    covered = {"accuracy": 0, **{f"pass@{k}": 0 for k in ks}}
    repetitions = 300
    for rep in range(repetitions):
        p = rng.random(80)
        right = (rng.random((80, n)) < p[:, None]).sum(axis=1)
        low, high = stats.mean_interval(right / n, 400, rep)
        covered["accuracy"] += low <= 0.5 <= high
        for k in ks:
            low, high = stats.mean_interval([pass_at_k(n, int(c), k) for c in right], 400, rep)
            covered[f"pass@{k}"] += low <= 1 - 1 / (k + 1) <= high
    for name, count in covered.items():
        assert 0.91 <= count / repetitions <= 0.985, (name, count / repetitions)
