"""DuckDB → Hugging Face datasets in TRL's conversational formats, through Arrow.

Every export is SQL over the store, streamed by DuckDB in Arrow batches into ``data.parquet`` and
made into a dataset by ``datasets.Dataset.from_parquet`` (no Python loop over rows, and no Arrow
table of every row: a 1M-pair export peaked at 1.83 GB, not 5.0 GB; DuckDB's sort and the
memory-mapped dataset still grow with it). The JSON columns become typed Arrow lists in SQL
(``from_json``), so the dataset has the features TRL expects: a list of ``{role, content}``
structs. Each export folder holds the ``save_to_disk`` files, ``data.parquet`` (the same rows,
for tools that read Parquet) and ``export.json`` (run, filters and how many rows each filter
dropped: nothing is left out silently).

Formats (https://huggingface.co/docs/trl/dataset_formats):
- SFT: ``messages`` = the prompt conversation + the revision as the assistant turn.
- Preferences: ``prompt`` (conversation), ``chosen`` / ``rejected`` (one assistant turn each),
  plus ``p_chosen`` (the soft probability that ``chosen`` is better) and ``pair_id``. There is
  deliberately no ``margin`` column: ``RewardTrainer`` would subtract it inside its loss.

Soft labels with TRL 1.x. DPO has no per-example soft-label loss any more (only a global
``label_smoothing`` ε for the ``sigmoid``/``robust`` losses). ``soft="bernoulli"`` draws each
pair's hard label from Bernoulli(p_a): then the expected DPO loss over the draw is
``-p·log σ(βΔ) - (1-p)·log σ(-βΔ)``, i.e. exactly the per-example soft-label (cDPO) loss with
ε = 1 - p, without changing TRL. The draw is ``u = (first 8 bytes of md5("<pair_id>:<seed>") as a
little-endian uint64 >> 11) / 2**53`` (DuckDB's ``md5_number_upper``), chosen = a iff ``u < p_a``;
so each pair's label depends only on its id and the seed, not on which other pairs pass the
filters. Ties are left out in both modes (a coin flip teaches nothing about the preference).
The alternative (keep only confident pairs with ``min_confidence`` and train with
``loss_type: [robust]`` and a global ``label_smoothing``) needs no export option.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from .store import Store, StoreError, now

MSG_LIST = """'[{"role":"VARCHAR","content":"VARCHAR"}]'"""
STR_LIST = """'["VARCHAR"]'"""
MANIFEST = "export.json"


class ExportError(StoreError):
    """An export that cannot produce rows, with what to change."""


@dataclass
class ExportResult:
    """What an export wrote: ``rows`` rows in ``out``; ``dropped`` = reason → rows left out."""

    kind: str
    out: Path
    rows: int
    columns: list[str]
    dropped: dict[str, int] = field(default_factory=dict)
    source: dict = field(default_factory=dict)

    def summary(self) -> str:
        text = f"{self.rows} {self.kind} rows → {self.out}"
        if self.dropped:
            text += "; left out: " + ", ".join(f"{n}× {r}" for r, n in sorted(self.dropped.items(), key=lambda x: -x[1]))
        return text


# ---------------------------------------------------------------------------------- helpers


def _open(db: str | Path) -> Store:
    return Store(db, read_only=True)


def _check_run(store: Store, run_id: str) -> str:
    """The run's kind; an unknown run id lists the known ones."""
    row = store.one("SELECT kind FROM runs WHERE run_id = ?", [run_id])
    if row is None:
        known = store.con.execute("SELECT run_id, kind FROM runs ORDER BY started_at").fetchall()
        listed = ", ".join(f"{r} ({k})" for r, k in known) or "none: run a pipeline first"
        raise ExportError(f"{store.path}: no run '{run_id}'; known runs: {listed}")
    return row[0]


def _lineage(store: Store, run_id: str, kind: str) -> dict:
    from .card import lineage

    return lineage(store, run_id, kind)


def _stream(store: Store, sql: str, params: dict) -> pa.RecordBatchReader:
    """The rows of ``sql`` as Arrow batches, read while they are written (an export of millions of
    pairs never holds all its rows in memory)."""
    return store.con.sql(sql, params=params).to_arrow_reader(BATCH_ROWS)


def _counts(store: Store, sql: str, params: dict) -> tuple[dict[str, int], int]:
    """``(reason → count, rows kept)`` from a query whose rows have a ``reason`` column (NULL = kept)."""
    rows = store.con.execute(f"SELECT reason, count(*) FROM ({sql}) GROUP BY 1", params).fetchall()
    return {r: n for r, n in rows if r is not None}, sum(n for r, n in rows if r is None)


# Rows per Arrow batch (and per parquet row group) of an export.
BATCH_ROWS = 10_000


def _write(rows: pa.RecordBatchReader, out: str | Path, manifest: dict) -> tuple[Path, int]:
    """``data.parquet`` (written batch by batch as the rows stream in), the ``save_to_disk`` files
    made from it (``Dataset.from_parquet`` memory-maps what it reads), and ``export.json``; all
    written beside ``out`` then moved in (a failed export never leaves half a folder; an old export
    at ``out`` is replaced). Returns the folder and the number of rows."""
    import datasets

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).exists():
        raise ExportError(f"{out} exists and is not a factory export; pass an empty or new --out folder")
    staging, cache = out.with_name(out.name + ".partial"), out.with_name(out.name + ".cache")
    for d in (staging, cache):
        shutil.rmtree(d, ignore_errors=True)
    staging.mkdir(parents=True)
    n = 0
    with pq.ParquetWriter(staging / "data.parquet", rows.schema) as writer:
        for batch in rows:
            writer.write_batch(batch)
            n += batch.num_rows
    shown = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        datasets.Dataset.from_parquet(str(staging / "data.parquet"), cache_dir=str(cache)).save_to_disk(str(staging))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        if shown:
            datasets.enable_progress_bars()
    (staging / MANIFEST).write_text(json.dumps({**manifest, "rows": n}, indent=2, default=str))
    from .card import render_card  # the dataset card, from the same manifest (issue 25)

    (staging / "README.md").write_text(render_card(json.loads(json.dumps({**manifest, "rows": n}, default=str))))
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return out, n


def _finish(kind: str, rows: pa.Table | pa.RecordBatchReader, out: str | Path, dropped: dict[str, int],
            source: dict, lin: dict | None = None) -> ExportResult:
    reader = rows.to_reader(BATCH_ROWS) if isinstance(rows, pa.Table) else rows
    manifest = {"kind": kind, "dropped": dropped, "source": source, "created_at": now().isoformat(),
                "columns": reader.schema.names}
    if lin is not None:  # the run's lineage (constitution, model, judge, audit, cost): export.json and the card
        manifest.update(constitution=lin.get("constitution"), model=lin.get("engine_model"), lineage=lin)
    path, n = _write(reader, out, manifest)
    return ExportResult(kind, path, n, reader.schema.names, dropped, source)


# -------------------------------------------------------------------------------------- SFT


def export_sft(db: str | Path, run_id: str, out: str | Path, *, rounds: Sequence[int] | None = None,
               principles: Sequence[str] | None = None, include_failed: bool = False) -> ExportResult:
    """Revisions of ``run_id`` → ``messages`` (prompt conversation + revision), one row per revision.

    ``rounds``: the rounds to keep (default: the run's final round only, i.e. the fully revised
    answers). ``principles``: keep revisions that addressed at least one of these principle ids.
    ``include_failed``: also keep non-``ok`` revisions that still have text (never rows without
    text). Extra columns: ``prompt_id``, ``revision_id``, ``round``, ``principle_ids`` (list).
    """
    with _open(db) as store:
        _check_run(store, run_id)
        base = f"""SELECT r.id, r.prompt_id, r.round, r.principle_ids, r.text, r.status
                   FROM {store.run_rows('revisions', '$run')} r"""
        stats = dict(store.con.execute(f"SELECT status, count(*) FROM ({base}) GROUP BY 1", {"run": run_id}).fetchall())
        if not stats:
            raise ExportError(f"run '{run_id}' has no revisions; `factory export sft` reads critique→revise (sl) runs "
                              "(for preference runs use `factory export prefs`)")
        if not stats.get("ok") and not include_failed:
            raise ExportError(f"run '{run_id}' has no completed revisions ({', '.join(f'{n} {s}' for s, n in stats.items())}); "
                              f"see `factory status --run {run_id}` and rerun the pipeline to retry them")
        present = [r for (r,) in store.con.execute(f"SELECT DISTINCT round FROM ({base}) ORDER BY 1", {"run": run_id}).fetchall()]
        keep = [present[-1]] if rounds is None else sorted(set(int(r) for r in rounds))
        missing = [r for r in keep if r not in present]
        if missing:
            raise ExportError(f"run '{run_id}' has no round {missing}; its rounds are {present}")
        if principles:
            known = {p for (p,) in store.con.execute(
                f"SELECT DISTINCT unnest(from_json(principle_ids, {STR_LIST})) FROM ({base})", {"run": run_id}).fetchall()}
            unknown = sorted(set(principles) - known)
            if unknown:
                raise ExportError(f"no revision of run '{run_id}' addresses principle(s) {unknown}; "
                                  f"its principles are {sorted(known)}")
        params = {"run": run_id, "rounds": keep, "principles": list(principles or []),
                  "filter_pr": bool(principles), "include_failed": include_failed}
        tagged = f"""
            SELECT rv.*, p.messages AS prompt_messages, CASE
                WHEN NOT list_contains($rounds, rv.round) THEN 'round not selected'
                WHEN $filter_pr AND NOT list_has_any(from_json(rv.principle_ids, {STR_LIST}), $principles::VARCHAR[])
                    THEN 'principle not selected'
                WHEN coalesce(trim(rv.text), '') = '' THEN 'no text (status ' || rv.status || ')'
                WHEN rv.status <> 'ok' AND NOT $include_failed THEN 'status ' || rv.status
                WHEN p.prompt_id IS NULL THEN 'prompt missing from the prompts table'
                END AS reason
            FROM ({base}) rv LEFT JOIN prompts p ON p.prompt_id = rv.prompt_id"""
        dropped, kept = _counts(store, tagged, params)
        if kept == 0:
            raise ExportError(f"the filters leave no revisions of run '{run_id}' "
                              f"(rounds {keep}, principles {list(principles or []) or 'all'}; left out: {dropped})")
        source = {"db": str(db), "run_id": run_id, "rounds": keep, "principles": list(principles or []) or None,
                  "include_failed": include_failed}
        lin = _lineage(store, run_id, "sft")  # before the rows stream (one open result per connection)
        return _finish("sft", _stream(store, f"""
            SELECT list_append(from_json(prompt_messages, {MSG_LIST}), {{'role': 'assistant', 'content': text}}) AS messages,
                   prompt_id, id AS revision_id, round, from_json(principle_ids, {STR_LIST}) AS principle_ids
            FROM ({tagged}) WHERE reason IS NULL ORDER BY prompt_id, round, id""", params), out, dropped, source, lin)


# ------------------------------------------------------------------------------ preferences

_PAIR_COLUMNS = f"""
    from_json(conversation, {MSG_LIST}) AS prompt,
    [{{'role': 'assistant', 'content': CASE WHEN side = 'a' THEN response_a ELSE response_b END}}] AS chosen,
    [{{'role': 'assistant', 'content': CASE WHEN side = 'a' THEN response_b ELSE response_a END}}] AS rejected,
    (CASE WHEN side = 'a' THEN p_a ELSE 1 - p_a END)::DOUBLE AS p_chosen, pair_id"""


def _labels_for_principles(store: Store, run_id: str, principles: Sequence[str]) -> pa.Table:
    """The run's labels re-made from its judgements of a principle subset, by the run's own label rule
    (its weights, tie band, clamp and calibration: factory.labels), so they match ``preferences``
    when every principle is kept."""
    from .labels import labels_table, run_rule

    rel = store.run_rows("judgements", "$run")
    known = {p for (p,) in store.con.execute(f"SELECT DISTINCT principle_id FROM {rel}", {"run": run_id}).fetchall()}
    unknown = sorted(set(principles) - known)
    if unknown:
        raise ExportError(f"run '{run_id}' has no judgements for principle(s) {unknown}; "
                          f"its principles are {sorted(known) or 'none (no judgements stored)'}")
    rule = run_rule(store, run_id)
    rule = rule.with_(weights={k: v for k, v in rule.weights.items() if k in principles})
    store.con.execute("CREATE OR REPLACE TEMP TABLE _subset AS SELECT unnest($p::VARCHAR[]) AS principle_id",
                      {"p": list(principles)})
    sub = f"(SELECT * FROM {rel} j SEMI JOIN _subset USING (principle_id))"
    return labels_table(store, sub, rule, {"run": run_id}).select(
        ["pair_id", "p_a", "chosen", "margin", "is_tie", "orders_agree", "orders_complete", "n_principles"])


def export_prefs(db: str | Path, run_id: str, out: str | Path, *, min_confidence: float = 0.0,
                 position_consistent_only: bool = False, principles: Sequence[str] | None = None,
                 soft: Literal["none", "bernoulli"] = "none", seed: int = 0, complete_only: bool = False) -> ExportResult:
    """AI preference labels of ``run_id`` → ``prompt``/``chosen``/``rejected`` (+ ``p_chosen``, ``pair_id``).

    ``min_confidence`` applies to the stored ``margin = |p_a - 0.5| * 2`` (in [0, 1]; 0.2 keeps
    pairs with p_a ≤ 0.4 or ≥ 0.6). ``position_consistent_only`` keeps pairs where, for every
    principle, both presentation orders pick the same response. ``principles`` re-makes the labels
    from the run's judgements of that subset by the run's own label rule (factory.labels). Ties (and pairs
    whose judgements all failed) are left out and counted. ``soft``: see the module docstring.
    ``complete_only`` leaves out labels pooled from fewer principles than were asked of their pair
    (:mod:`factory.coverage`: a failed judgement or rationale), counted as "incomplete principle coverage".
    """
    if not 0.0 <= min_confidence <= 1.0:
        raise ExportError(f"min_confidence is on the margin |p_a - 0.5| * 2 and must be in [0, 1]; got {min_confidence}")
    if soft not in ("none", "bernoulli"):
        raise ExportError(f"unknown soft-label mode {soft!r}; use none or bernoulli")
    with _open(db) as store:
        _check_run(store, run_id)
        if store.count("preferences", "run_id = ?", [run_id]) == 0:
            raise ExportError(f"run '{run_id}' has no preference labels; `factory export prefs` reads preference runs "
                              "(for critique→revise runs use `factory export sft`)")
        if principles:
            store.con.register("_labels", _labels_for_principles(store, run_id, principles))
            labels = "SELECT * FROM _labels"
        else:
            labels = ("SELECT pair_id, p_a, chosen, margin, is_tie, orders_agree, orders_complete, n_principles "
                      "FROM preferences WHERE run_id = $run")
        params = {"min_conf": float(min_confidence), "consistent": position_consistent_only,
                  "bernoulli": soft == "bernoulli", "seed": str(int(seed)), "complete": complete_only, "run": run_id}
        from .coverage import planned_sql

        asked = planned_sql(store, "$run", "_subset" if principles else None)
        tagged = f"""
            SELECT l.*, pr.conversation, pr.response_a, pr.response_b, CASE
                WHEN pr.pair_id IS NULL THEN 'pair missing from the pairs table'
                WHEN pr.status <> 'ok' THEN 'pair status ' || pr.status
                WHEN l.p_a IS NULL OR isnan(l.p_a) THEN 'no valid judgement'
                WHEN l.is_tie THEN 'tie'
                WHEN l.margin < $min_conf THEN 'below min_confidence'
                WHEN $consistent AND NOT (coalesce(l.orders_complete, false) AND coalesce(l.orders_agree, 0) = 1)
                    THEN 'orders disagree or incomplete'
                WHEN $complete AND l.n_principles < coalesce(asked.n_asked, 0) THEN 'incomplete principle coverage'
                END AS reason,
                CASE WHEN $bernoulli
                    THEN CASE WHEN (md5_number_upper(l.pair_id || ':' || $seed) >> 11)::DOUBLE / 9007199254740992.0 < l.p_a
                              THEN 'a' ELSE 'b' END
                    ELSE l.chosen END AS side
            FROM ({labels}) l LEFT JOIN pairs pr ON pr.pair_id = l.pair_id
            LEFT JOIN ({asked}) asked ON asked.pair_id = l.pair_id"""
        dropped, kept = _counts(store, tagged, params)
        if kept == 0:
            raise ExportError(f"every pair of run '{run_id}' is a tie or filtered out (left out: {dropped}); "
                              "lower --min-confidence, drop --consistent-only, or label more pairs")
        source = {"db": str(db), "run_id": run_id, "min_confidence": min_confidence, "confidence_scale": "|p_a-0.5|*2",
                  "position_consistent_only": position_consistent_only, "principles": list(principles or []) or None,
                  "soft": soft, "seed": seed, **({"complete_only": True} if complete_only else {})}
        lin = _lineage(store, run_id, "prefs")  # before the rows stream (one open result per connection)
        return _finish("prefs", _stream(store, f"SELECT {_PAIR_COLUMNS} FROM ({tagged}) WHERE reason IS NULL ORDER BY pair_id",
                                        params), out, dropped, source, lin)


def human_pairs(spec: str | Path, *, limit: int | None = None, offset: int = 0,
                format: Literal["auto", "hh-rlhf", "jsonl"] = "auto") -> tuple[pa.Table, dict[str, int]]:
    """Human-labelled pairs ``[offset, offset + limit)`` of ``spec`` (sources.read_pairs order) and
    the skip reasons → counts; pairs without a human choice are left out and counted."""
    import pyarrow.compute as pc

    from .sources import read_pairs

    if offset < 0 or (limit is not None and limit < 1):
        raise ExportError(f"offset must be >= 0 and limit >= 1; got offset={offset}, limit={limit}")
    table, skips = read_pairs(spec, format=format, limit=None if limit is None else offset + limit)
    table = table.slice(offset, limit)
    dropped: dict[str, int] = {}
    for s in skips:
        reason = "source: " + s.reason.split(":", 1)[-1].strip()
        dropped[reason] = dropped.get(reason, 0) + 1
    labelled = pc.is_valid(table.column("human_choice"))
    n_unlabelled = table.num_rows - pc.sum(labelled.cast(pa.int64())).as_py() if table.num_rows else 0
    if n_unlabelled:
        dropped["no human_choice"] = n_unlabelled
    return table.filter(labelled), dropped


def export_human(spec: str | Path, out: str | Path, *, limit: int | None = None, offset: int = 0,
                 format: Literal["auto", "hh-rlhf", "jsonl"] = "auto") -> ExportResult:
    """Human-labelled pairs → the preference format, ``chosen`` = the human's choice (``p_chosen`` 1).

    ``offset``/``limit`` select a slice of the file's valid pairs, so a training slice and an
    evaluation slice (``factory eval rm --offset``) can be kept disjoint.
    """
    import duckdb

    table, dropped = human_pairs(spec, limit=limit, offset=offset, format=format)
    if table.num_rows == 0:
        raise ExportError(f"{spec}: no labelled pairs in rows [{offset}, {offset + (limit or 0) or 'end'}) "
                          f"(left out: {dropped}); check --offset/--limit and the file")
    con = duckdb.connect()
    con.register("_pairs", table)
    rows = con.sql(f"""SELECT {_PAIR_COLUMNS} FROM (
                           SELECT *, human_choice AS side, (CASE WHEN human_choice = 'a' THEN 1 ELSE 0 END)::DOUBLE AS p_a
                           FROM _pairs) ORDER BY pair_id""").to_arrow_table()
    con.close()
    source = {"human": str(spec), "limit": limit, "offset": offset, "format": format}
    return _finish("human", rows, out, dropped, source)


def read_manifest(folder: str | Path) -> dict | None:
    """The ``export.json`` of an export folder (None for a folder not written by the factory)."""
    path = Path(folder) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


__all__ = ["ExportError", "ExportResult", "export_human", "export_prefs", "export_sft", "human_pairs", "read_manifest"]

from .callable import make_callable  # noqa: E402  (issue 25: `factory.export(...)` is the API function)

make_callable(__name__)
