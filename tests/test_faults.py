"""Fault injection: kill -9, engine failures and death, graceful stop, disk full and read-only, 5xx/429
storms and a server that goes away, truncated and corrupted inputs (issue 10).

Every case resumes after the fault and compares with an uninterrupted run of the same pipeline into a
separate database: 0 judgements lost, 0 duplicated, the same judgement values and the same final labels
(p_a and chosen per pair). The counts per case (faults injected, rows lost, rows duplicated) are printed
at the end of the module (run with ``-s``) and appended as JSON lines to ``$FACTORY_FAULT_REPORT`` when
it is set; the README's Reliability section shows them.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from factory import cli, prefs
from factory.engines.base import Completion, EngineError
from factory.engines.fake import FakeEngine
from factory.runner import EngineFailed, Runner
from factory.sources import SourceError
from factory.store import Store, StoreError

from fakeserver import FakeServer
from runkit import (ANNOUNCE_COMMITS, child, finish, judgement_counts, judgement_values, kill9, labels, pair_records,
                    prefs_yaml, query, run_status, same_labels, slow_fake, wait_line, write_jsonl)

RESULTS: list[dict] = []


@pytest.fixture(scope="module", autouse=True)
def fault_report():
    """Print the per-case counts after the module (and append them to $FACTORY_FAULT_REPORT)."""
    yield
    if not RESULTS:
        return
    lines = [f"{'fault':<44} {'how injected':<58} {'times':>5} {'lost':>5} {'dup':>5}"]
    lines += [f"{r['fault']:<44} {r['how']:<58} {r['times']:>5} {r['lost']:>5} {r['duplicated']:>5}" for r in RESULTS]
    print("\nfault-injection results\n" + "\n".join(lines))
    out = os.environ.get("FACTORY_FAULT_REPORT")
    if out:
        with open(out, "a") as f:
            for r in RESULTS:
                f.write(json.dumps(r) + "\n")


def record(fault: str, how: str, times: int, lost: int, duplicated: int) -> None:
    RESULTS.append({"fault": fault, "how": how, "times": times, "lost": lost, "duplicated": duplicated})


def fake(**kw) -> FakeEngine:
    return FakeEngine(model="smollm2-135m", **kw)


@pytest.fixture
def wide(monkeypatch):
    """The CLI's consoles wide enough that paths and messages are not wrapped in captured output."""
    monkeypatch.setattr(cli.console, "width", 1000)
    monkeypatch.setattr(cli.err, "width", 1000)


def invoke(args: list[str]):
    r = CliRunner().invoke(cli.app, [str(a) for a in args])
    return r.exit_code, r.output, r.exception


class Reference:
    """An uninterrupted run of a pipeline into its own database: what every faulted run must equal."""

    def __init__(self, path: Path, db: Path, engine=None):
        prefs.run(path, engine=engine, quiet=True)  # engine None: the pipeline's own (a server, say)
        self.db, self.values, self.labels = db, judgement_values(db), labels(db)
        assert self.values and self.labels

    @classmethod
    def of(cls, tmp: Path, pairs: Path, *, per_pair: int, **kw) -> "Reference":
        """The same file pairs on the fake engine, in ``tmp/reference/``."""
        d = tmp / "reference"
        d.mkdir()
        db = d / "ref.duckdb"
        return cls(prefs_yaml(d / "ref.yaml", pairs=pairs, db=db, per_pair=per_pair, **kw), db, fake())

    def compare(self, db: Path) -> tuple[int, int]:
        """(lost, duplicated) judgements of ``db``; asserts values and labels equal the reference's."""
        n, distinct = judgement_counts(db)
        got = judgement_values(db)
        lost, dup = len(self.values.keys() - got.keys()), n - distinct
        assert not got.keys() - self.values.keys(), "rows the uninterrupted run does not have"
        changed = [k for k in self.values.keys() & got.keys() if got[k] != self.values[k]]
        assert not changed, f"{len(changed)} judgements differ from the uninterrupted run, e.g. {got[changed[0]]}"
        bad = same_labels(labels(db), self.labels)
        assert not bad, f"{len(bad)} labels differ from the uninterrupted run"
        return lost, dup


def finished_chunks_complete(db: Path, per_pair: int) -> None:
    """Every input chunk recorded as finished has all its judgements stored (no partial chunk)."""
    for meta, in query(db, "SELECT meta_json FROM chunks"):
        m = json.loads(meta)
        want, got = query(db, """SELECT count(DISTINCT p.pair_id) * ?, count(j.id) FROM run_pairs p
                                 LEFT JOIN judgements j ON j.pair_id = p.pair_id
                                 WHERE p.source_row BETWEEN ? AND ?""", [2 * per_pair, m["first"], m["last"]])[0]
        assert got == want, f"chunk at lines {m['first']}-{m['last']} is recorded as finished with {got}/{want} judgements"


# -- kill -9 ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_kill_9_at_random_points_twenty_times_then_resume(tmp_path):
    """2,500 pairs × 4 principles × 2 orders = 20,000 judgements, killed 20 times at seeded random points,
    then resumed. A kill comes either at a random moment of the restart (0–1.5 s after the child is ready,
    before or after its first commit) or a random 0–0.4 s after the restart's 1st, 2nd or 3rd committed
    transaction (so it also lands inside later transactions); the fake engine takes 0.3 ms a request so
    the run outlasts the kills. After every kill: no duplicates, every judgement committed before it still
    there, and new rows wherever the child had announced a commit; each restart commits within 10 s."""
    n_pairs, per_pair = 2_500, 4
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_records(n_pairs))
    ref = Reference.of(tmp_path, pairs, per_pair=per_pair, chunk_inputs=100, chunk_rows=250)
    db = tmp_path / "out.duckdb"
    y = prefs_yaml(tmp_path / "p.yaml", pairs=pairs, db=db, per_pair=per_pair, chunk_inputs=100, chunk_rows=250)
    rng = random.Random(20_000)
    counts, latencies, stored = [], [], set()
    for i in range(20):
        commits = rng.choice([0, 1, 1, 2, 2, 3])
        proc = child(["run", y, "--quiet"], prelude=ANNOUNCE_COMMITS + slow_fake(0.0003))
        wait_line(proc, "READY")
        t0 = time.monotonic()
        if commits == 0:
            time.sleep(rng.uniform(0.0, 1.5))
        else:
            for k in range(commits):
                wait_line(proc, "COMMIT")
                if k == 0:
                    latencies.append(time.monotonic() - t0)
            time.sleep(rng.uniform(0.0, 0.4))
        rc = kill9(proc)
        assert rc == -signal.SIGKILL, f"kill {i + 1}: the run ended by itself (rc {rc}) before it was killed"
        n, distinct = judgement_counts(db)
        assert n == distinct, f"kill {i + 1}: {n - distinct} duplicated judgements"
        now = set(judgement_values(db)) if n else set()
        assert stored <= now, f"kill {i + 1}: {len(stored - now)} committed judgements lost"
        if commits:
            assert len(now) > len(stored), f"kill {i + 1}: the child announced a commit, yet no new rows are stored"
        stored = now
        counts.append(n)
    print(f"committed judgements after each kill: {counts}; restart to first commit: "
          f"{', '.join(f'{x:.1f}' for x in latencies)} s")
    assert counts[-1] < n_pairs * per_pair * 2, "the run was finished before the last kill"
    assert max(latencies) <= 10, f"a restart took {max(latencies):.1f} s to commit its first rows"
    assert sum(b > a for a, b in zip([0, *counts], counts)) >= 12, f"most restarts made no progress: {counts}"
    rc, out, err = finish(child(["run", y, "--quiet"]))
    assert rc == 0, err
    lost, dup = ref.compare(db)
    assert (lost, dup) == (0, 0)
    record("kill -9 (20,000 judgements)", "SIGKILL 20× at seeded random points, then resume", 20, lost, dup)


# -- engine failures and engine death -------------------------------------------------------------------
class Flaky(FakeEngine):
    """A fake engine failing a seeded random share of requests (a failed completion with its reason) and,
    with ``die_after``, dying (raising) after that many completions."""

    def __init__(self, p_fail: float, seed: int, die_after: int | None = None):
        super().__init__(model="smollm2-135m", die_after=die_after)
        self.rng, self.p_fail, self.failed = random.Random(seed), p_fail, 0

    def _one(self, req):
        if self.rng.random() < self.p_fail:
            self.failed += 1
            return Completion(key=req.key, status="failed", error="injected engine error")
        return super()._one(req)


def test_engine_errors_and_deaths_at_random_requests_then_resume_and_retry(tmp_path):
    per_pair = 2
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_records(150))
    ref = Reference.of(tmp_path, pairs, per_pair=per_pair, chunk_inputs=20, chunk_rows=25)
    db = tmp_path / "out.duckdb"
    y = prefs_yaml(tmp_path / "p.yaml", pairs=pairs, db=db, per_pair=per_pair, chunk_inputs=20, chunk_rows=25)
    rng = random.Random(10)
    deaths, failed, before = 0, 0, 0
    for i in range(4):
        eng = Flaky(0.05, seed=i, die_after=rng.randrange(20, 120))
        with pytest.raises(EngineFailed, match="rerun the same command"):
            prefs.run(y, engine=eng, quiet=True)
        deaths += 1
        failed += eng.failed
        status, error = run_status(db)
        assert status == "failed" and "died after" in error, (status, error)
        n, distinct = judgement_counts(db)
        # every completion that came back before the death is stored, ok or failed with its reason
        assert n == distinct == before + eng.die_after, (n, distinct, before, eng.die_after)
        assert query(db, "SELECT count(*) FROM judgements WHERE status <> 'ok' AND error IS NULL")[0][0] == 0
        before = n
    eng = Flaky(0.05, seed=99)
    s = prefs.run(y, engine=eng, quiet=True)
    failed += eng.failed
    assert s.status == "done" and run_status(db) == ("done", None)
    n_failed = query(db, "SELECT count(*) FROM judgements WHERE status = 'failed'")[0][0]
    assert n_failed == failed and s.failures == {"judgements failed: injected engine error": n_failed}
    n, distinct = judgement_counts(db)
    assert n == distinct == len(ref.values)
    eng = fake()
    prefs.run(y, engine=eng, quiet=True, retry_failed=True)
    assert eng.requests == n_failed, f"--retry-failed sent {eng.requests} requests for {n_failed} failed rows"
    lost, dup = ref.compare(db)
    record("engine errors at random requests", "5% of requests fail (seeded), then --retry-failed", n_failed, lost, dup)
    record("engine death mid-run", "fake engine raises after 20–120 completions, 4×", deaths, lost, dup)


def test_engine_death_through_the_cli_says_how_to_resume(tmp_path, monkeypatch, wide):
    import factory.engines as engines

    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_records(60))
    ref = Reference.of(tmp_path, pairs, per_pair=2, chunk_inputs=10, chunk_rows=10)
    db = tmp_path / "out.duckdb"
    y = prefs_yaml(tmp_path / "p.yaml", pairs=pairs, db=db, per_pair=2, chunk_inputs=10, chunk_rows=10)
    real = engines.make_engine
    monkeypatch.setattr(engines, "make_engine", lambda spec, model: FakeEngine(model=model, die_after=37))
    code, out, exc = invoke(["run", y, "--quiet"])
    assert code != 0 and "Traceback" not in out, out
    flat = " ".join(out.split())
    assert "died after 37" in flat and f"rerun the same command" in flat, out
    assert run_status(db)[0] == "failed" and "died after 37" in run_status(db)[1]
    assert judgement_counts(db) == (37, 37)
    monkeypatch.setattr(engines, "make_engine", real)
    code, out, exc = invoke(["run", y, "--quiet"])
    assert code == 0, out
    lost, dup = ref.compare(db)
    assert run_status(db) == ("done", None)
    record("engine death, CLI", "engine raises after 37 completions; `factory run` again", 1, lost, dup)


# -- graceful stop ---------------------------------------------------------------------------------------
COUNT_COMPLETIONS = """
import atexit as _ax
import factory.runner as _RC
_n = [0]
_complete = _RC.Runner._complete
def _counted(self, c):
    _complete(self, c)
    _n[0] += 1
_RC.Runner._complete = _counted
_ax.register(lambda: print(f"COMPLETED {_n[0]}", flush=True))
"""
SLOW_FINAL_WRITE = """
import time as _ts
import factory.runner as _RS
_fl = _RS.Runner._flush
def _slow_final(self):
    if self._stop:
        print("FINAL_WRITE", flush=True)
        _ts.sleep(5)
    _fl(self)
_RS.Runner._flush = _slow_final
"""


@pytest.fixture
def stop_case(tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_records(400))
    ref = Reference.of(tmp_path, pairs, per_pair=2, chunk_inputs=25, chunk_rows=100)
    db = tmp_path / "out.duckdb"
    y = prefs_yaml(tmp_path / "p.yaml", pairs=pairs, db=db, per_pair=2, chunk_inputs=25, chunk_rows=100)
    return ref, db, y


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_first_signal_stops_gracefully_and_writes_everything_completed(stop_case, sig):
    ref, db, y = stop_case
    proc = child(["run", y, "--quiet"], prelude=ANNOUNCE_COMMITS + COUNT_COMPLETIONS + slow_fake(0.002))
    wait_line(proc, "READY")
    wait_line(proc, "COMMIT")
    time.sleep(random.Random(sig).uniform(0.0, 0.3))
    proc.send_signal(sig)
    rc, out, err = finish(proc)
    assert rc == 130, (rc, err)
    assert "Traceback" not in err
    flat = err.replace("\n", "")
    assert "resume with" in flat and str(y) in flat, err
    completed = int(next(line for line in out.splitlines() if line.startswith("COMPLETED")).split()[1])
    status, error = run_status(db)
    assert status == "stopped", (status, error)
    n, distinct = judgement_counts(db)
    assert 0 < n < len(ref.values), "the signal did not land mid-run"
    assert n == distinct == completed, f"{completed} completions came back, {n} stored"
    rc, out, err = finish(child(["run", y, "--quiet"]))
    assert rc == 0, err
    lost, dup = ref.compare(db)
    record(f"graceful stop ({sig.name})", f"{sig.name} to a child `factory run` mid-run, then resume", 1, lost, dup)


def test_second_signal_aborts_at_once_and_nothing_is_lost(stop_case):
    ref, db, y = stop_case
    proc = child(["run", y, "--quiet"], prelude=ANNOUNCE_COMMITS + slow_fake(0.002) + SLOW_FINAL_WRITE)
    wait_line(proc, "READY")
    wait_line(proc, "COMMIT")
    proc.send_signal(signal.SIGTERM)
    wait_line(proc, "FINAL_WRITE")  # the graceful stop is writing (slowly: 5 s) …
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)  # … and a second signal aborts it
    rc, out, err = finish(proc)
    took = time.monotonic() - t0
    assert rc == 130, (rc, err)
    assert took < 3, f"the second signal took {took:.1f} s to abort"
    assert "Traceback" not in err and "rerun the same command" in " ".join(err.split()), err
    status, error = run_status(db)
    assert status == "stopped" and "second interrupt" in (error or ""), (status, error)
    n, distinct = judgement_counts(db)
    assert n == distinct
    rc, out, err = finish(child(["run", y, "--quiet"]))
    assert rc == 0, err
    lost, dup = ref.compare(db)
    record("second signal during the stop", "SIGTERM, then SIGINT while the final write runs", 2, lost, dup)


# -- disk full / read-only -------------------------------------------------------------------------------
def test_disk_full_at_a_write_stops_with_the_path_and_resumes(tmp_path, monkeypatch, wide):
    per_pair = 2
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_records(300))
    ref = Reference.of(tmp_path, pairs, per_pair=per_pair, chunk_inputs=20, chunk_rows=50)
    db = tmp_path / "out.duckdb"
    y = prefs_yaml(tmp_path / "p.yaml", pairs=pairs, db=db, per_pair=per_pair, chunk_inputs=20, chunk_rows=50)
    committed = {"rows": 0, "flushes": 0}
    flush, insert = Runner._flush, Store.insert

    def counting_flush(self):
        n = sum(len(rows) for (t, _), rows in self._buf.items() if t == "judgements")
        flush(self)
        committed["rows"] += n
        committed["flushes"] += bool(n)

    def full_disk(self, table, rows, schema=None, replace=False):
        # the last write of a flush's transaction: its judgements are already inserted and must roll back
        if table == "chunks" and committed["flushes"] >= 5:
            raise OSError(28, "No space left on device")
        return insert(self, table, rows, schema, replace)

    monkeypatch.setattr(Runner, "_flush", counting_flush)
    monkeypatch.setattr(Store, "insert", full_disk)
    code, out, exc = invoke(["run", y, "--quiet"])
    assert code == 2 and "Traceback" not in out, (code, out, exc)
    assert str(db) in out and "No space left on device" in out and "rerun the same command" in out, out
    monkeypatch.setattr(Store, "insert", insert)
    monkeypatch.setattr(Runner, "_flush", flush)
    status, error = run_status(db)
    assert status == "failed" and "No space left" in error
    n, distinct = judgement_counts(db)
    assert n == distinct == committed["rows"] > 0, (n, distinct, committed)  # no partial transaction
    finished_chunks_complete(db, per_pair)
    code, out, exc = invoke(["run", y, "--quiet"])
    assert code == 0, out
    lost, dup = ref.compare(db)
    record("disk full (injected)", "OSError ENOSPC at the 6th write transaction, then resume", 1, lost, dup)


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
    """A 3 MB tmpfs (needs root and permission to mount); skipped only where it cannot be mounted."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if not _mount_tmpfs(mnt, "3M"):
        pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_real_full_filesystem_stops_with_the_path_and_resumes_after_space_is_freed(tmp_path, small_fs, wide):
    per_pair = 2
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_records(3000))
    ref = Reference.of(tmp_path, pairs, per_pair=per_pair, chunk_inputs=200, chunk_rows=1000)
    db = small_fs / "out.duckdb"
    y = prefs_yaml(tmp_path / "p.yaml", pairs=pairs, db=db, per_pair=per_pair, chunk_inputs=200, chunk_rows=1000)
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
    record("disk full (real 3 MB tmpfs)", "database on a full tmpfs; then the tmpfs grown to 256 MB", 1, lost, dup)


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
                      engine=f"{{kind: openai, base_url: {url}, max_retries: {retries}, max_concurrency: 8, timeout_s: 5}}",
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
        s = prefs.run(_server_yaml(tmp_path, pairs, db, srv.url), quiet=True)
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


# -- fake → real: nothing reused -------------------------------------------------------------------------
def test_fake_then_real_engine_reuses_nothing(tmp_path, engine):
    """Five file pairs judged by the fake engine, then by the real vLLM engine into the same database."""
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_records(5))
    db = tmp_path / "out.duckdb"
    y = prefs_yaml(tmp_path / "p.yaml", pairs=pairs, db=db, per_pair=1)
    prefs.run(y, engine=fake(), quiet=True)
    fake_rows = dict(query(db, "SELECT id, model FROM judgements"))
    assert len(fake_rows) == 10 and set(fake_rows.values()) == {"fake:smollm2-135m"}
    calls = []
    real_generate = engine.generate

    def counting(requests):
        def seen(reqs):
            for r in reqs:
                if r is not None:
                    calls.append(r.key)
                yield r
        return real_generate(seen(requests))

    engine.generate = counting
    try:
        s = prefs.run(y, engine=engine, quiet=True)
    finally:
        del engine.generate
    assert len(calls) == 10, f"the real engine was asked for {len(calls)} of the 10 judgements"
    assert s.reused == 0 and sum(w.written for w in s.stages) == 10
    rows = dict(query(db, "SELECT id, model FROM judgements"))
    real = {k: v for k, v in rows.items() if k not in fake_rows}
    assert len(real) == 10 and not set(calls) & set(fake_rows), "real keys equal to fake ones"
    assert all(v.startswith("smollm2-135m@") and v != "smollm2-135m@" for v in real.values()), set(real.values())
    assert set(fake_rows.values()) == {"fake:smollm2-135m"}
