"""Behavioural evals and best-of-n go through the one runner (factory.evals.tables.run_step over
factory.runner.Runner): rows carry their eval step's run id and chunk, finished chunks are recorded,
and an eval killed mid-way (an engine that dies) resumes by chunk: the rerun asks the engine only for
what the finished chunks do not hold, with no duplicate rows."""

from __future__ import annotations

import pytest

from factory.engines.base import Request, Sampling
from factory.engines.fake import FakeEngine
from factory.evals import tables
from factory.runner import EngineFailed


def _work(n: int) -> list[tables.Work]:
    s = Sampling(max_tokens=8, temperature=0.0)
    return [tables.Work(Request(f"k{i:04d}", [{"role": "user", "content": f"question {i}"}], s),
                        {"suite": "harmful", "suite_version": "v", "item_id": str(i), "turn": 1, "model": "fake:m",
                         "seed": 0, "sampling_hash": "h", "template_hash": "t", "messages": "[]"}) for i in range(n)]


def test_a_killed_eval_resumes_by_chunk_through_the_runner(tmp_path):
    db = tmp_path / "e.duckdb"
    work = _work(100)
    with tables.open_store(db, "t") as store:
        with pytest.raises(EngineFailed):
            tables.run_step(store, FakeEngine("m", die_after=45), tables.GENERATIONS, work, tables.generation_rows,
                            tables.GENERATION_SCHEMA, name="replies", chunk_rows=10, chunk_inputs=20)
        kept = store.one(f"SELECT count(*), count(DISTINCT id) FROM {tables.GENERATIONS}")
        chunks = store.one("SELECT count(*) FROM chunks WHERE stage = 'replies'")[0]
        assert kept[0] == kept[1] and 20 <= kept[0] < 100
        assert chunks >= 1  # finished chunks were recorded with their rows
        again = FakeEngine("m")
        step = tables.run_step(store, again, tables.GENERATIONS, work, tables.generation_rows,
                               tables.GENERATION_SCHEMA, name="replies", chunk_rows=10, chunk_inputs=20)
        assert again.requests == 100 - kept[0]  # only what was missing went to the engine
        assert step.reused == kept[0] and step.written == 100 - kept[0]
        n, distinct, runs, nochunk = store.one(f"""SELECT count(*), count(DISTINCT id), count(DISTINCT run_id),
                                                   count(*) FILTER (WHERE chunk IS NULL) FROM {tables.GENERATIONS}""")
        assert n == distinct == 100 and runs == 1 and nochunk == 0
        assert store.one("SELECT count(*) FROM chunks WHERE stage = 'replies'")[0] == 5
        third = FakeEngine("m")
        step = tables.run_step(store, third, tables.GENERATIONS, work, tables.generation_rows,
                               tables.GENERATION_SCHEMA, name="replies", chunk_rows=10, chunk_inputs=20)
        assert third.requests == 0 and step.reused == 100
