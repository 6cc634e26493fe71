"""The store's schema: the Arrow schemas rows are written with, the DuckDB tables, and the migrations
that bring any older database to the current version (:class:`factory.store.Store` applies them).

Migrations are appended, never edited: each is a list of idempotent statements, and a database
records the versions it has applied in ``migrations``.
"""

from __future__ import annotations

import pyarrow as pa

# Columns shared by every generated-text table (responses, critiques, revisions, samples, …).
GEN_COLUMNS: dict[str, pa.DataType] = {
    "id": pa.string(),  # content key
    "run_id": pa.string(),  # the run that produced it first
    "prompt_id": pa.string(),
    "parent_id": pa.string(),  # response/revision this row critiques or revises
    "parent_ids": pa.string(),  # JSON list of every parent id in the key (a revision: head + its critiques)
    "round": pa.int32(),
    "principle_ids": pa.string(),  # JSON list (a revision may address several critiques)
    "constitution_hash": pa.string(),
    "template_hash": pa.string(),
    "model": pa.string(),
    "sampling_hash": pa.string(),  # -> configs.config_hash (sampling params incl. engine seed)
    "messages": pa.string(),  # JSON: exactly what the model received
    "text": pa.string(),
    "status": pa.string(),  # ok | failed | skipped
    "error": pa.string(),
    "prompt_tokens": pa.int32(),
    "completion_tokens": pa.int32(),
    "finish_reason": pa.string(),
    "created_at": pa.timestamp("us", tz="UTC"),
    "chunk": pa.int64(),  # the run's input chunk it was made for (restarts probe only their own chunks)
}
GEN_SCHEMA = pa.schema(list(GEN_COLUMNS.items()))
GEN_TABLES = ("responses", "critiques", "revisions")

# Preference labelling (RLAIF): pairs of responses, one judgement per (pair, principle, order),
# and the aggregated label per (run, pair).
SAMPLE_SCHEMA = pa.schema([*GEN_SCHEMA, ("sample_index", pa.int32())])
PAIR_SCHEMA = pa.schema([
    ("pair_id", pa.string()),  # content key of (conversation, response_a, response_b)
    ("run_id", pa.string()),
    ("source", pa.string()),  # sampled | sl | file | human:<set>
    ("prompt_id", pa.string()),
    ("conversation", pa.string()),  # JSON list of {role, content}, ends with a user turn
    ("response_a", pa.string()),
    ("response_b", pa.string()),
    ("response_a_id", pa.string()),  # row id in samples/responses/revisions when generated here
    ("response_b_id", pa.string()),
    ("status", pa.string()),  # ok | skipped
    ("error", pa.string()),
    ("created_at", pa.timestamp("us", tz="UTC")),
])
JUDGEMENT_SCHEMA = pa.schema([
    ("id", pa.string()),  # content key: pair, principle text, order, rendered messages, model, seed, judge config
    ("run_id", pa.string()),
    ("pair_id", pa.string()),
    ("principle_id", pa.string()),
    ("principle_hash", pa.string()),
    ("order", pa.string()),  # ab: response_a shown first as option A; ba: response_b shown first
    ("constitution_hash", pa.string()),
    ("template_hash", pa.string()),
    ("model", pa.string()),
    ("sampling_hash", pa.string()),
    ("messages_hash", pa.string()),  # sha256 of the exact messages sent; `factory show ID` re-renders and checks
    ("rationale", pa.string()),  # chain-of-thought judge only
    ("logprob_first", pa.float64()),  # log-prob of the first-shown option's token
    ("logprob_second", pa.float64()),
    ("p_first", pa.float64()),  # renormalised over the two options
    ("p_a", pa.float64()),  # P(response_a better) = p_first (ab) or 1 - p_first (ba)
    ("floored", pa.int32()),  # bit i set: option i was outside the endpoint's top-k and got the floor
    ("verdicts", pa.string()),  # vote mode: JSON list of the sampled verdict texts, unparseable ones included
    ("status", pa.string()),
    ("error", pa.string()),
    ("prompt_tokens", pa.int32()),
    ("completion_tokens", pa.int32()),
    ("created_at", pa.timestamp("us", tz="UTC")),
    ("chunk", pa.int64()),
])
PREFERENCE_SCHEMA = pa.schema([
    ("run_id", pa.string()),
    ("pair_id", pa.string()),
    ("p_a", pa.float64()),  # P(response_a better), orders averaged then principles weighted
    ("chosen", pa.string()),  # a | b | null (tie)
    ("margin", pa.float64()),  # |p_a - 0.5| * 2
    ("is_tie", pa.bool_()),
    ("orders_agree", pa.float64()),  # share of principles whose two orders pick the same response
    ("principles_agree", pa.int64()),  # principles on the same side as the pair's label
    ("n_principles", pa.int64()),
    ("orders_complete", pa.bool_()),
    ("created_at", pa.timestamp("us", tz="UTC")),
])

_DUCK_TYPES = {
    pa.string(): "VARCHAR",
    pa.int32(): "INTEGER",
    pa.int64(): "BIGINT",
    pa.float64(): "DOUBLE",
    pa.bool_(): "BOOLEAN",
    pa.int8(): "TINYINT",
    pa.timestamp("us", tz="UTC"): "TIMESTAMPTZ",
}


# Rationales (chain-of-thought judge) are stored like judgements: messages by hash, re-rendered on demand.
RATIONALE_SCHEMA = pa.schema([*(f if f.name != "messages" else pa.field("messages_hash", pa.string()) for f in GEN_SCHEMA),
                              ("pair_id", pa.string()), ("principle_id", pa.string()), ("order", pa.string())])
# A finished chunk of one run's input: its rows (and its descendants' rows) are all stored, so a
# restart skips it without reading, rendering or probing it (datatrove-style completion records).
CHUNK_SCHEMA = pa.schema([("run_id", pa.string()), ("stage", pa.string()), ("chunk", pa.int64()),
                          ("source", pa.string()), ("meta_json", pa.string()), ("n_jobs", pa.int64()),
                          ("n_new", pa.int64()), ("done_at", pa.timestamp("us", tz="UTC"))])


def ddl(table: str, schema: pa.Schema, key: str | tuple[str, ...] | None = "id") -> str:
    """CREATE TABLE for ``schema``; ``key=None``: no primary key (see JUDGEMENT_SCHEMA's table)."""
    cols = ", ".join(f'"{f.name}" {_DUCK_TYPES[f.type]}' for f in schema)
    if key is None:
        return f"CREATE TABLE IF NOT EXISTS {table} ({cols})"
    keys = (key,) if isinstance(key, str) else key
    return f"CREATE TABLE IF NOT EXISTS {table} ({cols}, PRIMARY KEY ({', '.join(keys)}))"


MIGRATIONS: list[list[str]] = [
    # v1: the critique→revise slice
    [
        "CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR)",
        """CREATE TABLE IF NOT EXISTS runs (
            run_id VARCHAR PRIMARY KEY, name VARCHAR, kind VARCHAR, pipeline_path VARCHAR,
            config_hash VARCHAR, config_json VARCHAR,
            constitution_name VARCHAR, constitution_version VARCHAR, constitution_hash VARCHAR,
            model VARCHAR, engine_json VARCHAR, started_at TIMESTAMPTZ, finished_at TIMESTAMPTZ,
            status VARCHAR, summary_json VARCHAR)""",
        "CREATE TABLE IF NOT EXISTS configs (config_hash VARCHAR PRIMARY KEY, kind VARCHAR, body VARCHAR)",
        """CREATE TABLE IF NOT EXISTS prompts (
            prompt_id VARCHAR PRIMARY KEY, messages VARCHAR, n_chars BIGINT, first_run_id VARCHAR)""",
        """CREATE TABLE IF NOT EXISTS run_prompts (
            run_id VARCHAR, prompt_id VARCHAR, source_row BIGINT, PRIMARY KEY (run_id, prompt_id))""",
        """CREATE TABLE IF NOT EXISTS skips (
            run_id VARCHAR, stage VARCHAR, source VARCHAR, "row" BIGINT, reason VARCHAR,
            created_at TIMESTAMPTZ, PRIMARY KEY (run_id, stage, source, "row", reason))""",
        *[ddl(t, GEN_SCHEMA) for t in GEN_TABLES],
        # which stored rows each run uses (a rerun reuses rows produced by an earlier run)
        'CREATE TABLE IF NOT EXISTS run_items (run_id VARCHAR, "table" VARCHAR, id VARCHAR, PRIMARY KEY (run_id, "table", id))',
    ],
    # v2: preference labelling, human label sets, audits, evaluations
    [
        ddl("samples", SAMPLE_SCHEMA),
        ddl("rationales", GEN_SCHEMA),  # chain-of-thought judge: the rationale before the scored answer
        ddl("pairs", PAIR_SCHEMA, "pair_id"),
        # No primary key: at millions of rows its index would cost ~70 bytes a judgement on disk (and
        # again as free blocks after each checkpoint rewrites it) and grow in memory. Keys stay unique
        # because the runner asks for a key only when the store has no row for it (one writer, planned
        # keys deduplicated in flight) and labelling checks it (labelrun.check_unique).
        ddl("judgements", JUDGEMENT_SCHEMA, key=None),
        ddl("preferences", PREFERENCE_SCHEMA, ("run_id", "pair_id")),
        """CREATE TABLE IF NOT EXISTS human_sets (
            set_id VARCHAR PRIMARY KEY, name VARCHAR, source VARCHAR, format VARCHAR, n_pairs BIGINT,
            n_skipped BIGINT, skips_json VARCHAR, created_at TIMESTAMPTZ)""",
        """CREATE TABLE IF NOT EXISTS human_labels (
            set_id VARCHAR, pair_id VARCHAR, source_row BIGINT, human_choice VARCHAR, annotator VARCHAR,
            confidence DOUBLE, swapped BOOLEAN, PRIMARY KEY (set_id, pair_id))""",
        """CREATE TABLE IF NOT EXISTS audits (
            audit_id VARCHAR PRIMARY KEY, run_id VARCHAR, set_id VARCHAR, created_at TIMESTAMPTZ,
            result_json VARCHAR, report_path VARCHAR)""",
        """CREATE TABLE IF NOT EXISTS evals (
            eval_id VARCHAR PRIMARY KEY, kind VARCHAR, model VARCHAR, set_id VARCHAR, n BIGINT,
            accuracy DOUBLE, ties BIGINT, details_json VARCHAR, created_at TIMESTAMPTZ)""",
    ],
    # v3: streaming runs (chunk completion records, pair membership), compact judgements (messages by
    # hash), model identity, run errors and lineage, judge modes
    [
        "ALTER TABLE judgements ADD COLUMN IF NOT EXISTS messages_hash VARCHAR",
        "ALTER TABLE judgements ADD COLUMN IF NOT EXISTS floored INTEGER",
        "ALTER TABLE judgements ADD COLUMN IF NOT EXISTS verdicts VARCHAR",
        "ALTER TABLE rationales ADD COLUMN IF NOT EXISTS messages_hash VARCHAR",
        "ALTER TABLE rationales ADD COLUMN IF NOT EXISTS pair_id VARCHAR",
        "ALTER TABLE rationales ADD COLUMN IF NOT EXISTS principle_id VARCHAR",
        'ALTER TABLE rationales ADD COLUMN IF NOT EXISTS "order" VARCHAR',
        *[f"ALTER TABLE {t} ADD COLUMN IF NOT EXISTS parent_ids VARCHAR" for t in ("responses", "critiques", "revisions",
                                                                              "samples", "rationales")],
        *[f"ALTER TABLE {t} ADD COLUMN IF NOT EXISTS chunk BIGINT"
          for t in ("responses", "critiques", "revisions", "samples", "rationales", "judgements")],
        "ALTER TABLE runs ADD COLUMN IF NOT EXISTS error VARCHAR",
        "ALTER TABLE runs ADD COLUMN IF NOT EXISTS lineage_json VARCHAR",
        ddl("chunks", CHUNK_SCHEMA, ("run_id", "stage", "chunk")),
        """CREATE TABLE IF NOT EXISTS run_pairs (
            run_id VARCHAR, pair_id VARCHAR, source_row BIGINT, PRIMARY KEY (run_id, pair_id))""",
        """INSERT OR IGNORE INTO run_pairs SELECT run_id, id, NULL FROM run_items WHERE "table" = 'pairs'""",
        """DELETE FROM run_items WHERE "table" = 'pairs'""",
        "CREATE TABLE IF NOT EXISTS migrations (version INTEGER, applied_at TIMESTAMPTZ, note VARCHAR)",
        "ALTER TABLE preferences ADD COLUMN IF NOT EXISTS p_a_raw DOUBLE",  # the label without calibration
        "ALTER TABLE preferences ADD COLUMN IF NOT EXISTS p_a_cal DOUBLE",  # … with batch calibration
        "ALTER TABLE preferences ADD COLUMN IF NOT EXISTS rule_hash VARCHAR",
        # per (run, principle, order): the mean P(first) that batch calibration divides out
        """CREATE TABLE IF NOT EXISTS calibration (run_id VARCHAR, principle_id VARCHAR, "order" VARCHAR, prior DOUBLE,
           n BIGINT, PRIMARY KEY (run_id, principle_id, "order"))""",
        # named principle weights fitted to human labels (`factory audit fit`), usable as judge.weights
        """CREATE TABLE IF NOT EXISTS weight_sets (name VARCHAR PRIMARY KEY, body VARCHAR, created_at TIMESTAMPTZ)""",
        # Keys name what really answered (issue: a fake-engine trial must never be reused by a real
        # run). Rows of fake-engine runs are relabelled; keys stored before v3 hold the alias, which
        # no later key does, so those rows stay readable but are never reused.
        *[f"""UPDATE {t} SET model = 'fake:' || model WHERE model NOT LIKE 'fake:%' AND run_id IN
              (SELECT run_id FROM runs WHERE json_extract_string(engine_json, '$.kind') = 'fake')"""
          for t in ("responses", "critiques", "revisions", "samples", "rationales", "judgements")],
        """INSERT INTO migrations VALUES (3, now(), 'v3: rows of fake-engine runs relabelled model = fake:<alias>; '
           || 'row keys now hold the identity of what answered (weights fingerprint, server model id or fake:), '
           || 'so rows stored before v3 stay readable and exportable but are never reused by a later run; '
           || 'pair membership moved from run_items to run_pairs')""",
    ],
]

# Tables of one row per prompt or pair (and per run × prompt/pair, and labels) have no primary key
# from v4 on. DuckDB holds a primary key's index in memory whole and writes it again at every
# checkpoint, so at a million pairs these indexes were most of the memory that grew with a run
# (pairs + run_pairs ~134 MB, preferences ~60 MB; a 256 MB cap failed to commit the labels) and made
# the checkpoint spikes grow. Their keys are kept by Store.insert instead: rows whose key is stored
# already (or repeated within the batch) are left out by an anti-join, the same guarantee
# INSERT OR IGNORE gave.
NATURAL_KEYS: dict[str, tuple[str, ...]] = {
    "prompts": ("prompt_id",), "run_prompts": ("run_id", "prompt_id"), "pairs": ("pair_id",),
    "run_pairs": ("run_id", "pair_id"), "preferences": ("run_id", "pair_id")}


def _without_key(table: str) -> list[str]:
    """Rebuild ``table`` with the same columns and rows and no primary key (DuckDB cannot drop one)."""
    return [f"CREATE TABLE _v4_{table} AS SELECT * FROM {table}", f"DROP TABLE {table}",
            f"ALTER TABLE _v4_{table} RENAME TO {table}"]


MIGRATIONS.append([
    *(stmt for t in NATURAL_KEYS for stmt in _without_key(t)),
    """INSERT INTO migrations VALUES (4, now(), 'v4: prompts, run_prompts, pairs, run_pairs and preferences rebuilt '
       || 'without a primary key (its in-memory index grew with the run); Store.insert keeps their keys unique')""",
])

# v5 (issue 20): roles and panels. Who judged a run (name, model, judge settings, weight), each judge's
# own label per pair, and the panel label's judge counts.
from .runbook import RUN_JUDGES_DDL  # noqa: E402

MIGRATIONS.append([
    RUN_JUDGES_DDL,
    """CREATE TABLE IF NOT EXISTS judge_preferences (run_id VARCHAR, judge VARCHAR, pair_id VARCHAR, p_a DOUBLE,
       chosen VARCHAR, is_tie BOOLEAN, n_principles BIGINT, orders_agree DOUBLE)""",
    "ALTER TABLE preferences ADD COLUMN IF NOT EXISTS n_judges BIGINT",  # judges with a valid label for the pair
    "ALTER TABLE preferences ADD COLUMN IF NOT EXISTS judges_agree BIGINT",  # … on the panel label's side
    # a panel's calibration priors, per judge (one judge: `calibration`, as before)
    """CREATE TABLE IF NOT EXISTS judge_calibration (run_id VARCHAR, judge VARCHAR, principle_id VARCHAR,
       "order" VARCHAR, prior DOUBLE, n BIGINT)""",
])

# issue 25: run prices (engine.price, recorded when a run finishes; not part of the run id) and the
# dedup/decontamination index (factory.dedup: one row per kept input row and hash band, no key)
MIGRATIONS.append([
    """CREATE TABLE IF NOT EXISTS run_prices (run_id VARCHAR, prompt DOUBLE, completion DOUBLE,
       recorded_at TIMESTAMPTZ)""",
    """CREATE TABLE IF NOT EXISTS dedup_index (run_id VARCHAR, band SMALLINT, h BIGINT, source_row BIGINT)""",
])

# -- issue 23 (recipes): step states of `kind: recipe` runs, and the lineage of trained models --------
MIGRATIONS.append([
    """CREATE TABLE IF NOT EXISTS recipe_steps (
        recipe VARCHAR, step VARCHAR, round INTEGER, identity VARCHAR, kind VARCHAR, status VARCHAR,
        inputs_json VARCHAR, output_json VARCHAR, error VARCHAR, started_at TIMESTAMPTZ, finished_at TIMESTAMPTZ,
        seconds DOUBLE, PRIMARY KEY (recipe, step, round, identity))""",
    """CREATE TABLE IF NOT EXISTS models (
        model_id VARCHAR PRIMARY KEY, path VARCHAR, fingerprint VARCHAR, trainer VARCHAR, kind VARCHAR,
        config_hash VARCHAR, base_model VARCHAR, base_path VARCHAR, runs_json VARCHAR, exports_json VARCHAR,
        recipe VARCHAR, step VARCHAR, round INTEGER, created_at TIMESTAMPTZ, record_json VARCHAR)""",
    f"""INSERT INTO migrations SELECT {len(MIGRATIONS) + 1}, now(), 'recipe_steps (recipe step states), models (lineage)'
        WHERE NOT EXISTS (SELECT 1 FROM migrations WHERE note LIKE 'recipe_steps %')""",
])

# The Arrow schema rows of each generated table are written with.
TABLE_SCHEMAS = {**{t: GEN_SCHEMA for t in GEN_TABLES}, "samples": SAMPLE_SCHEMA, "rationales": RATIONALE_SCHEMA,
                 "judgements": JUDGEMENT_SCHEMA, "pairs": PAIR_SCHEMA,
                 "run_pairs": pa.schema([("run_id", pa.string()), ("pair_id", pa.string()), ("source_row", pa.int64())])}

# How run membership is recorded, per table: "links" (producer run_id + run_items links for reused
# rows) or a membership table keyed (run_id, <key>).
MEMBERSHIP = {"pairs": ("run_pairs", "pair_id"), "prompts": ("run_prompts", "prompt_id")}
