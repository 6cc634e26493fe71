"""Copy what an audit's review queue needs from the factory database into the review workspace.

The queue is derived from the audited run's labels as the audit derives them: the one label rule
(:mod:`factory.labels`, the run's own weights, tie band, clamp and calibration) over the run's
judgements, joined to the human labels. A pair is in the queue when its AI label is not the
human's: a disagreement, or a tie. Items are ranked by the AI's confidence (``margin``), most
confident first, pair id breaking equal margins (the order of the audit's own divergence table).
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa

from . import maindb
from .workspace import Workspace

ITEMS_SQL = """
    SELECT l.pair_id, row_number() OVER (ORDER BY l.margin DESC, l.pair_id) AS rank, l.p_a, l.margin, l.is_tie,
           l.chosen AS ai_choice, h.human_choice, l.orders_agree, l.n_principles::BIGINT AS n_principles,
           h.len_a::BIGINT AS len_a, h.len_b::BIGINT AS len_b, h.source, h.source_row::BIGINT AS source_row
    FROM _labels l JOIN _human h USING (pair_id)
    WHERE l.p_a IS NOT NULL AND (l.is_tie OR l.chosen <> h.human_choice)
    ORDER BY rank"""
CELLS_SQL = """
    SELECT c.pair_id, c.principle_id, c.p_ab, c.p_ba, c.p,
           CASE i.human_choice WHEN 'a' THEN 1 - c.p ELSE c.p END AS toward_wrong,
           row_number() OVER (PARTITION BY c.principle_id ORDER BY toward_wrong DESC, i.rank) AS prank, i.rank
    FROM _cells c JOIN _items i USING (pair_id) WHERE c.p IS NOT NULL"""
# per item: the principles that sided against the human, most strongly first (shown in the queue)
DRIVERS_SQL = """
    SELECT i.*, d.drivers FROM _items i LEFT JOIN (
        SELECT pair_id, string_agg(principle_id, ', ' ORDER BY toward_wrong DESC, principle_id) AS drivers
        FROM _cells_out WHERE toward_wrong > 0.5 GROUP BY 1) d USING (pair_id)
    ORDER BY i.rank"""


def derive(labels: pa.Table, cells: pa.Table, human: pa.Table) -> dict[str, pa.Table]:
    """``items`` (one row per queued pair) and ``cells`` (its per-principle probabilities) from the run's
    labels (pair_id, p_a, chosen, margin, is_tie, orders_agree, n_principles), its cells (pair_id,
    principle_id, p_ab, p_ba, p) and the human rows (pair_id, human_choice, source_row, len_a, len_b,
    source)."""
    con = duckdb.connect()
    try:
        con.register("_labels", labels)
        con.register("_human", human)
        items = con.sql(ITEMS_SQL).to_arrow_table()
        con.register("_items", items)
        con.register("_cells", cells)
        cells_out = con.sql(CELLS_SQL).to_arrow_table()
        con.register("_cells_out", cells_out)
        items = con.sql(DRIVERS_SQL).to_arrow_table()
    finally:
        con.close()
    return {"items": items, "cells": cells_out}


def build(ws: Workspace, db: str | Path, audit_id: str | None = None, *, force: bool = True) -> maindb.AuditRow:
    """(Re)build the workspace's copy of an audit (the newest when ``audit_id`` is None) from ``db``;
    with ``force=False`` a copy of the same audit (same creation time) is kept and only the verdicts
    stored in ``db`` are merged in.

    Raises :class:`maindb.Busy` when a run holds the database (the workspace is left as it was)."""
    with maindb.reading(db) as store:
        audit = maindb.audit_row(store, audit_id)
        have = ws.audit(audit.audit_id)
        if not force and have and have["created_at"] == audit.created_at:
            ws.merge_events(audit.audit_id, maindb.verdict_events(store, audit.audit_id))
            return audit
        tables = derive(*maindb.audit_labels(store, audit), maindb.human_rows(store, audit.set_id))
        ids = tables["items"]["pair_id"].to_pylist()
        tables["texts"] = maindb.pair_texts(store, ids)
        tables["judgements"] = maindb.judgement_rows(store, audit.run_id, ids)
        events = maindb.verdict_events(store, audit.audit_id)
    ws.replace(audit, tables, events)
    return audit
