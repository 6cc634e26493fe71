"""The audit's statistics rules, written once: its intervals, and when a verdict may be given.

- :func:`versus_chance` is the one rule for calling a labeller above or below chance (overall,
  naive baseline, each principle). It looks at decided pairs alone: ties score exactly 0.5, so
  they cannot move agreement away from chance, and agreement with ties is above 0.5 exactly when
  agreement on decided pairs is. Its interval is the exact (Clopper–Pearson) 95% binomial
  interval of ``n_agree`` of ``n_decided`` (:func:`exact_ci`, scipy), valid at any n. Below
  :data:`MIN_DECIDED` decided pairs no verdict is given ("too few"), except that an interval wholly
  below 0.5 is flagged "below" at any n (2 of 18, [0.014, 0.347], is a judge that disagrees with
  humans, not a draw): the interval is still shown,
  but one pair then moves the estimate by more than 3 points, and the comparisons made beside the
  verdict (naive baseline, length heuristics) are noise. With no decided pair the verdict is "all
  ties", never an interval such as [0.500, 0.500].
- :func:`agreement_interval`: agreement with ties as 0.5 is a three-valued score with no exact
  interval, so it gets a 95% percentile bootstrap over pairs (:func:`bootstrap_mean_ci`) where
  that is informative. Where the bootstrap would be degenerate (fewer than :data:`MIN_DECIDED`
  decided pairs, or every pair scoring the same, e.g. [1, 1] over one pair) it is the exact
  decided-pair interval mapped onto the same scale given the ties,
  ``0.5 + n_decided/n · (ci − 0.5)``; none when no pair is decided.
- Proportions of 0/1 outcomes (always-longer/shorter agreement) get exact intervals.
"""

from __future__ import annotations

import math

import numpy as np

MIN_DECIDED = 30  # decided pairs below which no above/below-chance verdict is given
CI_LEVEL = 0.95
CHANCE_RULE = (f"above/below chance is judged on decided (non-tie) pairs with an exact Clopper-Pearson "
               f"{CI_LEVEL:.0%} interval of their agreement; no verdict below {MIN_DECIDED} decided pairs, except "
               "'below chance' when the interval excludes 0.5 on that side")
AGREEMENT_CI_RULE = ("agreement CI: percentile bootstrap over pairs; where that would be degenerate (fewer than "
                     f"{MIN_DECIDED} decided pairs, or all pairs score the same) the exact decided-pair interval "
                     "mapped onto agreement given the ties; none when no pair is decided")
CHANCE_CALLS = ("no_pairs", "all_ties", "too_few", "above", "below", "chance")


def exact_ci(k: int, n: int, level: float = CI_LEVEL) -> tuple[float, float]:
    """Exact (Clopper–Pearson) interval of the binomial proportion k/n; (nan, nan) when n is 0."""
    if n == 0:
        return (math.nan, math.nan)
    from scipy.stats import binomtest

    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method="exact")
    return (float(ci.low), float(ci.high))


def versus_chance(n_pairs: int, n_decided: int, decided_ci: tuple[float, float]) -> str:
    """One of :data:`CHANCE_CALLS`: ``no_pairs``, ``all_ties`` (nothing decided), ``too_few``
    (fewer than MIN_DECIDED decided pairs, unless the interval lies wholly below 0.5: a judge that
    disagrees with humans is flagged at any n), else ``above``/``below``/``chance`` by whether the
    exact decided-pair interval lies above, below or around 0.5."""
    if n_pairs == 0:
        return "no_pairs"
    if n_decided == 0:
        return "all_ties"
    lo, hi = decided_ci
    if n_decided < MIN_DECIDED:  # too few to call it good; a judge the exact interval puts below chance is flagged
        return "below" if hi < 0.5 else "too_few"
    return "above" if lo > 0.5 else "below" if hi < 0.5 else "chance"


def agreement_interval(score: np.ndarray, n_decided: int, decided_ci: tuple[float, float], n_bootstrap: int,
                       seed: int) -> tuple[tuple[float, float], str | None]:
    """Interval of agreement with ties scored 0.5, and its method: ``bootstrap``, ``exact`` (the
    decided-pair interval given the ties) or None (no decided pair: no interval)."""
    if n_decided == 0:
        return (math.nan, math.nan), None
    if n_decided >= MIN_DECIDED and np.ptp(score) > 0:
        ci = bootstrap_mean_ci(score, n_bootstrap, seed, CI_LEVEL)
        if not math.isnan(ci[0]):
            return ci, "bootstrap"
    share = n_decided / len(score)  # agreement = 0.5 + share · (decided agreement − 0.5)
    return (0.5 + share * (decided_ci[0] - 0.5), 0.5 + share * (decided_ci[1] - 0.5)), "exact"


def bootstrap_mean_ci(score: np.ndarray, n_bootstrap: int, seed: int, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of ``mean(score)``, resampling pairs with replacement.

    Agreement scores take three values (0, 0.5, 1), and a resample's mean depends only on how
    often each value is drawn, which is Multinomial(n, value shares). Drawing those counts has
    exactly the distribution of resampling an ``n_bootstrap × n`` index matrix, at
    O(n_bootstrap × distinct values) instead of O(n_bootstrap × n): 1000 resamples of 125,000
    pairs take milliseconds. Scores with many distinct values fall back to index resampling in
    chunks of ≤ 4M indices. Deterministic for a fixed seed; (nan, nan) when empty.
    """
    score = np.asarray(score, dtype=np.float64)
    n = len(score)
    if n == 0 or n_bootstrap <= 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    values, counts = np.unique(score, return_counts=True)
    if len(values) <= 64:
        means = rng.multinomial(n, counts / n, size=n_bootstrap) @ values / n
    else:
        means = _index_bootstrap(score, n_bootstrap, rng)
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(means, [tail, 100.0 - tail])
    return (float(lo), float(hi))


def _index_bootstrap(score: np.ndarray, n_bootstrap: int, rng: np.random.Generator) -> np.ndarray:
    n = len(score)
    step = max(1, 4_000_000 // n)
    sizes = [min(step, n_bootstrap - i) for i in range(0, n_bootstrap, step)]
    return np.concatenate([score[rng.integers(0, n, size=(m, n))].mean(axis=1) for m in sizes])


def percentile_ci(x: np.ndarray, level: float = CI_LEVEL) -> tuple[float, float]:
    """The central ``level`` percentile interval of bootstrap replicates ``x`` ((nan, nan) when empty)."""
    if len(x) == 0:
        return (math.nan, math.nan)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(x, [tail, 100 - tail])
    return (float(lo), float(hi))


def kappa_ci(y: np.ndarray, chose_a: np.ndarray, n_bootstrap: int, seed: int, level: float = CI_LEVEL) -> tuple[float, float]:
    """Percentile bootstrap interval of Cohen's κ (binary) over pairs: a resample is a Multinomial draw of
    the 2×2 table's cell counts; resamples where κ is undefined (one class only) are left out."""
    n = len(y)
    if n == 0 or n_bootstrap <= 0:
        return (math.nan, math.nan)
    cells = np.bincount(2 * y.astype(np.int64) + chose_a.astype(np.int64), minlength=4) / n  # (y, judge)
    t = np.random.default_rng(seed).multinomial(n, cells, size=n_bootstrap) / n
    po = t[:, 0] + t[:, 3]
    hy, hj = t[:, 2] + t[:, 3], t[:, 1] + t[:, 3]
    pe = hy * hj + (1 - hy) * (1 - hj)
    with np.errstate(invalid="ignore", divide="ignore"):
        k = (po - pe) / (1 - pe)
    return percentile_ci(k[np.isfinite(k)], level)
