"""A run's input, chunk by chunk: read lazily, validated, admitted into the store, expanded into jobs.

Prompts and pairs follow one pattern: an entity table keyed by content (``prompts``/``pairs``) and
a membership table ``run_prompts``/``run_pairs`` (run id, key, source row). Admitting a chunk
writes its entities and memberships (idempotent) and its unusable rows into ``skips``; a row whose
content an earlier row of the same run already holds is a skip "duplicate of row N", found through
the membership table, so no set of every key seen has to stay in memory.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import pyarrow as pa

from .runner import InputChunk, Job
from .sources import PROMPT_SCHEMA, InputChunk as RawChunk, Reader, Skip, parse_chunk
from .store import PAIR_SCHEMA, Store

ENTITIES = {
    "prompts": ("run_prompts", "prompt_id", ["prompt_id", "messages", "n_chars"]),
    "pairs": ("run_pairs", "pair_id", None),
}


def admit(store: Store, run_id: str, entity: str, stage: str, rows: list[dict], skips: list[Skip],
          source: str) -> list[dict]:
    """Store a chunk's entities, memberships and skips; return its rows minus cross-chunk duplicates."""
    member, key, cols = ENTITIES[entity]
    if rows:
        probe = pa.table({"k": [r[key] for r in rows]})
        store.con.register("_admit", probe)
        try:
            first = dict(store.con.execute(
                f"SELECT m.{key}, m.source_row FROM {member} m JOIN _admit a ON a.k = m.{key} WHERE m.run_id = ?",
                [run_id]).fetchall())
        finally:
            store.con.unregister("_admit")
        kept = []
        for r in rows:
            seen = first.get(r[key])
            if seen is not None and seen != r["source_row"]:
                skips.append(Skip(r["source_row"], f"row {r['source_row']}: duplicate of row {seen}", source))
            else:
                kept.append(r)
        rows = kept
    with store.transaction():
        if rows:
            if entity == "prompts":
                t = pa.Table.from_pylist(rows, schema=PROMPT_SCHEMA)
                store.insert("prompts", t.select(cols).append_column("first_run_id", pa.array([run_id] * t.num_rows)))
            else:
                store.insert("pairs", [{**r, "run_id": r.get("run_id") or run_id} for r in rows], PAIR_SCHEMA)
            store.insert(member, pa.table({"run_id": [run_id] * len(rows), key: [r[key] for r in rows],
                                           "source_row": [r["source_row"] for r in rows]}))
        store.record_skips(run_id, stage, skips)
    return rows


def chunked(store: Store, run_id: str, stage: str, reader: Reader, parse: Callable[[int, Any], dict], *,
            entity: str, expand: Callable[[list[dict], int], list[Job]], done: dict[int, dict],
            chunk_size: int, limit: int | None = None, to_entity: Callable[[dict], dict] | None = None
            ) -> Iterator[InputChunk]:
    """The run's input chunks: parse, admit (``to_entity`` maps a parsed row to its entity row), then
    ``expand(rows, index_of_first)`` into root jobs. ``index_of_first`` counts the rows admitted before
    (finished chunks contribute the count recorded with them), so order-based choices (round-robin
    principles) and ``limit`` stay the same across restarts."""
    from .dedup import screen_for

    screen = screen_for(store, run_id)  # dedup/decontamination (issue 25): None unless the pipeline asks
    accepted = 0
    counted = -1  # finished chunks below this index are already in `accepted`
    for raw in reader.chunks(chunk_size, done):
        for i in range(counted + 1, raw.index):
            accepted += done.get(i, {}).get("n_valid", 0)
        counted = raw.index
        if limit is not None and accepted >= limit:
            return
        chunk = _plan_chunk(store, run_id, stage, reader, raw, parse, entity, expand, accepted, limit, to_entity, screen)
        yield chunk  # the runner plans it before asking for the next one
        accepted += chunk.meta.get("n_valid", 0)


def _plan_chunk(store, run_id, stage, reader, raw: RawChunk, parse, entity, expand, before, limit, to_entity,
                screen=None):
    meta = {**raw.meta, "fingerprint": reader.fingerprint}

    def plan() -> list[Job]:
        rows, skips = parse_chunk(raw, parse, reader.source, ENTITIES[entity][1])
        if limit is not None and before + len(rows) > limit:
            rows = rows[:limit - before]
            last = rows[-1]["source_row"] if rows else -1
            skips = [s for s in skips if (s.row or 0) < last]
        ents = [to_entity(r) for r in rows] if to_entity else rows
        if screen is not None:
            ents = screen(store, entity, ents, skips, reader.source)
        kept = admit(store, run_id, entity, stage, ents, skips, reader.source)
        meta["n_valid"] = len(kept)
        return expand(kept, before)

    return InputChunk(raw.index, meta, plan)

