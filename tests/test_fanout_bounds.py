"""Several engines, one run's memory: what a RoutedRunner holds is bounded per run, not per engine.

Counted through the runner's own counters (jobs planned and not yet stored, rows in one write), not
timed: three fake engines answer the jobs of many small input chunks, the main thread being the
slow side (it renders, stores and plans for all three)."""

from __future__ import annotations

from conftest import REPO
from factory.constitution import load_constitution
from factory.engines.base import Sampling
from factory.engines.fake import FakeEngine
from factory.fanout import RoutedRunner
from factory.runner import InputChunk
from factory.stages import sl
from factory.store import Store
from factory.templates import load_template

CHUNKS, PER_CHUNK = 12, 150
ROUTES = ("a", "b", "c")


def inputs(ctx: sl.Ctx) -> list[InputChunk]:
    def plan(c: int):
        prompts = [(f"p{c}-{i}", [{"role": "user", "content": f"Question {c}-{i}: how do I stay safe?"}], i)
                   for i in range(PER_CHUNK)]
        jobs = sl.answer_jobs(ctx, prompts)
        for i, j in enumerate(jobs):
            j.then, j.route = None, ROUTES[i % len(ROUTES)]
        return jobs

    return [InputChunk(c, {}, lambda c=c: plan(c)) for c in range(CHUNKS)]


def test_a_panel_holds_one_budget_for_the_run_and_writes_bounded_batches(tmp_path):
    t = {s: load_template(REPO / f"prompts/{s}.j2") for s in ("answer", "critique", "revise")}
    sampling = Sampling(max_tokens=8)
    constitution = load_constitution(REPO / "constitutions/harmless.yaml")
    ctx = sl.Ctx(run_id="bounds", model="fake:m", seed=0, constitution=constitution, templates=t,
                 sampling={s: sampling for s in sl.STAGES}, sampling_hash={s: s for s in sl.STAGES})
    engines = {r: FakeEngine(f"judge-{r}", seed=i) for i, r in enumerate(ROUTES)}
    store = Store(tmp_path / "b.duckdb", writer_run="bounds")
    try:
        runner = RoutedRunner(store, engines["a"], "bounds", stage="prompts", chunk_rows=64, probe_rows=300,
                              routes=engines)
        runner.queue_cap = 16
        runner.run(inputs(ctx))
        n, distinct = store.one("SELECT count(*), count(DISTINCT id) FROM responses")
    finally:
        store.close()
    assert n == distinct == CHUNKS * PER_CHUNK  # nothing lost or doubled by the bounds
    assert sum(e.requests for e in engines.values()) == CHUNKS * PER_CHUNK
    assert min(e.requests for e in engines.values()) == CHUNKS * PER_CHUNK // 3  # each engine got its share
    # the next chunk opens only when fewer than probe_rows / engines jobs wait in all; each engine holds at
    # most queue_cap rendered requests and queue_cap answers not yet taken, and one inside the fake engine
    budget = 300 // 3 + PER_CHUNK + len(ROUTES) * (2 * 16 + 1)
    assert 0 < runner.max_held <= budget, runner.max_held
    # completions are taken only until a write's rows are buffered (+1: a chunk record finished with the last)
    assert 0 < runner.max_buffered <= 64 + 1, runner.max_buffered
