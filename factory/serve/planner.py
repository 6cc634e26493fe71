"""The batcher's store side: which judgements are known, which to ask, and writing what is answered.

:class:`Planner` holds what the engine loop of :class:`~factory.serve.batcher.Batcher` plans with:
the LRU of committed judgements, the Bloom filters of stored keys and pairs, the keys planned or in
flight and the tickets waiting on them, and the rows waiting for the writer. Everything here runs on
the batcher's thread (the LRU and the counters are also read from the HTTP thread, under ``_lock``).

A request's key is answered by one row, or by a chain: a ``cot`` judge's job is its rationale,
whose follow-up (``CotMode``'s ``then``) is the scored judgement; the follow-up's value answers the
rationale's key (``_root``), and only when both are committed.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any, Callable

import pyarrow as pa

from ..engines.base import Completion
from ..runner import Job
from ..store import TABLE_SCHEMAS
from .keyfilter import KeyFilter
from .tickets import Stats, StoreFailed, Ticket, Value


class Planner:
    flush_after_s = 0.005  # longest a completed judgement waits for more to share its transaction

    def __init__(self, store: Any, run_id: str, *, identities: list[tuple[str, str]], cache_size: int,
                 chunk_rows: int, probe_batch: int, forget: Callable[[str], None]):
        self.store, self.run_id = store, run_id
        self.cache_size, self.chunk_rows, self.probe_batch = cache_size, chunk_rows, probe_batch
        self.forget = forget
        self.stats = Stats()
        self.fatal: str | None = None
        self._lock = threading.Lock()  # the LRU and stats counters touched from the HTTP thread
        self._lru: OrderedDict[str, Value] = OrderedDict()
        self._stored = KeyFilter()  # could the store hold this key? (no: a new judgement, no probe)
        for model, sampling_hash in dict.fromkeys(identities):
            self._stored.load(store, model, sampling_hash)
        self._planned: dict[str, Job | None] = {}  # key -> job (to send / in flight / buffered), None: a link
        self._waiters: dict[str, list[Ticket]] = {}
        self._inflight: dict[str, Job] = {}  # sent to an engine, not answered
        self._open: set[Ticket] = set()  # tickets handed to this loop and not finished
        self._pairs_seen: OrderedDict[str, None] = OrderedDict()  # pairs recorded by this process (bounded)
        self._buf: dict[str, list[dict]] = self._empty()
        self._root: dict[str, str] = {}  # a chained job's key (cot: the judgement after a rationale) -> its root's
        # pairs (and this run's pair links) the store cannot hold yet are written with a plain INSERT,
        # without the key lookup a keyed insert makes (half a small transaction's time, measured)
        self._new: dict[str, list[dict]] = {"pairs": [], "run_pairs": []}
        for model, sampling_hash in dict.fromkeys(identities):  # a cot judge's rationales (the roots of its jobs)
            self._stored.load_sql(store, "SELECT id FROM rationales WHERE model IS NOT DISTINCT FROM ? AND "
                                  "sampling_hash IS NOT DISTINCT FROM ?", [model, sampling_hash])
        self._pair_filter, self._run_pair_filter = KeyFilter(1 << 24), KeyFilter(1 << 24)
        self._pair_filter.load_sql(store, "SELECT pair_id FROM pairs", [])
        pa.Table.from_pylist([{}], schema=TABLE_SCHEMAS["pairs"])  # its first call imports pandas (~0.5 s): not in a request
        self._run_pair_filter.load_sql(store, "SELECT pair_id FROM run_pairs WHERE run_id = ?", [run_id])
        self._links: dict[str, list[str]] = {}  # table -> keys another run made, linked into this run
        self._token: list[tuple[str, Value]] = []
        self._uncommitted = 0
        self._buf_since = 0.0  # when the oldest row waiting for the writer was buffered
        self._writer: Any = None  # the Writer, while the batcher's loop runs
        self._reader: Any = None  # a Store.view() for probes, while the loop runs

    def _queue(self, job: Job) -> None:
        """Send ``job`` to its engine (the batcher's)."""
        raise NotImplementedError

    def _plan(self, tickets: list[Ticket]) -> None:
        """Answer what the LRU or the store holds; wait on keys already planned; plan the rest."""
        need: list[tuple[Job, Ticket]] = []
        for t in tickets:
            if self.fatal:
                t.fail(self.fatal)
                continue
            self._open.add(t)
            self._record_pairs(t.pairs)
            for job in t.jobs:
                v = self._lru.get(job.key)
                if v is not None:
                    self.stats.cache_hits += 1
                    t.cached += 1
                    t.hits.append(job.key)
                    t.resolve(job.key, v)
                elif job.key in self._planned:
                    self._waiters.setdefault(job.key, []).append(t)
                else:
                    need.append((job, t))
            if not t.jobs:
                t.finish()
            self._settle(t)
        found = self._probe([j for j, _ in need])
        for job, t in need:
            self._waiters.setdefault(job.key, []).append(t)
            if job.key in self._planned:
                continue
            hit = found.get(job.key)
            if hit is None:
                self._planned[job.key] = job
                self._queue(job)
                continue
            self.stats.cache_hits += 1
            t.cached += 1
            t.hits.append(job.key)
            self._planned[job.key] = None  # answered from the store (now, or at the commit of its link)
            self._stored_hit(job, hit)

    def _probe(self, jobs: list[Job]) -> dict[str, tuple]:
        """key -> (status, run_id, p_a or a rationale's text) of the jobs' rows the store holds (one scan
        per table, only for keys the filter says it may hold)."""
        found: dict[str, tuple] = {}
        by_table: dict[str, set[str]] = {}
        for j, maybe in zip(jobs, self._stored.maybe_many([j.key for j in jobs])):
            if maybe:
                by_table.setdefault(j.table, set()).add(j.key)
        for table, keys in by_table.items():
            self.stats.store_probes += 1
            col = "t.text" if table == "rationales" else "t.p_a"
            found.update(self._reader.probe(table, list(keys), f"t.status, t.run_id, {col}"))
        return found

    def _stored_hit(self, job: Job, hit: tuple, committed: bool = True) -> None:
        """``job``'s row is stored: answered now when it is this run's, else linked into this run and
        answered at the link's commit; a chained job (cot's rationale) goes on to its follow-up."""
        foreign = hit[1] != self.run_id
        if foreign:
            self._mark()
            self._links.setdefault(job.table, []).append(job.key)
            self.stats.linked += 1
        if job.then is not None:
            self._chain(job, [{"id": job.key, "status": hit[0], "text": hit[2]}], committed and not foreign)
        else:
            self._done(job.key, (hit[0], hit[2]), committed and not foreign)

    def _chain(self, job: Job, rows: list[dict], committed: bool) -> None:
        """``job``'s rows are known: its follow-up job (cot: the scored judgement after the rationale,
        ``CotMode``'s own ``then``) answers for the request's key, reused or planned; no follow-up (the
        rationale failed) answers with the rationale's status. ``committed``: the rows are stored."""
        follow = [f for f in job.then(rows) if isinstance(f, Job)]
        if not follow:
            self._done(job.key, (rows[0]["status"] if rows[0]["status"] != "ok" else "failed", None), committed)
            return
        for f in follow:
            f.route, f.row["chunk"] = job.route, None
            self._root[f.key] = job.key
            v = self._lru.get(f.key)
            if v is not None:
                self._done(f.key, v, committed)
            elif f.key not in self._planned:
                hit = self._probe([f]).get(f.key)
                if hit is None:
                    self._planned[f.key] = f
                    self._queue(f)
                else:
                    self._planned[f.key] = None
                    self._stored_hit(f, hit, committed)

    def _done(self, key: str, v: Value, committed: bool) -> None:
        if committed:
            self._finish(key, v)
        else:
            self._mark()
            self._token.append((key, v))

    def _finish(self, key: str, v: Value, remembered: bool = False) -> None:
        """``key``'s row (and its chain's) is committed: remember it and add it to the probe filter
        (unless the caller did, ``remembered``: a transaction's keys at once), answer the requests
        waiting on it (and on the key its chain answers for)."""
        self._planned.pop(key, None)
        if not remembered:
            self._stored.add(key)
            self._remember(key, v)
        for t in self._waiters.pop(key, ()):
            t.resolve(key, v)
            self._settle(t)
        if self._root:  # a chain (cot) waits on this key
            root = self._root.pop(key, None)
            if root is not None:
                self._finish(root, v)

    def _settle(self, t: Ticket) -> None:
        if t._closed:
            self._open.discard(t)
            for p in t.pairs:
                self.forget(p["pair_id"])

    def _record_pairs(self, pairs: list[dict]) -> None:
        """Buffer the pairs this process has not recorded yet (and this run's links to them)."""
        new = []
        with self._lock:
            seen = self._pairs_seen
            for p in pairs:  # each once, also when a request repeats a pair
                if p["pair_id"] not in seen:
                    seen[p["pair_id"]] = None
                    new.append(p)
            while len(self._pairs_seen) > self.cache_size:
                self._pairs_seen.popitem(last=False)
        if not new:
            return
        self._mark()
        ids = [p["pair_id"] for p in new]  # distinct
        for table, seen in (("pairs", self._pair_filter), ("run_pairs", self._run_pair_filter)):
            buf, fresh = self._buf[table], self._new[table]
            for p, maybe in zip(new, seen.maybe_many(ids)):
                row = p if table == "pairs" else {"run_id": self.run_id, "pair_id": p["pair_id"], "source_row": None}
                (buf if maybe else fresh).append(row)
            seen.add_many(ids)

    def _complete(self, c: Completion) -> None:
        job = self._inflight.pop(c.key)
        rows = job.to_rows(job, c)
        for r in rows:
            r["chunk"] = None
        self._mark()
        self._buf[job.table].extend(rows)
        if job.then is not None:  # cot's rationale: its judgement answers
            self.stats.rationales += 1
            self._chain(job, rows, committed=False)
        else:
            self.stats.judgements += 1
            for r in rows:
                if r["status"] != "ok":
                    self.stats.failed_judgements += 1
            self._token.append((job.key, (rows[0]["status"], rows[0]["p_a"])))  # _done(committed=False), marked above
        self.stats.prompt_tokens += c.prompt_tokens
        self.stats.completion_tokens += c.completion_tokens

    def _mark(self) -> None:
        if not self._buffered():
            self._buf_since = time.perf_counter()

    @staticmethod
    def _empty() -> dict[str, list[dict]]:
        return {"judgements": [], "rationales": [], "pairs": [], "run_pairs": []}

    def _buffered(self) -> int:
        return len(self._token) + len(self._buf["pairs"]) + len(self._new["pairs"]) + len(self._buf["rationales"])

    def _maybe_flush(self, idle: bool = False) -> None:
        """Hand completed rows to the writer when it is idle and this loop has nothing more in hand
        (``idle``: every ticket taken is answered by the engines) or the oldest row has waited
        ``flush_after_s``; or when a chunk's worth waits and at most one transaction is ahead (``put``
        never blocks the engine: the writer holds one, queues one). Not after every completion: a
        transaction costs ~10 ms of DuckDB whatever it holds, and a request's answer waits for all
        its judgements, so a transaction holding part of a request's judgements answers nothing."""
        n = self._buffered()
        if not n:
            return
        if self._uncommitted == 0 and (idle or time.perf_counter() - self._buf_since >= self.flush_after_s):
            self._flush()
        elif n >= self.chunk_rows and self._uncommitted < 2:
            self._flush()

    def _flush(self) -> None:
        if not self._buffered():
            return
        tables = [(t, pa.Table.from_pylist(rows, schema=TABLE_SCHEMAS[t]), False)
                  for t, rows in self._buf.items() if rows]
        tables += [(t, pa.Table.from_pylist(rows, schema=TABLE_SCHEMAS[t]), False, True)  # known new: plain INSERT
                   for t, rows in self._new.items() if rows]
        links = {(self.run_id, table): keys for table, keys in self._links.items()}
        try:
            self._writer.put(tables, links, [], self._token)
        except Exception as e:  # noqa: BLE001 - an earlier transaction failed
            raise StoreFailed(f"{type(e).__name__}: {str(e)[:400]}") from e
        self._uncommitted += 1
        self.stats.transactions += 1
        self._buf = self._empty()
        self._new = {"pairs": [], "run_pairs": []}
        self._links, self._token = {}, []

    def _commits(self) -> None:
        """Answer the tickets whose judgements the writer has committed."""
        for token in self._writer.committed():
            self._uncommitted -= 1
            self._remember_all(token)
            self._stored.add_many([key for key, _ in token])
            for key, v in token:
                self._finish(key, v, remembered=True)

    def _remember_all(self, items: list[tuple[str, Value]]) -> None:
        """:meth:`_remember` for a transaction's keys, under one lock."""
        lru = self._lru
        with self._lock:
            for key, v in items:
                if key in lru:
                    lru.move_to_end(key)
                lru[key] = v  # a new key goes in last
            while len(lru) > self.cache_size:
                lru.popitem(last=False)

    def _remember(self, key: str, v: Value) -> None:
        with self._lock:
            self._lru[key] = v
            self._lru.move_to_end(key)
            if len(self._lru) > self.cache_size:
                self._lru.popitem(last=False)

