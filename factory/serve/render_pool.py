"""Judge prompts rendered in worker processes, so the service's one Python process keeps its GIL for
HTTP, planning, the engine loop and the store.

Rendering a judgement's messages (the judge template per (pair, order), each principle filled in,
their hash) is ~40 µs of Python a judgement: the largest single share of the service's GIL time,
and the one piece that needs nothing from the store or the engine. :class:`RenderPool` runs it in
``n`` worker processes (``factory serve judge --render-workers N``); the batcher sends them the
jobs it planned and queues each job for its engine once its messages are back.

Exact by construction: a worker holds a pickled copy of each judge's :class:`JudgeCtx` (its template
rebuilt from its source, the same hash) and renders with the same call a job's own ``build`` makes,
``ctx.messages(pair, principle, order)`` and :func:`messages_hash`; the job then builds its request
from those messages (``Job.build(rendered)``). Only jobs that declare what they render
(``Job.render``: a score judgement without a rationale) go to a worker; the rest (a ``cot``
rationale, a reward model's candidates) render in the batcher as before.

A worker that dies (killed, out of memory) costs nothing but speed: its unanswered jobs render in
the batcher, as does everything after (``alive`` counts the workers left, in ``/v1/stats``).
"""

from __future__ import annotations

import itertools
import multiprocessing
import pickle
import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable

from ..stages.judge import Pair, messages_hash

BATCH_JOBS = 256  # jobs a message to a worker holds at most (results stream back a batch at a time)


@dataclass(slots=True)
class Rendered:
    """What a worker answered (put in the batcher's inbox): ``jobs``, in the order they were planned,
    each with ``job.rendered`` set to ``(messages_hash, (role, content, role, content, …))`` or
    ``(None, error)``. When the worker died, ``died`` says why and ``jobs`` are the ones it left
    unanswered (``rendered`` unset: the batcher renders them)."""

    jobs: list
    died: str | None = None


def _principles(ctx: Any) -> dict[str, Any]:
    """The principles a judge's jobs may name, by id (the same objects on both sides of the pipe)."""
    table = {p.id: p for p in ctx.constitution.principles}
    table.update({p.id: p for p in ctx.constitution.rl_principles})
    return table


def _work(conn: Any, blob: bytes) -> None:
    """A worker's loop: batches in, rendered messages out, until the pipe closes or an empty message."""
    import gc
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the service decides when to stop
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)  # the offline runner's settings (factory.writer.quiet_gc)
    ctxs = pickle.loads(blob)
    tables = [_principles(c) for c in ctxs]
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return
        if not data:
            return
        bid, pairs, cells = pickle.loads(data)
        out = []
        for ji, pi, order, pids in cells:
            ctx, pair = ctxs[ji], Pair(*pairs[pi])
            ctx.expect(pair, order, len(pids))
            for pid in pids:
                try:
                    m = ctx.messages(pair, tables[ji][pid], order)
                    out.append((messages_hash(m), tuple(x for d in m for x in (d["role"], d["content"]))))
                except Exception as e:  # noqa: BLE001 - one job's failed render, recorded as its row's error
                    out.append((None, f"{type(e).__name__}: {e}"))
            ctx.forget(pair.pair_id, (order,))  # normally gone with its last principle; not after a failed render
        try:
            conn.send_bytes(pickle.dumps((bid, out), protocol=pickle.HIGHEST_PROTOCOL))
        except (BrokenPipeError, OSError):
            return


class _Worker:
    def __init__(self, index: int, blob: bytes, deliver: Callable[[Rendered], None]):
        ctx = multiprocessing.get_context("spawn")  # not fork: the service has threads (uvicorn, DuckDB, engines)
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_work, args=(child, blob), name=f"factory-render-{index}", daemon=True)
        self.proc.start()
        child.close()
        self.deliver = deliver
        self.alive = True
        self.closing = False
        self.sent: dict[int, tuple[list, list]] = {}  # batch id -> (its jobs, in results order), until answered
        self._lock = threading.Lock()
        self._out: queue.Queue = queue.Queue()
        self._sender = threading.Thread(target=self._send_loop, name=f"factory-render-send-{index}", daemon=True)
        self._receiver = threading.Thread(target=self._recv_loop, name=f"factory-render-recv-{index}", daemon=True)
        self._sender.start()
        self._receiver.start()

    def outstanding(self) -> int:
        with self._lock:
            return sum(len(mine) for mine, _ in self.sent.values())

    def send(self, bid: int, jobs: tuple[list, list], payload: tuple) -> None:
        with self._lock:
            if not self.alive:
                raise BrokenPipeError
            self.sent[bid] = jobs
        self._out.put(payload)

    def _send_loop(self) -> None:
        while True:
            payload = self._out.get()
            if payload is None:
                try:
                    self.conn.send_bytes(b"")
                except OSError:
                    pass
                return
            try:
                self.conn.send_bytes(pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))
            except OSError:  # the worker is gone: the receiver reports it
                return

    def _recv_loop(self) -> None:
        while True:
            try:
                bid, out = pickle.loads(self.conn.recv_bytes())
            except (EOFError, OSError, pickle.UnpicklingError):
                break
            with self._lock:
                sent = self.sent.pop(bid, None)
            if sent is not None:
                mine, flat = sent
                for job, res in zip(flat, out):
                    job.rendered = res
                self.deliver(Rendered(mine))
        with self._lock:
            self.alive = False
            lost = [j for mine, _ in self.sent.values() for j in mine]
            self.sent.clear()
        self.proc.join(timeout=5)
        if not self.closing:
            self.deliver(Rendered(lost, died=f"render worker {self.proc.name} (pid {self.proc.pid}) exited with code "
                                         f"{self.proc.exitcode}; its jobs render in the service"))

    def close(self, timeout: float) -> None:
        self.closing = True
        self._out.put(None)
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(timeout)
        self._receiver.join(timeout)
        self.conn.close()


class RenderPool:
    """``n`` render workers over the contexts ``ctxs`` (one per judge); ``deliver`` gets each
    :class:`Rendered` on a receiver thread (the batcher puts it in its inbox)."""

    def __init__(self, ctxs: list[Any], n: int, deliver: Callable[[Rendered], None]):
        self._index = {id(c): i for i, c in enumerate(ctxs)}
        self._tables = [_principles(c) for c in ctxs]
        blob = pickle.dumps(ctxs, protocol=pickle.HIGHEST_PROTOCOL)
        self._ids = itertools.count()
        self.workers = [_Worker(i, blob, deliver) for i in range(n)]

    @property
    def alive(self) -> int:
        return sum(w.alive for w in self.workers)

    def idle(self) -> bool:
        """No worker has jobs in hand."""
        return not any(w.sent for w in self.workers)

    def takes(self, job: Any) -> bool:
        """Can a worker render ``job``: it declares its render, for a judge (and principle) the workers hold."""
        r = job.render
        if r is None or not self.alive:
            return False
        i = self._index.get(id(r[0]))
        return i is not None and self._tables[i].get(r[2].id) is r[2]

    def submit(self, jobs: list) -> list:
        """Send ``jobs`` (each :meth:`takes`) to the least busy live workers; returns the jobs no worker
        took (every worker died): the caller renders them. The jobs are grouped by (judge, pair, order),
        so a worker renders each group's template once and fills in its principles; a message holds
        whole groups, about ``BATCH_JOBS`` jobs, and its answer keeps the jobs' order (the engine's
        prefix-cache order, :func:`factory.stages.judge.cache_order`)."""
        cells: dict[tuple, list] = {}
        for pos, job in enumerate(jobs):
            ctx, pair, p, order = job.render
            cells.setdefault((self._index[id(ctx)], pair.pair_id, order), []).append(pos)
        left: list = []
        batch: list[tuple] = []
        n = 0
        groups = list(cells.items())
        for i, cell in enumerate(groups):
            batch.append(cell)
            n += len(cell[1])
            if n >= BATCH_JOBS or i == len(groups) - 1:
                left += self._send(jobs, batch)
                batch, n = [], 0
        return left

    def _send(self, jobs: list, cells: list[tuple]) -> list:
        """One message: the distinct pairs, and per cell (judge, pair, order, principle ids); the
        answer comes back in cell order, for the cells' jobs in the order they were planned."""
        positions = sorted(pos for _, ps in cells for pos in ps)
        mine = [jobs[pos] for pos in positions]
        live = [w for w in self.workers if w.alive]
        if not live:
            return mine
        pairs: dict[str, int] = {}
        pair_rows: list[tuple] = []
        wire: list[tuple] = []
        flat: list = []  # the jobs in the order their results come back
        for (ji, pid, order), ps in cells:
            pi = pairs.get(pid)
            if pi is None:
                pair = jobs[ps[0]].render[1]
                pi = pairs[pid] = len(pair_rows)
                pair_rows.append((pair.pair_id, pair.conversation, pair.a, pair.b))
            wire.append((ji, pi, order, [jobs[pos].render[2].id for pos in ps]))
            flat.extend(jobs[pos] for pos in ps)
        bid = next(self._ids)
        w = min(live, key=_Worker.outstanding)
        try:
            w.send(bid, (mine, flat), (bid, pair_rows, wire))
        except BrokenPipeError:
            return mine
        return []

    def close(self, timeout: float = 10.0) -> None:
        for w in self.workers:
            w.close(timeout)


def default_workers() -> int:
    """One render worker per spare core, at most 4 (``--render-workers`` overrides; 0: render in-process)."""
    import os

    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(4, n - 1))
