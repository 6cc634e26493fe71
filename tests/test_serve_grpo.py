"""A real online run: TRL's GRPOTrainer trains on the embedded model with its rewards from the judge
service (a subprocess serving the embedded judge on the real vLLM engine); afterwards what the run
consumed is in DuckDB, its rewards are reproducible from the stored labels, it exports, and
`factory audit --db --run --human` scores the service's run against human labels.

SmolLM2-135M judges at about chance: this proves the plumbing and the record, not a good judge."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import duckdb
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from conftest import HH_RLHF  # noqa: E402
from test_serve import REPO, pipeline, start  # noqa: E402

from factory.store import content_key  # noqa: E402


@pytest.mark.slow
@pytest.mark.train
@pytest.mark.usefixtures("hh_rlhf")
def test_grpo_trains_on_rewards_from_the_service_and_the_run_is_audited(tmp_path):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from factory.audit.run import audit
    from factory.export import export_prefs
    from factory.human import import_human
    from factory.models import resolve
    from factory.serve.clients import JudgeClient, reward_function

    # tie_eps 0: the 135M judge's labels sit near 0.5 (the default band would make every pair a tie, which
    # export leaves out)
    yaml = pipeline(tmp_path, per_pair=2, engine="{kind: vllm, seed: 0, max_model_len: 2048, kv_cache_gib: 1.0}",
                    judge="tie_eps: 0.0, ")
    db = tmp_path / "s.duckdb"
    set_id, n_human, _ = import_human(db, HH_RLHF, limit=6)
    con = duckdb.connect(str(db), read_only=True)  # read before the service takes the database
    human_pairs = con.execute("""SELECT p.conversation, p.response_a, p.response_b FROM human_labels h
                                 JOIN pairs p USING (pair_id) WHERE h.set_id = ?""", [set_id]).fetchall()
    con.close()
    proc, url = start(yaml, timeout=600)  # vLLM on a shared CPU: minutes
    try:
        served = reward_function(url)
        seen: list[tuple[list, list, list[float]]] = []

        def judge_reward(prompts, completions, **kw):
            r = served(prompts, completions, **kw)
            seen.append((prompts, completions, r))
            return r

        ds = Dataset.from_list([{"prompt": [{"role": "user", "content": "Say hi to a new colleague."}]},
                                {"prompt": [{"role": "user", "content": "How do I pick a strong password?"}]}])
        args = GRPOConfig(output_dir=str(tmp_path / "grpo"), max_steps=2, per_device_train_batch_size=2,
                          num_generations=2, max_completion_length=12, learning_rate=1e-5, use_cpu=True, bf16=False,
                          report_to="none", logging_steps=1, save_strategy="no", seed=0)
        trainer = GRPOTrainer(model=resolve(None), reward_funcs=judge_reward, args=args, train_dataset=ds)
        trainer.train()
        logs = [h for h in trainer.state.log_history if "loss" in h]
        assert len(logs) == 2 and all(h["loss"] == h["loss"] for h in logs)  # two steps, finite losses
        assert len(seen) == 2 and all(0 <= x <= 1 for _, _, r in seen for x in r)
        # the human set's pairs through the same service, so its run can be audited against humans
        client = JudgeClient(url)
        for conv, a, b in human_pairs:
            assert 0 <= client.preference(json.loads(conv), a, b)["p_a"] <= 1
        client.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(300) == 0

    con = duckdb.connect(str(db), read_only=True)
    run_id, status = con.execute("SELECT run_id, status FROM runs WHERE kind = 'serve'").fetchone()
    assert status == "done"
    # every group the trainer was rewarded for is stored: its pair, the pair's judgements (2 principles x
    # 2 orders, made by the service's run on the vLLM-served model) and its label, which gives the same rewards
    for prompts, completions, rewards in seen:
        conv = [{"role": m["role"], "content": m["content"]} for m in prompts[0]]
        a, b = (c[0]["content"] for c in completions)
        if a.strip() == b.strip() or not a.strip() or not b.strip():
            continue  # a fixed preference (module docstring of factory.serve.rewards): nothing judged
        pid = content_key(conv, a, b)
        assert con.execute("SELECT count(*) FROM run_pairs WHERE run_id = ? AND pair_id = ?", [run_id, pid]).fetchone()[0] == 1
        n, model = con.execute("SELECT count(*), any_value(model) FROM judgements WHERE pair_id = ? AND run_id = ?",
                               [pid, run_id]).fetchone()
        assert n == 4 and not model.startswith("fake:")
        p_a = con.execute("SELECT p_a FROM preferences WHERE run_id = ? AND pair_id = ?", [run_id, pid]).fetchone()[0]
        assert rewards == pytest.approx([p_a, 1 - p_a], abs=1e-9)
    labelled = con.execute("SELECT count(*) FROM preferences WHERE run_id = ?", [run_id]).fetchone()[0]
    con.close()
    assert labelled >= len(human_pairs)
    out = export_prefs(db, run_id, tmp_path / "exported")  # ties are left out and counted, never dropped silently
    assert out.rows + sum(out.dropped.values()) == labelled
    audit_id, result, report = audit(None, db=db, run_id=run_id, human_set=set_id, quiet=True)
    assert result.overall.n_pairs == len(human_pairs) and Path(report).is_file()
