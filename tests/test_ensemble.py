"""Reward-model ensembles: member plan and bootstrap, normalisation and aggregation, evaluation on
human pairs (tiny random reward models), best-of-n (fake policy and judge), and a real 2-member
training run on the embedded model (marked train)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from factory.evals.ensemble import EnsembleError, aggregate, member_dirs, normalise
from factory.train import Member, TrainConfig, bootstrap_rows, load_config, members
from factory.yamlconf import ConfigError

PAIRS = [("Name a colour.", "Blue.", "I refuse."), ("How are you?", "Fine, thanks!", "..."),
         ("Tell me a joke.", "Why did the chicken cross the road?", "No."), ("Say hi.", "Hi!", "Go away."),
         ("Count to three.", "1, 2, 3.", "4")]


def test_normalise_is_a_z_score_per_member_and_a_constant_member_is_zero():
    raw = np.array([[1.0, 2.0, 3.0, 4.0], [10.0, 10.0, 10.0, 10.0], [-5.0, 0.0, 5.0, 0.0]])
    z = normalise(raw)
    assert np.allclose(z[0], (raw[0] - 2.5) / np.std(raw[0])) and np.allclose(z[[0, 2]].mean(1), 0)
    assert np.allclose(z[[0, 2]].std(1), 1) and np.all(z[1] == 0)


def test_aggregates_by_hand():
    z = np.array([[1.0, -1.0], [3.0, -1.0], [2.0, 2.0]])
    assert np.allclose(aggregate(z, "mean"), [2.0, 0.0])
    assert np.allclose(aggregate(z, "min"), [1.0, -1.0])
    std = np.array([np.std([1, 3, 2]), np.std([-1, -1, 2])])
    assert np.allclose(aggregate(z, "uwo", lam=2.0), np.array([2.0, 0.0]) - 2.0 * std)
    with pytest.raises(EnsembleError, match="unknown aggregate 'max'"):
        aggregate(z, "max")


def test_members_vary_the_seed_and_bootstrap_is_seeded(tmp_path):
    ms = members(TrainConfig(dataset="d", output_dir=str(tmp_path / "ens"), ensemble=3, bootstrap=True,
                             args={"seed": 5}))
    assert [(m.index, m.seed, m.output_dir.name) for m in ms] == [(0, 5, "member-0"), (1, 6, "member-1"), (2, 7, "member-2")]
    rows = [bootstrap_rows(50, m) for m in ms]
    assert rows[0] == bootstrap_rows(50, ms[0]) and rows[0] != rows[1]
    assert all(len(r) == 50 and 0 <= min(r) and max(r) < 50 and len(set(r)) < 50 for r in rows)
    assert bootstrap_rows(4, Member(0, 1, tmp_path, bootstrap=False)) == [0, 1, 2, 3]
    single = TrainConfig(dataset="d", output_dir=str(tmp_path / "one"))
    assert [(m.index, m.output_dir) for m in members(single)] == [(None, tmp_path / "one")]
    bad = tmp_path / "dpo.yaml"
    bad.write_text("dataset: d\noutput_dir: o\nensemble: 2\n")
    with pytest.raises(ConfigError, match=r"dpo.yaml:3:1: `ensemble` is for reward models"):
        load_config("dpo", bad)


def test_an_incomplete_ensemble_names_the_fix(tmp_path):
    (tmp_path / "ensemble.json").write_text(json.dumps({"members": [{"path": "member-0"}]}))
    with pytest.raises(EnsembleError, match="member-0.*rerun `factory train rm`"):
        member_dirs(tmp_path)


# ------------------------------------------------------------------ tiny reward models (slow)


@pytest.fixture(scope="module")
def tiny_ensemble(tmp_path_factory):
    """An ensemble folder of three tiny random reward models (different seeds) with the embedded
    model's tokenizer, and a human-pairs JSONL file."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from factory.models import resolve

    tok = AutoTokenizer.from_pretrained(resolve(None))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                      pad_token_id=tok.pad_token_id, num_labels=1)
    root = tmp_path_factory.mktemp("ens")
    for i in range(3):
        torch.manual_seed(i)
        LlamaForSequenceClassification(cfg).save_pretrained(root / f"member-{i}")
        tok.save_pretrained(root / f"member-{i}")
    (root / "ensemble.json").write_text(json.dumps({"k": 3, "members": [{"path": f"member-{i}"} for i in range(3)]}))
    human = root / "pairs.jsonl"
    human.write_text("".join(json.dumps({"prompt": p, "response_a": a, "response_b": b, "choice": "a" if i % 2 else "b"})
                             + "\n" for i, (p, a, b) in enumerate(PAIRS)))
    return root, human


@pytest.mark.slow
def test_ensemble_eval_reports_members_like_single_evals_and_stores_aggregates(tiny_ensemble, tmp_path):
    from factory.evals.ensemble import eval_rm_ensemble
    from factory.evaluate import eval_rm, pairwise_accuracy
    from factory.store import Store

    root, human = tiny_ensemble
    db = tmp_path / "e.duckdb"
    r = eval_rm_ensemble(root, human, limit=None, db=db, lam=0.5)
    assert r.n == len(PAIRS) and [m[0] for m in r.members] == ["member-0", "member-1", "member-2"]
    for name, acc, ties in r.members:  # a member's accuracy is what the single-model eval says
        assert acc.value == eval_rm(root / name, human, limit=None).accuracy
    with Store(db, read_only=True) as s:
        rows = dict(s.con.execute("SELECT kind, details_json FROM evals WHERE kind LIKE 'rm-ensemble:%'").fetchall())
        member_rows = [json.loads(d) for (d,) in s.con.execute(
            "SELECT details_json FROM evals WHERE kind = 'rm' ORDER BY model").fetchall()]
    assert set(rows) == {"rm-ensemble:mean", "rm-ensemble:min", "rm-ensemble:uwo"}
    # the stored uwo scores, recomputed from the members' stored raw rewards: z-score each member over
    # both sides of every pair, then mean − 0.5·std across members
    raw = np.array([m["score_a"] + m["score_b"] for m in member_rows])
    z = (raw - raw.mean(1, keepdims=True)) / raw.std(1, keepdims=True)
    expected = z.mean(0) - 0.5 * z.std(0)
    uwo = json.loads(rows["rm-ensemble:uwo"])
    assert np.allclose(uwo["score_a"] + uwo["score_b"], expected) and uwo["lam"] == 0.5
    acc, _, _ = pairwise_accuracy(expected[:len(PAIRS)], expected[len(PAIRS):],
                                  ["a" if i % 2 else "b" for i in range(len(PAIRS))])
    assert dict((n, x.value) for n, x, _, _ in r.aggregates)["uwo"] == acc
    from typer.testing import CliRunner

    from factory.cli import app

    out = CliRunner().invoke(app, ["eval", "rm", "--model", str(root), "--human", str(human), "--lambda", "0.5"],
                             env={"COLUMNS": "200"})
    assert out.exit_code == 0 and "member-2" in out.output and "ensemble: mean − 0.5·std" in out.output


@pytest.mark.slow
def test_best_of_n_with_identical_members_never_differs_and_otherwise_judges_the_picks(tiny_ensemble, tmp_path):
    import shutil

    from factory.config import FakeEngineSpec
    from factory.evals.bestofn import best_of_n
    from factory.store import Store

    root, _ = tiny_ensemble
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question number {i}?"}) + "\n" for i in range(6)))
    spec = FakeEngineSpec()
    db = tmp_path / "b.duckdb"
    clones = tmp_path / "clones"
    for i in range(3):
        shutil.copytree(root / "member-0", clones / f"member-{i}")
    (clones / "ensemble.json").write_text((root / "ensemble.json").read_text())
    same = best_of_n(clones, db=db, policy="pol", prompts=prompts, m=6, n=3, engine_spec=spec, how="mean")
    assert (same.prompts, same.same_pick, same.differing, same.win_rate.n) == (6, 6, 0, 0)
    assert same.win_rate_all.value == 0.5
    r = best_of_n(root, db=db, policy="pol", prompts=prompts, m=6, n=3, engine_spec=spec, how="min", per_pair=2)
    assert r.same_pick + r.differing == 6 and r.win_rate.n == r.differing
    with Store(db, read_only=True) as s:
        assert s.count("behaviour_generations", "suite = 'bon'") == 18  # reused by the second call
        assert s.count("behaviour_scores", "scorer = 'rm'") == 2 * 3 * 18
        assert s.count("behaviour_scores", "scorer = 'pairwise'") == r.differing * 2 * 2
        assert s.count("evals", "kind LIKE 'bon:%'") == 2


# ------------------------------------------------------------------------- real training (CPU)


@pytest.mark.train
def test_ensemble_of_two_trains_resumes_and_members_differ(tmp_path):
    from safetensors import safe_open

    from factory.train import train

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": p, "response_a": a, "response_b": b, "choice": "a"}) + "\n"
                             for p, a, b in PAIRS))
    cfg = tmp_path / "rm.yaml"
    cfg.write_text(f"dataset: {{human: {pairs}}}\noutput_dir: {tmp_path / 'ens'}\nensemble: 2\nbootstrap: true\n"
                   "args: {max_steps: 2, per_device_train_batch_size: 2, max_length: 64, learning_rate: 1.0e-4, "
                   "save_strategy: 'no', logging_steps: 1, seed: 3}\n")
    train("rm", cfg)
    manifest = json.loads((tmp_path / "ens" / "ensemble.json").read_text())
    assert [(m["path"], m["seed"], m["steps"]) for m in manifest["members"]] == [("member-0", 3, 2), ("member-1", 4, 2)]
    assert all(m["distinct_rows"] <= len(PAIRS) for m in manifest["members"])

    def weight(d: Path):
        with safe_open(str(next(d.glob("*.safetensors"))), "pt") as fh:
            return fh.get_tensor("score.weight")

    w0, w1 = (weight(tmp_path / "ens" / f"member-{i}") for i in range(2))
    assert (w0 - w1).abs().max().item() > 0
    stamp = (tmp_path / "ens" / "member-1" / "factory_train.json").stat().st_mtime_ns
    again = train("rm", cfg)  # both members are done: nothing is trained again
    assert again.seconds == 0.0
    assert (tmp_path / "ens" / "member-1" / "factory_train.json").stat().st_mtime_ns == stamp
    assert member_dirs(tmp_path / "ens") == [tmp_path / "ens" / "member-0", tmp_path / "ens" / "member-1"]
