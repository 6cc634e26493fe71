"""The store's run bookkeeping: every SQL statement about runs themselves lives here.

A run's row (what it is, what answers, its status and summary), its judges (who labels, with which
settings and weight), its input chunks' completion records (which let a restart skip finished work)
and the status query ``factory status`` prints. :class:`RunBook` is a base of
:class:`factory.store.Store`: call these as ``store.record_run(...)``, ``store.done_chunks(...)``.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

RUN_JUDGES_DDL = """CREATE TABLE IF NOT EXISTS run_judges (
    run_id VARCHAR, judge VARCHAR, model VARCHAR, sampling_hash VARCHAR, mode VARCHAR, weight DOUBLE,
    PRIMARY KEY (run_id, judge))"""


class RunBook:
    """Run bookkeeping SQL (mixed into Store: ``self.con``, ``self.one``, ``self.run_rows``)."""

    con: Any

    # -- the run's row ---------------------------------------------------------------------------
    def record_run(self, *, run_id: str, name: str, kind: str, path: str, config_hash: str, config: dict,
                   constitution: Any, model: str, engine_json: str, lineage: dict) -> None:
        c = constitution
        self.con.execute(
            """INSERT OR IGNORE INTO runs (run_id, name, kind, pipeline_path, config_hash, config_json, constitution_name,
               constitution_version, constitution_hash, model, engine_json, started_at, status)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'running')""",
            [run_id, name, kind, path, config_hash, json.dumps(config), c.name, c.version, c.hash, model, engine_json,
             datetime.now(timezone.utc)])
        self.con.execute("UPDATE runs SET status = 'running', error = NULL, lineage_json = ? WHERE run_id = ?",
                         [json.dumps(lineage, default=str), run_id])

    def finish_run(self, run_id: str, status: str, error: str | None, summary: dict) -> None:
        self.con.execute("UPDATE runs SET status = ?, error = ?, finished_at = ?, summary_json = ? WHERE run_id = ?",
                         [status, error, datetime.now(timezone.utc), json.dumps(summary, default=str), run_id])

    def run_status(self, run_id: str) -> tuple[str | None, str | None]:
        """(status, config_hash) of a recorded run, (None, None) if unknown."""
        row = self.one("SELECT status, config_hash FROM runs WHERE run_id = ?", [run_id])
        return (row[0], row[1]) if row else (None, None)

    def run_row(self, run_id: str) -> dict | None:
        """A recorded run's row as a dict (None if unknown)."""
        cur = self.con.execute("SELECT * FROM runs WHERE run_id = ?", [run_id])
        row = cur.fetchone()
        return dict(zip([d[0] for d in cur.description], row)) if row else None

    def run_ids(self, kind: str | None = None) -> list[str]:
        """Recorded runs (of one kind), oldest first."""
        return [r for (r,) in self.con.execute(
            "SELECT run_id FROM runs" + (" WHERE kind = ?" if kind else "") + " ORDER BY started_at",
            [kind] if kind else []).fetchall()]

    def failure_counts(self, run_id: str, tables: tuple[str, ...]) -> list[tuple[str, str, str, int]]:
        """(table, reason, status, rows) of the run's rows that are not ok."""
        out = []
        for table in tables:
            out += [(table, r, s, n) for r, s, n in self.con.execute(
                f"""SELECT coalesce(t.error, ''), t.status, count(*) FROM {self.run_rows(table, '$run')} t
                    WHERE t.status <> 'ok' GROUP BY 1, 2""", {"run": run_id}).fetchall()]
        return out

    def input_skip_counts(self, run_id: str) -> list[tuple[str, int]]:
        return self.con.execute("SELECT reason, count(*) FROM skips WHERE run_id = ? GROUP BY 1", [run_id]).fetchall()

    # -- judges ------------------------------------------------------------------------------------
    def record_judges(self, run_id: str, judges: list[dict]) -> None:
        """Who judges this run: name, model, judge settings hash, mode, weight (labels join on these)."""
        self.con.execute("DELETE FROM run_judges WHERE run_id = ?", [run_id])
        for j in judges:
            self.con.execute("INSERT INTO run_judges VALUES (?, ?, ?, ?, ?, ?)",
                             [run_id, j["judge"], j["model"], j["sampling_hash"], j["mode"], float(j["weight"])])

    def run_judges(self, run_id: str) -> list[dict]:
        rows = self.con.execute("SELECT judge, model, sampling_hash, mode, weight FROM run_judges WHERE run_id = ? "
                                "ORDER BY judge", [run_id]).fetchall()
        return [dict(zip(("judge", "model", "sampling_hash", "mode", "weight"), r)) for r in rows]

    # -- input chunks ------------------------------------------------------------------------------
    def chunk_records(self, run_id: str, stage: str) -> dict[int, tuple[dict, int]]:
        """Finished input chunks of a run's stage: index -> (meta recorded with it, jobs)."""
        rows = self.con.execute("SELECT chunk, meta_json, n_jobs FROM chunks WHERE run_id = ? AND stage = ?",
                                [run_id, stage]).fetchall()
        return {i: (json.loads(m), n) for i, m, n in rows}

    def drop_chunk_records(self, run_id: str, stage: str) -> None:
        self.con.execute("DELETE FROM chunks WHERE run_id = ? AND stage = ?", [run_id, stage])

    def failed_chunks(self, run_id: str, own_ids: list[str], tables: tuple[str, ...]) -> tuple[set[int], bool]:
        """The input chunks with failed rows the run (and ``own_ids``) made, and whether it uses failed
        rows it did not make."""
        failed: set[int] = set()
        linked = False
        for table in tables:
            failed |= {c for (c,) in self.con.execute(
                f"SELECT DISTINCT chunk FROM {table} WHERE status = 'failed' AND run_id IN ({', '.join('?' * len(own_ids))})",
                own_ids).fetchall()}
            linked = linked or bool(self.one(
                f"""SELECT 1 FROM {table} t SEMI JOIN run_items i ON i.id = t.id AND i."table" = '{table}'
                    AND i.run_id = ? WHERE t.status = 'failed' LIMIT 1""", [run_id]))
        return failed, linked

    # -- what `factory status` prints --------------------------------------------------------------
    def status_report(self, run_id: str | None = None) -> list[dict]:
        """Per run: its row, rows per table and status, finished chunks, labels, input skips."""
        out = []
        runs = self.con.execute(
            "SELECT run_id, kind, status, model, constitution_name, constitution_version, started_at, error FROM runs "
            + ("WHERE run_id = ? " if run_id else "") + "ORDER BY started_at", [run_id] if run_id else []).fetchall()
        if run_id and not runs:  # an unknown run is an error, not an empty answer
            from .store import StoreError

            known = [r[0] for r in self.con.execute("SELECT run_id FROM runs ORDER BY started_at DESC LIMIT 5").fetchall()]
            raise StoreError(f"{getattr(self, 'path', 'the database')}: no run {run_id!r}; "
                             + (f"recent runs: {', '.join(known)}" if known else "the database holds no runs yet"))
        for rid, kind, st, model, cname, cver, started, error in runs:
            r = {"run_id": rid, "kind": kind, "status": st, "model": model, "constitution": f"{cname} v{cver}",
                 "error": error, "tables": {}}
            for table in self.run_tables(rid):
                r["tables"][table] = dict(self.con.execute(
                    f"SELECT t.status, count(*) FROM {self.run_rows(table, '$run')} t GROUP BY 1",
                    {"run": rid}).fetchall()) if table != "prompts" else \
                    {"ok": self.one("SELECT count(*) FROM run_prompts WHERE run_id = ?", [rid])[0]}
            r["chunks"] = self.one("SELECT count(*), sum(n_jobs), sum(n_new) FROM chunks WHERE run_id = ?", [rid])
            r["preferences"] = self.one(
                """SELECT count(*), count(*) FILTER (WHERE is_tie), avg(margin), avg(orders_agree),
                   count(*) FILTER (WHERE chosen = 'a'), avg(judges_agree), max(n_judges)
                   FROM preferences WHERE run_id = ?""", [rid])
            r["judges"] = self.run_judges(rid)
            from .coverage import coverage, describe

            r["coverage"] = describe(coverage(self, rid)) if r["preferences"] and r["preferences"][0] else None
            r["skips"] = self.con.execute("SELECT stage, reason, count(*) FROM skips WHERE run_id = ? GROUP BY 1, 2 "
                                          "ORDER BY 3 DESC", [rid]).fetchall()
            out.append(r)
        return out
