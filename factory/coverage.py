"""Principle coverage of a run's labels: was each label pooled from every principle asked about its pair?

A pair's label pools the principles with a valid judgement (``preferences.n_principles``). The
principles *asked* are those with any row for the pair in the run: a judgement (ok or failed) or a
chain-of-thought rationale (ok or failed: a rationale that failed leaves no judgement behind). A
label whose valid principles are fewer than those asked is pooled from incomplete coverage: it is
counted in the run summary (its label figures) and in `factory status`, and `factory export prefs --complete-only`
leaves it out ("incomplete principle coverage").
"""

from __future__ import annotations

from typing import Any

from .store import Store


def planned_sql(store: Store, run: str = "$run", only: str | None = None) -> str:
    """Per pair of the run bound to ``run``: ``n_asked`` principles (``only``: a relation with a
    ``principle_id`` column that narrows them, e.g. an export's principle subset)."""
    narrow = f" SEMI JOIN {only} s USING (principle_id)" if only else ""
    rows = " UNION ALL ".join(f"SELECT t.pair_id, t.principle_id FROM {store.run_rows(t, run)} t"
                              for t in ("judgements", "rationales"))
    return f"""SELECT pair_id, count(DISTINCT principle_id)::BIGINT AS n_asked
               FROM (SELECT * FROM ({rows}) a{narrow}) GROUP BY pair_id"""


def coverage(store: Store, run_id: str) -> dict[str, Any]:
    """``{"labels", "incomplete", "examples"}``: the run's labels, those pooled from fewer principles than
    were asked, and up to five of them as ``(pair_id, valid, asked)``."""
    sql = f"""SELECT p.pair_id, p.n_principles, a.n_asked FROM preferences p JOIN ({planned_sql(store)}) a
              USING (pair_id) WHERE p.run_id = $run AND p.n_principles < a.n_asked ORDER BY p.pair_id"""
    params = {"run": run_id}
    n = store.one(f"SELECT count(*) FROM ({sql})", params)[0]
    examples = store.con.execute(sql + " LIMIT 5", params).fetchall() if n else []
    labels = store.count("preferences", "run_id = ?", [run_id])
    return {"labels": labels, "incomplete": n, "examples": examples}


def flag_coverage(store: Store, run_id: str, summary: Any) -> None:
    """Count the run's incompletely covered labels among its summary's label figures (printed after a run)."""
    cov = coverage(store, run_id)
    if cov["incomplete"]:
        summary.labels[COVERAGE_KEY] = cov["incomplete"]


COVERAGE_KEY = "labels from incomplete principle coverage (export prefs --complete-only leaves them out)"


def describe(cov: dict[str, Any]) -> str | None:
    """One line for a summary, or None when every label saw every principle asked."""
    if not cov["incomplete"]:
        return None
    ex = ", ".join(f"{pid[:12]} ({valid} of {asked})" for pid, valid, asked in cov["examples"][:3])
    return (f"{cov['incomplete']:,} of {cov['labels']:,} labels pooled from incomplete principle coverage "
            f"(valid judgements for fewer principles than asked, e.g. {ex}); `factory export prefs --complete-only` "
            "leaves them out, `factory run … --retry-failed` retries the failed rows")
