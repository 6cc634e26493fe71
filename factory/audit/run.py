"""Running an audit: the feedback model labels held-out human pairs, then the labels are scored.

Two ways in:

- ``audit("pipelines/x-audit.yaml")`` (also ``factory run`` on a ``kind: audit`` file): imports the
  human set named in ``human:``, judges its pairs with prefs' own machinery (both orders, the
  ``judge:`` section's principles, all of them by default) under a run of kind ``audit``, so
  resuming and content keys work exactly as in a prefs run (stored judgements are reused: a prefs
  run over the same pairs with the same judge settings shares them), then audits.
- ``audit(None, db=..., run_id=..., human_set=...)``: audits the stored judgements of an existing
  run against a human set already imported (pairs meet on ``pair_id``); nothing is judged.

Either way the judgements and human tables are built in DuckDB and handed to
:func:`factory.audit.metrics.compute_audit` with the constitution's weights and the judge's
``tie_eps``/``clamp`` (the same label the factory exports); the result goes to the ``audits``
table (``result_json``), an HTML report is written next to the database, and the terminal
summary is printed. The audit id is a content key of (run, human set, audit settings): auditing
the same thing again replaces its row and report rather than piling up copies.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field

from ..config import EngineSpec, JudgeSpec, RunName, Strict, VLLMEngineSpec
from ..constitution import Constitution, load_constitution
from ..engines import Engine, ensure_engine
from ..human import human_table, import_into, set_info, skip_counts
from ..pipeline import Loaded, finish_run, open_run, release
from ..prefs import PrefsSummary, aggregate, judge_pairs
from ..runner import progress
from ..store import Store, StoreError, content_key, now
from ..templates import load_template
from ..yamlconf import load_yaml_model
from .metrics import AuditResult, compute_audit


class HumanSpec(Strict):
    path: str = Field(description="human-labelled pairs: hh-rlhf or generic JSONL file, or a HF dataset name")
    format: Literal["auto", "hh-rlhf", "jsonl"] = "auto"
    name: str | None = Field(None, description="the set id (default: file stem + content hash)")
    limit: int | None = Field(None, ge=1, description="the first N usable pairs")
    split: str = "test"
    data_dir: str | None = None


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


class AuditPipeline(Strict):
    kind: Literal["audit"]
    name: RunName
    constitution: str
    human: HumanSpec
    judge: JudgeSpec = JudgeSpec()
    model: str = Field("smollm2-135m", description="the feedback model under audit")
    engine: EngineSpec = VLLMEngineSpec()
    db: str
    chunk_rows: int = Field(256, ge=1)
    audit: AuditSettings = AuditSettings()

    def snapshot(self) -> dict:
        return json.loads(self.model_dump_json())

    def hash(self, **extra: str) -> str:
        """The run's identity: what is judged and how (the ``audit`` scoring settings are not part of it)."""
        body = {k: v for k, v in self.snapshot().items() if k != "audit"}
        return content_key("audit", body, extra)


@dataclass
class AuditSummary(PrefsSummary):
    set_id: str = ""
    audit_id: str = ""
    report_path: str = ""
    result: AuditResult | None = None


def load(path: str | Path) -> Loaded:
    cfg = load_yaml_model(path, AuditPipeline, what="pipeline")
    constitution = load_constitution(cfg.constitution)
    return Loaded(str(path), cfg, constitution, {"judge": load_template(cfg.judge.template)})


def run(path: str | Path, *, engine: Engine | None = None, quiet: bool = False, naive_principle: str | None = None,
        report_dir: str | Path | None = None) -> AuditSummary:
    """``factory run`` entry for ``kind: audit``: judge the human set's pairs (or resume), audit, report.

    ``naive_principle``/``report_dir`` override the file's ``audit:`` section."""
    lp = load(path)
    cfg = lp.cfg
    over = {"naive_principle": naive_principle, "report_dir": None if report_dir is None else str(report_dir)}
    settings = cfg.audit.model_copy(update={k: v for k, v in over.items() if v is not None})
    c = lp.constitution
    naive = settings.naive_principle or c.principles[0].id
    c.principle(naive)  # an unknown id is a clear error before any work
    start = time.perf_counter()
    store = open_run(lp, "audit", cfg.model)
    summary = AuditSummary(run_id=lp.run_id, db=cfg.db)
    owned: list = []  # an engine this call built is closed by it; a passed-in one is the caller's
    try:
        h = cfg.human
        summary.set_id, n, summary.input_skips = import_into(store, h.path, format=h.format, name=h.name,
                                                             limit=h.limit, split=h.split, data_dir=h.data_dir)
        store.record_skips(lp.run_id, "human", summary.input_skips)
        rows = human_table(store, summary.set_id).drop_columns(["human_choice", "len_a", "len_b"])
        rows = rows.append_column("status", pa.array(["ok"] * rows.num_rows, pa.string())).to_pylist()
        store.link_run(lp.run_id, "pairs", [r["pair_id"] for r in rows])
        summary.pairs = len(rows)
        engine = ensure_engine(engine, cfg.engine, cfg.model, owned)
        wave = dict(run_id=lp.run_id, chunk_rows=cfg.chunk_rows)
        naive_keys = None
        with progress(quiet) as bar:
            keys = judge_pairs(store, lp, engine, rows, summary, bar, wave)
            per_pair = cfg.judge.per_pair
            if settings.naive_all_pairs and per_pair is not None and per_pair < len(c.principles):
                # the naive principle alone on every pair, linked under "<run>-naive" so this run's own
                # judgements (its labels, `--run` audits, exports) stay exactly the configured sample
                every = cfg.model_copy(update={"judge": cfg.judge.model_copy(update={"per_pair": None})})
                one = SimpleNamespace(cfg=every, constitution=c.model_copy(update={"principles": [c.principle(naive)]}),
                                      templates=lp.templates, run_id=lp.run_id)
                naive_wave = {**wave, "run_id": naive_run(lp.run_id)}
                naive_keys = judge_pairs(store, one, engine, rows, summary, bar, naive_wave)
                summary.waves[-1].table = f"judgements (naive: {naive})"
        labels = aggregate(store, lp.run_id, c, keys, cfg.judge.tie_eps, cfg.judge.clamp)
        summary.labels = {"pairs labelled": labels.num_rows}
        clamp = cfg.judge.clamp
        judgements = judgement_table(store, store.fetch("judgements", keys, _JCOLS), clamp)
        naive_j = None
        if naive_keys is not None:
            naive_j = judgement_table(store, store.fetch("judgements", naive_keys, _JCOLS), clamp)
        meta = {"run": lp.run_id, "pipeline": lp.path, "model": cfg.model,
                "constitution": f"{c.name} v{c.version} ({c.hash})", "judge": _judge_meta(cfg.judge.model_dump())}
        summary.audit_id, summary.result, summary.report_path = _audit(
            store, lp.run_id, summary.set_id, judgements, naive_j, _weights(c), cfg.judge.tie_eps,
            settings.model_copy(update={"naive_principle": naive}), meta)
        summary.seconds = time.perf_counter() - start
        finish_run(store, lp.run_id, summary, ["judgements", "rationales"])
    finally:
        release(store, owned)
    if not quiet:
        show(summary.audit_id, summary.result, summary.report_path, skip_counts(summary.input_skips))
    return summary


def naive_run(run_id: str) -> str:
    """The run_items id under which an audit run links its extra naive-principle judgements."""
    return f"{run_id}-naive"


def audit(pipeline: str | Path | None = None, *, db: str | Path | None = None, run_id: str | None = None,
          human_set: str | None = None, engine: Engine | None = None, quiet: bool = False,
          naive_principle: str | None = None, report_dir: str | Path | None = None
          ) -> tuple[str, AuditResult, Path]:
    """Audit a pipeline (judging what is missing) or an existing run's judgements against a human set.

    Returns (audit_id, result, report path). ``naive_principle``/``report_dir`` override the
    pipeline's ``audit:`` section.
    """
    if pipeline is not None:
        if run_id or human_set or db:
            raise StoreError("pass either an audit pipeline (it names its db and human set) or --db/--run/--human")
        s = run(pipeline, engine=engine, quiet=quiet, naive_principle=naive_principle, report_dir=report_dir)
        return s.audit_id, s.result, Path(s.report_path)
    if not (db and run_id and human_set):
        raise StoreError("audit needs a pipeline file, or --db, --run and --human (an imported set)")
    if not Path(db).exists():
        raise StoreError(f"{db}: no such database")
    with Store(db, writer_run=f"audit:{run_id}") as store:
        run_row = store.one("SELECT model, constitution_name, constitution_version, constitution_hash, config_json "
                            "FROM runs WHERE run_id = ?", [run_id])
        if run_row is None:
            known = [r[0] for r in store.con.execute("SELECT run_id FROM runs ORDER BY started_at").fetchall()]
            raise StoreError(f"{db}: no run '{run_id}'; runs in this db: {known or 'none'}")
        model, cname, cver, chash, config_json = run_row
        config = json.loads(config_json)
        judge_cfg = JudgeSpec.model_validate(config.get("judge", {}))
        # an audit run's own scoring settings (defaults for other runs), then this call's overrides
        over = {"naive_principle": naive_principle, "report_dir": None if report_dir is None else str(report_dir)}
        settings = AuditSettings.model_validate({**config.get("audit", {}), **{k: v for k, v in over.items() if v}})
        body = store.one("SELECT body FROM configs WHERE config_hash = ?", [chash])
        if body is None:
            raise StoreError(f"{db}: run '{run_id}' has no stored constitution {chash}")
        weights = {p["id"]: float(p.get("weight", 1.0)) for p in json.loads(body[0])["principles"]}
        judgements, naive_j = (judgement_table(store, _run_judgements(store, rid), judge_cfg.clamp)
                               for rid in (run_id, naive_run(run_id)))
        info = set_info(store, human_set)  # a clear error for an unknown set
        overlap = store.one("SELECT count(DISTINCT h.pair_id) FROM human_labels h JOIN judgements t USING (pair_id) "
                            "JOIN run_items r ON r.id = t.id AND r.\"table\" = 'judgements' "
                            "WHERE h.set_id = ? AND r.run_id = ?", [human_set, run_id])[0]
        if not overlap:
            raise StoreError(f"{db}: run '{run_id}' judged none of the pairs of human set '{human_set}'; "
                             "audit a pipeline over that set instead (`factory audit pipelines/<x>-audit.yaml`)")
        meta = {"run": run_id, "model": model, "constitution": f"{cname} v{cver} ({chash})",
                "judge": _judge_meta(judge_cfg.model_dump())}
        asked = settings.naive_principle
        if not naive_j.num_rows or (asked and asked not in naive_j["principle_id"].to_pylist()):
            naive_j = None  # no separate naive judgements (a prefs run, or another principle asked for)
        elif not settings.naive_principle:
            settings.naive_principle = naive_j["principle_id"][0].as_py()
        audit_id, result, report = _audit(store, run_id, human_set, judgements, naive_j, weights, judge_cfg.tie_eps,
                                          settings, meta)
    if not quiet:
        show(audit_id, result, report, info["skips"].get("by_reason", []))
    return audit_id, result, Path(report)


_JCOLS = 't.pair_id, t.principle_id, t."order" AS "order", t.p_a'


def judgement_table(store: Store, j: pa.Table, clamp: tuple[float, float] | None) -> pa.Table:
    """(pair_id, principle_id, order, p_a) with failed judgements as NaN and the judge's clamp applied."""
    lo, hi = clamp if clamp else (0.0, 1.0)
    store.con.register("_j", j)
    try:
        return store.con.sql(
            f"""SELECT pair_id, principle_id, "order",
                       CASE WHEN p_a IS NULL THEN 'NaN'::DOUBLE ELSE least(greatest(p_a, {float(lo)}), {float(hi)}) END
                       AS p_a FROM _j""").to_arrow_table()
    finally:
        store.con.unregister("_j")


def _audit(store: Store, run_id: str, set_id: str, judgements: pa.Table, naive_judgements: pa.Table | None,
           weights: dict[str, float], tie_eps: float, settings: AuditSettings, meta: dict[str, Any]
           ) -> tuple[str, AuditResult, str]:
    """compute_audit → audits row + HTML report; returns (audit_id, result, report path).

    ``naive_judgements`` (the naive principle judged on every pair) replaces the naive block that
    compute_audit would take from ``judgements`` (where a sampled principle covers only some pairs)."""
    from .report import write_html

    naive = settings.naive_principle
    judged = set(judgements.column("principle_id").unique().to_pylist())
    if naive is None:  # the constitution's first principle that was judged (not the alphabetical first)
        naive = next((p for p in weights if p in judged), None)
    elif naive not in judged and naive_judgements is None:
        raise StoreError(f"naive_principle '{naive}' has no judgements in run {run_id}; judged: {sorted(judged)}")
    human = human_table(store, set_id)
    kw = dict(tie_eps=tie_eps, n_bootstrap=settings.n_bootstrap, seed=settings.seed, n_bins=settings.n_bins,
              length_gap=settings.length_gap, top_divergent=settings.top_divergent)
    result = compute_audit(judgements, human, weights, naive_principle=naive if naive in judged else None, **kw)
    how = "its own judgements on every pair"
    if naive_judgements is not None:
        result.naive = compute_audit(naive_judgements, human, weights, naive_principle=naive, **kw).naive
        result.settings["naive_principle"] = naive
    else:
        how = "the pairs where the judge's principles include it"
    result.settings["naive_scope"] = f"{result.naive.n_pairs} of {result.overall.n_pairs} audited pairs ({how})"
    info = set_info(store, set_id)
    audit_id = content_key("audit", run_id, set_id, settings.model_dump(exclude={"report_dir"}), naive)[:10]
    db = store.path
    report = Path(settings.report_dir or db.parent) / f"{db.stem}-audit-{audit_id}.html"
    skips = info["skips"].get("by_reason", [])
    meta = {**meta, "audit id": audit_id, "database": str(db),
            "human set": f"{set_id} ({info['n_pairs']} pairs, {info['n_skipped']} rows skipped, from {info['source']})",
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "skips": skips}
    title = f"Audit of {meta['model']} labels against human set {set_id}"
    write_html(result, report, title=title, meta=meta)
    store.con.execute("INSERT OR REPLACE INTO audits VALUES (?, ?, ?, ?, ?, ?)",
                      [audit_id, run_id, set_id, now(), json.dumps(result.to_dict()), str(report)])
    return audit_id, result, str(report)


def show(audit_id: str, result: Any, report: str | Path, skips: list[dict[str, Any]] = ()) -> None:
    """The terminal table(s), the human rows skipped at import (by reason), the report's path."""
    from rich.console import Console

    from .report import render_terminal

    console = Console()
    render_terminal(result, console)
    if skips:
        console.print(f"human rows skipped: {sum(s['count'] for s in skips)} ("
                      + "; ".join(f"{s['count']}× {s['reason']}" for s in skips) + ")", markup=False)
    console.print(f"audit {audit_id}: report {report}", markup=False, highlight=False)


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


def list_audits(db: str | Path) -> pa.Table:
    with Store(db, read_only=True) as store:
        return store.arrow("SELECT audit_id, run_id, set_id, created_at, report_path FROM audits ORDER BY created_at")


def _run_judgements(store: Store, run_id: str) -> pa.Table:
    return store.con.sql(f"""SELECT {_JCOLS} FROM judgements t JOIN run_items r ON r.id = t.id
                             AND r."table" = 'judgements' WHERE r.run_id = ?""", params=[run_id]).to_arrow_table()


def _weights(c: Constitution) -> dict[str, float]:
    return {p.id: float(p.weight) for p in c.principles}


def _judge_meta(j: dict[str, Any]) -> str:
    keys = ("mode", "per_pair", "seed", "options", "tie_eps", "clamp", "template")
    return ", ".join(f"{k}={j.get(k)}" for k in keys)
