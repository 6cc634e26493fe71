"""The DuckDB store: schema, migrations, content keys, bulk Arrow writes, the writer lock.

Every result row is keyed by a content hash of everything that determined it, so resuming a run is
"skip the keys already stored" and editing one principle changes only the keys that depend on it.
Rows are written in chunks (one transaction each) as the engine returns them. Only one process
writes a database: a sidecar ``<db>.lock`` holds an OS lock plus the owning run id, and a second
writer gets "database is in use by run X" instead of DuckDB's low-level lock error.

Which rows belong to a run (:meth:`Store.run_rows`, the one place that says it): a generated row
belongs to the run that produced it (its ``run_id``) and to every later run that reused it (one
``run_items`` link per reused row, so a fresh run writes no links); a pair belongs to the runs
that listed it in ``run_pairs``; a prompt to those in ``run_prompts``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import duckdb
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
        # keys deduplicated in flight) and labelling checks it (labels.check_unique).
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
from .runbook import RUN_JUDGES_DDL, RunBook  # noqa: E402

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


# DuckDB's own cap on its memory (past it, it spills to a temporary folder beside the database).
# A run (`factory run`, Store(run_memory=True)) streams: it never needs much of DuckDB at once
# (chunks of rows, labels made in parts), and whatever the cap allows, DuckDB's buffer cache fills
# up to it, so a low cap keeps that part of a run's peak the same at 100k and 1M pairs (what DuckDB
# allocates outside its cap is given back by Store.reopen; bench/bench_scale.py, README "Streaming
# runs at scale"). Exports, audits and the review app read whole runs through DuckDB at once and get
# more. FACTORY_DUCKDB_MEMORY, when set, is the cap for both. A checkpoint every 64 MB of
# log instead of 16 MB: fewer checkpoints for a long run to wait on, while what is held until the
# next one stays small; a killed run's log replays in a second or two.
MEMORY_LIMIT = os.environ.get("FACTORY_DUCKDB_MEMORY", "512MB")
RUN_MEMORY_LIMIT = os.environ.get("FACTORY_DUCKDB_MEMORY", "128MB")
DUCKDB_CONFIG = {"memory_limit": MEMORY_LIMIT, "checkpoint_threshold": "64MB",
                 # whole-run SQL (labels, audits) may reorder rows it reads; every query that needs an
                 # order says ORDER BY: less to hold in memory
                 "preserve_insertion_order": False}


class StoreError(Exception):
    """A user-facing store problem (database in use, newer schema, …)."""


class DamagedError(StoreError):
    """A database file that DuckDB cannot read: named as damaged, with what to do."""


HEADER_BYTES = 3 * 4096  # DuckDB's file header and its two database headers, before the first block
_DAMAGE = ("corrupt", "checksum", "could not read enough bytes", "not a valid duckdb", "serialization",
           "failed to read", "invalid block", "metadata")


def damaged_error(path: str | Path, e: BaseException | str) -> DamagedError:
    detail = e if isinstance(e, str) else (str(e).splitlines()[0][:300] if str(e) else type(e).__name__)
    return DamagedError(f"{path}: the database is damaged and cannot be read ({detail}); nothing was changed. "
                        f"`factory db check {path}` lists what still reads; restore it from a backup (`factory db "
                        "backup` makes one), or move it aside and rerun the pipelines to rebuild it from their inputs")


def as_damage(e: BaseException, path: str | Path | None) -> DamagedError | None:
    """A DuckDB error met while reading (after the file opened) that means the file is damaged."""
    if isinstance(e, DamagedError):
        return e
    if not isinstance(e, duckdb.Error) or isinstance(e, (duckdb.CatalogException, duckdb.BinderException,
                                                         duckdb.ParserException)):
        return None
    text = str(e).lower()
    if any(w in text for w in _DAMAGE):
        return damaged_error(path or "the database", e)
    return None


def content_key(*parts: Any) -> str:
    """sha256 of the canonical JSON of ``parts`` (first 24 hex chars)."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def now() -> datetime:
    return datetime.now(timezone.utc)


class Store(RunBook):
    """One DuckDB file. ``Store(path, writer_run=...)`` takes the writer lock; read-only otherwise."""

    def __init__(self, path: str | Path, *, writer_run: str | None = None, read_only: bool = False,
                 run_memory: bool = False):
        self.path = Path(path)
        self.config = {**DUCKDB_CONFIG, **({"memory_limit": RUN_MEMORY_LIMIT} if run_memory else {})}
        self._lock_fd: int | None = None
        self._keyed: dict[str, bool] = {}
        self._read_only, self._counted = read_only, False  # _counted: a view still counted in _cursors
        self._cursors = [0]  # connections of this store open beside `con` (views, readers' cursors): shared with views
        if self.path.is_dir():
            raise StoreError(f"{self.path}: is a folder, not a database file; point `db:` (or --db) at a file "
                             f"such as {self.path / 'factory.duckdb'}")
        if writer_run is not None or not read_only:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StoreError(f"{self.path}: cannot create the folder {self.path.parent} ({e.strerror or e}); "
                                 "choose a `db:` path in a folder you can write") from None
        if writer_run is not None:
            self._take_lock(writer_run)
        if read_only and not self.path.exists():
            raise StoreError(f"{self.path}: no such database; run a pipeline first (`factory run …`)")
        try:
            self.con = self._connect()
            self._check_size()
        except (duckdb.Error, StoreError) as e:
            self._release_lock()  # a refused open must not keep the writer lock for the rest of the process
            if isinstance(e, StoreError):
                raise
            raise self._open_error(e) from None
        if not read_only:
            self.migrate()

    def _open_error(self, e: duckdb.Error) -> BaseException:
        """Why the database did not open, as three different things: in use, unwritable, damaged."""
        text = str(e).lower()
        first = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        if "could not set lock" in text or "conflicting lock" in text:
            return StoreError(f"{self.path}: database is in use by {self._holder()}; wait for it to finish")
        if _is_io_error(e):
            return StoreError(f"{self.path}: cannot open the database ({first}); check that {self.path.parent} "
                              "is writable and has free space")
        if "version" in text and ("newer" in text or "older" in text or "storage" in text):
            return StoreError(f"{self.path}: written by another DuckDB version ({first}); open it with that "
                              "version, or export and re-import it")
        if "different configuration" in text:  # this process has it open already: a bug, not the file
            return e
        return damaged_error(self.path, e)

    def _check_size(self) -> None:
        """A file cut short (a copy interrupted, a full disk) still opens: DuckDB reads blocks only when a
        query needs them. Its header says how many blocks it has; a shorter file is damaged."""
        if not self.path.exists():
            return
        row = self.con.execute("SELECT block_size, used_blocks FROM pragma_database_size() "
                               "WHERE database_name = current_database()").fetchall()
        if row:  # used blocks need at least that many blocks of file (free ones at the end may be cut off)
            block, blocks = row[0]
            need = HEADER_BYTES + int(block) * int(blocks)
            have = self.path.stat().st_size
            if have < need:
                self.con.close()
                raise damaged_error(self.path, f"the file holds {have} bytes where the blocks its header counts need "
                                               f"{need}: it was cut short")

    # -- locking -------------------------------------------------------------------------------
    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    def _holder(self) -> str:
        try:
            info = json.loads(self.lock_path.read_text())
            return f"run {info['run_id']} (pid {info['pid']})"
        except (OSError, ValueError, KeyError):
            return "another process"

    def _take_lock(self, run_id: str) -> None:
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StoreError(f"{self.path}: cannot create the lock file {self.lock_path.name} in {self.path.parent} "
                             f"({e.strerror or e}); make the folder writable or choose another `db:`") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreError(f"{self.path}: database is in use by {self._holder()}; wait for it or use another `db:`") from None
        holder = self._holder() if os.fstat(fd).st_size else None  # a clean release empties the file
        if holder:  # its process died holding it (the OS freed the lock): say so once and go on
            sys.stderr.write(f"notice: {self.path}: took over the lock left by {holder}, which ended without "
                             "releasing it; everything it committed is kept\n")
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"run_id": run_id, "pid": os.getpid()}).encode())
        self._lock_fd = fd  # released by the OS when the process dies, even on kill -9

    def view(self) -> "Store":
        """The same database through a connection of its own (``con.cursor()``), for another thread
        of this process (the run's writer thread): it shares the lock, and closing it frees neither."""
        other = object.__new__(Store)
        other.path, other._lock_fd, other._keyed, other.config = self.path, None, dict(self._keyed), self.config
        other._read_only, other._cursors, other._counted = self._read_only, self._cursors, True
        other.con = self.con.cursor()
        self._cursors[0] += 1
        return other

    @contextlib.contextmanager
    def cursor(self):
        """A connection of its own for a long read (an input read while the run writes); while it is
        open, :meth:`reopen` leaves the database open."""
        cur = self.con.cursor()
        self._cursors[0] += 1
        try:
            yield cur
        finally:
            self._cursors[0] -= 1
            cur.close()

    def reopen(self) -> bool:
        """Close the database and open it again with the same settings, when no other connection of
        this store is open (False otherwise). DuckDB keeps a little memory for every temporary buffer
        a query ever used (about 60 bytes each, held by its buffer manager's eviction queues) until the
        database closes: a 1M-pair run's per-chunk joins and sorts made that ~36 MB, so a run reopens
        its database every few dozen input chunks (runner.REOPEN_CHUNKS). The writer lock is
        a file lock of this process and stays held; closing checkpoints."""
        if self._cursors[0]:
            return False
        try:
            self.con.close()
            self.con = self._connect()
        except duckdb.Error as e:  # closing checkpoints: a full disk says so as any other write does
            raise self._write_error(e) from e
        return True

    def _connect(self) -> duckdb.DuckDBPyConnection:
        return duckdb.connect(str(self.path), read_only=self._read_only, config=self.config)

    def relabel_lock(self, run_id: str) -> None:
        """Name another run as the lock's holder (the run id is final once the engine is known)."""
        if self._lock_fd is not None:
            os.ftruncate(self._lock_fd, 0)
            os.pwrite(self._lock_fd, json.dumps({"run_id": run_id, "pid": os.getpid()}).encode(), 0)

    def close(self) -> None:
        if self._counted:
            self._cursors[0] -= 1
            self._counted = False
        self.con.close()
        self._release_lock()

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.ftruncate(self._lock_fd, 0)  # empty: the next writer knows this one ended cleanly
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- schema --------------------------------------------------------------------------------
    def schema_version(self) -> int:
        try:
            row = self.one("SELECT value FROM meta WHERE key = 'schema_version'")
        except duckdb.CatalogException:
            return 0
        return int(row[0]) if row else 0

    def migrate(self) -> None:
        current = self.schema_version()
        if current > len(MIGRATIONS):
            raise StoreError(f"{self.path}: schema v{current} is newer than this factory (v{len(MIGRATIONS)}); upgrade")
        for version in range(current + 1, len(MIGRATIONS) + 1):
            with self.transaction():
                for stmt in MIGRATIONS[version - 1]:
                    self.con.execute(stmt)
                self.con.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", [str(version)])

    @contextlib.contextmanager
    def transaction(self):
        """One transaction; a write that fails for lack of space or permission is a StoreError naming
        the path (DuckDB rolls the transaction back, so the database stays as it was)."""
        self.con.execute("BEGIN")
        try:
            yield self
            self.con.execute("COMMIT")
        except BaseException as e:
            try:
                self.con.execute("ROLLBACK")
            except duckdb.Error:
                pass
            err = self._write_error(e)
            if err is e:
                raise
            raise err from e

    def _write_error(self, e: BaseException) -> BaseException:
        """A StoreError saying what to do for a write that failed for lack of space, permission or
        memory (``e`` itself otherwise)."""
        if _is_io_error(e):
            return StoreError(f"{self.path}: cannot write to the database ({str(e).splitlines()[0][:300]}); free "
                              f"space on {self.path.parent} or make it writable, then rerun the same command: "
                              "everything committed so far is intact and the run resumes where it stopped")
        if _is_memory_error(e):
            return StoreError(f"{self.path}: DuckDB reached its memory cap ({self.config['memory_limit']}) while "
                              f"writing ({str(e).splitlines()[0][:200]}); rerun the same command with a larger cap, "
                              "e.g. FACTORY_DUCKDB_MEMORY=1GB: everything committed so far is intact and the run "
                              "resumes where it stopped")
        return e

    # -- writes --------------------------------------------------------------------------------
    def insert(self, table: str, rows: pa.Table | list[dict], schema: pa.Schema | None = None,
               replace: bool = False, known_new: bool = False) -> int:
        """Bulk insert from Arrow (one statement); rows whose key exists are left untouched, or
        replaced with ``replace=True`` (retrying failed rows). Returns the rows written. A table
        without a primary key (judgements) takes the rows as they are: its callers only insert
        keys they found missing. ``known_new``: the caller knows no stored row has these keys (a
        filter of stored keys said so; the judge service): a plain INSERT, without the key lookup."""
        if isinstance(rows, list):
            if not rows:
                return 0
            rows = pa.Table.from_pylist(rows, schema=schema)
        if rows.num_rows == 0:
            return 0
        self.con.register("_incoming", rows)
        try:
            cols = ", ".join(f'"{c}"' for c in rows.column_names)
            if table in NATURAL_KEYS and not known_new:
                return self._insert_keyed(table, cols, NATURAL_KEYS[table], replace)
            if not self._has_key(table):
                if replace:
                    self.con.execute(f"DELETE FROM {table} WHERE id IN (SELECT id FROM _incoming)")
                return self.con.execute(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM _incoming").fetchall()[0][0]
            verb = "INSERT OR REPLACE" if replace else "INSERT OR IGNORE"
            return self.con.execute(f"{verb} INTO {table} ({cols}) SELECT {cols} FROM _incoming").fetchall()[0][0]
        except duckdb.Error as e:
            raise self._write_error(e) from e
        finally:
            try:
                self.con.unregister("_incoming")
            except duckdb.Error:  # the failed statement aborted the transaction; its rollback drops the view
                pass

    def _insert_keyed(self, table: str, cols: str, keys: tuple[str, ...], replace: bool) -> int:
        """INSERT OR IGNORE (or REPLACE) by the table's natural key, for a table without a primary key.
        The stored keys among the incoming ones are found first: a semi-join with the batch as its hash
        table, so each batch costs one scan of the table's key columns (about 20 ms per 10,000 rows
        against 1M stored pairs) and never a hash table of the whole table, and a per-run table's scan
        skips other runs' row groups by their min/max run_id. Then the batch, each key once, minus
        those."""
        match = " AND ".join(f't."{k}" = i."{k}"' for k in keys)
        if replace:
            self.con.execute(f"DELETE FROM {table} t WHERE EXISTS (SELECT 1 FROM _incoming i WHERE {match})")
            stored = None
        else:
            stored = self.con.sql(f"SELECT {', '.join(f't.{k}' for k in keys)} FROM {table} t "
                                  f"SEMI JOIN _incoming i ON {match}").to_arrow_table()
        first = f"SELECT * FROM _incoming QUALIFY row_number() OVER (PARTITION BY {', '.join(keys)}) = 1"
        if not stored:
            return self.con.execute(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM ({first})").fetchall()[0][0]
        self.con.register("_stored", stored)
        try:
            return self.con.execute(f"""INSERT INTO {table} ({cols}) SELECT {cols} FROM ({first}) i
                                        ANTI JOIN _stored t ON {match}""").fetchall()[0][0]
        finally:
            self.con.unregister("_stored")

    def _has_key(self, table: str) -> bool:
        if table not in self._keyed:
            self._keyed[table] = bool(self.con.execute(
                "SELECT count(*) FROM duckdb_constraints() WHERE table_name = ? AND constraint_type = 'PRIMARY KEY'",
                [table]).fetchall()[0][0])
        return self._keyed[table]

    def put_config(self, kind: str, body: Any, key: str | None = None) -> str:
        """Store a lineage blob (sampling params, template source, constitution) by its hash."""
        key = key or content_key(kind, body)
        self.con.execute(
            "INSERT OR IGNORE INTO configs VALUES (?, ?, ?)", [key, kind, json.dumps(body, sort_keys=True, default=str)]
        )
        return key

    def record_skips(self, run_id: str, stage: str, skips: Iterable[Any]) -> int:
        rows = [
            {"run_id": run_id, "stage": stage, "source": s.source, "row": s.row, "reason": s.reason, "created_at": now()}
            for s in skips
        ]
        schema = pa.schema(
            [("run_id", pa.string()), ("stage", pa.string()), ("source", pa.string()), ("row", pa.int64()),
             ("reason", pa.string()), ("created_at", pa.timestamp("us", tz="UTC"))]
        )
        return self.insert("skips", rows, schema)

    def link_run(self, run_id: str, table: str, keys: list[str]) -> None:
        """Record that ``run_id`` uses rows it did not produce (membership of reused rows)."""
        if not keys:
            return
        rows = pa.table({"run_id": [run_id] * len(keys), "table": [table] * len(keys), "id": keys},
                        schema=pa.schema([("run_id", pa.string()), ("table", pa.string()), ("id", pa.string())]))
        self.insert("run_items", rows)

    def run_rows(self, table: str, run: str = "$run") -> str:
        """SQL for the rows of ``table`` that belong to the run bound to ``run`` (a parameter name like
        ``$run``, or ``?``/a quoted literal): the one definition of run membership (module docstring)."""
        if table in MEMBERSHIP:
            member, key = MEMBERSHIP[table]
            return f"(SELECT t.* FROM {table} t SEMI JOIN {member} m ON m.{key} = t.{key} AND m.run_id = {run})"
        return (f"""(SELECT t.* FROM {table} t WHERE t.run_id = {run} UNION ALL
                     SELECT t.* FROM {table} t SEMI JOIN run_items i ON i.id = t.id AND i."table" = '{table}'
                     AND i.run_id = {run} WHERE t.run_id IS DISTINCT FROM {run})""")

    def run_tables(self, run_id: str) -> list[str]:
        """The tables holding rows of ``run_id`` (generated, linked, pairs and prompts)."""
        out = []
        for t in ("prompts", "pairs", "responses", "critiques", "revisions", "samples", "rationales", "judgements"):
            if self.one(f"SELECT 1 FROM {self.run_rows(t, '?')} LIMIT 1", [run_id] * (1 if t in MEMBERSHIP else 3)):
                out.append(t)
        return out

    # -- reads ---------------------------------------------------------------------------------
    def count(self, table: str, where: str = "", params: list | None = None) -> int:
        sql = f"SELECT count(*) FROM {table}" + (f" WHERE {where}" if where else "")
        return self.one(sql, params)[0]

    def one(self, sql: str, params: list | None = None) -> tuple | None:
        """The first row of a query (fetched whole: DuckDB 2 refuses new work while a result is open)."""
        rows = self.con.execute(sql, params or []).fetchall()
        return rows[0] if rows else None

    def existing(self, table: str, keys: list[str], key: str = "id") -> set[str]:
        if not keys:
            return set()
        return set(self.fetch(table, keys, f"t.{key}", key).column(0).to_pylist())

    def fetch(self, table: str, keys: list[str], columns: str = "*", key: str = "id", where: str = "") -> pa.Table:
        """Rows of ``table`` whose ``key`` is in ``keys`` (joined through Arrow, not a SQL IN list)."""
        probe = pa.table({"k": pa.array(keys, pa.string())})
        self.con.register("_probe", probe)
        try:
            return self.con.sql(f"SELECT {columns} FROM {table} t JOIN _probe p ON t.{key} = p.k"
                                + (f" WHERE {where}" if where else "")).to_arrow_table()
        finally:
            self.con.unregister("_probe")

    def probe(self, table: str, keys: list[str], columns: str, where: str = "") -> dict[str, tuple]:
        """``key -> (columns...)`` for the keys stored in ``table``: one scan for a whole batch
        (``where`` narrows the scan, e.g. to one run's chunks, which zone maps then skip to)."""
        if not keys:
            return {}
        got = self.fetch(table, keys, f"t.id, {columns}", where=where)
        cols = [c.to_pylist() for c in got.columns]
        return {k: tuple(c[i] for c in cols[1:]) for i, k in enumerate(cols[0])}

    def arrow(self, sql: str, params: list | None = None) -> pa.Table:
        if params:
            return self.con.execute(sql, params).to_arrow_table()
        return self.con.sql(sql).to_arrow_table()


def _is_io_error(e: BaseException) -> bool:
    """A write that failed for lack of space or permission (DuckDB wraps the OS error)."""
    if isinstance(e, OSError):
        return True
    text = str(e).lower()
    return isinstance(e, duckdb.Error) and any(
        s in text for s in ("no space left", "read-only file system", "permission denied", "disk full",
                            "could not write", "cannot open file"))


def _is_memory_error(e: BaseException) -> bool:
    """DuckDB could not stay within its memory cap (a commit's checkpoint or a query that could not spill)."""
    text = str(e).lower()
    return isinstance(e, (duckdb.OutOfMemoryException, MemoryError)) or (
        isinstance(e, duckdb.Error) and any(m in text for m in ("failed to pin block", "out of memory",
                                                                 "could not allocate block")))
