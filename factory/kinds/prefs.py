"""The preference (RLAIF) run kind: build pairs, judge them per principle in both orders, label them.

Pairs come from a file (read lazily in chunks), from the policy's own samples (n per prompt; a
prompt's pairs are made as soon as its samples are stored) or from SL runs in the same database
(initial answer vs final revision, read from DuckDB in chunks). Every ok pair is judged through the
configured judge mode (:mod:`factory.judges`); when the stream is done, the run's labels are made
by the one label rule (:mod:`factory.labels`) as SQL inside DuckDB.
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import judges
from ..roles import load_prefs_pipeline
from ..constitution import load_constitution
from ..fewshot import check_judge
from ..inputs import chunked
from ..labelrun import label_run
from ..runner import Job, Write
from ..runs import Loaded, RunContext, RunKind, Summary
from . import KINDS, register_kind
from ..sources import SqlReader, open_source, pair_parser, prompt_row, text_limit
from ..coverage import flag_coverage
from ..stages import judge as J
from ..stages import sl
from ..store import Store, StoreError, content_key
from ..templates import load_template

def sl_pairs_sql(store: Store, run: str | None) -> str:
    """Initial answer vs final (highest-round ok) revision of each prompt, per SL run (or one run)."""
    runs = [run] if run else store.run_ids("sl")
    parts = []
    for r in runs:
        q = "'" + r.replace("'", "''") + "'"
        parts.append(f"""SELECT p.messages, a.id, a.text, f.id, f.text, f.prompt_id FROM
              (SELECT *, row_number() OVER (PARTITION BY prompt_id ORDER BY round DESC) AS k
               FROM {store.run_rows('revisions', q)} WHERE status = 'ok') f
              JOIN {store.run_rows('responses', q)} a ON a.prompt_id = f.prompt_id AND a.status = 'ok'
              JOIN prompts p ON p.prompt_id = f.prompt_id WHERE f.k = 1""")
    if not parts:
        return "SELECT NULL, NULL, NULL, NULL, NULL, NULL WHERE false"
    return " UNION ALL ".join(f"SELECT * FROM ({x})" for x in parts) + " ORDER BY 6, 2"


@register_kind
class PrefsKind(RunKind):
    name = "prefs"
    tables = ("samples", "judgements", "rationales")

    def load(self, path: str | Path) -> Loaded:
        cfg = load_prefs_pipeline(path)
        templates = judge_templates(cfg)
        if cfg.pairs.source == "sample":
            templates["answer"] = load_template(cfg.answer_template)
        constitution = load_constitution(cfg.constitution)
        check_judge(str(path), cfg, constitution)  # comparison principles, judge.few_shot examples
        return Loaded(str(path), "prefs", cfg, constitution, templates)

    def describe(self, lp: Loaded) -> str:
        out = f"{len(lp.constitution.principles)} principles"
        if lp.cfg.uses_roles():
            roles = lp.judge_roles()
            out += f", {len(roles)} judge{'s' * (len(roles) != 1)}" + (f" ({', '.join(r.name for r in roles)})"
                                                                        if roles else " (samples only)")
        return out

    def execute(self, ctx: RunContext) -> None:
        lp, store = ctx.lp, ctx.store
        panel = judges.setup_panel(store, ctx.engines, lp.judge_roles(), run_id=lp.run_id,
                                   constitution=lp.constitution, templates=lp.templates)

        def judge(pair_rows: list[dict]) -> list[Job]:
            pairs = [J.Pair(r["pair_id"], json.loads(r["conversation"]), r["response_a"], r["response_b"])
                     for r in pair_rows if r["status"] == "ok"]
            return judges.panel_jobs(panel, pairs)

        src = lp.cfg.pairs
        if src.source == "sample":
            self._sampled(ctx, ctx.engine("policy"), judge, panel)
        else:
            if src.source == "file":
                reader = open_source(src.path, src.split, src.data_dir, "pairs")
                parse = pair_parser(src.format)
                to_pair = lambda r: {**J.pair_row(None, r["response_a"], r["response_b"], source="file",  # noqa: E731
                                                  pair_id=r["pair_id"], conversation_json=r["conversation"]),
                                     "source_row": r["source_row"]}
            else:
                reader = SqlReader(store, sl_pairs_sql(store, src.run), f"{store.path} (SL runs; row = pair number)")
                parse = lambda row, rec: {**J.pair_row(json.loads(rec[0]), rec[2], rec[4], source="sl",  # noqa: E731
                                                       prompt_id=rec[5], a_id=rec[1], b_id=rec[3]), "source_row": row}
                to_pair = None
            done, changed = ctx.done_chunks("pairs", reader.fingerprint)
            inputs = chunked(store, lp.run_id, "pairs", reader, parse, entity="pairs", expand=lambda rows, _: judge(rows),
                             done=done, chunk_size=chunk_size(lp, panel), limit=src.limit, to_entity=to_pair,
                             max_chars=text_limit(min(e.max_model_len for e in ctx.engines.values())))
            ctx.stream("pairs", inputs, progress=lambda: reader.progress, full_probe=changed)
            if src.source == "sl" and not store.count("run_pairs", "run_id = ?", [lp.run_id]):
                raise StoreError(f"{lp.cfg.db}: no completed SL revisions to pair" + (f" for run '{src.run}'" if src.run else "")
                                 + "; run an SL pipeline into this db first (`factory run pipelines/demo.yaml`)")

    def _sampled(self, ctx: RunContext, engine, judge, panel) -> None:
        lp, store = ctx.lp, ctx.store
        src = lp.cfg.pairs
        sampling = src.sampling.to_sampling(n=src.n)
        shash = store.put_config("sampling", {**sampling.as_dict(), "engine_seed": engine.seed})
        sctx = sl.Ctx(run_id=lp.run_id, model=engine.model, seed=engine.seed, constitution=lp.constitution,
                      templates={"answer": lp.templates["answer"]}, sampling={"answer": sampling},
                      sampling_hash={"answer": shash})

        def expand(rows, before):
            jobs = []
            for r in rows:
                conv = json.loads(r["messages"])
                j = sctx.job("answer", lp.templates["answer"].render(conversation=conv), prompt_id=r["prompt_id"],
                             parents=[], round=0, principles=[])
                j.table, j.to_rows, j.need, j.route = "samples", _sample_rows, ("text", "sample_index"), "policy"
                j.row_ids = tuple(content_key(j.key, i) for i in range(src.n))
                j.then = lambda got, conv=conv, pid=r["prompt_id"]: _pairs_then(lp.run_id, got, conv, pid, judge)
                jobs.append(j)
            return jobs

        p = src.prompts
        reader = open_source(p.path, p.split, p.data_dir, "prompts")
        done, changed = ctx.done_chunks("prompts", reader.fingerprint)
        inputs = chunked(store, lp.run_id, "prompts", reader, lambda row, rec: prompt_row(row, rec, p.field),
                         entity="prompts", expand=expand, done=done, chunk_size=chunk_size(lp, panel), limit=p.limit,
                         max_chars=text_limit(engine.max_model_len))
        ctx.stream("prompts", inputs, progress=lambda: reader.progress, full_probe=changed)
        ctx.summary.prompts = store.count("run_prompts", "run_id = ?", [lp.run_id])

    def finish(self, ctx: RunContext) -> None:
        s, store = ctx.summary, ctx.store
        s.pairs = store.count("run_pairs", "run_id = ?", [ctx.run_id])
        for err, n in store.con.execute(
                f"SELECT error, count(*) FROM {store.run_rows('pairs', '?')} t WHERE t.status <> 'ok' GROUP BY 1",
                [ctx.run_id]).fetchall():
            s.failures[f"pairs skipped: {err}"] = n
        s.labels = label_run(store, ctx.run_id, ctx.lp.constitution, ctx.lp.cfg.judge,
                             changed=s.written > 0 or s.reused > s.skipped_jobs)
        flag_coverage(store, ctx.run_id, s)  # labels pooled from fewer principles than asked

    def input_fingerprints(self, lp: Loaded) -> dict[str, str | None] | None:
        src = lp.cfg.pairs
        if src.source == "sample":
            p = src.prompts
            return {"prompts": open_source(p.path, p.split, p.data_dir, "prompts").fingerprint}
        if src.source == "file":
            return {"pairs": open_source(src.path, src.split, src.data_dir, "pairs").fingerprint}
        return None  # pairs from SL runs in the database: always looked at again

    def render(self, lp: Loaded, stage: str, example: int) -> list[dict]:
        from ..render import render_judge

        return render_judge(lp, example)


def chunk_size(lp: Loaded, panel: list) -> int:
    """Input records per chunk: ``chunk_inputs``, divided among a panel's judges (a chunk's planned jobs
    are what a run holds in memory, and each judge adds a pair's judgements again)."""
    return max(1, lp.cfg.chunk_inputs // max(1, len(panel)))


def judge_templates(cfg) -> dict:
    """The judge template, and a judge's own where its settings name another (part of the run id)."""
    templates = {"judge": load_template(cfg.judge.template)}
    for r in cfg.judge_roles():
        if r.judge.template != cfg.judge.template:
            templates[f"judge:{r.name}"] = load_template(r.judge.template)
    return templates


def _sample_rows(job: Job, c) -> list[dict]:
    """A completion with n samples → n rows of ``samples`` (each keyed by request key + index)."""
    rows = []
    texts = c.texts or [None]
    for i, text in enumerate(texts):
        status, error = c.status, c.error
        if status == "ok" and not (text or "").strip():
            status, error = "failed", "empty model output"
        rows.append({**job.row, "id": job.ids[i] if i < len(job.ids) else content_key(job.key, i), "sample_index": i,
                     "text": text, "status": status, "error": error, "prompt_tokens": c.prompt_tokens,
                     "completion_tokens": c.completion_tokens // max(len(texts), 1),
                     "finish_reason": c.finish_reasons[i] if i < len(c.finish_reasons) else None,
                     "created_at": J.now()})
    return rows


def _pairs_then(run_id: str, samples: list[dict], conv: list[dict], prompt_id: str, judge):
    """A prompt's samples are stored: its pairs (written with the run's rows) and their judgements."""
    pairs = [{**r, "run_id": run_id} for r in J.pairs_from_samples(samples, conv, prompt_id)]
    if not pairs:
        return []
    return [Write("pairs", pairs), Write("run_pairs", [{"run_id": run_id, "pair_id": r["pair_id"], "source_row": None}
                                                       for r in pairs]), *judge(pairs)]


KIND = KINDS[PrefsKind.name]


def load(path: str | Path) -> Loaded:
    return KIND.load(path)


def run(path: str | Path, **kw) -> Summary:
    """Run (or resume) the preference pipeline at ``path``."""
    from . import run as run_any

    return run_any(path, **kw)


__all__ = ["KIND", "load", "run", "Store"]
