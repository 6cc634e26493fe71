"""What an audit is made of, below the run kinds: its pipeline settings, the run's judgements as a
table, and :func:`_audit` (labels by the one label rule → metrics → ``audits`` row + HTML report).
The entry points (``factory audit``, ``factory run`` on a ``kind: audit`` file) are in
:mod:`factory.audit.run`; the run kind in :mod:`factory.kinds.audit`."""


from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import pyarrow as pa
from pydantic import Field, model_serializer

from ..config import RunConfig, Strict, local_source
from ..roles import JudgeSpec, RolesMixin
from ..constitution import Constitution
from ..human import human_table, set_info
from ..store import Store, StoreError, content_key, now
from .metrics import AuditResult, compute_audit


class HumanSpec(Strict):
    path: Annotated[str, local_source("human labels")] = Field(description="human-labelled pairs: hh-rlhf or generic JSONL file, or a HF dataset name")
    format: Literal["auto", "hh-rlhf", "jsonl"] = "auto"
    name: str | None = Field(None, description="the set id (default: file stem + content hash)")
    limit: int | None = Field(None, ge=1, description="the first N usable pairs")
    offset: int = Field(0, ge=0, description="skip the first N pairs (counted as `export human --offset`)")
    split: str = "test"
    data_dir: str | None = None

    @model_serializer(mode="wrap")
    def _snapshot(self, handler):
        data = handler(self)
        if not self.offset:  # a file without `offset` keeps its run id
            data.pop("offset", None)
        return data


class AuditSettings(Strict):
    naive_principle: str | None = Field(None, description="the naive baseline's one principle (default: the "
                                        "constitution's first)")
    naive_all_pairs: bool = Field(True, description="when judge.per_pair samples principles, also judge the "
                                  "naive principle on every pair (≤ 2 requests a pair): both labellers see the "
                                  "same pairs")
    n_bootstrap: int = Field(1000, ge=0)
    seed: int = 0
    n_bins: int = Field(10, ge=1, description="reliability-diagram bins")
    length_gap: float = Field(30.0, ge=0, description="length-bias metrics use pairs whose lengths differ by more")
    top_divergent: int = Field(20, ge=0, description="rows in the divergence table")
    report_dir: str | None = Field(None, description="where the HTML report goes (default: beside the db)")
    constitution_weights: dict[str, float] | None = Field(None, exclude=True, description="set by the audit itself")


class AuditPipeline(RolesMixin, RunConfig):
    kind: Literal["audit"]
    human: HumanSpec
    judge: JudgeSpec = JudgeSpec()
    model: str = Field("smollm2-135m", description="the feedback model under audit")
    audit: AuditSettings = AuditSettings()

    # the audit's scoring settings do not change what is judged: not part of the run id
    NOT_IDENTITY: ClassVar[tuple[str, ...]] = ("audit",)
    NEW_KEYS: ClassVar[tuple[str, ...]] = ("judges",)



def naive_run(run_id: str) -> str:
    """The run id under which an audit run makes its extra naive-principle judgements."""
    return f"{run_id}-naive"


def run_judgements(store: Store, run_id: str, clamp: tuple[float, float] | None) -> pa.Table:
    """(pair_id, principle_id, order, p_a) of a run, failed judgements as NaN, the judge's clamp applied."""
    lo, hi = clamp if clamp else (0.0, 1.0)
    return store.con.sql(
        f"""SELECT pair_id, principle_id, "order",
                   CASE WHEN p_a IS NULL OR status <> 'ok' THEN 'NaN'::DOUBLE
                        ELSE least(greatest(p_a, {float(lo)}), {float(hi)}) END AS p_a
            FROM {store.run_rows('judgements', '$run')} ORDER BY pair_id, principle_id, "order" """,
        params={"run": run_id}).to_arrow_table()


def _audit(store: Store, run_id: str, set_id: str, rule: Any, naive_judgements: pa.Table | None,
           settings: AuditSettings, meta: dict[str, Any]) -> tuple[str, AuditResult, str]:
    """compute_audit → audits row + HTML report; returns (audit_id, result, report path).

    The run's labels come from the one label rule (:mod:`factory.labels`) over its judgements, with
    the run's own rule; the same pairs are also scored raw (no calibration), batch-calibrated and,
    where the run uses a fitted weight set, with the constitution's weights, as variants.
    ``naive_judgements`` (the naive principle judged on every pair) replaces the naive block that
    compute_audit would take from the run's judgements (where a sampled principle covers only some pairs)."""
    from ..labels import LabelRule, cells_sql, labels_table
    from .report import write_html

    rel, params = store.run_rows("judgements", "$run"), {"run": run_id}
    judgements = run_judgements(store, run_id, rule.clamp)
    weights = rule.weights
    naive = settings.naive_principle
    judged = set(judgements.column("principle_id").unique().to_pylist())
    if naive is None:  # the constitution's first principle that was judged (not the alphabetical first)
        naive = next((p for p in weights if p in judged), None)
    elif naive not in judged and naive_judgements is None:
        raise StoreError(f"naive_principle '{naive}' has no judgements in run {run_id}; judged: {sorted(judged)}")
    human = human_table(store, set_id)
    kw = dict(tie_eps=rule.tie_eps, n_bootstrap=settings.n_bootstrap, seed=settings.seed, n_bins=settings.n_bins,
              length_gap=settings.length_gap, top_divergent=settings.top_divergent)
    variants = {"raw (no calibration)": rule.with_(calibrate=False),
                "batch-calibrated": rule.with_(calibrate=True)}
    if rule.pool == "logit" and settings.constitution_weights:  # a fitted run: also the constitution's weights
        variants["constitution weights"] = LabelRule(settings.constitution_weights, rule.tie_eps, rule.clamp,
                                                     rule.calibrate)
    cells = store.con.sql(f"SELECT pair_id, principle_id, p FROM ({cells_sql(rel, rule)})", params=params).to_arrow_table()
    result = compute_audit(judgements, human, weights, naive_principle=naive if naive in judged else None,
                           labels=labels_table(store, rel, rule, params), cells=cells,
                           variants={k: labels_table(store, rel, r, params) for k, r in variants.items()}, **kw)
    result.settings["label_rule"] = {"name": rule.name, "pool": rule.pool, "calibrate": rule.calibrate,
                                     "clamp": rule.clamp, "hash": rule.hash}
    if rule.members:  # a panel: each judge's own labels and the panel's, side by side
        result.panel = panel_audit(store, rel, rule, params, human, kw)
        result.settings["label_rule"]["judges"] = rule.judges
    how = "its own judgements on every pair"
    if naive_judgements is not None:
        result.naive = compute_audit(naive_judgements, human, weights, naive_principle=naive, **kw).naive
        result.settings["naive_principle"] = naive
    else:
        how = "the pairs where the judge's principles include it"
    result.settings["naive_scope"] = f"{result.naive.n_pairs} of {result.overall.n_pairs} audited pairs ({how})"
    info = set_info(store, set_id)
    audit_id = content_key("audit", run_id, set_id, settings.model_dump(exclude={"report_dir"}), naive, rule.hash)[:10]
    db = store.path
    report = Path(settings.report_dir or db.parent) / f"{db.stem}-audit-{audit_id}.html"
    skips = info["skips"].get("by_reason", [])
    meta = {**meta, "audit id": audit_id, "database": str(db),
            "human set": f"{set_id} ({info['n_pairs']} pairs, {info['n_skipped']} rows skipped, from {info['source']})",
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "skips": skips}
    title = f"Audit of {meta['model']} labels against human set {set_id}"
    sections = ()
    if result.panel:
        from .panel import panel_section_html

        sections = (panel_section_html(result.panel),)
    write_html(result, report, title=title, meta=meta, sections=sections)
    store.con.execute("INSERT OR REPLACE INTO audits VALUES (?, ?, ?, ?, ?, ?)",
                      [audit_id, run_id, set_id, now(), json.dumps(result.to_dict()), str(report)])
    return audit_id, result, str(report)


def panel_audit(store: Store, rel: str, rule: Any, params: dict, human: pa.Table, kw: dict) -> dict:
    """Each judge of a panel run against the humans, their agreement with each other, and the panel
    label (the one label rule) as a labeller of its own (:func:`factory.audit.panel.compute_panel`)."""
    from ..labels import cells_sql, judge_labels_sql, labels_sql
    from .panel import compute_panel

    per_judge = store.con.sql(f"""
        SELECT l.pair_id, l.judge, coalesce(l.p_a, 'NaN'::DOUBLE) AS p_a, c.p_ab, c.p_ba
        FROM ({judge_labels_sql(rel, rule)}) l LEFT JOIN
             (SELECT pair_id, judge, avg(p_ab) AS p_ab, avg(p_ba) AS p_ba FROM ({cells_sql(rel, rule)})
              GROUP BY ALL) c USING (pair_id, judge)
        WHERE l.judge <> '' ORDER BY l.pair_id, l.judge""", params=params).to_arrow_table()
    panel = store.con.sql(f"SELECT pair_id, p_a FROM ({labels_sql(rel, rule)}) WHERE p_a IS NOT NULL",
                          params=params).to_arrow_table()
    res = compute_panel(per_judge, human.select(["pair_id", "human_choice", "len_a", "len_b"]), panel,
                        tie_eps=kw["tie_eps"], n_bootstrap=kw["n_bootstrap"], seed=kw["seed"], n_bins=kw["n_bins"],
                        length_gap=kw["length_gap"])
    out = res.to_dict()
    out["weights"] = dict(rule.judges)
    return out


def show(audit_id: str, result: Any, report: str | Path, skips: list[dict[str, Any]] = ()) -> None:
    """The terminal table(s), the human rows skipped at import (by reason), the report's path."""
    from rich.console import Console

    from .report import render_terminal

    console = Console()
    render_terminal(result, console)
    panel = result.get("panel") if isinstance(result, dict) else getattr(result, "panel", None)
    if panel:  # a panel run: its judges side by side
        show_panel(panel, console)
    if skips:
        console.print(f"human rows skipped: {sum(s['count'] for s in skips)} ("
                      + "; ".join(f"{s['count']}× {s['reason']}" for s in skips) + ")", markup=False)
    console.print(f"audit {audit_id}: report {report}", markup=False, highlight=False)


def show_panel(panel: dict[str, Any], console: Any) -> None:
    """A panel's judges and the panel side by side, and the inter-judge figures, on the terminal."""
    from rich.table import Table

    from .panel import ROW_HEADER, panel_lines, panel_rows

    t = Table(title="Judges side by side (each judge's own labels, and the panel's)")
    for i, col in enumerate(ROW_HEADER):
        t.add_column(col, justify="left" if i == 0 else "right")
    for r in panel_rows(panel):
        t.add_row(*(r[h] for h in ROW_HEADER))
    console.print(t)
    for line in panel_lines(panel):
        console.print(line, markup=False)


def load_result(db: str | Path, audit_id: str) -> dict[str, Any]:
    """A stored audit's result dict (``AuditResult.to_dict()``)."""
    with Store(db, read_only=True) as store:
        row = store.one("SELECT result_json FROM audits WHERE audit_id = ?", [audit_id])
        if row is None:
            known = [r[0] for r in store.con.execute("SELECT audit_id FROM audits ORDER BY created_at").fetchall()]
            raise StoreError(f"{db}: no audit '{audit_id}'; audits in this db: {known or 'none'}")
    return json.loads(row[0])


def compare_audits(db: str | Path, a: str, b: str, db_b: str | Path | None = None):
    """A rich table comparing two stored audits (``db_b``: B lives in another database)."""
    from .report import compare_table

    return compare_table(load_result(db, a), load_result(db_b or db, b), labels=(a, b))


def _weights(c: Constitution) -> dict[str, float]:
    return {p.id: float(p.weight) for p in c.principles}


def _judge_meta(j: dict[str, Any]) -> str:
    keys = ("mode", "per_pair", "seed", "options", "tie_eps", "clamp", "template")
    return ", ".join(f"{k}={j.get(k)}" for k in keys)
