"""DuckDB tables of behavioural evals: one row per generation and one per score.

Every row's ``id`` is a content key over everything that determined it: for a generation the
model identity (``engine.model``), engine seed, sampling, template hash, suite, suite version, item
id, turn and the exact messages (which carry the parent reply); for a score the scorer, its rule
or rubric template hash, the judge's identity and seed, and the generation's id. A rerun asks the
engine only for missing keys, so a killed eval resumes where it stopped. The DDL below runs when a
store is opened for writing (read paths tolerate its absence). Summary rows go to ``evals``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import pyarrow as pa

from ..engines.base import Completion, Request
from ..runner import InputChunk, Job, Runner, TableStats
from ..store import TABLE_SCHEMAS, Store, content_key, ddl, now

GENERATION_SCHEMA = pa.schema([
    ("id", pa.string()), ("suite", pa.string()), ("suite_version", pa.string()), ("item_id", pa.string()),
    ("turn", pa.int32()), ("parent_id", pa.string()), ("sample_index", pa.int32()), ("model", pa.string()),
    ("seed", pa.int64()), ("sampling_hash", pa.string()), ("template_hash", pa.string()), ("messages", pa.string()),
    ("text", pa.string()), ("status", pa.string()), ("error", pa.string()), ("prompt_tokens", pa.int32()),
    ("completion_tokens", pa.int32()), ("finish_reason", pa.string()), ("created_at", pa.timestamp("us", tz="UTC")),
])
SCORE_SCHEMA = pa.schema([
    ("id", pa.string()), ("subject_id", pa.string()),  # a generation id (or a best-of-n pair key)
    ("suite", pa.string()), ("item_id", pa.string()),
    ("scorer", pa.string()),  # judge | keyword | match | pairwise | rm
    ("variant", pa.string()),  # rubric order (cr/rc), principle/order, turn, RM member
    ("rule_hash", pa.string()),  # rubric template hash or rule hash
    ("model", pa.string()), ("seed", pa.int64()), ("sampling_hash", pa.string()),
    ("logprob_first", pa.float64()), ("logprob_second", pa.float64()),
    ("value", pa.float64()),  # P(refused) | 0/1 | P(a better) | reward
    ("detail", pa.string()), ("status", pa.string()), ("error", pa.string()), ("prompt_tokens", pa.int32()),
    ("created_at", pa.timestamp("us", tz="UTC")),
])
GENERATIONS, SCORES = "behaviour_generations", "behaviour_scores"
# written through the one runner (factory.runner.Runner): each row records the eval step that made it
# (``run_id``) and its input chunk, so a killed eval skips its finished chunks on the rerun
RUNNER_COLUMNS = [pa.field("run_id", pa.string()), pa.field("chunk", pa.int64())]
DDL = (ddl(GENERATIONS, GENERATION_SCHEMA), ddl(SCORES, SCORE_SCHEMA),
       *(f"ALTER TABLE {t} ADD COLUMN IF NOT EXISTS {c} {k}" for t in (GENERATIONS, SCORES)
         for c, k in (("run_id", "VARCHAR"), ("chunk", "BIGINT"))))
TABLE_SCHEMAS[GENERATIONS] = pa.schema([*GENERATION_SCHEMA, *RUNNER_COLUMNS])  # how the runner writes them
TABLE_SCHEMAS[SCORES] = pa.schema([*SCORE_SCHEMA, *RUNNER_COLUMNS])


def judge_key(judge, rubric_hash: str, gen_id: str, order: str, options: tuple[str, ...]) -> str:
    """A judge score: the judge's identity and seed, the rubric template, the reply, the order."""
    return content_key("judge", judge.model, judge.seed, rubric_hash, gen_id, order, options)


def keyword_key(rule: str, gen_id: str) -> str:
    return content_key("keyword", rule, gen_id)


def match_key(rule: str, gen_id: str, answers: tuple[str, ...]) -> str:
    return content_key("match", rule, gen_id, answers)


def open_store(db, owner: str) -> Store:
    """The store opened for writing (writer lock held by ``owner``) with these tables in place."""
    store = Store(db, writer_run=owner)
    for stmt in DDL:
        store.con.execute(stmt)
    return store


def has_tables(store: Store) -> bool:
    names = {r[0] for r in store.con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    return GENERATIONS in names and SCORES in names


@dataclass
class Work:
    """One request and the row fields it will be stored with (besides its outcome)."""

    request: Request
    row: dict


Step = TableStats  # one step's counts: ``table`` holds the step's name (as in a run's per-table stats)


def generation_rows(work: Work, c: Completion) -> list[dict]:
    """A completion → one row per sample (``id`` = the request key for a single sample)."""
    texts = c.texts or [None]
    rows = []
    for i, text in enumerate(texts):
        status, error = c.status, c.error
        if status == "ok" and not (text or "").strip():
            status, error = "failed", "empty model output"
        rows.append({**work.row, "id": sample_key(work.request.key, i, len(texts)), "sample_index": i, "text": text,
                     "status": status, "error": error, "prompt_tokens": c.prompt_tokens,
                     "completion_tokens": c.completion_tokens // max(len(texts), 1),
                     "finish_reason": c.finish_reasons[i] if i < len(c.finish_reasons) else None,
                     "created_at": now()})
    return rows


def sample_key(request_key: str, i: int, n: int) -> str:
    return request_key if n == 1 else content_key(request_key, i)


def run_step(store: Store, engine, table: str, work: list[Work], to_rows: Callable[[Work, Completion], list[dict]],
             schema: pa.Schema, *, name: str, first_row: Callable[[str], str] | None = None,
             chunk_rows: int = 64, chunk_seconds: float = 5.0, chunk_inputs: int = 64,
             on_done: Callable[[int], None] | None = None) -> Step:
    """Run ``work`` through the one runner (:class:`factory.runner.Runner`): keys already stored are
    reused, the rest go to ``engine`` in one request stream, rows are written in transactions of
    ``chunk_rows`` rows (or every ``chunk_seconds``) with the completion record of every finished
    input chunk of ``chunk_inputs`` work items, so a rerun after a kill skips finished chunks without
    probing them. The step's run id hashes its table, name, engine and keys (``first_row`` is kept
    for callers; a request of n samples stores the n rows ``sample_key`` names)."""
    keys = [w.request.key for w in work]
    run_id = f"eval-{content_key(table, name, engine.model, keys)[:16]}"
    step = Step(name, planned=len(work))
    if not work:
        return step
    done = {c for (c,) in store.con.execute("SELECT chunk FROM chunks WHERE run_id = ? AND stage = ?",
                                            [run_id, name]).fetchall()}

    def job(w: Work) -> Job:
        n = w.request.sampling.n
        def rows(j: Job, c: Completion) -> list[dict]:
            if on_done:
                on_done(1)
            return [{**r, "run_id": run_id} for r in to_rows(w, c)]
        return Job(table, w.request.key, {**w.row, "run_id": run_id}, build=lambda: w.request, to_rows=rows,
                   row_ids=tuple(sample_key(w.request.key, i, n) for i in range(n)) if n > 1 else None)

    parts = [work[i:i + chunk_inputs] for i in range(0, len(work), chunk_inputs)]
    inputs = (InputChunk(i, {"engine": engine.model}, plan=lambda part=part: [job(w) for w in part])
              for i, part in enumerate(parts) if i not in done)
    runner = Runner(store, engine, run_id, stage=name, chunk_rows=chunk_rows, chunk_seconds=chunk_seconds,
                    full_probe=True, quiet=True)
    runner.run(inputs)
    st = runner.stats.get(table, TableStats(table))
    skipped = sum(len(p) for i, p in enumerate(parts) if i in done)
    step.reused, step.written = st.reused + skipped, st.written
    step.requests, step.prompt_tokens, step.completion_tokens, step.seconds = (
        st.requests, st.prompt_tokens, st.completion_tokens, st.seconds)
    if on_done and step.reused:
        on_done(step.reused)
    return step


def insert_scores(store: Store, rows: Iterable[dict]) -> int:
    return store.insert(SCORES, [{**r, "created_at": r.get("created_at") or now()} for r in rows], SCORE_SCHEMA)


__all__ = ["DDL", "GENERATIONS", "GENERATION_SCHEMA", "SCORES", "SCORE_SCHEMA", "Step", "Work", "generation_rows",
           "has_tables", "insert_scores", "judge_key", "keyword_key", "match_key", "open_store", "run_step",
           "sample_key"]
