"""The Python API contract (factory.run / open / rows / preferences / export), overrides, the
main-module guard, and the readable-results commands (labels, status --pipeline, run --json)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pyarrow as pa
import pytest
from typer.testing import CliRunner

import factory
from conftest import REPO
from runkit import pair_records, prefs_yaml, write_jsonl

runner = CliRunner()


@pytest.fixture
def prefs_run(tmp_path):
    pairs = write_jsonl(tmp_path / "p.jsonl", pair_records(12, seed=3))
    path = prefs_yaml(tmp_path / "p.yaml", pairs=pairs, db=tmp_path / "p.duckdb", per_pair=2)
    return path, factory.run(path)


def test_import_factory_is_light():
    code = "import sys, factory; assert 'factory.api' not in sys.modules and 'duckdb' not in sys.modules; print('ok')"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.stdout.strip() == "ok", r.stderr


def test_run_open_rows_and_preferences(prefs_run):
    path, s = prefs_run
    assert s.status == "done" and s.pairs == 12
    db = factory.open(s.db)
    runs = db.runs()
    assert isinstance(runs, pa.Table) and runs.column("run_id").to_pylist() == [s.run_id]
    prefs = db.rows("preferences")
    assert isinstance(prefs, pa.Table) and prefs.num_rows == 12
    judgements = db.rows("judgements", run=s.run_id)
    assert judgements.num_rows == 12 * 2 * 2  # 2 principles × 2 orders
    labels = db.preferences(s.run_id, truncate=20)
    assert len(labels) == 12
    # one p_<principle> column per principle judged, matching the judgements' mean per order pair
    principles = sorted(set(judgements.column("principle_id").to_pylist()))
    assert [c for c in labels.columns if c.startswith("p_") and c != "p_a"] == [f"p_{p}" for p in principles]
    j = db.judgements(s.run_id)
    row = labels.iloc[0]
    for p in principles:
        got = j[(j.pair_id == row.pair_id) & (j.principle_id == p)].p_a
        assert (row[f"p_{p}"] != row[f"p_{p}"]) if got.empty else row[f"p_{p}"] == pytest.approx(got.mean())
    assert labels.prompt.str.len().max() <= 20 and labels.source_row.tolist() == sorted(labels.source_row.tolist())
    stored = {r["pair_id"]: r for r in prefs.to_pylist()}
    assert all(stored[r.pair_id]["p_a"] == pytest.approx(r.p_a) for r in labels.itertuples())
    ds = db.preferences(s.run_id, as_="dataset")
    assert ds.num_rows == 12
    with pytest.raises(factory.ApiError, match="no table 'nope'"):
        db.rows("nope")


def test_overrides_dotted_and_nested(tmp_path):
    pairs = write_jsonl(tmp_path / "p.jsonl", pair_records(10, seed=1))
    path = prefs_yaml(tmp_path / "p.yaml", pairs=pairs, db=tmp_path / "p.duckdb", per_pair=2)
    s = factory.run(path, **{"pairs.limit": 4}, judge={"per_pair": 1}, db=str(tmp_path / "other.duckdb"))
    assert s.pairs == 4 and s.db == str(tmp_path / "other.duckdb")
    assert factory.open(s.db).rows("judgements").num_rows == 4 * 1 * 2
    assert not (tmp_path / "p.duckdb").exists()
    # the same changes written into a file give the same run id
    text = path.read_text().replace(f"db: {tmp_path / 'p.duckdb'}", f"db: {tmp_path / 'other.duckdb'}")
    (tmp_path / "q.yaml").write_text(text.replace("per_pair: 2", "per_pair: 1").replace(
        f"path: {pairs}}}", f"path: {pairs}, limit: 4}}"))
    from factory.kinds import load

    lp = load(tmp_path / "q.yaml")[1]
    lp.engine_model = lp.expected_engine_model()
    assert lp.run_id == s.run_id
    with pytest.raises(factory.ApiError, match="not a mapping"):
        factory.run(path, **{"name.x": 1})


def test_run_in_a_spawned_worker_names_the_main_guard(tmp_path):
    """A script without `if __name__ == "__main__":` that starts a spawned process (as vLLM on CPU does):
    the child re-imports the script, and factory.run there says what to do instead of running again."""
    pairs = write_jsonl(tmp_path / "p.jsonl", pair_records(3))
    path = prefs_yaml(tmp_path / "p.yaml", pairs=pairs, db=tmp_path / "p.duckdb", per_pair=1)
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(f"""
        import multiprocessing, factory
        s = factory.run({str(path)!r})
        print("ran", s.status, multiprocessing.current_process().name, flush=True)
        p = multiprocessing.get_context("spawn").Process(target=print, args=("child",))
        p.start(); p.join()
        print("child exit", p.exitcode, flush=True)
    """))
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert "ran done MainProcess" in r.stdout
    assert "child exit 1" in r.stdout
    assert 'if __name__ == "__main__":' in r.stderr and "re-imports the main module" in r.stderr


def test_cli_labels_status_pipeline_and_json(prefs_run, tmp_path):
    from factory.cli import app

    path, s = prefs_run
    r = runner.invoke(app, ["run", str(path), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["run_id"] == s.run_id and d["status"] == "done" and d["reused"] == 12 * 2 * 2
    assert d["extra"]["cost"]["labels"] == 12
    r = runner.invoke(app, ["status", "--pipeline", str(path)])
    assert r.exit_code == 0 and s.run_id in r.output and "tokens/label" in r.output, r.output
    r = runner.invoke(app, ["labels", "--db", s.db, "--run", s.run_id, "--limit", "3"])
    assert r.exit_code == 0 and "3 of 12 pairs" in r.output, r.output
    out = tmp_path / "labels.parquet"
    r = runner.invoke(app, ["labels", "--pipeline", str(path), "--out", str(out)])
    assert r.exit_code == 0, r.output
    import pyarrow.parquet as pq

    t = pq.read_table(out)
    assert t.num_rows == 12 and {"chosen", "p_a", "margin", "is_tie", "orders_agree", "principles_agree"} <= set(t.column_names)


def test_numbers_never_print_in_exponent_notation():
    from factory.results import fmt

    assert fmt(1070.0) == "1,070" and fmt(1234567.891) == "1,234,568" and fmt(10**7) == "10,000,000"
    assert fmt(0.5134) == "0.513" and fmt(12.5) == "12.5" and fmt(float("nan")) == "—"
    assert all("e+" not in fmt(x) for x in (1.07e3, 9.9e5, 3.3e9))


def test_price_is_reported_and_left_out_of_the_run_id(tmp_path):
    pairs = write_jsonl(tmp_path / "p.jsonl", pair_records(5))
    plain = prefs_yaml(tmp_path / "a.yaml", pairs=pairs, db=tmp_path / "a.duckdb", per_pair=1)
    priced = prefs_yaml(tmp_path / "b.yaml", pairs=pairs, db=tmp_path / "a.duckdb", per_pair=1,
                        engine="{kind: fake, price: {prompt: 2.0, completion: 10.0}}")
    a = factory.run(plain)
    b = factory.run(priced)
    assert a.run_id == b.run_id  # the price is not part of what the run makes
    c = b.extra["cost"]
    j = factory.open(b.db).judgements(b.run_id)
    assert c["prompt_tokens"] == j.prompt_tokens.sum() and c["completion_tokens"] == j.completion_tokens.sum()
    usd = j.prompt_tokens.sum() / 1e6 * 2.0 + j.completion_tokens.sum() / 1e6 * 10.0
    assert c["usd"] == pytest.approx(usd) and c["usd_per_1k_labels"] == pytest.approx(usd / 5 * 1000)
    assert a.extra["cost"]["usd"] is None


def test_constitution_header_says_pooling_weight_and_comments_are_not_hashed(tmp_path):
    """The shipped header comment now calls `weight` the pooling weight; comments are not part of a
    constitution's hash, so the old wording (or no header at all) gives the same hash."""
    from factory.constitution import load_constitution

    for name in ("harmless", "helpful", "honest"):
        src = REPO / "constitutions" / f"{name}.yaml"
        text = src.read_text()
        assert "sampling weight" not in text and "pooling weight" in text
        old = tmp_path / f"{name}-old.yaml"
        old.write_text(text.replace("optional pooling weight", "optional relative sampling weight"))
        bare = tmp_path / f"{name}-bare.yaml"
        bare.write_text("\n".join(l for l in text.splitlines() if not l.startswith("#")) + "\n")
        h = load_constitution(src).hash
        assert load_constitution(old).hash == h == load_constitution(bare).hash


def test_vllm_logging_is_quiet_unless_verbose():
    """What `factory run` sets before vLLM is imported (its workers inherit the environment)."""
    code = ("import os, factory.api as a; a.quiet_engines({v}); "
            "print(os.environ['VLLM_LOGGING_LEVEL'], 'resource_tracker' in os.environ.get('PYTHONWARNINGS', ''))")
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("VLLM_LOGGING_LEVEL", "PYTHONWARNINGS")}
    env["PYTHONPATH"] = str(REPO)
    quiet = subprocess.run([sys.executable, "-c", code.format(v=False)], env=env, capture_output=True, text=True)
    loud = subprocess.run([sys.executable, "-c", code.format(v=True)], env=env, capture_output=True, text=True)
    assert quiet.stdout.split() == ["ERROR", "True"], quiet.stderr
    assert loud.stdout.split()[0] == "INFO", loud.stderr
