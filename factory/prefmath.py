"""Preference maths: from option-token log-probs to one AI preference label per pair.

Vocabulary. A *pair* is two responses (a, b) to one conversation. A *judgement* asks the
feedback model, for one constitution principle, which response better satisfies it, in one
presentation *order*: ``"ab"`` shows a first as option (A), ``"ba"`` shows b first. A *cell* is
one (pair, principle): its two orders averaged. Everything here is vectorised (numpy /
pyarrow); no Python loop runs over rows, so a million judgements take well under a second.

The label itself (weights, tie band, clamp, calibration, pooling) is made in one place,
:mod:`factory.labels`, as SQL; the audit uses :func:`principle_cells` for its diagnostics
(position consistency, per-principle blocks) and :func:`decide` for its own labellers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = [
    "PrincipleCells",
    "decide",
    "p_a",
    "principle_cells",
    "renormalize",
]


def renormalize(logp_first: Any, logp_second: Any) -> Any:
    """P(first-shown option is better) from the two option-token log-probs.

    ``p_first = exp(l1) / (exp(l1) + exp(l2)) = sigmoid(l1 - l2)``, evaluated as
    ``1 / (1 + e^-|d|)`` or ``e^-|d| / (1 + e^-|d|)`` by the sign of ``d = l1 - l2`` so that nothing
    overflows. ``l1 = -inf`` gives 0, ``l2 = -inf`` gives 1; both ``-inf`` (or a NaN) gives NaN,
    which callers record as a failed judgement. Scalars in, float out; arrays in, array out.
    """
    if isinstance(logp_first, float) and isinstance(logp_second, float):  # the judge's per-row path
        d = logp_first - logp_second
        if d != d:
            return d
        e = math.exp(-abs(d))
        return 1.0 / (1.0 + e) if d >= 0 else e / (1.0 + e)
    l1 = np.asarray(logp_first, dtype=np.float64)
    l2 = np.asarray(logp_second, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        d = l1 - l2
        e = np.exp(-np.abs(d))
        p = np.where(d >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    return float(p) if p.ndim == 0 else p


def p_a(p_first: Any, order: Any) -> np.ndarray:
    """P(response a is better) from P(first-shown option is better).

    ``order == "ab"`` (a shown first) → ``p_first``; ``"ba"`` → ``1 - p_first``. ``order`` may be
    strings (list, numpy or Arrow) or a bool array meaning "a was shown first".
    """
    p = _floats(p_first)
    return np.where(order_is_ab(order, len(p)), p, 1.0 - p)


def order_is_ab(order: Any, n: int | None = None) -> np.ndarray:
    """Bool array: True where a was shown first. Raises on anything but "ab"/"ba"/bool."""
    if isinstance(order, (pa.Array, pa.ChunkedArray)):
        if pa.types.is_boolean(order.type) and order.null_count == 0:
            is_ab = np.asarray(order.to_numpy(zero_copy_only=False), dtype=bool)
        else:
            text = order.cast(pa.string())
            is_ab = _bool(pc.equal(text, "ab"))
            _check_orders(is_ab | _bool(pc.equal(text, "ba")), text.to_numpy(zero_copy_only=False))
    else:
        arr = np.asarray(order)
        if arr.dtype == bool:
            is_ab = arr
        else:
            is_ab = np.asarray(arr == "ab", dtype=bool)
            _check_orders(is_ab | np.asarray(arr == "ba", dtype=bool), arr)
    if n is not None and is_ab.shape != (n,):
        raise ValueError(f"order has {is_ab.size} values but there are {n} probabilities")
    return is_ab


@dataclass(frozen=True)
class PrincipleCells:
    """Judgements reduced to one row per (pair, principle), cells sorted by (pair, principle).

    ``pair``/``principle`` are integer codes into the sorted unique ``pair_ids``/``principle_ids``
    (every pair id seen appears there, even one whose judgements all failed). ``p_ab``/``p_ba``
    are the mean P(a better) of each order (NaN when that order is absent or failed) and ``p``
    their average, or the one present. The ``judged``/``first_preferred`` vectors count, per
    principle, valid judgements and those where the first-shown option had p_first > 0.5.
    """

    pair_ids: pa.Array
    principle_ids: pa.Array
    pair: np.ndarray
    principle: np.ndarray
    p_ab: np.ndarray
    p_ba: np.ndarray
    p: np.ndarray
    failed_per_pair: np.ndarray
    valid_per_pair: np.ndarray
    judged: np.ndarray
    first_preferred: np.ndarray

    @property
    def complete(self) -> np.ndarray:
        """Cells where both orders are present."""
        return ~np.isnan(self.p_ab) & ~np.isnan(self.p_ba)

    @property
    def orders_pick_same(self) -> np.ndarray:
        """Per cell: ``(p_ab > 0.5) == (p_ba > 0.5)`` (meaningful only where ``complete``)."""
        return (self.p_ab > 0.5) == (self.p_ba > 0.5)


def principle_cells(
    pair_id: Any,
    principle_id: Any,
    order: Any,
    p_a: Any,
    clamp: tuple[float, float] | None = None,
) -> PrincipleCells:
    """Reduce judgements to cells: mean per order, then the mean of the orders present.

    NaN ``p_a`` = failed judgement: it is left out of every mean and counted in
    ``failed_per_pair``. Duplicate (pair, principle, order) rows are averaged. ``clamp=(lo, hi)``
    clips each judgement probability into [lo, hi] before averaging (chain-of-thought judges
    answer with near-certain tokens, and one 0.999 should not outweigh a principle's other order).
    """
    pair, pair_ids = _encode(pair_id, "pair_id")
    principle, principle_ids = _encode(principle_id, "principle_id")
    p = _floats(p_a)
    n = len(p)
    if not len(pair) == len(principle) == n:
        raise ValueError(f"column lengths differ: pair_id {len(pair)}, principle_id {len(principle)}, p_a {n}")
    is_ab = order_is_ab(order, n)
    _check_probabilities(p)
    ok = ~np.isnan(p)
    n_pairs, n_pr = len(pair_ids), len(principle_ids)
    first = np.where(is_ab, p, 1.0 - p) > 0.5
    if clamp is not None:
        lo, hi = clamp
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"clamp must satisfy 0 <= lo <= hi <= 1; got {clamp}")
        p = np.clip(p, lo, hi)
    failed_per_pair = np.bincount(pair[~ok], minlength=n_pairs)
    pair, principle, p, is_ab, first_ok = pair[ok], principle[ok], p[ok], is_ab[ok], first[ok]
    cells, inv = np.unique(pair * max(n_pr, 1) + principle, return_inverse=True)
    m = len(cells)
    p_ab = _div(np.bincount(inv, p * is_ab, m), np.bincount(inv, is_ab, m))
    p_ba = _div(np.bincount(inv, p * ~is_ab, m), np.bincount(inv, ~is_ab, m))
    both = ~np.isnan(p_ab) & ~np.isnan(p_ba)
    p_cell = np.where(both, (p_ab + p_ba) / 2.0, np.where(np.isnan(p_ab), p_ba, p_ab))
    return PrincipleCells(
        pair_ids=pair_ids,
        principle_ids=principle_ids,
        pair=cells // max(n_pr, 1),
        principle=cells % max(n_pr, 1),
        p_ab=p_ab,
        p_ba=p_ba,
        p=p_cell,
        failed_per_pair=failed_per_pair,
        valid_per_pair=np.bincount(pair, minlength=n_pairs),
        judged=np.bincount(principle, minlength=n_pr),
        first_preferred=np.bincount(principle, first_ok, n_pr).astype(np.int64),
    )


def decide(p: np.ndarray, tie_eps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(chose_a, is_tie, margin)`` for pair probabilities ``p``.

    ``is_tie = |p - 0.5| < tie_eps`` or ``p == 0.5`` exactly (no side to pick even at
    ``tie_eps=0``); ``chose_a = p > 0.5`` and not a tie; ``margin = |p - 0.5| * 2``. NaN p is
    neither a tie nor a choice (the caller counts it as failed).
    """
    if not 0.0 <= tie_eps < 0.5:
        raise ValueError(f"tie_eps must be in [0, 0.5); got {tie_eps}")
    p = np.asarray(p, dtype=np.float64)
    dist = np.abs(p - 0.5)
    is_tie = (dist < tie_eps) | (dist == 0.0)
    return (p > 0.5) & ~is_tie, is_tie, dist * 2.0


# -- helpers -----------------------------------------------------------------------------------


def _encode(values: Any, name: str) -> tuple[np.ndarray, pa.Array]:
    """Integer codes into the sorted unique values (Arrow hashing, not a Python-object sort)."""
    arr = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    if not isinstance(arr, pa.Array):
        arr = pa.array(np.asarray(values) if not isinstance(values, list) else values)
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if not pa.types.is_string(arr.type):
        arr = arr.cast(pa.string())
    if arr.null_count:
        raise ValueError(f"{name} has {arr.null_count} null value(s); every judgement needs a {name}")
    enc = pc.dictionary_encode(arr)
    sort = pc.sort_indices(enc.dictionary).to_numpy()
    rank = np.empty(len(sort), dtype=np.int64)
    rank[sort] = np.arange(len(sort))
    codes = rank[enc.indices.to_numpy(zero_copy_only=False)] if len(arr) else np.zeros(0, np.int64)
    return codes, enc.dictionary.take(pa.array(sort, type=pa.int64()))


def _floats(values: Any) -> np.ndarray:
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return np.asarray(values.cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)
    return np.asarray(values, dtype=np.float64).reshape(-1)


def _bool(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return np.asarray(pc.fill_null(arr, False).to_numpy(zero_copy_only=False), dtype=bool)


def _check_orders(valid: np.ndarray, values: np.ndarray) -> None:
    if not valid.all():
        bad = sorted({str(v) for v in np.asarray(values)[~valid][:1000]})[:5]
        raise ValueError(f"order must be 'ab' or 'ba'; {int((~valid).sum())} row(s) have e.g. {bad}")


def _check_probabilities(p: np.ndarray) -> None:
    with np.errstate(invalid="ignore"):
        bad = (p < 0.0) | (p > 1.0) | np.isinf(p)
    if bad.any():
        raise ValueError(
            f"p_a must be a probability in [0, 1] (NaN = failed); {int(bad.sum())} value(s) are not, "
            f"e.g. {p[bad][:3].tolist()}"
        )


def _div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with NaN where den == 0 (no warnings)."""
    num = np.asarray(num, dtype=np.float64)
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=np.asarray(den) != 0)
    return out
