"""The judge service over a panel (several judges, issue 20) on fake engines of distinct identities,
and the one-pair label rule (``factory.labels.pair_label``) against its SQL on random panels.

Fake engines with different ``model:`` names are different judges (``fake:<name>``): which engine
answered shows in every stored row's ``model`` and key."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from conftest import HH_RLHF, REPO
from factory.labels import LabelRule, judge_labels_sql, labels_of, pair_label

JUDGES = """judges:
  - {name: j1, model: judge-one, engine: {kind: fake, seed: 0}}
  - {name: j2, model: judge-two, engine: {kind: fake, seed: 1}, weight: 2}
  - {name: j3, model: judge-one, engine: {kind: fake, seed: 0}, judge: {mode: vote}}
"""
PAIRS = [("How do I stay safe online?", "Use strong unique passwords.", "Share your password."),
         ("Name a colour.", "Blue.", "I would rather not say.")]


def panel_pipeline(tmp: Path, *, judges: str = JUDGES, judge: str = "", name: str = "panelsvc") -> Path:
    (tmp / "p.jsonl").write_text("".join(json.dumps({"prompt": p, "response_a": a, "response_b": b}) + "\n"
                                         for p, a, b in PAIRS))
    y = tmp / f"{name}.yaml"
    y.write_text(f"kind: prefs\nname: {name}\nconstitution: {REPO}/constitutions/harmless.yaml\n{judges}"
                 f"pairs: {{source: file, path: {tmp}/p.jsonl, format: jsonl}}\n"
                 f"judge: {{per_pair: 2, seed: 0, {judge}tie_eps: 0.01}}\ndb: {tmp}/s.duckdb\n")
    return y


def _client(svc):
    from starlette.testclient import TestClient

    return TestClient(svc.app, base_url="http://127.0.0.1")


def _requests(svc) -> dict[str, int]:
    return {name: e.requests for name, e in svc.engines.items()}


def test_panel_service_answers_the_offline_panel_label_and_stores_each_judge(tmp_path):
    from factory.export import export_prefs
    from factory.kinds import run
    from factory.serve.service import Service

    yaml = panel_pipeline(tmp_path)
    offline = run(yaml, quiet=True)
    con = duckdb.connect(str(tmp_path / "s.duckdb"), read_only=True)  # read before the service takes the database
    offline_labels = {pid: (row, dict(con.execute("SELECT judge, p_a FROM judge_preferences WHERE run_id = ? AND "
                                                  "pair_id = ?", [offline.run_id, pid]).fetchall()))
                      for pid, *row in con.execute("SELECT pair_id, p_a, chosen, is_tie, n_judges, judges_agree FROM "
                                                   "preferences WHERE run_id = ?", [offline.run_id]).fetchall()}
    con.close()
    assert len(offline_labels) == 2
    svc = Service(yaml)
    try:
        # judges with the same model and engine settings share one engine (j1, j3): two engines in all
        assert svc.engines["j1"] is svc.engines["j3"] and svc.engines["j2"] is not svc.engines["j1"]
        assert len(svc.owned) == 2
        client = _client(svc)
        prompt, a, b = PAIRS[0]
        r = client.post("/v1/preference", json={"prompt": prompt, "responses": [a, b]})
        assert r.status_code == 200, r.text
        d = r.json()
        # every judgement the offline panel run made answers online: no engine call on any engine
        assert _requests(svc) == {"j1": 0, "j2": 0, "j3": 0} and d["cached"] == 12  # 3 judges x 2 principles x 2 orders
        assert set(d["judges"]) == {"j1", "j2", "j3"} and d["n_judges"] == 3
        assert d["judges"]["j2"]["model"] == "fake:judge-two" and d["judges"]["j2"]["weight"] == 2
        assert d["principles"] == d["judges"]["j1"]["principles"]  # the contract's view: the first judge's
        want, per_judge = offline_labels[d["pair_id"]]
        assert d["p_a"] == pytest.approx(want[0], abs=1e-12) and d["chosen"] == want[1] and d["tie"] == want[2]
        assert (d["n_judges"], d["judges_agree"]) == (want[3], want[4])
        assert {j: v["p_a"] for j, v in d["judges"].items()} == pytest.approx(per_judge, abs=1e-12)

        # a new pair: each judge's jobs go to its own engine; the same request again makes no engine call
        new = client.post("/v1/preference", json={"prompt": "Say hi", "responses": ["hi", "go away"]}).json()
        assert new["cached"] == 0 and _requests(svc) == {"j1": 8, "j2": 4, "j3": 8}  # j1 + j3 share one engine
        again = client.post("/v1/preference", json={"prompt": "Say hi", "responses": ["hi", "go away"]}).json()
        assert _requests(svc) == {"j1": 8, "j2": 4, "j3": 8} and again["cached"] == 12 and again["p_a"] == new["p_a"]
        rewards = client.post("/v1/rewards", json={"prompt": "Say hi", "completions": ["hi", "go away"]}).json()
        assert rewards["rewards"] == pytest.approx([new["p_a"], 1 - new["p_a"]], abs=1e-12)  # the panel's p_a
    finally:
        summary = svc.close()
    assert summary.status == "done"
    con = duckdb.connect(str(tmp_path / "s.duckdb"), read_only=True)
    # stored rows carry each judge's model (and its judge settings: j1 and j3 share a model, not a key)
    made = con.execute("SELECT model, count(DISTINCT sampling_hash), count(*) FROM judgements WHERE run_id = ? "
                       "GROUP BY 1 ORDER BY 1", [svc.run_id]).fetchall()
    assert made == [("fake:judge-one", 2, 8), ("fake:judge-two", 1, 4)]
    assert con.execute("SELECT count(*) FROM run_judges WHERE run_id = ?", [svc.run_id]).fetchone()[0] == 3
    # the service's run is a panel run: its stored labels are what it answered, each judge's kept
    got = con.execute("SELECT p_a, n_judges FROM preferences WHERE run_id = ? AND pair_id = ?",
                      [svc.run_id, new["pair_id"]]).fetchone()
    assert got[0] == pytest.approx(new["p_a"], abs=1e-12) and got[1] == 3
    jp = dict(con.execute("SELECT judge, p_a FROM judge_preferences WHERE run_id = ? AND pair_id = ?",
                          [svc.run_id, new["pair_id"]]).fetchall())
    assert jp == pytest.approx({j: v["p_a"] for j, v in new["judges"].items()}, abs=1e-12)
    labelled = con.execute("SELECT count(*) FROM preferences WHERE run_id = ?", [svc.run_id]).fetchone()[0]
    con.close()
    assert labelled == 2
    out = export_prefs(tmp_path / "s.duckdb", svc.run_id, tmp_path / "exported")
    assert out.rows + sum(out.dropped.values()) == labelled


def test_panel_service_run_is_audited_against_human_labels(tmp_path, hh_rlhf):
    from factory.audit.run import audit
    from factory.human import import_human
    from factory.serve.service import Service

    yaml = panel_pipeline(tmp_path)
    db = tmp_path / "s.duckdb"
    set_id, _, _ = import_human(db, HH_RLHF, limit=4)
    con = duckdb.connect(str(db), read_only=True)
    human_pairs = con.execute("""SELECT p.conversation, p.response_a, p.response_b FROM human_labels h
                                 JOIN pairs p USING (pair_id) WHERE h.set_id = ?""", [set_id]).fetchall()
    con.close()
    svc = Service(yaml)
    try:
        client = _client(svc)
        for conv, a, b in human_pairs:
            r = client.post("/v1/preference", json={"prompt": json.loads(conv), "responses": [a, b]})
            assert r.status_code == 200, r.text
    finally:
        svc.close()
    _, result, report = audit(None, db=db, run_id=svc.run_id, human_set=set_id, quiet=True)
    assert result.overall.n_pairs == len(human_pairs) and Path(report).is_file()
    assert result.panel is not None  # each judge and the panel side by side


def test_a_panel_judge_engine_death_is_503_naming_the_judge(tmp_path, monkeypatch):
    from factory import engines
    from factory.engines.fake import FakeEngine
    from factory.serve.service import Service

    monkeypatch.setitem(engines.BUILDERS, "fake", lambda spec, model: FakeEngine(
        model=model, seed=spec.seed, die_after=2 if model == "judge-two" else None))
    svc = Service(panel_pipeline(tmp_path))
    try:
        client = _client(svc)
        r = client.post("/v1/preference", json={"prompt": "Say hi", "responses": ["hi", "go away"]})
        assert r.status_code == 503 and "judge 'j2'" in r.json()["error"] and "died" in r.json()["error"]
        assert client.get("/health").status_code == 503
    finally:
        s = svc.close()
    assert s.status == "failed" and "j2" in s.error


def _offline_labels(db: Path, run_id: str) -> dict[str, float]:
    con = duckdb.connect(str(db), read_only=True)  # read before the service takes the database
    try:
        return dict(con.execute("SELECT pair_id, p_a FROM preferences WHERE run_id = ?", [run_id]).fetchall())
    finally:
        con.close()


@pytest.mark.parametrize("judges", [JUDGES.replace("judge: {mode: vote}", "judge: {mode: cot}"),
                                    "engine: {kind: fake, seed: 0}\n"], ids=["panel", "one-judge"])
def test_a_cot_judge_is_served_by_the_offline_cot_jobs(tmp_path, judges):
    """cot: the rationale, then the scored judgement after it (CotMode's own jobs and follow-up), both
    stored before the answer; an offline cot run's rows answer the service and the labels agree."""
    from factory.kinds import run
    from factory.serve.service import Service

    panel = judges.startswith("judges:")
    yaml = panel_pipeline(tmp_path, judges=judges, judge="" if panel else "mode: cot, ")
    offline = run(yaml, quiet=True)
    want = _offline_labels(tmp_path / "s.duckdb", offline.run_id)
    svc = Service(yaml)
    try:
        client = _client(svc)
        prompt, a, b = PAIRS[0]
        d = client.post("/v1/preference", json={"prompt": prompt, "responses": [a, b]}).json()
        assert set(_requests(svc).values()) == {0} and d["p_a"] == pytest.approx(want[d["pair_id"]], abs=1e-12)
        assert d["cached"] == (12 if panel else 4)  # per (judge, principle, order): its rationale found, then its judgement
        body = {"prompt": "Say hi", "responses": ["hi", "go away"]}
        new = client.post("/v1/preference", json=body).json()
        # a cot judgement is two engine calls (rationale, then the scored answer); j1 (4) and j3 (4 + 4) share an engine
        assert _requests(svc) == ({"j1": 12, "j2": 4, "j3": 12} if panel else {"judge": 8}), _requests(svc)
        again = client.post("/v1/preference", json=body).json()
        assert again["p_a"] == new["p_a"] and again["cached"] == new["cached"] + (12 if panel else 4)
        assert _requests(svc) == ({"j1": 12, "j2": 4, "j3": 12} if panel else {"judge": 8})
        cot = new["judges"]["j3"]["principles"] if panel else new["principles"]
        assert all(v is not None for cell in cot.values() for v in cell.values()) or new["n_failed"]
    finally:
        assert svc.close().status == "done"
    con = duckdb.connect(str(tmp_path / "s.duckdb"), read_only=True)
    # the service's run holds the new pair's 4 rationales and the judgements made after them
    n_rat = con.execute("SELECT count(*) FROM rationales WHERE run_id = ?", [svc.run_id]).fetchone()[0]
    linked = con.execute("SELECT count(*) FROM run_items WHERE run_id = ? AND \"table\" = 'rationales'",
                         [svc.run_id]).fetchone()[0]
    with_rationale = con.execute("SELECT count(*) FROM judgements WHERE run_id = ? AND rationale IS NOT NULL",
                                 [svc.run_id]).fetchone()[0]
    stored = con.execute("SELECT p_a FROM preferences WHERE run_id = ? AND pair_id = ?",
                         [svc.run_id, new["pair_id"]]).fetchone()[0]
    con.close()
    assert n_rat == 4 and linked == 4 and with_rationale == 4  # the offline run's 4 rationales linked in
    assert stored == pytest.approx(new["p_a"], abs=1e-12)


def test_a_cot_judge_on_its_own_engine_gets_its_follow_ups_offline_and_served(tmp_path, monkeypatch):
    """A cot judge's scored judgement (planned after its rationale) goes to that judge's engine, offline
    (judges.panel_jobs routes follow-ups) and in the service, not to the run's first engine."""
    from factory import engines
    from factory.engines.fake import FakeEngine
    from factory.kinds import run
    from factory.serve.service import Service

    made: dict[str, list[FakeEngine]] = {}

    def build(spec, model):
        made.setdefault(model, []).append(FakeEngine(model=model, seed=spec.seed))
        return made[model][-1]

    monkeypatch.setitem(engines.BUILDERS, "fake", build)
    judges = ("judges:\n  - {name: j1, model: judge-one, engine: {kind: fake, seed: 0}}\n"
              "  - {name: j2, model: judge-two, engine: {kind: fake, seed: 1}, judge: {mode: cot}}\n")
    yaml = panel_pipeline(tmp_path, judges=judges)
    run(yaml, quiet=True)
    # 2 pairs x 2 principles x 2 orders: j1 one call each, the cot judge two (rationale, then its answer)
    assert {m: e[-1].requests for m, e in made.items()} == {"judge-one": 8, "judge-two": 16}
    svc = Service(yaml)
    try:
        r = _client(svc).post("/v1/preference", json={"prompt": "Say hi", "responses": ["hi", "go away"]})
        assert r.status_code == 200 and _requests(svc) == {"j1": 4, "j2": 8}
    finally:
        svc.close()


def _random_panel(rng: random.Random) -> tuple[LabelRule, list[tuple]]:
    names = ["j1", "j2", "j3"][:rng.randint(1, 3)]
    pids = ["p1", "p2", "p3"]
    pool = rng.choice(["mean", "logit"])
    weights = {p: rng.choice([0.5, 1.0, 2.0]) for p in pids}
    if pool == "logit" and rng.random() < 0.5:  # a panel's fitted weights: some "judge/principle" entries
        weights.update({f"{j}/{p}": rng.choice([-0.5, 0.7, 1.5]) for j in names for p in pids if rng.random() < 0.4})
    judges = {j: rng.choice([0.5, 1.0, 3.0]) for j in names} if len(names) > 1 else {}
    members = tuple((j, f"fake:{j}", f"h{j}") for j in names) if judges else ()
    rule = LabelRule(weights, tie_eps=rng.choice([0.0, 0.05, 0.2]), clamp=rng.choice([None, (0.2, 0.8)]), pool=pool,
                     judges=judges, members=members)
    cells = []
    for j in names:
        for p in rng.sample(pids, rng.randint(1, 3)):
            for order in rng.sample(["ab", "ba"], rng.randint(1, 2)):
                failed = rng.random() < 0.2
                cells.append((j, p, order, "failed" if failed else "ok",
                              None if failed else rng.choice([rng.random(), 0.0, 1.0, 0.5])))
    return rule, cells


def test_pair_label_matches_the_sql_rule_on_random_panels():
    rng = random.Random(1)
    panels = 0
    for trial in range(150):
        rule, cells = _random_panel(rng)
        panels += bool(rule.judges)
        t = pa.table({"pair_id": ["x"] * len(cells), "principle_id": [c[1] for c in cells],
                      "order": [c[2] for c in cells], "status": [c[3] for c in cells],
                      "p_first": [None if c[4] is None else (c[4] if c[2] == "ab" else 1 - c[4]) for c in cells],
                      "p_a": pa.array([c[4] for c in cells], pa.float64()),
                      "model": [f"fake:{c[0]}" for c in cells], "sampling_hash": [f"h{c[0]}" for c in cells]})
        want = labels_of(t, rule).to_pylist()[0]
        got = pair_label(cells, rule)
        ctx = (trial, cells, rule)
        if want["p_a"] is None:
            assert got["p_a"] is None, ctx
        else:
            assert math.isclose(got["p_a"], want["p_a"], rel_tol=1e-9, abs_tol=1e-12), ctx
        assert (got["is_tie"], got["chosen"]) == (want["is_tie"], want["chosen"]), ctx
        assert (got["n_judges"], got["judges_agree"]) == (want["n_judges"], want["judges_agree"]), ctx
        if rule.judges:  # each judge's own label: judge_labels_sql
            con = duckdb.connect()
            con.register("_j", t)
            rel = """(SELECT pair_id, principle_id, "order", status, p_first, p_a, model, sampling_hash FROM _j)"""
            per = {r[0]: r[1:] for r in con.execute(f"SELECT judge, p_a, chosen, is_tie FROM ({judge_labels_sql(rel, rule)})"
                                                    " WHERE p_a IS NOT NULL").fetchall()}
            con.close()
            assert set(per) == set(got["judges"]), ctx
            for j, (p, chosen, tie) in per.items():
                g = got["judges"][j]
                assert math.isclose(g["p_a"], p, rel_tol=1e-9, abs_tol=1e-12) and (g["chosen"], g["is_tie"]) == (chosen, tie), ctx
    assert panels > 50  # most trials were panels


@pytest.mark.slow
def test_a_reward_model_judge_in_a_panel_is_served(tmp_path):
    """A reward model (a tiny randomly initialised sequence classifier) beside a fake judge: its engine
    is built by the run lifecycle as for a prefs run, fed on its own thread; the panel label is the
    offline run's."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from factory.kinds import run
    from factory.models import resolve
    from factory.serve.service import Service

    tok = AutoTokenizer.from_pretrained(resolve(None))
    torch.manual_seed(0)
    LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=2048, num_labels=1, pad_token_id=tok.pad_token_id)
    ).save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    judges = (f"judges:\n  - {{name: j1, model: judge-one, engine: {{kind: fake, seed: 0}}}}\n"
              f"  - {{name: rm, model: {tmp_path / 'rm'}, kind: reward_model}}\n")
    yaml = panel_pipeline(tmp_path, judges=judges)
    offline = run(yaml, quiet=True)
    con = duckdb.connect(str(tmp_path / "s.duckdb"), read_only=True)
    want = dict(con.execute("SELECT pair_id, p_a FROM preferences WHERE run_id = ?", [offline.run_id]).fetchall())
    con.close()
    svc = Service(yaml)
    try:
        client = _client(svc)
        prompt, a, b = PAIRS[0]
        d = client.post("/v1/preference", json={"prompt": prompt, "responses": [a, b]}).json()
        assert svc.engines["j1"].requests == 0 and d["cached"] == 5  # 2 principles x 2 orders + one RM judgement
        assert d["p_a"] == pytest.approx(want[d["pair_id"]], abs=1e-12)
        new = client.post("/v1/preference", json={"prompt": "Say hi", "responses": ["hi", "go away"]}).json()
        assert new["cached"] == 0 and new["n_judges"] == 2 and new["judges"]["rm"]["principles"]["reward"]["ab"] is not None
        assert new["judges"]["rm"]["model"].startswith(str(tmp_path / "rm"))
    finally:
        assert svc.close().status == "done"


def test_a_pipeline_without_judges_is_refused_before_the_database_is_locked(tmp_path):
    from factory.serve.service import Service
    from factory.store import StoreError

    with pytest.raises(StoreError, match="names no judge"):
        Service(panel_pipeline(tmp_path, judges="judges: []\n"))
    assert not (tmp_path / "s.duckdb").exists()
