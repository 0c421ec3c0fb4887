"""Best-of-N, voting and pass@k against hand-made score tables with known answers."""

import math
import random

import pytest

from prm_ray.core.metrics import (
    best_of_n,
    default_ns,
    evaluate_problems,
    pass_at_k_exact,
    problem_metrics,
    sigmoid_weights,
    vote,
)


def test_best_of_n_picks_the_top_score_and_averages_ties():
    assert best_of_n([0.1, 0.9, 0.5], [False, True, False]) == 1.0
    assert best_of_n([0.9, 0.1], [False, True]) == 0.0
    # Three-way tie at the top, one of them right: expected accuracy 1/3, not "the first one".
    assert best_of_n([1.0, 1.0, 0.0, 1.0], [True, False, True, False]) == pytest.approx(1 / 3)
    assert best_of_n([-2.0], [True]) == 1.0  # N = 1
    with pytest.raises(ValueError, match="NaN"):
        best_of_n([float("nan"), 1.0], [True, False])
    with pytest.raises(ValueError):
        best_of_n([], [])


def test_vote_counts_answers_and_ignores_missing_ones():
    assert vote(["3", "3", "5"], [True, True, False]) == 1.0
    assert vote(["3", "5", "5"], [True, False, False]) == 0.0
    assert vote([None, None, "7"], [False, False, True]) == 1.0  # no answer: no vote
    assert vote([None, ""], [False, False]) == 0.0  # nobody answered: wrong
    assert vote(["1", "2"], [True, False]) == 0.5  # tie between answers: expected accuracy
    # Weights change the winner: one confident right answer beats two unsure wrong ones.
    assert vote(["1", "2", "2"], [True, False, False], [0.9, 0.4, 0.4]) == 1.0
    assert vote(["1", "2", "2"], [True, False, False], [1.0, 0.5, 0.5]) == 0.5  # exact tie


def test_weighted_vote_with_tiny_coefficient_is_majority_with_score_tie_breaks():
    w = sigmoid_weights([10.0, -10.0, 5.0, 5.0], 0.001)
    assert all(0.49 < x < 0.51 for x in w)
    # 2 vs 2 votes: plain majority is a coin flip, the scores break the tie.
    answers, correct = ["a", "a", "b", "b"], [True, True, False, False]
    assert vote(answers, correct) == 0.5
    assert vote(answers, correct, sigmoid_weights([10.0, 1.0, -10.0, -1.0], 0.001)) == 1.0


def test_pass_at_k_exact_matches_brute_force():
    m, c = 6, 2
    labels = [True] * c + [False] * (m - c)
    import itertools

    for k in range(1, m + 1):
        subsets = list(itertools.combinations(range(m), k))
        brute = sum(any(labels[i] for i in s) for s in subsets) / len(subsets)
        assert pass_at_k_exact(c, m, k) == pytest.approx(brute)
    assert pass_at_k_exact(0, 4, 4) == 0.0
    assert pass_at_k_exact(4, 4, 1) == 1.0


def test_first_protocol_uses_the_first_n_samples():
    correct = [False, False, True, True]
    answers = ["1", "1", "2", "2"]
    scores = [0.0, 0.1, 0.9, 0.8]
    m1 = problem_metrics(correct, answers, scores, 1)
    assert m1 == {"majority@1": 0.0, "weighted_mv@1": 0.0, "bon@1": 0.0, "pass@1": 0.0}
    m2 = problem_metrics(correct, answers, scores, 2)
    assert m2["pass@2"] == 0.0 and m2["bon@2"] == 0.0
    m4 = problem_metrics(correct, answers, scores, 4)  # N = M
    assert m4 == {"majority@4": 0.5, "weighted_mv@4": 1.0, "bon@4": 1.0, "pass@4": 1.0}


def test_random_protocol_averages_subsets_and_is_seeded():
    correct = [True, False, False, False]
    answers = ["1", "2", "3", "4"]
    scores = [1.0, 0.0, 0.0, 0.0]
    a = problem_metrics(correct, answers, scores, 2, protocol="random", subsets=2000, rng=random.Random(1))
    b = problem_metrics(correct, answers, scores, 2, protocol="random", subsets=2000, rng=random.Random(1))
    assert a == b
    assert a["pass@2"] == pytest.approx(0.5)  # exact: 1 - C(3,2)/C(4,2)
    assert a["bon@2"] == pytest.approx(0.5, abs=0.05)  # best picks the right one whenever present
    assert a["majority@2"] == pytest.approx(0.25, abs=0.05)  # two distinct answers: a coin flip
    # N = M has one subset: identical to `first`.
    assert problem_metrics(correct, answers, scores, 4, protocol="random") == problem_metrics(
        correct, answers, scores, 4)


def test_all_right_and_all_wrong_problems():
    right = {"correct": [True] * 4, "answers": ["5"] * 4, "scores": [0.3, -1.0, 2.0, 0.0]}
    wrong = {"correct": [False] * 4, "answers": ["1", "2", "1", None], "scores": [5.0, 1.0, 2.0, 0.0]}
    out = evaluate_problems([right, wrong])
    assert out["pass@1"] == 0.5
    for n in (1, 2, 4):
        for kind in ("majority", "weighted_mv", "bon"):
            assert out[f"{kind}@{n}"] == 0.5
        if n > 1:
            assert out[f"pass@{n}"] == 0.5
    assert "pass@1" in out and sorted(k for k in out if k.startswith("bon")) == ["bon@1", "bon@2", "bon@4"]


def test_evaluate_problems_averages_over_problems_and_validates():
    p1 = {"correct": [False, True], "answers": ["1", "2"], "scores": [0.0, 1.0]}
    p2 = {"correct": [True, False], "answers": ["2", "1"], "scores": [0.0, 1.0]}
    out = evaluate_problems([p1, p2], ns=[1, 2])
    assert out["pass@1"] == 0.5
    assert out["bon@1"] == 0.5 and out["bon@2"] == 0.5
    assert out["pass@2"] == 1.0
    assert out["majority@2"] == 0.5
    assert default_ns(64) == [1, 2, 4, 8, 16, 32, 64]
    assert default_ns(6) == [1, 2, 4, 6]
    with pytest.raises(ValueError, match="same number of samples"):
        evaluate_problems([p1, {"correct": [True], "answers": ["1"], "scores": [0.0]}])
    with pytest.raises(ValueError, match="outside"):
        evaluate_problems([p1], ns=[3])
    with pytest.raises(ValueError, match="no problems"):
        evaluate_problems([])
    assert math.isfinite(out["weighted_mv@2"])


def test_first_tie_rule_is_the_released_eval_s():
    # best-of-N: the earliest of the tied samples, not the expectation over them
    assert best_of_n([1.0, 1.0, 0.0], [False, True, True], ties="first") == 0.0
    assert best_of_n([0.0, 1.0, 1.0], [False, True, False], ties="first") == 1.0
    # voting: the answer seen first among the tied
    assert vote(["1", "2"], [False, True], ties="first") == 0.0
    assert vote(["2", "1", "1", "2"], [True, False, False, True], ties="first") == 1.0
    m = problem_metrics([False, True], ["1", "2"], [0.5, 0.5], 2, ties="first")
    assert m == {"majority@2": 0.0, "weighted_mv@2": 0.0, "bon@2": 0.0, "pass@2": 1.0}
    with pytest.raises(ValueError, match="ties"):
        problem_metrics([True], ["1"], [0.0], 1, ties="last")


def test_pass_at_1_is_reported_both_ways():
    """pass@1: the mean over all M samples (unbiased); pass@1_first: the first sample only (the
    released eval's N = 1 number)."""
    p1 = {"correct": [False, True, True, True], "answers": ["1"] * 4, "scores": [0.0] * 4}
    p2 = {"correct": [True, False, False, False], "answers": ["1"] * 4, "scores": [0.0] * 4}
    out = evaluate_problems([p1, p2], ns=[1])
    assert out["pass@1"] == 0.5 and out["pass@1_first"] == 0.5
    out = evaluate_problems([p1, p1], ns=[1])
    assert out["pass@1"] == 0.75 and out["pass@1_first"] == 0.0
