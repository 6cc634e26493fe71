"""Rates with seeded bootstrap intervals, differences between models, and honest verdicts.

A rate is the mean of per-item scores in [0, 1] (0/1 decisions; a judge's tie counts 0.5, the
coin flip that would break it, as in audits). Its interval is the 95% percentile bootstrap over
items (``audit.stats.bootstrap_mean_ci``, seeded). A difference between two models is bootstrapped
over the items both scored (paired) when the metric is defined on the same items for both, and
over each model's items independently otherwise (e.g. the flip rate, which is conditional on a
correct first answer). Fewer than :data:`MIN_ITEMS` items: the verdict says so instead of
pretending.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..audit.stats import bootstrap_mean_ci

MIN_ITEMS = 30
LEVEL = 0.95


@dataclass(frozen=True)
class Rate:
    value: float | None
    lo: float | None
    hi: float | None
    n: int

    def fmt(self, sign: bool = False) -> str:
        if self.value is None:
            return f"— (n={self.n})"
        f = "{:+.3f}" if sign else "{:.3f}"
        ci = f" [{f.format(self.lo)}, {f.format(self.hi)}]" if self.lo is not None else ""
        return f"{f.format(self.value)}{ci} n={self.n}"

    def to_dict(self) -> dict:
        return {"value": self.value, "lo": self.lo, "hi": self.hi, "n": self.n}


def _clean(x: float) -> float | None:
    return None if x != x else float(x)


def rate(values, n_bootstrap: int = 1000, seed: int = 0) -> Rate:
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return Rate(None, None, None, 0)
    lo, hi = bootstrap_mean_ci(v, n_bootstrap, seed, LEVEL)
    return Rate(float(v.mean()), _clean(lo), _clean(hi), len(v))


def difference(a: dict[str, float], b: dict[str, float], *, paired: bool, n_bootstrap: int = 1000,
               seed: int = 0) -> Rate:
    """``mean(b) − mean(a)`` with a bootstrap interval; ``a``/``b`` map item id → score."""
    rng = np.random.default_rng(seed)
    tail = (1 - LEVEL) / 2 * 100
    if paired:
        common = sorted(set(a) & set(b))
        if not common:
            return Rate(None, None, None, 0)
        d = np.array([b[k] - a[k] for k in common])
        means = d[rng.integers(0, len(d), (n_bootstrap, len(d)))].mean(axis=1)
        lo, hi = np.percentile(means, [tail, 100 - tail])
        return Rate(float(d.mean()), float(lo), float(hi), len(d))
    va, vb = np.array(list(a.values()), dtype=float), np.array(list(b.values()), dtype=float)
    if len(va) == 0 or len(vb) == 0:
        return Rate(None, None, None, min(len(va), len(vb)))
    ma = va[rng.integers(0, len(va), (n_bootstrap, len(va)))].mean(axis=1)
    mb = vb[rng.integers(0, len(vb), (n_bootstrap, len(vb)))].mean(axis=1)
    lo, hi = np.percentile(mb - ma, [tail, 100 - tail])
    return Rate(float(vb.mean() - va.mean()), float(lo), float(hi), min(len(va), len(vb)))


def verdict(label: str, d: Rate, model: str, against: str, higher_is_better: bool | None) -> str:
    """One line: is ``model`` different from ``against`` on this metric, and which way is better?"""
    if d.value is None:
        return f"{label}: no items to compare {model} with {against}"
    if d.n < MIN_ITEMS:
        return f"{label}: too few items (n={d.n} < {MIN_ITEMS}) for a verdict on {model} vs {against}"
    if d.lo <= 0 <= d.hi:
        return (f"{label}: {model} vs {against} not distinguishable ({d.value:+.3f}, 95% CI "
                f"[{d.lo:+.3f}, {d.hi:+.3f}], n={d.n})")
    up = d.value > 0
    word = "higher" if up else "lower"
    better = "" if higher_is_better is None else (" (better)" if up == higher_is_better else " (worse)")
    return f"{label}: {model} is {word} than {against}{better}: {d.value:+.3f} [{d.lo:+.3f}, {d.hi:+.3f}], n={d.n}"


def level_note(label: str, r: Rate) -> str | None:
    """A note for a single rate measured on too few items."""
    if r.n < MIN_ITEMS:
        return f"{label}: only {r.n} items (< {MIN_ITEMS}); the interval is wide and no verdict is drawn"
    return None


__all__ = ["MIN_ITEMS", "Rate", "difference", "level_note", "rate", "verdict"]
