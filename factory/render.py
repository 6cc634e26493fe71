"""``factory render``: the exact chat messages one example sends to the model, without an engine."""

from __future__ import annotations

import json
from pathlib import Path

from .sources import read_prompts
from .stages import sl
from .store import Store, StoreError

PLACEHOLDER = "<the {what} generated for this prompt will appear here; run the pipeline to see a real one>"


def _stored_text(db: str, table: str, prompt_id: str) -> str | None:
    """The latest stored ok text for a prompt, if the database exists and is not being written."""
    if not Path(db).exists():
        return None
    try:
        with Store(db, read_only=True) as store:
            row = store.one(
                f"SELECT text FROM {table} WHERE prompt_id = ? AND status = 'ok' ORDER BY round DESC, created_at DESC LIMIT 1",
                [prompt_id])
    except StoreError:
        return None
    return row[0] if row else None


def render_example(path: str | Path, stage: str, example: int) -> list[dict]:
    from .pipeline import load

    lp = load(path)
    src = lp.cfg.prompts
    table, _ = read_prompts(src.path, field=src.field, split=src.split, data_dir=src.data_dir, limit=src.limit)
    if not 0 <= example < table.num_rows:
        raise StoreError(f"--example {example} is out of range: the prompts have {table.num_rows} valid rows")
    pid = table.column("prompt_id")[example].as_py()
    conv = json.loads(table.column("messages")[example].as_py())
    if stage == "answer":
        return lp.templates["answer"].render(conversation=conv)
    pc = lp.cfg.principles
    order = table.column("prompt_id").to_pylist()
    principles = sl.choose_principles(lp.constitution, pc.strategy, pc.per_round, pc.seed, order, 1, pc.only)[pid]
    response = _stored_text(lp.cfg.db, "responses", pid) or PLACEHOLDER.format(what="initial answer")
    if stage == "critique":
        return lp.templates["critique"].render(conversation=conv, response=response, principle=principles[0], round=1)
    if stage == "revise":
        critique = _stored_text(lp.cfg.db, "critiques", pid) or PLACEHOLDER.format(what="critique")
        crits = [{"principle": p, "text": critique} for p in principles]
        return lp.templates["revise"].render(conversation=conv, response=response, critiques=crits, round=1)
    raise StoreError(f"unknown --stage '{stage}'; use answer, critique or revise")
