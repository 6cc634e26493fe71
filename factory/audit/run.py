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
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import pyarrow as pa
from pydantic import Field, model_serializer

from .. import judges
from ..config import JudgeSpec, RunConfig, Strict, local_source
from ..constitution import Constitution, load_constitution
from ..coverage import flag_coverage
from ..engines import Engine
from ..human import human_table, import_into, set_info
from ..inputs import chunked
from ..labels import label_run, rule_for, run_rule
from ..runs import Loaded, RunContext, RunKind
from ..runs import run as run_any
from ..sources import SqlReader, text_limit
from ..stages import judge as J
from ..store import Store, StoreError, content_key, now
from ..templates import load_template
from ..yamlconf import load_yaml_model
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
        if not self.offset:  # issue 22: a file without `offset` keeps its run id
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


class AuditPipeline(RunConfig):
    kind: Literal["audit"]
    human: HumanSpec
    judge: JudgeSpec = JudgeSpec()
    model: str = Field("smollm2-135m", description="the feedback model under audit")
    audit: AuditSettings = AuditSettings()

    # the audit's scoring settings do not change what is judged: not part of the run id
    NOT_IDENTITY: ClassVar[tuple[str, ...]] = ("audit",)


class AuditKind(RunKind):
    name = "audit"
    tables = ("judgements", "rationales")

    def load(self, path: str | Path) -> Loaded:
        cfg = load_yaml_model(path, AuditPipeline, what="pipeline")
        constitution = load_constitution(cfg.constitution)
        return Loaded(str(path), "audit", cfg, constitution, {"judge": load_template(cfg.judge.template)})

    def settings(self, ctx: RunContext) -> AuditSettings:
        over = {k: v for k, v in ctx.options.items() if k in ("naive_principle", "report_dir") and v is not None}
        return ctx.lp.cfg.audit.model_copy(update={k: str(v) if k == "report_dir" else v for k, v in over.items()})

    def execute(self, ctx: RunContext) -> None:
        lp, store, cfg = ctx.lp, ctx.store, ctx.lp.cfg
        c = lp.constitution
        settings = self.settings(ctx)
        naive = settings.naive_principle or c.principles[0].id
        c.principle(naive)  # an unknown id is a clear error before any work
        h = cfg.human
        set_id, n, skips = import_into(store, h.path, format=h.format, name=h.name, limit=h.limit, split=h.split,
                                       data_dir=h.data_dir, offset=h.offset,
                                       max_chars=text_limit(cfg.engine.max_model_len))
        ctx.summary.extra["set_id"] = set_id
        store.record_skips(lp.run_id, "human", skips)
        engine = ctx.engine()
        jctx, mode = judges.setup(store, engine, cfg.judge, run_id=lp.run_id, constitution=c,
                                  template=lp.templates["judge"])
        spec = cfg.judge
        extra_naive = settings.naive_all_pairs and spec.per_pair is not None and spec.per_pair < len(c.principles)

        def expand(rows, _):
            pairs = [J.Pair(r["pair_id"], json.loads(r["conversation"]), r["response_a"], r["response_b"]) for r in rows]
            jobs = judges.pair_jobs(jctx, mode, pairs, lambda p: J.choose(c, spec.per_pair, spec.seed, p.pair_id))
            if extra_naive:  # the naive principle on every pair, as "<run>-naive": this run's own judgements
                # (its labels, `--run` audits, exports) stay exactly the configured sample
                jobs += judges.pair_jobs(jctx, mode, pairs, lambda p: [c.principle(naive)], run_id=naive_run(lp.run_id))
            return jobs

        reader = SqlReader(store, """SELECT p.pair_id, p.conversation, p.response_a, p.response_b FROM human_labels h
                                     JOIN pairs p USING (pair_id) WHERE h.set_id = ? ORDER BY h.source_row""",
                           f"human set {set_id}", [set_id])
        parse = lambda row, rec: {"pair_id": rec[0], "source_row": row, "conversation": rec[1],  # noqa: E731
                                  "response_a": rec[2], "response_b": rec[3], "status": "ok"}
        ctx.own_runs = [naive_run(lp.run_id)]
        done, changed = ctx.done_chunks("pairs", reader.fingerprint)
        inputs = chunked(store, lp.run_id, "pairs", reader, parse, entity="pairs", expand=expand, done=done,
                         chunk_size=cfg.chunk_inputs)
        ctx.stream("pairs", inputs, own_runs=[naive_run(lp.run_id)], full_probe=changed)
        ctx.summary.extra["naive"] = naive

    def finish(self, ctx: RunContext) -> None:
        lp, store, cfg = ctx.lp, ctx.store, ctx.lp.cfg
        s = ctx.summary
        s.pairs = store.count("run_pairs", "run_id = ?", [lp.run_id])
        s.labels = label_run(store, lp.run_id, lp.constitution, cfg.judge, changed=s.written > 0 or s.reused > s.skipped_jobs)
        flag_coverage(store, lp.run_id, s)
        settings = self.settings(ctx).model_copy(update={"naive_principle": s.extra["naive"]})
        naive_j = run_judgements(store, naive_run(lp.run_id), cfg.judge.clamp)
        c = lp.constitution
        meta = {"run": lp.run_id, "pipeline": lp.path, "model": cfg.model,
                "constitution": f"{c.name} v{c.version} ({c.hash})", "judge": _judge_meta(cfg.judge.model_dump())}
        rule = rule_for(store, c, cfg.judge)
        settings.constitution_weights = _weights(c)
        audit_id, result, report = _audit(store, lp.run_id, s.extra["set_id"], rule,
                                          naive_j if naive_j.num_rows else None, settings, meta)
        s.extra.update(audit_id=audit_id, report_path=report)
        s.extra["result"] = result

    def render(self, lp: Loaded, stage: str, example: int) -> list[dict]:
        from ..render import render_judge

        return render_judge(lp, example)


KIND = AuditKind()


def load(path: str | Path) -> Loaded:
    return KIND.load(path)



def run(path: str | Path, *, engine: Engine | None = None, quiet: bool = False, naive_principle: str | None = None,
        report_dir: str | Path | None = None, retry_failed: bool = False):
    """``factory run`` entry for ``kind: audit``: judge the human set's pairs (or resume), audit, report.

    ``naive_principle``/``report_dir`` override the file's ``audit:`` section."""
    s = run_any(path, engine=engine, quiet=quiet, retry_failed=retry_failed, naive_principle=naive_principle,
                report_dir=report_dir)
    s.set_id, s.audit_id = s.extra.get("set_id", ""), s.extra.get("audit_id", "")
    s.report_path, s.result = s.extra.get("report_path", ""), s.extra.pop("result", None)
    if not quiet and s.result is not None:
        with Store(s.db, read_only=True) as store:
            skips = set_info(store, s.set_id)["skips"].get("by_reason", [])
        show(s.audit_id, s.result, s.report_path, skips)
    return s


def naive_run(run_id: str) -> str:
    """The run id under which an audit run makes its extra naive-principle judgements."""
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
        rule = run_rule(store, run_id)
        settings.constitution_weights = {p["id"]: float(p.get("weight", 1.0)) for p in json.loads(body[0])["principles"]}
        naive_j = run_judgements(store, naive_run(run_id), judge_cfg.clamp)
        info = set_info(store, human_set)  # a clear error for an unknown set
        overlap = store.one(f"SELECT count(DISTINCT h.pair_id) FROM human_labels h SEMI JOIN "
                            f"{store.run_rows('judgements', '$run')} t ON t.pair_id = h.pair_id WHERE h.set_id = $set",
                            {"run": run_id, "set": human_set})[0]
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
        audit_id, result, report = _audit(store, run_id, human_set, rule, naive_j, settings, meta)
    if not quiet:
        show(audit_id, result, report, info["skips"].get("by_reason", []))
    return audit_id, result, Path(report)


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


def _weights(c: Constitution) -> dict[str, float]:
    return {p.id: float(p.weight) for p in c.principles}


def _judge_meta(j: dict[str, Any]) -> str:
    keys = ("mode", "per_pair", "seed", "options", "tie_eps", "clamp", "template")
    return ", ".join(f"{k}={j.get(k)}" for k in keys)
