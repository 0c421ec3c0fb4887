"""Best-of-N, (weighted) majority voting and pass@k over scored samples. Pure Python/NumPy.

Every function takes one problem's M samples: ``correct`` (bool per sample), ``answers`` (the
extracted final answer per sample, None when there was none) and ``scores`` (the PRM's
aggregated score per sample). :func:`evaluate_problems` averages them over problems for every N.

Ties (``ties``): ``expected`` (the default) never depends on sample order: best-of-N and voting
return the *expected* accuracy of a uniformly random pick among the tied candidates. ``first`` is
the released eval's rule: best-of-N takes the earliest of the tied samples, voting the answer seen
first (for a min-step-reward score ties are rare, for voting they are not).

Weighted voting weighs each sample by ``sigmoid(vote_coef * score)``; the caller decides what the
coefficient multiplies (:class:`prm_ray.stages.evaluate.EvaluateConfig` ``vote_on``).

Protocols for choosing N of M samples:

* ``first``: the first N samples (the paper's evaluation: BoN@N on the first N of 64);
* ``random``: the average over ``subsets`` seeded random N-subsets (lower variance). pass@N under
  this protocol is the exact expectation over all subsets, ``1 - C(M-c, N) / C(M, N)``.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

PROTOCOLS = ("first", "random")
TIES = ("expected", "first")
VOTE_ON = ("log_ratio", "score")
"""What the weighted-vote coefficient multiplies: the log-ratio (score / beta; the released eval)
or the beta-scaled score (:func:`score_coefficient`)."""


def best_of_n(scores: Sequence[float], correct: Sequence[bool], ties: str = "expected") -> float:
    """Accuracy of picking the highest-scoring sample (ties: see the module docstring)."""
    if len(scores) != len(correct) or not len(scores):
        raise ValueError(f"need as many scores as labels (>0), got {len(scores)} and {len(correct)}")
    s = np.asarray(scores, dtype=np.float64)
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    if ties == "first":
        return float(bool(correct[int(np.argmax(s))]))  # argmax: the first of the maxima
    best = s == s.max()
    return float(np.asarray(correct, dtype=np.float64)[best].mean())


def answer_totals(answers: Sequence[str | None], weights: Sequence[float]) -> dict[str, float]:
    """The summed weight of each answer, in first-seen order; samples without an answer do not vote."""
    totals: dict[str, float] = {}
    for a, w in zip(answers, weights):
        if a is None or a == "":
            continue
        totals[a] = totals.get(a, 0.0) + w
    return totals


def vote(answers: Sequence[str | None], correct: Sequence[bool], weights: Sequence[float] | None = None,
         ties: str = "expected") -> float:
    """Accuracy of the (weighted) majority answer. Samples without an answer do not vote; if no
    sample has one the vote is wrong (0). Ties: expected accuracy over the tied answers, or the
    first-seen of them (``ties="first"``)."""
    if len(answers) != len(correct):
        raise ValueError(f"{len(answers)} answers but {len(correct)} labels")
    totals = answer_totals(answers, [1.0] * len(answers) if weights is None else list(weights))
    if not totals:
        return 0.0
    right: dict[str, list[bool]] = defaultdict(list)
    for a, c in zip(answers, correct):
        if a in totals:
            right[a].append(bool(c))
    top = max(totals.values())
    # Relative tolerance: float sums of the same weights in different orders must still tie.
    winners = [a for a, t in totals.items() if math.isclose(t, top, rel_tol=1e-12, abs_tol=1e-15)]
    if ties == "first":
        winners = winners[:1]  # totals keep first-seen order
    # An answer string is correct or not as a whole; the mean guards against a verifier that is
    # not a function of the string alone.
    return float(np.mean([np.mean(right[a]) for a in winners]))


def sigmoid_weights(scores: Sequence[float], coef: float) -> np.ndarray:
    """Voting weights ``sigmoid(coef * score)`` (the paper's eval code uses coef = 0.001)."""
    return 1.0 / (1.0 + np.exp(-coef * np.asarray(scores, dtype=np.float64)))


def score_coefficient(vote_coef: float, vote_on: str, beta: float) -> float:
    """The coefficient on the score that puts ``vote_coef`` on what ``vote_on`` names: the released
    eval's ``sigmoid(0.001 * log-ratio)`` is ``sigmoid(0.001 / beta * score)`` for a score scaled by
    beta (1 for scores that are no scaled log-ratio)."""
    if vote_on not in VOTE_ON:
        raise ValueError(f"vote_on must be one of {VOTE_ON}, got {vote_on!r}")
    return vote_coef / beta if vote_on == "log_ratio" else vote_coef


def pass_at_k_exact(num_correct: int, m: int, k: int) -> float:
    """Unbiased pass@k from m samples with num_correct correct: 1 - C(m-c, k) / C(m, k)."""
    if not 0 < k <= m:
        raise ValueError(f"need 0 < k <= m, got k={k}, m={m}")
    if m - num_correct < k:
        return 1.0
    return 1.0 - math.comb(m - num_correct, k) / math.comb(m, k)


def problem_metrics(correct: Sequence[bool], answers: Sequence[str | None], scores: Sequence[float],
                    n: int, *, protocol: str = "first", subsets: int = 100, rng: random.Random | None = None,
                    vote_coef: float = 0.001, ties: str = "expected") -> dict[str, float]:
    """``pass@N``, ``majority@N``, ``bon@N``, ``weighted_mv@N`` of one problem for one N."""
    m = len(correct)
    if not (len(answers) == len(scores) == m):
        raise ValueError(f"one problem needs equal-length correct/answers/scores, got {m}, "
                         f"{len(answers)}, {len(scores)}")
    if not 0 < n <= m:
        raise ValueError(f"N={n} is outside 1..M={m}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
    weights = sigmoid_weights(scores, vote_coef)
    if protocol == "first" or n == m:
        picks = [list(range(n))]
    else:
        rng = rng or random.Random(0)
        picks = [rng.sample(range(m), n) for _ in range(subsets)]
    acc = defaultdict(float)
    for idx in picks:
        c = [correct[i] for i in idx]
        a = [answers[i] for i in idx]
        acc["majority"] += vote(a, c, ties=ties)
        acc["weighted_mv"] += vote(a, c, [weights[i] for i in idx], ties=ties)
        acc["bon"] += best_of_n([scores[i] for i in idx], c, ties=ties)
    out = {f"{k}@{n}": v / len(picks) for k, v in acc.items()}
    if protocol == "first":
        out[f"pass@{n}"] = float(any(correct[:n]))
    else:
        out[f"pass@{n}"] = pass_at_k_exact(sum(map(bool, correct)), m, n)
    return out


def default_ns(m: int) -> list[int]:
    """1, 2, 4, ... up to M (and M itself)."""
    ns, n = [], 1
    while n < m:
        ns.append(n)
        n *= 2
    return ns + [m]


def problem_values(problems: Sequence[dict], ns: Sequence[int] | None = None, *, protocol: str = "first",
                   subsets: int = 100, seed: int = 0, vote_coef: float = 0.001,
                   ties: str = "expected") -> dict[str, np.ndarray]:
    """Every metric of every problem: metric name -> one value per problem, in the order given.
    Each problem is a dict with equal-length lists ``correct``, ``answers``, ``scores`` (all
    problems must have the same M). The confidence intervals of a study resample these
    (:mod:`prm_ray.core.stats`); :func:`evaluate_problems` averages them.

    ``pass@1`` is the mean correctness of all M samples (unbiased); ``pass@1_first`` the first
    sample's correctness (the released eval's N = 1 number, noisier); then ``pass@N``,
    ``majority@N``, ``bon@N``, ``weighted_mv@N`` for every N, as fractions in [0, 1].
    """
    if not problems:
        raise ValueError("no problems to evaluate")
    sizes = {len(p["correct"]) for p in problems}
    if len(sizes) != 1:
        raise ValueError(f"every problem needs the same number of samples M, got {sorted(sizes)}")
    m = sizes.pop()
    ns = list(ns) if ns else default_ns(m)
    bad = [n for n in ns if not 0 < n <= m]
    if bad:
        raise ValueError(f"N values {bad} are outside 1..M={m}")
    keys = ["pass@1", "pass@1_first"] + [f"{kind}@{n}" for n in ns for kind in ("pass", "majority", "weighted_mv", "bon")
                                         if not (kind == "pass" and n == 1)]
    out = {k: np.zeros(len(problems)) for k in keys}
    for k, p in enumerate(problems):
        out["pass@1"][k] = float(np.mean(np.asarray(p["correct"], dtype=np.float64)))
        out["pass@1_first"][k] = float(bool(p["correct"][0]))
        rng = random.Random(f"{seed}:{k}")  # per problem: adding problems does not reshuffle others
        for n in ns:
            for key, v in problem_metrics(p["correct"], p["answers"], p["scores"], n, protocol=protocol,
                                          subsets=subsets, rng=rng, vote_coef=vote_coef, ties=ties).items():
                if key != "pass@1":  # pass@1 is the mean over all M samples, above
                    out[key][k] = v
    return out


def evaluate_problems(problems: Sequence[dict], ns: Sequence[int] | None = None, **kwargs) -> dict[str, float]:
    """The metrics of :func:`problem_values` averaged over the problems."""
    return {k: float(v.mean()) for k, v in problem_values(problems, ns, **kwargs).items()}
