"""Concurrent requests → judge jobs → one engine, kept full; every judgement stored before it is answered.

A :class:`Ticket` is one HTTP request's judgements (the jobs of its pairs). The batcher runs one
long-lived loop on a thread of its own, like :class:`factory.runner.Runner` over a run that never
ends: the first judge's ``engine.generate`` pulls from one lazy request stream, which takes new
tickets from a queue, answers what it can from the store, and yields the rest's requests; ``None``
("nothing right now") only while that engine has requests in flight, so it steps; when nothing is
in flight the stream blocks on the queue (no busy loop). A panel's other engines (judges with
another model or engine; judges that share one share it) each run on a thread of their own
(:class:`factory.fanout.Feeder`, as a routed offline run feeds them): a job goes to its judge's
engine (``Job.route``), their completions come back on the same queue as new tickets, and the
one loop plans, writes and answers for every engine. Completions go to the project's writer thread
(:class:`factory.writer.Writer`), one transaction per flush: judgements, the pairs they judge and
the run's membership (``run_pairs``, ``run_items`` links for judgements another run made).

Guarantee: **an answer is sent only after every judgement it reports is committed** (a ticket is
resolved from the writer's committed tokens), so a crash or kill loses only unanswered work, and a
restart finds every answered judgement by its key (no duplicates, no second engine call).

Answers from the store: a bounded LRU of committed judgements (key → status, p_a) answers repeated
requests in the HTTP thread without touching this loop; a key not in it is probed in DuckDB (one
scan per batch of tickets) only when :class:`KeyFilter` says the store may hold it: a fixed-size
Bloom filter of every key of this judge in the store (loaded with one scan at start, then every
key committed), so a new key, the common case, costs no scan however large the store grows. A key
already planned or in flight is not asked twice: later tickets wait for it.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import OrderedDict, deque
from typing import Any, Callable

import pyarrow as pa

from ..engines.base import Completion
from ..fanout import _END, Feeder
from ..runner import EngineFailed, Job
from ..store import TABLE_SCHEMAS
from ..writer import Writer
from .keyfilter import KeyFilter
from .tickets import Stats, StoreFailed, Ticket, Value  # noqa: F401  (re-exported)


class Batcher:
    queue_cap = 256  # rendered requests waiting per extra engine (as factory.fanout.RoutedRunner)
    flush_after_s = 0.005  # longest a completed judgement waits for more to share its transaction

    def __init__(self, store: Any, engines: dict[str, Any], run_id: str, *, identities: list[tuple[str, str]],
                 cache_size: int = 100_000, chunk_rows: int = 1024, probe_batch: int = 4096,
                 forget: Callable[[str], None] = lambda pair_id: None,
                 on_fatal: Callable[[str], None] = lambda reason: None):
        """``engines``: judge name (a job's ``route``) -> engine, the first judge's driven by this
        loop, every other distinct engine on a :class:`Feeder`; ``identities``: (model, judge settings
        hash) of each judge, whose stored keys the probe filter loads."""
        self.store, self.run_id = store, run_id
        self._inbox: queue.Queue = queue.Queue()  # tickets, and (slot, completion) from the feeders
        self.engine = next(iter(engines.values()))
        self._feeders: list[Feeder] = []
        self._route: dict[str, Feeder | None] = {}
        by_engine: dict[int, Feeder | None] = {id(self.engine): None}
        for name, e in engines.items():
            if id(e) not in by_engine:
                by_engine[id(e)] = Feeder(len(self._feeders), e, [], self._inbox)
                self._feeders.append(by_engine[id(e)])
            self._route[name] = by_engine[id(e)]
            if by_engine[id(e)] is not None:
                by_engine[id(e)].roles.append(name)
        self._main_inflight = 0  # requests handed to the first engine and not answered
        self.cache_size, self.chunk_rows, self.probe_batch = cache_size, chunk_rows, probe_batch
        self.forget, self.on_fatal = forget, on_fatal
        self.stats = Stats()
        self.fatal: str | None = None
        self.stopping = False
        self._lock = threading.Lock()  # the LRU and stats counters touched from the HTTP thread
        self._lru: OrderedDict[str, Value] = OrderedDict()
        self._stored = KeyFilter()  # could the store hold this key? (no: a new judgement, no probe)
        for model, sampling_hash in dict.fromkeys(identities):
            self._stored.load(store, model, sampling_hash)
        self._todo: deque[Job] = deque()  # for the first engine
        self._todo_f: list[deque[Job]] = [deque() for _ in self._feeders]
        self._planned: dict[str, Job | None] = {}  # key -> job (to send / in flight / buffered), None: a link
        self._waiters: dict[str, list[Ticket]] = {}
        self._inflight: dict[str, Job] = {}
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
        self._thread: threading.Thread | None = None
        self._writer: Writer | None = None
        self._stream_error: BaseException | None = None

    # -- the HTTP side ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="factory-serve-engine", daemon=True)
        self._thread.start()

    def submit(self, ticket: Ticket) -> None:
        """Answer ``ticket`` from the LRU at once when every judgement is there, else queue it."""
        ticket._missing = len({j.key for j in ticket.jobs})
        with self._lock:
            self.stats.requests += 1
            self.stats.pairs += len(ticket.pairs)
            if self.fatal:
                ticket.fail(self.fatal)
                return
            if self.stopping:
                ticket.fail("the service is stopping")
                return
            new_pairs = any(p["pair_id"] not in self._pairs_seen for p in ticket.pairs)
            hits = [(j.key, self._lru.get(j.key)) for j in ticket.jobs] if not new_pairs else []
            if not new_pairs and all(v is not None for _, v in hits):
                for k, v in hits:
                    self._lru.move_to_end(k)
                self.stats.cache_hits += len(hits)
                ticket.cached = len(hits)
                fast = True
            else:
                fast = False
        if fast:
            ticket.got = dict(hits)
            ticket._missing = 0
            ticket.finish()
            return
        self._inbox.put(ticket)

    def pending(self) -> int:
        """Judgements waiting for the engine or the writer (the queue depth 429s are decided on)."""
        return len(self._planned) + self._inbox.qsize()

    def stop(self, timeout: float = 120.0) -> None:
        """Send nothing new once the queued tickets are planned; finish what is in flight, commit, return."""
        self.stopping = True
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the engine thread -----------------------------------------------------------------------
    def _main(self) -> None:
        reason = None
        try:
            with Writer(self.store) as self._writer:
                self._reader = self.store.view()
                for f in self._feeders:
                    f.thread.start()
                try:
                    for c in self.engine.generate(self._requests()):
                        self._main_inflight -= 1
                        self._complete(c)
                        self._maybe_flush()
                except Exception as e:  # noqa: BLE001 - an engine (or our own planning) died
                    if isinstance(e, StoreFailed):
                        reason = f"store write failed: {e}"
                    elif isinstance(e, EngineFailed):  # a panel's other engine
                        reason = f"engine failed: {e}"
                    else:
                        what = "internal error" if e is self._stream_error else "engine failed"
                        reason = f"{what}: {type(e).__name__}: {str(e)[:400]}"
                finally:
                    self._stop_feeders()
                    try:
                        self._flush()  # what completed is committed and its tickets answered
                        self._writer.drain()
                        self._commits()
                    finally:
                        self._reader.close()
        except Exception as e:  # noqa: BLE001 - the writer failed (disk full): nothing more can be stored
            reason = reason or f"store write failed: {type(e).__name__}: {str(e)[:400]}"
        if reason is None and self._open:
            reason = "the engine stopped answering"
        if reason is not None:
            with self._lock:
                self.fatal = reason
        for t in list(self._open):
            t.fail(reason or "the service stopped before this request was judged")
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, Ticket):
                item.fail(reason or "the service is stopping")
        if reason is not None:
            self.on_fatal(reason)

    def _stop_feeders(self) -> None:
        """What is still inside another engine is not waited for (its tickets fail; nothing was answered)."""
        for f in self._feeders:
            f.stop()
        for f in self._feeders:
            if f.thread.ident is not None:  # started
                f.thread.join(timeout=30)

    def _requests(self):
        try:
            yield from self._stream()
        except BaseException as e:
            self._stream_error = e
            raise

    def _stream(self):
        while True:
            self._commits()
            self._take()
            self._feed()
            if self._todo:
                req = self._build(self._todo.popleft())
                if req is not None:
                    self._main_inflight += 1
                    yield req
                continue
            if self._main_inflight:
                self._maybe_flush()
                yield None
                continue
            self._maybe_flush(idle=True)
            if self.stopping and not self._planned and not self._uncommitted and self._inbox.empty():
                return
            try:  # idle: wait for a ticket or another engine's answer (while a commit is pending, poll for it)
                item = self._inbox.get(timeout=0.001 if self._uncommitted else 0.05)
            except queue.Empty:
                continue
            if isinstance(item, Ticket):
                self._plan([item])
            else:
                self._answer(item)

    def _build(self, job: Job):
        """``job``'s request, or None when it cannot be rendered (a failed row, not a dead service)."""
        self._inflight[job.key] = job
        try:
            req = job.build()
        except Exception as e:  # noqa: BLE001
            self._complete(Completion(key=job.key, status="failed", error=f"render: {type(e).__name__}: {e}"))
            return None
        self.stats.engine_requests += 1
        return req

    def _feed(self) -> None:
        """Hand the other engines' planned jobs to their feeders (at most ``queue_cap`` waiting each)."""
        for f, todo in zip(self._feeders, self._todo_f):
            while todo and f.queued() < self.queue_cap:
                req = self._build(todo.popleft())
                if req is not None:
                    f.q.put(req)
                    f.put += 1

    def _take(self) -> None:
        got = []
        while len(got) < self.probe_batch:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, Ticket):
                got.append(item)
            else:
                self._answer(item)
        if got:
            self._plan(got)

    def _answer(self, item: tuple) -> None:
        """A completion (or the death) of one of the other engines."""
        slot, c = item
        f = self._feeders[slot]
        if isinstance(c, BaseException):
            raise EngineFailed(f"the engine of {f.name} failed: {type(c).__name__}: {str(c)[:400]}") from c
        if c is _END:
            if not self.stopping or f.outstanding() > 0:
                raise EngineFailed(f"the engine of {f.name} stopped answering ({f.outstanding()} requests unanswered)")
            return
        f.back += 1
        self._complete(c)

    def _queue(self, job: Job) -> None:
        f = self._route.get(job.route)
        (self._todo if f is None else self._todo_f[f.slot]).append(job)

    def _plan(self, tickets: list[Ticket]) -> None:
        """Answer what the LRU or the store holds; wait on keys already planned; plan the rest."""
        need: list[tuple[Job, Ticket]] = []
        for t in tickets:
            if self.fatal:
                t.fail(self.fatal)
                continue
            self._open.add(t)
            for p in t.pairs:
                self._record_pair(p)
            for job in t.jobs:
                v = self._lru.get(job.key)
                if v is not None:
                    self.stats.cache_hits += 1
                    t.cached += 1
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
            self._planned[job.key] = None  # answered from the store (now, or at the commit of its link)
            self._stored_hit(job, hit)

    def _probe(self, jobs: list[Job]) -> dict[str, tuple]:
        """key -> (status, run_id, p_a or a rationale's text) of the jobs' rows the store holds (one scan
        per table, only for keys the filter says it may hold)."""
        found: dict[str, tuple] = {}
        by_table: dict[str, set[str]] = {}
        for j in jobs:
            if self._stored.maybe(j.key):
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

    def _finish(self, key: str, v: Value) -> None:
        """``key``'s row (and its chain's) is committed: remember it, answer the requests waiting on it
        (and on the key its chain answers for)."""
        self._planned.pop(key, None)
        self._stored.add(key)
        self._remember(key, v)
        for t in self._waiters.pop(key, ()):
            t.resolve(key, v)
            self._settle(t)
        root = self._root.pop(key, None)
        if root is not None:
            self._finish(root, v)

    def _settle(self, t: Ticket) -> None:
        if t._closed:
            self._open.discard(t)
            for p in t.pairs:
                self.forget(p["pair_id"])

    def _record_pair(self, p: dict) -> None:
        with self._lock:
            if p["pair_id"] in self._pairs_seen:
                return
            self._pairs_seen[p["pair_id"]] = None
            if len(self._pairs_seen) > self.cache_size:
                self._pairs_seen.popitem(last=False)
        self._mark()
        pid = p["pair_id"]
        for table, row, seen in (("pairs", p, self._pair_filter),
                                 ("run_pairs", {"run_id": self.run_id, "pair_id": pid, "source_row": None},
                                  self._run_pair_filter)):
            (self._buf if seen.maybe(pid) else self._new)[table].append(row)
            seen.add(pid)

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
            self.stats.failed_judgements += sum(1 for r in rows if r["status"] != "ok")
            self._done(job.key, (rows[0]["status"], rows[0]["p_a"]), committed=False)
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
            for key, v in token:
                self._finish(key, v)

    def _remember(self, key: str, v: Value) -> None:
        with self._lock:
            self._lru[key] = v
            self._lru.move_to_end(key)
            if len(self._lru) > self.cache_size:
                self._lru.popitem(last=False)

