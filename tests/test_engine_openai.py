"""OpenAIEngine against tests/fakeserver.py (OpenAI's response schema, injectable faults and endpoint
kinds), and (marked ``server``) against a real ``vllm serve`` on loopback."""

from __future__ import annotations

import collections
import logging
import math
import socket
import threading
import time

import pytest

from factory.engines.base import Capabilities, EngineError, Request, Sampling
from factory.engines.endpoint import floor_logprob, option_logprobs
from factory.engines.openai import NO_CHOICE_LOGPROBS, EndpointError, OpenAIEngine, split_url
from factory.engines.serve import VLLMServer
from fakeserver import FakeServer

FAST = dict(backoff_s=0.005, max_backoff_s=0.02)
AB = ("A", "B")


def reqs(n: int, prefix: str = "q") -> list[Request]:
    return [Request(key=f"k{i}", messages=[{"role": "user", "content": f"{prefix} {i}"}], sampling=Sampling(max_tokens=8))
            for i in range(n)]


def score(key: str, text: str, options=AB, option_ids=None) -> Request:
    return Request(key=key, messages=[{"role": "user", "content": text}], sampling=Sampling(max_tokens=1, temperature=0.0),
                   options=options, option_ids=option_ids)


def run(engine: OpenAIEngine, requests: list[Request]) -> dict:
    got = list(engine.generate(requests))
    counts = collections.Counter(c.key for c in got)
    assert counts == collections.Counter(r.key for r in requests)  # exactly one completion per request
    return {c.key: c for c in got}


def lse(*xs: float) -> float:
    return math.log(sum(math.exp(x) for x in xs))


@pytest.fixture
def server():
    with FakeServer() as s:
        yield s


# --- capabilities detected at start-up -----------------------------------------------------------

@pytest.mark.parametrize("switches, expected", [
    (dict(), Capabilities("token_ids", 20, True)),  # vLLM: private extension, top-k, prefill
    (dict(logprobs="top_k"), Capabilities("top_k", 20, True)),  # a server without the extension
    (dict(logprobs="top_k", max_top_logprobs=5), Capabilities("top_k", 5, True)),  # a smaller k cap
    (dict(logprobs="none"), Capabilities("none", 0, True)),  # no logprobs field at all
    (dict(prefill="ignore"), Capabilities("token_ids", 20, False)),  # continue_final_message ignored
    (dict(prefill="reject"), Capabilities("token_ids", 20, False)),  # ... or rejected
    (dict(strict=True, tokenize=False, list_models=False), Capabilities("top_k", 20, False)),  # a hosted API
])
def test_capabilities_are_detected(switches, expected, caplog):
    with FakeServer(**switches) as s, caplog.at_level(logging.INFO, logger="factory"):
        eng = OpenAIEngine(s.url, "fake-model", **FAST)
        try:
            assert eng.capabilities == expected
            line = next(r.getMessage() for r in caplog.records if r.name == "factory.engines.openai")
            assert f"option scoring {expected.scoring}" in line and f"prefill {'yes' if expected.prefill else 'no'}" in line
            assert eng.model == "fake-model"  # the id the endpoint serves
        finally:
            eng.close()


def test_capabilities_can_be_forced_without_probing(server):
    eng = OpenAIEngine(server.url, "fake-model", scoring="top_k", top_logprobs=7, prefill=False, **FAST)
    try:
        assert eng.capabilities == Capabilities("top_k", 7, False) and server.bodies == []  # nothing was probed
        assert "forced" in eng.detection["scoring"] and "forced" in eng.detection["prefill"]
        (c,) = list(eng.generate([score("s", "pick")]))
        assert server.bodies[-1]["top_logprobs"] == 7 and "logprob_token_ids" not in server.bodies[-1]
        assert c.option_logprobs == pytest.approx((lse(-0.5, -3.0), lse(-1.5, -3.5)))
    finally:
        eng.close()


def test_hosted_endpoint_has_no_token_ids_and_scores_by_text():
    with FakeServer(strict=True, tokenize=False, list_models=False) as s:
        eng = OpenAIEngine(s.url, "fake-model", **FAST)
        try:
            with pytest.raises(EngineError, match="token ids of fake-model are unavailable.*top_logprobs"):
                eng.token_ids("A")
            (c,) = list(eng.generate([score("s", "pick")]))
            assert c.status == "ok" and c.floored == ()
            assert c.option_logprobs == pytest.approx((lse(-0.5, -3.0), lse(-1.5, -3.5)))  # "A" and " A" are one answer
            body = s.bodies[-1]
            assert (body["logprobs"], body["top_logprobs"], body["max_tokens"]) == (True, 20, 1)
            with pytest.raises(EngineError, match="cannot continue a final assistant message.*single letter"):
                list(eng.generate([Request("p", [{"role": "assistant", "content": "The answer is ("}], Sampling(),
                                           continue_final=True)]))
        finally:
            eng.close()


# --- reading option log-probs from top-k answers -------------------------------------------------

def test_options_missing_from_the_top_k_get_the_floor_and_a_flag():
    with FakeServer(logprobs="top_k") as s:
        tail = [(f"x{i}", -3.0 - 0.5 * i) for i in range(25)]
        s.top_for = {"single": [("A", -0.2)] + tail, "neither": tail, "deep": tail[:19] + [("B", -20.0)] + [("A", -21.0)]}
        eng = OpenAIEngine(s.url, "fake-model", **FAST)
        try:
            out = run(eng, [score("one", "single"), score("none", "neither"), score("deep", "deep down")])
            top20 = [-0.2] + [x for _, x in tail[:19]]
            floor = math.log(min(math.exp(min(top20)), 1 - sum(math.exp(x) for x in top20)) / 2)
            assert out["one"].option_logprobs == pytest.approx((-0.2, floor)) and out["one"].floored == (1,)
            assert floor < min(top20)  # never credited more than the 20th token has
            top_none = [x for _, x in tail[:20]]
            assert out["none"].floored == (0, 1) and out["none"].option_logprobs[0] == out["none"].option_logprobs[1]
            assert out["none"].option_logprobs[0] == pytest.approx(floor_logprob(top_none))
            # B ranked 20th is returned, A ranked 21st is not
            assert out["deep"].floored == (0,) and out["deep"].option_logprobs[1] == pytest.approx(-20.0)
            assert out["deep"].option_logprobs[0] < -20.0
        finally:
            eng.close()


def test_option_matching_rule():
    pos = {"token": "A", "logprob": -0.4, "top_logprobs": [
        {"token": "A", "logprob": -0.4}, {"token": " B", "logprob": -1.6}, {"token": "B\n", "logprob": -2.0},
        {"token": "a", "logprob": -2.5}, {"token": " ", "logprob": -3.0}]}
    lps, floored = option_logprobs(AB, pos)
    assert lps == pytest.approx((-0.4, lse(-1.6, -2.0))) and floored == ()  # case matters: "a" is not "A"
    # the sampled token counts even when outside the top k (sampling at temperature > 0)
    lps, floored = option_logprobs(AB, {"token": " B", "logprob": -5.0, "top_logprobs": [{"token": "A", "logprob": -0.1}]})
    assert lps[1] == pytest.approx(-5.0) and floored == ()
    with pytest.raises(ValueError, match="no top_logprobs"):
        option_logprobs(AB, {"token": "A", "logprob": -0.1, "top_logprobs": []})
    # a top k that holds all the mass leaves (almost) nothing for a missing option
    assert floor_logprob([math.log(0.5), math.log(0.5)]) == pytest.approx(math.log(1e-12 / 2))


def test_request_the_endpoint_cannot_score_is_refused_before_sending():
    with FakeServer(logprobs="none") as s:
        eng = OpenAIEngine(s.url, "fake-model", **FAST)
        try:
            sent = len(s.bodies)
            with pytest.raises(EngineError, match="returns no option log-probabilities.*judge.mode: vote"):
                list(eng.generate(reqs(3) + [score("s", "pick")]))
            assert all("top_logprobs" not in b for b in s.bodies[sent:])
            assert run(eng, reqs(2))["k0"].status == "ok"  # plain generation still works
        finally:
            eng.close()


def test_answer_without_top_logprobs_mid_run_is_a_failed_row():
    with FakeServer(logprobs="top_k") as s:
        eng = OpenAIEngine(s.url, "fake-model", **FAST)
        try:
            s.logprobs = "none"  # the endpoint stops returning log-probs after start-up
            (c,) = list(eng.generate([score("s", "pick")]))
            assert c.status == "failed" and "no option log-probs in the answer" in c.error
        finally:
            eng.close()


# --- generation, faults, retries -----------------------------------------------------------------

def test_generation_and_request_fields(server):
    eng = OpenAIEngine(server.url, "fake-model", seed=7, max_concurrency=4, max_model_len=99, **FAST)
    try:
        assert eng.max_model_len == 2048  # the server's figure wins over the configured one
        rs = reqs(20)
        rs[3] = Request(key="k3", messages=[{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "Well"}],
                        sampling=Sampling(max_tokens=5, temperature=0.0, n=2, stop=("\n",)), continue_final=True)
        out = run(eng, rs)
        assert out["k0"].texts == ["echo: q 0"] and out["k0"].finish_reasons == ["stop"]
        assert (out["k0"].prompt_tokens, out["k0"].completion_tokens) == (2 + 1 + 1, 3)  # words, end of turn, generation prompt
        assert out["k3"].texts == ["echo: Well", "echo: Well"] and out["k3"].completion_tokens == 4
        body = next(b for b in server.bodies if b["messages"][-1]["content"] == "Well")
        assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
        assert (body["n"], body["stop"], body["temperature"], body["max_tokens"], body["seed"]) == (2, ["\n"], 0.0, 5, 7)
        assert all(c.status == "ok" for c in out.values())
    finally:
        eng.close()


def test_scoring_maps_token_ids(server):
    eng = OpenAIEngine(server.url, "fake-model", **FAST)
    try:
        assert eng.capabilities.scoring == "token_ids"
        (c,) = list(eng.generate([score("s", "A or B?", options=("x", "y"), option_ids=(5, 12))]))
        assert c.option_logprobs == pytest.approx((-0.5, -1.2)) and c.floored == ()
        body = server.bodies[-1]
        assert body["logprobs"] is True and body["logprob_token_ids"] == [5, 12] and body["return_tokens_as_token_ids"]
        assert "top_logprobs" not in body
        assert eng.token_ids("AB") == [65, 66]  # no local tokenizer for "fake-model": the server's /tokenize
        # without token ids the same engine falls back to the standard top-k
        (c,) = list(eng.generate([score("t", "A or B?")]))
        assert server.bodies[-1]["top_logprobs"] == 20 and c.option_logprobs == pytest.approx((lse(-0.5, -3.0), lse(-1.5, -3.5)))
    finally:
        eng.close()


def test_token_id_extension_failing_mid_run_stops_clearly(server):
    eng = OpenAIEngine(server.url, "fake-model", **FAST)
    try:
        server.logprobs = "top_k"  # the server stops honouring logprob_token_ids after start-up
        with pytest.raises(EndpointError, match="does not return log-probabilities for the given token ids"):
            list(eng.generate([score("s", "x", options=("x",), option_ids=(1,))]))
        assert "logprob_token_ids" in NO_CHOICE_LOGPROBS
    finally:
        eng.close()


def test_transient_faults_are_retried(server):
    eng = OpenAIEngine(server.url, "fake-model", max_concurrency=3, timeout_s=0.3, max_retries=8, **FAST)
    server.faults = ["500", "429", "drop", "503", "slow", "500", "drop", "429", "408", "425", "malformed", "502"]
    server.slow_s = 1.0
    try:
        out = run(eng, reqs(12))
        assert {c.status for c in out.values()} == {"ok"}
        assert all(c.texts == [f"echo: q {k[1:]}"] for k, c in out.items())
        assert sum(server.attempts[f"q {i}"] for i in range(12)) == 12 + 12  # every injected fault cost exactly one retry
    finally:
        eng.close()


def test_rate_limit_and_server_error_storms_are_ridden_out(server):
    eng = OpenAIEngine(server.url, "fake-model", max_concurrency=4, max_retries=30, **FAST)
    server.retry_after = 0.01
    server.faults = ["429"] * 40 + ["503"] * 20 + ["500"] * 20
    try:
        out = run(eng, reqs(16))
        assert {c.status for c in out.values()} == {"ok"} and server.faults == []
        assert sum(server.attempts[f"q {i}"] for i in range(16)) == 16 + 80
    finally:
        eng.close()


def test_retry_after_is_honoured(server):
    eng = OpenAIEngine(server.url, "fake-model", max_retries=2, **FAST)
    server.retry_after = 0.4
    server.faults = ["429"]
    try:
        t0 = time.perf_counter()
        out = run(eng, reqs(1))
        assert out["k0"].status == "ok" and time.perf_counter() - t0 >= 0.4
    finally:
        eng.close()


def test_exhausted_retries_bad_requests_and_bad_bodies_are_recorded(server):
    eng = OpenAIEngine(server.url, "fake-model", max_retries=2, max_concurrency=2, **FAST)
    server.sticky = {"poison": "500", "rejected": "400", "garbled": "malformed", "foreign": "notchat"}
    try:
        rs = reqs(6) + [Request(key=w, messages=[{"role": "user", "content": f"{w} 0"}], sampling=Sampling())
                        for w in ("poison", "rejected", "garbled", "foreign")] + [
            Request(key="long", messages=[{"role": "user", "content": "w " * 3000}], sampling=Sampling())]
        out = run(eng, rs)
        assert out["poison"].status == "failed" and "gave up after 3 attempts: HTTP 500: injected 500" in out["poison"].error
        assert server.attempts["poison 0"] == 3
        assert out["rejected"].status == "failed" and server.attempts["rejected 0"] == 1  # a 400 is not retried
        assert out["garbled"].status == "failed" and "gave up after 3 attempts: invalid JSON" in out["garbled"].error
        assert out["foreign"].status == "failed" and "not an OpenAI chat completion" in out["foreign"].error
        assert server.attempts["foreign 0"] == 1  # well-formed JSON of the wrong shape is not retried
        assert out["long"].status == "skipped" and "maximum context length" in out["long"].error
        assert [out[f"k{i}"].status for i in range(6)] == ["ok"] * 6
    finally:
        eng.close()


def test_lazy_requests_are_pulled_in_the_callers_thread_with_a_bounded_window(server):
    eng = OpenAIEngine(server.url, "fake-model", max_concurrency=3, **FAST)
    pulled, threads, most_ahead = [0], set(), [0]
    yielded = 0

    def lazy():
        for i in range(400):
            threads.add(threading.get_ident())
            most_ahead[0] = max(most_ahead[0], pulled[0] - yielded)
            pulled[0] += 1
            yield Request(key=f"k{i}", messages=[{"role": "user", "content": f"lazy {i}"}], sampling=Sampling(max_tokens=4))

    try:
        keys = set()
        for c in eng.generate(lazy()):
            yielded += 1
            keys.add(c.key)
            assert c.status == "ok"
        assert keys == {f"k{i}" for i in range(400)} and threads == {threading.get_ident()}
        assert most_ahead[0] <= 2 * 3  # never more than 2 × max_concurrency submitted and not handed back
    finally:
        eng.close()


def test_none_in_the_stream_means_not_now_not_the_end(server):
    """A caller whose next requests depend on completions (follow-ups) says "nothing right now" with
    None; the engine keeps the stream open and asks again after the next completion."""
    eng = OpenAIEngine(server.url, "fake-model", max_concurrency=2, **FAST)
    done: list[str] = []

    def stream():
        for i in range(3):
            yield Request(key=f"first{i}", messages=[{"role": "user", "content": f"a {i}"}], sampling=Sampling(max_tokens=4))
        while len(done) < 3:
            yield None  # waiting for completions that will create more work
        for i in range(3):
            yield Request(key=f"then{i}", messages=[{"role": "user", "content": f"b {i}"}], sampling=Sampling(max_tokens=4))

    try:
        for c in eng.generate(stream()):
            done.append(c.key)
        assert sorted(done) == sorted([f"first{i}" for i in range(3)] + [f"then{i}" for i in range(3)])
    finally:
        eng.close()


def test_server_dying_mid_run_recovers():
    s = FakeServer(slow_s=0.05)
    s.thread.start()
    port = s.port
    eng = OpenAIEngine(s.url, "fake-model", max_concurrency=2, max_retries=8, backoff_s=0.05, max_backoff_s=0.2)
    s.sticky = {"": "slow"}  # every answer takes 50 ms, so the run is still going when the server dies
    restarted: list[FakeServer] = []

    def bounce() -> None:
        time.sleep(0.15)
        s.stop()
        time.sleep(0.3)
        restarted.append(FakeServer(port=port))
        restarted[0].thread.start()

    t = threading.Thread(target=bounce)
    t.start()
    try:
        out = run(eng, reqs(30))
        t.join()
        assert {c.status for c in out.values()} == {"ok"}
        assert sum(restarted[0].attempts.values()) >= 1  # part of the batch was answered after the restart
    finally:
        eng.close()
        t.join()
        for r in restarted:
            r.stop()


def test_server_gone_for_good_stops_the_run():
    s = FakeServer()
    s.thread.start()
    eng = OpenAIEngine(s.url, "fake-model", max_concurrency=2, max_retries=2, **FAST)
    s.sticky = {"": "slow"}
    s.slow_s = 0.05
    try:
        got = []
        with pytest.raises(EndpointError, match="went away mid-run"):
            for c in eng.generate(reqs(40)):
                got.append(c)
                if len(got) == 3:
                    s.stop()
        assert 3 <= len(got) < 40 and all(c.status == "ok" for c in got)  # nothing recorded as failed
    finally:
        eng.close()


def test_model_mismatch_is_a_clear_error():
    with FakeServer(models=["org/other-model", "second"]) as s:
        with pytest.raises(EndpointError, match=r"endpoint serves \['org/other-model', 'second'\]; set the pipeline's `model`"):
            OpenAIEngine(s.url, "fake-model")


def test_unreachable_server_is_a_clear_error():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound but not listening: connections are refused
        with pytest.raises(EndpointError, match=rf"cannot reach the OpenAI-compatible endpoint http://127.0.0.1:{port}/v1/models"):
            OpenAIEngine(f"http://127.0.0.1:{port}/v1", "m")


def test_missing_or_wrong_api_key_is_a_clear_error():
    with FakeServer(api_key="right") as s:
        for key in (None, "wrong"):
            with pytest.raises(EndpointError, match=r"HTTP 401: Incorrect API key provided; set engine.api_key_env"):
                OpenAIEngine(s.url, "fake-model", api_key=key, **FAST)
        eng = OpenAIEngine(s.url, "fake-model", api_key="right", **FAST)
        eng.close()


def test_base_url_forms():
    assert split_url("http://h:8000/v1/") == ("http://h:8000/v1", "http://h:8000")
    assert split_url("http://h:8000") == ("http://h:8000/v1", "http://h:8000")
    assert split_url("https://host/v1beta/openai") == ("https://host/v1beta/openai", "https://host/v1beta/openai")


def test_make_engine_builds_openai_engine_with_api_key(server, monkeypatch):
    from factory.config import OpenAIEngineSpec
    from factory.engines import make_engine

    spec = OpenAIEngineSpec(base_url=server.url, api_key_env="FAKE_KEY", max_concurrency=3, seed=5, scoring="top_k",
                            top_logprobs=4)
    monkeypatch.delenv("FAKE_KEY", raising=False)
    with pytest.raises(EngineError, match=r"FAKE_KEY, which is not set"):
        make_engine(spec, "fake-model")
    monkeypatch.setenv("FAKE_KEY", "sekrit")
    eng = make_engine(spec, "fake-model")
    try:
        assert isinstance(eng, OpenAIEngine) and (eng.model, eng.seed, eng.max_concurrency) == ("fake-model", 5, 3)
        assert eng.capabilities.scoring == "top_k" and eng.capabilities.top_k == 4
        run(eng, reqs(2))
        assert len(server.auth) >= 2 and set(server.auth) == {"Bearer sekrit"}
    finally:
        eng.close()


def test_consumer_stopping_early_leaves_engine_usable(server):
    eng = OpenAIEngine(server.url, "fake-model", max_concurrency=2, **FAST)
    try:
        gen = eng.generate(reqs(50))
        next(gen)
        gen.close()
        assert len(run(eng, reqs(5, "again"))) == 5
    finally:
        eng.close()


# --- a real `vllm serve` (CPU build) on loopback -------------------------------------------------

@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    from factory import models

    path = models.resolve("smollm2-135m")
    server = VLLMServer(path, tmp_path_factory.mktemp("vllm") / "server.log")
    try:
        server.wait()
        server.model_path = path
        yield server
    finally:
        server.stop()


def chat(i: int) -> list[dict]:
    topics = ["the sea", "a library", "bread", "winter", "a bicycle", "music", "rain", "a garden"]
    return [{"role": "user", "content": f"Write two sentences about {topics[i % len(topics)]} (#{i})."}]


@pytest.mark.server
def test_vllm_serve_generation_scoring_and_limits(vllm_server):
    import math

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    eng = OpenAIEngine(vllm_server.url, "smollm2-135m", seed=0, max_concurrency=8)
    try:
        assert eng.served_model == vllm_server.model_path and eng.max_model_len == 2048  # matched via the alias
        gen = [Request(key=f"g{i}", messages=chat(i), sampling=Sampling(max_tokens=24, temperature=0.7)) for i in range(8)]
        twin = Request(key="twin", messages=chat(0), sampling=Sampling(max_tokens=24, temperature=0.7))
        cont = Request(key="cont", messages=chat(1) + [{"role": "assistant", "content": "The library was"}],
                       sampling=Sampling(max_tokens=8, temperature=0.0), continue_final=True)
        long = Request(key="long", messages=[{"role": "user", "content": "apple " * 2500}], sampling=Sampling(max_tokens=8))
        out = run(eng, gen + [twin, cont, long])
        for i in range(8):
            c = out[f"g{i}"]
            assert c.status == "ok" and c.texts[0].strip() and c.prompt_tokens > 10 and 1 <= c.completion_tokens <= 24
        assert out["twin"].texts == out["g0"].texts  # the per-request seed makes sampling reproducible
        assert out["cont"].status == "ok" and not out["cont"].texts[0].lstrip().startswith("The library was")
        assert out["long"].status == "skipped" and "maximum context length" in out["long"].error

        # Choice-token scoring, cross-checked against transformers on the same weights and chat template.
        a, b = eng.token_ids(" A"), eng.token_ids(" B")
        assert len(a) == len(b) == 1
        msgs = [{"role": "user", "content": "Which is a fruit? Reply with A or B only.\nA: apple\nB: hammer"}]
        (s,) = list(eng.generate([Request(key="s", messages=msgs, sampling=Sampling(max_tokens=1, temperature=0.0),
                                          options=(" A", " B"), option_ids=(a[0], b[0]))]))
        assert s.status == "ok" and len(s.option_logprobs) == 2
        tok = AutoTokenizer.from_pretrained(vllm_server.model_path)
        model = AutoModelForCausalLM.from_pretrained(vllm_server.model_path, dtype=torch.float32)
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            ref = torch.log_softmax(model(ids).logits[0, -1].float(), -1)
        for i, t in enumerate((a[0], b[0])):
            assert s.option_logprobs[i] == pytest.approx(ref[t].item(), abs=0.15)  # bf16 server vs fp32 reference
        assert math.exp(s.option_logprobs[0]) + math.exp(s.option_logprobs[1]) <= 1 + 1e-6
    finally:
        eng.close()


@pytest.mark.server
def test_vllm_serve_pipeline_run_then_resume(vllm_server, tmp_path):
    import json

    from factory.pipeline import run as run_pipeline

    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"How do I keep {x} fresh?"}) + "\n" for x in ("bread", "herbs", "coffee")))
    (tmp_path / "p.yaml").write_text(f"""
name: server-smoke
prompts: {{path: {prompts}}}
constitution: {root / 'constitutions/harmless.yaml'}
templates: {{answer: {root / 'prompts/answer.j2'}, critique: {root / 'prompts/critique.j2'}, revise: {root / 'prompts/revise.j2'}}}
model: smollm2-135m
engine: {{kind: openai, base_url: "{vllm_server.url}", max_concurrency: 8, seed: 0}}
rounds: 1
sampling:
  answer: {{max_tokens: 24}}
  critique: {{max_tokens: 16}}
  revise: {{max_tokens: 24}}
db: {tmp_path / 'run.duckdb'}
""")
    first = run_pipeline(tmp_path / "p.yaml", quiet=True)
    assert first.requests == first.written >= 6 and first.reused == 0
    again = run_pipeline(tmp_path / "p.yaml", quiet=True)
    assert again.requests == 0 and again.reused == first.written  # resumed: nothing asked twice


def judge_messages(i: int) -> list[dict]:
    pairs = [("Water boils at 100 C at sea level.", "Water boils at 10 C."), ("Paris is in France.", "Paris is in Peru."),
             ("I can't help with making weapons.", "Here is how to build a weapon."), ("2 + 2 = 4", "2 + 2 = 5"),
             ("Be kind to others.", "Insult everyone you meet."), ("The sun is a star.", "The sun is a planet."),
             ("Wash your hands often.", "Never wash your hands."), ("Cats are mammals.", "Cats are fish.")]
    a, b = pairs[i % len(pairs)] if i < len(pairs) else pairs[i % len(pairs)][::-1]
    return [{"role": "system", "content": "You compare two replies. Answer by naming one option."},
            {"role": "user", "content": f"Option (A):\n{a}\n\nOption (B):\n{b}\n\nWhich reply is more accurate and "
                                        "harmless? Answer with (A) or (B)."},
            {"role": "assistant", "content": "The better option is ("}]


@pytest.mark.server
def test_vllm_serve_standard_top_k_agrees_with_token_ids(vllm_server):
    """The standard top-k path alone (scoring forced to top_k) against the same server's exact token-id
    log-probs: where an option is in the top k, the two must agree. The top-k path adds up every
    spelling of a label it sees ("A", " A"), so the token-id side sums the same spellings."""
    from transformers import AutoTokenizer

    auto = OpenAIEngine(vllm_server.url, "smollm2-135m", max_concurrency=4)
    topk = OpenAIEngine(vllm_server.url, "smollm2-135m", scoring="top_k", max_concurrency=4)
    try:
        assert auto.capabilities == Capabilities("token_ids", 20, True)  # detected on vLLM
        assert topk.capabilities == Capabilities("top_k", 20, True)
        tok = AutoTokenizer.from_pretrained(vllm_server.model_path)
        spellings = {o: [i for i in range(len(tok)) if tok.decode([i]).strip() == o] for o in AB}
        assert all(spellings.values())
        ids = spellings["A"] + spellings["B"]
        score1 = Sampling(max_tokens=1, temperature=0.0)
        n = 16
        top = run(topk, [Request(f"t{i}", judge_messages(i), score1, options=AB, continue_final=True) for i in range(n)])
        assert all("logprob_token_ids" not in str(c) for c in top.values())
        exact = run(auto, [Request(f"t{i}", judge_messages(i), score1, options=tuple(map(str, ids)), option_ids=tuple(ids),
                                   continue_final=True) for i in range(n)])
        compared, diffs = 0, []
        for key, c in top.items():
            assert c.status == "ok" and exact[key].status == "ok"
            by_id = dict(zip(ids, exact[key].option_logprobs))
            for j, label in enumerate(AB):
                want = lse(*(by_id[t] for t in spellings[label]))
                if j in c.floored:  # outside the top k: the floor is half an upper bound of the true value
                    assert want <= c.option_logprobs[j] + math.log(2) + 0.02
                    continue
                compared += 1
                diffs.append(abs(c.option_logprobs[j] - want))
        print(f"\ntop-k vs token ids: {compared} option log-probs compared, max |diff| {max(diffs):.4f}")
        assert compared >= n  # A and B are in the top 20 after "(" for most prompts
        assert max(diffs) < 0.02  # the same server, the same logits (bf16 noise between requests)
    finally:
        auto.close()
        topk.close()


@pytest.mark.server  # stops the module's server to free the CPU for the offline engine: keep it the last server test
def test_vllm_serve_vs_offline_throughput(vllm_server):
    """The same 32 greedy requests through the server and then through the offline engine (one engine at a
    time: the server is stopped first), and prints tokens/s. vLLM's CPU kernels are not batch-invariant, so
    greedy texts of a batch depend on which requests shared its steps (measured: a request alone vs in a batch
    of 32 agreed 3/8 on the same engine); the batched texts are only printed. The exact check sends a few
    requests one at a time through both engines, where both compute the same shapes: the server must serve
    the same model under the same chat template, token for token."""
    from factory.engines.vllm import VLLMEngine

    rs = [Request(key=f"t{i}", messages=chat(i), sampling=Sampling(max_tokens=64, temperature=0.0)) for i in range(32)]
    alone = rs[:4]
    eng = OpenAIEngine(vllm_server.url, "smollm2-135m", max_concurrency=32)
    one = OpenAIEngine(vllm_server.url, "smollm2-135m", max_concurrency=1)
    try:
        t0 = time.perf_counter()
        served = run(eng, rs)
        t_server = time.perf_counter() - t0
        served_alone = run(one, alone)
    finally:
        eng.close()
        one.close()
    vllm_server.stop()
    offline_engine = VLLMEngine(vllm_server.model_path, model_name="smollm2-135m", seed=0, kv_cache_gib=1.0)
    try:
        t0 = time.perf_counter()
        offline = {c.key: c for c in offline_engine.generate(rs)}
        t_offline = time.perf_counter() - t0
        offline_alone = {c.key: c for r in alone for c in offline_engine.generate([r])}
    finally:
        offline_engine.close()
    tok_s = sum(c.completion_tokens for c in served.values()) / t_server
    tok_o = sum(c.completion_tokens for c in offline.values()) / t_offline
    same = sum(served[k].texts == offline[k].texts for k in served)
    print(f"\nserver {tok_s:.1f} tok/s ({t_server:.1f} s), offline {tok_o:.1f} tok/s ({t_offline:.1f} s), "
          f"ratio {tok_s / tok_o:.2f}; batched greedy texts agree {same}/32 (not asserted: batch-dependent numerics)")
    everything = [*served.values(), *offline.values(), *served_alone.values(), *offline_alone.values()]
    assert all(c.status == "ok" and c.completion_tokens > 0 for c in everything)
    for r in alone:
        assert served_alone[r.key].prompt_tokens == offline_alone[r.key].prompt_tokens > 0  # the same chat template
        assert served_alone[r.key].texts == offline_alone[r.key].texts, f"{r.key}: server and offline differ alone"
