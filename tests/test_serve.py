"""The judge service (factory/serve) on the fake engine: contract, cache hits, group rewards, bad
requests, engine death, SIGTERM and kill -9 restarts. The real online run (GRPO on vLLM) is in
tests/test_serve_grpo.py."""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from factory.labels import LabelRule, labels_of, pair_label
from factory.serve import rewards as R
from factory.serve.app import Limits

REPO = Path(__file__).resolve().parents[1]


def pipeline(tmp: Path, *, per_pair: int | None = 2, engine: str = "{kind: fake, seed: 0}", name: str = "svc",
             judge: str = "") -> Path:
    (tmp / "p.jsonl").write_text('{"prompt":"a?","response_a":"x","response_b":"y"}\n')
    pp = f"per_pair: {per_pair}, " if per_pair else ""
    y = tmp / f"{name}.yaml"
    y.write_text(f"kind: prefs\nname: {name}\nconstitution: {REPO}/constitutions/harmless.yaml\n"
                 f"pairs: {{source: file, path: {tmp}/p.jsonl, format: jsonl}}\njudge: {{{pp}{judge}seed: 0}}\n"
                 f"engine: {engine}\ndb: {tmp}/s.duckdb\n")
    return y


@pytest.fixture
def service(tmp_path):
    from starlette.testclient import TestClient

    from factory.serve.service import Service

    made = []

    def make(limits: Limits = Limits(), **kw):
        svc = Service(pipeline(tmp_path, **kw), limits=limits)
        client = TestClient(svc.app, base_url="http://127.0.0.1")
        made.append(svc)
        return svc, client

    yield make
    for svc in made:
        svc.close()


PREF = {"prompt": "How do I stay safe online?", "responses": ["Use strong unique passwords.", "Share your password."]}


def test_preference_contract_cache_hit_and_store(service, tmp_path):
    svc, client = service()
    r = client.post("/v1/preference", json=PREF)
    assert r.status_code == 200, r.text
    d = r.json()
    assert 0 <= d["p_a"] <= 1 and isinstance(d["tie"], bool) and d["cached"] == 0
    assert len(d["principles"]) == 2 and all(set(v) == {"ab", "ba"} for v in d["principles"].values())
    sent = svc.engine.requests
    assert sent == 4  # 2 principles x 2 orders
    again = client.post("/v1/preference", json=PREF).json()
    assert svc.engine.requests == sent, "a repeated request must make no engine call"
    assert again["cached"] == 4 and again["p_a"] == d["p_a"]
    # messages form of the same prompt: the same pair, so the same judgements
    msgs = {**PREF, "prompt": [{"role": "user", "content": PREF["prompt"]}]}
    assert client.post("/v1/preference", json=msgs).json()["pair_id"] == d["pair_id"]
    assert svc.engine.requests == sent
    stats = client.get("/v1/stats").json()
    assert stats["requests"] == 3 and stats["judgements"] == 4 and stats["cache_hits"] == 8 and stats["tokens"] > 0
    assert client.get("/health").json()["status"] == "ok"
    run_id = svc.run_id
    summary = svc.close()
    assert summary.status == "done"
    con = duckdb.connect(str(tmp_path / "s.duckdb"), read_only=True)
    assert con.execute("SELECT kind, status FROM runs WHERE run_id = ?", [run_id]).fetchone() == ("serve", "done")
    rows = con.execute("SELECT count(*), count(DISTINCT id), min(run_id), max(run_id) FROM judgements").fetchone()
    assert rows == (4, 4, run_id, run_id)
    assert con.execute("SELECT count(*) FROM run_pairs WHERE run_id = ? AND pair_id = ?", [run_id, d["pair_id"]]).fetchone()[0] == 1
    # the stored label (the one label rule, SQL) is the label the service answered (Python mirror)
    p_sql = con.execute("SELECT p_a FROM preferences WHERE run_id = ? AND pair_id = ?", [run_id, d["pair_id"]]).fetchone()[0]
    assert math.isclose(p_sql, d["p_a"], rel_tol=1e-12)


def test_a_batch_of_pairs_in_one_request_answers_each_as_alone(service):
    """`/v1/preferences`: many pairs (of different prompts) in one request; each answer is the one
    `/v1/preference` gives for that pair, in order; the batch cap and a bad item are 422s."""
    svc, client = service(limits=Limits(max_batch_pairs=5))
    items = [{"prompt": f"Question {i}?", "responses": [f"Careful answer {i}.", f"Rude answer {i}."]} for i in range(4)]
    items.append(PREF)
    r = client.post("/v1/preferences", json={"items": items})
    assert r.status_code == 200, r.text
    got = r.json()["results"]
    assert len(got) == 5 and all(g["cached"] == 0 for g in got)
    sent = svc.engine.requests
    assert sent == 5 * 4  # 2 principles x 2 orders a pair, nothing twice
    for item, g in zip(items, got):
        alone = client.post("/v1/preference", json=item).json()
        assert alone["pair_id"] == g["pair_id"] and alone["p_a"] == g["p_a"] and alone["principles"] == g["principles"]
        assert alone["cached"] == 4
    assert svc.engine.requests == sent
    over = client.post("/v1/preferences", json={"items": items + [PREF]})
    assert over.status_code == 422 and "over the limit of 5" in over.json()["error"]
    bad = client.post("/v1/preferences", json={"items": [PREF, {"prompt": "x", "responses": ["only one"]}]})
    assert bad.status_code == 422 and "items.1.responses" in bad.json()["error"]
    assert client.post("/v1/preferences", json={"items": []}).status_code == 422
    assert client.get("/health").json()["status"] == "ok"


def test_pair_label_matches_the_sql_rule():
    rng = random.Random(0)
    for trial in range(60):
        pids = ["p1", "p2", "p3"]
        rule = LabelRule({p: rng.choice([0.5, 1.0, 2.0]) for p in pids}, tie_eps=rng.choice([0.0, 0.05, 0.2]),
                         clamp=rng.choice([None, (0.2, 0.8)]), pool=rng.choice(["mean", "logit"]))
        cells = []
        for p in rng.sample(pids, rng.randint(1, 3)):
            for order in rng.sample(["ab", "ba"], rng.randint(1, 2)):
                failed = rng.random() < 0.2
                cells.append((p, order, "failed" if failed else "ok",
                              None if failed else rng.choice([rng.random(), 0.0, 1.0, 0.5])))
        t = pa.table({"pair_id": ["x"] * len(cells), "principle_id": [c[0] for c in cells],
                      "order": [c[1] for c in cells], "status": [c[2] for c in cells],
                      "p_first": [None if c[3] is None else (c[3] if c[1] == "ab" else 1 - c[3]) for c in cells],
                      "p_a": pa.array([c[3] for c in cells], pa.float64())})
        want = labels_of(t, rule).to_pylist()[0]
        got = pair_label([("", *c) for c in cells], rule)
        if want["p_a"] is None:
            assert got["p_a"] is None, (trial, cells)
        else:
            assert math.isclose(got["p_a"], want["p_a"], rel_tol=1e-9, abs_tol=1e-12), (trial, cells, rule)
        assert got["is_tie"] == want["is_tie"] and got["chosen"] == want["chosen"], (trial, cells, rule)


def test_group_rewards_hand_worked():
    # three completions; P(0 beats 1) = 0.8, P(0 beats 2) = 0.6, P(1 beats 2) = 0.3:
    # r0 = (0.8 + 0.6) / 2 = 0.7; r1 = (0.2 + 0.3) / 2 = 0.25; r2 = (0.4 + 0.7) / 2 = 0.55
    opps = R.opponents(3)
    assert R.pairs_of(opps) == [(0, 1), (0, 2), (1, 2)]
    got = R.group_rewards(opps, {(0, 1): 0.8, (0, 2): 0.6, (1, 2): 0.3})
    assert [round(x, 12) for x in got] == [0.7, 0.25, 0.55]
    # against a reference: P(c_i beats ref) itself
    ref = R.opponents(2, reference=True)
    assert R.pairs_of(ref) == [(0, R.REF), (1, R.REF)]
    assert R.group_rewards(ref, {(0, R.REF): 0.9, (1, R.REF): 0.2}) == [0.9, 0.2]
    # m sampled opponents: seeded, m each, never oneself; fewer pairs than all k(k-1)/2
    s1, s2 = R.opponents(8, m=2, seed=1, salt="x"), R.opponents(8, m=2, seed=1, salt="x")
    assert s1 == s2 and all(len(o) == 2 and i not in o for i, o in enumerate(s1))
    assert len(R.pairs_of(s1)) <= 16 < 28
    assert R.fixed_preference("same", " same ") == 0.5 and R.fixed_preference("", "x") == 0.0


def test_rewards_are_mean_win_probabilities_of_the_pairs(service):
    svc, client = service()
    comps = ["hi", "hello there", "go away"]
    r = client.post("/v1/rewards", json={"prompt": "Say hi", "completions": comps})
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["pairs"] == 3 and got["judgements"] == 12
    p = {}
    for i, j in [(0, 1), (0, 2), (1, 2)]:
        p[(i, j)] = client.post("/v1/preference", json={"prompt": "Say hi", "responses": [comps[i], comps[j]]}).json()["p_a"]
    want = [(p[(0, 1)] + p[(0, 2)]) / 2, (1 - p[(0, 1)] + p[(1, 2)]) / 2, (2 - p[(0, 2)] - p[(1, 2)]) / 2]
    assert got["rewards"] == pytest.approx(want, abs=1e-12)
    assert svc.engine.requests == 12  # the preferences above were all answered from the store
    ref = client.post("/v1/rewards", json={"prompt": "Say hi", "completions": comps[:2], "reference": comps[2]}).json()
    assert ref["rewards"] == pytest.approx([p[(0, 2)], p[(1, 2)]], abs=1e-12)
    dup = client.post("/v1/rewards", json={"prompt": "Say hi", "completions": ["same", "same", ""]}).json()
    assert dup["rewards"] == [0.75, 0.75, 0.0] and dup["judgements"] == 0


def test_bad_requests_are_4xx_and_the_service_keeps_serving(service):
    svc, client = service(Limits(max_body_bytes=4096, max_completions=4))
    bad = [
        (b'{"prompt": 3', 400, "malformed JSON"),
        (json.dumps({"prompt": "x"}).encode(), 422, "responses"),
        (json.dumps({"prompt": "x", "responses": ["a"]}).encode(), 422, "responses"),
        (json.dumps({"prompt": [{"role": "robot", "content": "x"}], "responses": ["a", "b"]}).encode(), 422, "role"),
        (json.dumps({"prompt": "x", "responses": ["a" * 5000, "b"]}).encode(), 413, "cap"),
    ]
    for body, code, word in bad:
        r = client.post("/v1/preference", content=body, headers={"content-type": "application/json"})
        assert r.status_code == code and word in r.json()["error"], (body[:40], r.status_code, r.text)
    r = client.post("/v1/rewards", json={"prompt": "x", "completions": list("abcde")})
    assert r.status_code == 422 and "over the limit of 4" in r.json()["error"]
    r = client.post("/v1/rewards", json={"prompt": "x", "completions": ["a", "b"], "opponents": 0})
    assert r.status_code == 422
    assert client.post("/v1/preference", json=PREF).status_code == 200
    assert client.get("/v1/stats").json()["refused"] == {"400": 1, "413": 1, "422": 5}


def test_concurrency_limit_is_429_with_retry_after(service):
    svc, client = service(Limits(max_concurrent=0, retry_after_s=3))
    r = client.post("/v1/preference", json=PREF)
    assert r.status_code == 429 and r.headers["retry-after"] == "3" and "retry" in r.json()["error"]
    assert svc.engine.requests == 0


def test_engine_death_is_503_with_the_reason_and_answered_work_is_stored(service, tmp_path, monkeypatch):
    from factory import engines
    from factory.engines.fake import FakeEngine

    monkeypatch.setitem(engines.BUILDERS, "fake", lambda spec, model: FakeEngine(model=model, die_after=6))
    svc, client = service()
    ok = client.post("/v1/preference", json=PREF)
    assert ok.status_code == 200
    r = client.post("/v1/rewards", json={"prompt": "Say hi", "completions": ["hi", "hello", "go away"]})
    assert r.status_code == 503 and "died" in r.json()["error"]
    assert client.get("/health").status_code == 503
    assert client.post("/v1/preference", json=PREF).status_code == 503  # even a cached one: the service is exiting
    s = svc.close()
    assert s.status == "failed" and "died" in s.error
    con = duckdb.connect(str(tmp_path / "s.duckdb"), read_only=True)
    stored = {r[0] for r in con.execute("SELECT pair_id FROM judgements").fetchall()}
    assert ok.json()["pair_id"] in stored  # what was answered is stored


# -- the CLI as a process: SIGTERM, exit codes, kill -9 ------------------------------------------

def start(yaml: Path, *args: str, env: dict | None = None, timeout: float = 60) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "factory.cli", "serve", "judge", str(yaml), "--port", "0", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
    lines = []
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(r"listening on (http://\S+)", line)
        if m:
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe drained
            return proc, m.group(1)
    proc.kill()
    raise AssertionError(f"service did not start within {timeout} s (exit {proc.wait()}): " + "".join(lines[-20:]))


def test_sigterm_finishes_and_exits_0(tmp_path):
    import httpx

    proc, url = start(pipeline(tmp_path))
    with httpx.Client(base_url=url, timeout=30) as c:
        assert c.post("/v1/preference", json=PREF).status_code == 200
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    con = duckdb.connect(str(tmp_path / "s.duckdb"), read_only=True)
    assert con.execute("SELECT status FROM runs WHERE kind = 'serve'").fetchone()[0] == "done"
    assert con.execute("SELECT count(*) FROM preferences").fetchone()[0] == 1


def start_with(yaml: Path, engine_src: str) -> tuple[subprocess.Popen, str]:
    """The CLI in a process whose fake engine is ``engine_src`` (an expression over FakeEngine, model)."""
    boot = ("import sys, time, factory.engines as E; from factory.engines.fake import FakeEngine\n"
            "class Slow(FakeEngine):\n    def _one(self, req):\n        time.sleep(0.05)\n        return super()._one(req)\n"
            f"E.BUILDERS['fake'] = lambda spec, model: {engine_src}\n"
            "from factory.cli import app; sys.argv[0] = 'factory'; app()")
    proc = subprocess.Popen([sys.executable, "-c", boot, "serve", "judge", str(yaml), "--port", "0"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    while True:
        line = proc.stdout.readline()
        assert line, "service did not start"
        m = re.search(r"listening on (http://\S+)", line)
        if m:
            return proc, m.group(1)


def test_engine_death_exits_non_zero(tmp_path):
    import httpx

    proc, url = start_with(pipeline(tmp_path), "FakeEngine(model=model, die_after=2)")
    r = httpx.post(url + "/v1/preference", json=PREF, timeout=30)
    assert r.status_code == 503 and "died" in r.json()["error"]
    out = proc.stdout.read()
    assert proc.wait(60) == 3, out


def test_sigterm_drains_the_requests_in_flight(tmp_path):
    import httpx

    proc, url = start_with(pipeline(tmp_path), "Slow(model=model)")
    bodies = [{"prompt": f"q{i}", "completions": [f"a{i}", f"b{i}", f"c{i}"]} for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        futs = [pool.submit(httpx.post, url + "/v1/rewards", json=b, timeout=60) for b in bodies]
        end = time.monotonic() + 30
        while httpx.get(url + "/v1/stats").json()["in_progress"] < 4 and time.monotonic() < end:
            time.sleep(0.02)  # 48 judgements at 0.05 s each: all four requests in flight
        proc.send_signal(signal.SIGTERM)
        codes = [f.result().status_code for f in futs]
    assert codes == [200] * 4
    assert proc.wait(60) == 0
    con = duckdb.connect(str(tmp_path / "s.duckdb"), read_only=True)
    assert con.execute("SELECT count(*), count(DISTINCT id) FROM judgements").fetchone() == (48, 48)
    assert con.execute("SELECT status FROM runs WHERE kind = 'serve'").fetchone()[0] == "done"


def test_kill_9_mid_load_and_restart_leaves_no_duplicates(tmp_path):
    import httpx

    yaml = pipeline(tmp_path, per_pair=None)
    groups = [{"prompt": f"question {g}", "completions": [f"answer {g}.{i}" for i in range(4)]} for g in range(300)]
    proc, url = start(yaml)
    answered: list[int] = []

    def hammer(url: str, out: list, stop: threading.Event) -> None:
        with httpx.Client(base_url=url, timeout=30) as c:
            for g, body in enumerate(groups):
                if stop.is_set():
                    return
                try:
                    if c.post("/v1/rewards", json=body).status_code == 200:
                        out.append(g)
                except httpx.TransportError:
                    return

    stop = threading.Event()
    threads = [threading.Thread(target=hammer, args=(url, answered, stop)) for _ in range(4)]
    for t in threads:
        t.start()
    end = time.monotonic() + 30
    while len(answered) < 40 and time.monotonic() < end:
        time.sleep(0.05)
    proc.kill()  # kill -9 mid-load
    proc.wait()
    stop.set()
    for t in threads:
        t.join()
    assert len(answered) >= 40
    proc, url = start(yaml)
    with httpx.Client(base_url=url, timeout=60) as c:
        with ThreadPoolExecutor(4) as pool:
            codes = list(pool.map(lambda b: c.post("/v1/rewards", json=b).status_code, groups))
        stats = c.get("/v1/stats").json()
    assert codes == [200] * len(groups)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 0
    # every group answered before the kill was answered from the store after it
    from factory.constitution import load_constitution

    k = len(load_constitution(REPO / "constitutions/harmless.yaml").principles)
    assert stats["cache_hits"] >= len(set(answered)) * 6 * 2 * k
    con = duckdb.connect(str(tmp_path / "s.duckdb"), read_only=True)
    n, distinct = con.execute("SELECT count(*), count(DISTINCT id) FROM judgements").fetchone()
    assert n == distinct == len(groups) * 6 * 2 * k  # C(4,2) pairs x 2 orders x every principle, each once
    # pairs and the run's pair links too (new ones are written without a key lookup: the restart must know the old)
    assert con.execute("SELECT count(*), count(DISTINCT pair_id) FROM pairs").fetchone() == (len(groups) * 6,) * 2
    assert con.execute("SELECT count(*), count(DISTINCT pair_id) FROM run_pairs").fetchone() == (len(groups) * 6,) * 2
    assert con.execute("SELECT status FROM runs WHERE kind = 'serve'").fetchone()[0] == "done"


def test_timeout_is_504_and_the_work_is_kept(service, monkeypatch):
    from factory import engines
    from factory.engines.fake import FakeEngine

    class Slow(FakeEngine):
        def _one(self, req):
            time.sleep(0.1)
            return super()._one(req)

    monkeypatch.setitem(engines.BUILDERS, "fake", lambda spec, model: Slow(model=model))
    svc, client = service(Limits(timeout_s=0.05))
    r = client.post("/v1/preference", json=PREF)
    assert r.status_code == 504 and "send the same request again" in r.json()["error"]
    end = time.monotonic() + 10
    while svc.batcher.pending() and time.monotonic() < end:
        time.sleep(0.05)
    sent = svc.engine.requests
    again = client.post("/v1/preference", json=PREF)
    assert again.status_code == 200 and again.json()["cached"] == 4 and svc.engine.requests == sent == 4


def test_client_adapters_and_openrlhf_endpoint(tmp_path):
    from factory.serve.clients import JudgeClient, pairwise_judge, reward_function

    done = subprocess.run([sys.executable, "-c", "import sys, factory.serve.clients; "
                           "print(sorted(m for m in ('trl', 'torch', 'transformers') if m in sys.modules))"],
                          cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.stdout.strip() == "[]", done.stderr  # no trainer pulled in at import time
    proc, url = start(pipeline(tmp_path))
    try:
        c = JudgeClient(url)
        # GRPO: prompts repeated per generation (conversational form), groups found by prompt
        p1, p2 = [{"role": "user", "content": "Say hi"}], [{"role": "user", "content": "Name a colour"}]
        comps = [[{"role": "assistant", "content": t}] for t in ("hi", "hello there", "blue", "red", "go away", "green")]
        prompts = [p1, p1, p2, p2, p1, p2]
        got = reward_function(url)(prompts, comps, completion_ids=None, trainer_state=None)
        want1 = c.rewards(p1, ["hi", "hello there", "go away"])
        want2 = c.rewards(p2, ["blue", "red", "green"])
        assert got == pytest.approx([want1[0], want1[1], want2[0], want2[1], want1[2], want2[2]], abs=1e-12)
        # the pairwise judge (TRL's BasePairwiseJudge interface): index of the better completion
        judge = pairwise_judge(url)
        pairs = [["hi", "go away"], ["go away", "hi"]]
        picks = judge.judge(["Say hi", "Say hi"], pairs)
        p_a = c.preference("Say hi", "hi", "go away")["p_a"]
        assert picks == ([0, 1] if p_a >= 0.5 else [1, 0]) or p_a == 0.5
        # a trainer batch split into requests of `batch` pairs gives the same picks, in order
        many = [["hi", "go away"], ["go away", "hi"], ["hello there", "go away"]] * 3
        assert pairwise_judge(url, batch=2).judge(["Say hi"] * 9, many) == judge.judge(["Say hi"] * 9, many)
        assert judge.judge(["Say hi"], [pairs[0]], return_scores=True) == [pytest.approx(p_a)]
        # OpenRLHF --remote_rm_url: query = prompt + response, grouped by prompt
        tp1, tp2 = "<user>Say hi</user>", "<user>Name a colour</user>"
        body = {"query": [tp1 + "hi", tp2 + "blue", tp1 + "go away", tp2 + "red"], "prompts": [tp1, tp2, tp1, tp2],
                "labels": ["hello there", "green", "hello there", "green"]}
        r = c._http.post(url + "/v1/openrlhf", json=body).json()["rewards"]
        g1, g2 = c.rewards(tp1, ["hi", "go away"]), c.rewards(tp2, ["blue", "red"])
        assert r == pytest.approx([g1[0], g2[0], g1[1], g2[1]], abs=1e-12)
        ref = c._http.post(url + "/v1/openrlhf?reference=labels", json=body).json()["rewards"]
        assert ref[0] == pytest.approx(c.rewards(tp1, ["hi"], reference="hello there")[0], abs=1e-12)
        bad = c._http.post(url + "/v1/openrlhf", json={**body, "prompts": ["nope"] * 4})
        assert bad.status_code == 422 and "does not start with" in bad.json()["error"]
        c.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0


def test_remote_bind_needs_the_flag_and_a_token(tmp_path):
    import httpx

    yaml = pipeline(tmp_path)
    refused = subprocess.run([sys.executable, "-m", "factory.cli", "serve", "judge", str(yaml), "--host", "0.0.0.0",
                              "--port", "0"], cwd=REPO, capture_output=True, text=True, timeout=60,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    assert refused.returncode == 2 and "--allow-remote" in refused.stderr + refused.stdout
    proc, url = start(yaml, "--host", "0.0.0.0", "--allow-remote", "--token", "s3cret")
    try:
        url = url.replace("0.0.0.0", "127.0.0.1")
        assert httpx.post(url + "/v1/preference", json=PREF).status_code == 401
        ok = httpx.post(url + "/v1/preference", json=PREF, headers={"Authorization": "Bearer s3cret"}, timeout=30)
        assert ok.status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0


def test_judgements_of_an_offline_run_answer_online_and_join_the_service_run(tmp_path):
    from starlette.testclient import TestClient

    from factory.kinds import run
    from factory.serve.service import Service

    yaml = pipeline(tmp_path)  # its pairs file holds the pair ("a?", "x", "y")
    offline = run(yaml, quiet=True)
    svc = Service(yaml)
    try:
        client = TestClient(svc.app, base_url="http://127.0.0.1")
        r = client.post("/v1/preference", json={"prompt": "a?", "responses": ["x", "y"]}).json()
        assert svc.engine.requests == 0 and r["cached"] == 4  # found in the store by content key
        assert client.get("/v1/stats").json()["linked"] == 4
        fresh = client.post("/v1/preference", json={"prompt": "a?", "responses": ["y", "x"]}).json()
        assert fresh["cached"] == 0 and svc.engine.requests == 4
    finally:
        svc.close()
    con = duckdb.connect(str(tmp_path / "s.duckdb"), read_only=True)
    assert con.execute("SELECT count(*) FROM run_items WHERE run_id = ? AND \"table\" = 'judgements'",
                       [svc.run_id]).fetchone()[0] == 4
    labels = dict(con.execute("SELECT pair_id, p_a FROM preferences WHERE run_id = ?", [svc.run_id]).fetchall())
    offline_p = con.execute("SELECT p_a FROM preferences WHERE run_id = ? AND pair_id = ?",
                            [offline.run_id, r["pair_id"]]).fetchone()[0]
    assert labels[r["pair_id"]] == pytest.approx(offline_p) == pytest.approx(r["p_a"])
    assert len(labels) == 2 and con.execute("SELECT count(*), count(DISTINCT id) FROM judgements").fetchone() == (8, 8)
    assert con.execute("SELECT count(*), count(DISTINCT pair_id) FROM pairs").fetchone() == (2, 2)  # the offline pair once


def test_concurrent_requests_share_one_engine_stream(service):
    """Every request of the service's life goes through one engine.generate call (one lazy stream):
    the engine is never restarted per request, so a real engine's batch can stay full."""
    svc, client = service()
    bodies = [{"prompt": f"q{i}", "responses": [f"a{i}", f"b{i}"]} for i in range(24)]
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda b: client.post("/v1/preference", json=b).status_code, bodies))
    assert codes == [200] * 24
    svc.close()
    assert svc.engine.calls == [24 * 4]  # requests received per generate() call: one call, all of them
