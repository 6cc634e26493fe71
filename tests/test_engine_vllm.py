"""Integration tests on the real vLLM CPU engine with the embedded model (one engine per session)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from factory import pipeline
from factory.engines.base import Request, Sampling
from factory.store import Store

from conftest import write_pipeline

pytestmark = pytest.mark.engine

PROMPTS = [{"prompt": f"Give me one tip about topic number {i}."} for i in range(6)] + [
    {"messages": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello!"},
                  {"role": "user", "content": "How do I boil an egg?"}]}]


def test_engine_scores_option_tokens_and_skips_overlength(engine):
    a, b = engine.token_ids("A"), engine.token_ids("B")
    assert len(a) == len(b) == 1
    reqs = [
        Request("judge", [{"role": "user", "content": "Pick A or B."}, {"role": "assistant", "content": "My pick: ("}],
                Sampling(max_tokens=1, temperature=0), options=("A", "B"), option_ids=(a[0], b[0]), continue_final=True),
        Request("long", [{"role": "user", "content": "hello " * 2500}], Sampling(max_tokens=8)),
        Request("gen", [{"role": "user", "content": "Say hi."}], Sampling(max_tokens=8, n=2)),
    ]
    got = {c.key: c for c in engine.generate(reqs)}
    lp = got["judge"].option_logprobs
    assert len(lp) == 2 and all(v <= 0 for v in lp)
    assert got["long"].status == "skipped" and "prompt too long" in got["long"].error
    assert len(got["gen"].texts) == 2 and got["gen"].completion_tokens > 0


def test_small_run_end_to_end(engine, tmp_path):
    path = write_pipeline(tmp_path, prompts=PROMPTS, rounds=2)
    s = pipeline.run(path, engine=engine, quiet=True)
    assert s.prompts == 7 and s.completion_tokens > 0
    with Store(tmp_path / "out.duckdb", read_only=True) as st:
        n = st.one("""SELECT count(*) FROM revisions v2 JOIN revisions v1 ON v2.parent_id = v1.id
                      JOIN responses r ON v1.parent_id = r.id WHERE v2.round = 2""")[0]
        ok = st.count("revisions", "round = 2 AND status = 'ok'")
        assert n == st.count("revisions", "round = 2") and ok >= 1
        msgs = json.loads(st.one("SELECT messages FROM critiques LIMIT 1")[0])
        assert msgs[-1]["role"] == "user" and "<reply>" in msgs[-1]["content"]


def test_kill_9_mid_run_then_resume(engine, tmp_path):
    prompts = [{"prompt": f"Write two sentences about the number {i}."} for i in range(40)]
    path = write_pipeline(tmp_path, prompts=prompts, max_tokens=48)
    db = tmp_path / "out.duckdb"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "factory.cli", "run", str(path), "--quiet"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    wal = db.with_name(db.name + ".wal")
    deadline = time.time() + 400
    try:  # wait until some chunks are committed (the WAL grows), then kill -9 mid-wave
        while time.time() < deadline and proc.poll() is None:
            if wal.exists() and wal.stat().st_size > 60_000:
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    with Store(db, read_only=True) as st:
        before = {r[0]: r[1:] for r in st.con.execute("SELECT id, text, created_at FROM responses").fetchall()}
        crit_before = st.count("critiques")
    assert 0 < len(before) < 40 or crit_before < 40, "the kill came too late to test resuming"
    s = pipeline.run(path, engine=engine, quiet=True)
    by = {w.table: w for w in s.waves}
    assert by["responses"].reused == len(before) and by["responses"].written == 40 - len(before)
    with Store(db, read_only=True) as st:
        after = {r[0]: r[1:] for r in st.con.execute("SELECT id, text, created_at FROM responses").fetchall()}
        for t in ("responses", "critiques", "revisions"):
            total, distinct = st.one(f"SELECT count(*), count(DISTINCT id) FROM {t}")
            assert total == distinct == 40, t  # nothing lost, nothing duplicated
    assert all(after[k] == v for k, v in before.items())  # stored rows were not recomputed
