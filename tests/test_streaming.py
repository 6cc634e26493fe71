"""Streaming runs on the fake engine: the same rows as an unstreamed run, memory that does not grow with
the run, restarts that skip finished chunks, --retry-failed, and `factory show` on every kind of row."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from factory import pipeline, prefs, runner
from factory.cli import app
from factory.store import Store

from runkit import (fake, labels, pair_records, peak_rss_run, prefs_yaml, query, rows_differ, same_labels, sl_yaml,
                    table_rows, write_jsonl)


def prompts_file(path, n: int):
    return write_jsonl(path, [{"prompt": f"Question {i}: how should I handle situation {i}?"} for i in range(n)])


# -- streamed == unstreamed -----------------------------------------------------------------------------
def _three_pipelines(d, *, chunk_inputs: int, chunk_rows: int) -> list:
    """A file-pairs prefs run, a 2-round SL run and a sampled-pairs prefs run, all into ``d/out.duckdb``."""
    d.mkdir()
    db = d / "out.duckdb"
    pairs = write_jsonl(d / "pairs.jsonl", pair_records(60))
    prompts = prompts_file(d / "prompts.jsonl", 16)
    sample = f"{{source: sample, prompts: {{path: {prompts}}}, n: 3, sampling: {{max_tokens: 16}}}}"
    return [prefs_yaml(d / "file.yaml", pairs=pairs, db=db, name="file", per_pair=2, chunk_inputs=chunk_inputs,
                       chunk_rows=chunk_rows),
            sl_yaml(d / "sl.yaml", prompts=prompts, db=db, name="sl", rounds=2, chunk_inputs=chunk_inputs,
                    chunk_rows=chunk_rows),
            prefs_yaml(d / "sampled.yaml", pairs="", db=db, name="sampled", per_pair=2, chunk_inputs=chunk_inputs,
                       chunk_rows=chunk_rows, source=sample)]


def test_streamed_result_is_identical_row_for_row_to_unstreamed(tmp_path, monkeypatch):
    dbs = {}
    reopened = []
    reopen = Store.reopen
    monkeypatch.setattr(Store, "reopen", lambda self: reopened.append(reopen(self)) or reopened[-1])
    for name, ci, cr, every in (("whole", 100_000, 100_000, 0), ("streamed", 7, 5, 2)):
        monkeypatch.setattr(runner, "REOPEN_CHUNKS", every)  # the streamed runs also reopen their database
        paths = _three_pipelines(tmp_path / name, chunk_inputs=ci, chunk_rows=cr)
        for p in paths:
            (pipeline if "sl.yaml" in str(p) else prefs).run(p, engine=fake(), quiet=True)
        dbs[name] = tmp_path / name / "out.duckdb"
    assert reopened.count(True) >= 3, reopened
    # the streamed run really was streamed: many input chunks, each recorded once
    whole, streamed = (dict(query(dbs[k], "SELECT stage || ':' || split_part(run_id, '-', 1), count(*) FROM chunks "
                                          "GROUP BY 1")) for k in ("whole", "streamed"))
    assert whole == {"pairs:file": 1, "prompts:sl": 1, "prompts:sampled": 1}
    assert streamed == {"pairs:file": 60 // 7 + 1, "prompts:sl": 16 // 7 + 1, "prompts:sampled": 16 // 7 + 1}
    a, b = table_rows(dbs["whole"]), table_rows(dbs["streamed"])
    assert a.keys() == b.keys()
    # every result table has rows (so the comparison compares something)
    for t in ("judgements", "preferences", "pairs", "run_pairs", "samples", "responses", "critiques", "revisions",
              "prompts", "run_prompts", "configs"):
        assert a[t], t
    assert len(a["judgements"]) == 60 * 2 * 2 + 16 * 3 * 2 * 2
    assert len(a["revisions"]) == 16 * 2
    diffs = {t: d for t in a if (d := rows_differ(a[t], b[t])) is not None}
    assert diffs == {}
    assert not same_labels(labels(dbs["streamed"]), labels(dbs["whole"]))


# -- memory ----------------------------------------------------------------------------------------------
def test_peak_memory_does_not_grow_with_a_5x_larger_run(tmp_path):
    """2,000 vs 10,000 file pairs (1,500-character texts, so that holding the run's rows in memory shows),
    one principle × 2 orders, 200 pairs a chunk; each size in a child process reaped with os.wait4 (its own
    peak RSS, as bench/bench_scale.py measures it)."""
    rss = {}
    for n in (2_000, 10_000):
        pairs = write_jsonl(tmp_path / f"pairs{n}.jsonl", pair_records(n, chars=1500))
        y = prefs_yaml(tmp_path / f"m{n}.yaml", pairs=pairs, db=tmp_path / f"m{n}.duckdb", name=f"m{n}", per_pair=1,
                       chunk_inputs=200, chunk_rows=1024)
        rc, rss[n], err = peak_rss_run(["run", str(y), "--quiet"])
        assert rc == 0, err
        assert query(tmp_path / f"m{n}.duckdb", "SELECT count(*), count(DISTINCT id) FROM judgements")[0] == (2 * n, 2 * n)
    small, large = rss[2_000], rss[10_000]
    print(f"peak RSS: 2,000 pairs {small:.0f} MB, 10,000 pairs {large:.0f} MB ({large / small:.2f}x)")
    assert large <= 1.15 * small + 20, f"peak RSS grew from {small:.0f} MB to {large:.0f} MB for a 5x larger run"


# -- restarts ------------------------------------------------------------------------------------------
def test_restart_skips_finished_chunks_and_an_edited_input_resumes(tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_records(50))
    path = prefs_yaml(tmp_path / "p.yaml", pairs=pairs, db=tmp_path / "out.duckdb", per_pair=2, chunk_inputs=8,
                      chunk_rows=64)
    first = prefs.run(path, engine=fake(), quiet=True)
    n_chunks = query(tmp_path / "out.duckdb", "SELECT count(*) FROM chunks")[0][0]
    assert n_chunks == 7 and first.requests == 50 * 2 * 2
    before = labels(tmp_path / "out.duckdb")

    eng = fake()
    again = prefs.run(path, engine=eng, quiet=True)
    assert eng.requests == 0 and again.requests == 0
    assert again.skipped_chunks == n_chunks and again.skipped_jobs == 50 * 2 * 2
    assert sum(s.planned for s in again.stages) == 0  # nothing read, planned or probed
    assert labels(tmp_path / "out.duckdb") == before

    # append 10 pairs: the input's fingerprint changes, so every chunk is probed again; only the new pairs
    # are judged
    write_jsonl(pairs, pair_records(10, start=50), mode="a")
    eng = fake()
    edited = prefs.run(path, engine=eng, quiet=True)
    assert eng.requests == 10 * 2 * 2
    assert edited.skipped_chunks == 0
    assert sum(s.planned for s in edited.stages) == 60 * 2 * 2
    assert sum(s.reused for s in edited.stages) == 50 * 2 * 2
    db = tmp_path / "out.duckdb"
    assert query(db, "SELECT count(*), count(DISTINCT id) FROM judgements")[0] == (240, 240)
    after = labels(db)
    assert len(after) == 60 and not same_labels({k: after[k] for k in before}, before)

    # …and the restart after that skips every chunk again (the records now describe the edited input)
    eng = fake()
    third = prefs.run(path, engine=eng, quiet=True)
    assert eng.requests == 0
    assert third.skipped_chunks == 60 // 8 + 1, "chunk records of the edited input were not refreshed"
    assert sum(s.planned for s in third.stages) == 0


# -- --retry-failed --------------------------------------------------------------------------------------
def test_retry_failed_reruns_exactly_the_failed_rows_and_relabels(tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_records(40))
    clean = prefs_yaml(tmp_path / "clean.yaml", pairs=pairs, db=tmp_path / "clean.duckdb", per_pair=2,
                       chunk_inputs=8, chunk_rows=10)
    prefs.run(clean, engine=fake(), quiet=True)
    want = labels(tmp_path / "clean.duckdb")

    db = tmp_path / "out.duckdb"
    path = prefs_yaml(tmp_path / "p.yaml", pairs=pairs, db=db, per_pair=2, chunk_inputs=8, chunk_rows=10)
    s = prefs.run(path, engine=fake(fail_every=3), quiet=True)
    failed = {i for i, st, err in query(db, "SELECT id, status, error FROM judgements") if st == "failed"}
    assert len(failed) == 160 // 3
    assert query(db, "SELECT DISTINCT error FROM judgements WHERE status = 'failed'") == [("injected engine error",)]
    assert s.failures == {"judgements failed: injected engine error": len(failed)}
    assert same_labels(labels(db), want)  # the failures changed some labels

    eng = fake()
    prefs.run(path, engine=eng, quiet=True)
    assert eng.requests == 0  # a plain rerun counts failed rows as done

    eng = fake()
    r = prefs.run(path, engine=eng, quiet=True, retry_failed=True)
    assert eng.requests == len(failed), f"retried {eng.requests} requests for {len(failed)} failed rows"
    assert r.failures == {}
    assert query(db, "SELECT count(*), count(DISTINCT id) FROM judgements")[0] == (160, 160)
    assert query(db, "SELECT count(*) FROM judgements WHERE status <> 'ok'")[0][0] == 0
    assert query(db, "SELECT count(*) FROM judgements WHERE error IS NOT NULL")[0][0] == 0
    assert not same_labels(labels(db), want)  # labels recomputed from the retried judgements


# -- factory show ----------------------------------------------------------------------------------------
def _show(db, row_id):
    return CliRunner().invoke(app, ["show", row_id, "--db", str(db)])


def test_show_verifies_every_kind_of_row_and_catches_tampering(tmp_path):
    db = tmp_path / "out.duckdb"
    prompts = prompts_file(tmp_path / "prompts.jsonl", 3)
    pipeline.run(sl_yaml(tmp_path / "sl.yaml", prompts=prompts, db=db, rounds=2), engine=fake(), quiet=True)
    sample = f"{{source: sample, prompts: {{path: {prompts}}}, n: 2, sampling: {{max_tokens: 16}}}}"
    prefs.run(prefs_yaml(tmp_path / "logprob.yaml", pairs="", db=db, name="lp", per_pair=2, source=sample),
              engine=fake(), quiet=True)
    prefs.run(prefs_yaml(tmp_path / "cot.yaml", pairs="", db=db, name="cot", per_pair=1, source=sample,
                         judge="mode: cot, cot_max_tokens: 16"), engine=fake(), quiet=True)
    ids = {t: query(db, f"SELECT id FROM {t} WHERE status = 'ok' ORDER BY id LIMIT 1")[0][0]
           for t in ("judgements", "rationales", "revisions", "samples")}
    cot_judgement = query(db, "SELECT id FROM judgements WHERE rationale IS NOT NULL ORDER BY id LIMIT 1")[0][0]
    for t, row_id in [*ids.items(), ("cot judgement", cot_judgement)]:
        r = _show(db, row_id)
        assert r.exit_code == 0 and "verified" in r.output and "MISMATCH" not in r.output, (t, r.output)
    import duckdb

    con = duckdb.connect(str(db))
    try:
        # a stored messages hash that does not match what the row's inputs render to
        con.execute("UPDATE judgements SET messages_hash = 'deadbeefdeadbeef' WHERE id = ?", [ids["judgements"]])
        # the stored text of a revision's messages, edited after the fact
        con.execute("UPDATE revisions SET messages = replace(messages, 'Question', 'Query') WHERE id = ?",
                    [ids["revisions"]])
        con.execute("UPDATE samples SET messages = replace(messages, 'Question', 'Query') WHERE id = ?", [ids["samples"]])
        # a principle's text in the stored constitution (what the CoT rationale and judgement re-render from)
        pid, chash = con.execute("SELECT principle_id, constitution_hash FROM rationales WHERE id = ?",
                                 [ids["rationales"]]).fetchone()
        body = json.loads(con.execute("SELECT body FROM configs WHERE config_hash = ?", [chash]).fetchone()[0])
        for p in body["principles"]:
            if p["id"] == pid:
                p["comparison"] = p["comparison"] + " (edited)"
        con.execute("UPDATE configs SET body = ? WHERE config_hash = ?", [json.dumps(body), chash])
    finally:
        con.close()
    for t, row_id in ids.items():
        r = _show(db, row_id)
        assert r.exit_code == 1 and "does not match" in r.output, (t, r.output)
