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
from pathlib import Path

from ..roles import JudgeSpec
from ..engines import Engine
from ..human import set_info
from ..labels import run_rule
from ..store import Store, StoreError
from .core import (AuditPipeline, AuditSettings, HumanSpec, _audit, _judge_meta, compare_audits,  # noqa: F401
                   load_result, naive_run, run_judgements, show)
from .metrics import AuditResult


def run(path: str | Path, *, engine: Engine | None = None, quiet: bool = False, naive_principle: str | None = None,
        report_dir: str | Path | None = None, retry_failed: bool = False):
    """``factory run`` entry for ``kind: audit``: judge the human set's pairs (or resume), audit, report.

    ``naive_principle``/``report_dir`` override the file's ``audit:`` section."""
    from ..kinds import run as run_any

    s = run_any(path, engine=engine, quiet=quiet, retry_failed=retry_failed, naive_principle=naive_principle,
                report_dir=report_dir)
    s.set_id, s.audit_id = s.extra.get("set_id", ""), s.extra.get("audit_id", "")
    s.report_path, s.result = s.extra.get("report_path", ""), s.extra.pop("result", None)
    if not quiet and s.result is not None:
        with Store(s.db, read_only=True) as store:
            skips = set_info(store, s.set_id)["skips"].get("by_reason", [])
        show(s.audit_id, s.result, s.report_path, skips)
    return s


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
        row = store.run_row(run_id)
        if row is None:
            raise StoreError(f"{db}: no run '{run_id}'; runs in this db: {store.run_ids() or 'none'}")
        run_row = [row[k] for k in ("model", "constitution_name", "constitution_version", "constitution_hash",
                                    "config_json")]
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


