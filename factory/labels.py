"""The one label rule: judgements → one AI preference label per pair, as SQL inside DuckDB.

Preferences (``factory run``), exports (``factory export prefs``, also when re-aggregating over a
subset of principles) and audits all call :func:`labels_sql` with a :class:`LabelRule`, so the same
judgements always give the same labels. For one pair:

1. each judgement's P(a better) ``p_a`` (failed judgements are left out and counted) is, when
   ``calibrate`` is on, divided by its (principle, order) prior first: batch calibration,
   ``logit p' = logit p_first − logit π`` where ``π`` is the mean P(first) of the judgements of that
   principle and order in the same relation (no extra calls), then clamped into ``clamp``;
2. a principle's cell averages its two orders (or takes the one present): the mean of the
   probabilities for the ``mean`` pool, the mean of the log-odds for the ``logit`` pool;
3. the pair's label pools its cells: ``mean`` = Σ w_k p_k / Σ w_k (the constitution's weights);
   ``logit`` = σ(Σ w_k ℓ_k) (weights fitted to human labels by ``factory audit fit``, whose scale is
   the inverse temperature; a principle not judged for a pair adds nothing);
4. ``is_tie`` = |p − 0.5| < ``tie_eps`` (or exactly 0.5), ``chosen`` = a/b/NULL (tie or no valid
   judgement), ``margin`` = |p − 0.5|·2; ties are kept and marked, never dropped.

A panel (a run with several judges, ``LabelRule.judges``) pools judges × principles: step 1 and the
calibration priors are per judge, step 2 per (judge, principle); ``mean``: each judge's label p_j
pools its principles as above and the panel's is Σ v_j p_j / Σ v_j (v_j: the judge's weight, equal by
default); ``logit``: σ(Σ_j Σ_k W_jk ℓ_jk), W_jk the fitted weight of ``"judge/principle"`` or else
v_j · w_k. ``n_judges`` counts the judges with a label for the pair, ``judges_agree`` those on the
panel label's side (a tie agrees with nothing). Which judge made a judgement is its (model, judge
settings hash), recorded per run in ``run_judges``. One judge: exactly the rule above.

Probabilities are clipped to [1e-6, 1 − 1e-6] before any log-odds (a vote share can be 0 or 1).
:func:`pair_label` is the same rule for ONE pair in Python (the judge service's answers), beside the SQL.
Labelling a stored run with it (in bounded parts, into ``preferences``): :mod:`factory.labelrun`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow as pa

from .store import PREFERENCE_SCHEMA, Store, StoreError, content_key, now

EPS = 1e-6


@dataclass(frozen=True)
class LabelRule:
    weights: dict[str, float] = field(default_factory=dict)
    tie_eps: float = 0.05
    clamp: tuple[float, float] | None = None
    calibrate: bool = False
    pool: Literal["mean", "logit"] = "mean"
    name: str = "constitution"  # where the weights come from (a fitted weight set's id otherwise)
    judges: dict[str, float] = field(default_factory=dict)  # a panel: judge -> weight (empty: one judge)
    members: tuple[tuple[str, str, str], ...] = ()  # (judge, model, judge settings hash) of a panel

    def with_(self, **kw: Any) -> "LabelRule":
        return LabelRule(**{**self.__dict__, **kw})

    @property
    def hash(self) -> str:
        d = dict(self.__dict__)
        if not self.judges:  # one judge: the hash it always had
            d.pop("judges"), d.pop("members")
        return content_key("label-rule", d)

    def with_panel(self, judges: list[dict]) -> "LabelRule":
        """This rule for a run judged by ``judges`` (store.run_judges rows): unchanged for one judge; a
        panel pools over its judges, and a reward model's pseudo-principle gets weight 1 (alone in its
        judge's label)."""
        weights = dict(self.weights)
        for j in judges:
            if j["mode"] == "reward_model":
                weights.setdefault("reward", 1.0)
        if len(judges) < 2:
            return self.with_(weights=weights) if weights != self.weights else self
        return self.with_(weights=weights, judges={j["judge"]: float(j["weight"]) for j in judges},
                          members=tuple((j["judge"], j["model"], j["sampling_hash"]) for j in judges))


def rule_for(store: Store | None, constitution: Any, judge: Any, run_id: str | None = None) -> LabelRule:
    """The run's rule: the judge's tie band, clamp and calibration, with the constitution's weights or
    the named weight set ``judge.weights`` (from ``factory audit fit``); with ``run_id``, over the
    run's panel of judges (``run_judges``)."""
    rule = LabelRule({p.id: float(p.weight) for p in constitution.principles}, tie_eps=judge.tie_eps,
                     clamp=tuple(judge.clamp) if judge.clamp else None, calibrate=judge.calibrate)
    name = getattr(judge, "weights", None)
    if name:
        if store is None:
            raise StoreError(f"judge.weights '{name}' names a fitted weight set, which lives in the database")
        row = store.one("SELECT body FROM weight_sets WHERE name = ?", [name]) if _has(store, "weight_sets") else None
        if row is None:
            raise StoreError(f"{store.path}: no weight set '{name}'; fit one with `factory audit fit` "
                             "(or remove judge.weights to use the constitution's weights)")
        body = json.loads(row[0])
        rule = rule.with_(weights=body["weights"], pool="logit", name=name, calibrate=body.get("calibrate", rule.calibrate))
    if store is not None and run_id is not None and _has(store, "run_judges"):
        rule = rule.with_panel(store.run_judges(run_id))
    return rule


def run_rule(store: Store, run_id: str) -> LabelRule:
    """The label rule a stored run was labelled with: its judge settings and its constitution (or the
    weight set it names), read back from the database."""
    from .roles import JudgeSpec
    from .constitution import Constitution

    run = store.run_row(run_id)
    if run is None:
        raise StoreError(f"{store.path}: no run '{run_id}'")
    config = json.loads(run["config_json"] or "{}")
    chash = run["constitution_hash"]
    body = store.one("SELECT body FROM configs WHERE config_hash = ?", [chash]) if chash else None
    if body is None:
        raise StoreError(f"{store.path}: run '{run_id}' has no stored constitution, so its principle weights are "
                         "unknown; rerun it with this version of the factory")
    return rule_for(store, Constitution.model_validate(json.loads(body[0])),
                    JudgeSpec.model_validate(config.get("judge", {})), run_id)


def _has(store: Store, table: str) -> bool:
    return bool(store.one("SELECT 1 FROM information_schema.tables WHERE table_name = ?", [table]))


def _lit(x: float) -> str:
    return repr(float(x))


def _clip(x: str, lo: float, hi: float) -> str:
    """``x`` clipped into [lo, hi]; NULL stays NULL (DuckDB's least/greatest skip NULLs)."""
    return f"(CASE WHEN {x} IS NULL THEN NULL ELSE least(greatest({x}, {_lit(lo)}), {_lit(hi)}) END)"


def judged_sql(judgements: str, rule: LabelRule) -> str:
    """``judgements`` with a ``judge`` column: a panel's judge of each row (by its model and judge
    settings hash), '' for one judge."""
    if not rule.members:
        return f"(SELECT *, '' AS judge FROM {judgements})"
    q = lambda x: "'" + str(x).replace("'", "''") + "'"  # noqa: E731
    vals = ", ".join(f"({q(j)}, {q(m)}, {q(h)})" for j, m, h in rule.members)
    return f"""(SELECT t.*, coalesce(m.judge, '') AS judge FROM {judgements} t LEFT JOIN (VALUES {vals})
                AS m(judge, model, sampling_hash) ON m.model = t.model AND m.sampling_hash = t.sampling_hash)"""


def priors_sql(judgements: str, rule: LabelRule | None = None) -> str:
    """Per (principle, order), and per judge of a panel (``rule``): ``prior``, the mean P(first) of the
    ok judgements (batch calibration)."""
    if rule is not None and rule.members:
        return f"""SELECT judge, principle_id, "order", avg(p_first) AS prior, count(p_first) AS n
                   FROM {judged_sql(judgements, rule)} WHERE status = 'ok' GROUP BY ALL"""
    return f"""SELECT principle_id, "order", avg(p_first) AS prior, count(p_first) AS n FROM {judgements}
               WHERE status = 'ok' GROUP BY ALL"""


def scored_sql(judgements: str, rule: LabelRule, priors: str | None = None) -> str:
    """Per judgement: pair_id, judge, principle_id, order, ``p`` (the P(a) the rule uses: calibrated if
    asked, clamped; NULL when failed), ``p_raw`` (as judged). ``priors``: a relation of
    :func:`priors_sql` computed over a larger set than ``judgements`` (a run labelled in parts); by
    default the priors of ``judgements`` itself."""
    lo, hi = rule.clamp if rule.clamp else (0.0, 1.0)
    base = f"""SELECT pair_id, judge, principle_id, "order", CASE WHEN status = 'ok' THEN p_a END AS p_raw,
                      CASE WHEN status = 'ok' THEN p_first END AS p_first FROM {judged_sql(judgements, rule)}"""
    if rule.calibrate:
        by = 'judge, principle_id, "order"' if rule.members else 'principle_id, "order"'
        pri = priors or f"SELECT {by}, prior FROM ({priors_sql(judgements, rule)})"
        cal = f"""WITH j AS ({base}),
                 pri AS ({pri}),
                 c AS (SELECT j.*, 1 / (1 + exp(-({_logit('j.p_first')} - {_logit('pri.prior')}))) AS pf
                       FROM j JOIN pri USING ({by}))
              SELECT pair_id, judge, principle_id, "order", p_raw,
                     CASE WHEN "order" = 'ab' THEN pf ELSE 1 - pf END AS p0 FROM c"""
    else:
        cal = f"SELECT pair_id, judge, principle_id, \"order\", p_raw, p_raw AS p0 FROM ({base})"
    return f"""SELECT pair_id, judge, principle_id, "order", p_raw, {_clip('p0', lo, hi)} AS p FROM ({cal})"""


def _logit(x: str) -> str:
    c = _clip(x, EPS, 1 - EPS)
    return f"ln({c} / (1 - {c}))"


def cells_sql(judgements: str, rule: LabelRule, priors: str | None = None) -> str:
    """Per (pair, judge, principle): p_ab, p_ba (mean P(a) of each order), p (their mean, or the one
    present), l (mean log-odds of the orders present), n_valid, n_failed."""
    return f"""SELECT pair_id, judge, principle_id,
                      avg(p) FILTER (WHERE "order" = 'ab') AS p_ab, avg(p) FILTER (WHERE "order" = 'ba') AS p_ba,
                      CASE WHEN count(p) FILTER (WHERE "order" = 'ab') > 0 AND count(p) FILTER (WHERE "order" = 'ba') > 0
                           THEN (avg(p) FILTER (WHERE "order" = 'ab') + avg(p) FILTER (WHERE "order" = 'ba')) / 2
                           ELSE avg(p) END AS p,
                      CASE WHEN count(p) FILTER (WHERE "order" = 'ab') > 0 AND count(p) FILTER (WHERE "order" = 'ba') > 0
                           THEN (avg({_logit('p')}) FILTER (WHERE "order" = 'ab') + avg({_logit('p')}) FILTER (WHERE "order" = 'ba')) / 2
                           ELSE avg({_logit('p')}) END AS l,
                      count(p) AS n_valid, count(*) - count(p) AS n_failed
               FROM ({scored_sql(judgements, rule, priors)}) GROUP BY pair_id, judge, principle_id"""


def _weights_sql(rule: LabelRule) -> str:
    """(judge, principle_id, w, v): a cell's weight w (fitted ``judge/principle`` weights, else the
    principle's, times the judge's for the logit pool) and its judge's weight v."""
    q = lambda x: "'" + str(x).replace("'", "''") + "'"  # noqa: E731
    judges = rule.judges or {"": 1.0}
    principles = dict.fromkeys(k.split("/", 1)[-1] for k in rule.weights)
    rows = []
    for j, v in judges.items():
        for k in principles:
            w = rule.weights.get(k)
            wk = rule.weights.get(f"{j}/{k}", None if w is None else (w * v if rule.pool == "logit" else w))
            if wk is not None:
                rows.append(f"({q(j)}, {q(k)}, {_lit(wk)}, {_lit(v)})")
    if not rows:
        return "(SELECT NULL AS judge, NULL AS principle_id, NULL AS w, NULL AS v WHERE false)"
    return f"(SELECT * FROM (VALUES {', '.join(rows)}) AS w(judge, principle_id, w, v))"


def labels_sql(judgements: str, rule: LabelRule, priors: str | None = None) -> str:
    """Per pair (columns of ``preferences`` minus run_id/created_at, plus n_judgements, n_failed and
    p_a_raw/p_a_cal where the rule computes them): the label of :mod:`this module <factory.labels>`
    (``priors``: see :func:`scored_sql`)."""
    eps = _lit(rule.tie_eps)
    if rule.pool == "logit":
        per_judge = "sum(c.w * c.l) FILTER (WHERE c.l IS NOT NULL)"  # a judge's log-odds; σ of the sum is the label
        pooled = "1 / (1 + exp(-sum(jl.s) FILTER (WHERE jl.s IS NOT NULL)))"
        judge_p = "1 / (1 + exp(-jl.s))"
    else:
        per_judge = "sum(c.w * c.p) FILTER (WHERE c.p IS NOT NULL) / nullif(sum(c.w) FILTER (WHERE c.p IS NOT NULL), 0)"
        pooled = "sum(jl.v * jl.s) FILTER (WHERE jl.s IS NOT NULL) / nullif(sum(jl.v) FILTER (WHERE jl.s IS NOT NULL), 0)"
        judge_p = "jl.s"
    return f"""
      WITH c AS (SELECT cells.*, w.w, w.v FROM ({cells_sql(judgements, rule, priors)}) cells LEFT JOIN {_weights_sql(rule)} w
                 USING (judge, principle_id)),
           jl AS (SELECT pair_id, judge, {per_judge} AS s, any_value(c.v) AS v FROM c GROUP BY pair_id, judge),
           pj AS (SELECT pair_id, {pooled} AS p_a,
                         count(*) FILTER (WHERE jl.s IS NOT NULL) AS n_judges FROM jl GROUP BY pair_id),
           agg AS (SELECT pair_id,
                          count(*) FILTER (WHERE c.p IS NOT NULL) AS n_principles,
                          count(*) FILTER (WHERE c.p_ab IS NOT NULL AND c.p_ba IS NOT NULL) AS n_complete,
                          count(*) FILTER (WHERE c.p_ab IS NOT NULL AND c.p_ba IS NOT NULL
                                           AND (c.p_ab > 0.5) = (c.p_ba > 0.5)) AS n_agree,
                          sum(c.n_valid) AS n_judgements, sum(c.n_failed) AS n_failed
                   FROM c GROUP BY pair_id),
           side AS (SELECT c.pair_id, count(*) FILTER (WHERE sign(c.p - 0.5) = sign(pj.p_a - 0.5)) AS same
                    FROM c JOIN pj USING (pair_id) GROUP BY c.pair_id),
           jside AS (SELECT jl.pair_id, count(*) FILTER (WHERE sign({judge_p} - 0.5) = sign(pj.p_a - 0.5)
                                                        AND abs(pj.p_a - 0.5) >= {eps} AND pj.p_a <> 0.5) AS same
                     FROM jl JOIN pj USING (pair_id) GROUP BY jl.pair_id)
      SELECT pair_id, pj.p_a AS p_a,
             CASE WHEN pj.p_a IS NULL OR abs(pj.p_a - 0.5) < {eps} OR pj.p_a = 0.5 THEN NULL
                  WHEN pj.p_a > 0.5 THEN 'a' ELSE 'b' END AS chosen,
             abs(pj.p_a - 0.5) * 2 AS margin,
             coalesce(abs(pj.p_a - 0.5) < {eps} OR pj.p_a = 0.5, false) AS is_tie,
             CASE WHEN n_complete > 0 THEN n_agree / n_complete END AS orders_agree,
             coalesce(side.same, 0)::BIGINT AS principles_agree,
             n_principles::BIGINT AS n_principles, (n_complete = n_principles AND n_principles > 0) AS orders_complete,
             n_judgements::BIGINT AS n_judgements, n_failed::BIGINT AS n_failed,
             pj.n_judges::BIGINT AS n_judges, coalesce(jside.same, 0)::BIGINT AS judges_agree
      FROM agg JOIN pj USING (pair_id) LEFT JOIN side USING (pair_id) LEFT JOIN jside USING (pair_id)"""


def judge_labels_sql(judgements: str, rule: LabelRule, priors: str | None = None) -> str:
    """Per (pair, judge) of a panel: each judge's own label (its principles pooled by the same rule)."""
    eps = _lit(rule.tie_eps)
    if rule.pool == "logit":
        p = "1 / (1 + exp(-sum(c.w * c.l) FILTER (WHERE c.l IS NOT NULL)))"
    else:
        p = "sum(c.w * c.p) FILTER (WHERE c.p IS NOT NULL) / nullif(sum(c.w) FILTER (WHERE c.p IS NOT NULL), 0)"
    return f"""
      WITH c AS (SELECT cells.*, w.w FROM ({cells_sql(judgements, rule, priors)}) cells LEFT JOIN {_weights_sql(rule)} w
                 USING (judge, principle_id)),
           j AS (SELECT pair_id, judge, {p} AS p_a, count(*) FILTER (WHERE c.p IS NOT NULL) AS n_principles,
                        avg(CASE WHEN c.p_ab IS NOT NULL AND c.p_ba IS NOT NULL
                                 THEN ((c.p_ab > 0.5) = (c.p_ba > 0.5))::INT END) AS orders_agree
                 FROM c GROUP BY pair_id, judge)
      SELECT pair_id, judge, p_a,
             CASE WHEN p_a IS NULL OR abs(p_a - 0.5) < {eps} OR p_a = 0.5 THEN NULL
                  WHEN p_a > 0.5 THEN 'a' ELSE 'b' END AS chosen,
             coalesce(abs(p_a - 0.5) < {eps} OR p_a = 0.5, false) AS is_tie, n_principles::BIGINT AS n_principles,
             orders_agree FROM j"""


def check_weights(store: Store, judgements: str, rule: LabelRule, params: Any = None) -> None:
    """Every judged principle must have a weight: a principle left out of the pooling would
    silently change every label it touches."""
    _check([p for (p,) in store.con.execute(f"SELECT DISTINCT principle_id FROM {judgements}", params or {}).fetchall()],
           rule)


def _check(principles: list[str], rule: LabelRule) -> None:
    known = set(rule.weights) | {k.split("/", 1)[-1] for k in rule.weights}  # "judge/principle": a panel's fit
    missing = [p for p in principles if p not in known]
    if missing:
        raise StoreError(f"no weight for principle(s) {sorted(missing)[:5]} in weight set '{rule.name}'; add them to the "
                         f"constitution (or the weight set), or drop their judgements (known: {sorted(rule.weights)[:10]})")


def labels_of(judgements: pa.Table, rule: LabelRule) -> pa.Table:
    """The labels of judgements held in Arrow (pair_id, principle_id, order, p_a with NaN or null =
    failed; ``status``/``p_first`` are derived when absent): the same SQL, in an in-memory DuckDB."""
    import duckdb

    con = duckdb.connect()
    try:
        con.register("_j", judgements)
        cols = judgements.column_names
        status = "status" if "status" in cols else "CASE WHEN p_a IS NULL OR isnan(p_a) THEN 'failed' ELSE 'ok' END"
        p_first = "p_first" if "p_first" in cols else "CASE WHEN \"order\" = 'ab' THEN p_a ELSE 1 - p_a END"
        judge = ", model, sampling_hash" if {"model", "sampling_hash"} <= set(cols) else ""  # a panel's judges
        rel = f"""(SELECT pair_id, principle_id, "order", {status} AS status{judge},
                          CASE WHEN isnan(p_a) THEN NULL ELSE {p_first} END AS p_first,
                          CASE WHEN isnan(p_a) THEN NULL ELSE p_a END AS p_a FROM _j)"""
        _check(sorted({p for p in judgements.column("principle_id").to_pylist()}), rule)
        return con.sql(labels_sql(rel, rule) + " ORDER BY pair_id").to_arrow_table()
    finally:
        con.close()


def cell_weights(rule: LabelRule) -> dict[tuple[str, str], tuple[float, float]]:
    """(judge, principle) -> (w, v): the weights :func:`_weights_sql` gives the SQL (judge '' for one judge)."""
    judges = rule.judges or {"": 1.0}
    out = {}
    for j, v in judges.items():
        for k in dict.fromkeys(k.split("/", 1)[-1] for k in rule.weights):
            w = rule.weights.get(k)
            wk = rule.weights.get(f"{j}/{k}", None if w is None else (w * v if rule.pool == "logit" else w))
            if wk is not None:
                out[(j, k)] = (float(wk), float(v))
    return out


def _sigmoid(x: float) -> float:
    return 0.0 if x < -700 else 1 / (1 + math.exp(-x))


def _side(p: float | None, eps: float) -> tuple[bool, str | None]:
    tie = p is not None and (abs(p - 0.5) < eps or p == 0.5)
    return tie, None if p is None or tie else ("a" if p > 0.5 else "b")


def pair_label(judgements: Any, rule: LabelRule, weights: dict | None = None) -> dict:
    """The label of ONE pair in Python, by the rule of :func:`labels_sql` step for step (the SQL costs
    ~10-30 ms a call, far over the judge service's budget for an answer from the store; ``tests/
    test_serve_panel.py`` checks the two agree on random panels). ``judgements``: ``(judge, principle_id,
    order, status, p_a)`` (judge ignored for a rule of one judge); ``weights``: :func:`cell_weights` of
    ``rule``, computed once by a caller labelling many pairs. No batch calibration (it needs a run's
    priors). Returns ``p_a`` (None: no valid judgement), ``chosen``, ``is_tie``, ``n_judges``,
    ``judges_agree`` and ``judges``: per judge its own ``p_a``, ``chosen``, ``is_tie``."""
    p_a, judge_p = pair_p_a(judgements, rule, weights)
    tie, chosen = _side(p_a, rule.tie_eps)
    per = {}
    for j, p in judge_p.items():
        jt, jc = _side(p, rule.tie_eps)
        per[j] = {"p_a": p, "chosen": jc, "is_tie": jt}
    agree = 0 if p_a is None or tie else sum(1 for p in judge_p.values() if (p > 0.5) - (p < 0.5) == (p_a > 0.5) - (p_a < 0.5))
    return {"p_a": p_a, "chosen": chosen, "is_tie": tie, "n_judges": len(judge_p), "judges_agree": agree, "judges": per}


def pair_p_a(judgements: Any, rule: LabelRule, weights: dict | None = None) -> tuple[float | None, dict[str, float]]:
    """:func:`pair_label`'s pooled P(a) and each judge's own, without the rest of the label (what a
    group's rewards read): the judges × principles × orders pooling of the one label rule."""
    if rule.calibrate:
        raise ValueError("pair_label has no batch priors; pass rule.with_(calibrate=False)")
    weights = cell_weights(rule) if weights is None else weights
    lo, hi = rule.clamp if rule.clamp else (0.0, 1.0)
    by_judge = bool(rule.judges)
    cells: dict[tuple[str, str], tuple[list, list]] = {}
    for judge, pid, order, status, p in judgements:
        c = (judge if by_judge else "", pid)
        ab_ba = cells.get(c)
        if ab_ba is None:
            ab_ba = cells[c] = ([], [])
        if status == "ok" and p is not None and p == p:
            ab_ba[order != "ab"].append(lo if p < lo else hi if p > hi else p)
    logit = rule.pool == "logit"
    mean = (lambda xs: sum(map(_logit_py, xs)) / len(xs)) if logit else (lambda xs: sum(xs) / len(xs))
    acc: dict[str, list[float]] = {}  # judge -> [Σ w p, Σ w, Σ w ℓ, v]
    for (j, pid), (ab, ba) in cells.items():
        wv = weights.get((j, pid))
        if wv is None or not (ab or ba):
            continue
        # the mean of the two orders' means (of P(a); of log-odds for pool: logit), one order's alone if the other is missing
        x = (mean(ab) + mean(ba)) / 2 if ab and ba else mean(ab or ba)
        a = acc.get(j)
        if a is None:
            a = acc[j] = [0.0, 0.0, 0.0, wv[1]]
        if logit:
            a[2] += wv[0] * x
        else:
            a[0], a[1] = a[0] + wv[0] * x, a[1] + wv[0]
    if logit:
        s = {j: a[2] for j, a in acc.items()}
        return (_sigmoid(sum(s.values())) if s else None), {j: _sigmoid(x) for j, x in s.items()}
    s = {j: a[0] / a[1] for j, a in acc.items() if a[1] != 0}
    den = sum(acc[j][3] for j in s)
    return (sum(acc[j][3] * x for j, x in s.items()) / den if s and den != 0 else None), s


def _logit_py(p: float) -> float:
    p = min(max(p, EPS), 1 - EPS)
    return math.log(p / (1 - p))


def labels_table(store: Store, judgements: str, rule: LabelRule, params: Any = None) -> pa.Table:
    """The labels of a judgements relation as an Arrow table (exports, audits)."""
    check_weights(store, judgements, rule, params)
    return store.con.sql(labels_sql(judgements, rule), params=params).to_arrow_table()


__all__ = ["LabelRule", "rule_for", "run_rule", "labels_sql", "judge_labels_sql", "judged_sql", "cells_sql", "scored_sql", "labels_table",
           "labels_of", "priors_sql", "pair_label", "cell_weights",
           "check_weights", "PREFERENCE_SCHEMA", "now"]
