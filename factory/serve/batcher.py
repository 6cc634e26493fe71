"""Concurrent requests → judge jobs → one engine, kept full; every judgement stored before it is answered.

A :class:`Ticket` is one HTTP request's judgements (the jobs of its pairs). The batcher runs one
long-lived loop on a thread of its own, like :class:`factory.runner.Runner` over a run that never
ends: the first judge's ``engine.generate`` pulls from one lazy request stream, which takes new
tickets from a queue, answers what it can from the store, and yields the rest's requests; ``None``
("nothing right now") only while that engine has requests in flight, so it steps; when nothing is
in flight the stream blocks on the queue (no busy loop), which the writer also wakes after each commit. A panel's other engines (judges with
another model or engine; judges that share one share it) each run on a thread of their own
(:class:`factory.fanout.Feeder`, as a routed offline run feeds them): a job goes to its judge's
engine (``Job.route``), their completions come back on the same queue as new tickets, and the
one loop plans, writes and answers for every engine. Completions go to the project's writer thread
(:class:`factory.writer.Writer`), one transaction per flush: judgements, the pairs they judge and
the run's membership (``run_pairs``, ``run_items`` links for judgements another run made).

Rendering: a job a render worker can make (``Job.render``) is sent to
:class:`~factory.serve.render_pool.RenderPool` when it is planned and queued for its engine when
its messages come back (in the inbox, as tickets and commits do); the rest render in this loop.

Guarantee: **an answer is sent only after every judgement it reports is committed** (a ticket is
resolved from the writer's committed tokens), so a crash or kill loses only unanswered work, and a
restart finds every answered judgement by its key (no duplicates, no second engine call).

Answers from the store: a bounded LRU of committed judgements (key → status, p_a) answers repeated
requests in the HTTP thread without touching this loop; a key not in it is probed in DuckDB (one
scan per batch of tickets) only when :class:`KeyFilter` says the store may hold it: a fixed-size
Bloom filter of every key of this judge in the store (loaded with one scan at start, then every
key committed), so a new key, the common case, costs no scan however large the store grows. A key
already planned or in flight is not asked twice: later tickets wait for it. That store side (and
the writing) is :class:`~factory.serve.planner.Planner`; this module is the engine side.
"""

from __future__ import annotations

import queue
import sys
import threading
from collections import deque
from typing import Any, Callable

from ..engines.base import Completion
from ..fanout import _END, Feeder
from ..runner import EngineFailed, Job
from ..writer import Writer
from .planner import Planner
from .render_pool import Rendered, RenderPool
from .tickets import Stats, StoreFailed, Ticket, Value  # noqa: F401  (re-exported)


_COMMITTED = object()  # the writer committed a transaction: put in the inbox to wake the loop


class Batcher(Planner):
    queue_cap = 256  # rendered requests waiting per extra engine (as factory.fanout.RoutedRunner)
    # planned requests sent to the first engine between two looks at the inbox, the writer's commits
    # and the other engines (each look takes locks: per request it was ~10% of this loop's time)
    poll_every = 32
    inline_jobs = 16  # at most this many jobs planned while everything is idle render in this loop, not a worker

    def __init__(self, store: Any, engines: dict[str, Any], run_id: str, *, identities: list[tuple[str, str]],
                 cache_size: int = 100_000, chunk_rows: int = 1024, probe_batch: int = 4096,
                 forget: Callable[[str], None] = lambda pair_id: None,
                 on_fatal: Callable[[str], None] = lambda reason: None,
                 render_ctxs: list | None = None, render_workers: int = 0):
        """``engines``: judge name (a job's ``route``) -> engine, the first judge's driven by this
        loop, every other distinct engine on a :class:`Feeder`; ``identities``: (model, judge settings
        hash) of each judge, whose stored keys the probe filter loads; ``render_workers`` processes
        render the jobs of the judges ``render_ctxs`` (:class:`~factory.serve.render_pool.RenderPool`;
        0: this loop renders every job)."""
        super().__init__(store, run_id, identities=identities, cache_size=cache_size, chunk_rows=chunk_rows,
                         probe_batch=probe_batch, forget=forget)
        self.on_fatal = on_fatal
        self.stopping = False
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
        self._todo: deque[Job] = deque()  # for the first engine
        self._todo_f: list[deque[Job]] = [deque() for _ in self._feeders]
        self._thread: threading.Thread | None = None
        self._stream_error: BaseException | None = None
        self._render_spec = (render_ctxs or [], render_workers)
        self._pool: RenderPool | None = None
        self._to_render: list[Job] = []  # planned jobs for the render workers, sent at the loop's next turn

    # -- the HTTP side ---------------------------------------------------------------------------
    def start(self) -> None:
        ctxs, n = self._render_spec
        if n > 0 and ctxs:
            self._pool = RenderPool(ctxs, n, self._inbox.put)
            self.stats.render_workers = n
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
                ticket.hits = [k for k, _ in hits]
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
            with Writer(self.store, on_commit=lambda: self._inbox.put(_COMMITTED)) as self._writer:
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
                        if self._pool is not None:
                            self._pool.close()
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
        run = 0  # requests yielded since the inbox and the writer were last looked at
        while True:
            if self._todo and run < self.poll_every:
                run += 1
                req = self._build(self._todo.popleft())
                if req is not None:
                    self._main_inflight += 1
                    yield req
                continue
            run = 0
            self._commits()
            self._take()
            self._dispatch()
            self._feed()
            if self._todo:
                continue
            if self._main_inflight:
                self._maybe_flush()
                yield None
                continue
            self._maybe_flush(idle=True)
            if self.stopping and not self._planned and not self._uncommitted and self._inbox.empty():
                return
            try:  # idle: wait for a ticket, another engine's answer or a commit (the writer says so)
                item = self._inbox.get(timeout=0.05)
            except queue.Empty:
                continue
            if isinstance(item, Ticket):
                self._plan([item])
            else:  # a commit (the loop's next turn answers its tickets), rendered jobs, another engine's answer
                self._other(item)

    def _build(self, job: Job):
        """``job``'s request, or None when it cannot be rendered (a failed row, not a dead service)."""
        self._inflight[job.key] = job
        rendered, job.rendered = job.rendered, None
        try:
            if rendered is None:
                req = job.build()
            elif rendered[0] is None:  # a render worker's failure, as it would have failed here
                self._complete(Completion(key=job.key, status="failed", error=f"render: {rendered[1]}"))
                return None
            else:
                req = job.build(rendered)
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
                self._other(item)
        if got:
            self._plan(got)

    def _other(self, item: Any) -> None:
        """An inbox item that is not a ticket: a commit mark, rendered jobs, another engine's answer."""
        if item is _COMMITTED:
            return
        if isinstance(item, Rendered):
            if item.died is not None:  # its unanswered jobs (and every job from now on, if none is left) render here
                self.stats.render_workers = self._pool.alive if self._pool is not None else 0
                print(f"warning: {item.died}", file=sys.stderr, flush=True)
            else:
                self.stats.worker_renders += len(item.jobs)
            for job in item.jobs:
                self._queue_engine(job)
            return
        self._answer(item)

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
        if self._pool is not None and self._pool.takes(job):
            self._to_render.append(job)
        else:
            self._queue_engine(job)

    def _dispatch(self) -> None:
        """Send the jobs planned for the render workers (what none can take any more renders here). A
        few jobs while the engine and the workers have nothing to do render here: the round trip to a
        worker would only add to a lone request's latency."""
        if self._to_render:
            jobs, self._to_render = self._to_render, []
            if len(jobs) <= self.inline_jobs and not self._main_inflight and not self._todo and self._pool.idle():
                left = jobs
            else:
                left = self._pool.submit(jobs)
            for job in left:
                self._queue_engine(job)

    def _queue_engine(self, job: Job) -> None:
        f = self._route.get(job.route)
        (self._todo if f is None else self._todo_f[f.slot]).append(job)
