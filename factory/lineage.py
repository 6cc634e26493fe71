"""Exact lineage of any stored row: what the model received, re-rendered and checked.

Generated-text rows of SL runs and samples store their messages; judgements and rationales store
only ``messages_hash`` (compact storage) and are re-rendered from what their key names: the pair,
the principle (from the stored constitution), the template source and the judge settings (both
stored by hash in ``configs``). Either way the result is checked: the messages' hash against the
row's ``messages_hash`` and the content key recomputed from the inputs against the row's id.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .store import Store, StoreError, content_key

TABLES = ("judgements", "rationales", "responses", "critiques", "revisions", "samples")


@dataclass
class RowLineage:
    table: str
    row: dict[str, Any]
    messages: list[dict]
    checks: dict[str, bool | None] = field(default_factory=dict)  # name -> passed (None: cannot be checked)

    @property
    def ok(self) -> bool:
        return all(v is not False for v in self.checks.values())


def find_row(store: Store, row_id: str) -> tuple[str, dict]:
    for table in TABLES:
        got = store.con.execute(f"SELECT * FROM {table} WHERE id = ?", [row_id])
        names, rows = [d[0] for d in got.description], got.fetchall()  # whole: DuckDB keeps an open result busy
        if rows:
            return table, dict(zip(names, rows[0]))
    raise StoreError(f"{store.path}: no stored row with id '{row_id}' (looked in {', '.join(TABLES)})")


def _config(store: Store, key: str | None) -> dict | None:
    row = store.one("SELECT body FROM configs WHERE config_hash = ?", [key]) if key else None
    return json.loads(row[0]) if row else None


def show_row(store: Store, row_id: str) -> RowLineage:
    table, row = find_row(store, row_id)
    if table in ("judgements", "rationales") and row.get("messages_hash"):
        return _judge_lineage(store, table, row)
    return _stored_lineage(store, table, row)


def row_messages(store: Store, row_id: str) -> list[dict]:
    """The exact messages the model received for stored row ``row_id``."""
    return show_row(store, row_id).messages


def _stored_lineage(store: Store, table: str, row: dict) -> RowLineage:
    if not row.get("messages"):
        raise StoreError(f"row {row['id']} of {table} stores no messages and no messages hash to re-render from")
    messages = json.loads(row["messages"])
    sampling = _config(store, row.get("sampling_hash")) or {}
    seed = sampling.get("engine_seed")
    checks: dict[str, bool | None] = {}
    parents = json.loads(row["parent_ids"]) if row.get("parent_ids") else None
    if table == "samples":
        req = content_key("responses", row["model"], seed, row["sampling_hash"], messages, parents or [])
        checks["key"] = content_key(req, row["sample_index"]) == row["id"]
    elif table in ("responses", "critiques", "revisions"):
        if parents is None and table != "revisions":
            parents = [row["parent_id"]] if row.get("parent_id") else []
        checks["key"] = None if parents is None else (
            content_key(table, row["model"], seed, row["sampling_hash"], messages, parents) == row["id"])
    else:  # a rationale/judgement stored before compact storage (v3)
        checks["key"] = None
    return RowLineage(table, row, messages, checks)


def _judge_lineage(store: Store, table: str, row: dict) -> RowLineage:
    from .constitution import Constitution
    from .stages import judge as J
    from .templates import template_from_source

    settings = _config(store, row["sampling_hash"])
    tmpl = _config(store, row["template_hash"])
    const = _config(store, row["constitution_hash"])
    pair = store.one("SELECT conversation, response_a, response_b FROM pairs WHERE pair_id = ?", [row["pair_id"]])
    missing = [n for n, v in (("judge settings", settings), ("template", tmpl), ("constitution", const),
                              ("pair", pair)) if v is None]
    if missing:
        raise StoreError(f"row {row['id']}: cannot re-render, the database lacks its {', '.join(missing)}")
    c = Constitution.model_validate(const)
    p = c.principle(row["principle_id"])
    template = template_from_source(tmpl["path"], tmpl["source"])
    ctx = J.JudgeCtx(run_id=row["run_id"], model=row["model"], seed=settings.get("engine_seed"), constitution=c,
                     template=template, options=settings["options"], option_ids=None,
                     sampling_hash=row["sampling_hash"], max_chars=settings["max_conversation_chars"],
                     prefill=settings.get("prefill", True))
    if settings.get("few_shot"):  # issue 21: the demonstrations the run showed
        from .fewshot import JudgeShots

        ctx.shots = JudgeShots(c, settings["few_shot"], settings["few_shot_seed"])
    pr = J.Pair(row["pair_id"], json.loads(pair[0]), pair[1], pair[2])
    rationale, rationale_id = None, None
    cot = table == "rationales" or settings.get("mode") == "cot"
    if table == "judgements" and cot:
        rationale = row.get("rationale")
        got = store.one("""SELECT id FROM rationales WHERE pair_id = ? AND principle_id = ? AND "order" = ? AND model = ?
                           AND sampling_hash = ? AND trim(text) = ?""",
                        [row["pair_id"], row["principle_id"], row["order"], row["model"], row["sampling_hash"], rationale])
        rationale_id = got[0] if got else None
    messages = ctx.render(pr, p, row["order"], cot=cot, rationale=rationale)  # in full, never from skeletons
    # rationale rows carry no principle_hash column: their principle is checked through the key
    checks = {"principle": p.hash == row["principle_hash"] if row.get("principle_hash") else None, "template": template.hash == row["template_hash"],
              "messages_hash": J.messages_hash(messages) == row["messages_hash"],
              "key": ctx.key(table, pr, p, row["order"], rationale_id) == row["id"]}
    return RowLineage(table, row, messages, checks)
