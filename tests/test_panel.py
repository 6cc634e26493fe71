"""Roles and panels: a policy and several judges on their own (fake) engines in one run.

Fake engines with distinct identities stand in for different models: each answers as a pure function
of its request and seed, so which engine answered shows in every row's ``model`` and key."""

from __future__ import annotations

import math
import random
import signal
import time
from pathlib import Path

import duckdb
import pytest
from runkit import (ANNOUNCE_COMMITS, child, kill9, labels, query, same_labels, slow_fake, table_rows,
                    wait_line, write_jsonl)

from conftest import REPO
from factory import prefs
from factory.engines.base import EngineError
from factory.engines.fake import FakeEngine
from factory.runner import EngineFailed
from factory.yamlconf import ConfigError


def prompts_file(tmp_path: Path, n: int = 12) -> Path:
    return write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"How do I keep my password {i} safe?"}
                                                    for i in range(n)])


JUDGES = """judges:
  - {name: j1, model: judge-one, engine: {kind: fake, seed: 0}}
  - {name: j2, model: judge-two, engine: {kind: fake, seed: 1}, weight: 2}
"""


def panel_yaml(tmp_path: Path, *, judges: str = JUDGES, name: str = "panel", db: str = "out.duckdb", n: int = 12,
               per_pair: int = 2, chunk_inputs: int = 1024, chunk_rows: int = 1024, extra: str = "") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"""kind: prefs
name: {name}
constitution: {REPO}/constitutions/harmless.yaml
policy: {{model: policy-x, engine: {{kind: fake, seed: 0}}}}
{judges}pairs: {{source: sample, prompts: {{path: {prompts_file(tmp_path, n)}}}, n: 3, sampling: {{max_tokens: 16}}}}
judge: {{template: {REPO}/prompts/judge.j2, per_pair: {per_pair}, seed: 0}}
answer_template: {REPO}/prompts/answer.j2
db: {tmp_path / db}
chunk_inputs: {chunk_inputs}
chunk_rows: {chunk_rows}
{extra}""")
    return path


def models_of(db: Path) -> tuple[set[str], dict[str, int]]:
    samples = {m for (m,) in query(db, "SELECT DISTINCT model FROM samples")}
    judged = dict(query(db, "SELECT model, count(*) FROM judgements GROUP BY 1"))
    return samples, judged


def test_old_pipelines_keep_their_run_ids(tmp_path, monkeypatch):
    from factory.kinds import load

    from conftest import HH_RLHF

    if not (REPO.parent / "shared/data/hh-rlhf").is_dir():  # a clone without ../shared beside it (FACTORY_HH_RLHF
        # set): hh-prefs.yaml's `../shared/...` path is read from the working directory, so give it one there
        (tmp_path / "shared/data").mkdir(parents=True)
        (tmp_path / "shared/data/hh-rlhf").symlink_to(HH_RLHF.parent)
        (tmp_path / "repo").mkdir()
        for d in ("constitutions", "prompts", "data"):
            (tmp_path / "repo" / d).symlink_to(REPO / d)
        monkeypatch.chdir(tmp_path / "repo")
    for path, want in ((REPO / "pipelines/demo.yaml", "demo-6a17a0a30c"),
                       (REPO / "pipelines/hh-prefs.yaml", "hh-prefs-6857ef6484")):
        _, lp = load(path)
        lp.engine_model = lp.expected_engine_model()
        assert lp.engine_model is not None and lp.run_id == want


def test_policy_rows_carry_the_policy_and_judgements_each_judge(tmp_path):
    s = prefs.run(panel_yaml(tmp_path), quiet=True)
    db = tmp_path / "out.duckdb"
    samples, judged = models_of(db)
    assert samples == {"fake:policy-x"}
    assert set(judged) == {"fake:judge-one", "fake:judge-two"}
    pairs = query(db, "SELECT count(*) FROM pairs WHERE status = 'ok'")[0][0]
    # every ok pair: 2 principles × 2 orders per judge
    assert judged["fake:judge-one"] == judged["fake:judge-two"] == pairs * 4
    # each judge's own label is kept, the panel label counts its judges
    per_judge = dict(query(db, "SELECT judge, count(*) FROM judge_preferences GROUP BY 1"))
    assert per_judge == {"j1": s.pairs, "j2": s.pairs}
    assert query(db, "SELECT min(n_judges), max(n_judges) FROM preferences") == [(2, 2)]
    assert s.labels["judges"] == 2


def test_changing_one_judge_recomputes_only_its_judgements(tmp_path):
    prefs.run(panel_yaml(tmp_path), quiet=True)
    db = tmp_path / "out.duckdb"
    before = {i: m for i, m in query(db, "SELECT id, model FROM judgements")}
    changed = JUDGES.replace("judge-two", "judge-three")
    s = prefs.run(panel_yaml(tmp_path, judges=changed), quiet=True)
    after = query(db, "SELECT id, model, run_id FROM judgements WHERE run_id = ?", [s.run_id])
    assert {m for _, m, _ in after} == {"fake:judge-three"}  # only the changed judge made new rows
    written = {st.table: st.written for st in s.stages}
    assert written.get("samples", 0) == 0 and written["judgements"] == len(after)
    assert sum(1 for m in before.values() if m == "fake:judge-one") == sum(
        1 for (m,) in query(db, f"SELECT model FROM {_run_rows(s.run_id)}") if m == "fake:judge-one")


def _run_rows(run_id: str) -> str:
    return f"""(SELECT t.model FROM judgements t WHERE t.run_id = '{run_id}' UNION ALL
               SELECT t.model FROM judgements t SEMI JOIN run_items i ON i.id = t.id AND i."table" = 'judgements'
               AND i.run_id = '{run_id}')"""


def test_a_judge_that_dies_fails_the_run_naming_it_and_the_rerun_resumes(tmp_path):
    path = panel_yaml(tmp_path, n=40, chunk_inputs=5, chunk_rows=16)
    ref = panel_yaml(tmp_path, n=40, name="ref", db="ref.duckdb")
    prefs.run(ref, quiet=True)
    engines = {"policy": FakeEngine("policy-x"), "j1": FakeEngine("judge-one"),
               "j2": FakeEngine("judge-two", seed=1, die_after=60)}
    with pytest.raises(EngineFailed, match="judge 'j2'"):
        prefs.run(path, engines=engines, quiet=True)
    db = tmp_path / "out.duckdb"
    status, error = query(db, "SELECT status, error FROM runs")[0]
    assert status == "failed" and "judge 'j2'" in error
    stored = query(db, "SELECT count(*) FROM judgements")[0][0]
    assert stored > 0
    s = prefs.run(path, quiet=True)  # resumes: what was stored is reused, not redone
    assert s.status == "done" and sum(st.reused for st in s.stages) > 0
    n, distinct = query(db, "SELECT count(*), count(DISTINCT id) FROM judgements")[0]
    assert n == distinct
    assert same_labels(labels(db), labels(tmp_path / "ref.duckdb")) == []


def test_policy_only_run_stores_samples_and_pairs_and_no_judgements(tmp_path):
    s = prefs.run(panel_yaml(tmp_path, judges="judges: []\n"), quiet=True)
    db = tmp_path / "out.duckdb"
    assert query(db, "SELECT count(*) FROM samples")[0][0] == 12 * 3
    assert s.pairs > 0 and query(db, "SELECT count(*) FROM judgements")[0][0] == 0
    assert query(db, "SELECT count(*) FROM preferences")[0][0] == 0
    # a panel judges those samples later without sampling again
    s2 = prefs.run(panel_yaml(tmp_path), quiet=True)
    assert {st.table: st.written for st in s2.stages}.get("samples", 0) == 0 and s2.pairs == s.pairs


def test_a_finished_run_rerun_starts_no_engine(tmp_path, monkeypatch):
    import factory.engines as E

    path = panel_yaml(tmp_path)
    prefs.run(path, quiet=True)
    built = []
    real = E.make_engine
    monkeypatch.setattr(E, "make_engine", lambda spec, model: built.append(model) or real(spec, model))
    s = prefs.run(path, quiet=True)
    assert s.status == "done" and built == [] and s.extra.get("noop")
    assert s.reused > 0


def test_duplicate_judge_names_are_an_error_at_the_line(tmp_path):
    dup = JUDGES.replace("name: j2", "name: j1")
    with pytest.raises(ConfigError) as e:
        prefs.load(panel_yaml(tmp_path, judges=dup))
    assert "duplicate judge name 'j1'" in str(e.value) and f"{tmp_path}/panel.yaml:7:" in str(e.value)


def test_a_judge_whose_engine_cannot_serve_the_mode_is_named(tmp_path):
    judges = JUDGES.replace("weight: 2}", "weight: 2, judge: {mode: reward_model}}")
    with pytest.raises(ConfigError, match="judge 'j2'.*judge.mode logprob") as e:  # found when the file loads
        prefs.run(panel_yaml(tmp_path, judges=judges), quiet=True)
    assert f"{tmp_path}/panel.yaml:7:" in str(e.value)  # j2's line
    rm = JUDGES.replace("engine: {kind: fake, seed: 1}, weight: 2", "kind: reward_model, judge: {mode: cot}")
    with pytest.raises(ConfigError, match="judge 'j2' is a reward model.*cannot answer judge.mode 'cot'"):
        prefs.load(panel_yaml(tmp_path, judges=rm))

    class RM(FakeEngine):
        kind = "reward_model"

    engines = {"policy": FakeEngine("policy-x"), "j1": FakeEngine("judge-one"), "j2": RM("rm")}
    with pytest.raises(EngineError, match="judge 'j2'.*reward_model"):
        prefs.run(panel_yaml(tmp_path), engines=engines, quiet=True)


def test_an_unreachable_judge_server_is_an_error_before_sampling(tmp_path):
    judges = JUDGES.replace("engine: {kind: fake, seed: 1}",
                            "engine: {kind: openai, base_url: 'http://127.0.0.1:9/v1', timeout_s: 2, max_retries: 0}")
    with pytest.raises(Exception, match="judge 'j2'"):
        prefs.run(panel_yaml(tmp_path, judges=judges), quiet=True)
    db = tmp_path / "out.duckdb"
    con = duckdb.connect(str(db), read_only=True)
    try:
        tables = {t for (t,) in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        assert "samples" not in tables or not con.execute("SELECT count(*) FROM samples").fetchone()[0]
    finally:
        con.close()


@pytest.mark.slow
def test_kill_9_during_a_panel_run_then_resume(tmp_path):
    """A policy and two judges, killed 4 times at random points, then resumed: every table equals an
    uninterrupted run's, row for row (0 lost, 0 duplicated), and so do the panel labels."""
    ref = panel_yaml(tmp_path, name="ref", db="ref.duckdb", n=120, chunk_inputs=10, chunk_rows=40)
    path = panel_yaml(tmp_path, n=120, chunk_inputs=10, chunk_rows=40)
    prefs.run(ref, quiet=True)
    rng = random.Random(20)
    for i in range(4):
        proc = child(["run", str(path), "--quiet"], prelude=ANNOUNCE_COMMITS + slow_fake(0.002))
        wait_line(proc, "READY")
        for _ in range(rng.choice([1, 2, 3])):
            wait_line(proc, "COMMIT")
        time.sleep(rng.uniform(0.0, 0.3))
        assert kill9(proc) == -signal.SIGKILL, f"kill {i + 1}: the run ended before it was killed"
    assert prefs.run(path, quiet=True).status == "done"
    db = tmp_path / "out.duckdb"
    want, got = table_rows(tmp_path / "ref.duckdb"), table_rows(db)
    from runkit import rows_differ

    diffs = {t: d for t in want if (d := rows_differ(want[t], got.get(t, []))) is not None}
    assert diffs == {}
    n, distinct = query(db, "SELECT count(*), count(DISTINCT id) FROM judgements")[0]
    assert n == distinct == len(want["judgements"])
    assert same_labels(labels(db), labels(tmp_path / "ref.duckdb")) == []


def test_panel_labels_match_a_hand_worked_example():
    """Two judges (j1 weight 2, j2 weight 1), principles p1 (weight 1) and p2 (weight 3).

    Pair X: j1 cells p1 (0.8+0.6)/2 = 0.7, p2 0.4 → j1 = (0.7 + 3·0.4)/4 = 0.475;
            j2 cells p1 0.9, p2 (0.5+0.7)/2 = 0.6 → j2 = (0.9 + 3·0.6)/4 = 0.675;
            panel = (2·0.475 + 0.675)/3 = 0.541667: within tie_eps 0.05 of 0.5 → a tie, no judge agrees.
    Pair Y: j1 cells p1 0.2, p2 (0.1+0.3)/2 = 0.2 → j1 = 0.2; j2 p1 0.7 (its p2 judgements failed) → 0.7;
            panel = (2·0.2 + 0.7)/3 = 0.366667 → b, one judge (j1) agrees."""
    from factory.labels import LabelRule, judge_labels_sql, labels_sql

    rows = []
    cells = {("x", "j1", "p1"): (0.8, 0.6), ("x", "j1", "p2"): (0.4, 0.4), ("x", "j2", "p1"): (0.9, 0.9),
             ("x", "j2", "p2"): (0.5, 0.7), ("y", "j1", "p1"): (0.2, 0.2), ("y", "j1", "p2"): (0.1, 0.3),
             ("y", "j2", "p1"): (0.7, 0.7), ("y", "j2", "p2"): (None, None)}
    for (pair, judge, p), (ab, ba) in cells.items():
        for order, pa in (("ab", ab), ("ba", ba)):
            pf = None if pa is None else (pa if order == "ab" else 1 - pa)
            rows.append((pair, p, order, "ok" if pa is not None else "failed", pf, pa, f"fake:{judge}", "h"))
    con = duckdb.connect()
    con.execute("""CREATE TABLE j (pair_id VARCHAR, principle_id VARCHAR, "order" VARCHAR, status VARCHAR,
                   p_first DOUBLE, p_a DOUBLE, model VARCHAR, sampling_hash VARCHAR)""")
    con.executemany("INSERT INTO j VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
    rule = LabelRule({"p1": 1.0, "p2": 3.0}, tie_eps=0.05, judges={"j1": 2.0, "j2": 1.0},
                     members=(("j1", "fake:j1", "h"), ("j2", "fake:j2", "h")))
    got = {r[0]: r[1:] for r in con.execute(
        f"SELECT pair_id, p_a, chosen, is_tie, n_judges, judges_agree, n_principles FROM ({labels_sql('j', rule)})"
    ).fetchall()}
    assert math.isclose(got["x"][0], (2 * 0.475 + 0.675) / 3) and got["x"][1:] == (None, True, 2, 0, 4)
    assert math.isclose(got["y"][0], (2 * 0.2 + 0.7) / 3) and got["y"][1:] == ("b", False, 2, 1, 3)
    per = {(r[0], r[1]): r[2:] for r in con.execute(
        f"SELECT pair_id, judge, p_a, chosen, is_tie FROM ({judge_labels_sql('j', rule)})").fetchall()}
    assert math.isclose(per[("x", "j1")][0], 0.475) and per[("x", "j1")][1:] == (None, True)
    assert math.isclose(per[("x", "j2")][0], 0.675) and per[("x", "j2")][1] == "a"
    assert math.isclose(per[("y", "j2")][0], 0.7) and per[("y", "j1")][1] == "b"
    # one judge: the panel rule is the single-judge rule (equal weights change nothing)
    single = LabelRule({"p1": 1.0, "p2": 3.0}, tie_eps=0.05)
    one = con.execute(f"SELECT p_a FROM ({labels_sql('(SELECT * FROM j WHERE model = $$fake:j1$$)', single)}) "
                      "ORDER BY pair_id").fetchall()
    assert [round(p, 12) for (p,) in one] == [0.475, 0.2]


def test_an_audit_of_a_panel_shows_each_judge_and_the_panel_side_by_side(tmp_path, hh_rlhf):
    """An audit pipeline with ``judges:``: every judge is audited against the humans beside the panel
    label, with the inter-judge figures, in the stored result, the HTML report and the terminal."""
    from factory.audit.run import audit

    path = tmp_path / "audit.yaml"
    path.write_text(f"""kind: audit
name: panel-audit
constitution: {REPO}/constitutions/harmless.yaml
human: {{path: {hh_rlhf}, limit: 40}}
judge: {{template: {REPO}/prompts/judge.j2, per_pair: 2}}
{JUDGES}db: {tmp_path / 'a.duckdb'}
audit: {{n_bootstrap: 50}}
""")
    audit_id, result, report = audit(path, quiet=True)
    panel = result.panel
    assert panel is not None and panel["judges"] == ["j1", "j2"] and panel["weights"] == {"j1": 1.0, "j2": 2.0}
    assert [b["name"] for b in panel["per_judge"]] == ["j1", "j2"] and panel["panel"]["n_pairs"] > 0
    for key in ("alpha", "fleiss"):
        assert panel[key]["n_items"] > 0
    # the panel block scores the stored panel labels: its agreement is recomputable from preferences
    html = Path(report).read_text()
    assert "Judges side by side" in html and "Krippendorff" in html
    judged = dict(query(tmp_path / "a.duckdb", "SELECT model, count(*) FROM judgements GROUP BY 1"))
    assert set(judged) == {"fake:judge-one", "fake:judge-two"}


def test_audit_fit_on_a_panel_learns_judge_by_principle_weights(tmp_path, hh_rlhf):
    """`factory audit fit` on a panel run fits one weight per (judge, principle); a run using that weight
    set labels with them (σ(Σ W_jk ℓ_jk)), recomputed here from the stored cells."""
    from factory.audit.fit import fit
    from factory.audit.run import audit
    from factory.labels import cells_sql, run_rule
    from factory.store import Store

    path = tmp_path / "audit.yaml"
    body = f"""kind: audit
name: panel-audit
constitution: {REPO}/constitutions/harmless.yaml
human: {{path: {hh_rlhf}, limit: 120, name: hh}}
judge: {{template: {REPO}/prompts/judge.j2, per_pair: 2}}
{JUDGES}db: {tmp_path / 'a.duckdb'}
audit: {{n_bootstrap: 20}}
"""
    path.write_text(body)
    audit(path, quiet=True)
    run_id = query(tmp_path / "a.duckdb", "SELECT run_id FROM runs WHERE kind = 'audit'")[0][0]
    r = fit(tmp_path / "a.duckdb", run_id, "hh", "panelfit", n_bootstrap=20)
    assert r.weights and all(k.split("/")[0] in ("j1", "j2") for k in r.weights)
    assert {k.split("/")[0] for k in r.weights} == {"j1", "j2"}
    path.write_text(body.replace("per_pair: 2}", "per_pair: 2, weights: panelfit}"))
    audit(path, quiet=True)
    with Store(tmp_path / "a.duckdb", read_only=True) as store:
        run2 = store.one("SELECT run_id FROM runs WHERE kind = 'audit' AND run_id <> ? ", [run_id])[0]
        rule = run_rule(store, run2)
        assert rule.pool == "logit" and rule.judges == {"j1": 1.0, "j2": 2.0}
        rel = store.run_rows("judgements", "$run")
        cells = store.con.execute(f"SELECT pair_id, judge, principle_id, l FROM ({cells_sql(rel, rule)})",
                                  {"run": run2}).fetchall()
        want: dict[str, float] = {}
        for pair, judge, principle, ell in cells:
            if ell is not None:
                want[pair] = want.get(pair, 0.0) + r.weights[f"{judge}/{principle}"] * ell
        got = dict(store.con.execute("SELECT pair_id, p_a FROM preferences WHERE run_id = ?", [run2]).fetchall())
    assert got and all(math.isclose(got[p], 1 / (1 + math.exp(-x)), rel_tol=1e-9) for p, x in want.items())


def test_a_finished_run_whose_input_grew_runs_again(tmp_path):
    path = panel_yaml(tmp_path)
    first = prefs.run(path, quiet=True)
    with open(tmp_path / "prompts.jsonl", "a") as f:
        f.write('{"prompt": "And one more question?"}\n')
    again = prefs.run(path, quiet=True)
    assert not again.extra.get("noop") and again.prompts == first.prompts + 1


def test_each_judge_may_judge_in_its_own_mode(tmp_path):
    """A judge's own `judge:` settings (here: sampled votes, 3 of them) apply to its judgements only."""
    judges = JUDGES.replace("weight: 2}", "weight: 2, judge: {mode: vote, vote: {votes: 3}}}")
    prefs.run(panel_yaml(tmp_path, judges=judges), quiet=True)
    rows = query(tmp_path / "out.duckdb", """SELECT model, count(*), count(verdicts), max(json_array_length(verdicts))
                                            FROM judgements GROUP BY 1 ORDER BY 1""")
    (m1, n1, v1, _), (m2, n2, v2, votes) = rows
    assert (m1, m2) == ("fake:judge-one", "fake:judge-two") and n1 == n2 > 0
    assert v1 == 0 and v2 == n2 and votes == 3
    modes = dict(query(tmp_path / "out.duckdb", "SELECT judge, mode FROM run_judges"))
    assert modes == {"j1": "logprob", "j2": "vote"}
