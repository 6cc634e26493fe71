"""The run's writer thread, and the garbage-collector settings a streaming run uses.

:class:`Writer` is the one writer of a run's result rows: a thread of its own with its own DuckDB
connection (``Store.view()``). Inserts and commits, checkpoints included, release the GIL, so they
overlap with planning and rendering in the run's thread. At most one transaction waits while one
is written (bounded memory); a failed write (disk full) is raised in the run's thread at its next
hand-over, and everything committed before it stays intact.
"""

from __future__ import annotations

import contextlib
import gc
import queue
import threading
from typing import Callable

from .store import CHUNK_SCHEMA, Store


class Writer:
    """One transaction per :meth:`put`: result rows, membership links and chunk records (module docstring)."""

    def __init__(self, store: Store, on_commit: Callable[[], None] | None = None):
        """``on_commit``: called on the writer's thread after each transaction commits (or fails), so a
        loop that waits for commits (the judge service's) can block on its own queue instead of
        polling :meth:`committed`."""
        self.store = store
        self.on_commit = on_commit
        self._q: queue.Queue = queue.Queue(maxsize=1)
        self._done: list = []
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "Writer":
        self._view = self.store.view()
        self._thread = threading.Thread(target=self._loop, name="factory-writer", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while True:
            item = self._q.get()
            try:
                if item is None:
                    return
                if self._error is None:
                    tables, links, records, token = item
                    with self._view.transaction():
                        for table, rows, replace, *new in tables:  # new: (True,) = rows known not stored
                            self._view.insert(table, rows, replace=replace, known_new=bool(new and new[0]))
                        for (run_id, table), keys in links.items():
                            self._view.link_run(run_id, table, keys)
                        self._view.insert("chunks", records, CHUNK_SCHEMA)
                    self._done.append(token)
            except BaseException as e:  # kept for the run's thread; later batches are not written
                self._error = e
            finally:
                self._q.task_done()
                if item is not None and self.on_commit is not None:
                    self.on_commit()

    def _raise(self) -> None:
        if self._error is not None:
            e, self._error = self._error, None
            raise e

    def put(self, tables, links, records, token) -> None:
        self._raise()
        self._q.put((tables, links, records, token))

    def committed(self) -> list:
        done, self._done = self._done, []
        return done

    def drain(self) -> None:
        self._q.join()
        self._raise()

    def reopen_store(self) -> bool:
        """Between transactions: let the store reopen its database (:meth:`Store.reopen`), with this
        thread's connection closed meanwhile and opened again after."""
        self.drain()
        self._view.close()
        reopened = self.store.reopen()  # an error ends the run as a failed write does; committed rows stay
        self._view = self.store.view()
        return reopened

    def __exit__(self, *exc) -> None:
        self._q.put(None)
        self._thread.join()
        self._view.close()


@contextlib.contextmanager
def quiet_gc():
    """A run allocates a few objects per job by the million; with the default thresholds Python's
    cycle collector would run every 700 allocations and, every few runs, walk every live object
    (vLLM and torch bring millions): half the CPU of planning. Everything alive at the start is
    frozen out of collection and the young generation is collected every 100,000 allocations."""
    old = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)
    try:
        yield
    finally:
        gc.set_threshold(*old)
        gc.unfreeze()
