"""Step states of recipes in the store (table ``recipe_steps``): one row per (recipe, step, round, identity).

The executor holds the database only for these short writes: a step's own run takes the writer
lock itself while it runs.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..store import Store, now


def _store(db: str | Path, recipe: str) -> Store:
    return Store(db, writer_run=f"recipe-{recipe}")


def finished(db: str | Path, recipe: str, step: str, round: int, identity: str) -> dict | None:
    """The output of a finished step of this identity, or None (also when the database is new)."""
    if not Path(db).exists():
        return None
    with _store(db, recipe) as store:
        row = store.one("""SELECT output_json FROM recipe_steps WHERE recipe = ? AND step = ? AND round = ?
                           AND identity = ? AND status = 'done'""", [recipe, step, round, identity])
    return json.loads(row[0]) if row else None


def start(db: str | Path, recipe: str, step: str, round: int, identity: str, kind: str, inputs: dict) -> None:
    with _store(db, recipe) as store:
        store.con.execute("DELETE FROM recipe_steps WHERE recipe = ? AND step = ? AND round = ? AND identity = ?",
                          [recipe, step, round, identity])
        store.con.execute("""INSERT INTO recipe_steps (recipe, step, round, identity, kind, status, inputs_json, started_at)
                             VALUES (?, ?, ?, ?, ?, 'running', ?, ?)""",
                          [recipe, step, round, identity, kind, json.dumps(inputs, default=str), now()])


def finish(db: str | Path, recipe: str, step: str, round: int, identity: str, status: str, *,
           output: dict | None = None, error: str | None = None, seconds: float = 0.0) -> None:
    with _store(db, recipe) as store:
        store.con.execute("""UPDATE recipe_steps SET status = ?, output_json = ?, error = ?, finished_at = ?, seconds = ?
                             WHERE recipe = ? AND step = ? AND round = ? AND identity = ?""",
                          [status, json.dumps(output, default=str) if output is not None else None, error, now(),
                           seconds, recipe, step, round, identity])


def history(db: str | Path, recipe: str) -> list[dict]:
    """Every recorded step of ``recipe``, newest first."""
    if not Path(db).exists():
        return []
    with Store(db, read_only=True) as store:
        cur = store.con.execute("""SELECT step, round, identity, kind, status, error, seconds, started_at, output_json
                                   FROM recipe_steps WHERE recipe = ? ORDER BY started_at DESC""", [recipe])
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r)) for r in cur.fetchall()]
