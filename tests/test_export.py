"""Tests for factory.export: DuckDB runs → TRL datasets (SFT, AI preferences, human pairs).

Fixture databases are built row by row here with the store's schemas, so every expected output is
written down by hand. The round-trip tests construct the real TRL trainers (on a tiny random
Llama with the embedded model's tokenizer and chat template) and check what they tokenized.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from factory.export import ExportError, export_human, export_prefs, export_sft, human_pairs, read_manifest
from factory.store import GEN_SCHEMA, JUDGEMENT_SCHEMA, PAIR_SCHEMA, PREFERENCE_SCHEMA, Store, now

from conftest import HH_RLHF as HH  # the shared human labels (one place: tests/conftest.py)

MSG = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "How do I bake bread?"}]


# ------------------------------------------------------------------------------------ fixtures


def add_run(store: Store, run_id: str, kind: str, judge: dict | None = None) -> None:
    """A run row; preference runs also get a stored constitution (x weighs 1, y weighs 3) and judge settings."""
    const = {"name": "c", "version": "1", "description": "", "principles": [
        {"id": pid, "critique": "c", "revision": "r", "comparison": "q", "tags": [], "weight": w}
        for pid, w in (("x", 1.0), ("y", 3.0))]}
    chash = store.put_config("constitution", const)
    store.con.execute("INSERT INTO runs (run_id, name, kind, status, started_at, config_json, constitution_hash) "
                      "VALUES (?, ?, ?, 'done', ?, ?, ?)",
                      [run_id, run_id, kind, now(), json.dumps({"judge": judge or {}}), chash])


def revision(rid, prompt_id, rnd, text, status="ok", principles=("harm",), run_id="sl-1"):
    return {"id": rid, "run_id": run_id, "prompt_id": prompt_id, "parent_id": None, "round": rnd,
            "principle_ids": json.dumps(list(principles)), "constitution_hash": "c", "template_hash": "t",
            "model": "m", "sampling_hash": "s", "messages": "[]", "text": text, "status": status,
            "error": None if status == "ok" else "boom", "prompt_tokens": 1, "completion_tokens": 1,
            "finish_reason": "stop", "created_at": now()}


@pytest.fixture
def sl_db(tmp_path):
    """Run sl-1: prompts p1..p3, two rounds; p2's round 2 failed; p3's round 2 addressed privacy.
    Run sl-2 has only failed revisions; r-other belongs to no run of interest."""
    path = tmp_path / "sl.duckdb"
    with Store(path) as s:
        add_run(s, "sl-1", "sl")
        add_run(s, "sl-2", "sl")
        s.insert("prompts", [
            {"prompt_id": "p1", "messages": json.dumps(MSG), "n_chars": 1, "first_run_id": "sl-1"},
            {"prompt_id": "p2", "messages": json.dumps([{"role": "user", "content": "hi"}]), "n_chars": 1,
             "first_run_id": "sl-1"},
            {"prompt_id": "p3", "messages": json.dumps([{"role": "user", "content": "where do I live?"}]),
             "n_chars": 1, "first_run_id": "sl-1"}])
        rows = [revision("r1a", "p1", 1, "Knead it."), revision("r1b", "p1", 2, "Knead, rise, bake."),
                revision("r2a", "p2", 1, "Hello."), revision("r2b", "p2", 2, None, status="failed"),
                revision("r3a", "p3", 1, "No idea."), revision("r3b", "p3", 2, "I can't know that.", principles=("privacy", "harm")),
                revision("r-other", "p1", 2, "from another run", run_id="x"),
                revision("f1", "p1", 1, "partial", status="failed", run_id="sl-2")]
        s.insert("revisions", rows, GEN_SCHEMA)
        s.link_run("sl-1", "revisions", ["r1a", "r1b", "r2a", "r2b", "r3a", "r3b"])
        s.link_run("sl-2", "revisions", ["f1"])
    return path


def pair(pid, a, b, conv=None, status="ok"):
    return {"pair_id": pid, "run_id": "pr-1", "source": "sampled", "prompt_id": "p1",
            "conversation": json.dumps(conv or [{"role": "user", "content": f"question {pid}?"}]),
            "response_a": a, "response_b": b, "response_a_id": None, "response_b_id": None, "status": status,
            "error": None, "created_at": now()}


def pref(pid, p_a, *, tie_eps=0.05, agree=1.0, complete=True, run_id="pr-1"):
    nan = p_a is None or math.isnan(p_a)
    tie = (not nan) and abs(p_a - 0.5) < tie_eps
    chosen = None if nan or tie else ("a" if p_a > 0.5 else "b")
    return {"run_id": run_id, "pair_id": pid, "p_a": p_a, "chosen": chosen,
            "margin": None if nan else abs(p_a - 0.5) * 2, "is_tie": tie, "orders_agree": agree,
            "principles_agree": 1, "n_principles": 1, "orders_complete": complete, "created_at": now()}


@pytest.fixture
def prefs_db(tmp_path):
    """Run pr-1 with six labelled pairs (one of each filter case) and judgements for two principles."""
    path = tmp_path / "prefs.duckdb"
    with Store(path) as s:
        add_run(s, "pr-1", "prefs")
        add_run(s, "pr-ties", "prefs")
        s.insert("pairs", [pair("clear-a", "A1", "B1", conv=MSG), pair("clear-b", "A2", "B2"), pair("tie", "A3", "B3"),
                           pair("low", "A4", "B4"), pair("flip", "A5", "B5"), pair("failed", "A6", "B6")], PAIR_SCHEMA)
        s.insert("preferences", [pref("clear-a", 0.9), pref("clear-b", 0.2), pref("tie", 0.52), pref("low", 0.6),
                                 pref("flip", 0.8, agree=0.5), pref("failed", float("nan")),
                                 pref("tie", 0.5, run_id="pr-ties"), pref("low", 0.51, run_id="pr-ties")],
                 PREFERENCE_SCHEMA)
        # clear-a: principle "x" prefers a (0.9 both orders), principle "y" prefers b (0.3, 0.1)
        js = []
        for principle, order, p_a in [("x", "ab", 0.9), ("x", "ba", 0.9), ("y", "ab", 0.3), ("y", "ba", 0.1)]:
            js.append({"id": f"j-{principle}-{order}", "run_id": "pr-1", "pair_id": "clear-a", "principle_id": principle,
                       "principle_hash": "h", "order": order, "constitution_hash": "c", "template_hash": "t",
                       "model": "m", "sampling_hash": "s", "messages": "[]", "rationale": None,
                       "logprob_first": -0.1, "logprob_second": -2.0, "p_first": p_a if order == "ab" else 1 - p_a,
                       "p_a": p_a, "status": "ok", "error": None, "prompt_tokens": 1, "completion_tokens": 1,
                       "created_at": now()})
        s.insert("judgements", js, JUDGEMENT_SCHEMA)
    return path


# ------------------------------------------------------------------------------------- SFT


def test_sft_default_is_final_round_ok_rows_with_prompt_conversation(sl_db, tmp_path):
    import datasets

    r = export_sft(sl_db, "sl-1", tmp_path / "out")
    assert r.rows == 2
    assert r.dropped == {"round not selected": 3, "no text (status failed)": 1}
    ds = datasets.load_from_disk(str(tmp_path / "out"))
    assert ds.column_names == ["messages", "prompt_id", "revision_id", "round", "principle_ids"]
    assert ds.features["messages"] == datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")})
    rows = {row["prompt_id"]: row for row in ds}
    assert rows["p1"]["messages"] == MSG + [{"role": "assistant", "content": "Knead, rise, bake."}]
    assert rows["p3"]["messages"][-1] == {"role": "assistant", "content": "I can't know that."}
    assert rows["p3"]["principle_ids"] == ["privacy", "harm"] and rows["p3"]["round"] == 2
    assert rows["p1"]["revision_id"] == "r1b"
    assert pq.read_table(tmp_path / "out" / "data.parquet").num_rows == 2
    assert read_manifest(tmp_path / "out")["source"]["rounds"] == [2]


def test_sft_round_and_principle_filters(sl_db, tmp_path):
    r = export_sft(sl_db, "sl-1", tmp_path / "a", rounds=[1])
    assert r.rows == 3
    r = export_sft(sl_db, "sl-1", tmp_path / "b", rounds=[1, 2], principles=["privacy"])
    assert r.rows == 1 and r.dropped["principle not selected"] == 5
    with pytest.raises(ExportError, match=r"filters leave no revisions"):
        export_sft(sl_db, "sl-1", tmp_path / "c", rounds=[1], principles=["privacy"])
    with pytest.raises(ExportError, match=r"no round \[3\]; its rounds are \[1, 2\]"):
        export_sft(sl_db, "sl-1", tmp_path / "d", rounds=[3])
    with pytest.raises(ExportError, match=r"principle\(s\) \['nope'\].*\['harm', 'privacy'\]"):
        export_sft(sl_db, "sl-1", tmp_path / "e", principles=["nope"])


def test_sft_bad_runs_are_clear_errors(sl_db, tmp_path):
    with pytest.raises(ExportError, match=r"no run 'nope'; known runs: sl-1 \(sl\), sl-2 \(sl\)"):
        export_sft(sl_db, "nope", tmp_path / "x")
    with pytest.raises(ExportError, match=r"no completed revisions \(1 failed\)"):
        export_sft(sl_db, "sl-2", tmp_path / "x")
    # include_failed keeps a failed row that has text
    assert export_sft(sl_db, "sl-2", tmp_path / "y", include_failed=True).rows == 1
    assert not (tmp_path / "x").exists()


def test_export_refuses_to_overwrite_a_foreign_folder_but_replaces_its_own(sl_db, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not a factory export"):
        export_sft(sl_db, "sl-1", foreign)
    assert (foreign / "notes.txt").exists()
    export_sft(sl_db, "sl-1", tmp_path / "own")
    assert export_sft(sl_db, "sl-1", tmp_path / "own", rounds=[1]).rows == 3
    assert pq.read_table(tmp_path / "own" / "data.parquet").num_rows == 3


# ------------------------------------------------------------------------------ preferences


def test_prefs_hard_labels_drop_ties_and_failed_with_counts(prefs_db, tmp_path):
    import datasets

    r = export_prefs(prefs_db, "pr-1", tmp_path / "p")
    assert r.dropped == {"tie": 1, "no valid judgement": 1}
    ds = datasets.load_from_disk(str(tmp_path / "p"))
    assert ds.column_names == ["prompt", "chosen", "rejected", "p_chosen", "pair_id"]
    assert ds.features["p_chosen"] == datasets.Value("float64")
    rows = {row["pair_id"]: row for row in ds}
    assert sorted(rows) == ["clear-a", "clear-b", "flip", "low"]
    assert rows["clear-a"]["prompt"] == MSG
    assert rows["clear-a"]["chosen"] == [{"role": "assistant", "content": "A1"}]
    assert rows["clear-a"]["rejected"] == [{"role": "assistant", "content": "B1"}]
    assert rows["clear-b"]["chosen"][0]["content"] == "B2" and rows["clear-b"]["p_chosen"] == pytest.approx(0.8)
    assert rows["clear-a"]["p_chosen"] == pytest.approx(0.9)


def test_prefs_confidence_and_consistency_filters(prefs_db, tmp_path):
    # margins: clear-a 0.8, clear-b 0.6, low 0.2, flip 0.6
    r = export_prefs(prefs_db, "pr-1", tmp_path / "a", min_confidence=0.5)
    assert r.rows == 3 and r.dropped["below min_confidence"] == 1
    r = export_prefs(prefs_db, "pr-1", tmp_path / "b", position_consistent_only=True)
    assert r.rows == 3 and r.dropped["orders disagree or incomplete"] == 1
    r = export_prefs(prefs_db, "pr-1", tmp_path / "c", min_confidence=0.7, position_consistent_only=True)
    assert r.rows == 1
    with pytest.raises(ExportError, match=r"in \[0, 1\]"):
        export_prefs(prefs_db, "pr-1", tmp_path / "d", min_confidence=1.5)


def test_prefs_all_ties_or_filtered_is_a_clear_error(prefs_db, sl_db, tmp_path):
    with pytest.raises(ExportError, match=r"every pair of run 'pr-ties' is a tie or filtered out.*'tie': 2"):
        export_prefs(prefs_db, "pr-ties", tmp_path / "x")
    with pytest.raises(ExportError, match="every pair"):
        export_prefs(prefs_db, "pr-1", tmp_path / "x", min_confidence=0.99)
    with pytest.raises(ExportError, match="no preference labels"):
        export_prefs(sl_db, "sl-1", tmp_path / "x")


def test_prefs_principle_subset_reaggregates_judgements(prefs_db, tmp_path):
    import datasets

    export_prefs(prefs_db, "pr-1", tmp_path / "x", principles=["x"])
    (row,) = datasets.load_from_disk(str(tmp_path / "x"))
    assert row["pair_id"] == "clear-a" and row["chosen"][0]["content"] == "A1"
    assert row["p_chosen"] == pytest.approx(0.9)
    export_prefs(prefs_db, "pr-1", tmp_path / "y", principles=["y"])
    (row,) = datasets.load_from_disk(str(tmp_path / "y"))
    assert row["chosen"][0]["content"] == "B1" and row["p_chosen"] == pytest.approx(1 - (0.3 + 0.1) / 2)
    # both principles with the run's constitution weights (x 1, y 3), not equal ones:
    # p_a = (1 × 0.9 + 3 × 0.2) / 4 = 0.375 → chosen b with p 0.625
    export_prefs(prefs_db, "pr-1", tmp_path / "xy", principles=["x", "y"])
    (row,) = datasets.load_from_disk(str(tmp_path / "xy"))
    assert row["chosen"][0]["content"] == "B1" and row["p_chosen"] == pytest.approx(0.625)
    with pytest.raises(ExportError, match=r"principle\(s\) \['z'\]; its principles are \['x', 'y'\]"):
        export_prefs(prefs_db, "pr-1", tmp_path / "z", principles=["z"])


def _draw(pair_id: str, seed: int) -> float:
    """The documented Bernoulli draw, computed independently of DuckDB."""
    digest = hashlib.md5(f"{pair_id}:{seed}".encode()).digest()
    return (int.from_bytes(digest[:8], "little") >> 11) / 2**53


def test_prefs_bernoulli_samples_labels_from_p_a(tmp_path):
    import datasets

    n, p = 2000, 0.8
    path = tmp_path / "many.duckdb"
    with Store(path) as s:
        add_run(s, "pr-1", "prefs")
        s.insert("pairs", [pair(f"q{i}", "A", "B") for i in range(n)], PAIR_SCHEMA)
        s.insert("preferences", [pref(f"q{i}", p) for i in range(n)], PREFERENCE_SCHEMA)
    ds = datasets.load_from_disk(str(export_prefs(path, "pr-1", tmp_path / "s0", soft="bernoulli", seed=0).out))
    chose_a = {row["pair_id"]: row["chosen"][0]["content"] == "A" for row in ds}
    assert chose_a == {f"q{i}": _draw(f"q{i}", 0) < p for i in range(n)}
    share = sum(chose_a.values()) / n
    assert abs(share - p) < 3 * math.sqrt(p * (1 - p) / n)
    p_chosen = {row["pair_id"]: row["p_chosen"] for row in ds}
    assert all(p_chosen[k] == pytest.approx(p if a else 1 - p) for k, a in chose_a.items())
    again = datasets.load_from_disk(str(export_prefs(path, "pr-1", tmp_path / "s0b", soft="bernoulli", seed=0).out))
    assert again["chosen"] == ds["chosen"]
    other = datasets.load_from_disk(str(export_prefs(path, "pr-1", tmp_path / "s1", soft="bernoulli", seed=1).out))
    assert other["chosen"] != ds["chosen"]


# ------------------------------------------------------------------------------------- human


def test_human_export_follows_the_human_choice_and_counts_unlabelled(tmp_path):
    import datasets

    src = tmp_path / "pairs.jsonl"
    lines = [{"prompt": "q1", "response_a": "good", "response_b": "bad", "human_choice": "a"},
             {"prompt": "q2", "response_a": "bad", "response_b": "good", "human_choice": "b"},
             {"prompt": "q3", "response_a": "x", "response_b": "y"},
             {"prompt": "q4", "response_a": "same", "response_b": "same", "human_choice": "a"},
             {"prompt": "q5", "response_a": "good", "response_b": "bad", "human_choice": "a"}]
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    r = export_human(src, tmp_path / "h")
    assert r.rows == 3
    assert r.dropped == {"no human_choice": 1, "source: identical responses": 1}
    ds = datasets.load_from_disk(str(tmp_path / "h"))
    assert {row["chosen"][0]["content"] for row in ds} == {"good"}
    assert {row["rejected"][0]["content"] for row in ds} == {"bad"}
    assert set(ds["p_chosen"]) == {1.0}
    # offset/limit slice the valid pairs in file order: q1, q2, q3(unlabelled), q5
    table, _ = human_pairs(src, offset=1, limit=2)
    assert [json.loads(c)[0]["content"] for c in table.column("conversation").to_pylist()] == ["q2"]
    with pytest.raises(ExportError, match="no labelled pairs"):
        export_human(src, tmp_path / "none", offset=10)


@pytest.mark.usefixtures("hh_rlhf")
def test_human_export_of_hh_rlhf_puts_the_chosen_transcript_in_chosen(tmp_path):
    import datasets

    export_human(HH, tmp_path / "hh", limit=20, offset=5)
    ds = datasets.load_from_disk(str(tmp_path / "hh"))
    assert len(ds) == 20
    with gzip.open(HH, "rt") as fh:
        raw = [json.loads(line) for line in fh]
    chosen_ends = {r["chosen"].rstrip() for r in raw}
    for row in ds:
        # the chosen reply ends some hh-rlhf "chosen" transcript (and not, in general, its "rejected" one)
        assert any(t.endswith(row["chosen"][0]["content"]) for t in chosen_ends)
        assert row["prompt"][-1]["role"] == "user"


# ----------------------------------------------------------- round trip through the TRL trainers


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama with the embedded model's tokenizer (chat template included)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from factory.models import resolve

    tok = AutoTokenizer.from_pretrained(resolve(None))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    out = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out), tok


ARGS = {"max_steps": 1, "per_device_train_batch_size": 2, "max_length": 256}


def test_sft_export_tokenizes_in_trl_sft_trainer(sl_db, tiny, tmp_path):
    from factory.train import load_dataset_folder, make_trainer

    model, tok = tiny
    out = export_sft(sl_db, "sl-1", tmp_path / "sft").out
    trainer = make_trainer("sft", model, load_dataset_folder(out), tmp_path / "o", args=ARGS, tokenizer=tok)
    ds = trainer.train_dataset
    assert "input_ids" in ds.column_names and len(ds) == 2
    text = tok.decode(ds[0]["input_ids"])
    assert "How do I bake bread?" in text and "Knead, rise, bake." in text and "<|im_start|>assistant" in text


def test_pref_exports_tokenize_in_trl_reward_and_dpo_trainers(prefs_db, tiny, tmp_path):
    from factory.train import load_dataset_folder, make_trainer

    model, tok = tiny
    ds = load_dataset_folder(export_prefs(prefs_db, "pr-1", tmp_path / "p").out)
    rm = make_trainer("rm", model, ds, tmp_path / "rm", args=ARGS, tokenizer=tok)
    rows = {r["pair_id"]: r for r in rm.train_dataset}
    assert tok.decode(rows["clear-b"]["chosen_ids"]).rstrip().endswith("B2<|im_end|>")
    assert tok.decode(rows["clear-b"]["rejected_ids"]).rstrip().endswith("A2<|im_end|>")
    assert "margin" not in rm.train_dataset.column_names  # RewardTrainer would subtract it in the loss
    dpo = make_trainer("dpo", model, ds, tmp_path / "dpo", args=ARGS, tokenizer=tok)
    rows = {r["pair_id"]: r for r in dpo.train_dataset}
    assert tok.decode(rows["clear-a"]["prompt_ids"]).endswith("How do I bake bread?<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(rows["clear-a"]["chosen_ids"]).startswith("A1<|im_end|>")
    assert tok.decode(rows["clear-a"]["rejected_ids"]).startswith("B1<|im_end|>")


def test_cli_exports_and_reports_bad_input_without_a_traceback(sl_db, prefs_db, tmp_path):
    from typer.testing import CliRunner

    from factory.cli import app

    runner = CliRunner()
    ok = runner.invoke(app, ["export", "sft", "--db", str(sl_db), "--run", "sl-1", "--out", str(tmp_path / "s"),
                             "--round", "1", "--round", "2", "--principle", "privacy"])
    assert ok.exit_code == 0, ok.output
    assert read_manifest(tmp_path / "s")["rows"] == 1
    ok = runner.invoke(app, ["export", "prefs", "--db", str(prefs_db), "--run", "pr-1", "--out", str(tmp_path / "p"),
                             "--min-confidence", "0.5", "--consistent-only"])
    assert ok.exit_code == 0, ok.output
    assert read_manifest(tmp_path / "p")["rows"] == 2
    bad = runner.invoke(app, ["export", "prefs", "--db", str(prefs_db), "--run", "pr-ties", "--out", str(tmp_path / "t")])
    assert bad.exit_code == 2 and "every pair of run 'pr-ties' is a tie" in bad.output
    assert "Traceback" not in bad.output
