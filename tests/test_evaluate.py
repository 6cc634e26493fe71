"""Tests for factory.evaluate: pairwise accuracy against human labels, RM and DPO scoring.

Models here are tiny random Llamas carrying the embedded model's tokenizer and chat template, so
the scoring code runs for real in seconds; the values checked are hand-derived (ties, identical
policy and reference) or consistency properties that a padding/offset bug breaks (a batch
scores each sequence as it scores alone).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from factory.evaluate import (completion_ids, completion_logps, eval_dpo, eval_rm, load_model,
                              pairwise_accuracy, rm_scores)
from factory.models import ModelError
from factory.store import Store

from conftest import HH_RLHF as HH  # the shared human labels (one place: tests/conftest.py)

needs_hh = pytest.mark.usefixtures("hh_rlhf")  # fails, never skips, when the shared file is missing
CONVS = [[{"role": "user", "content": "Hi there, how are you today?"}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
         [{"role": "user", "content": "Tell me a long story about a dragon who learns to bake bread " * 3}]]
REPLIES = [[{"role": "assistant", "content": t}] for t in ("Fine, thanks.", "Blue.", "Once upon a time there was a dragon.")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Folders of a tiny causal LM and a tiny reward model (num_labels=1)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from factory.models import resolve

    tok = AutoTokenizer.from_pretrained(resolve(None))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, num_labels=1)
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    folders = {}
    for name, cls in (("lm", LlamaForCausalLM), ("lm2", LlamaForCausalLM), ("rm", LlamaForSequenceClassification)):
        cls(cfg).save_pretrained(root / name)
        tok.save_pretrained(root / name)
        folders[name] = root / name
    return folders


def test_pairwise_accuracy_counts_ties_as_wrong():
    acc, ties, correct = pairwise_accuracy([2.0, 1.0, 0.5, 3.0], [1.0, 1.0, 0.7, 3.0], ["a", "a", "b", "b"])
    assert correct.tolist() == [True, False, True, False]
    assert (acc, ties) == (0.5, 2)


def test_rm_scores_in_a_batch_equal_scores_alone(tiny):
    model, tok = load_model(tiny["rm"], "rm")
    convs = [c + r for c, r in zip(CONVS, REPLIES)]
    batched, cut = rm_scores(model, tok, convs, batch_size=3)
    alone = np.array([rm_scores(model, tok, [c], batch_size=1)[0][0] for c in convs])
    assert cut == 0
    np.testing.assert_allclose(batched, alone, rtol=1e-4, atol=1e-5)
    assert len(set(np.round(batched, 6))) == 3  # different conversations, different scores


def test_rm_scores_keep_the_end_of_long_conversations(tiny):
    model, tok = load_model(tiny["rm"], "rm")
    conv = CONVS[2] + REPLIES[2]
    short, cut = rm_scores(model, tok, [conv], max_length=16)
    assert cut == 1
    ids = tok.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"][-16:]
    import torch

    with torch.no_grad():
        direct = model(input_ids=torch.tensor([ids])).logits[0, 0].item()
    assert short[0] == pytest.approx(direct, rel=1e-4, abs=1e-5)


def test_completion_ids_mark_exactly_the_reply_tokens(tiny):
    _, tok = load_model(tiny["lm"], "lm")
    ids, start, cut = completion_ids(tok, CONVS[0], REPLIES[0], max_length=512)
    assert not cut
    assert tok.decode(ids[start:]) == "Fine, thanks.<|im_end|>\n"
    assert tok.decode(ids[:start]).endswith("<|im_start|>assistant\n")
    ids, start, cut = completion_ids(tok, CONVS[2], REPLIES[2], max_length=20)
    assert cut and len(ids) == 20 and tok.decode(ids[start:]) == "Once upon a time there was a dragon.<|im_end|>\n"


def test_completion_logps_batched_equal_alone_and_are_log_probabilities(tiny):
    model, tok = load_model(tiny["lm"], "lm")
    batched, _ = completion_logps(model, tok, CONVS, REPLIES, batch_size=3)
    alone = np.array([completion_logps(model, tok, [c], [r], batch_size=1)[0][0] for c, r in zip(CONVS, REPLIES)])
    np.testing.assert_allclose(batched, alone, rtol=1e-4)
    assert (batched < 0).all()
    # a random tiny model is near uniform over the vocabulary: about -log(V) per reply token
    n_tokens = [len(completion_ids(tok, c, r, 512)[0]) - completion_ids(tok, c, r, 512)[1] for c, r in zip(CONVS, REPLIES)]
    np.testing.assert_allclose(batched / np.array(n_tokens), -np.log(len(tok)), rtol=0.05)


@needs_hh
def test_eval_rm_on_50_human_pairs_is_stored_in_duckdb(tiny, tmp_path):
    db = tmp_path / "e.duckdb"
    r = eval_rm(tiny["rm"], HH, limit=50, db=db, max_length=256)
    assert r.n == 50 and 0.0 <= r.accuracy <= 1.0
    assert r.accuracy == pytest.approx(np.mean(r.details["correct"]))
    with Store(db, read_only=True) as s:
        rows = s.con.execute("SELECT kind, set_id, n, accuracy, ties, details_json FROM evals").fetchall()
    assert len(rows) == 1
    kind, set_id, n, acc, ties, details = rows[0]
    assert (kind, set_id, n, ties) == ("rm", str(HH), 50, r.ties) and acc == pytest.approx(r.accuracy)
    assert len(json.loads(details)["pair_ids"]) == 50
    eval_rm(tiny["rm"], HH, limit=50, db=db, max_length=256)  # the same evaluation replaces its row
    with Store(db, read_only=True) as s:
        assert s.count("evals") == 1


@needs_hh
def test_eval_dpo_with_policy_equal_to_reference_is_all_ties(tiny, tmp_path):
    r = eval_dpo(tiny["lm"], tiny["lm"], HH, limit=5, max_length=128, db=tmp_path / "e.duckdb")
    assert (r.n, r.ties, r.accuracy) == (5, 5, 0.0)
    other = eval_dpo(tiny["lm2"], tiny["lm"], HH, limit=5, max_length=128)
    assert other.ties == 0


def test_eval_rm_refuses_models_that_are_not_reward_models(tiny, tmp_path):
    with pytest.raises(ModelError, match="is not a reward model.*factory train rm"):
        eval_rm(tiny["lm"], HH, limit=2)
    with pytest.raises(ModelError):
        eval_rm(tmp_path / "missing", HH, limit=2)
