"""Running a preference (RLAIF) pipeline: build pairs, judge them per principle in both orders,
aggregate to one soft label per pair. Same resume rules as the SL pipeline (content keys)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from . import prefmath
from .config import load_prefs_pipeline
from .constitution import Constitution, load_constitution
from .engines import Engine, ensure_engine
from .pipeline import Loaded, Summary, finish_run, load_prompts, open_run, release
from .runner import progress, run_wave
from .sources import read_pairs
from .stages import judge as J
from .stages import sl
from .store import JUDGEMENT_SCHEMA, PAIR_SCHEMA, PREFERENCE_SCHEMA, SAMPLE_SCHEMA, Store, StoreError, now
from .templates import load_template


@dataclass
class PrefsSummary(Summary):
    pairs: int = 0
    pairs_skipped: dict[str, int] = field(default_factory=dict)
    labels: dict[str, float] = field(default_factory=dict)


def load(path: str | Path) -> Loaded:
    cfg = load_prefs_pipeline(path)
    templates = {"judge": load_template(cfg.judge.template)}
    if cfg.pairs.source == "sample":
        templates["answer"] = load_template(cfg.answer_template)
    return Loaded(str(path), cfg, load_constitution(cfg.constitution), templates)


def _sampled_pairs(store: Store, lp: Loaded, engine: Engine, summary: PrefsSummary, bar, wave) -> list[dict]:
    src = lp.cfg.pairs
    prompts, summary.input_skips = load_prompts(store, lp, src.prompts)
    summary.prompts = len(prompts)
    sampling = src.sampling.to_sampling(n=src.n)
    shash = store.put_config("sampling", {**sampling.as_dict(), "engine_seed": engine.seed})
    ctx = sl.Ctx(run_id=lp.run_id, model=engine.model, seed=engine.seed, constitution=lp.constitution)
    jobs = sl.answer_jobs(prompts, lp.templates["answer"], sampling, shash, ctx)
    row_keys = lambda key: [J.content_key(key, i) for i in range(src.n)]  # noqa: E731
    summary.waves.append(run_wave(store, engine, "samples", jobs, to_rows=J.sample_rows, schema=SAMPLE_SCHEMA,
                                  bar=bar, row_keys=row_keys, **wave))
    keys = [k for j in jobs for k in row_keys(j.request.key)]
    rows = store.fetch("samples", keys, "t.id, t.prompt_id, t.sample_index, t.text, t.status").to_pylist()
    return J.pairs_from_samples(rows, dict(prompts))


def _sl_pairs(store: Store, lp: Loaded) -> list[dict]:
    """Initial answer vs final (highest-round ok) revision of each prompt of the SL run(s)."""
    run = lp.cfg.pairs.run
    rows = store.con.execute(
        """WITH final AS (
             SELECT v.*, row_number() OVER (PARTITION BY v.prompt_id, ri.run_id ORDER BY v.round DESC) AS k
             FROM revisions v JOIN run_items ri ON ri.id = v.id AND ri."table" = 'revisions'
             JOIN runs ON runs.run_id = ri.run_id AND runs.kind = 'sl'
             WHERE v.status = 'ok' AND (? IS NULL OR ri.run_id = ?))
           SELECT p.messages, r.id, r.text, f.id, f.text FROM final f
           JOIN responses r ON r.prompt_id = f.prompt_id AND r.status = 'ok'
           JOIN run_items rr ON rr.id = r.id AND rr."table" = 'responses' AND rr.run_id = (
                SELECT run_id FROM run_items WHERE id = f.id AND "table" = 'revisions' LIMIT 1)
           JOIN prompts p ON p.prompt_id = f.prompt_id
           WHERE f.k = 1""", [run, run]).fetchall()
    if not rows:
        raise StoreError(f"{lp.cfg.db}: no completed SL revisions to pair" + (f" for run '{run}'" if run else "")
                         + "; run an SL pipeline into this db first (`factory run pipelines/demo.yaml`)")
    return [J.pair_row(json.loads(m), a, b, source="sl", a_id=aid, b_id=bid) for m, aid, a, bid, b in rows]


def _file_pairs(lp: Loaded, summary: PrefsSummary) -> list[dict]:
    src = lp.cfg.pairs
    table, summary.input_skips = read_pairs(src.path, format=src.format, split=src.split, data_dir=src.data_dir,
                                            limit=src.limit)
    out = []
    for r in table.to_pylist():
        out.append(J.pair_row(json.loads(r["conversation"]), r["response_a"], r["response_b"], source="file"))
    return out


def judge_pairs(store: Store, lp: Loaded, engine: Engine, pair_rows: list[dict], summary, bar, wave) -> list[str]:
    """Judge every ok pair (per principle, both orders); returns the judgement keys of this run."""
    cfg = lp.cfg.judge
    option_ids = J.option_token_ids(engine, cfg.options)
    scoring = {"mode": cfg.mode, "options": cfg.options, "engine_seed": engine.seed, "max_tokens": 1, "temperature": 0}
    cot_sampling = J.Sampling(max_tokens=cfg.cot_max_tokens, temperature=cfg.cot_temperature) if cfg.mode == "cot" else None
    if cot_sampling:
        scoring["cot"] = cot_sampling.as_dict()
    ctx = J.JudgeCtx(run_id=lp.run_id, model=engine.model, seed=engine.seed, constitution=lp.constitution,
                     template=lp.templates["judge"], options=cfg.options, option_ids=option_ids,
                     sampling_hash=store.put_config("sampling", scoring), max_chars=cfg.max_conversation_chars,
                     cot=cfg.mode == "cot", cot_sampling=cot_sampling)
    pairs = [J.Pair(r["pair_id"], json.loads(r["conversation"]), r["response_a"], r["response_b"])
             for r in pair_rows if r["status"] == "ok"]
    chosen = {p.pair_id: J.choose(lp.constitution, cfg.per_pair, cfg.seed, p.pair_id) for p in pairs}
    rationales = None
    if ctx.cot:
        rjobs = J.rationale_jobs(ctx, pairs, chosen)
        summary.waves.append(run_wave(store, engine, "rationales", rjobs, bar=bar, **wave))
        got = {r["id"]: r for r in store.fetch("rationales", [j.request.key for j in rjobs], "t.id, t.text, t.status").to_pylist()}
        rationales = {(j.row["pair_id"], j.row["principle_id"], j.row["order"]): got[j.request.key]["text"].strip()
                      for j in rjobs if got[j.request.key]["status"] == "ok"}
    jobs = J.judge_jobs(ctx, pairs, chosen, rationales)
    for batch in J.cache_waves(jobs):
        summary.waves.append(run_wave(store, engine, "judgements", batch, to_rows=J.judgement_row(option_ids),
                                      schema=JUDGEMENT_SCHEMA, bar=bar, **wave))
    return [j.request.key for j in jobs]


def aggregate(store: Store, run_id: str, constitution: Constitution, judge_keys: list[str], tie_eps: float,
              clamp) -> pa.Table:
    """Recompute this run's per-pair labels from its judgements (derived data: replaced each run)."""
    j = store.fetch("judgements", judge_keys, "t.pair_id, t.principle_id, t.\"order\", t.p_a")
    weights = {p.id: p.weight for p in constitution.principles}
    agg = prefmath.aggregate_pairs(j.column("pair_id"), j.column("principle_id"), j.column("order"),
                                   j.column("p_a").fill_null(float("nan")), weights, tie_eps=tie_eps,
                                   clamp=tuple(clamp) if clamp else None)
    n = agg.num_rows
    out = pa.table({
        "run_id": pa.array([run_id] * n, pa.string()), "pair_id": agg.column("pair_id"),
        "p_a": agg.column("p_a"), "chosen": agg.column("chosen"), "margin": agg.column("margin"),
        "is_tie": agg.column("is_tie"), "orders_agree": agg.column("orders_agree"),
        "principles_agree": agg.column("principles_agree").cast(pa.int64()),
        "n_principles": agg.column("n_principles").cast(pa.int64()),
        "orders_complete": agg.column("orders_complete"),
        "created_at": pa.array([now()] * n, pa.timestamp("us", tz="UTC")),
    }, schema=PREFERENCE_SCHEMA)
    store.con.execute("DELETE FROM preferences WHERE run_id = ?", [run_id])
    store.insert("preferences", out)
    return out


def build_pairs(store: Store, lp: Loaded, engine: Engine, summary, bar, wave) -> list[dict]:
    src = lp.cfg.pairs.source
    if src == "sample":
        rows = _sampled_pairs(store, lp, engine, summary, bar, wave)
    elif src == "sl":
        rows = _sl_pairs(store, lp)
    else:
        rows = _file_pairs(lp, summary)
    for r in rows:
        r["run_id"] = lp.run_id
    store.insert("pairs", rows, PAIR_SCHEMA)
    store.link_run(lp.run_id, "pairs", [r["pair_id"] for r in rows])
    store.record_skips(lp.run_id, "pairs", summary.input_skips)
    for r in rows:
        if r["status"] != "ok":
            summary.pairs_skipped[r["error"]] = summary.pairs_skipped.get(r["error"], 0) + 1
    summary.pairs = len(rows)
    return rows


def run(path: str | Path, *, engine: Engine | None = None, quiet: bool = False) -> PrefsSummary:
    """Run (or resume) the preference pipeline at ``path``."""
    lp = load(path)
    start = time.perf_counter()
    store = open_run(lp, "prefs", lp.cfg.model)
    summary = PrefsSummary(run_id=lp.run_id, db=lp.cfg.db)
    owned: list = []  # an engine this call built is closed by it; a passed-in one is the caller's
    try:
        wave = dict(run_id=lp.run_id, chunk_rows=lp.cfg.chunk_rows)
        with progress(quiet) as bar:
            if lp.cfg.pairs.source in ("sl", "file"):
                rows = build_pairs(store, lp, None, summary, bar, wave)
                engine = ensure_engine(engine, lp.cfg.engine, lp.cfg.model, owned)
            else:
                engine = ensure_engine(engine, lp.cfg.engine, lp.cfg.model, owned)
                rows = build_pairs(store, lp, engine, summary, bar, wave)
            keys = judge_pairs(store, lp, engine, rows, summary, bar, wave)
        labels = aggregate(store, lp.run_id, lp.constitution, keys, lp.cfg.judge.tie_eps, lp.cfg.judge.clamp)
        if labels.num_rows:
            summary.labels = {
                "pairs labelled": labels.num_rows,
                "ties": int(pc.sum(labels.column("is_tie")).as_py() or 0),
                "mean orders agree": float(pc.mean(labels.column("orders_agree")).as_py() or 0.0),
                "mean margin": float(pc.mean(labels.column("margin")).as_py() or 0.0),
            }
        summary.seconds = time.perf_counter() - start
        finish_run(store, lp.run_id, summary, ["samples", "judgements", "rationales"])
    finally:
        release(store, owned)
    return summary
