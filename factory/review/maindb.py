"""The review app's only door to the factory database: every SQL statement on it is here.

Reads: an audit, its run's judgements, the human labels, pair texts, the judge's exact messages.
Writes: verdict events (table ``review_verdicts``) and the adjudicated human set
``adjudicated:<audit>`` built from them (``human_sets`` / ``human_labels``, like an imported set).

DuckDB locks a database file per process: while a run holds it for writing, no other process can
open it, even read-only. Every open here is short-lived, and a refused one raises :class:`Busy`
naming the run (and pid) that holds the file, read from the store's ``<db>.lock`` sidecar.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import duckdb
import pyarrow as pa

from ..store import Store, StoreError, ddl, now
from .verdicts import EVENT_SCHEMA, VERDICTS

ADJUDICATED = "adjudicated:"
# one row per verdict event (set or undo), as in the review workspace, plus the workspace it came from
VERDICTS_DDL = ddl("review_verdicts", EVENT_SCHEMA.append(pa.field("workspace", pa.string())), "event_id")
EVENT_COLUMNS = tuple(EVENT_SCHEMA.names)
_PID = re.compile(r"\(PID (\d+)\)")


def adjudicated_set(audit_id: str) -> str:
    """The human set id that holds an audit's adjudicated labels."""
    return f"{ADJUDICATED}{audit_id}"


class Busy(StoreError):
    """The database is held by another process (a run, usually); nothing was read or written."""

    def __init__(self, db: str | Path, run_id: str | None, pid: int | None):
        self.db, self.run_id, self.pid = str(db), run_id, pid
        super().__init__(f"{db}: database is in use by {self.who}")

    @property
    def who(self) -> str:
        if self.run_id and self.pid:
            return f"run {self.run_id} (pid {self.pid})"
        return f"process {self.pid}" if self.pid else "another process"


def _busy(db: Path, error: BaseException) -> Busy:
    """Who holds ``db``: the run named in its lock file when that process holds the lock, else the
    pid DuckDB reports."""
    text = f"{error} {error.__context__ or ''}"
    m = _PID.search(text)
    duck_pid = int(m.group(1)) if m else None
    try:
        info = json.loads(Path(f"{db}.lock").read_text())
        run_id, pid = str(info["run_id"]), int(info["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return Busy(db, None, duck_pid)
    if duck_pid not in (None, pid) or not _alive(pid):
        return Busy(db, None, duck_pid)
    return Busy(db, run_id, pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _in_use(e: StoreError) -> bool:
    return "in use by" in str(e)


@contextmanager
def reading(db: str | Path) -> Iterator[Store]:
    """The database opened read-only for the duration of the block; :class:`Busy` when held."""
    try:
        store = Store(db, read_only=True)
    except StoreError as e:
        if _in_use(e):
            raise _busy(Path(db), e) from None
        raise
    try:
        yield store
    finally:
        store.close()


class _Writer(Store):
    """A writer Store that gives its lock file back when DuckDB refuses the open (``Store`` keeps the
    lock taken in that case, which in a long-lived process would block every later run)."""

    def __init__(self, path: str | Path, writer_run: str):
        try:
            super().__init__(path, writer_run=writer_run)
        except BaseException:
            if getattr(self, "con", None) is not None:
                self.con.close()
            if self._lock_fd is not None:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                os.close(self._lock_fd)
                self._lock_fd = None
            raise


@contextmanager
def writing(db: str | Path, who: str) -> Iterator[Store]:
    """The database opened for writing under the store's writer lock (as run ``who``); :class:`Busy` when held."""
    if not Path(db).exists():
        raise StoreError(f"{db}: no such database")
    try:
        store = _Writer(db, writer_run=who)
    except StoreError as e:
        if _in_use(e):
            raise _busy(Path(db), e) from None
        raise
    try:
        store.con.execute(VERDICTS_DDL)
        for col in ("session", "base"):  # issue 22: columns added to the events after the table's first version
            store.con.execute(f"ALTER TABLE review_verdicts ADD COLUMN IF NOT EXISTS {col} VARCHAR")
        yield store
    finally:
        store.close()


# -- reads ------------------------------------------------------------------------------------


@dataclass
class AuditRow:
    audit_id: str
    run_id: str
    set_id: str
    created_at: Any
    result: dict[str, Any]


def audit_row(store: Store, audit_id: str | None = None) -> AuditRow:
    """One stored audit (the newest when ``audit_id`` is None)."""
    none_yet = StoreError(f"{store.path}: no audits yet; run one first (`factory audit PIPELINE` or "
                          "`factory audit --run R --human S --db DB`)")
    try:
        known = [r[0] for r in store.con.execute("SELECT audit_id FROM audits ORDER BY created_at").fetchall()]
    except duckdb.CatalogException:  # a database from before audits existed
        raise none_yet from None
    if not known:
        raise none_yet
    if audit_id is not None and audit_id not in known:
        raise StoreError(f"{store.path}: no audit '{audit_id}'; audits in this db: {known}")
    row = store.one("SELECT audit_id, run_id, set_id, created_at, result_json FROM audits WHERE audit_id = ?",
                    [audit_id or known[-1]])
    return AuditRow(row[0], row[1], row[2], row[3], json.loads(row[4]))


def audit_labels(store: Store, audit: AuditRow) -> tuple[pa.Table, pa.Table]:
    """The audited run's labels per pair and per (pair, principle) cell, made by the one label rule
    (:mod:`factory.labels`, the run's own rule) exactly as the audit makes them."""
    from ..labels import cells_sql, labels_table, run_rule

    rule = run_rule(store, audit.run_id)
    rel, params = store.run_rows("judgements", "$run"), {"run": audit.run_id}
    labels = labels_table(store, rel, rule, params)
    # a panel: one cell per judge × principle, shown as "judge/principle" (each judge's probabilities)
    cells = store.con.sql(f"""SELECT pair_id, CASE WHEN judge = '' THEN principle_id ELSE judge || '/' || principle_id
                                     END AS principle_id, p_ab, p_ba, p FROM ({cells_sql(rel, rule)})""",
                          params=params).to_arrow_table()
    return labels, cells


def human_rows(store: Store, set_id: str) -> pa.Table:
    """(pair_id, human_choice, source_row, len_a, len_b, source) of a human set."""
    return store.con.sql(
        """SELECT h.pair_id, h.human_choice, h.source_row, length(p.response_a) AS len_a,
                  length(p.response_b) AS len_b, p.source
           FROM human_labels h JOIN pairs p USING (pair_id) WHERE h.set_id = ?""", params=[set_id]).to_arrow_table()


def _probe(store: Store, ids: list[str], sql: str, params: list | dict | None = None) -> pa.Table:
    store.con.register("_review_ids", pa.table({"k": pa.array(ids, pa.string())}))
    try:
        return store.con.sql(sql, params=params or None).to_arrow_table()
    finally:
        store.con.unregister("_review_ids")


def pair_texts(store: Store, pair_ids: list[str]) -> pa.Table:
    """(pair_id, conversation, response_a, response_b) of the given pairs."""
    return _probe(store, pair_ids, """SELECT t.pair_id, t.conversation, t.response_a, t.response_b FROM pairs t
                                       JOIN _review_ids i ON i.k = t.pair_id""")


def judgement_rows(store: Store, run_id: str, pair_ids: list[str]) -> pa.Table:
    """The run's judgements of the given pairs, one row each (no messages: see :func:`messages`)."""
    return _probe(store, pair_ids, f"""
        SELECT t.id, t.pair_id, t.principle_id, t."order" AS "order", t.p_first, t.p_a, t.status, t.error, t.model
        FROM {store.run_rows('judgements', '$run')} t SEMI JOIN _review_ids i ON i.k = t.pair_id""", {"run": run_id})


def messages(store: Store, row_id: str) -> list[dict]:
    """Exactly the messages the judge received for one judgement."""
    from ..lineage import row_messages

    return row_messages(store, row_id)


def has_set(store: Store, set_id: str) -> bool:
    return store.one("SELECT count(*) FROM human_sets WHERE set_id = ?", [set_id])[0] > 0


def verdict_events(store: Store, audit_id: str) -> pa.Table:
    """The verdict events stored for an audit (none when no review was ever synced)."""
    exists = store.one("SELECT count(*) FROM information_schema.tables WHERE table_name = 'review_verdicts'")[0]
    if not exists:
        return EVENT_SCHEMA.empty_table()
    have = {r[0] for r in store.con.execute("SELECT column_name FROM information_schema.columns "
                                            "WHERE table_name = 'review_verdicts'").fetchall()}
    cols = ", ".join(c if c in have else f"NULL AS {c}" for c in EVENT_COLUMNS)  # a table from before a column
    return store.con.sql(f"SELECT {cols} FROM review_verdicts WHERE audit_id = ? "
                         "ORDER BY given_at, seq", params=[audit_id]).to_arrow_table().cast(EVENT_SCHEMA)


# -- writes -----------------------------------------------------------------------------------


def save_verdicts(store: Store, audit: AuditRow, events: pa.Table, workspace: str) -> dict[str, Any]:
    """Insert verdict events (idempotent on ``event_id``) and bring the audit's adjudicated set up to date
    with every stored event, in one transaction. Returns the set's counts."""
    events = events.select(list(EVENT_COLUMNS)).append_column(
        "workspace", pa.array([workspace] * events.num_rows, pa.string()))
    with store.transaction():
        store.insert("review_verdicts", events)
        return _update_set(store, audit, sorted(set(events["pair_id"].to_pylist())))


_CURRENT = """SELECT * FROM (SELECT *, row_number() OVER (PARTITION BY pair_id ORDER BY given_at DESC, seq DESC) AS k
                             FROM review_verdicts WHERE audit_id = ?) WHERE k = 1 AND verdict IS NOT NULL"""


def _update_set(store: Store, audit: AuditRow, touched: list[str]) -> dict[str, Any]:
    """``adjudicated:<audit>`` = the audit's human set with each adjudicated pair's label replaced by the
    verdict's label; pairs whose verdict gives no label (both / neither acceptable, or "AI right" on an
    AI tie) are left out and counted as skipped rows with their reason. Built whole the first time, then
    only the ``touched`` pairs' rows are rewritten."""
    set_id = adjudicated_set(audit.audit_id)
    params = [audit.audit_id, audit.set_id]
    exists = store.one("SELECT 1 FROM human_sets WHERE set_id = ?", [set_id]) is not None
    only = "AND list_contains(?, h.pair_id)" if exists else ""
    scope = [touched] if exists else []
    store.con.execute(f"DELETE FROM human_labels h WHERE h.set_id = ? {only}", [set_id, *scope])
    store.con.execute(
        f"""INSERT INTO human_labels SELECT ?, h.pair_id, h.source_row, coalesce(c.label, h.human_choice),
                   CASE WHEN c.pair_id IS NULL THEN h.annotator ELSE c.annotator END,
                   CASE WHEN c.pair_id IS NULL THEN h.confidence END, h.swapped
            FROM human_labels h LEFT JOIN ({_CURRENT}) c USING (pair_id)
            WHERE h.set_id = ? {only} AND (c.pair_id IS NULL OR c.label IS NOT NULL)""", [set_id, *params, *scope])
    reviewed = f"FROM ({_CURRENT}) c JOIN human_labels h USING (pair_id) WHERE h.set_id = ?"
    skipped = store.con.execute(f"""SELECT c.verdict, list(h.source_row ORDER BY h.source_row) {reviewed}
                                    AND c.label IS NULL GROUP BY 1 ORDER BY 1""", params).fetchall()
    by_verdict = dict(store.con.execute(f"SELECT c.verdict, count(*) {reviewed} GROUP BY 1", params).fetchall())
    annotators = [r[0] for r in store.con.execute(f"SELECT DISTINCT c.annotator {reviewed} ORDER BY 1", params).fetchall()]
    by_reason = [{"reason": f"adjudicated: {VERDICTS[v].excluded}", "count": len(rows), "rows": rows[:20]}
                 for v, rows in skipped]
    n = store.one("SELECT count(*) FROM human_labels WHERE set_id = ?", [set_id])[0]
    n_skipped = sum(r["count"] for r in by_reason)
    body = {"by_reason": by_reason, "audit_id": audit.audit_id, "run_id": audit.run_id, "original_set": audit.set_id,
            "reviewed": sum(by_verdict.values()), "by_verdict": by_verdict, "annotators": annotators}
    store.con.execute("INSERT OR REPLACE INTO human_sets VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                      [set_id, set_id, f"review of audit {audit.audit_id} (human set {audit.set_id})", "adjudicated",
                       n, n_skipped, json.dumps(body), now()])
    return {"set_id": set_id, "n_pairs": n, "n_skipped": n_skipped, **body}
