"""Audit of a panel of judges: each judge against humans side by side, how much the judges agree with
each other, and how many independent judges the panel is really worth.

Inputs (Arrow tables; pure numpy/scipy, no database):

- ``judgements``: one row per (pair, judge): ``pair_id, judge, p_a`` (the judge's P(a better) for
  the pair, its principles and orders pooled by the label rule; NaN/null = failed) and optionally
  ``p_ab``/``p_ba`` (its P(a better) with a shown first / b shown first: position bias) and
  ``len_a``/``len_b`` (characters: length bias, when the human table has none);
- ``human``: ``pair_id, human_choice`` ('a'/'b'), optionally ``len_a, len_b``;
- ``panel`` (optional): ``pair_id, p_a``, the panel label made by :mod:`factory.labels` (the one
  label rule); without it the panel row is the mean of the judges' p_a, as the settings say.

Per judge (and the panel) the figures are the single-judge audit's (:func:`factory.audit.metrics._block`),
plus a bootstrap interval for κ and position bias from ``p_ab``/``p_ba`` (the audit's definitions).

Between judges (every judged pair, no human label needed), each judge's choice is a/b by
:func:`factory.prefmath.decide` with the tie band, and a tie or failure is a missing value:
- **Krippendorff's α** (nominal): ``α = 1 − (n − 1) · Σ_u a_u·b_u/(m_u − 1) / (n_a·n_b)`` over units
  with m_u ≥ 2 values (a_u, b_u: judges choosing a, b; n = Σ m_u, n_a = Σ a_u, n_b = Σ b_u);
- **Fleiss' κ** on the pairs every judge decided: ``(P̄ − P_e)/(1 − P_e)``,
  ``P_i = (a_i² + b_i² − m)/(m(m − 1))``, ``P_e = p_a² + (1 − p_a)²``.

Correlated errors (human-labelled pairs every judge judged): a judge's error on a pair is
1 − its agreement score (0 right, 1 wrong, 0.5 tie); ρ_jk is the Pearson correlation of two
judges' errors (undefined when one judge's errors do not vary), ρ̄ their mean, and the effective
number of independent judges ``n_eff = n / (1 + (n − 1)·ρ̄)``: n when errors are independent,
1 when the judges err together. ρ̄ < 0 (judges err on different pairs) gives n_eff > n.

Intervals are 95% percentile bootstraps over items; a statistic depends only on how many items of each
type (pattern of values) are drawn, so a resample is one Multinomial draw of type counts (as
:func:`factory.audit.stats.bootstrap_mean_ci` does). ``too_few``: fewer than MIN_DECIDED (30) items.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from factory.audit.metrics import Block, _align, _block, _Cfg, _jsonable, _mean, _read_human
from factory.audit.stats import MIN_DECIDED, exact_ci, kappa_ci
from factory.audit.stats import percentile_ci as _percentile
from factory.prefmath import _check_probabilities, _encode, _floats, decide

JUDGEMENT_COLUMNS = ("pair_id", "judge", "p_a")
ERROR_RULE = "a judge's error on a pair is 1 - its agreement score (0 right, 1 wrong, 0.5 tie)"
PANEL_MEAN_RULE = "mean p_a over the judges that judged the pair (no panel labels were given)"


JudgeBlock = Block  # a judge's block is an audit block (with its κ interval, as every block has)


@dataclass
class Agreement:
    """An inter-judge agreement statistic over ``n_items`` items, with its bootstrap interval."""

    name: str
    value: float
    ci: tuple[float, float]
    n_items: int
    too_few: bool
    note: str | None = None


@dataclass
class ErrorCorrelation:
    judges: list[str]
    rho: list[list[float]]  # pairwise correlation of the judges' errors (NaN: undefined)
    rho_mean: float
    rho_mean_ci: tuple[float, float]
    n_eff: float
    n_eff_ci: tuple[float, float]
    n_items: int
    too_few: bool
    note: str | None = None


@dataclass
class PanelResult:
    judges: list[str]
    per_judge: list[JudgeBlock]
    panel: JudgeBlock
    alpha: Agreement
    fleiss: Agreement
    errors: ErrorCorrelation
    counts: dict[str, int]
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))


def compute_panel(judgements: pa.Table, human: pa.Table, panel: pa.Table | None = None, *, tie_eps: float = 0.05,
                  n_bootstrap: int = 1000, seed: int = 0, n_bins: int = 10, length_gap: float = 30) -> PanelResult:
    """Audit every judge of ``judgements`` and the panel against ``human``; see the module docstring."""
    missing = [c for c in JUDGEMENT_COLUMNS if c not in judgements.column_names]
    if missing:
        raise ValueError(f"panel judgements: missing column(s) {missing}; got {judgements.column_names}")
    pair, pair_ids = _encode(judgements["pair_id"], "pair_id")
    judge, judge_ids = _encode(judgements["judge"], "judge")
    names = judge_ids.to_pylist()
    n_pairs, n_j = len(pair_ids), len(names)
    cell = pair * n_j + judge
    if len(np.unique(cell)) != len(cell):
        _, first, counts = np.unique(cell, return_index=True, return_counts=True)
        i = first[counts > 1][0]
        raise ValueError(f"panel judgements: judge '{names[judge[i]]}' has more than one row for pair_id "
                         f"'{pair_ids[pair[i]].as_py()}'; give one pooled p_a per (pair, judge)")

    def grid(column: str) -> np.ndarray:
        out = np.full((n_pairs, n_j), np.nan)
        if column in judgements.column_names:
            out[pair, judge] = _floats(judgements[column])
        return out

    p, p_ab, p_ba = grid("p_a"), grid("p_ab"), grid("p_ba")
    _check_probabilities(np.concatenate([p.ravel(), p_ab.ravel(), p_ba.ravel()]))
    hum = _read_human(_with_lengths(human, judgements), pair_ids)
    cfg = _Cfg(n_bootstrap, seed, n_bins, length_gap)
    labelled = hum.row >= 0
    per_judge = []
    for j, name in enumerate(names):
        codes = np.flatnonzero(labelled & ~np.isnan(p[:, j]))
        per_judge.append(_judge_block(name, p[:, j], codes, hum, tie_eps, _position(p_ab[:, j], p_ba[:, j]), cfg))
    panel_p = _nanmean(p, axis=1)
    if panel is not None:
        panel = panel.set_column(panel.schema.get_field_index("pair_id"), "pair_id", panel["pair_id"].cast(pa.string()))
        panel_p = _align(panel, pair_ids, "p_a")
        _check_probabilities(panel_p)
    codes = np.flatnonzero(labelled & ~np.isnan(panel_p))
    panel_block = _judge_block("panel", panel_p, codes, hum, tie_eps, _position(*(np.full(n_pairs, np.nan),) * 2), cfg)
    chose_a, is_tie, _ = decide(p, tie_eps)
    choice = np.where(np.isnan(p) | is_tie, np.nan, chose_a.astype(np.float64))  # 1 a, 0 b, NaN tie/failed
    rng = np.random.default_rng(seed)
    complete = labelled & ~np.isnan(p).any(axis=1)
    return PanelResult(
        judges=names, per_judge=per_judge, panel=panel_block,
        alpha=krippendorff_alpha(choice, n_bootstrap, rng), fleiss=fleiss_kappa(choice, n_bootstrap, rng),
        errors=error_correlation(_errors(p[complete], hum.y[hum.row[complete]], tie_eps), names, n_bootstrap, rng),
        counts={"pairs": n_pairs, "judges": n_j, "judgements": judgements.num_rows,
                "judgements_failed": int(np.isnan(p[pair, judge]).sum()), "human_pairs": human.num_rows,
                "pairs_with_human_label": int(labelled.sum()), "pairs_every_judge_judged_with_label": int(complete.sum())},
        settings={"tie_eps": tie_eps, "n_bootstrap": n_bootstrap, "seed": seed, "n_bins": n_bins,
                  "length_gap": length_gap, "min_items": MIN_DECIDED, "error_rule": ERROR_RULE,
                  "panel_rule": "the panel labels given (factory.labels)" if panel is not None else PANEL_MEAN_RULE},
    )


# -- per judge -----------------------------------------------------------------------------------


def _judge_block(name, p, codes, hum, tie_eps, position, cfg) -> JudgeBlock:
    b = _block(name, p[codes], codes, hum, tie_eps, position, cfg)
    b.length["too_few"] = b.length["n"] < MIN_DECIDED
    return b


def _position(p_ab: np.ndarray, p_ba: np.ndarray) -> dict[str, Any]:
    """Position bias from the two orders, with the audit's definitions (metrics._position)."""
    first = np.concatenate([p_ab[~np.isnan(p_ab)] > 0.5, p_ba[~np.isnan(p_ba)] < 0.5])
    both = ~np.isnan(p_ab) & ~np.isnan(p_ba)
    same = (p_ab[both] > 0.5) == (p_ba[both] > 0.5)
    return {"n_cells_both_orders": int(both.sum()), "consistency": _mean(same),
            "consistency_ci": exact_ci(int(same.sum()), len(same)), "n_judgements": len(first),
            "p_prefers_first": _mean(first), "p_prefers_first_ci": exact_ci(int(first.sum()), len(first)),
            "mean_shift_to_first": _mean(p_ab[both] - p_ba[both]), "too_few": int(both.sum()) < MIN_DECIDED}


# -- between judges ------------------------------------------------------------------------------


def _types(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct rows (item types) and how many items have each."""
    return np.unique(rows, axis=0, return_counts=True) if len(rows) else (rows, np.zeros(0, dtype=np.int64))


def _resample(counts: np.ndarray, n_bootstrap: int, rng: np.random.Generator) -> np.ndarray:
    """(n_bootstrap, types) counts of a bootstrap over items: Multinomial(n, type shares)."""
    n = counts.sum()
    return rng.multinomial(n, counts / n, size=max(n_bootstrap, 0)) if n else np.zeros((0, len(counts)))


def krippendorff_alpha(choice: np.ndarray, n_bootstrap: int = 1000, rng: np.random.Generator | None = None) -> Agreement:
    """Krippendorff's α (nominal, a/b) over items with at least two values; NaN = missing."""
    a, m = np.nansum(choice, axis=1), (~np.isnan(choice)).sum(axis=1)
    keep = m >= 2
    types, counts = _types(np.stack([a[keep], m[keep]], axis=1))
    if len(counts) == 0:
        return Agreement("krippendorff_alpha", math.nan, (math.nan,) * 2, 0, True, "no pair has two decided judges")
    ta, tm = types[:, 0], types[:, 1]
    per = np.stack([ta * (tm - ta) / (tm - 1), tm, ta], axis=1)  # a_u b_u / (m_u - 1), m_u, a_u

    def alpha(c: np.ndarray) -> np.ndarray:
        s = c @ per
        do, n, na = s[..., 0], s[..., 1], s[..., 2]
        with np.errstate(invalid="ignore", divide="ignore"):
            return 1.0 - (n - 1) * do / (na * (n - na))

    value = float(alpha(counts.astype(np.float64)))
    note = "every decided judgement chose the same side: α is undefined" if math.isnan(value) else None
    boot = alpha(_resample(counts, n_bootstrap, rng or np.random.default_rng(0)).astype(np.float64))
    n_items = int(counts.sum())
    return Agreement("krippendorff_alpha", value, _percentile(boot[np.isfinite(boot)]), n_items,
                     n_items < MIN_DECIDED, note)


def fleiss_kappa(choice: np.ndarray, n_bootstrap: int = 1000, rng: np.random.Generator | None = None) -> Agreement:
    """Fleiss' κ over the pairs every judge decided (Fleiss needs the same number of ratings per item)."""
    m = choice.shape[1]
    full = ~np.isnan(choice).any(axis=1)
    types, counts = _types(choice[full].sum(axis=1, keepdims=True))
    if m < 2 or len(counts) == 0:
        why = "fewer than two judges" if m < 2 else "no pair was decided by every judge"
        return Agreement("fleiss_kappa", math.nan, (math.nan,) * 2, 0, True, why)
    ta = types[:, 0]
    per = np.stack([(ta**2 + (m - ta) ** 2 - m) / (m * (m - 1)), ta / m], axis=1)  # P_i, share choosing a

    def kappa(c: np.ndarray) -> np.ndarray:
        n = c.sum(axis=-1)
        s = (c @ per) / n[..., None]
        pe = s[..., 1] ** 2 + (1 - s[..., 1]) ** 2
        with np.errstate(invalid="ignore", divide="ignore"):
            return (s[..., 0] - pe) / (1 - pe)

    value = float(kappa(counts.astype(np.float64)))
    note = "every judge chose the same side on every pair: κ is undefined" if math.isnan(value) else None
    boot = kappa(_resample(counts, n_bootstrap, rng or np.random.default_rng(0)).astype(np.float64))
    n_items = int(counts.sum())
    return Agreement("fleiss_kappa", value, _percentile(boot[np.isfinite(boot)]), n_items, n_items < MIN_DECIDED, note)


# -- correlated errors ---------------------------------------------------------------------------


def _errors(p: np.ndarray, y: np.ndarray, tie_eps: float) -> np.ndarray:
    chose_a, is_tie, _ = decide(p, tie_eps)
    return np.where(is_tie, 0.5, (chose_a != y[:, None]).astype(np.float64))


def error_correlation(errors: np.ndarray, judges: list[str], n_bootstrap: int = 1000,
                      rng: np.random.Generator | None = None) -> ErrorCorrelation:
    """Pairwise correlation of the judges' errors (items × judges), ρ̄ and n_eff with bootstrap intervals."""
    k = len(judges)
    types, counts = _types(errors)
    n_items = int(counts.sum())
    if k < 2 or n_items < 2:
        nan = [[math.nan] * k for _ in range(k)]
        why = "fewer than two judges" if k < 2 else "fewer than two human-labelled pairs judged by every judge"
        return ErrorCorrelation(judges, nan, math.nan, (math.nan,) * 2, math.nan, (math.nan,) * 2, n_items, True, why)
    upper = np.triu_indices(k, 1)

    def rho(c: np.ndarray) -> np.ndarray:  # c: (..., types) -> (..., k, k)
        n = c.sum(axis=-1)[..., None]
        m1 = (c @ types) / n
        m2 = np.einsum("...t,tj,tl->...jl", c, types, types) / n[..., None]
        cov = m2 - m1[..., :, None] * m1[..., None, :]
        sd = np.sqrt(np.clip(np.diagonal(cov, axis1=-2, axis2=-1), 0, None))
        with np.errstate(invalid="ignore", divide="ignore"):
            r = cov / (sd[..., :, None] * sd[..., None, :])
        return np.where((sd[..., :, None] > 1e-12) & (sd[..., None, :] > 1e-12), np.clip(r, -1, 1), np.nan)

    def mean_rho(r: np.ndarray) -> np.ndarray:
        return _nanmean(r[..., upper[0], upper[1]], axis=-1)

    r = rho(counts.astype(np.float64))
    rbar = float(mean_rho(r))
    boot = mean_rho(rho(_resample(counts, n_bootstrap, rng or np.random.default_rng(0)).astype(np.float64)))
    lo, hi = _percentile(boot[np.isfinite(boot)])
    undefined = [judges[j] for j in range(k) if np.isnan(r[j, j])]  # r_jj = 1 exactly when j's errors vary
    note = (f"errors of {', '.join(undefined)} do not vary on these pairs: their correlations are undefined and left "
            "out of the mean") if undefined else None
    if math.isnan(rbar):
        note = note or "no pair of judges has a defined error correlation"
    elif rbar < 0:
        note = (note + "; " if note else "") + "the judges err on different pairs (ρ̄ < 0): n_eff exceeds n"
    return ErrorCorrelation(judges, r.tolist(), rbar, (lo, hi), n_eff(k, rbar), (n_eff(k, hi), n_eff(k, lo)),
                            n_items, n_items < MIN_DECIDED, note)


def n_eff(n: int, rho_mean: float) -> float:
    """Effective number of independent judges, n / (1 + (n − 1)·ρ̄) (inf where that is ≤ 0)."""
    if math.isnan(rho_mean):
        return math.nan
    den = 1.0 + (n - 1) * rho_mean
    return n / den if den > 0 else math.inf


# -- presenting ----------------------------------------------------------------------------------

ROW_HEADER = ["labeller", "n", "agreement [95% CI]", "κ [95% CI]", "P(first)", "order consistency",
              "P(prefers longer)", "vs chance: agree/decided (exact 95% CI)"]


def panel_rows(result: PanelResult | dict) -> list[dict[str, str]]:
    """One formatted row per judge and one for the panel (keys: :data:`ROW_HEADER`), for a terminal table."""
    from factory.audit.report import _agree, _f, versus_chance_cell

    d = result.to_dict() if hasattr(result, "to_dict") else result
    rows = []
    for b in [*d["per_judge"], d["panel"]]:
        pos, length = b["position"], b["length"]
        few = lambda block: " (too few)" if block.get("too_few") else ""  # noqa: E731
        cells = [b["name"], _f(b["n_pairs"]), _agree(b["agreement"], b["agreement_ci"]),
                 _agree(b["cohen_kappa"], b["kappa_ci"]) if b["cohen_kappa"] is not None else "—",
                 _f(pos["p_prefers_first"]) + few(pos) if pos["n_judgements"] else "—",
                 _f(pos["consistency"]) + few(pos) if pos["n_cells_both_orders"] else "—",
                 _f(length["ai_p_prefers_longer"]) + few(length), versus_chance_cell(b)]
        rows.append(dict(zip(ROW_HEADER, cells)))
    return rows


def panel_lines(result: PanelResult | dict) -> list[str]:
    """The inter-judge figures in words: α, Fleiss' κ, ρ̄ and n_eff, each saying when there are too few items."""
    from factory.audit.report import _agree, _f

    d = result.to_dict() if hasattr(result, "to_dict") else result
    out = []
    for key, label in (("alpha", "Krippendorff's α (nominal a/b, ties missing)"), ("fleiss", "Fleiss' κ")):
        a = d[key]
        tail = f"; {a['note']}" if a["note"] else ""
        few = f" — too few items to conclude (< {MIN_DECIDED})" if a["too_few"] else ""
        out.append(f"{label}: {_agree(a['value'], a['ci'])} on {a['n_items']:,} pairs{few}{tail}")
    e = d["errors"]
    few = f" — too few items to conclude (< {MIN_DECIDED})" if e["too_few"] else ""
    tail = f"; {e['note']}" if e["note"] else ""
    n_eff_ci = e["n_eff_ci"]
    out.append(f"error correlation ρ̄: {_agree(e['rho_mean'], e['rho_mean_ci'])}; effective independent judges "
               f"n_eff = {_f(e['n_eff'], 2)} of {len(e['judges'])} [{_f(n_eff_ci[0], 2)}, {_f(n_eff_ci[1], 2)}] on "
               f"{e['n_items']:,} human-labelled pairs{few}{tail}")
    return out


def panel_section_html(result: PanelResult | dict) -> str:
    """An HTML fragment: each judge and the panel side by side (metrics as rows), the inter-judge figures,
    and the matrix of error correlations. Every text is escaped."""
    from factory.audit.report import _e, _f, _table

    d = result.to_dict() if hasattr(result, "to_dict") else result
    rows = panel_rows(d)
    names = [r["labeller"] for r in rows]
    side = [[h, *(r[h] for r in rows)] for h in ROW_HEADER[1:]]
    e = d["errors"]
    matrix = [[j, *(_f(v) for v in row)] for j, row in zip(e["judges"], e["rho"])]
    return "".join([
        "<section class='panel'><h2>Judges side by side</h2>", _table(["", *names], side),
        "<h3>Between judges</h3><ul>", *(f"<li>{_e(line)}</li>" for line in panel_lines(d)), "</ul>",
        "<h3>Correlation of the judges' errors on the human-labelled pairs</h3>",
        _table(["", *e["judges"]], matrix), f"<p>{_e(d['settings']['error_rule'])}; panel: "
        f"{_e(d['settings']['panel_rule'])}.</p></section>",
    ])


# -- helpers -------------------------------------------------------------------------------------


def _with_lengths(human: pa.Table, judgements: pa.Table) -> pa.Table:
    """The human table with len_a/len_b: its own, else the judgements' (first per pair), else NaN."""
    if "len_a" in human.column_names and "len_b" in human.column_names:
        return human
    lengths: dict[Any, tuple] = {}
    if "len_a" in judgements.column_names and "len_b" in judgements.column_names:
        for k, la, lb in zip(*(judgements[c].to_pylist() for c in ("pair_id", "len_a", "len_b"))):
            lengths.setdefault(str(k), (la, lb))
    ids = [str(k) for k in human["pair_id"].to_pylist()]
    got = [lengths.get(k, (None, None)) for k in ids]
    return (human.drop_columns([c for c in ("len_a", "len_b") if c in human.column_names])
            .append_column("len_a", pa.array([g[0] for g in got], pa.float64()))
            .append_column("len_b", pa.array([g[1] for g in got], pa.float64())))


def _nanmean(x: np.ndarray, axis: int) -> np.ndarray:
    """np.nanmean without the 'mean of empty slice' warning (an all-NaN slice's mean is NaN, on purpose)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(x, axis=axis)


__all__ = ["Agreement", "ErrorCorrelation", "JudgeBlock", "PanelResult", "compute_panel", "error_correlation",
           "fleiss_kappa", "kappa_ci", "krippendorff_alpha", "n_eff", "panel_lines", "panel_rows",
           "panel_section_html"]
