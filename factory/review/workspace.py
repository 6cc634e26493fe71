"""The review workspace: a DuckDB file of the app's own beside the database (``<db>.review.duckdb``).

It holds a copy of what an audit's review queue needs (the disagreements and ties, their texts,
per-principle probabilities and judgements, the audit result) so browsing never needs the main
database, which a run may hold for hours; and every verdict, written here in its own transaction
the moment it is given (so it survives a crash), with ``synced_at`` set once it is in the main
database. Verdicts are events (``set`` / ``undo``); ``current`` is the state they lead to. Events are
ordered by time, then by ``seq`` (a workspace's own counter) within one microsecond.
"""

from __future__ import annotations

import json
import secrets
import threading
import uuid
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from ..store import StoreError, now
from .verdicts import EVENT_SCHEMA, VERDICTS, label

SCHEMA = [
    "CREATE SEQUENCE IF NOT EXISTS event_seq",
    "CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR)",
    """CREATE TABLE IF NOT EXISTS audits (audit_id VARCHAR PRIMARY KEY, run_id VARCHAR, set_id VARCHAR,
        created_at TIMESTAMPTZ, result_json VARCHAR, built_at TIMESTAMPTZ, n_pairs BIGINT, n_items BIGINT)""",
    # the queue: the audit's pairs where the AI label is not the human's (disagreements and ties)
    """CREATE TABLE IF NOT EXISTS items (audit_id VARCHAR, pair_id VARCHAR, rank BIGINT, p_a DOUBLE, margin DOUBLE,
        is_tie BOOLEAN, ai_choice VARCHAR, human_choice VARCHAR, orders_agree DOUBLE, n_principles BIGINT,
        len_a BIGINT, len_b BIGINT, source VARCHAR, source_row BIGINT, drivers VARCHAR)""",
    # per (pair, principle): P(a better) in each order and averaged; toward_wrong = P(the side the human
    # did not choose); prank = rank among the pairs this principle pushed against the human; rank = the
    # item's (an integer join key)
    """CREATE TABLE IF NOT EXISTS cells (audit_id VARCHAR, pair_id VARCHAR, principle_id VARCHAR, p_ab DOUBLE,
        p_ba DOUBLE, p DOUBLE, toward_wrong DOUBLE, prank BIGINT, rank BIGINT)""",
    """CREATE TABLE IF NOT EXISTS texts (audit_id VARCHAR, pair_id VARCHAR, conversation VARCHAR,
        response_a VARCHAR, response_b VARCHAR)""",
    """CREATE TABLE IF NOT EXISTS judgements (audit_id VARCHAR, id VARCHAR, pair_id VARCHAR, principle_id VARCHAR,
        "order" VARCHAR, p_first DOUBLE, p_a DOUBLE, status VARCHAR, error VARCHAR, model VARCHAR)""",
    "CREATE TABLE IF NOT EXISTS messages (id VARCHAR PRIMARY KEY, messages VARCHAR)",
    """CREATE TABLE IF NOT EXISTS events (event_id VARCHAR PRIMARY KEY, audit_id VARCHAR, pair_id VARCHAR,
        seq BIGINT, action VARCHAR, verdict VARCHAR, label VARCHAR, note VARCHAR, annotator VARCHAR,
        given_at TIMESTAMPTZ, undoes VARCHAR, synced_at TIMESTAMPTZ)""",
    """CREATE TABLE IF NOT EXISTS current (audit_id VARCHAR, pair_id VARCHAR, verdict VARCHAR, label VARCHAR,
        note VARCHAR, annotator VARCHAR, given_at TIMESTAMPTZ, event_id VARCHAR, PRIMARY KEY (audit_id, pair_id))""",
    "CREATE TABLE IF NOT EXISTS ui (audit_id VARCHAR, key VARCHAR, value VARCHAR, PRIMARY KEY (audit_id, key))",
    # issue 22: which browser session gave a verdict, and the pair's version it was given against
    "ALTER TABLE events ADD COLUMN IF NOT EXISTS session VARCHAR",
    "ALTER TABLE events ADD COLUMN IF NOT EXISTS base VARCHAR",
    "ALTER TABLE current ADD COLUMN IF NOT EXISTS session VARCHAR",
    # point lookups of one pair (the pair view) without scanning the copied tables
    *(f"CREATE INDEX IF NOT EXISTS {t}_pair ON {t} (pair_id)" for t in ("items", "cells", "texts", "judgements")),
]
DERIVED = ("items", "cells", "texts", "judgements")


class Conflict(Exception):
    """Another browser session changed the pair after this one opened it: nothing was written."""

    def __init__(self, other: dict[str, Any], undo: bool = False):
        self.other, self.undo = other, undo
        who = f"{other['annotator']} (session {other['session'] or '?'})"
        did = (f"gave it “{VERDICTS[other['verdict']].title}”" if other["verdict"] else "cleared its verdict")
        super().__init__(f"Another session, {who}, {did} at {other['given_at'].astimezone().strftime('%H:%M:%S')} "
                         f"after you opened this pair, so your {'undo' if undo else 'verdict'} was not saved. "
                         "Its verdict is shown here; give yours again to replace it.")


def workspace_path(db: str | Path) -> Path:
    db = Path(db)
    return db.with_name(db.name + ".review.duckdb")


class Workspace:
    """One open workspace file. Every method takes ``self.lock``: one DuckDB connection, many threads."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.lock = threading.RLock()
        try:
            self.con = duckdb.connect(str(self.path))
        except duckdb.IOException as e:
            if "lock" in str(e).lower():
                raise StoreError(f"{self.path}: the review workspace is open in another process (another "
                                 f"`factory review` on this database?): {e}") from None
            raise
        for stmt in SCHEMA:
            self.con.execute(stmt)

    def close(self) -> None:
        with self.lock:
            self.con.close()

    def rows(self, sql: str, params: list | None = None) -> list[dict[str, Any]]:
        with self.lock:
            cur = self.con.execute(sql, params or [])
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r)) for r in cur.fetchall()]

    def one(self, sql: str, params: list | None = None) -> dict[str, Any] | None:
        rows = self.rows(sql, params)
        return rows[0] if rows else None

    # -- the audit's copy ------------------------------------------------------------------------
    def audit(self, audit_id: str | None = None) -> dict[str, Any] | None:
        """The copied audit (the most recently built one when ``audit_id`` is None), result parsed."""
        row = self.one("SELECT * FROM audits " + ("WHERE audit_id = ?" if audit_id else "ORDER BY built_at DESC LIMIT 1"),
                       [audit_id] if audit_id else [])
        if row:
            row["result"] = json.loads(row.pop("result_json"))
        return row

    def replace(self, audit: Any, tables: dict[str, pa.Table], events: pa.Table) -> int:
        """Replace the audit's copied tables (``DERIVED``) in one transaction and merge the verdict events
        found in the main database (already synced there). Returns the number of queue items."""
        with self.lock:
            self.con.execute("BEGIN")
            try:
                for name in DERIVED:
                    self.con.execute(f"DELETE FROM {name} WHERE audit_id = ?", [audit.audit_id])
                    t = tables[name]
                    t = t.add_column(0, "audit_id", pa.array([audit.audit_id] * t.num_rows, pa.string()))
                    self.con.register("_incoming", t)
                    cols = ", ".join(f'"{c}"' for c in t.column_names)
                    self.con.execute(f"INSERT INTO {name} ({cols}) SELECT {cols} FROM _incoming")
                    self.con.unregister("_incoming")
                n_items = tables["items"].num_rows
                self.con.execute("INSERT OR REPLACE INTO audits VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                 [audit.audit_id, audit.run_id, audit.set_id, audit.created_at,
                                  json.dumps(audit.result), now(), audit.result["overall"]["n_pairs"], n_items])
                self._merge(audit.audit_id, events)
                self.con.execute("COMMIT")
            except BaseException:
                self.con.execute("ROLLBACK")
                raise
        return n_items

    def merge_events(self, audit_id: str, events: pa.Table) -> None:
        """Events already in the main database (from this or an earlier workspace) join this one as synced;
        ``current`` is recomputed from all events (the latest per pair, by time then sequence)."""
        with self.lock:
            self.con.execute("BEGIN")
            try:
                self._merge(audit_id, events)
                self.con.execute("COMMIT")
            except BaseException:
                self.con.execute("ROLLBACK")
                raise

    def _merge(self, audit_id: str, events: pa.Table) -> None:
        if events.num_rows:
            self.con.register("_events", events)
            cols = ", ".join(EVENT_SCHEMA.names)
            self.con.execute(f"INSERT OR IGNORE INTO events ({cols}, synced_at) SELECT {cols}, now() FROM _events")
            self.con.unregister("_events")
        self.con.execute("DELETE FROM current WHERE audit_id = ?", [audit_id])
        self.con.execute("""INSERT INTO current (audit_id, pair_id, verdict, label, note, annotator, given_at, event_id,
                                                 session)
                            SELECT audit_id, pair_id, verdict, label, note, annotator, given_at, event_id, session
                            FROM (SELECT *, row_number() OVER (PARTITION BY pair_id ORDER BY given_at DESC, seq DESC) AS k
                                  FROM events WHERE audit_id = ?) WHERE k = 1 AND verdict IS NOT NULL""", [audit_id])

    # -- verdicts --------------------------------------------------------------------------------
    def latest(self, audit_id: str, pair_id: str) -> dict[str, Any] | None:
        """The pair's latest verdict event (set or undo): its ``event_id`` is the pair's version."""
        return self.one("""SELECT event_id, pair_id, action, verdict, note, annotator, session, given_at FROM events
                           WHERE audit_id = ? AND pair_id = ? ORDER BY given_at DESC, seq DESC LIMIT 1""",
                        [audit_id, pair_id])

    def record(self, audit_id: str, pair_id: str, verdict: str, note: str | None, annotator: str, *,
               session: str | None = None, base: str | None = None) -> dict[str, Any]:
        """Give a pair a verdict (replacing any earlier one); committed before returning. ``base``: the
        pair's version (:meth:`latest` event id, '' for none) the verdict was made against; when another
        session has changed the pair since, :class:`Conflict` (nothing is written)."""
        if verdict not in VERDICTS:
            raise ValueError(f"unknown verdict {verdict!r}; use one of {list(VERDICTS)}")
        with self.lock:
            item = self.one("SELECT human_choice, ai_choice FROM items WHERE audit_id = ? AND pair_id = ?",
                            [audit_id, pair_id])
            if item is None:
                raise KeyError(f"pair {pair_id} is not in the review queue of audit {audit_id}")
            if base is not None:
                now_at = self.latest(audit_id, pair_id)
                if now_at and now_at["event_id"] != base and now_at["session"] != session:
                    raise Conflict(now_at)
            event = {"action": "set", "verdict": verdict, "label": label(verdict, item["human_choice"], item["ai_choice"]),
                     "note": (note or "").strip() or None, "annotator": annotator, "undoes": None,
                     "session": session, "base": base}
            return self._append(audit_id, pair_id, event)

    def undo(self, audit_id: str, annotator: str, *, session: str | None = None) -> dict[str, Any] | None:
        """Revert the annotator's (with ``session``: that browser session's) latest verdict not yet undone:
        the pair gets back the state that verdict replaced. Returns the undo event, or None when there is
        nothing to undo; :class:`Conflict` when another session has changed that pair since."""
        with self.lock:
            last = self.one("""SELECT e.event_id, e.pair_id, e.given_at, e.seq FROM events e WHERE e.audit_id = ?
                               AND e.action = 'set' AND e.annotator = ? AND (CAST(? AS VARCHAR) IS NULL OR e.session = ?)
                               AND NOT EXISTS (SELECT 1 FROM events u WHERE u.undoes = e.event_id)
                               ORDER BY e.given_at DESC, e.seq DESC LIMIT 1""", [audit_id, annotator, session, session])
            if last is None:
                return None
            now_at = self.latest(audit_id, last["pair_id"])
            if now_at and now_at["event_id"] != last["event_id"] and now_at["session"] != session:
                raise Conflict(now_at, undo=True)
            before = self.one("""SELECT verdict, label, note FROM events WHERE audit_id = ? AND pair_id = ?
                                 AND (given_at < ? OR (given_at = ? AND seq < ?)) ORDER BY given_at DESC, seq DESC LIMIT 1""",
                              [audit_id, last["pair_id"], last["given_at"], last["given_at"], last["seq"]]) or {}
            event = {"action": "undo", "verdict": before.get("verdict"), "label": before.get("label"),
                     "note": before.get("note"), "annotator": annotator, "undoes": last["event_id"],
                     "session": session, "base": last["event_id"]}
            return self._append(audit_id, last["pair_id"], event)

    def _append(self, audit_id: str, pair_id: str, event: dict[str, Any]) -> dict[str, Any]:
        event = {"event_id": uuid.uuid4().hex, "audit_id": audit_id, "pair_id": pair_id, "given_at": now(),
                 "session": None, "base": None, **event}
        self.con.execute("BEGIN")
        try:
            event["seq"] = self.con.execute("SELECT nextval('event_seq')").fetchone()[0]
            cols = [*EVENT_SCHEMA.names]
            self.con.execute(f"INSERT INTO events ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                             [event[c] for c in cols])
            if event["verdict"] is None:
                self.con.execute("DELETE FROM current WHERE audit_id = ? AND pair_id = ?", [audit_id, pair_id])
            else:
                self.con.execute("""INSERT OR REPLACE INTO current (audit_id, pair_id, verdict, label, note, annotator,
                                    given_at, event_id, session) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                                 [audit_id, pair_id, event["verdict"], event["label"], event["note"],
                                  event["annotator"], event["given_at"], event["event_id"], event["session"]])
            self.con.execute("COMMIT")
        except BaseException:
            self.con.execute("ROLLBACK")
            raise
        return event

    def pending(self, audit_id: str) -> pa.Table:
        """Events not yet copied into the main database, oldest first."""
        with self.lock:
            return self.con.sql(f"SELECT {', '.join(EVENT_SCHEMA.names)} FROM events WHERE audit_id = ? "
                                "AND synced_at IS NULL ORDER BY seq", params=[audit_id]).to_arrow_table().cast(EVENT_SCHEMA)

    def n_pending(self, audit_id: str) -> int:
        return self.one("SELECT count(*) AS n FROM events WHERE audit_id = ? AND synced_at IS NULL", [audit_id])["n"]

    def mark_synced(self, event_ids: list[str]) -> None:
        with self.lock:
            self.con.register("_ids", pa.table({"k": pa.array(event_ids, pa.string())}))
            try:
                self.con.execute("UPDATE events SET synced_at = ? WHERE event_id IN (SELECT k FROM _ids)", [now()])
            finally:
                self.con.unregister("_ids")

    # -- judge messages (copied on demand) and UI state ------------------------------------------
    def cached_messages(self, judgement_id: str) -> list[dict] | None:
        row = self.one("SELECT messages FROM messages WHERE id = ?", [judgement_id])
        return json.loads(row["messages"]) if row else None

    def cache_messages(self, judgement_id: str, messages: list[dict]) -> None:
        with self.lock:
            self.con.execute("INSERT OR REPLACE INTO messages VALUES (?, ?)", [judgement_id, json.dumps(messages)])

    def secret(self) -> bytes:
        """A random key kept in the workspace (CSRF tokens stay valid across restarts of the app)."""
        with self.lock:
            row = self.one("SELECT value FROM meta WHERE key = 'csrf_secret'")
            if row is None:
                row = {"value": secrets.token_hex(32)}
                self.con.execute("INSERT INTO meta VALUES ('csrf_secret', ?)", [row["value"]])
            return bytes.fromhex(row["value"])

    def remember(self, audit_id: str, key: str, value: str) -> None:
        with self.lock:
            self.con.execute("INSERT OR REPLACE INTO ui VALUES (?, ?, ?)", [audit_id, key, value])

    def recall(self, audit_id: str, key: str) -> str | None:
        row = self.one("SELECT value FROM ui WHERE audit_id = ? AND key = ?", [audit_id, key])
        return row["value"] if row else None
