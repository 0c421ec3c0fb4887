"""Confidence intervals of study results: a bootstrap over test problems and training seeds. Pure NumPy.

A study's number (say best-of-16 of a PRM) varies with two things a rerun would change: which
test problems were drawn and which training seed the PRM had. Each reward model's results come as
a ``[seeds, problems]`` array of per-problem values (a PRM trained with 3 seeds, scored on the
same 500 problems: ``[3, 500]``; majority voting, which has no training: ``[1, 500]``).

* **point estimate**: the mean over seeds of the mean over problems;
* **interval**: the percentile interval of a two-level bootstrap (as ``rliable``'s stratified
  bootstrap, Agarwal et al., 2021): each draw resamples the problems with replacement and, for
  each reward model on its own, its seeds with replacement, and takes the same mean. Every reward
  model in a study uses the *same* problem draws, so a difference between two of them (PRM minus
  majority voting) is bootstrapped paired: the problems both got right or both got wrong do not
  widen its interval.

With few seeds the seed resampling under-covers somewhat (the bootstrap variance of a mean of S
values is (S-1)/S of the usual estimate); the per-seed values are reported next to every
interval so a reader can see the spread. With one seed the interval is the problems' alone.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Bootstrap", "percentile_interval"]


def percentile_interval(samples: np.ndarray, level: float) -> list[float]:
    """The central ``level`` percentile interval of bootstrap ``samples`` (NaN draws ignored)."""
    tail = 100 * (1 - level) / 2
    lo, hi = np.nanpercentile(np.asarray(samples, dtype=np.float64), [tail, 100 - tail])
    return [float(lo), float(hi)]


def _as_2d(values: Sequence | np.ndarray, problems: int, what: str) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] != problems:
        raise ValueError(f"{what}: need a [seeds, problems={problems}] array, got shape {a.shape}")
    return a


@dataclass
class Bootstrap:
    """The problem draws of one study, shared by every reward model in it (paired)."""

    problems: int
    draws: int = 2000
    seed: int = 0
    level: float = 0.95
    _idx: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.problems < 1 or self.draws < 1 or not 0 < self.level < 1:
            raise ValueError(f"need problems >= 1, draws >= 1 and 0 < level < 1, got {self.problems}, "
                             f"{self.draws}, {self.level}")
        self._idx = np.random.default_rng(self.seed).integers(0, self.problems, size=(self.draws, self.problems))

    def seed_draws(self, seeds: int, key: str) -> np.ndarray:
        """``[draws, seeds]`` seed indices, resampled with replacement; one stream per ``key`` (a
        reward model), so adding a row does not change another row's draws."""
        if seeds == 1:
            return np.zeros((self.draws, 1), dtype=np.int64)
        rng = np.random.default_rng(random.Random(f"{self.seed}:{key}").getrandbits(64))
        return rng.integers(0, seeds, size=(self.draws, seeds))

    def _resampled(self, values: np.ndarray, key: str, stat: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """Per draw: ``stat`` of each seed's resampled problems, averaged over the resampled seeds."""
        per_seed = np.stack([stat(v[self._idx]) for v in values])  # [seeds, draws]
        pick = self.seed_draws(len(values), key)
        return per_seed[pick, np.arange(self.draws)[:, None]].mean(axis=1)

    def summary(self, values: Sequence | np.ndarray, key: str) -> dict:
        """``{"mean", "interval", "seeds"}`` of per-problem values ``[seeds, problems]`` (``seeds``:
        each seed's mean over the problems)."""
        v = _as_2d(values, self.problems, key)
        means = v.mean(axis=1)
        draws = self._resampled(v, key, lambda x: x.mean(axis=-1))
        return {"mean": float(means.mean()), "interval": percentile_interval(draws, self.level),
                "seeds": means.tolist()}

    def difference(self, a: Sequence | np.ndarray, b: Sequence | np.ndarray, key_a: str, key_b: str) -> dict:
        """``{"mean", "interval"}`` of ``mean(a) - mean(b)``, paired over the problems (each
        draw resamples the same problems for both) and with each side's seeds resampled on their own."""
        va, vb = _as_2d(a, self.problems, key_a), _as_2d(b, self.problems, key_b)
        da = self._resampled(va, key_a, lambda x: x.mean(axis=-1))
        db = self._resampled(vb, key_b, lambda x: x.mean(axis=-1))
        return {"mean": float(va.mean(axis=1).mean() - vb.mean(axis=1).mean()),
                "interval": percentile_interval(da - db, self.level)}

    def ratio_summary(self, parts: dict[str, Sequence | np.ndarray], stat: Callable[[dict[str, float]], float | None],
                      key: str) -> dict:
        """An interval for a statistic of per-problem *totals* rather than means (step-level F1:
        accuracies are ratios of counts summed over the problems). ``parts``: name -> ``[seeds,
        problems]`` counts; ``stat``: the statistic of one seed's totals (None when undefined)."""
        arrays = {k: _as_2d(v, self.problems, f"{key}:{k}") for k, v in parts.items()}
        seeds = {len(a) for a in arrays.values()}
        if len(seeds) != 1:
            raise ValueError(f"{key}: parts have different numbers of seeds {sorted(seeds)}")
        n_seeds = seeds.pop()

        def value(totals: dict[str, float]) -> float:
            x = stat(totals)
            return float("nan") if x is None else float(x)

        point = [value({k: float(a[s].sum()) for k, a in arrays.items()}) for s in range(n_seeds)]
        sums = {k: np.stack([a[s][self._idx].sum(axis=-1) for s in range(n_seeds)]) for k, a in arrays.items()}
        per_seed = np.array([[value({k: float(sums[k][s, d]) for k in sums}) for d in range(self.draws)]
                             for s in range(n_seeds)])
        pick = self.seed_draws(n_seeds, key)
        draws = per_seed[pick, np.arange(self.draws)[:, None]].mean(axis=1)
        defined = [p for p in point if not np.isnan(p)]
        return {"mean": float(np.mean(defined)) if len(defined) == n_seeds else None,
                "interval": percentile_interval(draws, self.level) if np.isfinite(draws).any() else None,
                "seeds": [None if np.isnan(p) else p for p in point]}
