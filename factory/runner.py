"""Streaming runs: plan → key → skip done → engine → write, in bounded chunks.

A run kind (SL, prefs, audit) hands :meth:`Runner.run` a stream of input chunks (the vocabulary
both sides share, input chunks, jobs, writes, lives in :mod:`factory.jobs`); each chunk expands into
jobs (one engine request each) and a job's stored rows may create follow-up jobs (an
answer's critiques, a prompt's pairs, a rationale's scoring request). The runner:

- probes the store for a batch of planned keys at once (one scan per batch; when no other run
  could have made these rows, only this run's rows of the chunks at hand are read) and reuses what
  is stored (its follow-ups are planned from the stored rows); the rest goes to the engine, each
  request rendered only when the engine asks for it;
- keeps the engine fed through one lazy request stream over the whole run, so its batch never
  drains between chunks (the stream yields ``None``, "nothing right now", only while requests are
  in flight whose completions may create more);
- writes completions in transactions of ``chunk_rows`` rows (or every ``chunk_seconds``), on the
  writer thread (:mod:`factory.writer`), with, in the same transaction, the completion record of
  every input chunk whose jobs and follow-ups are all stored: a restart skips finished chunks
  without reading, rendering or probing them;
- holds at most ``max_open_chunks`` input chunks open, so memory does not depend on the run's size;
- sends each job to its role's engine (``Job.route``: "policy", a judge's name); with several distinct
  engines :class:`factory.fanout.RoutedRunner` streams to all of them at once;
- stops gracefully: after :meth:`request_stop` it sends nothing new, writes what has completed and
  returns (requests still inside the engine are left for the resume). An exception from the
  engine is :class:`EngineFailed` after the same write.

A stored ``failed`` row counts as done unless ``retry_failed``: then its job runs again and the
new row replaces it.
"""

from __future__ import annotations

import json
import time
from collections import deque
from typing import Callable, Iterable, Iterator

import pyarrow as pa
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from .engines.base import Completion, Engine, EngineError, Request
from .jobs import ChunkState, InputChunk, Job, TableStats, Write, gen_row  # noqa: F401 (the runner's vocabulary)
from .store import TABLE_SCHEMAS, Store, now
from .writer import Writer, quiet_gc

# A run closes and reopens its database every this many finished input chunks (Store.reopen): DuckDB
# gives back the memory it keeps per temporary buffer only when the database closes. At 64 chunks of
# 1,024 pairs, a 1M-pair run reopens 15 times (~0.02 s each on its 1.1 GB database) and holds at most
# ~2–3 MB of that memory (~37 KB a chunk). 0: never.
REOPEN_CHUNKS = 64


class EngineFailed(EngineError):
    """The engine died (or a server went away) mid-run; what completed before is stored."""


class Runner:
    def __init__(self, store: Store, engine: Engine, run_id: str, *, stage: str, chunk_rows: int = 1024,
                 chunk_seconds: float = 5.0, retry_failed: bool = False, max_open_chunks: int = 4,
                 probe_rows: int = 4096, own_runs: Iterable[str] = (), full_probe: bool = False,
                 progress: Callable[[], float | None] = lambda: None, quiet: bool = True,
                 routes: dict[str, Engine] | None = None, identity: str | None = None):
        self.store, self.engine, self.run_id, self.stage = store, engine, run_id, stage
        # role -> engine (a job's ``route``); several distinct engines run side by side (factory.fanout)
        self.routes = routes or {}
        self.identity = identity or engine.model  # what answers this run: recorded with each finished chunk
        self.chunk_rows, self.chunk_seconds = chunk_rows, chunk_seconds
        self.retry_failed, self.max_open_chunks, self.probe_rows = retry_failed, max_open_chunks, probe_rows
        self.own_runs = {run_id, *own_runs}  # run ids whose rows this run makes (e.g. "<run>-naive")
        self.full_probe = full_probe  # the input changed since chunks were recorded: look everywhere
        self.input_progress = progress
        self.stats: dict[str, TableStats] = {}
        self.chunks_done = 0
        self._reopened_at = 0  # chunks_done at the last Store.reopen (REOPEN_CHUNKS)
        self.stopped = False
        self.first_write_at = None  # when this invocation first committed rows (restart latency)
        self.max_held = self.max_buffered = 0  # most jobs planned and not yet stored / rows in one write
        self._plan_error: BaseException | None = None
        self._stop = False
        self._todo: deque[Job] = deque()
        self._followups: list[Job] = []
        self._planned: dict[str, Job] = {}  # key -> the job that will store it (in todo or in flight)
        self._waiting: dict[str, list[Job]] = {}  # key -> jobs with the same key, resolved with it
        self._inflight: dict[str, Job] = {}
        self._open: list[ChunkState] = []
        self._inputs: Iterator[InputChunk] | None = None
        self._foreign: dict[tuple, bool] = {}
        self._buf: dict[tuple[str, bool], list[dict]] = {}
        self._links: dict[tuple[str, str], list[str]] = {}
        self._records: list[dict] = []
        self._buffered = 0
        self._writer: Writer | None = None
        self._last_flush = time.perf_counter()
        self._start = time.perf_counter()
        self._progress = _bar(quiet)
        self._task = None
        self._eta_from: tuple[float, float] | None = None

    # -- public ----------------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Send nothing new; write what has completed and return (the first Ctrl-C / SIGTERM)."""
        self._stop = True

    def _enqueue(self, job: Job) -> None:
        self._todo.append(job)

    def run(self, inputs: Iterable[InputChunk]) -> None:
        self._inputs = iter(inputs)
        self._start = time.perf_counter()
        with quiet_gc(), self._progress, Writer(self.store) as self._writer:
            self._task = self._progress.add_task(self.stage, total=1000, status="")
            completions = self.engine.generate(self._requests())
            try:
                while True:
                    try:
                        c = next(completions)
                    except StopIteration:
                        break
                    except (KeyboardInterrupt, SystemExit):
                        raise
                    except Exception as e:
                        if e is self._plan_error:  # reading, planning or storing the input: not the engine
                            raise
                        raise EngineFailed(f"{type(e).__name__}: {str(e)[:500]}") from e  # the engine died
                    self._complete(c)
                    if self._stop:
                        break
                    self._maybe_flush()
                if not self._stop and (self._todo or self._followups or self._inflight or self._open
                                       or self._inputs is not None):
                    raise EngineFailed(f"the engine stopped before the run was done ({len(self._inflight)} requests "
                                       f"unanswered, {len(self._todo)} not sent); what completed is stored")
            finally:
                completions.close()  # the engine aborts what is still in flight: left for the resume
                self._flush()
                self._writer.drain()  # every transaction committed (or its error raised) before returning
                self._written()
                self.stopped = self._stop
                elapsed = time.perf_counter() - self._start
                for s in self.stats.values():
                    s.seconds = elapsed
                self._show()

    # -- the request stream ----------------------------------------------------------------------
    def _requests(self) -> Iterator[Request | None]:
        try:
            yield from self._stream()
        except BaseException as e:  # raised here, it surfaces from the engine's generate: tell them apart
            self._plan_error = e
            raise

    def _stream(self) -> Iterator[Request | None]:
        while not self._stop:
            if self._todo:
                job = self._todo.popleft()
                self._inflight[job.key] = job
                yield job.build()
                continue
            more_input = self._inputs is not None and len(self._open) < self.max_open_chunks
            if self._followups and (len(self._followups) >= self.probe_rows or not more_input or not self._inflight):
                batch, self._followups = self._followups, []
                self._resolve(batch)
                continue
            if more_input and self._open_next():
                continue
            if self._followups:
                batch, self._followups = self._followups, []
                self._resolve(batch)
                continue
            if self._inflight:
                yield None
                continue
            return

    def _open_next(self) -> bool:
        if REOPEN_CHUNKS and self.chunks_done - self._reopened_at >= REOPEN_CHUNKS:
            self._reopened_at = self.chunks_done
            self._writer.reopen_store()
        try:
            chunk = next(self._inputs)
        except StopIteration:
            self._inputs = None
            return False
        state = ChunkState(chunk.index, chunk.meta)
        self._open.append(state)
        jobs = chunk.plan()
        state.closed = True
        for j in jobs:
            j.chunk = state
        state.pending = state.n_jobs = len(jobs)
        if not jobs:
            self._chunk_done(state)
        for i in range(0, len(jobs), self.probe_rows * 4):
            self._resolve(jobs[i:i + self.probe_rows * 4])
        self._update()
        return True

    # -- planning: probe, reuse or send ----------------------------------------------------------
    def _resolve(self, jobs: list[Job]) -> None:
        by_table: dict[str, list[Job]] = {}
        for j in jobs:
            by_table.setdefault(j.table, []).append(j)
        for table, group in by_table.items():
            st = self._stat(table)
            st.planned += len(group)
            need = sorted({c for j in group for c in j.need})
            found = self._probe(table, group, need)
            for job in group:
                if job.key in self._planned:  # the same row planned twice (e.g. an audit's naive pass)
                    self._waiting.setdefault(job.key, []).append(job)
                    continue
                stored = [found.get(i) for i in job.ids]
                if stored[0] is not None and not (self.retry_failed and any(s is None or s[0] == "failed" for s in stored)):
                    rows = [{"id": i, "status": s[0], "run_id": s[1], **dict(zip(need, s[2:]))}
                            for i, s in zip(job.ids, stored) if s is not None]
                    self._reuse(job, rows)
                else:
                    job.replace = stored[0] is not None
                    self._planned[job.key] = job
                    self._enqueue(job)
        self.max_held = max(self.max_held, len(self._planned))

    def _probe(self, table: str, jobs: list[Job], need: list[str]) -> dict[str, tuple]:
        cols = ", ".join(["t.status", "t.run_id", *(f"t.{c}" for c in need)])
        keys = [i for j in jobs for i in j.ids]
        sig = (table, jobs[0].row.get("model"), jobs[0].row.get("sampling_hash"))
        if sig not in self._foreign:  # could any other run have stored rows with these keys?
            own = ", ".join(f"'{r}'" for r in self.own_runs)
            self._foreign[sig] = self.full_probe or bool(self.store.one(
                f"SELECT 1 FROM {table} WHERE model IS NOT DISTINCT FROM ? AND sampling_hash IS NOT DISTINCT FROM ? "
                f"AND (run_id NOT IN ({own}) OR chunk IS NULL) LIMIT 1", list(sig[1:])))
        if self._foreign[sig]:
            return self.store.probe(table, keys, cols)
        # only this run can have made them, and only for these chunks: zone maps skip the rest
        idx = [j.chunk.index for j in jobs if j.chunk is not None]
        where = f"t.run_id IN ({', '.join(repr(r) for r in self.own_runs)})"
        if idx:
            where += f" AND t.chunk BETWEEN {min(idx)} AND {max(idx)}"
        return self.store.probe(table, keys, cols, where=where)

    def _reuse(self, job: Job, rows: list[dict], producer: str | None = None) -> None:
        self._stat(job.table).reused += 1
        mine = job.row.get("run_id", self.run_id)
        foreign = [r["id"] for r in rows if (r.get("run_id") or producer) != mine]
        if foreign:
            self._links.setdefault((mine, job.table), []).extend(foreign)
            self._buffered += len(foreign)
        self._resolved(job, rows)

    def _resolved(self, job: Job, rows: list[dict]) -> None:
        chunk = job.chunk
        if job.then is not None:
            follow = []
            for f in job.then(rows):
                if isinstance(f, Write):
                    self._buf.setdefault((f.table, False), []).extend(f.rows)
                    self._buffered += len(f.rows)
                else:
                    follow.append(f)
            for f in follow:
                f.chunk = chunk
            if chunk is not None:
                chunk.pending += len(follow)
                chunk.n_jobs += len(follow)
            self._followups.extend(follow)
        for w in self._waiting.pop(job.key, []):
            self._reuse(w, [{**r, "run_id": None} for r in rows], producer=job.row.get("run_id"))
        if chunk is not None:
            chunk.pending -= 1
            if chunk.pending == 0 and chunk.closed:
                self._chunk_done(chunk)

    def _chunk_done(self, chunk: ChunkState) -> None:
        self._open.remove(chunk)
        meta = {**chunk.meta, "engine": self.identity}  # what answered: another engine redoes the chunk
        self._records.append({"run_id": self.run_id, "stage": self.stage, "chunk": chunk.index, "source": "",
                              "meta_json": json.dumps(meta), "n_jobs": chunk.n_jobs, "n_new": chunk.n_new,
                              "done_at": now()})
        self._buffered += 1
        self.chunks_done += 1

    # -- completions and writes ------------------------------------------------------------------
    def _complete(self, c: Completion) -> None:
        job = self._inflight.pop(c.key)
        self._planned.pop(c.key, None)
        rows = job.to_rows(job, c)
        chunk = job.chunk
        for r in rows:
            r["chunk"] = chunk.index if chunk is not None else None
        self._buf.setdefault((job.table, job.replace), []).extend(rows)
        self._buffered += len(rows)
        st = self._stat(job.table)
        st.requests += 1
        st.written += len(rows)
        st.completion_tokens += c.completion_tokens
        st.prompt_tokens += c.prompt_tokens
        for r in rows:
            st.statuses[r["status"]] = st.statuses.get(r["status"], 0) + 1
        if chunk is not None:
            chunk.n_new += 1
        self._resolved(job, rows)

    def _maybe_flush(self) -> None:
        if self._buffered >= self.chunk_rows or time.perf_counter() - self._last_flush > self.chunk_seconds:
            self._flush()
            self._update()

    def _flush(self) -> None:
        """Hand what completed to the writer thread as one transaction (rows, links, chunk records)."""
        if self._buffered:
            self.max_buffered = max(self.max_buffered, self._buffered)
            tables = [(table, pa.Table.from_pylist(rows, schema=TABLE_SCHEMAS.get(table)), replace)
                      for (table, replace), rows in self._buf.items() if rows]
            token = self._commit_token()
            self._writer.put(tables, self._links, self._records, token)
        self._buf, self._links, self._records, self._buffered = {}, {}, [], 0
        self._last_flush = time.perf_counter()
        self._written()

    def _commit_token(self):
        return getattr(self.engine, "commit_token", lambda: None)()

    def _written(self) -> None:
        """Note what the writer has committed: the restart latency, and engines that hold durable
        partial results (Ray shards) may release them."""
        for token in self._writer.committed():
            if self.first_write_at is None:
                self.first_write_at = now()
            if isinstance(token, list):  # several engines: (engine, token) each
                for engine, tok in token:
                    engine.committed(tok)
            elif token is not None:
                self.engine.committed(token)

    # -- progress --------------------------------------------------------------------------------
    def _stat(self, table: str) -> TableStats:
        if table not in self.stats:
            self.stats[table] = TableStats(table)
        return self.stats[table]

    def _update(self) -> None:
        if self._task is None:
            return
        frac = self.input_progress()
        el = max(time.perf_counter() - self._start, 1e-9)
        new = sum(s.requests for s in self.stats.values())
        reused = sum(s.reused for s in self.stats.values())
        toks = sum(s.completion_tokens for s in self.stats.values())
        status = f"{new:,} new, {reused:,} reused, {self.chunks_done} chunks done · {new / el:,.1f} req/s {toks / el:,.0f} tok/s"
        if frac is not None:
            if self._eta_from is None:
                self._eta_from = (frac, el)
            f0, t0 = self._eta_from
            if frac > f0 and frac < 1:
                status += f" · ETA {_hms((1 - frac) * (el - t0) / (frac - f0))}"
            self._progress.update(self._task, completed=int(frac * 1000), status=status)
        else:
            self._progress.update(self._task, status=status)

    def _show(self) -> None:
        self._update()


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _bar(quiet: bool) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
                    TextColumn("{task.fields[status]}"), TimeElapsedColumn(), disable=quiet)
