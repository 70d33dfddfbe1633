"""Evaluation metrics: pass@k, maj@k, failure kinds, breakdowns, learned/forgotten, on hand-made samples."""

from __future__ import annotations

import itertools
import math

import pytest

from evaluator.grader import extract_answer, vote_key
from evaluator.metrics import (
    breakdown_fields,
    changes,
    failure_kind,
    majority_at_k,
    pass_at_k,
    set_metrics,
)
from shared.config import reported_ks


def test_pass_at_k_is_the_unbiased_estimator():
    """Against brute force: the share of k-subsets of n samples (c right) holding at least one right one."""
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                samples = [1] * c + [0] * (n - c)
                subsets = list(itertools.combinations(range(n), k))
                brute = sum(any(samples[i] for i in sub) for sub in subsets) / len(subsets)
                assert math.isclose(pass_at_k(n, c, k), brute, abs_tol=1e-12), (n, c, k)


def test_reported_ks():
    assert reported_ks(1) == [1] and reported_ks(4) == [1, 2, 4] and reported_ks(6) == [1, 2, 4, 6]
    assert reported_ks(16) == [1, 2, 4, 8, 16]


def test_majority_votes_by_normalised_answer_and_splits_ties():
    # "1/2", "0.5" and "\frac{1}{2}" are one answer; it wins 3 to 1 against "3".
    votes = [vote_key(a) for a in ("\\frac{1}{2}", "0.5", "3", "1/2")]
    assert votes[0] == votes[1] == votes[3] != votes[2]
    assert majority_at_k(votes, [1.0, 1.0, 0.0, 1.0], 4) == 1.0
    assert majority_at_k(votes, [1.0, 1.0, 0.0, 1.0], 1) == 1.0  # the first sample alone
    # A 1-1 tie between a right and a wrong answer: expected accuracy of a random tie-break.
    assert majority_at_k(["a", "b"], [1.0, 0.0], 2) == 0.5
    # Samples without an answer do not vote; with no vote at all, the problem is wrong.
    assert majority_at_k([None, None, "7"], [0.0, 0.0, 1.0], 3) == 1.0
    assert majority_at_k([None, None], [0.0, 0.0], 2) == 0.0


@pytest.mark.parametrize(
    "reward, fmt, truncated, problem, vote, kind",
    [
        (1.0, 1.0, False, None, "3", None),
        (0.0, 0.0, True, None, None, "truncated"),
        (0.0, 0.0, False, None, None, "format"),
        (0.0, 1.0, False, "timeout", "3", "grader_timeout"),
        (0.0, 1.0, False, "error", "3", "grader_error"),
        (0.0, 1.0, False, None, None, "no_answer"),
        (0.0, 1.0, False, None, "4", "wrong"),
    ],
)
def test_failure_kinds(reward, fmt, truncated, problem, vote, kind):
    assert failure_kind(reward, fmt, truncated, problem, vote) == kind


def test_an_empty_answer_block_has_no_vote():
    assert extract_answer("x </think> <answer>  </answer>") is not None
    assert vote_key(extract_answer("x </think> <answer>  </answer>")) is None


def sample(problem, j, reward, *, fmt=1.0, truncated=False, tokens=10, vote="x", failure=None):
    return {
        "problem": problem,
        "sample": j,
        "reward": reward,
        "format_reward": fmt,
        "truncated": truncated,
        "num_tokens": tokens,
        "vote": vote,
        "failure": failure if reward != 1.0 else None,
    }


def test_set_metrics_on_known_samples():
    samples = [
        # problem 0: 2 of 4 right, majority "a" (right)
        sample(0, 0, 1.0, vote="a"),
        sample(0, 1, 1.0, vote="a"),
        sample(0, 2, 0.0, vote="b", failure="wrong"),
        sample(0, 3, 0.0, fmt=0.0, truncated=True, tokens=50, vote=None, failure="truncated"),
        # problem 1: 0 of 4 right, majority "c" (wrong)
        *[sample(1, j, 0.0, vote="c", failure="wrong") for j in range(4)],
        # problem 2: 4 of 4
        *[sample(2, j, 1.0, vote="d") for j in range(4)],
    ]
    fields = {0: {"level": 1, "subject": "Algebra"}, 1: {"level": 2, "subject": "Algebra"}, 2: {"level": 2}}
    m = set_metrics(samples, 4, fields, ["level", "subject"])
    assert m["accuracy"] == 6 / 12 and m["num_problems"] == 3 and m["n"] == 4
    assert m["pass@1"] == pytest.approx(6 / 12)
    assert m["pass@4"] == pytest.approx(2 / 3)
    assert m["pass@2"] == pytest.approx((1 - 1 / 6 + 0 + 1) / 3)  # problem 0: 1 - C(2,2)/C(4,2)
    assert m["maj@4"] == pytest.approx(2 / 3) and m["maj@1"] == pytest.approx(2 / 3)
    assert m["maj@2"] == pytest.approx(2 / 3)
    assert m["format_rate"] == 11 / 12 and m["truncation_rate"] == 1 / 12
    assert m["accuracy_truncated"] == 0.0 and m["accuracy_completed"] == 6 / 11
    assert m["mean_response_tokens"] == pytest.approx((11 * 10 + 50) / 12)
    assert m["failure_rate/wrong"] == 5 / 12 and m["failure_rate/truncated"] == 1 / 12
    assert m["failure_rate/format"] == 0.0
    assert m["accuracy_by/level/1"] == 0.5 and m["accuracy_by/level/2"] == 0.5
    assert m["accuracy_by/subject/Algebra"] == 2 / 8


def test_missing_samples_are_an_error_not_a_pass():
    """pass@4 of three wrong samples would read 1.0 (C(n-c, k) with n-c < k): a problem short of n samples,
    or with a sample index twice, is an error naming it."""
    samples = [*[sample(0, j, 1.0, vote="a") for j in range(4)], *[sample(1, j, 0.0, vote="b") for j in range(3)]]
    with pytest.raises(ValueError, match=r"problem 1: samples \[0, 1, 2\], expected 0..3"):
        set_metrics(samples, 4, {}, [])
    with pytest.raises(ValueError, match="problem 0"):
        set_metrics([sample(0, 0, 1.0), sample(0, 0, 1.0)], 2, {}, [])
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(3, 0, 4)


def test_breakdown_fields_are_chosen_by_their_values():
    fields = {i: {"subject": "AB"[i % 2], "level": i % 5, "unique_id": f"id{i}", "source": "x"} for i in range(20)}
    assert breakdown_fields(fields, None) == ["level", "subject"]  # ids: one per problem; source: one value
    assert breakdown_fields(fields, ["source"]) == ["source"]


def test_learned_and_forgotten():
    before = [sample(0, 0, 0.0), sample(0, 1, 0.0), sample(1, 0, 1.0), sample(1, 1, 1.0), sample(2, 0, 1.0)]
    after = [sample(0, 0, 1.0), sample(0, 1, 0.0), sample(1, 0, 0.0), sample(1, 1, 0.0), sample(3, 0, 1.0)]
    # problem 0: 0/2 -> 1/2 (solved: at least half); problem 1: 2/2 -> 0/2; 2 and 3 are not in both
    assert changes(before, after) == {"learned": [0], "forgotten": [1]}


def test_every_score_carries_a_seeded_interval_around_it():
    # problem p: p % 5 of its samples right ("r"), at positions that vary, the others split between two wrong
    # answers (exchangeable samples: maj@k's interval is over sample orders too)
    right = {p: {(p * 3 + i) % 4 for i in range(p % 5)} for p in range(20)}
    samples = [
        sample(p, j, float(j in right[p]), vote="r" if j in right[p] else str(j % 2))
        for p in range(20)
        for j in range(4)
    ]
    m = set_metrics(samples, 4, {}, [], num_resamples=500, seed=7)
    for name in ("accuracy", "pass@1", "pass@2", "pass@4", "maj@1", "maj@2", "maj@4"):
        assert m[f"{name}_ci_low"] <= m[name] <= m[f"{name}_ci_high"], name
        assert m[f"{name}_ci_low"] < m[f"{name}_ci_high"], name
    assert set_metrics(samples, 4, {}, [], num_resamples=500, seed=7) == m  # the same samples, the same interval
    assert "accuracy_ci_low" not in set_metrics(samples, 4, {}, [], num_resamples=0)


def test_accuracy_at_token_budget_by_hand():
    """Right within b tokens, else cut at b (truncated, wrong); at max_tokens it is the accuracy itself."""
    samples = [
        sample(0, 0, 1.0, tokens=100),
        sample(1, 0, 1.0, tokens=256),  # exactly at the budget: it would have ended there
        sample(2, 0, 1.0, tokens=300),
        sample(3, 0, 0.0, tokens=50, failure="wrong"),
        sample(4, 0, 0.0, fmt=0.0, truncated=True, tokens=512, vote=None, failure="truncated"),
    ]
    m = set_metrics(samples, 1, {}, [], token_budgets=[128, 256, 512])
    assert m["accuracy_at_budget/128"] == 1 / 5
    assert m["accuracy_at_budget/256"] == 2 / 5
    assert m["accuracy_at_budget/512"] == 3 / 5 == m["accuracy"]
    assert not any(k.startswith("accuracy_at_budget/") for k in set_metrics(samples, 1, {}, []))


def test_a_split_puts_each_problem_on_one_side_the_same_at_every_step():
    from evaluator.metrics import split_problems

    problems = list(range(101))
    select, heldout = split_problems(problems, 0.5, seed=3)
    assert not set(select) & set(heldout) and sorted(select + heldout) == problems
    assert len(select) == 50  # round(0.5 x 101)
    assert split_problems(reversed(problems), 0.5, seed=3) == (select, heldout)  # order-free
    assert split_problems(problems, 0.5, seed=4) != (select, heldout)  # seeded
    with pytest.raises(ValueError, match="at least 2 problems"):
        split_problems([7], 0.5, 0)


def test_split_metrics_score_each_part_on_its_own_problems():
    from evaluator.metrics import split_problems

    samples = [sample(p, 0, float(p % 2), vote=str(p % 2)) for p in range(40)]
    m = set_metrics(samples, 1, {}, [], select_fraction=0.25, seed=1, num_resamples=200)
    select, heldout = split_problems(range(40), 0.25, 1)
    assert m["select/num_problems"] == len(select) == 10 and m["heldout/num_problems"] == 30
    assert m["select/accuracy"] == sum(p % 2 for p in select) / 10
    assert m["heldout/accuracy"] == sum(p % 2 for p in heldout) / 30
    assert m["heldout/accuracy_ci_low"] <= m["heldout/accuracy"] <= m["heldout/accuracy_ci_high"]
    assert not any(k.startswith(("select/", "heldout/")) for k in set_metrics(samples, 1, {}, []))
