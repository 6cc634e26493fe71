"""Fault injection, process side: kill -9 (20 times over 20,000 judgements, and between follow-up jobs),
engine errors and engine death at random requests, graceful stop on SIGTERM/SIGINT and abort on a second
signal (issue 10). Files and servers: tests/test_faults_io.py.

Every case resumes after the fault and compares with an uninterrupted run of the same pipeline into a
separate database: 0 judgements lost, 0 duplicated, the same judgement values and the same final labels
(p_a and chosen per pair). The counts per case (faults injected, rows lost, rows duplicated) are printed
at the end of the module (run with ``-s``) and appended as JSON lines to ``$FACTORY_FAULT_REPORT`` when
it is set; the README's Reliability section shows them.
"""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import pytest

from factory import pipeline, prefs
from factory.engines.base import Completion
from factory.engines.fake import FakeEngine
from factory.runner import EngineFailed

from runkit import (ANNOUNCE_COMMITS, Reference, child, fake, fault_report, finish, invoke, judgement_counts,  # noqa: F401
                    judgement_values, kill9, pair_records, prefs_yaml, query, record, rows_differ, run_status, sl_yaml,
                    slow_fake, table_rows, wait_line, wide, write_jsonl)


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


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sampled", "sl"])
def test_kill_9_between_follow_up_jobs_then_resume(tmp_path, kind):
    """Runs whose jobs create follow-ups (a prompt's samples → its pairs → their judgements; an answer →
    its critiques → a revision → round 2) killed 6 times at random points, then resumed: every table equals
    an uninterrupted run's, row for row."""
    # an SL prompt makes ~5 requests, a sampled one ~15: size both to outlast 6 kills' worth of progress
    n_prompts, per_request_s = (150, 0.002) if kind == "sampled" else (400, 0.004)
    prompts = write_jsonl(tmp_path / "prompts.jsonl",
                          [{"prompt": f"Question {i}: how should I handle situation {i}?"} for i in range(n_prompts)])
    sample = f"{{source: sample, prompts: {{path: {prompts}}}, n: 3, sampling: {{max_tokens: 16}}}}"

    def pipe(d: Path) -> Path:
        d.mkdir()
        if kind == "sl":
            return sl_yaml(d / "p.yaml", prompts=prompts, db=d / "out.duckdb", rounds=2, chunk_inputs=15, chunk_rows=40)
        return prefs_yaml(d / "p.yaml", pairs="", db=d / "out.duckdb", per_pair=2, source=sample, chunk_inputs=15,
                          chunk_rows=40)

    ref_path, path = pipe(tmp_path / "reference"), pipe(tmp_path / "faulted")
    run = pipeline.run if kind == "sl" else prefs.run
    run(ref_path, engine=fake(), quiet=True)
    db = tmp_path / "faulted" / "out.duckdb"
    rng = random.Random(kind)
    for i in range(6):
        commits = rng.choice([0, 1, 2, 3])
        proc = child(["run", path, "--quiet"], prelude=ANNOUNCE_COMMITS + slow_fake(per_request_s))
        wait_line(proc, "READY")
        if commits == 0:
            time.sleep(rng.uniform(0.0, 1.5))
        for _ in range(commits):
            wait_line(proc, "COMMIT")
        time.sleep(rng.uniform(0.0, 0.3))
        assert kill9(proc) == -signal.SIGKILL, f"kill {i + 1}: the run ended by itself before it was killed"
    assert run(path, engine=fake(), quiet=True).status == "done"
    want, got = table_rows(tmp_path / "reference" / "out.duckdb"), table_rows(db)
    diffs = {t: d for t in want if (d := rows_differ(want[t], got.get(t, []))) is not None}
    assert diffs == {}
    table = "judgements" if kind == "sampled" else "revisions"
    n, distinct = query(db, f"SELECT count(*), count(DISTINCT id) FROM {table}")[0]
    record(f"kill -9 between follow-up jobs ({kind})", "SIGKILL 6× at seeded random points, then resume", 6,
           len(want[table]) - distinct, n - distinct)


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


@pytest.fixture
def engine_case(tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_records(100))
    ref = Reference.of(tmp_path, pairs, per_pair=2, chunk_inputs=20, chunk_rows=40)
    db = tmp_path / "out.duckdb"
    return ref, db, prefs_yaml(tmp_path / "p.yaml", pairs=pairs, db=db, per_pair=2, chunk_inputs=20, chunk_rows=40)


def test_engine_deaths_at_random_requests_then_resume(engine_case):
    ref, db, y = engine_case
    rng = random.Random(10)
    before = 0
    for i in range(4):
        eng = fake(die_after=rng.randrange(20, 80))
        with pytest.raises(EngineFailed, match="rerun the same command"):
            prefs.run(y, engine=eng, quiet=True)
        status, error = run_status(db)
        assert status == "failed" and "died after" in error, (status, error)
        n, distinct = judgement_counts(db)
        assert n == distinct == before + eng.die_after, (n, distinct, before, eng.die_after)  # every completion stored
        before = n
    eng = fake()
    assert prefs.run(y, engine=eng, quiet=True).status == "done"
    assert eng.requests == len(ref.values) - before  # the resume asks only for what is missing
    lost, dup = ref.compare(db)
    record("engine death at random requests", "the engine raises after 20–80 completions (seeded), 4× in a row",
           4, lost, dup)


def test_engine_errors_at_random_requests_then_retry_failed(engine_case):
    ref, db, y = engine_case
    eng = Flaky(0.05, seed=1)
    s = prefs.run(y, engine=eng, quiet=True)
    assert s.status == "done" and run_status(db) == ("done", None) and eng.failed > 0
    n_failed = query(db, "SELECT count(*) FROM judgements WHERE status = 'failed'")[0][0]
    assert query(db, "SELECT DISTINCT error FROM judgements WHERE status = 'failed'") == [("injected engine error",)]
    assert n_failed == eng.failed and s.failures == {"judgements failed: injected engine error": n_failed}
    assert judgement_counts(db) == (len(ref.values), len(ref.values))
    eng = fake()
    prefs.run(y, engine=eng, quiet=True, retry_failed=True)
    assert eng.requests == n_failed, f"--retry-failed sent {eng.requests} requests for {n_failed} failed rows"
    lost, dup = ref.compare(db)
    record("engine errors at random requests", "5% of requests fail (seeded), then --retry-failed", n_failed, lost, dup)


def test_engine_death_through_the_cli_says_how_to_resume(tmp_path, monkeypatch, wide):
    import factory.engines as engines

    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_records(60))
    ref = Reference.of(tmp_path, pairs, per_pair=2, chunk_inputs=10, chunk_rows=20)
    db = tmp_path / "out.duckdb"
    y = prefs_yaml(tmp_path / "p.yaml", pairs=pairs, db=db, per_pair=2, chunk_inputs=10, chunk_rows=20)
    real = engines.make_engine
    monkeypatch.setattr(engines, "make_engine", lambda spec, model: FakeEngine(model=model, die_after=37))
    code, out, exc = invoke(["run", y, "--quiet"])
    assert code != 0 and "Traceback" not in out, out
    flat = " ".join(out.split())
    assert "died after 37" in flat and "rerun the same command" in flat, out
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
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_records(150))
    ref = Reference.of(tmp_path, pairs, per_pair=2, chunk_inputs=25, chunk_rows=60)
    db = tmp_path / "out.duckdb"
    y = prefs_yaml(tmp_path / "p.yaml", pairs=pairs, db=db, per_pair=2, chunk_inputs=25, chunk_rows=60)
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
    assert prefs.run(y, engine=fake(), quiet=True).status == "done"  # the resume
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
    assert prefs.run(y, engine=fake(), quiet=True).status == "done"  # the resume
    lost, dup = ref.compare(db)
    record("second signal during the stop", "SIGTERM, then SIGINT while the final write runs", 2, lost, dup)
