"""Keys name what really answered (issue 10): rows of one engine are never reused by a run on another,
whether the other is the real vLLM engine (slow) or a fake engine of another identity."""

from __future__ import annotations

from factory import prefs
from factory.engines.fake import FakeEngine

from runkit import fake, pair_records, prefs_yaml, query, write_jsonl


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


def test_a_run_with_another_engine_reuses_nothing_of_the_first(tmp_path):
    """The fast twin of the test above: two fake engines of different identities, one pipeline file."""
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_records(5))
    db = tmp_path / "out.duckdb"
    y = prefs_yaml(tmp_path / "p.yaml", pairs=pairs, db=db, per_pair=1)
    prefs.run(y, engine=fake(), quiet=True)
    other = FakeEngine(model="another-model")
    s = prefs.run(y, engine=other, quiet=True)
    assert other.requests == 10, f"the second engine was asked for {other.requests} of the 10 judgements"
    assert s.reused == 0
    assert dict(query(db, "SELECT model, count(*) FROM judgements GROUP BY 1")) == {"fake:smollm2-135m": 10,
                                                                                   "fake:another-model": 10}
