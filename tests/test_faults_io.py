"""Fault injection, files and servers: disk full (injected and a real full tmpfs), a read-only database
directory, 429/5xx storms and a server that goes away, truncated and corrupted input files (issue 10).

As in tests/test_faults.py, every case is compared with an uninterrupted run into a separate database
(0 lost, 0 duplicated, same values and labels) and its counts go to the module's fault report.
"""

from __future__ import annotations

import contextlib

import gzip
import json
import random
import subprocess
import threading
import time
from pathlib import Path

import pytest

from factory import prefs
from factory.engines.base import EngineError
from factory.engines.fake import FakeEngine
from factory.runner import Runner
from factory.sources import SourceError
from factory.store import Store

from fakeserver import FakeServer
from runkit import (Reference, child, fake, fault_report, finish, finished_chunks_complete, invoke,  # noqa: F401
                    judgement_counts, pair_records, prefs_yaml, query, record, run_status, wide, write_jsonl)


# -- disk full / read-only -------------------------------------------------------------------------------
def test_disk_full_at_a_write_stops_with_the_path_and_resumes(tmp_path, monkeypatch, wide):
    per_pair = 2
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_records(150))
    ref = Reference.of(tmp_path, pairs, per_pair=per_pair, chunk_inputs=20, chunk_rows=40)
    db = tmp_path / "out.duckdb"
    y = prefs_yaml(tmp_path / "p.yaml", pairs=pairs, db=db, per_pair=per_pair, chunk_inputs=20, chunk_rows=40)
    committed = {"rows": 0, "flushes": 0}
    pending = threading.local()  # per thread: the run's writer thread commits judgements, its own thread pairs
    transaction, insert = Store.transaction, Store.insert

    @contextlib.contextmanager
    def counting_transaction(self):
        pending.n = 0
        with transaction(self):
            yield self
        committed["rows"] += pending.n  # reached only when the transaction committed
        committed["flushes"] += bool(pending.n)

    def full_disk(self, table, rows, schema=None, replace=False, **kw):
        # the last write of a flush's transaction: its judgements are already inserted and must roll back
        if table == "chunks" and committed["flushes"] >= 5:
            raise OSError(28, "No space left on device")
        n = insert(self, table, rows, schema, replace, **kw)
        pending.n = getattr(pending, "n", 0) + (n if table == "judgements" else 0)
        return n

    monkeypatch.setattr(Store, "transaction", counting_transaction)
    monkeypatch.setattr(Store, "insert", full_disk)
    code, out, exc = invoke(["run", y, "--quiet"])
    assert code == 2 and "Traceback" not in out, (code, out, exc)
    assert str(db) in out and "No space left on device" in out and "rerun the same command" in out, out
    monkeypatch.setattr(Store, "insert", insert)
    monkeypatch.setattr(Store, "transaction", transaction)
    status, error = run_status(db)
    assert status == "failed" and "No space left" in error
    n, distinct = judgement_counts(db)
    assert n == distinct == committed["rows"] > 0, (n, distinct, committed)  # no partial transaction
    finished_chunks_complete(db, per_pair)
    code, out, exc = invoke(["run", y, "--quiet"])
    assert code == 0, out
    lost, dup = ref.compare(db)
    record("disk full (injected)", "OSError ENOSPC at the 6th write transaction, then resume", 1, lost, dup)


def test_duckdb_memory_cap_reached_is_a_clear_error_and_resumes(tmp_path, monkeypatch):
    """DuckDB past its memory cap (FACTORY_DUCKDB_MEMORY set far too low for the run) in a child
    `factory run`: exit 2 naming the database and the setting, no traceback, the run marked failed;
    the same command with the default cap resumes it to an uninterrupted run's rows and labels."""
    per_pair = 2
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_records(4000, chars=500))
    ref = Reference.of(tmp_path, pairs, per_pair=per_pair, chunk_inputs=500, chunk_rows=2000)
    db = tmp_path / "out.duckdb"
    y = prefs_yaml(tmp_path / "p.yaml", pairs=pairs, db=db, per_pair=per_pair, chunk_inputs=500, chunk_rows=2000)
    monkeypatch.setenv("FACTORY_DUCKDB_MEMORY", "24MB")
    rc, out, err = finish(child(["run", y, "--quiet"]))
    monkeypatch.delenv("FACTORY_DUCKDB_MEMORY")
    assert rc == 2 and "Traceback" not in err, (rc, err[-3000:])
    message = " ".join(err.split())
    assert str(db) in message and "memory cap (24MB)" in message and "FACTORY_DUCKDB_MEMORY" in message, message
    n, distinct = judgement_counts(db) if db.exists() else (0, 0)
    assert n == distinct, f"{n - distinct} duplicated judgements after the failure"
    rc, out, err = finish(child(["run", y, "--quiet"]))
    assert rc == 0, err[-3000:]
    lost, dup = ref.compare(db)
    assert (lost, dup) == (0, 0)
    record("DuckDB memory cap reached", "FACTORY_DUCKDB_MEMORY=24MB for 4,000 pairs, then resume at the default cap",
           1, lost, dup)


def _mount_tmpfs(path: Path, size: str) -> bool:
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    except OSError:
        return False
    return r.returncode == 0


def _remount(path: Path, opts: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{opts}", str(path)], check=True, capture_output=True)


@pytest.fixture
def small_fs(tmp_path):
    """A 1 MB tmpfs (needs root and permission to mount); skipped only where it cannot be mounted."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if not _mount_tmpfs(mnt, "1M"):
        pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_real_full_filesystem_stops_with_the_path_and_resumes_after_space_is_freed(tmp_path, small_fs, wide):
    per_pair = 2
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_records(600, chars=300))  # ~1.5 MB of WAL: more than fits
    ref = Reference.of(tmp_path, pairs, per_pair=per_pair, chunk_inputs=100, chunk_rows=500)
    db = small_fs / "out.duckdb"
    y = prefs_yaml(tmp_path / "p.yaml", pairs=pairs, db=db, per_pair=per_pair, chunk_inputs=100, chunk_rows=500)
    code, out, exc = invoke(["run", y, "--quiet"])
    assert code == 2 and "Traceback" not in out, (code, out, repr(exc))
    assert str(db) in out and "rerun the same command" in out, out
    n, distinct = judgement_counts(db)  # the database opens and is consistent
    assert n == distinct < len(ref.values)
    finished_chunks_complete(db, per_pair)
    _remount(small_fs, "size=256M")  # space freed
    code, out, exc = invoke(["run", y, "--quiet"])
    assert code == 0, (out, repr(exc))
    lost, dup = ref.compare(db)
    record("disk full (real 1 MB tmpfs)", "database on a full 1 MB tmpfs; then the tmpfs grown to 256 MB", 1, lost, dup)


def test_read_only_database_directory_is_a_clear_error_and_resumes(tmp_path, small_fs, wide, monkeypatch):
    import factory.engines as engines

    _remount(small_fs, "size=256M")
    per_pair = 2
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_records(100))
    ref = Reference.of(tmp_path, pairs, per_pair=per_pair, chunk_inputs=20, chunk_rows=20)
    db = small_fs / "out.duckdb"
    y = prefs_yaml(tmp_path / "p.yaml", pairs=pairs, db=db, per_pair=per_pair, chunk_inputs=20, chunk_rows=20)
    real = engines.make_engine
    monkeypatch.setattr(engines, "make_engine", lambda spec, model: FakeEngine(model=model, die_after=150))
    assert invoke(["run", y, "--quiet"])[0] != 0  # a partial run
    monkeypatch.setattr(engines, "make_engine", real)
    _remount(small_fs, "ro")
    try:
        code, out, exc = invoke(["run", y, "--quiet"])
        assert code == 2 and "Traceback" not in out, (code, out, repr(exc))
        assert str(db) in out or str(small_fs) in out, out
        assert judgement_counts(db) == (150, 150)
    finally:
        _remount(small_fs, "rw")
    code, out, exc = invoke(["run", y, "--quiet"])
    assert code == 0, (out, repr(exc))
    lost, dup = ref.compare(db)
    record("read-only database directory", "tmpfs remounted read-only mid-job, then read-write", 1, lost, dup)


# -- 5xx / 429 storms, a server that goes away ----------------------------------------------------------
def _server_yaml(tmp: Path, pairs: Path, db: Path, url: str, *, retries: int = 8) -> Path:
    return prefs_yaml(tmp / "p.yaml", pairs=pairs, db=db, per_pair=2, chunk_inputs=20, chunk_rows=20,
                      # capabilities given, so no start-up probe meets the storm: every request is a judgement
                      engine=f"{{kind: openai, base_url: {url}, max_retries: {retries}, max_concurrency: 8, timeout_s: 5, "
                             "scoring: token_ids, prefill: true}",
                      extra="model: fake-model")


def _server_reference(tmp: Path, pairs: Path) -> Reference:
    """The uninterrupted run, through a healthy server."""
    d = tmp / "reference"
    d.mkdir()
    with FakeServer(models=("fake-model",)) as healthy:
        return Reference(_server_yaml(d, pairs, d / "ref.duckdb", healthy.url), d / "ref.duckdb")


def test_429_and_5xx_storms_lose_and_duplicate_nothing(tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_records(60))
    ref = _server_reference(tmp_path, pairs)
    db = tmp_path / "out.duckdb"
    with FakeServer(models=("fake-model",), retry_after=0.01) as srv:
        storm = ["429"] * 20 + ["503"] * 10 + ["500"] * 5 + ["429"] * 10
        srv.faults = list(storm)
        # a request can meet up to all 45 faults in a row (8 in flight share the storm): retries enough for that
        s = prefs.run(_server_yaml(tmp_path, pairs, db, srv.url, retries=len(storm)), quiet=True)
        assert s.status == "done"
        assert srv.faults == [] and sum(srv.attempts.values()) == len(ref.values) + len(storm)  # one retry per fault
    assert query(db, "SELECT count(*) FROM judgements WHERE status <> 'ok'")[0][0] == 0
    lost, dup = ref.compare(db)
    record("429/5xx storm", "local server answers 45 requests with 429/503/500 in bursts", len(storm), lost, dup)


def test_server_going_away_fails_the_run_and_resume_completes(tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_records(60))
    ref = _server_reference(tmp_path, pairs)
    db = tmp_path / "out.duckdb"
    srv = FakeServer(models=("fake-model",)).__enter__()
    port = srv.port

    def kill_server():
        deadline = time.monotonic() + 60
        while len(srv.bodies) < 100 and time.monotonic() < deadline:
            time.sleep(0.01)
        srv.stop()

    threading.Thread(target=kill_server, daemon=True).start()
    path = _server_yaml(tmp_path, pairs, db, srv.url, retries=2)
    with pytest.raises(EngineError, match="went away"):
        prefs.run(path, quiet=True)
    status, error = run_status(db)
    assert status == "failed" and "went away" in error, (status, error)
    n, distinct = judgement_counts(db)
    assert n == distinct and query(db, "SELECT count(*) FROM judgements WHERE status <> 'ok'")[0][0] == 0
    with FakeServer(models=("fake-model",), port=port):  # the server is back
        s = prefs.run(path, quiet=True)
    assert s.status == "done"
    lost, dup = ref.compare(db)
    record("server goes away mid-run", "local server shut down after 100 requests, restarted for the resume", 1,
           lost, dup)


# -- truncated and corrupted input files ------------------------------------------------------------------
def _clean_reference(tmp: Path, records: list[dict], per_pair: int = 1) -> Reference:
    return Reference.of(tmp, write_jsonl(tmp / "clean.jsonl", records), per_pair=per_pair, chunk_inputs=16,
                     chunk_rows=64)


def test_jsonl_truncated_mid_line_records_the_line_as_skipped(tmp_path, wide):
    recs = pair_records(50)
    ref = _clean_reference(tmp_path, recs[:49])
    f = write_jsonl(tmp_path / "pairs.jsonl", recs)
    data = f.read_bytes()
    f.write_bytes(data[:len(data) - len(json.dumps(recs[-1])) // 2])  # the last line cut in half
    db = tmp_path / "out.duckdb"
    y = prefs_yaml(tmp_path / "p.yaml", pairs=f, db=db, per_pair=1, chunk_inputs=16, chunk_rows=64)
    code, out, exc = invoke(["run", y, "--quiet"])
    assert code == 0 and "Traceback" not in out, out
    skips = query(db, 'SELECT "row", reason FROM skips')
    assert len(skips) == 1 and skips[0][0] == 50 and "invalid JSON" in skips[0][1], skips
    assert query(db, "SELECT count(*) FROM run_pairs")[0][0] == 49
    lost, dup = ref.compare(db)
    record("JSONL truncated mid-line", "last line cut in half", 1, lost, dup)


def test_garbage_bytes_in_a_jsonl_file_are_recorded_skips_and_nothing_else_is_lost(tmp_path, wide):
    recs = pair_records(120)
    f = write_jsonl(tmp_path / "pairs.jsonl", recs)
    data = f.read_bytes()
    rng = random.Random(3)
    garbage = bytes(rng.randrange(256) for _ in range(2000))
    mid = len(data) // 2
    corrupted = data[:mid] + garbage + data[mid:]
    f.write_bytes(corrupted)
    lines = corrupted.split(b"\n")
    intact = [json.loads(x) for x in lines if _parses(x)]
    nonblank = [x for x in lines if x.strip()]
    ref = _clean_reference(tmp_path, intact)
    db = tmp_path / "out.duckdb"
    y = prefs_yaml(tmp_path / "p.yaml", pairs=f, db=db, per_pair=1, chunk_inputs=16, chunk_rows=64)
    code, out, exc = invoke(["run", y, "--quiet"])
    assert code == 0 and "Traceback" not in out, out
    n_pairs = query(db, "SELECT count(*) FROM run_pairs")[0][0]
    n_skips = query(db, "SELECT count(*) FROM skips")[0][0]
    assert n_pairs == len(intact) and n_pairs + n_skips == len(nonblank), (n_pairs, n_skips, len(nonblank))
    assert all(r for (r,) in query(db, "SELECT reason FROM skips"))
    lost, dup = ref.compare(db)
    record("garbage bytes inside a JSONL file", "2,000 random bytes inserted mid-file", n_skips, lost, dup)


def _parses(line: bytes) -> bool:
    try:
        obj = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return False
    return isinstance(obj, dict) and {"prompt", "response_a", "response_b"} <= obj.keys()


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_gzip_is_a_source_error_naming_the_file(tmp_path, wide, damage):
    f = tmp_path / "pairs.jsonl.gz"
    with gzip.open(f, "wt") as g:
        for r in pair_records(400):
            g.write(json.dumps(r) + "\n")
    data = f.read_bytes()
    if damage == "truncated":
        f.write_bytes(data[:len(data) * 2 // 3])
    else:
        mid = len(data) // 2
        f.write_bytes(data[:mid] + bytes(random.Random(4).randrange(256) for _ in range(64)) + data[mid + 64:])
    db = tmp_path / "out.duckdb"
    y = prefs_yaml(tmp_path / "p.yaml", pairs=f, db=db, per_pair=1, chunk_inputs=50, chunk_rows=100)
    with pytest.raises(SourceError, match="pairs.jsonl.gz"):
        prefs.run(y, engine=fake(), quiet=True)
    code, out, exc = invoke(["run", y, "--quiet"])
    assert code == 2 and "Traceback" not in out and str(f) in out, (code, out, repr(exc))
    assert "engine failed" not in out, out  # a damaged input file is not an engine failure
    n, distinct = judgement_counts(db)
    record(f"gzip file {damage}", "last third cut off" if damage == "truncated" else "64 bytes overwritten mid-file",
           1, 0, n - distinct)


def test_truncated_parquet_is_a_source_error_naming_the_file(tmp_path, wide):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(pair_records(300)), f, row_group_size=50)
    data = f.read_bytes()
    f.write_bytes(data[:len(data) // 2])
    db = tmp_path / "out.duckdb"
    y = prefs_yaml(tmp_path / "p.yaml", pairs=f, db=db, per_pair=1, chunk_inputs=50, chunk_rows=100)
    with pytest.raises(SourceError, match="pairs.parquet"):
        prefs.run(y, engine=fake(), quiet=True)
    code, out, exc = invoke(["run", y, "--quiet"])
    assert code == 2 and "Traceback" not in out and str(f) in out, (code, out, repr(exc))
    record("parquet file truncated", "second half of the file cut off", 1, 0, 0)
