import multiprocessing as mp

import pytest

from factory.store import GEN_SCHEMA, MIGRATIONS, Store, StoreError, content_key, now


def _row(i, text="t"):
    return {"id": f"k{i}", "run_id": "r", "prompt_id": "p", "parent_id": None, "round": 0, "principle_ids": "[]",
            "constitution_hash": None, "template_hash": "h", "model": "m", "sampling_hash": "s", "messages": "[]",
            "text": text, "status": "ok", "error": None, "prompt_tokens": 1, "completion_tokens": 1,
            "finish_reason": "stop", "created_at": now()}


def test_content_key_is_order_insensitive_for_dicts_and_sensitive_to_values():
    assert content_key({"a": 1, "b": 2}) == content_key({"b": 2, "a": 1})
    assert content_key({"a": 1}) != content_key({"a": 2})
    assert content_key("x", [1, 2]) != content_key("x", [2, 1])
    assert len(content_key("x")) == 24


def test_insert_round_trip_and_ignore_existing(tmp_path):
    with Store(tmp_path / "s.duckdb", writer_run="r") as s:
        assert s.schema_version() == len(MIGRATIONS)
        assert s.insert("responses", [_row(1), _row(2)], GEN_SCHEMA) == 2
        # same keys again with other text: kept as first written (results are immutable)
        assert s.insert("responses", [_row(1, "other"), _row(3)], GEN_SCHEMA) == 1
        got = dict(s.con.execute("SELECT id, text FROM responses ORDER BY id").fetchall())
        assert got == {"k1": "t", "k2": "t", "k3": "t"}
        assert s.existing("responses", ["k1", "k9"]) == {"k1"}
        t = s.fetch("responses", ["k2"], "t.id, t.status")
        assert t.to_pylist() == [{"id": "k2", "status": "ok"}]


def _hold(path, ready, release):
    s = Store(path, writer_run="first-run")
    ready.set()
    release.wait(30)
    s.close()


def test_second_writer_gets_clear_in_use_error(tmp_path):
    path = tmp_path / "s.duckdb"
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold, args=(path, ready, release))
    p.start()
    try:
        assert ready.wait(60)
        with pytest.raises(StoreError, match=r"in use by run first-run \(pid \d+\)"):
            Store(path, writer_run="second-run")
    finally:
        release.set()
        p.join(30)
    Store(path, writer_run="second-run").close()  # free again once the first writer is gone


def test_reopen_keeps_schema_and_rows(tmp_path):
    path = tmp_path / "s.duckdb"
    with Store(path, writer_run="r") as s:
        s.insert("responses", [_row(1)], GEN_SCHEMA)
    with Store(path, read_only=True) as s:
        assert s.count("responses") == 1 and s.schema_version() == len(MIGRATIONS)


def test_reopen_in_place_keeps_rows_and_lock_and_waits_for_open_cursors(tmp_path):
    path = tmp_path / "s.duckdb"
    with Store(path, writer_run="r", run_memory=True) as s:
        s.insert("responses", [_row(1)], GEN_SCHEMA)
        view = s.view()
        with s.cursor() as cur:
            assert cur.execute("SELECT count(*) FROM responses").fetchall() == [(1,)]
            assert not s.reopen()  # a reader's cursor is open: the database stays open
        assert not s.reopen()  # the view is still open
        view.close()
        view.close()  # closing twice does not count twice
        before = s.con
        limit = s.con.execute("SELECT current_setting('memory_limit')").fetchall()
        assert s.reopen()
        assert s.con is not before
        assert s.con.execute("SELECT current_setting('memory_limit')").fetchall() == limit  # the run's cap, not DuckDB's default
        s.insert("responses", [_row(2)], GEN_SCHEMA)
        assert s.count("responses") == 2
        with pytest.raises(StoreError, match="in use by run r"):  # the writer lock stayed held
            Store(path, writer_run="other")
        v2 = s.view()
        assert v2.count("responses") == 2 and not s.reopen()
        v2.close()
        assert s.reopen()
    with Store(path, read_only=True) as s:
        assert s.count("responses") == 2


def test_read_only_missing_db_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match="no such database"):
        Store(tmp_path / "nope.duckdb", read_only=True)


def _pair(i, prompt="p"):
    return {"pair_id": f"q{i}", "conversation": prompt, "response_a": "a", "response_b": "b", "run_id": "r"}


def test_tables_without_primary_key_keep_their_keys_unique(tmp_path):
    """pairs/run_pairs/prompts/run_prompts/preferences have no primary key (its index grows in memory
    with the run); Store.insert keeps their keys unique as INSERT OR IGNORE/REPLACE did."""
    from factory.store import NATURAL_KEYS, PAIR_SCHEMA, TABLE_SCHEMAS

    with Store(tmp_path / "s.duckdb", writer_run="r") as s:
        for t in NATURAL_KEYS:
            assert not s._has_key(t), t
        rows = [_pair(1), _pair(2), _pair(2, "again in the same batch")]
        assert s.insert("pairs", [{k: r.get(k) for k in PAIR_SCHEMA.names} for r in rows], PAIR_SCHEMA) == 2
        assert s.insert("pairs", [{k: _pair(i, "later").get(k) for k in PAIR_SCHEMA.names} for i in (2, 3)],
                        PAIR_SCHEMA) == 1
        assert dict(s.con.execute("SELECT pair_id, conversation FROM pairs").fetchall()) == {"q1": "p", "q2": "p", "q3": "later"}
        assert s.insert("pairs", [{k: _pair(1, "replaced").get(k) for k in PAIR_SCHEMA.names}], PAIR_SCHEMA,
                        replace=True) == 1
        assert s.con.execute("SELECT conversation FROM pairs WHERE pair_id = 'q1'").fetchall() == [("replaced",)]
        # a composite key: the same pair in two runs is two rows, the same (run, pair) once
        member = [{"run_id": r, "pair_id": p, "source_row": i} for i, (r, p) in enumerate([("r", "q1"), ("s", "q1"), ("r", "q1")])]
        assert s.insert("run_pairs", member, TABLE_SCHEMAS["run_pairs"]) == 2
        assert s.insert("run_pairs", member[:1], TABLE_SCHEMAS["run_pairs"]) == 0
        assert s.count("run_pairs") == 2 and s.count("pairs") == 3


def test_v3_database_is_migrated_to_tables_without_primary_key(tmp_path):
    import duckdb

    from factory.store import NATURAL_KEYS

    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    for version in range(1, 4):  # a database as v3 left it
        for stmt in MIGRATIONS[version - 1]:
            con.execute(stmt)
    con.execute("INSERT INTO meta VALUES ('schema_version', '3')")
    con.execute("INSERT INTO pairs (pair_id, conversation, response_a, response_b) VALUES ('q1', 'p', 'a', 'b')")
    con.execute("INSERT INTO run_pairs VALUES ('r', 'q1', 7)")
    con.close()
    with Store(path, writer_run="r") as s:
        assert s.schema_version() == len(MIGRATIONS) >= 4
        assert not any(s._has_key(t) for t in NATURAL_KEYS)
        assert s.con.execute("SELECT pair_id, conversation FROM pairs").fetchall() == [("q1", "p")]
        assert s.con.execute("SELECT * FROM run_pairs").fetchall() == [("r", "q1", 7)]
        assert "without a primary key" in s.one("SELECT note FROM migrations WHERE version = 4")[0]
        assert s.insert("run_pairs", [{"run_id": "r", "pair_id": "q1", "source_row": 8}]) == 0
