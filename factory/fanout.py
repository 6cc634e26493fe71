"""One run, several engines: each role's requests stream to its own engine at the same time.

:class:`RoutedRunner` is the :class:`~factory.runner.Runner` (same planning, keys, reuse, chunk
records and writes) for a run whose roles answer on more than one engine (a policy on vLLM offline
and judges on a server, a reward model, another vLLM). A job goes to the engine of its ``route``
(the role: "policy" or a judge's name). The engine protocol pulls requests lazily on the thread
that iterates ``generate``, so each engine gets a thread of its own (:class:`Feeder`) that feeds
it from a queue the run's main thread fills, at most ``window`` requests outstanding per engine;
completions of every engine come back on one queue. The main thread does everything else: plans,
probes the store, renders requests, turns completions into rows and hands them to the writer
thread. A judge starts on a pair as soon as its two samples are stored in the run's buffers (the
same follow-up mechanism as one engine): no stage waits for another. Memory stays that of one
engine's run, whatever the number of engines: at most ``queue_cap`` rendered requests wait per
engine, and as many answered ones wait for the main thread (each engine bounds what it holds in
flight itself); the next input chunk is opened only when fewer than ``probe_rows / engines`` planned
jobs wait in all (one budget for the run, shared by its engines; a kind divides its input chunks
among a panel's judges, so a chunk plans as many jobs as one judge's); completions are taken only
until a write's ``chunk_rows`` rows are buffered.

An engine that raises, or stops answering, ends the run ``failed`` naming its role(s); what
completed is written first, and a rerun resumes.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from typing import Iterable, Iterator

from .engines.base import Engine, Request
from .runner import EngineFailed, InputChunk, Job, Runner
from .writer import Writer, quiet_gc

_END = object()  # a feeder's engine returned (its request stream ended)


class Feeder:
    """One engine on a thread of its own: requests in from a queue, completions out to ``out``."""

    def __init__(self, slot: int, engine: Engine, roles: list[str], out: queue.SimpleQueue):
        self.slot, self.engine, self.roles, self.out = slot, engine, roles, out
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.todo: deque[Job] = deque()  # planned, not yet handed to the thread (main thread only)
        self.put = 0  # requests handed to the thread (main thread)
        self.back = 0  # completions the main thread took (main thread)
        self._sent = self._received = 0  # this thread's own counts
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name=f"factory-engine-{'+'.join(roles)}", daemon=True)

    @property
    def name(self) -> str:
        """Who answers on this engine, for errors: "judge 'j2' (fake:judge-two)", "the policy (…)"."""
        who = ", ".join("the policy" if r == "policy" else f"judge '{r}'" for r in self.roles) or "the run"
        return f"{who} ({self.engine.model})"

    def outstanding(self) -> int:
        """Handed to the thread and not yet answered (queued or inside the engine)."""
        return self.put - self.back

    def queued(self) -> int:
        """Rendered requests waiting in the queue (the thread's count is read without a lock: an int)."""
        return self.put - self._sent

    def unread(self) -> int:
        """Completions this engine returned that the main thread has not taken yet."""
        return self._received - self.back

    def _requests(self) -> Iterator[Request | None]:
        while not self.stopping:
            try:
                item = self.q.get_nowait()
            except queue.Empty:
                if self._sent > self._received:
                    yield None  # the engine works on what it holds and asks again
                    continue
                item = self.q.get()  # nothing in flight: wait for work (or the end)
            if item is _END or self.stopping:
                return
            self._sent += 1
            yield item

    def _loop(self) -> None:
        gen = self.engine.generate(self._requests())
        try:
            for c in gen:
                self._received += 1
                self.out.put((self.slot, c))
                if self.stopping:
                    break
        except BaseException as e:  # the engine died: the main thread fails the run, naming the role
            self.out.put((self.slot, e))
        finally:
            try:
                gen.close()
            except BaseException:
                pass
            self.out.put((self.slot, _END))

    def stop(self) -> None:
        self.stopping = True
        self.q.put(_END)


class RoutedRunner(Runner):
    """The runner for several engines (see the module docstring)."""

    queue_cap = 256  # rendered requests waiting per engine (the engine pulls them as it has room)

    def _setup_feeders(self) -> None:
        self._out: queue.SimpleQueue = queue.SimpleQueue()
        self._feeders: list[Feeder] = []
        by_engine: dict[int, Feeder] = {}
        roles: dict[int, list[str]] = {}
        for role, e in [(None, self.engine), *self.routes.items()]:
            roles.setdefault(id(e), [])
            if role is not None:
                roles[id(e)].append(role)
        for role, e in [("", self.engine), *self.routes.items()]:
            if id(e) not in by_engine:
                by_engine[id(e)] = f = Feeder(len(self._feeders), e, roles[id(e)], self._out)
                self._feeders.append(f)
        self._route = {role: by_engine[id(e)] for role, e in self.routes.items()}
        self._default = by_engine[id(self.engine)]

    def _enqueue(self, job: Job) -> None:
        self._route.get(job.route, self._default).todo.append(job)

    def _commit_token(self):
        return [(f.engine, t) for f in self._feeders
                if (t := getattr(f.engine, "commit_token", lambda: None)()) is not None]

    def run(self, inputs: Iterable[InputChunk]) -> None:
        self._setup_feeders()
        self._inputs = iter(inputs)
        self._start = time.perf_counter()
        with quiet_gc(), self._progress, Writer(self.store) as self._writer:
            self._task = self._progress.add_task(self.stage, total=1000, status="")
            for f in self._feeders:
                f.thread.start()
            try:
                self._loop()
            finally:
                for f in self._feeders:  # what is still inside an engine is left for the resume
                    f.stop()
                for f in self._feeders:
                    f.thread.join(timeout=30)
                self._flush()
                self._writer.drain()
                self._written()
                self.stopped = self._stop
                elapsed = time.perf_counter() - self._start
                for s in self.stats.values():
                    s.seconds = elapsed
                self._show()

    def _loop(self) -> None:
        while not self._stop:
            moved = self._feed()
            planned = False if moved else self._plan()
            got = self._take(block=not (moved or planned))
            if self._stop:
                return
            self._maybe_flush()
            if not (moved or planned or got) and self._finished():
                return

    def _feed(self) -> bool:
        moved = False
        for f in self._feeders:
            # requests waiting for the engine, and its answers waiting for this thread: both bounded
            while f.todo and f.queued() < self.queue_cap and f.unread() < self.queue_cap:
                job = f.todo.popleft()
                self._inflight[job.key] = job
                f.q.put(job.build())
                f.put += 1
                moved = True
        return moved

    def _hungry(self) -> bool:
        return any(not f.todo and f.queued() < self.queue_cap for f in self._feeders)

    def _plan(self) -> bool:
        """One step of planning when an engine could take more: follow-ups first (a judge starts on
        a pair as soon as its samples are stored), then the next input chunk."""
        waiting = sum(len(f.todo) for f in self._feeders)
        hungry = self._hungry()
        budget = max(self.queue_cap, self.probe_rows // len(self._feeders))  # the run's, shared by its engines
        if not hungry and waiting >= budget:
            return False
        more_input = self._inputs is not None and len(self._open) < self.max_open_chunks and waiting < budget
        if self._followups and (len(self._followups) >= self.probe_rows or not more_input or not self._inflight
                                or hungry):
            batch, self._followups = self._followups, []
            self._resolve(batch)
            return True
        if more_input and self._open_next():
            return True
        if self._followups:
            batch, self._followups = self._followups, []
            self._resolve(batch)
            return True
        return False

    def _take(self, block: bool) -> bool:
        """Completions that have come back (waiting a little for one when there is nothing else to do)."""
        got = False
        for i in range(4096):
            if self._buffered >= self.chunk_rows:  # a write's worth: flushed before taking more
                return got
            try:
                slot, c = self._out.get(timeout=0.05) if (block and i == 0) else self._out.get_nowait()
            except queue.Empty:
                return got
            f = self._feeders[slot]
            if isinstance(c, BaseException):
                raise EngineFailed(f"the engine of {f.name} failed: {type(c).__name__}: {str(c)[:400]}") from c
            if c is _END:
                if not self._stop and (f.todo or f.outstanding() > 0):
                    raise EngineFailed(f"the engine of {f.name} stopped before the run was done "
                                       f"({f.outstanding()} requests unanswered); what completed is stored")
                continue
            f.back += 1
            self._complete(c)
            got = True
        return got

    def _finished(self) -> bool:
        return not (any(f.todo or f.outstanding() for f in self._feeders) or self._followups or self._inflight
                    or self._open or self._inputs is not None)
