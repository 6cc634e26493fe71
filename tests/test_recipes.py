"""Recipes (`kind: recipe`): the step graph, rounds, skip on rerun, reruns of only what changed, lineage,
bad input at its line, and kill -9 inside a step then resume. Fast tier: the fake engine and the `copy`
stub trainer (a 'trained' model is a copy of its base folder plus a record); the embedded-model recipe
and the training kill are marked train (slow)."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from conftest import REPO
from factory.recipes.execute import run_recipe
from factory.recipes.lineage import lineage
from factory.recipes.spec import load_recipe
from factory.yamlconf import ConfigError
from runkit import ANNOUNCE_COMMITS, child, finish, invoke, kill9, query, slow_fake, wait_line

STEPS = """steps:
  - {{id: sl, once: true, run: {d}/sl.yaml, set: {{prompts.limit: 6}}}}
  - {{id: sft_data, once: true, export: sft, from: sl}}
  - {{id: sft, once: true, train: sft, data: sft_data, model: {d}/base, trainer: {trainer}}}
  - {{id: prompts, prompts: {d}/prompts.jsonl, n: 5, seed: 0, fresh: true}}
  - id: pairs
    run: {d}/prefs.yaml
    set: {{model: {{step: policy}}, pairs.prompts.path: {{step: prompts}}}}
  - {{id: prefs, export: prefs, from: pairs{export_extra}}}
  - {{id: dpo, train: dpo, data: prefs, model: {{step: policy}}, trainer: {trainer}{dpo_extra}}}
  - {{id: rm, train: rm, data: prefs, model: {d}/base, trainer: {trainer}}}
"""


def setup_files(d: Path, *, trainer: str = "copy", dpo_extra: str = "", export_extra: str = "", rounds: int = 2,
                extra_steps: str = "") -> Path:
    (d / "base").mkdir(exist_ok=True)
    (d / "base" / "config.json").write_text('{"model_type": "llama"}')
    (d / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"How do I fix thing number {i}?"}) + "\n"
                                             for i in range(40)))
    common = f"""constitution: {REPO}/constitutions/harmless.yaml
engine: {{kind: fake}}
db: {d}/ignored.duckdb
"""
    (d / "sl.yaml").write_text(f"""name: s
prompts: {{path: {d}/prompts.jsonl}}
templates: {{answer: {REPO}/prompts/answer.j2, critique: {REPO}/prompts/critique.j2, revise: {REPO}/prompts/revise.j2}}
model: {d}/base
rounds: 1
sampling: {{answer: {{max_tokens: 16}}, critique: {{max_tokens: 16}}, revise: {{max_tokens: 16}}}}
{common}""")
    (d / "prefs.yaml").write_text(f"""kind: prefs
name: p
pairs: {{source: sample, prompts: {{path: {d}/prompts.jsonl}}, n: 2, sampling: {{max_tokens: 16}}}}
judge: {{template: {REPO}/prompts/judge.j2, per_pair: 2}}
answer_template: {REPO}/prompts/answer.j2
{common}""")
    path = d / "recipe.yaml"
    path.write_text(f"""kind: recipe
name: t
db: {d}/r.duckdb
state_dir: {d}/state
rounds: {rounds}
policy: {{first: sft, next: dpo}}
""" + STEPS.format(d=d, trainer=trainer, dpo_extra=dpo_extra, export_extra=export_extra) + extra_steps)
    return path


def statuses(summary) -> dict[tuple[str, int], str]:
    return {(s.step, s.round): s.status for s in summary.steps}


def test_step_graph_orders_steps_and_expands_rounds(tmp_path):
    r = load_recipe(setup_files(tmp_path))
    assert r.order.index("sl") < r.order.index("sft_data") < r.order.index("sft")
    assert r.order.index("prompts") < r.order.index("pairs") < r.order.index("prefs") < r.order.index("dpo")
    nodes = r.nodes()
    assert nodes[:3] == [("sl", 0), ("sft_data", 0), ("sft", 0)]
    assert [n for n in nodes if n[0] == "pairs"] == [("pairs", 1), ("pairs", 2)]
    assert nodes.index(("dpo", 1)) < nodes.index(("pairs", 2))
    assert {e.dst for e in r.steps["pairs"].deps} == {"policy", "prompts"}


def test_two_rounds_on_the_fake_engine_wire_policy_lineage_and_skip(tmp_path):
    path = setup_files(tmp_path)
    s = run_recipe(path, quiet=True)
    assert s.status == "done", s.error
    assert set(statuses(s).values()) == {"done"} and len(s.steps) == 3 + 5 * 2
    out = {(x.step, x.round): x.output for x in s.steps}
    db = tmp_path / "r.duckdb"
    models = dict(query(db, "SELECT run_id, model FROM runs"))
    # round 1 samples with the SFT model, round 2 with round 1's DPO model
    assert models[out[("pairs", 1)]["run_id"]] == out[("sft", 0)]["value"]
    assert models[out[("pairs", 2)]["run_id"]] == out[("dpo", 1)]["value"]
    assert models[out[("sl", 0)]["run_id"]] == str(tmp_path / "base")
    # round 2's prompts are a fresh slice, disjoint from round 1's
    p1, p2 = (set(Path(out[("prompts", k)]["value"]).read_text().splitlines()) for k in (1, 2))
    assert len(p1) == len(p2) == 5 and not p1 & p2
    # lineage rows: every trained model, its base, runs and export
    rows = {r[0]: r[1:] for r in query(db, "SELECT step || '-' || round, base_model, runs_json, exports_json FROM models")}
    assert set(rows) == {"sft-0", "dpo-1", "rm-1", "dpo-2", "rm-2"}
    assert rows["dpo-2"][0] == out[("dpo", 1)]["value"]
    assert json.loads(rows["dpo-2"][1]) == [out[("pairs", 2)]["run_id"]]
    assert json.loads(rows["dpo-1"][2])[0]["path"] == out[("prefs", 1)]["value"]
    chain = lineage(db, out[("dpo", 2)]["value"])
    assert chain["base"]["id"] == out[("dpo", 1)]["model_id"]
    assert chain["base"]["base"]["id"] == out[("sft", 0)]["model_id"]
    assert chain["trained_on"][0]["id"] == out[("pairs", 2)]["run_id"]
    assert "harmless" in chain["trained_on"][0]["constitution"]
    r1 = lineage(db, out[("dpo", 1)]["value"])
    assert [a["run_id"] for a in r1["answered"]] == [out[("pairs", 2)]["run_id"]]
    # the report has a row per round
    assert [r["round"] for r in s.report["rounds"]] == [1, 2]
    assert all(r.get("tie_rate") is not None and r.get("sample_chars") for r in s.report["rounds"])
    assert Path(s.report["html"]).read_text().count("<tr>") == 3
    # a rerun does nothing
    n_runs = query(db, "SELECT count(*) FROM runs")[0][0]
    again = run_recipe(path, quiet=True)
    assert set(statuses(again).values()) == {"skipped"}
    assert query(db, "SELECT count(*) FROM runs")[0][0] == n_runs


def test_the_report_has_agreement_behaviour_and_label_signals_per_round(tmp_path, hh_rlhf):
    """An audit step (judge–human agreement) and a behaviour eval on the fake engine feed the report."""
    (tmp_path / "audit.yaml").write_text(f"""kind: audit
name: a
constitution: {REPO}/constitutions/harmless.yaml
human: {{path: {hh_rlhf}, limit: 12}}
judge: {{template: {REPO}/prompts/judge.j2, per_pair: 2}}
engine: {{kind: fake}}
db: {tmp_path}/ignored.duckdb
""")
    extra = (f"  - {{id: audit, run: {tmp_path}/audit.yaml, set: {{model: {{step: policy}}}}}}\n"
             f"  - {{id: behaviour, eval: behaviour, model: {{step: dpo}}, against: [{{step: policy}}], "
             f"judge: {tmp_path}/base, engine: {{kind: fake}}, limit: 3}}\n")
    s = run_recipe(setup_files(tmp_path, extra_steps=extra), quiet=True)
    assert s.status == "done", s.error
    rows = {r["round"]: r for r in s.report["rounds"]}
    for k in (1, 2):
        r = rows[k]
        assert 0 <= r["agreement_ci"][0] <= r["agreement"] <= r["agreement_ci"][1] <= 1 and r["audit_pairs"] == 12
        assert r["harmful_refused_keyword_ci"][0] <= r["harmful_refused_keyword"] <= r["harmful_refused_keyword_ci"][1]
        assert "benign_refused_judge" in r and "syco_flip" in r
        assert r["tie_rate_ci"][0] <= r["tie_rate"] <= r["tie_rate_ci"][1]
    models = dict(query(tmp_path / "r.duckdb", "SELECT run_id, model FROM runs"))
    out = {(x.step, x.round): x.output for x in s.steps}
    assert models[out[("audit", 2)]["run_id"]] == out[("dpo", 1)]["value"]  # round 2's judge is round 1's policy
    assert out[("behaviour", 2)]["models"] == [out[("dpo", 2)]["value"], out[("dpo", 1)]["value"]]
    html = Path(s.report["html"]).read_text()
    assert "judge–human agreement" in html and "data:image/png;base64," in html


def test_the_cli_runs_validates_and_traces_a_recipe(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")
    path = setup_files(tmp_path)
    code, out, exc = invoke(["validate", path])
    assert code == 0, out
    assert "recipe 't': 8 steps" in out and "13 step runs, 0 recorded done" in out
    code, out, exc = invoke(["run", path, "--quiet"])
    assert code == 0, (out, exc)
    assert "recipe t (done)" in out and "13 steps run, 0 finished before" in out and "report:" in out
    assert "13 recorded done" in invoke(["validate", path])[1]
    dpo2 = query(tmp_path / "r.duckdb", "SELECT path, model_id FROM models WHERE step = 'dpo' AND round = 2")[0]
    code, out, _ = invoke(["lineage", dpo2[1], "--db", tmp_path / "r.duckdb"])
    assert code == 0 and f"model {dpo2[1]}" in out and "trained on" in out and "constitution harmless" in out
    code, out, _ = invoke(["lineage", "nope", "--db", tmp_path / "r.duckdb"])
    assert code == 2 and "no stored row with id 'nope'" in out


def test_a_changed_step_reruns_it_and_only_its_downstream(tmp_path):
    run_recipe(setup_files(tmp_path), quiet=True)
    path = setup_files(tmp_path, dpo_extra=", args: {beta: 0.2}")
    st = statuses(run_recipe(path, quiet=True))
    done = {k for k, v in st.items() if v == "done"}
    # dpo changed: its two rounds, and round 2's pairs (sampled by round 1's dpo) with what reads them
    assert done == {("dpo", 1), ("pairs", 2), ("prefs", 2), ("dpo", 2), ("rm", 2)}
    assert all(v == "skipped" for k, v in st.items() if k not in done)


def test_a_training_step_without_data_stops_the_recipe_with_the_reason(tmp_path):
    path = setup_files(tmp_path, export_extra=", min_confidence: 1.0")
    s = run_recipe(path, quiet=True)
    assert s.status == "stopped"
    assert "training step 'dpo-r1' has no data" in s.error and "exported 0 rows" in s.error
    assert statuses(s)[("dpo", 1)] == "stopped"
    got = query(tmp_path / "r.duckdb", "SELECT status, error FROM recipe_steps WHERE step = 'dpo'")
    assert got[0][0] == "stopped" and "no data" in got[0][1]


@pytest.mark.parametrize("edit, line, message", [
    (("data: prefs, model: {step: policy}", "data: prefz, model: {step: policy}"), 16, "unknown step 'prefz'"),
    (("{id: sl, once: true, run:", "{id: sl, once: true, after: x, run:"), 8, "after"),
    (("set: {prompts.limit: 6}", "set: {prompts.limt: 6}"), 8, "no key `prompts.limt`; did you mean prompts.limit"),
    (("pairs.prompts.path:", "pairs.promps.path:"), 14, "no key `pairs.promps.path`"),
    (("{id: prefs, export:", "{id: prefs, once: true, export:"), 15, "runs every round"),
    (("set: {prompts.limit: 6}", "set: {prompts.limit: -3}"), 8, "`prompts.limit`: Input should be greater than"),
    (("set: {prompts.limit: 6}", "set: {prompts.limit: 6, engine.kind: nope}"), 8, "`engine.kind`"),
])
def test_bad_recipes_are_errors_at_their_line(tmp_path, edit, line, message):
    path = setup_files(tmp_path)
    text = path.read_text()
    assert edit[0] in text
    path.write_text(text.replace(edit[0], edit[1], 1))
    with pytest.raises(ConfigError) as e:
        load_recipe(path)
    assert e.value.line == line, str(e.value)
    assert message in str(e.value)


def test_a_cycle_is_an_error_at_one_of_its_edges(tmp_path):
    path = setup_files(tmp_path)
    text = path.read_text().replace("{id: sft_data, once: true, export: sft, from: sl}",
                                    "{id: sft_data, once: true, export: sft, from: sft}")
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_recipe(path)
    assert "cycle" in str(e.value) and "sft_data" in str(e.value) and e.value.line in (9, 10)


ANNOUNCE_STEPS = """
import factory.recipes.state as _S
_start = _S.start
def _announced_start(db, recipe, step, *a, **k):
    _start(db, recipe, step, *a, **k)
    print(f"STEP {step}", flush=True)
_S.start = _announced_start
"""


def test_kill_9_during_a_run_step_then_resume(tmp_path):
    path = setup_files(tmp_path)
    # a bigger slice so the pairs run of round 1 lasts: 30 prompts, slowed down
    path.write_text(path.read_text().replace("n: 5, seed: 0", "n: 30, seed: 0").replace("rounds: 2", "rounds: 1")
                    .replace("pairs.prompts.path: {step: prompts}", "pairs.prompts.path: {step: prompts}, chunk_rows: 4"))
    proc = child(["run", str(path), "--quiet"], prelude=ANNOUNCE_COMMITS + slow_fake(0.02) + ANNOUNCE_STEPS)
    wait_line(proc, "READY")
    db = tmp_path / "r.duckdb"
    wait_line(proc, "STEP pairs")
    for _ in range(6):  # the pairs run of round 1 has handed 6 transactions to its writer (>= 4 committed)
        wait_line(proc, "COMMIT")
    assert kill9(proc) == -signal.SIGKILL
    before = query(db, "SELECT count(*) FROM samples")[0][0]
    assert before > 0
    s = run_recipe(path, quiet=True)
    st = statuses(s)
    assert s.status == "done" and st[("sl", 0)] == "skipped" and st[("pairs", 1)] == "done"
    run_id = s.steps[[x.step for x in s.steps].index("pairs")].output["run_id"]
    got = query(db, "SELECT count(*), count(DISTINCT id) FROM samples")[0]
    assert got[0] == got[1] == 30 * 2  # no duplicates, every sample there
    summary = json.loads(query(db, "SELECT summary_json FROM runs WHERE run_id = ?", [run_id])[0][0])
    assert summary["reused"] > 0  # the resumed run reused what the killed one had stored


# -- the embedded model and real training (slow) ---------------------------------------------------------
TRAIN_ARGS = ("{max_steps: 2, per_device_train_batch_size: 2, max_length: 128, save_strategy: steps, save_steps: 1, "
              "logging_steps: 1, seed: 0}")


@pytest.mark.train
def test_the_recipe_on_the_embedded_model_with_tiny_budgets(tmp_path, hh_rlhf):
    """2 rounds of SL-CAI → SFT → pairs by the policy → AI labels → DPO + RM → RM/DPO evals, for real."""
    path = setup_files(tmp_path, trainer="trl")
    text = path.read_text()
    # the embedded judge's probabilities sit within ±0.04 of 0.5 (even ±0.002 made all 3 pairs of a round ties
    # once): only an exact 0.5 is a tie here, so DPO has pairs to train on (the wiring is what this test checks)
    (tmp_path / "prefs.yaml").write_text((tmp_path / "prefs.yaml").read_text().replace("per_pair: 2}", "per_pair: 2, tie_eps: 0.0}"))
    for f in ("sl.yaml", "prefs.yaml"):
        p = tmp_path / f
        p.write_text(p.read_text().replace("engine: {kind: fake}", "engine: {kind: vllm, seed: 0, max_model_len: 1024, "
                                           "kv_cache_gib: 1.0}").replace(f"model: {tmp_path}/base", "model: smollm2-135m"))
    text = (text.replace(f"model: {tmp_path}/base", "model: smollm2-135m").replace("{prompts.limit: 6}", "{prompts.limit: 2}")
            .replace("n: 5, seed: 0", "n: 3, seed: 0").replace("trainer: trl", f"trainer: trl, args: {TRAIN_ARGS}")
            .replace("trainer: trl{", "trainer: trl, args: " + TRAIN_ARGS + "{"))
    text += (f"  - {{id: eval_rm, eval: rm, model: {{step: rm}}, human: {{path: {hh_rlhf}, offset: 1000, limit: 8}}}}\n"
             f"  - {{id: eval_dpo, eval: dpo, model: {{step: dpo}}, ref: {{step: policy}}, "
             f"human: {{path: {hh_rlhf}, offset: 1000, limit: 8}}}}\n")
    path.write_text(text)
    s = run_recipe(path, quiet=True)
    assert s.status == "done", s.error
    out = {(x.step, x.round): x.output for x in s.steps}
    db = tmp_path / "r.duckdb"
    models = dict(query(db, "SELECT run_id, model FROM runs"))
    assert models[out[("pairs", 2)]["run_id"]] == out[("dpo", 1)]["value"]
    engines = dict(query(db, "SELECT run_id, json_extract_string(lineage_json, '$.engine_model') FROM runs"))
    fp = query(db, "SELECT fingerprint FROM models WHERE step = 'dpo' AND round = 1")[0][0]
    assert engines[out[("pairs", 2)]["run_id"]].endswith("@" + fp)  # round 2 sampled with round 1's weights
    assert all(out[("dpo", k)]["steps"] == 2 for k in (1, 2))
    rows = {r["round"]: r for r in s.report["rounds"]}
    assert rows[1]["dpo_accuracy_ci"][0] <= rows[1]["dpo_accuracy"] <= rows[1]["dpo_accuracy_ci"][1]
    assert rows[2].get("rm_margin") is not None and rows[2].get("sample_chars")
    assert set(statuses(run_recipe(path, quiet=True)).values()) == {"skipped"}
    # a finished training removes its resume checkpoints (model + optimizer state, ~3x the model each)
    assert not list((tmp_path / "state" / "models").glob("*/checkpoint-*"))


@pytest.mark.train
def test_kill_9_during_a_training_step_resumes_from_its_last_checkpoint(tmp_path, hh_rlhf):
    d = tmp_path
    path = d / "recipe.yaml"
    path.write_text(f"""kind: recipe
name: k
db: {d}/r.duckdb
state_dir: {d}/state
steps:
  - {{id: human, export: human, human: {hh_rlhf}, limit: 16}}
  - id: rm
    train: rm
    data: human
    args: {{max_steps: 5, per_device_train_batch_size: 2, max_length: 96, save_strategy: steps, save_steps: 1,
           logging_steps: 1, seed: 0}}
""")
    proc = child(["run", str(path), "--quiet"])
    wait_line(proc, "READY")
    deadline = time.monotonic() + 900
    models = d / "state" / "models"
    while time.monotonic() < deadline and not list(models.glob("rm-*/checkpoint-2/trainer_state.json")):
        assert proc.poll() is None, finish(proc)
        time.sleep(0.1)
    assert kill9(proc) == -signal.SIGKILL
    complete = [int(p.parent.name.split("-")[1]) for p in models.glob("rm-*/checkpoint-*/trainer_state.json")]
    assert max(complete) >= 2
    s = run_recipe(path, quiet=True)
    st = statuses(s)
    assert s.status == "done" and st == {("human", 1): "skipped", ("rm", 1): "done"}
    record = json.loads((Path(s.steps[-1].output["value"]) / "factory_train.json").read_text())
    # resumed from the newest complete checkpoint: at most save_steps (1) steps redone
    assert record["resumed_from"].endswith(f"checkpoint-{max(complete)}")
    assert record["steps"] == 5
    assert not list(models.glob("rm-*/checkpoint-*"))  # finished: the resume checkpoints are gone
