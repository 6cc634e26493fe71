"""Integration tests on the real vLLM CPU engine with the embedded model (one engine per session)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from factory import pipeline
from factory.engines.base import Request, Sampling
from factory.store import Store

from conftest import write_pipeline

pytestmark = pytest.mark.engine

PROMPTS = [{"prompt": f"Give me one tip about topic number {i}."} for i in range(6)] + [
    {"messages": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello!"},
                  {"role": "user", "content": "How do I boil an egg?"}]}]


def test_engine_scores_option_tokens_and_skips_overlength(engine):
    a, b = engine.token_ids("A"), engine.token_ids("B")
    assert len(a) == len(b) == 1
    reqs = [
        Request("judge", [{"role": "user", "content": "Pick A or B."}, {"role": "assistant", "content": "My pick: ("}],
                Sampling(max_tokens=1, temperature=0), options=("A", "B"), option_ids=(a[0], b[0]), continue_final=True),
        Request("long", [{"role": "user", "content": "hello " * 2500}], Sampling(max_tokens=8)),
        Request("gen", [{"role": "user", "content": "Say hi."}], Sampling(max_tokens=8, n=2)),
    ]
    got = {c.key: c for c in engine.generate(reqs)}
    lp = got["judge"].option_logprobs
    assert len(lp) == 2 and all(v <= 0 for v in lp)
    assert got["long"].status == "skipped" and "prompt too long" in got["long"].error
    assert len(got["gen"].texts) == 2 and got["gen"].completion_tokens > 0


# Prompts whose option log-probs differ by a clear margin, in both directions, so that a swapped A/B
# mapping cannot match the reference: "alphabet" favours A by about 6 nats, "judge" favours B by
# about 1.4 (fp32 reference, SmolLM2-135M-Instruct), both well beyond the bf16 tolerance.
OPTION_PROMPTS = {
    "alphabet": [{"role": "user", "content": "What is the first letter of the English alphabet?"},
                 {"role": "assistant", "content": "The first letter of the alphabet is ("}],
    "judge": [{"role": "user", "content": "Which response is more helpful?\n(A) Paris is the capital of France.\n"
                                          "(B) I don't know.\nAnswer with A or B."},
              {"role": "assistant", "content": "The better option is ("}],
}
BF16_TOL = 0.15  # nats: the bf16 engine against the fp32 reference (as for the server in test_engine_openai)


def test_option_logprobs_match_an_fp32_transformers_forward_pass(engine):
    """Every label rests on these numbers: each option's log-prob must be its own token's, on the
    prompt exactly as rendered (chat template, final assistant message continued)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from factory import models

    path = models.resolve(None)
    tok = AutoTokenizer.from_pretrained(path)
    ids = {o: tok.encode(o, add_special_tokens=False) for o in ("A", "B")}
    assert all(len(v) == 1 for v in ids.values())
    option_ids = (ids["A"][0], ids["B"][0])
    assert option_ids == (engine.token_ids("A")[0], engine.token_ids("B")[0])
    reqs = [Request(name, msgs, Sampling(max_tokens=1, temperature=0), options=("A", "B"), option_ids=option_ids,
                    continue_final=True) for name, msgs in OPTION_PROMPTS.items()]
    got = {c.key: c for c in engine.generate(reqs)}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    for name, msgs in OPTION_PROMPTS.items():
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False, continue_final_message=True)
        assert text.endswith(msgs[-1]["content"])  # the judge prefix is continued, not closed
        prompt = tok.encode(text, add_special_tokens=False)
        assert got[name].status == "ok" and got[name].prompt_tokens == len(prompt)
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([prompt])).logits[0, -1].float(), -1)
        expected = [ref[t].item() for t in option_ids]
        assert abs(expected[0] - expected[1]) > 4 * BF16_TOL, (name, expected)  # a swap would be caught
        assert got[name].option_logprobs == pytest.approx(expected, abs=BF16_TOL), (name, expected)
    # the two prompts favour different options: neither a swap nor a constant ordering can pass
    favoured = {name: "A" if c.option_logprobs[0] > c.option_logprobs[1] else "B" for name, c in got.items()}
    assert favoured == {"alphabet": "A", "judge": "B"}


def test_small_run_end_to_end(engine, tmp_path):
    path = write_pipeline(tmp_path, prompts=PROMPTS, rounds=2)
    s = pipeline.run(path, engine=engine, quiet=True)
    assert s.prompts == 7 and s.completion_tokens > 0
    with Store(tmp_path / "out.duckdb", read_only=True) as st:
        n = st.one("""SELECT count(*) FROM revisions v2 JOIN revisions v1 ON v2.parent_id = v1.id
                      JOIN responses r ON v1.parent_id = r.id WHERE v2.round = 2""")[0]
        ok = st.count("revisions", "round = 2 AND status = 'ok'")
        assert n == st.count("revisions", "round = 2") and ok >= 1
        msgs = json.loads(st.one("SELECT messages FROM critiques LIMIT 1")[0])
        assert msgs[-1]["role"] == "user" and "<reply>" in msgs[-1]["content"]


class Counting:
    """The session engine, counting the requests it really receives."""

    def __init__(self, engine):
        self.engine, self.received = engine, 0

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate(self, requests):
        def counted():
            for r in requests:
                self.received += r is not None
                yield r
        return self.engine.generate(counted())

    def close(self):
        pass


def test_kill_9_mid_run_then_resume(engine, tmp_path):
    prompts = [{"prompt": f"Write two sentences about the number {i}."} for i in range(40)]
    path = write_pipeline(tmp_path, prompts=prompts, max_tokens=48)
    db = tmp_path / "out.duckdb"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    err = tmp_path / "child.err"
    with open(err, "w") as errf:
        proc = subprocess.Popen([sys.executable, "-c", "from factory.cli import app; app()", "run", str(path), "--quiet"],
                                env=env, stdout=subprocess.DEVNULL, stderr=errf, start_new_session=True)
        wal = db.with_name(db.name + ".wal")
        deadline = time.time() + 400
        try:  # wait until some rows are committed (the WAL grows), then kill -9 mid-run
            while time.time() < deadline and proc.poll() is None:
                if wal.exists() and wal.stat().st_size > 60_000:
                    break
                time.sleep(0.5)
            assert proc.poll() is None, err.read_text()[-3000:]
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL and "Traceback" not in err.read_text()
    tables = ("responses", "critiques", "revisions")
    with Store(db, read_only=True) as st:
        before = {t: {r[0]: r[1:] for r in st.con.execute(f"SELECT id, text, created_at FROM {t}").fetchall()}
                  for t in tables}
    stored = sum(len(v) for v in before.values())
    assert 0 < stored < 3 * 40, f"the kill must come after some rows were committed and before the end ({stored})"
    counting = Counting(engine)
    s = pipeline.run(path, engine=counting, quiet=True)
    # the engine was asked for exactly the rows that were not stored: nothing recomputed
    assert counting.received == 3 * 40 - stored
    assert s.written == 3 * 40 - stored and s.reused == stored
    with Store(db, read_only=True) as st:
        for t in tables:
            total, distinct = st.one(f"SELECT count(*), count(DISTINCT id) FROM {t}")
            assert total == distinct == 40, t  # nothing lost, nothing duplicated
            after = {r[0]: r[1:] for r in st.con.execute(f"SELECT id, text, created_at FROM {t}").fetchall()}
            assert all(after[k] == v for k, v in before[t].items())  # stored rows untouched


def test_engine_pulls_requests_lazily_within_its_window(engine):
    """The engine holds at most ``max_pending`` requests and tops the batch up after every step: a
    lazy stream is never read ahead, and ``None`` ("nothing now") pauses pulling until a completion."""
    pulled, got = [], []

    def stream():
        for i in range(20):
            pulled.append(i)
            yield Request(f"lazy{i}", [{"role": "user", "content": f"Count to {i}."}], Sampling(max_tokens=4))
            if i == 9:
                yield None  # the caller has nothing right now: fine while requests are in flight

    old = engine.max_pending
    engine.max_pending = 6
    try:
        for c in engine.generate(stream()):
            got.append(c)
            assert len(pulled) - len(got) <= 6
    finally:
        engine.max_pending = old
    assert sorted(c.key for c in got) == sorted(f"lazy{i}" for i in range(20)) and all(c.status == "ok" for c in got)
