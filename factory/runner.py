"""Running one wave of requests through an engine into a store table.

A wave is every request of one stage (all initial answers, all round-2 critiques, …) handed to the
engine at once. Keys already stored are skipped (that is what makes runs resumable); completions
are written back in chunks, one transaction each, every ``chunk_rows`` rows or ``chunk_seconds``
seconds, whichever comes first, so a killed run loses at most the unwritten tail.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .engines.base import Completion, Engine, Request
from .store import GEN_SCHEMA, Store, now


@dataclass
class Job:
    """One request and the row fields (besides the outcome) it will be stored with."""

    request: Request
    row: dict


@dataclass
class WaveStats:
    table: str
    planned: int = 0
    reused: int = 0
    written: int = 0
    requests: int = 0
    completion_tokens: int = 0
    prompt_tokens: int = 0
    seconds: float = 0.0
    statuses: dict[str, int] = field(default_factory=dict)


def gen_row(job: Job, c: Completion) -> list[dict]:
    """Default mapping of a completion to one generated-text row (status and reason included)."""
    text = c.texts[0] if c.texts else None
    status, error = c.status, c.error
    if status == "ok" and not (text or "").strip():
        status, error = "failed", "empty model output"
    return [
        {
            **job.row,
            "id": job.request.key,
            "messages": job.row.get("messages"),
            "text": text,
            "status": status,
            "error": error,
            "prompt_tokens": c.prompt_tokens,
            "completion_tokens": c.completion_tokens,
            "finish_reason": c.finish_reasons[0] if c.finish_reasons else None,
            "created_at": now(),
        }
    ]


def progress(quiet: bool = False) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rps]:.1f} req/s  {task.fields[tps]:.0f} tok/s"),
        TimeElapsedColumn(),
        disable=quiet,
    )


def run_wave(
    store: Store,
    engine: Engine,
    table: str,
    jobs: Sequence[Job],
    *,
    run_id: str,
    to_rows: Callable[[Job, Completion], list[dict]] = gen_row,
    schema=GEN_SCHEMA,
    chunk_rows: int = 256,
    chunk_seconds: float = 5.0,
    bar: Progress | None = None,
    row_keys: Callable[[str], list[str]] = lambda key: [key],
) -> WaveStats:
    """``row_keys`` maps a request key to the row ids it produces (one unless a request has n > 1
    samples); a request is done when its first row is stored (all its rows share one transaction)."""
    stats = WaveStats(table=table, planned=len(jobs))
    rows_of = {j.request.key: row_keys(j.request.key) for j in jobs}
    store.link_run(run_id, table, [k for ks in rows_of.values() for k in ks])
    done = store.existing(table, [ks[0] for ks in rows_of.values()])
    todo = [j for j in jobs if rows_of[j.request.key][0] not in done]
    stats.reused = len(jobs) - len(todo)
    if not todo:
        return stats
    by_key = {j.request.key: j for j in todo}
    task = bar.add_task(table, total=len(todo), rps=0.0, tps=0.0) if bar else None
    pending: list[dict] = []
    start = last_flush = time.perf_counter()

    def flush() -> None:
        nonlocal pending, last_flush
        stats.written += store.insert(table, pending, schema)
        pending, last_flush = [], time.perf_counter()

    for c in engine.generate([j.request for j in todo]):
        rows = to_rows(by_key[c.key], c)
        pending.extend(rows)
        stats.requests += 1
        stats.completion_tokens += c.completion_tokens
        stats.prompt_tokens += c.prompt_tokens
        for r in rows:
            stats.statuses[r["status"]] = stats.statuses.get(r["status"], 0) + 1
        if len(pending) >= chunk_rows or time.perf_counter() - last_flush > chunk_seconds:
            flush()
        if bar is not None:
            el = max(time.perf_counter() - start, 1e-9)
            bar.update(task, advance=1, rps=stats.requests / el, tps=stats.completion_tokens / el)
    flush()
    stats.seconds = time.perf_counter() - start
    return stats
