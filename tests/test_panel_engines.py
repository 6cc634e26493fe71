"""Roles on real engines: the policy on vLLM offline and the judge the same embedded model served by a
local `vllm serve` through `kind: openai`, in one run (the reward-model judge from a model trained in
the tests is in tests/test_reward_model.py::test_a_prefs_run_with_the_reward_model_as_a_panel_judge)."""

from __future__ import annotations

import json

import pytest
from test_engine_openai import vllm_server  # noqa: F401  (the module-scoped `vllm serve` fixture)

from conftest import REPO
from factory import prefs


@pytest.mark.server
@pytest.mark.engine
def test_policy_on_vllm_offline_and_judge_on_a_served_model(engine, vllm_server, tmp_path):  # noqa: F811
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"How do I keep {x} fresh?"}) + "\n"
                               for x in ("bread", "herbs", "coffee")))
    path = tmp_path / "p.yaml"
    path.write_text(f"""kind: prefs
name: two-engines
constitution: {REPO}/constitutions/harmless.yaml
policy: {{model: smollm2-135m, engine: {{kind: vllm, seed: 0, kv_cache_gib: 1.0}}}}
judges:
  - {{name: served, model: smollm2-135m, engine: {{kind: openai, base_url: "{vllm_server.url}", max_concurrency: 8, seed: 0}}}}
pairs: {{source: sample, prompts: {{path: {prompts}}}, n: 2, sampling: {{max_tokens: 24}}}}
judge: {{template: {REPO}/prompts/judge.j2, per_pair: 2, seed: 0}}
answer_template: {REPO}/prompts/answer.j2
db: {tmp_path / 'run.duckdb'}
""")
    # the session's offline engine answers the policy role (same settings as the file's); the judge's
    # engine is built from the file: an OpenAI client of the served model
    s = prefs.run(path, engines={"policy": engine}, quiet=True)
    import duckdb

    with duckdb.connect(str(tmp_path / "run.duckdb"), read_only=True) as con:
        samples = {m for (m,) in con.execute("SELECT DISTINCT model FROM samples").fetchall()}
        judged = dict(con.execute("SELECT model, count(*) FROM judgements WHERE status = 'ok' GROUP BY 1").fetchall())
        pairs = con.execute("SELECT count(*) FROM pairs WHERE status = 'ok'").fetchone()[0]
        lineage = json.loads(con.execute("SELECT lineage_json FROM runs").fetchone()[0])
    assert samples == {engine.model}  # the offline engine's weights fingerprint
    served = lineage["roles"]["served"]["model"]
    assert served != engine.model and set(judged) == {served}  # the server's identity, not the offline one
    assert pairs > 0 and judged[served] == pairs * 2 * 2 and s.labels["pairs labelled"] == pairs
    again = prefs.run(path, engines={"policy": engine}, quiet=True)
    assert again.requests == 0  # resumed: nothing asked twice
