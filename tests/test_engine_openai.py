"""OpenAIEngine: fault injection against tests/fakeserver.py, and (marked ``server``) a real ``vllm serve``."""

from __future__ import annotations

import collections
import socket
import threading
import time

import pytest

from factory.engines.base import EngineError, Request, Sampling
from factory.engines.openai import NO_CHOICE_LOGPROBS, EndpointError, OpenAIEngine
from factory.engines.serve import VLLMServer
from fakeserver import FakeServer

FAST = dict(backoff_s=0.005, max_backoff_s=0.02)


def reqs(n: int, prefix: str = "q") -> list[Request]:
    return [Request(key=f"k{i}", messages=[{"role": "user", "content": f"{prefix} {i}"}], sampling=Sampling(max_tokens=8))
            for i in range(n)]


def run(engine: OpenAIEngine, requests: list[Request]) -> dict:
    got = list(engine.generate(requests))
    counts = collections.Counter(c.key for c in got)
    assert counts == collections.Counter(r.key for r in requests)  # exactly one completion per request
    return {c.key: c for c in got}


@pytest.fixture
def server():
    with FakeServer() as s:
        yield s


def test_generation_and_request_fields(server):
    eng = OpenAIEngine(server.url, "fake-model", seed=7, max_concurrency=4, max_model_len=99, **FAST)
    try:
        assert eng.max_model_len == 2048  # the server's figure wins over the configured one
        rs = reqs(20)
        rs[3] = Request(key="k3", messages=[{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "Well"}],
                        sampling=Sampling(max_tokens=5, temperature=0.0, n=2, stop=("\n",)), continue_final=True)
        out = run(eng, rs)
        assert out["k0"].texts == ["echo: q 0"] and out["k0"].finish_reasons == ["stop"]
        assert (out["k0"].prompt_tokens, out["k0"].completion_tokens) == (2, 3)
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
        r = Request(key="s", messages=[{"role": "user", "content": "A or B?"}], sampling=Sampling(max_tokens=1),
                    options=("x", "y"), option_ids=(5, 12))
        (c,) = list(eng.generate([r]))
        assert c.option_logprobs[0] == pytest.approx(-0.5) and c.option_logprobs[1] == pytest.approx(-1.2)
        body = server.bodies[-1]
        assert body["logprobs"] is True and body["logprob_token_ids"] == [5, 12] and body["return_tokens_as_token_ids"]
        assert eng.token_ids("AB") == [65, 66]  # no local tokenizer for "fake-model": the server's /tokenize
    finally:
        eng.close()


def test_endpoint_without_choice_logprobs_fails_clearly():
    with FakeServer(supports_logprob_ids=False) as s:
        eng = OpenAIEngine(s.url, "fake-model", **FAST)
        try:
            r = Request(key="s", messages=[{"role": "user", "content": "x"}], sampling=Sampling(max_tokens=1), options=("x",), option_ids=(1,))
            with pytest.raises(EndpointError, match="choice-token log-probabilities"):
                list(eng.generate([r]))
            assert NO_CHOICE_LOGPROBS.endswith("use a vLLM server")
        finally:
            eng.close()


def test_transient_faults_are_retried(server):
    server.faults = ["500", "429", "drop", "503", "slow", "500", "drop", "429"]
    server.slow_s = 1.0
    eng = OpenAIEngine(server.url, "fake-model", max_concurrency=3, timeout_s=0.3, max_retries=8, **FAST)
    try:
        out = run(eng, reqs(12))
        assert {c.status for c in out.values()} == {"ok"}
        assert all(c.texts == [f"echo: q {k[1:]}"] for k, c in out.items())
        assert sum(server.attempts.values()) == 12 + 8  # every injected fault cost exactly one retry
    finally:
        eng.close()


def test_retry_after_is_honoured(server):
    server.retry_after = 0.4
    server.faults = ["429"]
    eng = OpenAIEngine(server.url, "fake-model", max_retries=2, **FAST)
    try:
        t0 = time.perf_counter()
        out = run(eng, reqs(1))
        assert out["k0"].status == "ok" and time.perf_counter() - t0 >= 0.4
    finally:
        eng.close()


def test_exhausted_retries_and_bad_requests_are_recorded(server):
    server.sticky = {"poison": "500", "rejected": "400"}
    eng = OpenAIEngine(server.url, "fake-model", max_retries=2, max_concurrency=2, **FAST)
    try:
        rs = reqs(6) + reqs(1, "poison") + reqs(1, "rejected") + [
            Request(key="long", messages=[{"role": "user", "content": "w " * 3000}], sampling=Sampling())]
        rs[6].key, rs[7].key = "poison", "rejected"
        out = run(eng, rs)
        assert out["poison"].status == "failed" and "gave up after 3 attempts: HTTP 500: injected 500" in out["poison"].error
        assert server.attempts["poison 0"] == 3
        assert out["rejected"].status == "failed" and server.attempts["rejected 0"] == 1  # a 400 is not retried
        assert out["long"].status == "skipped" and "maximum context length" in out["long"].error
        assert [out[f"k{i}"].status for i in range(6)] == ["ok"] * 6
    finally:
        eng.close()


def test_server_dying_mid_run_recovers():
    s = FakeServer(slow_s=0.05)
    s.thread.start()
    port = s.port
    s.sticky = {"": "slow"}  # every answer takes 50 ms, so the run is still going when the server dies
    eng = OpenAIEngine(s.url, "fake-model", max_concurrency=2, max_retries=8, backoff_s=0.05, max_backoff_s=0.2)
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
    s.sticky = {"": "slow"}
    s.slow_s = 0.05
    eng = OpenAIEngine(s.url, "fake-model", max_concurrency=2, max_retries=2, **FAST)
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


def test_make_engine_builds_openai_engine_with_api_key(server, monkeypatch):
    from factory.config import EngineSpec
    from factory.engines import make_engine

    spec = EngineSpec(kind="openai", base_url=server.url, api_key_env="FAKE_KEY", max_concurrency=3, seed=5)
    with pytest.raises(EngineError, match=r"FAKE_KEY, which is not set"):
        make_engine(spec, "fake-model")
    monkeypatch.setenv("FAKE_KEY", "sekrit")
    eng = make_engine(spec, "fake-model")
    try:
        assert isinstance(eng, OpenAIEngine) and (eng.model, eng.seed, eng.max_concurrency) == ("fake-model", 5, 3)
        run(eng, reqs(2))
        assert server.auth == ["Bearer sekrit"] * 2
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


@pytest.mark.server
def test_vllm_serve_vs_offline_throughput(vllm_server):
    """The same 32 greedy requests through the server and then through the offline engine (one engine at a
    time: the server is stopped first). Prints tokens/s; greedy texts must agree for most requests."""
    from factory.engines.vllm import VLLMEngine

    rs = [Request(key=f"t{i}", messages=chat(i), sampling=Sampling(max_tokens=64, temperature=0.0)) for i in range(32)]
    eng = OpenAIEngine(vllm_server.url, "smollm2-135m", max_concurrency=32)
    try:
        t0 = time.perf_counter()
        served = run(eng, rs)
        t_server = time.perf_counter() - t0
    finally:
        eng.close()
    vllm_server.stop()
    offline_engine = VLLMEngine(vllm_server.model_path, model_name="smollm2-135m", seed=0, kv_cache_gib=1.0)
    try:
        t0 = time.perf_counter()
        offline = {c.key: c for c in offline_engine.generate(rs)}
        t_offline = time.perf_counter() - t0
    finally:
        offline_engine.close()
    tok_s = sum(c.completion_tokens for c in served.values()) / t_server
    tok_o = sum(c.completion_tokens for c in offline.values()) / t_offline
    same = sum(served[k].texts == offline[k].texts for k in served)
    print(f"\nserver {tok_s:.1f} tok/s ({t_server:.1f} s), offline {tok_o:.1f} tok/s ({t_offline:.1f} s), "
          f"ratio {tok_s / tok_o:.2f}; greedy texts agree {same}/32")
    assert all(c.status == "ok" for c in list(served.values()) + list(offline.values()))
    assert same >= 24, f"only {same}/32 greedy outputs agree between server and offline engine"
