"""Step-level metrics: does a PRM's lowest step reward point at the first wrong step? Pure Python/NumPy.

The protocol is ProcessBench's (Zheng et al., 2024). Each response has its step rewards and the
index of its first wrong step (``-1``: every step is right). A PRM *predicts* the first step whose
reward falls below a threshold ``tau`` (strictly: a reward equal to ``tau`` is not an error), or
"no error":

* ``error_accuracy``: the share of responses with an error whose first error is predicted exactly;
* ``correct_accuracy``: the share of error-free responses predicted "no error";
* ``f1``: their harmonic mean.

``tau`` is chosen on held-out data (:func:`choose_threshold`, the validation split) and then fixed.
``step_auc`` needs no threshold: the probability that a right step before a response's first error
gets a higher reward than a first wrong step (pooled over responses, ties count one half).

Every response's prediction is a step function of ``tau``: with prefix minima
``m_k = min(r_0..r_k)`` it predicts step ``e`` exactly when ``m_e < tau <= m_{e-1}`` and "no
error" when ``tau <= m_{S-1}``. So each response is right on one interval of ``tau``, and the
accuracies at every threshold come from sorting interval ends (:func:`threshold_curve`), not from
re-scoring per candidate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["choose_threshold", "first_below", "harmonic_mean", "process_metrics", "step_auc", "threshold_curve"]


def _check(rewards: Sequence[Sequence[float]], first_error: Sequence[int]) -> None:
    if len(rewards) != len(first_error):
        raise ValueError(f"{len(rewards)} responses' rewards but {len(first_error)} first-error labels")
    for i, (r, e) in enumerate(zip(rewards, first_error)):
        if not len(r):
            raise ValueError(f"response {i} has no steps")
        if not -1 <= e < len(r):
            raise ValueError(f"response {i}: first error {e} is outside its {len(r)} steps (-1 = none)")
        if any(math.isnan(x) for x in r):
            raise ValueError(f"response {i}: a step reward is NaN")


def first_below(rewards: Sequence[float], threshold: float) -> int:
    """The predicted first wrong step: the first step whose reward is below ``threshold``; -1 if none."""
    return next((k for k, r in enumerate(rewards) if r < threshold), -1)


def harmonic_mean(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def process_metrics(rewards: Sequence[Sequence[float]], first_error: Sequence[int], threshold: float) -> dict:
    """ProcessBench's accuracies and F1 at ``threshold``, with the counts behind them (an accuracy
    over no responses is None, and then so is ``f1``)."""
    _check(rewards, first_error)
    pred = [first_below(r, threshold) for r in rewards]
    err = [(p, e) for p, e in zip(pred, first_error) if e >= 0]
    ok = [p for p, e in zip(pred, first_error) if e < 0]
    err_hits, ok_hits = sum(p == e for p, e in err), sum(p == -1 for p in ok)
    err_acc = err_hits / len(err) if err else None
    ok_acc = ok_hits / len(ok) if ok else None
    return {"f1": harmonic_mean(err_acc, ok_acc), "error_accuracy": err_acc, "correct_accuracy": ok_acc,
            "threshold": threshold, "with_error": len(err), "error_found": err_hits,
            "predicted_early": sum(0 <= p < e for p, e in err), "predicted_late": sum(p > e or p == -1 for p, e in err),
            "without_error": len(ok), "no_error_found": ok_hits}


def _intervals(rewards: Sequence[Sequence[float]], first_error: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(lo, hi, has_error)``: response i is predicted right exactly for ``lo[i] < tau <= hi[i]``."""
    lo, hi, has_error = [], [], []
    for r, e in zip(rewards, first_error):
        m = np.minimum.accumulate(np.asarray(r, dtype=np.float64))
        if e < 0:
            lo.append(-math.inf)
            hi.append(float(m[-1]))
        else:
            lo.append(float(m[e]))
            hi.append(math.inf if e == 0 else float(m[e - 1]))
        has_error.append(e >= 0)
    return np.array(lo), np.array(hi), np.array(has_error, dtype=bool)


def threshold_curve(rewards: Sequence[Sequence[float]], first_error: Sequence[int]) -> dict[str, list]:
    """Every threshold plateau: ``threshold`` (a representative inside it: the midpoint between
    neighbouring interval ends, one gap beyond the outermost ones), ``error_accuracy``,
    ``correct_accuracy`` and ``f1`` there. The accuracies only change at interval ends, so this is
    the whole curve."""
    _check(rewards, first_error)
    lo, hi, has_error = _intervals(rewards, first_error)
    ends = np.unique(np.concatenate([lo, hi]))
    ends = ends[np.isfinite(ends)]
    if not len(ends):
        ends = np.array([0.0])
    gap = float(np.diff(ends).min()) if len(ends) > 1 else 1.0
    reps = np.concatenate([[ends[0] - gap], (ends[:-1] + ends[1:]) / 2, [ends[-1] + gap]])
    curve: dict[str, list] = {"threshold": reps.tolist()}
    for name, sel in (("error_accuracy", has_error), ("correct_accuracy", ~has_error)):
        n = int(sel.sum())
        if not n:
            curve[name] = [None] * len(reps)
            continue
        los, his = np.sort(lo[sel]), np.sort(hi[sel])
        right = np.searchsorted(los, reps, side="left") - np.searchsorted(his, reps, side="left")
        curve[name] = (right / n).tolist()
    curve["f1"] = [harmonic_mean(a, b) for a, b in zip(curve["error_accuracy"], curve["correct_accuracy"])]
    return curve


def choose_threshold(rewards: Sequence[Sequence[float]], first_error: Sequence[int]) -> tuple[float, str]:
    """``(threshold, objective)``: the threshold of the best F1 on these (validation) responses;
    among equal values, the lowest. Without responses of one kind F1 is undefined, and the
    objective is the accuracy that is defined (``error_accuracy`` or ``correct_accuracy``)."""
    curve = threshold_curve(rewards, first_error)
    objective = "f1"
    if curve["f1"][0] is None:
        objective = "correct_accuracy" if curve["error_accuracy"][0] is None else "error_accuracy"
    best = int(np.argmax(curve[objective]))  # argmax: the first (lowest) of the best plateaus
    return float(curve["threshold"][best]), objective


def step_auc(rewards: Sequence[Sequence[float]], first_error: Sequence[int]) -> dict:
    """``P(reward of a right step before a first error > reward of that first wrong step)``, pooled
    over the responses with an error; ties count one half (Mann-Whitney). ``auc`` is None without
    either kind of step."""
    _check(rewards, first_error)
    pos = [x for r, e in zip(rewards, first_error) if e > 0 for x in r[:e]]
    neg = [r[e] for r, e in zip(rewards, first_error) if e >= 0]
    out = {"auc": None, "right_steps": len(pos), "first_wrong_steps": len(neg)}
    if pos and neg:
        values = np.concatenate([np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)])
        order = values.argsort(kind="mergesort")
        ranks = np.empty(len(values))
        ranks[order] = np.arange(1, len(values) + 1)
        _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
        sums = np.bincount(inverse, weights=ranks)
        ranks = (sums / counts)[inverse]  # average ranks of ties
        u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
        out["auc"] = float(u / (len(pos) * len(neg)))
    return out
