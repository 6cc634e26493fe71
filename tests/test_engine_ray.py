"""RayEngine on a local Ray (``ray.init(num_cpus=2)``) with FakeEngine replicas; one real vLLM replica (marked)."""

from __future__ import annotations

import collections
import functools
import sys
import time

import pytest

import ray  # noqa: E402  (the [ray] extra is part of the test setup: a missing ray fails, never skips)

from factory.engines.base import Request, Sampling  # noqa: E402
from factory.engines.fake import FakeEngine  # noqa: E402
from factory.engines.ray import RayEngine  # noqa: E402

# The helper engines below live in this test module, which Ray workers cannot import: ship them by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class SlowFake(FakeEngine):
    """FakeEngine that takes ``delay`` seconds per request (so a replica can be killed mid-chunk)."""

    def __init__(self, delay: float = 0.05, **kw):
        super().__init__(**kw)
        self.delay = delay

    def generate(self, requests):
        for c in super().generate(requests):
            time.sleep(self.delay)
            yield c


class BrokenEngine(FakeEngine):
    def generate(self, requests):
        raise RuntimeError("broken engine called")


pytestmark = pytest.mark.ray


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def reqs(n: int) -> list[Request]:
    out = []
    for i in range(n):
        score = i % 5 == 0
        out.append(Request(key=f"k{i:03d}", messages=[{"role": "user", "content": f"question {i}"}],
                           sampling=Sampling(max_tokens=16, n=1 + i % 2), options=("A", "B") if score else None,
                           option_ids=(65, 66) if score else None))
    return out


def expected(requests: list[Request]) -> dict:
    return {c.key: (c.texts, c.option_logprobs, c.status) for c in FakeEngine(model="fake", seed=3).generate(requests)}


def collect(engine: RayEngine, requests: list[Request]) -> dict:
    got = list(engine.generate(requests))
    assert collections.Counter(c.key for c in got) == collections.Counter(r.key for r in requests)  # once each
    return {c.key: c for c in got}


def test_two_replicas_match_in_process_fake():
    rs = reqs(50)
    eng = RayEngine(functools.partial(FakeEngine, model="fake", seed=3), replicas=2, chunk_size=8)
    try:
        assert (eng.model, eng.seed, eng.max_model_len) == ("fake:fake", 3, 2048)
        assert eng.token_ids("AB") == [65, 66]
        got = collect(eng, rs)
        assert {k: (c.texts, c.option_logprobs, c.status) for k, c in got.items()} == expected(rs)
        assert len({ray.get(a.info.remote())["pid"] for a in eng.actors}) == 2  # two separate processes
    finally:
        eng.close()


def test_parquet_shards_are_written_atomically_and_reused(tmp_path):
    rs = reqs(24)
    eng = RayEngine(functools.partial(FakeEngine, model="fake", seed=3), replicas=2, chunk_size=5, shard_dir=tmp_path)
    try:
        got = collect(eng, rs)
    finally:
        eng.close()
    shards = sorted(tmp_path.iterdir())
    assert len(shards) == 5 and all(p.suffix == ".parquet" for p in shards)  # ceil(24/5) chunks, no .tmp left
    assert {k: (c.texts, c.option_logprobs, c.status) for k, c in got.items()} == expected(rs)

    # The owner "crashed" before ingesting: a new run finds the rows in the shards and never asks the
    # replicas, except for the chunk whose shard is gone (its requests reach the broken engine).
    shards[0].unlink()
    broken = RayEngine(functools.partial(BrokenEngine, model="fake", seed=3), replicas=1, chunk_size=5, shard_dir=tmp_path)
    try:
        again = collect(broken, rs)
    finally:
        broken.close()
    failed = {k for k, c in again.items() if c.status == "failed"}
    assert len(failed) == 5, failed
    assert all("broken engine called" in again[k].error for k in failed), again[min(failed)].error
    assert all(again[k].texts == got[k].texts for k in again if k not in failed)


def test_killed_replica_is_restarted_and_its_chunk_rerun():
    rs = reqs(40)
    eng = RayEngine(functools.partial(SlowFake, delay=0.05, model="fake", seed=3), replicas=2, chunk_size=4,
                    max_restarts=1)
    try:
        pid = ray.get(eng.actors[0].info.remote())["pid"]
        got, killed = [], False
        for c in eng.generate(rs):
            got.append(c)
            if not killed:
                ray.kill(eng.actors[0], no_restart=False)  # mid-chunk: its current chunk is lost
                killed = True
        assert collections.Counter(c.key for c in got) == collections.Counter(r.key for r in rs)
        assert {c.key: (c.texts, c.option_logprobs, c.status) for c in got} == expected(rs)
        assert ray.get(eng.actors[0].info.remote())["pid"] != pid  # a new process took over
    finally:
        eng.close()


def test_replica_gone_for_good_fails_only_its_unfinished_chunks():
    rs = reqs(40)
    eng = RayEngine(functools.partial(SlowFake, delay=0.05, model="fake", seed=3), replicas=2, chunk_size=4,
                    max_restarts=0)
    try:
        got, killed = [], False
        for c in eng.generate(rs):
            got.append(c)
            if not killed:
                ray.kill(eng.actors[0])
                killed = True
        assert collections.Counter(c.key for c in got) == collections.Counter(r.key for r in rs)
        failed = [c for c in got if c.status == "failed"]
        # replica 0 held at most 2 chunks (inflight_per_replica) when it died: those fail, the rest is done by replica 1
        assert 1 <= len(failed) <= 8 and all("lost the chunk" in c.error for c in failed)
        ok = expected(rs)
        assert all((c.texts, c.option_logprobs) == ok[c.key][:2] for c in got if c.status == "ok")
    finally:
        eng.close()


@pytest.mark.engine
def test_one_vllm_replica_in_ray():
    """A real VLLMEngine inside a Ray actor: every request answered once, same keys, log-probs valid."""
    import math

    from factory import models
    from factory.engines.ray import vllm_factory

    path = models.resolve("smollm2-135m")
    eng = RayEngine(vllm_factory(path, model_name="smollm2-135m", seed=0, max_model_len=1024, kv_cache_gib=0.5),
                    replicas=1, chunk_size=4)
    try:
        assert eng.model.startswith("smollm2-135m@")  # the alias plus the weights' content fingerprint
        a, b = eng.token_ids(" A"), eng.token_ids(" B")
        assert len(a) == len(b) == 1
        rs = [Request(key=f"g{i}", messages=[{"role": "user", "content": f"Name a colour, number {i}."}],
                      sampling=Sampling(max_tokens=12, temperature=0.7)) for i in range(6)]
        rs.append(Request(key="score", messages=[{"role": "user", "content": "Answer with A or B: is 2+2=4? (A) yes (B) no"}],
                          sampling=Sampling(max_tokens=1, temperature=0.0), options=(" A", " B"), option_ids=(a[0], b[0])))
        got = collect(eng, rs)
        assert all(c.status == "ok" and c.texts[0].strip() for c in got.values())
        lp = got["score"].option_logprobs
        assert all(x <= 0 for x in lp) and math.exp(lp[0]) + math.exp(lp[1]) <= 1 + 1e-6
    finally:
        eng.close()


def test_pipeline_through_ray_stores_the_same_rows_as_in_process(tmp_path):
    """The same SL pipeline via 2 Ray replicas and via the in-process engine: identical row keys."""
    from factory import pipeline
    from factory.store import Store

    from conftest import write_pipeline

    prompts = [{"prompt": f"Tell me about item {i}."} for i in range(9)]
    dbs = {}
    for name, eng in (("ray", RayEngine(functools.partial(FakeEngine, model="smollm2-135m", seed=0), replicas=2,
                                        chunk_size=3)),
                      ("local", FakeEngine(model="smollm2-135m", seed=0))):
        d = tmp_path / name
        d.mkdir()
        pipeline.run(write_pipeline(d, prompts=prompts, rounds=2, engine="fake"), engine=eng, quiet=True)
        eng.close()
        with Store(d / "out.duckdb", read_only=True) as st:
            dbs[name] = {t: set(st.con.execute(f"SELECT id FROM {t}").fetchall()) for t in ("responses", "critiques", "revisions")}
    assert dbs["ray"] == dbs["local"] and len(dbs["local"]["revisions"]) == 18


def test_requests_are_pulled_lazily_and_bounded():
    """The driver pulls a chunk only when a replica has room: a lazy stream of 200 requests is never
    read ahead by more than replicas × inflight_per_replica chunks."""
    rs = reqs(200)
    pulled = []

    def stream():
        for r in rs:
            pulled.append(r.key)
            yield r

    eng = RayEngine(functools.partial(FakeEngine, model="fake", seed=3), replicas=2, chunk_size=5,
                    inflight_per_replica=2)
    try:
        ahead = []
        got = []
        for c in eng.generate(stream()):
            got.append(c)
            ahead.append(len(pulled) - len(got))
        assert max(ahead) <= 2 * 2 * 5 and len(got) == 200
        assert {c.key: (c.texts, c.option_logprobs, c.status) for c in got} == expected(rs)
    finally:
        eng.close()
