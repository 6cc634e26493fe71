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
from .sources import PROMPT_SCHEMA, InputChunk as RawChunk, Reader, Skip, parse_chunk, row_chars, row_problem
from .store import PAIR_SCHEMA, Store, StoreError

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
    try:
        with store.transaction():
            _write(store, run_id, entity, rows)
            store.record_skips(run_id, stage, skips)
        return rows
    except StoreError:  # the database itself (space, permission, memory): not one row's fault
        raise
    except Exception:  # noqa: BLE001 - some row the store refused: find it, one row per transaction
        kept = []
        for r in rows:
            try:
                with store.transaction():
                    _write(store, run_id, entity, [r])
                kept.append(r)
            except StoreError:
                raise
            except Exception as e:  # noqa: BLE001
                skips.append(Skip(r["source_row"], f"row {r['source_row']}: could not be stored ({row_problem(e)})",
                                  source))
        with store.transaction():
            store.record_skips(run_id, stage, skips)
        return kept


def _write(store: Store, run_id: str, entity: str, rows: list[dict]) -> None:
    member, key, cols = ENTITIES[entity]
    if not rows:
        return
    if entity == "prompts":
        t = pa.Table.from_pylist(rows, schema=PROMPT_SCHEMA)
        store.insert("prompts", t.select(cols).append_column("first_run_id", pa.array([run_id] * t.num_rows)))
    else:
        store.insert("pairs", [{**r, "run_id": r.get("run_id") or run_id} for r in rows], PAIR_SCHEMA)
    store.insert(member, pa.table({"run_id": [run_id] * len(rows), key: [r[key] for r in rows],
                                   "source_row": [r["source_row"] for r in rows]}))


def chunked(store: Store, run_id: str, stage: str, reader: Reader, parse: Callable[[int, Any], dict], *,
            entity: str, expand: Callable[[list[dict], int], list[Job]], done: dict[int, dict],
            chunk_size: int, limit: int | None = None, to_entity: Callable[[dict], dict] | None = None,
            max_chars: int | None = None) -> Iterator[InputChunk]:
    """The run's input chunks: parse, admit (``to_entity`` maps a parsed row to its entity row), then
    ``expand(rows, index_of_first)`` into root jobs. ``index_of_first`` counts the rows admitted before
    (finished chunks contribute the count recorded with them), so order-based choices (round-robin
    principles) and ``limit`` stay the same across restarts. A row whose texts pass ``max_chars``
    (:func:`factory.sources.text_limit` of the engine's context) is a skip before it is stored."""
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
        chunk = _plan_chunk(store, run_id, stage, reader, raw, parse, entity, expand, accepted, limit, to_entity,
                            max_chars, screen)
        yield chunk  # the runner plans it before asking for the next one
        accepted += chunk.meta.get("n_valid", 0)


def _fits(rows: list[dict], skips: list[Skip], max_chars: int | None, source: str) -> list[dict]:
    if max_chars is None:
        return rows
    kept = []
    for r in rows:
        if (n := row_chars(r)) > max_chars:
            skips.append(Skip(r["source_row"], f"row {r['source_row']}: {n} characters could never fit the engine's "
                              f"context (at most {max_chars}); shorten it or raise engine.max_model_len", source))
        else:
            kept.append(r)
    return kept


def _entities(rows: list[dict], to_entity, skips: list[Skip], source: str) -> list[dict]:
    if not to_entity:
        return rows
    out = []
    for r in rows:
        try:
            out.append(to_entity(r))
        except Exception as e:  # noqa: BLE001 - one row's problem is that row's skip
            skips.append(Skip(r["source_row"], f"row {r['source_row']}: {row_problem(e)}", source))
    return out


def _expand_each(store, run_id, stage, rows, expand, before, source) -> list[Job]:
    jobs, skips, errors = [], [], []
    for i, r in enumerate(rows):
        try:
            jobs += expand([r], before + i)
        except StoreError:
            raise
        except Exception as e:  # noqa: BLE001
            errors.append(e)
            skips.append(Skip(r["source_row"], f"row {r['source_row']}: no request could be made from it "
                              f"({row_problem(e)})", source))
    if len(errors) > 1 and len(errors) == len(rows) and len({str(e) for e in errors}) == 1:
        raise errors[0]  # the same failure on every row is the configuration's (a template), not the rows'
    with store.transaction():
        store.record_skips(run_id, stage, skips)
    return jobs


def _plan_chunk(store, run_id, stage, reader, raw: RawChunk, parse, entity, expand, before, limit, to_entity,
                max_chars=None, screen=None):
    meta = {**raw.meta, "fingerprint": reader.fingerprint}

    def plan() -> list[Job]:
        rows, skips = parse_chunk(raw, parse, reader.source, ENTITIES[entity][1])
        rows = _fits(rows, skips, max_chars, reader.source)
        if limit is not None and before + len(rows) > limit:
            rows = rows[:limit - before]
            last = rows[-1]["source_row"] if rows else -1
            skips = [s for s in skips if (s.row or 0) < last]
        ents = _entities(rows, to_entity, skips, reader.source)
        if screen is not None:
            ents = screen(store, entity, ents, skips, reader.source)
        kept = admit(store, run_id, entity, stage, ents, skips, reader.source)
        meta["n_valid"] = len(kept)
        try:
            return expand(kept, before)
        except StoreError:
            raise
        except Exception:  # noqa: BLE001 - a row whose jobs cannot be built (e.g. a render past its cap) is a skip
            return _expand_each(store, run_id, stage, kept, expand, before, reader.source)

    return InputChunk(raw.index, meta, plan)

