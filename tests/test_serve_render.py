"""The judge service's render workers (factory/serve/render_pool.py): judge prompts rendered in other
processes must be the prompts the service (and an offline run) renders itself, a failed render must
fail its row as it would in-process, and a worker killed mid-load must cost nothing but speed.

The fake engine's log-probabilities are a hash of the messages it is sent, so equal ``p_a`` and
``messages_hash`` in two databases mean equal messages."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import duckdb
import pytest

from conftest import REPO
from test_fewshot import constitution_text

PAIRS = [(f"Question {i}: how do I fix situation {i}?", f"Answer A{i}: " + "careful " * (i % 5),
          f"Answer B{i}: " + "reckless " * (i % 3)) for i in range(24)]


def _pipeline(tmp: Path, name: str, *, judge_template: Path | None = None, db: str = "s", two: str = "") -> Path:
    const = tmp / "const.yaml"
    const.write_text(constitution_text(sl=False))
    (tmp / "p.jsonl").write_text("".join(json.dumps({"prompt": p, "response_a": a, "response_b": b}) + "\n"
                                         for p, a, b in PAIRS))
    path2 = tmp / "judge-two.j2"  # a second judge with a template of its own
    path2.write_text((REPO / "prompts/judge.j2").read_text().replace("{% call message('user') %}",
                                                                    "{% call message('user') %}Judge two.\n", 1))
    tpl = f"template: {judge_template}, " if judge_template else ""
    y = tmp / f"{name}.yaml"
    y.write_text(f"kind: prefs\nname: {name}\nconstitution: {const}\n"
                 "judges:\n  - {name: j1, model: judge-one, engine: {kind: fake, seed: 0}}\n"
                 f"  - {{name: j2, model: judge-two, engine: {{kind: fake, seed: 1}}, judge: {{{two}template: {path2}}}}}\n"
                 f"pairs: {{source: file, path: {tmp}/p.jsonl, format: jsonl}}\n"
                 f"judge: {{{tpl}few_shot: 2, seed: 0}}\ndb: {tmp}/{db}.duckdb\n")
    return y


def _client(svc):
    from starlette.testclient import TestClient

    return TestClient(svc.app, base_url="http://127.0.0.1")


def _rows(db: Path) -> dict[str, tuple]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return {k: rest for k, *rest in con.execute(
            "SELECT id, messages_hash, p_a, status, error, model FROM judgements").fetchall()}
    finally:
        con.close()


def _items() -> dict:
    return {"items": [{"prompt": p, "responses": [a, b]} for p, a, b in PAIRS]}


def test_render_workers_send_the_messages_an_offline_run_renders(tmp_path):
    """A panel of two judges (two templates, few-shot demonstrations): every judgement the service
    made with a render worker is the offline run's, row for row (key, messages hash, p_a)."""
    from factory.kinds import run
    from factory.serve.service import Service

    run(_pipeline(tmp_path, "offline-run", db="offline"), quiet=True)
    offline = _rows(tmp_path / "offline.duckdb")
    assert len(offline) == 24 * 2 * 2 * 2  # pairs x judges x principles x orders

    svc = Service(_pipeline(tmp_path, "online", db="served"), render_workers=1)
    try:
        r = _client(svc).post("/v1/preferences", json=_items())
        assert r.status_code == 200, r.text
        stats = svc.batcher.stats
        assert stats.render_workers == 1 and stats.worker_renders == len(offline) and stats.judgements == len(offline)
    finally:
        assert svc.close().status == "done"
    served = _rows(tmp_path / "served.duckdb")
    assert served == offline
    assert {m for _, _, _, _, m in served.values()} == {"fake:judge-one", "fake:judge-two"}


def test_a_render_error_in_a_worker_fails_its_row_as_it_fails_in_the_service(tmp_path):
    """A template that fails on one pair's text: that pair's judgements are failed rows with the error
    the in-process render gives, the other pairs are judged, and the service keeps serving."""
    from factory.serve.service import Service

    bad = tmp_path / "bad.j2"
    bad.write_text((REPO / "prompts/judge.j2").read_text()
                   + "{% if 'BOOM' in first + second %}{{ no_such_variable }}{% endif %}\n")
    body = {"items": [{"prompt": "Fine?", "responses": ["yes", "no"]},
                      {"prompt": "Explode?", "responses": ["BOOM", "quiet"]}]}
    got = {}
    for workers in (1, 0):
        svc = Service(_pipeline(tmp_path, f"bad{workers}", judge_template=bad, db=f"bad{workers}"),
                      render_workers=workers)
        svc.batcher.inline_jobs = 0  # 16 jobs: to the worker even when everything is idle
        try:
            client = _client(svc)
            r = client.post("/v1/preferences", json=body)
            assert r.status_code == 200, r.text
            assert svc.batcher.stats.worker_renders == (16 if workers else 0)
            assert client.post("/v1/preference", json={"prompt": "Again?", "responses": ["a", "b"]}).status_code == 200
        finally:
            svc.close()
        got[workers] = _rows(tmp_path / f"bad{workers}.duckdb")
    assert got[1] == got[0]
    failed = [row for row in got[1].values() if row[2] == "failed"]
    assert len(failed) == 4 and all("no_such_variable" in row[3] and row[3].startswith("render: ") for row in failed)


def test_a_render_worker_killed_mid_load_costs_only_speed(tmp_path):
    """SIGKILL to the only render worker while requests are in flight: every request is answered,
    the rest render in the service, each judgement is stored once, and /v1/stats says no worker is left."""
    from factory.serve.service import Service

    svc = Service(_pipeline(tmp_path, "kill", db="kill"), render_workers=1)
    pid = svc.batcher._pool.workers[0].proc.pid
    bodies = [{"prompt": f"load {i}", "completions": [f"reply {i}.{j} " + "word " * j for j in range(6)]}
              for i in range(60)]
    codes: list[int] = []
    try:
        client = _client(svc)

        def send(part: list[dict]) -> None:
            for b in part:
                codes.append(client.post("/v1/rewards", json=b).status_code)

        threads = [threading.Thread(target=send, args=(bodies[i::4],)) for i in range(4)]
        for t in threads:
            t.start()
        while svc.batcher.stats.worker_renders == 0:
            time.sleep(0.005)
        os.kill(pid, signal.SIGKILL)
        for t in threads:
            t.join(120)
        assert codes == [200] * len(bodies)
        stats = client.get("/v1/stats").json()
        assert stats["render_workers"] == 0
        assert 0 < stats["worker_renders"] < stats["judgements"] == 60 * 15 * 2 * 2 * 2  # groups x pairs x judges x principles x orders
    finally:
        assert svc.close().status == "done"
    con = duckdb.connect(str(tmp_path / "kill.duckdb"), read_only=True)
    n, distinct = con.execute("SELECT count(*), count(DISTINCT id) FROM judgements").fetchone()
    con.close()
    assert n == distinct == 60 * 15 * 2 * 2 * 2


def test_only_jobs_a_worker_can_render_exactly_go_to_it(tmp_path):
    """A cot judge's rationales and its scored follow-ups (which show the rationale) render in the
    batcher (``Job.render`` is None); a logprob judge's judgements go to the worker."""
    from factory.serve.service import Service
    from factory.stages.judge import Pair

    svc = Service(_pipeline(tmp_path, "which", db="which", two="mode: cot, "), render_workers=1)
    svc.batcher.inline_jobs = 0  # a lone pair's jobs: to the worker even when everything is idle
    try:
        pool = svc.batcher._pool
        pair = Pair("p1", [{"role": "user", "content": "hi"}], "a", "b")
        jobs = svc.plan.jobs_of([pair])
        logprob = [j for j in jobs if j.route == "j1"]
        cot = [j for j in jobs if j.route == "j2"]
        assert len(logprob) == len(cot) == 4 and all(pool.takes(j) for j in logprob)
        assert all(j.table == "rationales" and j.render is None and not pool.takes(j) for j in cot)
        follow = cot[0].then([{"id": cot[0].key, "status": "ok", "text": "because"}])
        assert follow[0].render is None and not pool.takes(follow[0])
        r = _client(svc).post("/v1/preference", json={"prompt": "hi", "responses": ["a", "b"]})
        assert r.status_code == 200, r.text
        st = svc.batcher.stats
        assert st.worker_renders == 4 and st.judgements == 8 and st.rationales == 4
    finally:
        assert svc.close().status == "done"


def test_a_lone_pair_while_idle_renders_in_the_service_and_a_batch_in_the_worker(tmp_path):
    """At most ``inline_jobs`` jobs planned while the engine and the workers are idle render in the
    batcher (a worker's round trip would only add latency); more go to the worker."""
    from factory.serve.service import Service

    svc = Service(_pipeline(tmp_path, "lone", db="lone"), render_workers=1)
    try:
        client, st = _client(svc), svc.batcher.stats
        assert svc.batcher.inline_jobs == 16
        r = client.post("/v1/preference", json={"prompt": "hi", "responses": ["a", "b"]})  # 8 jobs
        assert r.status_code == 200 and st.judgements == 8 and st.worker_renders == 0
        r = client.post("/v1/preferences", json={"items": [{"prompt": f"q{i}", "responses": ["a", "b"]}
                                                           for i in range(3)]})  # 24 jobs
        assert r.status_code == 200 and st.judgements == 32 and st.worker_renders == 24
    finally:
        svc.close()
