"""Labelling a stored run: the label rule's SQL (:mod:`factory.labels`) applied to a run's judgements
in bounded parts, written to ``preferences`` (and, for a panel, ``judge_preferences``) with the
batch-calibration priors; derived data, replaced whenever the run's judgements or its rule change.
"""

from __future__ import annotations

from typing import Any

from .labels import LabelRule, check_weights, judge_labels_sql, labels_sql, priors_sql, rule_for
from .store import Store, StoreError


def label_run(store: Store, run_id: str, constitution: Any, judge: Any, *, changed: bool = True) -> dict[str, float]:
    """Recompute the run's ``preferences`` (derived data, replaced each time) and ``calibration``
    priors from its judgements; returns the summary figures. With ``changed=False`` (this invocation
    stored nothing new) labels already made by the same rule are kept as they are."""
    rule = rule_for(store, constitution, judge, run_id)
    rel = store.run_rows("judgements", "$run")
    if changed or not store.one("SELECT count(*) FROM preferences WHERE run_id = ? AND rule_hash = ?",
                                [run_id, rule.hash])[0]:
        _relabel(store, run_id, rule, rel)
    return _label_summary(store, run_id, rule)


UNIQUE_PARTS = 16


def check_unique(store: Store, run_id: str) -> None:
    """Every judgement of the run is stored once (the judgements table has no primary key: the runner
    guarantees it; this checks it before any label is made from them). Grouped in 16 parts by a hash
    of the id, so a run of millions stays within DuckDB's memory cap."""
    rel = store.run_rows("judgements", "$run")
    for part in range(UNIQUE_PARTS):
        dup = store.con.execute(f"""SELECT count(*) FROM (SELECT id FROM {rel} WHERE hash(id) % {UNIQUE_PARTS} = {part}
                                    GROUP BY id HAVING count(*) > 1)""", {"run": run_id}).fetchall()[0][0]
        if dup:
            raise StoreError(f"{store.path}: run {run_id} has judgements stored more than once; this is a bug in the "
                             "factory: please report it (labels were not made)")


# A run is labelled in parts of at most this many judgements (by a hash of the pair id: a pair's
# judgements all fall in one part), so labelling a run of many millions needs DuckDB's memory for
# one part, not for the whole run (one part: up to 50,000 pairs × 4 principles × 2 orders; at the 128 MB
# cap of a run, the labelling phase of a 1M-pair run peaked no higher than its streaming phase: 417 MB
# both, RSS sampled every 2 s).
PART_JUDGEMENTS = 400_000


def _relabel(store: Store, run_id: str, rule: LabelRule, rel: str) -> None:
    check_unique(store, run_id)
    check_weights(store, rel, rule, {"run": run_id})
    raw, cal = ("o.p_a", "f.p_a") if rule.calibrate else ("f.p_a", "o.p_a")  # the label is one of raw / calibrated
    if rule.members:  # a panel: each judge's own priors
        priors = 'SELECT judge, principle_id, "order", prior FROM judge_calibration WHERE run_id = $run'
    else:
        priors = 'SELECT principle_id, "order", prior FROM calibration WHERE run_id = $run'  # the whole run's
    with store.transaction():
        store.con.execute("DELETE FROM preferences WHERE run_id = $run", {"run": run_id})
        store.con.execute("DELETE FROM calibration WHERE run_id = $run", {"run": run_id})
        store.con.execute("DELETE FROM judge_preferences WHERE run_id = $run", {"run": run_id})
        store.con.execute("DELETE FROM judge_calibration WHERE run_id = $run", {"run": run_id})
        store.con.execute(f"INSERT INTO calibration SELECT $run, * FROM ({priors_sql(rel)})", {"run": run_id})
        if rule.members:
            store.con.execute(f"INSERT INTO judge_calibration SELECT $run, * FROM ({priors_sql(rel, rule)})",
                              {"run": run_id})
        ok = store.one("SELECT coalesce(sum(n), 0) FROM calibration WHERE run_id = ?", [run_id])[0]  # no second scan
        parts = max(1, -(-ok // PART_JUDGEMENTS))
        for part in range(parts):
            sub = f"(SELECT * FROM {rel} WHERE hash(pair_id) % {parts} = {part})" if parts > 1 else rel
            store.con.execute(f"""
                INSERT INTO preferences (run_id, pair_id, p_a, chosen, margin, is_tie, orders_agree, principles_agree,
                                         n_principles, orders_complete, created_at, p_a_raw, p_a_cal, rule_hash,
                                         n_judges, judges_agree)
                SELECT $run, f.pair_id, f.p_a, f.chosen, f.margin, f.is_tie, f.orders_agree, f.principles_agree,
                       f.n_principles, f.orders_complete, now(), {raw}, {cal}, $h, f.n_judges, f.judges_agree
                FROM ({labels_sql(sub, rule, priors)}) f
                JOIN ({labels_sql(sub, rule.with_(calibrate=not rule.calibrate), priors)}) o USING (pair_id)""",
                {"run": run_id, "h": rule.hash})
            if rule.members:
                store.con.execute(f"""INSERT INTO judge_preferences (run_id, judge, pair_id, p_a, chosen, is_tie,
                                      n_principles, orders_agree)
                                      SELECT $run, judge, pair_id, p_a, chosen, is_tie, n_principles, orders_agree
                                      FROM ({judge_labels_sql(sub, rule, priors)})""", {"run": run_id})


def _label_summary(store: Store, run_id: str, rule: LabelRule) -> dict[str, float]:
    n, ties, agree, margin = store.one(
        "SELECT count(*), count(*) FILTER (WHERE is_tie), avg(orders_agree), avg(margin) FROM preferences WHERE run_id = ?",
        [run_id])
    if not n:
        return {}
    panel = {}
    if rule.members:
        jn, jagree = store.one("SELECT max(n_judges), avg(judges_agree) FROM preferences WHERE run_id = ?", [run_id])
        panel = {"judges": len(rule.judges), "mean judges agree": float(jagree or 0.0)}
    # what labels cost: tokens of every judgement (and rationale) of the run, per pair labelled
    ptok, gtok = 0, 0
    for table in ("judgements", "rationales"):
        a, b = store.con.execute(
            f"SELECT coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0) FROM {store.run_rows(table, '$run')}",
            {"run": run_id}).fetchall()[0]  # fetched whole: DuckDB refuses new work while a result is open
        ptok, gtok = ptok + a, gtok + b
    return {"pairs labelled": n, "ties": ties, "mean orders agree": float(agree or 0.0), "mean margin": float(margin or 0.0),
            "prompt tokens/label": round(ptok / n, 1), "generated tokens/label": round(gtok / n, 2),
            **panel, "label rule": rule.name + (" (calibrated)" if rule.calibrate else "")}
