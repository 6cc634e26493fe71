"""Audit metrics: how well do the AI preference labels agree with held-out human labels?

Everything is computed on numpy arrays (no Python loop over rows) from two Arrow tables:

- ``judgements``: pair_id, principle_id, order ("ab"/"ba"), p_a (P(a better) in that judgement;
  NaN = failed, excluded and counted);
- ``human``: pair_id, human_choice ("a"/"b"), len_a, len_b (characters), optionally the texts
  conversation/response_a/response_b (shown in the divergence table).

Choices the numbers depend on (also recorded in ``AuditResult.settings``):

- **Ties** (``|p_a - 0.5| < tie_eps``) score 0.5 in ``agreement``: the expected accuracy of
  breaking them with a coin flip, so a judge cannot look better by abstaining.
  ``agreement_excl_ties`` is the agreement over decided pairs only; κ uses decided pairs only.
- **κ** is Cohen's kappa (scikit-learn) on decided pairs; when the human or the judge uses a
  single class κ is 0 or 0/0 by construction, so it is reported as NaN with a note.
- **Intervals and verdicts** follow :mod:`factory.audit.stats`: above/below chance is judged on
  decided pairs with an exact (Clopper–Pearson) interval and not at all below ``MIN_DECIDED``
  (30) decided pairs ("too few"), or when every pair is a tie ("all ties"); agreement with ties
  gets a bootstrap interval where that is informative, the exact one mapped onto it otherwise
  (``agreement_ci_method`` says which); 0/1 proportions get exact intervals.
- **Naive baseline**: the same judgements, order "ab" only, one principle, hard label (only
  p == 0.5 is a tie); its calibration is that of the single judgement's probability, and its
  position metrics are those of its principle (how often its label flips when the order does).
- **Position** metrics use every valid judgement (they need no human label).
- **Calibration** bins are equal-width with scikit-learn's ``calibration_curve`` convention
  (a value on an inner edge falls in the lower bin).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from factory.audit.stats import (AGREEMENT_CI_RULE, CHANCE_RULE, MIN_DECIDED, agreement_interval, exact_ci, kappa_ci,
                                 versus_chance)
from factory.prefmath import PrincipleCells, decide, principle_cells

JUDGEMENT_COLUMNS = ("pair_id", "principle_id", "order", "p_a")
HUMAN_COLUMNS = ("pair_id", "human_choice", "len_a", "len_b")
TEXT_COLUMNS = ("conversation", "response_a", "response_b")
LOG_LOSS_CLIP = 1e-6
TIES_RULE = "ties score 0.5 (coin flip) in agreement; agreement_excl_ties and kappa use decided pairs only"


@dataclass
class Block:
    """Agreement, position, length and calibration metrics for one way of labelling pairs."""

    name: str
    n_pairs: int
    n_ties: int
    human_p_a: float
    agreement: float
    agreement_excl_ties: float
    agreement_ci: tuple[float, float]
    cohen_kappa: float
    kappa_note: str | None
    n_decided: int
    n_agree: int  # decided pairs where the judge chose what the human chose
    decided_ci: tuple[float, float]  # exact interval of n_agree / n_decided
    agreement_ci_method: str | None  # "bootstrap", "exact" (given the ties), None (no decided pair)
    chance: str  # stats.versus_chance(): no_pairs | all_ties | too_few | above | below | chance
    position: dict[str, Any] = field(default_factory=dict)
    length: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    weight: float | None = None
    kappa_ci: tuple[float, float] = (math.nan, math.nan)  # percentile bootstrap over pairs (stats.kappa_ci)


@dataclass
class AuditResult:
    """Everything ``factory audit`` reports; ``to_dict()`` is strict JSON (NaN → null)."""

    overall: Block
    naive: Block
    per_principle: list[Block]
    divergence: list[dict[str, Any]]
    counts: dict[str, int]
    settings: dict[str, Any]
    variants: list[Block] = field(default_factory=list)  # the same pairs under other label rules
    panel: dict[str, Any] | None = None  # a panel run: each judge and the panel side by side (audit.panel)

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))


@dataclass(frozen=True)
class _Cfg:
    n_bootstrap: int
    seed: int
    n_bins: int
    length_gap: float


@dataclass(frozen=True)
class _Human:
    y: np.ndarray  # per human row: the human chose a
    len_a: np.ndarray
    len_b: np.ndarray
    row: np.ndarray  # per pair code: its human row, -1 when unlabelled


def compute_audit(
    judgements: pa.Table,
    human: pa.Table,
    weights: Mapping[str, float],
    *,
    tie_eps: float = 0.05,
    naive_principle: str | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    n_bins: int = 10,
    length_gap: float = 30,
    top_divergent: int = 20,
    labels: pa.Table | None = None,
    cells: pa.Table | None = None,
    variants: Mapping[str, pa.Table] | None = None,
) -> AuditResult:
    """Audit the factory's label and a naive baseline against human labels; see the module docstring.

    ``labels`` (pair_id, p_a) and ``cells`` (pair_id, principle_id, p) are the run's labels and
    per-principle cells as :mod:`factory.labels` makes them (the one label rule, in SQL); without
    them they are made from ``judgements`` by the same rule with ``weights`` and ``tie_eps``.
    ``variants`` maps a name to other labels of the same pairs (raw, calibrated, fitted weights):
    each gets an overall block in ``AuditResult.variants``. ``judgements`` always give the
    position metrics and the naive baseline."""
    _require_columns(judgements, JUDGEMENT_COLUMNS, "judgements")
    _require_columns(human, HUMAN_COLUMNS, "human labels")
    jc = principle_cells(judgements["pair_id"], judgements["principle_id"], judgements["order"], judgements["p_a"])
    hum = _read_human(human, jc.pair_ids)
    cfg = _Cfg(n_bootstrap, seed, n_bins, length_gap)
    if labels is None:  # the one label rule (factory.labels), on these judgements
        from factory.labels import LabelRule, labels_of

        labels = labels_of(judgements.select(list(JUDGEMENT_COLUMNS)), LabelRule(dict(weights), tie_eps=tie_eps))
    p = _align(labels, jc.pair_ids, "p_a")
    codes = np.flatnonzero((hum.row >= 0) & ~np.isnan(p))
    overall = _block("overall", p[codes], codes, hum, tie_eps, _position(jc, None), cfg)
    names = jc.principle_ids.to_pylist()
    naive_name = _naive_name(names, naive_principle)
    cell_p = jc.p if cells is None else _align_cells(cells, jc)
    per_principle = [
        _principle_block(jc, cell_p, hum, name, names, tie_eps, cfg, float(weights[name]) if name in weights else None)
        for name in sorted(set(weights) | set(names))
    ]
    extra = []
    for name, table in (variants or {}).items():
        pv = _align(table, jc.pair_ids, "p_a")
        cv = np.flatnonzero((hum.row >= 0) & ~np.isnan(pv))
        extra.append(_block(name, pv[cv], cv, hum, tie_eps, _position(jc, None), cfg))
    cells = jc
    return AuditResult(
        overall=overall,
        naive=_naive_block(cells, hum, names, naive_name, cfg),
        per_principle=per_principle,
        divergence=_divergence(cells, hum, p, codes, tie_eps, top_divergent, human),
        counts={
            "judgements_total": judgements.num_rows,
            "judgements_failed": int(cells.failed_per_pair.sum()),
            "pairs_judged": len(p),
            "pairs_without_valid_judgement": int(np.isnan(p).sum()),
            "pairs_without_human_label": int((hum.row < 0).sum()),
            "human_pairs": human.num_rows,
            "human_pairs_without_judgements": human.num_rows - len(codes),
            "pairs_evaluated": len(codes),
        },
        settings={
            "tie_eps": tie_eps,
            "naive_principle": naive_name,
            "n_bootstrap": n_bootstrap,
            "seed": seed,
            "n_bins": n_bins,
            "length_gap": length_gap,
            "weights": {k: float(v) for k, v in weights.items()},
            "ties_rule": TIES_RULE,
            "chance_rule": CHANCE_RULE,
            "agreement_ci_rule": AGREEMENT_CI_RULE,
            "min_decided": MIN_DECIDED,
            "log_loss_clip": LOG_LOSS_CLIP,
        },
        variants=extra,
    )


def _align(table: pa.Table, pair_ids: pa.Array, column: str) -> np.ndarray:
    """``table[column]`` per pair id of ``pair_ids`` (NaN where the table has no row)."""
    got = dict(zip(table.column("pair_id").to_pylist(), table.column(column).to_pylist()))
    return np.array([np.nan if (v := got.get(k)) is None else v for k in pair_ids.to_pylist()], dtype=np.float64)


def _align_cells(cells: pa.Table, jc: PrincipleCells) -> np.ndarray:
    """The SQL cells' p for each of ``jc``'s (pair, principle) cells."""
    got = {(a, b): v for a, b, v in zip(cells.column("pair_id").to_pylist(), cells.column("principle_id").to_pylist(),
                                         cells.column("p").to_pylist())}
    pairs, names = jc.pair_ids.to_pylist(), jc.principle_ids.to_pylist()
    return np.array([np.nan if (v := got.get((pairs[i], names[k]))) is None else v
                     for i, k in zip(jc.pair, jc.principle)], dtype=np.float64)


def calibration(p: np.ndarray, y: np.ndarray, n_bins: int) -> dict[str, Any]:
    """Reliability bins, ECE, Brier score and log loss of probabilities ``p`` for outcomes ``y``.

    Bins: ``n_bins`` equal-width on [0, 1]; per bin the count, mean predicted p and observed
    frequency of y (NaN when empty). ``ece = sum_bins count/n * |observed - mean_predicted|``;
    ``brier = mean((p - y)^2)``; ``log_loss = -mean(y log p + (1-y) log(1-p))`` with p clipped to
    [1e-6, 1 - 1e-6].
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1; got {n_bins}")
    p = np.asarray(p, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    b = np.searchsorted(edges[1:-1], p)
    count = np.bincount(b, minlength=n_bins)
    mean_pred = _div(np.bincount(b, p, n_bins), count)
    observed = _div(np.bincount(b, y, n_bins), count)
    n = len(p)
    gaps = np.abs(observed - mean_pred)
    ece = float(np.sum(count[count > 0] * gaps[count > 0]) / n) if n else math.nan
    q = np.clip(p, LOG_LOSS_CLIP, 1.0 - LOG_LOSS_CLIP)
    return {
        "n": n,
        "edges": edges.tolist(),
        "count": count.tolist(),
        "mean_predicted": mean_pred.tolist(),
        "observed": observed.tolist(),
        "ece": ece,
        "brier": _mean((p - y) ** 2),
        "log_loss": _mean(-(y * np.log(q) + (1.0 - y) * np.log(1.0 - q))),
    }


def kappa(y: np.ndarray, chose_a: np.ndarray) -> tuple[float, str | None]:
    """Cohen's κ (scikit-learn) of human vs judge on decided pairs, or (nan, why not)."""
    if len(y) == 0:
        return math.nan, "no decided (non-tie) pairs"
    for who, v in (("human labels", y), ("judge", chose_a)):
        if v.all() or not v.any():
            side = "a" if v[0] else "b"
            return math.nan, f"{who} chose only '{side}': κ is 0 or undefined by construction"
    from sklearn.metrics import cohen_kappa_score

    return float(cohen_kappa_score(y.astype(np.int8), chose_a.astype(np.int8), labels=[0, 1])), None


# -- blocks ------------------------------------------------------------------------------------


def _block(name: str, p: np.ndarray, codes: np.ndarray, hum: _Human, tie_eps: float,
           position: dict[str, Any], cfg: _Cfg, weight: float | None = None) -> Block:
    rows = hum.row[codes]
    y, la, lb = hum.y[rows], hum.len_a[rows], hum.len_b[rows]
    chose_a, is_tie, _ = decide(p, tie_eps)
    score = np.where(is_tie, 0.5, (chose_a == y).astype(np.float64))
    k, note = kappa(y[~is_tie], chose_a[~is_tie])
    n_decided, n_agree = int((~is_tie).sum()), int((score == 1.0).sum())
    decided_ci = exact_ci(n_agree, n_decided)
    agreement_ci, ci_method = agreement_interval(score, n_decided, decided_ci, cfg.n_bootstrap, cfg.seed)
    return Block(
        name=name,
        n_pairs=len(p),
        n_ties=int(is_tie.sum()),
        human_p_a=_mean(y),
        agreement=_mean(score),
        agreement_excl_ties=_mean(score[~is_tie]),
        agreement_ci=agreement_ci,
        cohen_kappa=k,
        kappa_note=note,
        n_decided=n_decided,
        n_agree=n_agree,
        decided_ci=decided_ci,
        agreement_ci_method=ci_method,
        chance=versus_chance(len(p), n_decided, decided_ci),
        position=position,
        length=_length(p, y, la, lb, score, chose_a, is_tie, cfg),
        calibration=calibration(p, y, cfg.n_bins),
        weight=weight,
        kappa_ci=(kappa_ci(y[~is_tie], chose_a[~is_tie], cfg.n_bootstrap, cfg.seed) if note is None
                  else (math.nan, math.nan)),
    )


def _naive_block(cells: PrincipleCells, hum: _Human, names: list[str], name: str | None, cfg: _Cfg) -> Block:
    k = names.index(name) if name is not None else -1
    m = (cells.principle == k) & ~np.isnan(cells.p_ab)
    codes, p = cells.pair[m], cells.p_ab[m]
    keep = hum.row[codes] >= 0
    return _block("naive", p[keep], codes[keep], hum, 0.0, _position(cells, k), cfg)


def _principle_block(cells: PrincipleCells, cell_p: np.ndarray, hum: _Human, name: str, names: list[str],
                     tie_eps: float, cfg: _Cfg, weight: float | None) -> Block:
    k = names.index(name) if name in names else -1
    m = (cells.principle == k) & ~np.isnan(cell_p)
    codes, p = cells.pair[m], cell_p[m]
    keep = hum.row[codes] >= 0
    return _block(name, p[keep], codes[keep], hum, tie_eps, _position(cells, k), cfg, weight)


def _position(cells: PrincipleCells, k: int | None) -> dict[str, Any]:
    """Order consistency over cells with both orders; P(first shown preferred) over judgements."""
    m = np.ones(len(cells.p), dtype=bool) if k is None else cells.principle == k
    complete = cells.complete & m
    judged = int(cells.judged.sum() if k is None else (cells.judged[k] if k >= 0 else 0))
    first = int(cells.first_preferred.sum() if k is None else (cells.first_preferred[k] if k >= 0 else 0))
    return {
        "n_cells_both_orders": int(complete.sum()),
        "consistency": _mean(cells.orders_pick_same[complete]),
        "n_judgements": judged,
        "p_prefers_first": first / judged if judged else math.nan,
    }


def _length(p: np.ndarray, y: np.ndarray, la: np.ndarray, lb: np.ndarray, score: np.ndarray,
            chose_a: np.ndarray, is_tie: np.ndarray, cfg: _Cfg) -> dict[str, Any]:
    """Length bias on pairs whose lengths differ by more than ``length_gap`` characters.

    ``ai_p_prefers_longer``: share of decided pairs where the judge chose the longer response;
    ``ai_mean_p_longer``: mean soft P(longer better); ``always_longer_agreement`` is the
    agreement of "always pick the longer" with humans (= ``human_p_prefers_longer``).
    """
    diff = la - lb
    with np.errstate(invalid="ignore"):
        m = np.abs(diff) > cfg.length_gap
    a_longer = diff[m] > 0
    decided = ~is_tie[m]
    human_longer = (y[m] == a_longer).astype(np.float64)
    lo, hi = exact_ci(int(human_longer.sum()), len(human_longer))  # a 0/1 proportion: exact interval
    return {
        "n": int(m.sum()),
        "n_unknown_length": int(np.isnan(diff).sum()),
        "ai_p_prefers_longer": _mean((chose_a[m] == a_longer)[decided]),
        "ai_mean_p_longer": _mean(np.where(a_longer, p[m], 1.0 - p[m])),
        "human_p_prefers_longer": _mean(human_longer),
        "ai_agreement": _mean(score[m]),
        "always_longer_agreement": _mean(human_longer),
        "always_longer_ci": (lo, hi),
        "always_shorter_agreement": 1.0 - _mean(human_longer),
        "always_shorter_ci": (1.0 - hi, 1.0 - lo),
    }


def _divergence(cells: PrincipleCells, hum: _Human, p: np.ndarray, codes: np.ndarray, tie_eps: float,
                top: int, human: pa.Table) -> list[dict[str, Any]]:
    """The ``top`` most confident decided pairs where the judge disagrees with the human."""
    y = hum.y[hum.row[codes]]
    chose_a, is_tie, margin = decide(p[codes], tie_eps)
    wrong = np.flatnonzero(~is_tie & (chose_a != y))
    wrong = wrong[np.argsort(-margin[wrong], kind="stable")][: max(top, 0)]
    names = cells.principle_ids.to_pylist()
    texts = [c for c in TEXT_COLUMNS if c in human.column_names]
    rows = []
    for i in wrong:  # at most `top` rows
        code, hrow = codes[i], hum.row[codes[i]]
        lo, hi = np.searchsorted(cells.pair, [code, code + 1])
        cp = cells.p[lo:hi]
        toward_wrong = 1.0 - cp if y[i] else cp
        drivers = [
            {"principle_id": names[cells.principle[lo + j]], "p_a": float(cp[j])}
            for j in np.argsort(-toward_wrong, kind="stable")[:3]
            if toward_wrong[j] > 0.5
        ]
        row = {
            "pair_id": cells.pair_ids[code].as_py(),
            "p_a": float(p[code]),
            "margin": float(margin[i]),
            "human_choice": "a" if y[i] else "b",
            "ai_choice": "a" if chose_a[i] else "b",
            "drivers": drivers,
        }
        row.update({c: _text(human.column(c)[int(hrow)].as_py()) for c in texts})
        rows.append(row)
    return rows


# -- input checks ------------------------------------------------------------------------------


def _require_columns(table: pa.Table, columns: tuple[str, ...], what: str) -> None:
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise ValueError(f"{what}: missing column(s) {missing}; got {table.column_names}")


def _read_human(human: pa.Table, pair_ids: pa.Array) -> _Human:
    ids = human["pair_id"].cast(pa.string())
    if ids.null_count:
        raise ValueError(f"human labels: {ids.null_count} row(s) have no pair_id")
    if pc.count_distinct(ids).as_py() != len(ids):
        vc = pc.value_counts(ids)
        dups = pc.filter(vc.field("values"), pc.greater(vc.field("counts"), 1)).to_pylist()
        raise ValueError(f"human labels: pair_id(s) {dups[:5]} appear more than once; keep one label per pair")
    choice = pc.utf8_lower(pc.utf8_trim_whitespace(human["human_choice"].cast(pa.string())))
    is_a = _bool(pc.equal(choice, "a"))
    bad = ~(is_a | _bool(pc.equal(choice, "b")))
    if bad.any():
        where = np.flatnonzero(bad)[:5]
        raise ValueError(
            f"human labels: human_choice must be 'a' or 'b'; {int(bad.sum())} row(s) are not, e.g. pair_id "
            f"{[ids[int(i)].as_py() for i in where]} = {[human['human_choice'][int(i)].as_py() for i in where]}"
        )
    row = pc.fill_null(pc.index_in(pair_ids, value_set=ids.combine_chunks()), -1)
    return _Human(
        y=is_a,
        len_a=_floats(human["len_a"]),
        len_b=_floats(human["len_b"]),
        row=np.asarray(row.to_numpy(zero_copy_only=False), dtype=np.int64),
    )


def _naive_name(names: list[str], requested: str | None) -> str | None:
    if requested is None:
        return names[0] if names else None
    if requested not in names:
        raise ValueError(f"naive_principle '{requested}' has no judgements; choose one of {names}")
    return requested


# -- small helpers -----------------------------------------------------------------------------


def _mean(x: np.ndarray) -> float:
    return float(np.mean(x)) if len(x) else math.nan


def _div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.full(len(num), np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _floats(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.asarray(col.cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)


def _bool(arr: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.asarray(pc.fill_null(arr, False).to_numpy(zero_copy_only=False), dtype=bool)


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    import json

    return json.dumps(value, ensure_ascii=False, default=str)


def _jsonable(x: Any) -> Any:
    """NaN/inf → None, numpy → Python, tuples → lists: strict JSON."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x
