"""Held-out human preference labels: import a set into the store, list the sets.

``import_human`` reads pairs with :func:`factory.sources.read_pairs` (hh-rlhf chosen/rejected
transcripts or generic JSONL), and writes three things in one transaction:

- ``pairs``: one row per usable pair, built with the judge's own :func:`factory.stages.judge.pair_row`
  so the ``pair_id`` is exactly the content key the judge uses (a prefs run over the same pairs
  and an audit of this set meet on ``pair_id``); ``source = "human:<set_id>"``;
- ``human_labels``: the human choice ('a'/'b'), annotator, confidence and the hh-rlhf ``swapped``
  bit per (set, pair);
- ``human_sets``: the set itself, with the skipped rows grouped by reason in ``skips_json``
  (every skipped row is also in the ``skips`` table under run id ``human:<set_id>``).

Choices:
- The set id is ``name`` when given, else ``<file stem>-<8 hex>`` where the hex is a content hash
  of the imported (pair_id, choice) list: re-importing the same data gives the same set (the
  import is idempotent), a different limit or edited file gives a new one. Re-using a ``name`` for
  different content is an error rather than a silent overwrite.
- A pair without a human choice, or one the judge would not judge (responses equal after
  stripping whitespace), is skipped with its reason: an audit set needs both.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa

from .sources import Skip, SourceError, read_pairs, row_chars
from .stages.judge import pair_row
from .store import PAIR_SCHEMA, Store, StoreError, content_key, now

IMPORT_STAGE = "human-import"
LABEL_SCHEMA = pa.schema([("set_id", pa.string()), ("pair_id", pa.string()), ("source_row", pa.int64()),
                          ("human_choice", pa.string()), ("annotator", pa.string()), ("confidence", pa.float64()),
                          ("swapped", pa.bool_())])
_SET_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_ROW_PREFIX = re.compile(r"^(?:row|line) \d+: ")
_NUMBERED = re.compile(r"\b(row|line|turn|offset) \d+")


def import_human(db: str | Path, spec: str | Path, *, format: str = "auto", name: str | None = None,
                 limit: int | None = None, split: str = "test", data_dir: str | None = None, offset: int = 0
                 ) -> tuple[str, int, list[Skip]]:
    """Import a human-labelled pair set into ``db``; returns (set_id, pairs imported, skips)."""
    with Store(db, writer_run=IMPORT_STAGE) as store:
        return import_into(store, spec, format=format, name=name, limit=limit, split=split, data_dir=data_dir,
                           offset=offset)


def import_into(store: Store, spec: str | Path, *, format: str = "auto", name: str | None = None,
                limit: int | None = None, split: str = "test", data_dir: str | None = None, offset: int = 0,
                max_chars: int | None = None) -> tuple[str, int, list[Skip]]:
    """:func:`import_human` on an open (locked) store, for callers that already hold the lock. ``offset``
    skips the source's first pairs and ``limit`` takes that many after them, counted as ``export human
    --offset/--limit`` count them (pairs as read, one without a human choice included): a set for audits
    can be kept apart from one for training. Rows skipped before the slice are not the set's. A pair whose
    texts pass ``max_chars`` (an audit's :func:`factory.sources.text_limit`) is skipped before it is stored."""
    if name is not None and not _SET_ID.match(name):
        raise StoreError(f"human set name {name!r}: use letters, digits, '_', '-' or '.' "
                         "(starting with a letter or digit)")
    if offset < 0 or (limit is not None and limit < 1):
        raise StoreError(f"offset must be >= 0 and limit >= 1; got offset={offset}, limit={limit}")
    table, skips = read_pairs(spec, format=format, split=split, data_dir=data_dir,
                              limit=None if limit is None else offset + limit)
    if offset:
        if offset >= table.num_rows:
            raise SourceError(f"{spec}: --offset {offset} is past its {table.num_rows} pairs; use a smaller offset")
        before = table["source_row"][offset - 1].as_py()
        table, skips = table.slice(offset), [s for s in skips if (s.row or 0) > before]
    pairs, labels, skips = _rows(table, skips, str(spec), max_chars)
    if not labels:
        why = "; ".join(f"{g['count']}× {g['reason']}" for g in skip_counts(skips)[:3]) or "the source is empty"
        raise SourceError(f"{spec}: no usable human-labelled pairs ({len(skips)} rows skipped: {why})")
    fingerprint = content_key("human-set", [(r["pair_id"], r["human_choice"]) for r in labels])
    set_id = name or f"{_stem(spec)}-{fingerprint[:8]}"
    prior = store.one("SELECT source, skips_json FROM human_sets WHERE set_id = ?", [set_id])
    if prior is not None and json.loads(prior[1] or "{}").get("fingerprint") != fingerprint:
        raise StoreError(f"{store.path}: human set '{set_id}' already holds different pairs (imported from "
                         f"{prior[0]}); choose another --name")
    for r in pairs:
        r.update(source=f"human:{set_id}", run_id=f"human:{set_id}")
    for r in labels:
        r["set_id"] = set_id
    store.con.execute("BEGIN")
    try:
        store.insert("pairs", pairs, PAIR_SCHEMA)
        store.insert("human_labels", labels, LABEL_SCHEMA)
        store.record_skips(f"human:{set_id}", IMPORT_STAGE, skips)
        store.con.execute(
            "INSERT OR IGNORE INTO human_sets VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [set_id, name or _stem(spec), str(spec), format, len(labels), len(skips),
             json.dumps({"fingerprint": fingerprint, "limit": limit, "offset": offset, "split": split, "data_dir": data_dir,
                         "by_reason": skip_counts(skips)}), now()])
        store.con.execute("COMMIT")
    except BaseException:
        store.con.execute("ROLLBACK")
        raise
    return set_id, len(labels), skips


def _rows(table: pa.Table, skips: list[Skip], source: str, max_chars: int | None = None
          ) -> tuple[list[dict], list[dict], list[Skip]]:
    """pairs rows and human_labels rows of the usable pairs; the rest become skips."""
    pairs, labels, skips = [], [], list(skips)
    for r in table.to_pylist():
        row = r["source_row"]
        if max_chars is not None and (n := row_chars(r)) > max_chars:
            skips.append(Skip(row, f"row {row}: {n} characters could never fit the engine's context (at most "
                                   f"{max_chars}); shorten it or raise engine.max_model_len", source))
            continue
        if r["human_choice"] not in ("a", "b"):
            skips.append(Skip(row, f"row {row}: no human choice (`human_choice` or `choice`: a or b); "
                                   "an audit set needs one", source))
            continue
        p = pair_row(json.loads(r["conversation"]), r["response_a"], r["response_b"], source="human")
        if p["status"] != "ok":
            skips.append(Skip(row, f"row {row}: {p['error']}", source))
            continue
        pairs.append(p)  # pair_id recomputed by the judge's own rule, so labels and judgements always join
        labels.append({"pair_id": p["pair_id"], **{k: r[k] for k in ("source_row", "human_choice", "annotator",
                                                                     "confidence", "swapped")}})
    return pairs, labels, skips


def skip_reason(reason: str) -> str:
    """A skip reason without its row number (``row 12: duplicate of row 3`` → ``duplicate of row N``)."""
    return _NUMBERED.sub(lambda m: f"{m.group(1)} N", _ROW_PREFIX.sub("", reason))


def skip_counts(skips: list[Skip], max_rows: int = 20) -> list[dict[str, Any]]:
    """Skips grouped by reason: [{reason, count, rows (the first ``max_rows``)}], most frequent first."""
    groups: dict[str, list] = {}
    for s in skips:
        groups.setdefault(skip_reason(s.reason), []).append(s.row)
    counts = Counter({k: len(v) for k, v in groups.items()})
    return [{"reason": k, "count": n, "rows": groups[k][:max_rows]} for k, n in counts.most_common()]


def list_sets(db: str | Path) -> pa.Table:
    """The human sets in ``db`` (set_id, name, source, format, n_pairs, n_skipped, created_at)."""
    with Store(db, read_only=True) as store:
        return store.arrow("SELECT set_id, name, source, format, n_pairs, n_skipped, created_at FROM human_sets "
                           "ORDER BY created_at")


def set_info(store: Store, set_id: str) -> dict[str, Any]:
    """One set's row (skips_json parsed), or a StoreError listing the sets that exist."""
    row = store.one("SELECT set_id, name, source, format, n_pairs, n_skipped, skips_json FROM human_sets "
                    "WHERE set_id = ?", [set_id])
    if row is None:
        known = [r[0] for r in store.con.execute("SELECT set_id FROM human_sets ORDER BY 1").fetchall()]
        raise StoreError(f"{store.path}: no human set '{set_id}'; known sets: {known or 'none'} "
                         "(import one with `factory human import`)")
    keys = ("set_id", "name", "source", "format", "n_pairs", "n_skipped", "skips")
    info = dict(zip(keys, row))
    info["skips"] = json.loads(info["skips"] or "{}")
    return info


def human_table(store: Store, set_id: str) -> pa.Table:
    """The audit's human table: pair_id, human_choice, len_a, len_b (characters) and the texts."""
    return store.con.sql(
        """SELECT h.pair_id, h.human_choice, length(p.response_a) AS len_a, length(p.response_b) AS len_b,
                  p.conversation, p.response_a, p.response_b
           FROM human_labels h JOIN pairs p USING (pair_id) WHERE h.set_id = ? ORDER BY h.source_row""",
        params=[set_id]).to_arrow_table()


def _stem(spec: str | Path) -> str:
    base = Path(str(spec)).name.split(".")[0] or "human"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", base).strip("-.") or "human"


__all__ = ["import_human", "import_into", "list_sets", "set_info", "human_table", "skip_counts", "skip_reason"]
