"""The study's confidence intervals (prm_ray/core/stats.py) against cases with a known answer."""

import math

import numpy as np
import pytest

from prm_ray.core.metrics import evaluate_problems, problem_values
from prm_ray.core.process import harmonic_mean
from prm_ray.core.stats import Bootstrap, percentile_interval


def test_bootstrap_of_a_mean_has_the_normal_width():
    # 1000 Bernoulli(0.7) problems: the mean's standard error is sqrt(p(1-p)/n), so the 95%
    # interval is about mean +- 1.96 x 0.0145.
    rng = np.random.default_rng(1)
    x = (rng.random(1000) < 0.7).astype(float)
    s = Bootstrap(1000, draws=4000, seed=3).summary(x, "row")
    se = math.sqrt(x.mean() * (1 - x.mean()) / len(x))
    lo, hi = s["interval"]
    assert s["mean"] == pytest.approx(x.mean()) and s["seeds"] == [pytest.approx(x.mean())]
    assert lo < s["mean"] < hi
    assert (hi - lo) / 2 == pytest.approx(1.96 * se, rel=0.1)
    assert (s["mean"] - lo) == pytest.approx(hi - s["mean"], rel=0.2)


def test_seed_resampling_of_two_seeds_has_a_known_distribution():
    # Two seeds whose every problem is 0 and 1: problem draws change nothing; a draw of two seeds
    # with replacement has mean 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4, so the 95% interval is [0, 1].
    v = np.stack([np.zeros(50), np.ones(50)])
    s = Bootstrap(50, draws=4000, seed=0).summary(v, "row")
    assert s["mean"] == 0.5 and s["seeds"] == [0.0, 1.0] and s["interval"] == [0.0, 1.0]
    draws = Bootstrap(50, draws=4000, seed=0)._resampled(v, "row", lambda x: x.mean(axis=-1))
    assert set(np.unique(draws)) == {0.0, 0.5, 1.0}
    assert np.mean(draws == 0.5) == pytest.approx(0.5, abs=0.03)


def test_seeds_are_aggregated_as_the_mean_of_their_means():
    rng = np.random.default_rng(0)
    v = rng.random((3, 40))
    s = Bootstrap(40, draws=500).summary(v, "r")
    assert s["seeds"] == pytest.approx(v.mean(axis=1).tolist())
    assert s["mean"] == pytest.approx(np.mean(v.mean(axis=1)))
    # Wider than any one seed's problem interval alone: the seeds differ.
    one = Bootstrap(40, draws=500).summary(v[0], "r")
    assert s["interval"][1] - s["interval"][0] > 0 and one["mean"] == pytest.approx(v[0].mean())


@pytest.mark.parametrize("seed", range(5))
def test_intervals_contain_the_mean(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 200))
    v = (rng.random((int(rng.integers(1, 5)), n)) < rng.random()).astype(float)
    s = Bootstrap(n, draws=300, seed=seed).summary(v, "x")
    assert s["interval"][0] <= s["mean"] <= s["interval"][1]


def test_paired_difference_ignores_what_both_share():
    # b is a shifted by exactly 0.1 on every problem: paired, the difference is 0.1 in every
    # draw, however much the problems themselves vary; the two unpaired intervals overlap.
    a = (np.random.default_rng(2).random(100) < 0.5).astype(float)
    boot = Bootstrap(100, draws=1000)
    d = boot.difference(a + 0.1, a, "b", "a")
    assert d["mean"] == pytest.approx(0.1) and d["interval"] == pytest.approx([0.1, 0.1])
    sa, sb = boot.summary(a, "a"), boot.summary(a + 0.1, "b")
    assert sb["interval"][0] < sa["interval"][1]
    # Identical rows: a difference of exactly zero.
    assert boot.difference(a, a, "a", "a")["interval"] == [0.0, 0.0]


def test_difference_of_seeded_rows_resamples_each_rows_seeds():
    # Row a: seeds at 0.6 and 0.8 on every problem; row b (one seed) 0.5. a - b in each draw is
    # the mean of two seeds drawn with replacement, minus 0.5: 0.1, 0.2 or 0.3.
    a = np.stack([np.full(20, 0.6), np.full(20, 0.8)])
    d = Bootstrap(20, draws=2000).difference(a, np.full(20, 0.5), "a", "b")
    assert d["mean"] == pytest.approx(0.2) and d["interval"] == pytest.approx([0.1, 0.3])


def test_the_same_draws_for_the_same_seed_and_other_draws_for_another():
    v = np.random.default_rng(0).random((2, 30))
    assert Bootstrap(30, seed=1).summary(v, "r") == Bootstrap(30, seed=1).summary(v, "r")
    assert Bootstrap(30, seed=1).summary(v, "r")["interval"] != Bootstrap(30, seed=2).summary(v, "r")["interval"]


def test_ratio_summary_matches_counts_and_handles_undefined():
    # 4 problems, per-problem counts of (hits, n) of two accuracies; F1 is their harmonic mean.
    hits_e, n_e = np.array([1, 0, 1, 1]), np.array([1, 1, 1, 1])
    hits_c, n_c = np.array([2, 1, 0, 1]), np.array([2, 2, 1, 1])

    def f1(t):
        ea = t["he"] / t["ne"] if t["ne"] else None
        ca = t["hc"] / t["nc"] if t["nc"] else None
        return harmonic_mean(ea, ca)

    boot = Bootstrap(4, draws=500)
    s = boot.ratio_summary({"he": hits_e, "ne": n_e, "hc": hits_c, "nc": n_c}, f1, "f1")
    assert s["mean"] == pytest.approx(harmonic_mean(3 / 4, 4 / 6))
    assert s["interval"][0] <= s["mean"] <= s["interval"][1]
    # A statistic undefined for one seed has no mean; its seed value is None.
    none = boot.ratio_summary({"he": np.stack([hits_e, hits_e]), "ne": np.stack([n_e, 0 * n_e]),
                               "hc": np.stack([hits_c, hits_c]), "nc": np.stack([n_c, n_c])}, f1, "f1b")
    assert none["mean"] is None and none["seeds"][1] is None and none["seeds"][0] == pytest.approx(s["mean"])


def test_shape_errors_name_the_row():
    with pytest.raises(ValueError, match="ce-k8"):
        Bootstrap(10).summary(np.zeros((2, 9)), "ce-k8")
    with pytest.raises(ValueError, match="level"):
        Bootstrap(10, level=1.0)


def test_percentile_interval():
    assert percentile_interval(np.arange(101), 0.9) == pytest.approx([5.0, 95.0])


def test_problem_values_average_to_evaluate_problems():
    rng = np.random.default_rng(0)
    problems = [{"correct": (rng.random(8) < 0.5).tolist(), "answers": [str(a) for a in rng.integers(0, 3, 8)],
                 "scores": rng.random(8).tolist()} for _ in range(6)]
    per = problem_values(problems, [1, 4, 8])
    assert all(len(v) == 6 for v in per.values())
    assert evaluate_problems(problems, [1, 4, 8]) == {k: pytest.approx(v.mean()) for k, v in per.items()}
    assert per["pass@1"].tolist() == [np.mean(p["correct"]) for p in problems]
    assert per["bon@8"].tolist() == [float(p["correct"][int(np.argmax(p["scores"]))]) for p in problems]
