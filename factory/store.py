"""The DuckDB store: content keys, bulk Arrow writes, the writer lock (the schema and its migrations:
:mod:`factory.schema`; run bookkeeping SQL: :mod:`factory.runbook`).

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
import re
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import duckdb
import pyarrow as pa

from .runbook import RunBook
# the schema lives in factory.schema; these names stay importable from here
from .schema import (  # noqa: F401
    GEN_COLUMNS, GEN_SCHEMA, GEN_TABLES, SAMPLE_SCHEMA, PAIR_SCHEMA, JUDGEMENT_SCHEMA, PREFERENCE_SCHEMA, RATIONALE_SCHEMA, CHUNK_SCHEMA, ddl, MIGRATIONS, NATURAL_KEYS, TABLE_SCHEMAS, MEMBERSHIP, _DUCK_TYPES,
)

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


def _megabytes(limit: str) -> float:
    """A DuckDB memory setting ("128MB", "1GiB", "512 KB") in MB (10⁶ bytes, as DuckDB reads MB)."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?B)?\s*", limit, re.I)
    if not m:
        raise StoreError(f"FACTORY_DUCKDB_MEMORY={limit!r}: not a memory size; write it as 128MB or 1GB")
    scale = 1024 if m.group(3) and m.group(3).lower() == "ib" else 1000
    return float(m.group(1)) * scale ** ("KMGT".find(m.group(2).upper()) + 1 if m.group(2) else 0) / 1e6


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
        self._cap, self._held_outside = self.config["memory_limit"], {}  # see hold_outside
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

    def hold_outside(self, what: str, mb: float) -> None:
        """Something of the run holds ``mb`` MB outside DuckDB for the rest of the run (a screen's
        held-out index and per-chunk arrays): DuckDB's cap is lowered by as much, now and after every
        reopen, so that the run's whole footprint keeps the same budget. Said again for the same
        ``what``, it replaces the earlier amount."""
        self._held_outside[what] = mb
        cap = max(16.0, _megabytes(self._cap) - sum(self._held_outside.values()))
        self.config = {**self.config, "memory_limit": f"{cap:g}MB"}
        self.con.execute(f"SET memory_limit = '{cap:g}MB'")

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
