"""Running a pipeline: load and check everything, open the store, run the stages wave by wave.

Resume is not a mode: every run computes the content keys of all the rows it needs and asks the
engine only for those not stored yet. The run id is a hash of the whole configuration (pipeline,
constitution, templates), so rerunning the same command continues the same run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from .config import load_pipeline
from .constitution import Constitution, load_constitution
from .engines import Engine, ensure_engine
from .runner import WaveStats, progress, run_wave
from .sources import Skip, read_prompts
from .stages import sl
from .store import Store, now
from .templates import Template, load_template


@dataclass
class Summary:
    run_id: str
    db: str
    waves: list[WaveStats] = field(default_factory=list)
    input_skips: list[Skip] = field(default_factory=list)
    prompts: int = 0
    seconds: float = 0.0
    failures: dict[str, int] = field(default_factory=dict)  # "table: reason" -> count

    @property
    def written(self) -> int:
        return sum(w.written for w in self.waves)

    @property
    def reused(self) -> int:
        return sum(w.reused for w in self.waves)

    @property
    def requests(self) -> int:
        return sum(w.requests for w in self.waves)

    @property
    def completion_tokens(self) -> int:
        return sum(w.completion_tokens for w in self.waves)


@dataclass
class Loaded:
    """A pipeline (SL, prefs or audit config) with everything it names loaded and checked (no engine,
    no database yet). The run id hashes the whole configuration, constitution and templates."""

    path: str
    cfg: Any  # config.Pipeline | config.PrefsPipeline | audit.run.AuditPipeline
    constitution: Constitution
    templates: dict[str, Template]

    @property
    def run_id(self) -> str:
        h = self.cfg.hash(constitution=self.constitution.hash, **{k: t.hash for k, t in self.templates.items()})
        return f"{self.cfg.name}-{h[:10]}"


def load(path: str | Path) -> Loaded:
    cfg = load_pipeline(path)
    constitution = load_constitution(cfg.constitution)
    if cfg.principles.only:
        for pid in cfg.principles.only:
            constitution.principle(pid)  # raises a clear error for an unknown id
    templates = {name: load_template(getattr(cfg.templates, name)) for name in type(cfg.templates).model_fields}
    return Loaded(str(path), cfg, constitution, templates)


def open_run(lp, kind: str, model: str) -> Store:
    """Take the writer lock, record the run and its lineage blobs."""
    store = Store(lp.cfg.db, writer_run=lp.run_id)
    c = lp.constitution
    store.put_config("constitution", c.model_dump(), key=c.hash)
    for t in lp.templates.values():
        store.put_config("template", {"path": t.path, "source": t.source}, key=t.hash)
    store.con.execute(
        """INSERT OR IGNORE INTO runs (run_id, name, kind, pipeline_path, config_hash, config_json, constitution_name,
           constitution_version, constitution_hash, model, engine_json, started_at, status)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'running')""",
        [lp.run_id, lp.cfg.name, kind, lp.path, lp.cfg.hash(), json.dumps(lp.cfg.snapshot()), c.name, c.version,
         c.hash, model, lp.cfg.engine.model_dump_json(), now()],
    )
    store.con.execute("UPDATE runs SET status = 'running' WHERE run_id = ?", [lp.run_id])
    return store


def finish_run(store: Store, run_id: str, summary: Any, tables: list[str] = ()) -> None:
    """Count the run's failed/skipped rows in ``tables`` into the summary and mark the run done."""
    collect_failures(store, summary, list(tables), run_id)
    body = {"written": summary.written, "reused": summary.reused, "failures": summary.failures,
            "input_skips": len(summary.input_skips), "seconds": round(summary.seconds, 2)}
    store.con.execute("UPDATE runs SET status = 'done', finished_at = ?, summary_json = ? WHERE run_id = ?",
                      [now(), json.dumps(body), run_id])


def release(store: Store, owned: list) -> None:
    """Close the store (freeing the writer lock) and any engine the run built itself."""
    store.close()
    for engine in owned:
        engine.close()


def load_prompts(store: Store, lp: Loaded, src=None) -> tuple[list[tuple[str, list[dict]]], list[Skip]]:
    src = src or lp.cfg.prompts
    table, skips = read_prompts(src.path, field=src.field, split=src.split, data_dir=src.data_dir, limit=src.limit)
    rows = table.select(["prompt_id", "messages", "n_chars"]).append_column(
        "first_run_id", pa.array([lp.run_id] * table.num_rows))
    store.insert("prompts", rows)
    store.insert("run_prompts", table.select(["prompt_id", "source_row"]).add_column(
        0, "run_id", pa.array([lp.run_id] * table.num_rows)))
    store.record_skips(lp.run_id, "prompts", skips)
    ids = table.column("prompt_id").to_pylist()
    convs = [json.loads(m) for m in table.column("messages").to_pylist()]
    return list(zip(ids, convs)), skips


def _heads(store: Store, table: str, keys: list[str], conv: dict[str, list[dict]]) -> list[sl.Head]:
    rows = store.fetch(table, keys, "t.id, t.prompt_id, t.text, t.status").to_pylist()
    return [sl.Head(r["prompt_id"], r["id"], r["text"], conv[r["prompt_id"]]) for r in rows if r["status"] == "ok"]


def collect_failures(store: Store, summary: Any, tables: list[str], run_id: str) -> None:
    for table in tables:
        for reason, status, n in store.con.execute(
            f"""SELECT coalesce(t.error, ''), t.status, count(*) FROM {table} t JOIN run_items r
                ON r.id = t.id AND r."table" = ? AND r.run_id = ? WHERE t.status <> 'ok' GROUP BY 1, 2""",
            [table, run_id],
        ).fetchall():
            summary.failures[f"{table} {status}: {reason.split(';')[0]}"] = n


def run(path: str | Path, *, engine: Engine | None = None, quiet: bool = False) -> Summary:
    """Run (or resume) the critique→revise pipeline at ``path``."""
    import time

    lp = load(path)
    cfg, c, t = lp.cfg, lp.constitution, lp.templates
    start = time.perf_counter()
    store = open_run(lp, "sl", cfg.model)
    summary = Summary(run_id=lp.run_id, db=str(cfg.db))
    owned: list = []  # an engine this call built is closed by it; a passed-in one is the caller's
    try:
        prompts, summary.input_skips = load_prompts(store, lp)
        summary.prompts = len(prompts)
        conv = dict(prompts)
        engine = ensure_engine(engine, cfg.engine, cfg.model, owned)
        ctx = sl.Ctx(run_id=lp.run_id, model=engine.model, seed=engine.seed, constitution=c)
        samp = {name: getattr(cfg.sampling, name).to_sampling() for name in ("answer", "critique", "revise")}
        shash = {name: store.put_config("sampling", {**s.as_dict(), "engine_seed": engine.seed}) for name, s in samp.items()}
        wave = dict(run_id=lp.run_id, chunk_rows=cfg.chunk_rows)
        with progress(quiet) as bar:
            jobs = sl.answer_jobs(prompts, t["answer"], samp["answer"], shash["answer"], ctx)
            summary.waves.append(run_wave(store, engine, "responses", jobs, bar=bar, **wave))
            heads = _heads(store, "responses", [j.request.key for j in jobs], conv)
            order = [pid for pid, _ in prompts]
            for rnd in range(1, cfg.rounds + 1):
                pc = cfg.principles
                chosen = sl.choose_principles(c, pc.strategy, pc.per_round, pc.seed, order, rnd, pc.only)
                cjobs = sl.critique_jobs(heads, chosen, rnd, t["critique"], samp["critique"], shash["critique"], ctx)
                summary.waves.append(run_wave(store, engine, "critiques", cjobs, bar=bar, **wave))
                crit_rows = {r["id"]: r for r in store.fetch(
                    "critiques", [j.request.key for j in cjobs], "t.id, t.parent_id, t.text, t.status").to_pylist()}
                by_head: dict[str, list] = {}
                complete = set()
                for j in cjobs:  # a head is revised only when all of its round's critiques succeeded
                    r = crit_rows[j.request.key]
                    pid = json.loads(j.row["principle_ids"])[0]
                    by_head.setdefault(r["parent_id"], []).append((c.principle(pid), r["id"], r["text"], r["status"]))
                for hid, items in by_head.items():
                    if all(s == "ok" for *_, s in items):
                        complete.add(hid)
                crits = {hid: [(p, cid, txt) for p, cid, txt, _ in items] for hid, items in by_head.items() if hid in complete}
                rjobs = sl.revise_jobs(heads, crits, rnd, t["revise"], samp["revise"], shash["revise"], ctx)
                summary.waves.append(run_wave(store, engine, "revisions", rjobs, bar=bar, **wave))
                heads = _heads(store, "revisions", [j.request.key for j in rjobs], conv)
        summary.seconds = time.perf_counter() - start
        finish_run(store, lp.run_id, summary, ["responses", "critiques", "revisions"])
    finally:
        release(store, owned)
    return summary


def load_kind(path: str | Path):
    """The run function for the pipeline file's ``kind`` (sl by default)."""
    from .yamlconf import load_yaml_data

    data, _ = load_yaml_data(path)
    kind = data.get("kind", "sl") if isinstance(data, dict) else "sl"
    if kind == "prefs":
        from .prefs import run as run_prefs

        return run_prefs
    if kind == "audit":
        from .audit.run import run as run_audit

        return run_audit
    return run
