"""A request's judgements as the batcher sees them (:class:`Ticket`), and the service's counters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..runner import Job

Value = tuple  # (status, p_a)


class StoreFailed(Exception):
    """The writer could not commit (disk full, …): nothing more can be stored, so nothing more is answered."""


@dataclass(eq=False)
class Ticket:
    """One request's judgements. ``done`` is called once (from any thread) when all are committed
    or the ticket failed (``error``)."""

    jobs: list[Job]
    pairs: list[dict]  # pair rows (status ok or skipped) to record with the run
    done: Callable[["Ticket"], None] = lambda t: None
    got: dict[str, Value] = field(default_factory=dict)
    cached: int = 0
    hits: list[str] = field(default_factory=list)  # the keys answered from the LRU or the store (``cached`` of them)
    error: str | None = None
    _missing: int = -1
    _closed: bool = False

    def resolve(self, key: str, value: Value) -> None:
        if key not in self.got:
            self.got[key] = value
            self._missing -= 1
            if self._missing == 0:
                self.finish()

    def fail(self, reason: str) -> None:
        if not self._closed:
            self.error = reason
            self.finish()

    def finish(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self.done(self)
            except Exception:  # noqa: BLE001 - a caller's callback must never stop the engine loop
                pass


@dataclass
class Stats:
    requests: int = 0
    pairs: int = 0
    judgements: int = 0  # new judgements stored
    rationales: int = 0  # new rationales stored (a cot judge: one before each judgement)
    cache_hits: int = 0  # judgements answered from the store (LRU or DuckDB)
    store_probes: int = 0
    linked: int = 0  # judgements another run made, linked into this run
    engine_requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    transactions: int = 0
    failed_judgements: int = 0
    render_workers: int = 0  # judge-prompt render processes alive (factory.serve.render_pool)
    worker_renders: int = 0  # judgement prompts those processes rendered
