"""The judge service's throughput work (issue 24): what it computes once per request instead of once
per pair must give the same bytes, and a batch answered as one ticket must still say, per pair, what
came from the store."""

from __future__ import annotations

import json

import pytest

from factory.stages import judge as J
from factory.store import content_key
from test_serve import PREF, pipeline


@pytest.fixture
def service(tmp_path):
    from starlette.testclient import TestClient

    from factory.serve.service import Service

    svc = Service(pipeline(tmp_path))
    try:
        yield svc, TestClient(svc.app, base_url="http://127.0.0.1")
    finally:
        svc.close()


def test_pair_rows_made_once_per_request_are_the_offline_rows(service):
    """``JudgePlan.pairs`` makes a conversation's canonical JSON once per request: every pair id must
    still be ``content_key(conversation, a, b)`` and every stored conversation the offline JSON."""
    svc, _ = service
    group = [{"role": "system", "content": "Réponds brièvement. \"quotes\" \\ back\nslash"},
             {"role": "user", "content": "¿Qué hago? 日本語 \u2028 emoji 🙂", "name_order": None}]
    group = [{k: v for k, v in m.items() if v is not None} for m in group]
    items = [(group, "a → b", "b ← a"), (group, "Same", "Same"), (group, "", "non-empty"),
             ([{"role": "user", "content": "plain"}], "x" * 3, "{\"json\": [1, 2]}"), (group, "b ← a", "a → b")]
    got = svc.plan.pairs(items, svc.run_id)
    assert len(got) == len(items)
    for (conv, a, b), (row, jobs) in zip(items, got):
        want = J.pair_row(conv, a, b, source="serve", run_id=svc.run_id)
        assert row["pair_id"] == content_key(conv, a, b) == want["pair_id"]
        assert row["conversation"] == json.dumps(conv, ensure_ascii=False) == want["conversation"]
        assert {k: v for k, v in row.items() if k != "created_at"} == {k: v for k, v in want.items() if k != "created_at"}
        assert (len(jobs) == 4) == (row["status"] == "ok")  # 2 principles x 2 orders; none for a skipped pair
        assert all(j.row["pair_id"] == row["pair_id"] for j in jobs)
    assert got[0][0]["pair_id"] != got[4][0]["pair_id"]  # the order of a and b is part of the pair


def test_a_batch_is_one_ticket_and_each_answer_says_what_came_from_the_store(service):
    """`/v1/preferences` hands its pairs to the batcher as one ticket; each result's ``cached`` is still
    that pair's own count, and the engine is asked only for the new pair's judgements."""
    svc, client = service
    first = client.post("/v1/preference", json=PREF).json()
    assert first["cached"] == 0 and svc.engine.requests == 4
    new = {"prompt": "Is it fine to reuse a password?", "responses": ["No, use a manager.", "Yes, always."]}
    same = {"prompt": "Anything?", "responses": ["Identical.", "Identical."]}  # skipped: nothing to judge
    r = client.post("/v1/preferences", json={"items": [PREF, new, same, PREF, new]})
    assert r.status_code == 200, r.text
    got = r.json()["results"]
    assert [g["cached"] for g in got] == [4, 0, 0, 4, 0]
    assert svc.engine.requests == 8, "only the new pair's 4 judgements reach the engine, once"
    assert got[0]["pair_id"] == got[3]["pair_id"] == first["pair_id"] and got[0]["p_a"] == first["p_a"]
    assert got[1] == got[4]
    for table in ("pairs", "run_pairs"):  # a pair repeated in a batch is recorded once
        assert svc.store.one(f"SELECT count(*) FROM {table} WHERE pair_id = ?", [got[1]["pair_id"]])[0] == 1
    assert got[2]["tie"] is True and got[2]["p_a"] == 0.5 and "identical" in got[2]["skipped"]
    again = client.post("/v1/preference", json=new).json()
    assert again["cached"] == 4 and again["p_a"] == got[1]["p_a"] and svc.engine.requests == 8
    stats = client.get("/v1/stats").json()
    assert stats["judgements"] == 8 and stats["requests"] == 3


def test_key_filter_has_no_false_negatives_and_few_false_positives():
    """The probe filter (one cache line per key): every key added is reported as maybe stored (a
    false negative would judge a stored key again: a duplicate), and other keys rarely are."""
    import hashlib

    from factory.serve.keyfilter import KeyFilter

    f = KeyFilter(1 << 22)
    keys = [hashlib.sha256(f"k{i}".encode()).hexdigest()[:24] for i in range(200_000)]
    odd = ["pair-1", "", "row 7", "abc", "0x12", "1" * 30, "ZZ" * 12]  # ids a pairs file may give
    for k in keys + odd:
        f.add(k)
    assert all(f.maybe(k) for k in keys + odd) and f.n == len(keys) + len(odd)
    others = [hashlib.sha256(f"o{i}".encode()).hexdigest()[:24] for i in range(50_000)]
    assert sum(map(f.maybe, others)) / len(others) < 0.01  # ~0.2% at 200,000 keys in 2^22 bits


def test_key_filter_batches_set_and_read_the_same_bits_as_one_key_at_a_time():
    """``add_many``/``maybe_many`` (a transaction's keys at once, one numpy pass) must be the same filter
    as ``add``/``maybe`` key by key, also for ids that are not 24 hex digits (those go key by key)."""
    import hashlib

    from factory.serve.keyfilter import KeyFilter

    keys = [hashlib.sha256(f"b{i}".encode()).hexdigest()[:24] for i in range(5_000)]
    longer = [hashlib.sha256(f"l{i}".encode()).hexdigest() for i in range(50)]  # 64 hex: the first 24 count
    odd = ["pair-1", "row 7", "0x" + "1" * 30, "a" * 23, "A" * 24, "ab_" * 10, "ab " * 10]
    one, many = KeyFilter(1 << 20), KeyFilter(1 << 20)
    for batch in (keys[:3], keys[3:], longer, odd, keys[:10] + odd):
        for k in batch:
            one.add(k)
        many.add_many(batch)
        assert one.bits == many.bits and one.n == many.n
    probe = keys[::7] + longer + odd + [hashlib.sha256(f"x{i}".encode()).hexdigest()[:24] for i in range(3_000)]
    assert many.maybe_many(probe) == [one.maybe(k) for k in probe]
    assert many.maybe_many(probe[-3_000:]) == [one.maybe(k) for k in probe[-3_000:]]  # all hex: the numpy path
    assert all(many.maybe_many(keys)) and many.maybe_many([]) == []
