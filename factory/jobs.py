"""What a run kind and the streaming runner (:mod:`factory.runner`) hand each other.

A run kind plans :class:`InputChunk` s; each plans :class:`Job` s (one engine request and the row it
will be stored as, with the follow-ups its stored rows create) and may add :class:`Write` s (rows
stored alongside). The runner tracks a chunk's progress in a :class:`ChunkState` and counts each
table's work in :class:`TableStats`; :func:`gen_row` is the default completion → row mapping.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

from .engines.base import Completion, Request
from .store import now


@dataclass(eq=False)
class ChunkState:
    """An input chunk in progress: done when every job it planned (follow-ups included) is stored."""

    index: int
    meta: dict = field(default_factory=dict)
    pending: int = 0
    closed: bool = False
    n_jobs: int = 0
    n_new: int = 0


@dataclass(eq=False, slots=True)
class Job:
    """One request and the row fields (besides the outcome) it will be stored with.

    ``build`` renders the request; it is called only if the rows are not stored yet. ``row_ids`` are
    the ids of the rows it produces (default: its key alone; n samples give n ids). ``then`` plans
    follow-up jobs from the job's stored rows (dicts with ``id``, ``status`` and the ``need``
    columns), whether just generated or reused."""

    table: str
    key: str
    row: dict
    build: Callable[[], Request]
    to_rows: Callable[["Job", Completion], list[dict]]
    row_ids: tuple[str, ...] | None = None
    then: Callable[[list[dict]], Iterable["Job"]] | None = None
    need: tuple[str, ...] = ()
    chunk: ChunkState | None = None
    replace: bool = False
    route: str | None = None  # the role whose engine answers it (a judge's name, "policy"); None: the default
    # what ``build`` renders, when another process may render it instead: (JudgeCtx, Pair, Principle,
    # order), whose messages are ``ctx.messages(pair, principle, order)`` (factory.serve.render_pool)
    render: tuple | None = None
    rendered: tuple | None = None  # those messages, rendered elsewhere: (messages_hash, flat) or (None, error)

    @property
    def ids(self) -> tuple[str, ...]:
        return self.row_ids or (self.key,)


@dataclass
class Write:
    """Rows a follow-up step stores alongside its jobs (e.g. the pairs made from a prompt's samples):
    buffered with the run's rows and written in the same transactions (insert or ignore)."""

    table: str
    rows: list[dict]


@dataclass
class TableStats:
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
    return [{**job.row, "id": job.key, "text": text, "status": status, "error": error,
             "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
             "finish_reason": c.finish_reasons[0] if c.finish_reasons else None, "created_at": now()}]


@dataclass
class InputChunk:
    """What a run kind hands the runner per chunk: its index (stable for an unchanged input), where
    it lies (recorded when it finishes) and a function planning its root jobs (which may also do
    the chunk's own writes, such as its pairs)."""

    index: int
    meta: dict
    plan: Callable[[], list[Job]]
