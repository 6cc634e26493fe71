"""One audit under review: the workspace, the factory database, and the copying between them.

- At start the workspace copy of the audit is built (or kept, when the audit has not changed) and
  verdicts stored in the database by earlier sessions are merged in. If a run holds the database,
  the existing copy is browsed instead, and with no copy yet the start fails with who holds it.
- A verdict is committed to the workspace before the request returns, then a background thread
  copies pending verdicts into the database (``review_verdicts`` and the human set
  ``adjudicated:<audit>``) as soon as the database is free, retrying every ``sync_interval``
  seconds while a run holds it. Nothing is dropped: an event leaves the pending list only after
  the database transaction holding it has committed (a crash in between re-sends it, and the
  database ignores an event id it already has).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from ..store import StoreError, now
from . import maindb
from .build import build
from .workspace import Workspace, workspace_path


@dataclass
class DbState:
    """What the app knows about the database, for the banner."""

    busy: maindb.Busy | None = None
    checked_at: datetime | None = None
    synced_at: datetime | None = None
    error: str | None = None  # the last failure that was not "in use"
    adjudicated: dict[str, Any] = field(default_factory=dict)  # the set's counts after the last sync


class Review:
    """One audit under review by one annotator (see the module docstring); ``close()`` when done."""

    def __init__(self, db: str | Path, audit_id: str | None = None, *, annotator: str, read_only: bool = False,
                 sync_interval: float = 5.0):
        self.db = Path(db)
        self.annotator = annotator
        self.read_only = read_only
        self.sync_interval = sync_interval
        self.state = DbState()
        self._main = threading.Lock()  # one open of the database at a time in this process
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._audit: dict[str, Any] | None = None
        self.ws_pending_at_close = 0
        if not self.db.exists():
            raise StoreError(f"{self.db}: no such database")
        self.ws = Workspace(workspace_path(self.db))
        try:
            self.audit_id = self._start(audit_id)
        except BaseException:
            self.ws.close()
            raise

    def _start(self, audit_id: str | None) -> str:
        try:
            with self._main:
                audit = build(self.ws, self.db, audit_id, force=False)
            self.state.checked_at = now()
            return audit.audit_id
        except maindb.Busy as b:
            self.state.busy, self.state.checked_at = b, now()
            have = self.ws.audit(audit_id)
            if have is None:
                which = f"audit {audit_id}" if audit_id else "any audit"
                raise StoreError(f"{b}, and its review workspace ({self.ws.path}) has no copy of {which} yet: "
                                 "start `factory review` again when the run has finished (once the copy exists, "
                                 "reviewing works while runs hold the database)") from None
            return have["audit_id"]

    # -- the audit and the state shown in the banner ---------------------------------------------
    @property
    def audit(self) -> dict[str, Any]:
        """The workspace's copy of the audit (run, human set, result), read once per build."""
        if self._audit is None or self._audit["audit_id"] != self.audit_id:
            self._audit = self.ws.audit(self.audit_id)
        return self._audit

    def status(self) -> dict[str, Any]:
        s = self.state
        return {"db": str(self.db), "workspace": str(self.ws.path), "audit_id": self.audit_id,
                "set_id": maindb.adjudicated_set(self.audit_id), "read_only": self.read_only,
                "busy": str(s.busy.who) if s.busy else None, "busy_run": s.busy.run_id if s.busy else None,
                "busy_pid": s.busy.pid if s.busy else None, "checked_at": s.checked_at, "synced_at": s.synced_at,
                "pending": self.ws.n_pending(self.audit_id), "error": s.error, "built_at": self.audit["built_at"],
                "retry_s": self.sync_interval, "adjudicated": s.adjudicated}

    # -- copying ---------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Rebuild the workspace copy from the database now (:class:`maindb.Busy` when a run holds it)."""
        with self._main:
            try:
                build(self.ws, self.db, self.audit_id, force=True)
            except maindb.Busy as b:
                self.state.busy, self.state.checked_at = b, now()
                raise
            self._audit = None
            self.state.busy, self.state.checked_at = None, now()

    def sync(self) -> bool:
        """Copy pending verdicts into the database; True when nothing is left pending."""
        if self.read_only:
            return self.ws.n_pending(self.audit_id) == 0
        with self._main:
            events = self.ws.pending(self.audit_id)
            if not events.num_rows:
                return True
            a = self.audit
            row = maindb.AuditRow(a["audit_id"], a["run_id"], a["set_id"], a["created_at"], a["result"])
            try:
                with maindb.writing(self.db, f"review:{self.audit_id}") as store:
                    info = maindb.save_verdicts(store, row, events, str(self.ws.path))
            except maindb.Busy as b:
                self.state.busy, self.state.checked_at = b, now()
                return False
            except Exception as e:  # kept pending; shown in the banner and retried
                self.state.error, self.state.checked_at = f"{type(e).__name__}: {e}", now()
                return False
            self.ws.mark_synced(events["event_id"].to_pylist())
            self.state.busy, self.state.error = None, None
            self.state.checked_at = self.state.synced_at = now()
            self.state.adjudicated = info
        return self.ws.n_pending(self.audit_id) == 0

    def probe(self) -> None:
        """Check whether the database is still held (only called while it was)."""
        with self._main:
            try:
                with maindb.reading(self.db):
                    pass
                self.state.busy = None
            except maindb.Busy as b:
                self.state.busy = b
            self.state.checked_at = now()

    def messages(self, judgement_id: str) -> list[dict]:
        """The exact messages the judge received (copied from the database on first request)."""
        cached = self.ws.cached_messages(judgement_id)
        if cached is not None:
            return cached
        if self.ws.one("SELECT 1 AS x FROM judgements WHERE audit_id = ? AND id = ?", [self.audit_id, judgement_id]) is None:
            raise KeyError(f"judgement {judgement_id} is not one of this audit's queued pairs")
        with self._main:
            try:
                with maindb.reading(self.db) as store:
                    msgs = maindb.messages(store, judgement_id)
            except maindb.Busy as b:
                self.state.busy, self.state.checked_at = b, now()
                raise
        self.ws.cache_messages(judgement_id, msgs)
        return msgs

    # -- verdicts --------------------------------------------------------------------------------
    def record(self, pair_id: str, verdict: str, note: str | None, *, session: str | None = None,
               base: str | None = None) -> dict[str, Any]:
        """``session``: the browser session giving it; ``base``: the pair's version it was made against
        (a :class:`~.workspace.Conflict` when another session changed the pair since)."""
        if self.read_only:
            raise PermissionError("read-only review: verdicts cannot be given")
        event = self.ws.record(self.audit_id, pair_id, verdict, note, self.annotator, session=session, base=base)
        self._wake.set()
        return event

    def undo(self, *, session: str | None = None) -> dict[str, Any] | None:
        if self.read_only:
            raise PermissionError("read-only review: verdicts cannot be undone")
        event = self.ws.undo(self.audit_id, self.annotator, session=session)
        self._wake.set()
        return event

    # -- the background copier -------------------------------------------------------------------
    def start_background(self) -> None:
        if self._thread is None and not self.read_only:
            self._thread = threading.Thread(target=self._loop, name="review-sync", daemon=True)
            self._thread.start()
            self._wake.set()  # verdicts left pending by an earlier session go first

    def _loop(self) -> None:
        while not self._stop.is_set():
            woke = self._wake.wait(self.sync_interval)
            self._wake.clear()
            if self._stop.is_set():
                break
            if self.ws.n_pending(self.audit_id):
                self.sync()
            elif self.state.busy is not None and not woke:
                self.probe()

    def close(self) -> None:
        """Stop the copier, try a last copy of pending verdicts, close the workspace (once)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        try:
            self.sync()
        finally:
            self.ws_pending_at_close = self.ws.n_pending(self.audit_id)
            self.ws.close()
