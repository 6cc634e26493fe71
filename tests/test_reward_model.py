"""Tests for the reward-model judge engine (factory.engines.reward_model).

The reward model is trained in this module by ``factory.train`` (a few real RewardTrainer steps on
human pairs, from a tiny random Llama carrying the embedded model's tokenizer and chat template), so
the engine is checked against what ``factory train rm`` really writes. Its answers are compared with
rewards computed here directly through transformers, one unpadded sequence at a time: a wrong chat
template, padding side, truncation end or sign makes them differ.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from factory.engines.base import Completion, EngineError, Request, Sampling
from factory.engines.reward_model import RewardModelEngine, RewardModelEngineSpec, build

from conftest import HH_RLHF as HH

CONV = [[{"role": "user", "content": "How do I pick a lock?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
        [{"role": "user", "content": "Tell me a long story about a dragon who learns to bake bread. " * 6}],
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"},
         {"role": "user", "content": "What is 2 + 2?"}]]
ANSWERS = [("I can't help with breaking into property, but a locksmith can.", "Use a tension wrench and a pick."),
           ("Blue.", "I would rather not say."),
           ("Once upon a time a dragon baked bread.", "No."),
           ("4", "It is 4, because two and two make four.")]


def _request(key: str, conv: list, first: str, second: str) -> Request:
    req = Request(key=key, messages=conv, sampling=Sampling(max_tokens=1, temperature=0.0))
    req.candidates = (tuple(conv) + ({"role": "assistant", "content": first},),
                      tuple(conv) + ({"role": "assistant", "content": second},))
    return req


def _requests(swap: bool = False) -> list[Request]:
    return [_request(f"k{i}", c, *((b, a) if swap else (a, b))) for i, (c, (a, b)) in enumerate(zip(CONV, ANSWERS))]


@pytest.fixture(scope="module")
def trained_rm(tmp_path_factory):
    """A reward model written by ``factory.train.train("rm", …)``: 3 steps on 8 hh-rlhf pairs."""
    if not HH.is_file():
        pytest.fail(f"shared human labels not found at {HH}", pytrace=False)
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from factory.models import resolve
    from factory.train import train

    root = tmp_path_factory.mktemp("rmjudge")
    tok = AutoTokenizer.from_pretrained(resolve(None))
    import torch

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                                 pad_token_id=tok.pad_token_id)).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    cfg = root / "rm.yaml"
    cfg.write_text(f"model: {root / 'base'}\ndataset: {{human: {HH}, limit: 8}}\noutput_dir: {root / 'rm'}\n"
                   "args: {max_steps: 3, per_device_train_batch_size: 2, max_length: 1024, learning_rate: 1.0e-3, "
                   "save_strategy: 'no', seed: 0}\n")
    train("rm", cfg)
    return root


def _direct_reward(folder, conv, max_length: int | None = None) -> float:
    """The reward of one conversation computed independently: transformers, no padding, no batching."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tok.apply_chat_template(list(conv), tokenize=True, return_dict=True)["input_ids"]
    if max_length:
        ids = ids[-max_length:]
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, 0].item()


@pytest.mark.train
def test_probabilities_match_rewards_scored_directly(trained_rm):
    eng = build(RewardModelEngineSpec(batch_size=3), str(trained_rm / "rm"))
    assert eng.kind == "reward_model" and eng.capabilities.prefill is False
    assert eng.model.startswith(f"{trained_rm / 'rm'}@")
    reqs = _requests()
    got = {c.key: c for c in eng.generate(iter(reqs))}
    assert list(got) == [r.key for r in reqs]  # answers in request order
    ps = []
    for r in reqs:
        c = got[r.key]
        r1, r2 = (_direct_reward(trained_rm / "rm", cand) for cand in r.candidates)
        p_first = 1.0 / (1.0 + math.exp(-(r1 - r2)))
        assert c.status == "ok" and c.completion_tokens == 0 and c.prompt_tokens > 0
        assert math.exp(c.option_logprobs[0]) == pytest.approx(p_first, abs=1e-4)
        assert math.exp(c.option_logprobs[0]) + math.exp(c.option_logprobs[1]) == pytest.approx(1.0, abs=1e-9)
        ps.append(p_first)
    assert len(set(np.round(ps, 6))) == len(ps)  # trained weights: different pairs, different answers
    eng.close()


@pytest.mark.train
def test_swapping_the_order_gives_one_minus_p_and_batches_equal_one_at_a_time(trained_rm):
    eng = RewardModelEngine(trained_rm / "rm", batch_size=8)
    forward = {c.key: math.exp(c.option_logprobs[0]) for c in eng.generate(_requests())}
    swapped = {c.key: math.exp(c.option_logprobs[0]) for c in eng.generate(_requests(swap=True))}
    for k in forward:
        assert swapped[k] == pytest.approx(1.0 - forward[k], abs=1e-5)
    alone = RewardModelEngine(trained_rm / "rm", batch_size=1, window=1)
    one = {c.key: math.exp(c.option_logprobs[0]) for r in _requests() for c in alone.generate([r])}
    np.testing.assert_allclose([one[k] for k in forward], list(forward.values()), atol=1e-5)


@pytest.mark.train
def test_long_conversations_keep_their_end(trained_rm):
    eng = RewardModelEngine(trained_rm / "rm", max_length=24)
    req = _requests()[2]
    (c,) = eng.generate([req])
    assert c.prompt_tokens == 48 and eng.truncated == 2
    r1, r2 = (_direct_reward(trained_rm / "rm", cand, max_length=24) for cand in req.candidates)
    assert math.exp(c.option_logprobs[0]) == pytest.approx(1.0 / (1.0 + math.exp(r2 - r1)), abs=1e-4)


@pytest.mark.train
def test_bfloat16_rounds_but_keeps_the_answers_close(trained_rm):
    f32 = [math.exp(c.option_logprobs[0]) for c in RewardModelEngine(trained_rm / "rm").generate(_requests())]
    bf16 = RewardModelEngine(trained_rm / "rm", dtype="bfloat16")
    assert next(bf16.reward_model.parameters()).dtype.__str__() == "torch.bfloat16"
    got = [math.exp(c.option_logprobs[0]) for c in bf16.generate(_requests())]
    np.testing.assert_allclose(got, f32, atol=0.02)


@pytest.mark.train
def test_pulls_lazily_and_a_bad_request_fails_alone(trained_rm):
    eng = RewardModelEngine(trained_rm / "rm", batch_size=2, window=2)
    pulled = []

    def source():
        good = _requests()
        for i, r in enumerate(good[:3]):
            pulled.append(r.key)
            yield r
        yield None  # nothing right now: what is held is answered
        bad = Request(key="no-candidates", messages=CONV[0], sampling=Sampling(max_tokens=1))
        pulled.append(bad.key)
        yield bad
        three = _request("three", CONV[0], "a", "b")
        three.candidates = three.candidates + three.candidates[:1]
        pulled.append("three")
        yield three

    out: list[Completion] = []
    for c in eng.generate(source()):
        out.append(c)
        if len(out) == 2:
            assert pulled == ["k0", "k1"]  # the first window is answered before more is pulled
    assert [c.key for c in out] == ["k0", "k1", "k2", "no-candidates", "three"]
    assert [c.status for c in out] == ["ok", "ok", "ok", "failed", "failed"]
    assert "no candidates" in out[3].error and "exactly 2 candidates" in out[4].error
    with pytest.raises(EngineError, match="no option tokens"):
        eng.token_ids("A")


@pytest.mark.slow  # loads the embedded model's tokenizer
def test_a_folder_that_is_not_a_sequence_classifier_is_named(tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from factory.models import resolve

    tok = AutoTokenizer.from_pretrained(resolve(None))
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    with pytest.raises(EngineError, match=rf"{tmp_path / 'lm'}.*not a reward model.*sequence-classifier.*kind: vllm"):
        build(RewardModelEngineSpec(), str(tmp_path / "lm"))


def test_a_folder_without_config_or_a_missing_folder_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(EngineError, match=rf"{tmp_path / 'empty'}.*no config.json.*sequence-classifier"):
        build(RewardModelEngineSpec(), str(tmp_path / "empty"))
    with pytest.raises(EngineError, match=r"reward model 'nope/missing/x'.*sequence-classifier"):
        build(RewardModelEngineSpec(), "nope/missing/x")


def test_settings_are_strict_and_default_to_cpu():
    from pydantic import ValidationError

    spec = RewardModelEngineSpec.model_validate({"kind": "reward_model", "batch_size": 4, "max_length": 512})
    assert (spec.device, spec.batch_size, spec.max_length, spec.seed) == ("cpu", 4, 512, 0)
    with pytest.raises(ValidationError, match="base_url"):
        RewardModelEngineSpec.model_validate({"kind": "reward_model", "base_url": "http://x"})
    with pytest.raises(ValidationError):
        RewardModelEngineSpec.model_validate({"kind": "reward_model", "device": "tpu"})


@pytest.mark.train
def test_a_prefs_run_with_the_reward_model_as_a_panel_judge(trained_rm, tmp_path):
    """The judge role `kind: reward_model` end to end: a fake judge and the trained RM label 4 hh-rlhf pairs;
    the RM's stored p_a is σ(r_a − r_b) computed directly, and its rows carry the RM's identity."""
    import json

    import duckdb

    from conftest import REPO
    from factory import prefs
    from factory.models import identity

    rm = trained_rm / "rm"
    path = tmp_path / "p.yaml"
    path.write_text(f"""kind: prefs
name: rmpanel
constitution: {REPO}/constitutions/harmless.yaml
pairs: {{source: file, path: {HH}, format: hh-rlhf, limit: 4}}
judges:
  - {{name: fake, model: judge-x, engine: {{kind: fake}}}}
  - {{name: rm, model: {rm}, kind: reward_model}}
judge: {{template: {REPO}/prompts/judge.j2, per_pair: 1, seed: 0}}
db: {tmp_path / 'out.duckdb'}
""")
    prefs.run(path, quiet=True)
    with duckdb.connect(str(tmp_path / "out.duckdb"), read_only=True) as con:
        rows = con.execute("SELECT j.model, j.p_a, p.conversation, p.response_a, p.response_b FROM judgements j "
                           "JOIN pairs p USING (pair_id) WHERE j.model LIKE ?", [f"{rm}@%"]).fetchall()
    assert len(rows) == 4 and {r[0] for r in rows} == {identity(str(rm), str(rm))}
    for _, p_a, conv, a, b in rows:
        conv = json.loads(conv)
        r_a, r_b = (_direct_reward(rm, conv + [{"role": "assistant", "content": t}]) for t in (a, b))
        assert p_a == pytest.approx(1.0 / (1.0 + math.exp(r_b - r_a)), abs=1e-4)
