"""The judge service (``factory serve judge``) against the offline runner, side by side in one run.

    python bench/bench_service.py                  # fake engine: throughput, memory over 20,000 requests, latency, cache hits
    python bench/bench_service.py --quick          # small sizes
    python bench/bench_service.py --real 24        # also the embedded model on vLLM (24 groups of 4), offline vs HTTP
    python bench/bench_service.py --parts panel    # a panel of two fake judges on two engines, offline vs HTTP

1. Throughput, same workload both ways, fake engine: groups of k completions per prompt, every pair
   judged for ``per_pair`` principles in both orders. Offline: a ``prefs`` run over a file holding
   exactly those pairs (``factory run``, in this process). HTTP: a service subprocess on a fresh
   database, C concurrent clients sending ``/v1/rewards`` (one group a request) and, separately,
   ``/v1/preferences`` (the same pairs, 32 a request), at each C of ``--clients``; and
   ``/v1/preference`` (one pair a request) at 16. judgements/s = new judgements stored / wall
   seconds. ``--reps`` reps, each the offline run and then the HTTP runs; ratios within a rep, the
   medians over reps reported. The service answers a request only once its judgements are
   committed, so at a fixed number of requests in flight its throughput is bounded by that latency
   (the offline runner has no such bound): the ratio rises with the clients.
2. Memory: the service's RSS (``/proc/PID/status``) while N distinct ``/v1/preference`` requests
   arrive (new judgements each, written to DuckDB), sampled at every 10% (and 25%); the LRU of
   answered judgements is capped (``--cache-size``) so its fill is over early.
3. Latency of one pair (new judgements), alone and while C clients load the service; p50/p99.
4. Cache hits: the same request again, median and p99 (client-side, through HTTP on loopback).

Everything shares the machine's CPUs with the clients (2 cores here): the figures are a floor.
Results go to bench/results/service.jsonl.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, record  # noqa: E402

CONSTITUTION = REPO / "constitutions/harmless.yaml"


PANEL = ("judges:\n  - {name: j1, model: judge-one, engine: {kind: fake, seed: 0}}\n"
         "  - {name: j2, model: judge-two, engine: {kind: fake, seed: 1}, weight: 2}\n")


def pipeline(tmp: Path, name: str, pairs_file: Path, *, per_pair: int, engine: str, judges: str = "") -> Path:
    y = tmp / f"{name}.yaml"
    y.write_text(f"kind: prefs\nname: {name}\nconstitution: {CONSTITUTION}\n"
                 f"pairs: {{source: file, path: {pairs_file}, format: jsonl}}\njudge: {{per_pair: {per_pair}, seed: 0}}\n"
                 f"engine: {engine}\n{judges}db: {tmp}/{name}.duckdb\n")
    return y


def groups(n: int, k: int, tag: str) -> list[dict]:
    return [{"prompt": f"{tag} question {g}: how should I handle situation {g}?",
             "completions": [f"Answer {i} to {g}: " + " ".join(f"w{(g * 7 + i * 13 + j) % 97}" for j in range(40))
                             for i in range(k)]} for g in range(n)]


def pairs_file(path: Path, gs: list[dict]) -> int:
    n = 0
    with open(path, "w") as f:
        for g in gs:
            for a, b in itertools.combinations(g["completions"], 2):
                f.write(json.dumps({"prompt": g["prompt"], "response_a": a, "response_b": b}) + "\n")
                n += 1
    return n


class Service:
    def __init__(self, yaml: Path, *args: str, timeout: float = 600):
        self.proc = subprocess.Popen([sys.executable, "-m", "factory.cli", "serve", "judge", str(yaml), "--port", "0",
                                      "--max-concurrent", "512", *args], cwd=REPO, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        end, lines = time.monotonic() + timeout, []
        while time.monotonic() < end:
            line = self.proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"listening on (http://\S+)", line)
            if m:
                threading.Thread(target=self.proc.stdout.read, daemon=True).start()
                u = urlparse(m.group(1))
                self.host, self.port = u.hostname, u.port
                return
        self.proc.kill()
        raise RuntimeError("service did not start: " + "".join(lines[-20:]))

    def conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=600)

    def rss_mb(self, pid: int | None = None) -> float:
        for line in Path(f"/proc/{pid or self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def children(self) -> list[int]:
        """The service's child processes (its render workers)."""
        return [int(x) for t in Path(f"/proc/{self.proc.pid}/task").iterdir() for x in (t / "children").read_text().split()]

    def workers_rss_mb(self) -> float:
        return sum(self.rss_mb(k) for k in self.children())

    def cpu_s(self) -> float:
        """The service's CPU seconds so far (user + system, all threads), its render workers' included."""
        def one(pid: int) -> float:
            f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

        return one(self.proc.pid) + sum(one(k) for k in self.children())

    def stats(self) -> dict:
        c = self.conn()
        c.request("GET", "/v1/stats")
        return json.loads(c.getresponse().read())

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(600)


def post(c: http.client.HTTPConnection, path: str, body: dict) -> tuple[int, dict]:
    c.request("POST", path, body=json.dumps(body), headers={"content-type": "application/json"})
    r = c.getresponse()
    return r.status, json.loads(r.read())


def drive(svc: Service, path: str, bodies: list[dict], clients: int, lat: list | None = None) -> float:
    """Send ``bodies`` from ``clients`` threads (keep-alive connections); returns wall seconds."""
    it = iter(bodies)
    lock = threading.Lock()
    bad: list = []

    def worker() -> None:
        c = svc.conn()
        while True:
            with lock:
                body = next(it, None)
            if body is None:
                return
            t = time.perf_counter()
            code, got = post(c, path, body)
            if lat is not None:
                lat.append(time.perf_counter() - t)
            if code != 200:
                bad.append((code, got))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if bad:
        raise RuntimeError(f"{len(bad)} requests failed, first: {bad[0]}")
    return time.perf_counter() - t0


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000


def offline(tmp: Path, name: str, gs: list[dict], per_pair: int, engine: str, engine_obj=None, judges: str = "") -> dict:
    from factory.kinds import run

    f = tmp / f"{name}.jsonl"
    n_pairs = pairs_file(f, gs)
    s = run(pipeline(tmp, name, f, per_pair=per_pair, engine=engine, judges=judges), engine=engine_obj, quiet=True)
    st = [x for x in s.stages if x.table == "judgements"][0]
    return {"pairs": n_pairs, "judgements": st.written, "seconds": round(st.seconds, 2),
            "judgements_s": round(st.written / st.seconds, 1)}


BATCH = 32  # pairs per /v1/preferences request
WARM_GROUPS = 60  # throughput: groups each side runs first, unmeasured (other prompts than the measured ones)


def http_run(tmp: Path, name: str, gs: list[dict], per_pair: int, engine: str, clients: int, *, path: str,
             warm: list[dict] = (), judges: str = "", render_workers: int | None = None) -> dict:
    f = tmp / f"{name}.jsonl"
    f.write_text('{"prompt":"a?","response_a":"x","response_b":"y"}\n')
    svc = Service(pipeline(tmp, name, f, per_pair=per_pair, engine=engine, judges=judges),
                  *(["--render-workers", str(render_workers)] if render_workers is not None else []))
    try:
        if warm:  # not measured: the service's first requests (as the offline runner's warm-up run)
            drive(svc, "/v1/rewards", list(warm), clients)
        before = svc.stats()["judgements"]
        if path == "/v1/rewards":
            bodies = gs
        else:
            bodies = [{"prompt": g["prompt"], "responses": [a, b]} for g in gs
                      for a, b in itertools.combinations(g["completions"], 2)]
            if path == "/v1/preferences":  # the same single pairs, BATCH of them a request
                bodies = [{"items": bodies[i:i + BATCH]} for i in range(0, len(bodies), BATCH)]
        cpu0 = svc.cpu_s()
        secs = drive(svc, path, bodies, clients)
        cpu = svc.cpu_s() - cpu0
        st = svc.stats()
        n = st["judgements"] - before
    finally:
        code = svc.stop()
    return {"endpoint": path, "requests": len(bodies), "clients": clients, "render_workers": st["render_workers"],
            "judgements": n, "seconds": round(secs, 2),
            "judgements_s": round(n / secs, 1), "server_cpu_ms_per_request": round(1000 * cpu / len(bodies), 3),
            "transactions": st["transactions"], "exit_code": code}


def memory(tmp: Path, n: int, clients: int, cache_size: int) -> dict:
    f = tmp / "mem.jsonl"
    f.write_text('{"prompt":"a?","response_a":"x","response_b":"y"}\n')
    svc = Service(pipeline(tmp, "mem", f, per_pair=2, engine="{kind: fake, seed: 0}"), "--cache-size", str(cache_size))
    samples = {}
    try:
        bodies = [{"prompt": f"memory question {i}", "responses": [f"answer a {i} " * 8, f"answer b {i} " * 8]}
                  for i in range(n)]
        done = 0
        t0 = time.perf_counter()
        duck, workers = {}, {}
        for frac in (0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0):
            upto = int(n * frac)
            drive(svc, "/v1/preference", bodies[done:upto], clients)
            done = upto
            samples[f"{frac:.2f}"] = round(svc.rss_mb(), 1)
            workers[f"{frac:.2f}"] = round(svc.workers_rss_mb(), 1)
            duck[f"{frac:.2f}"] = svc.stats()["duckdb_mb"]
        secs = time.perf_counter() - t0
        st = svc.stats()
    finally:
        code = svc.stop()
    return {"requests": n, "cache_size": cache_size, "rss_mb": samples, "duckdb_mb": duck,
            "render_workers_rss_mb": workers,  # the render worker processes' RSS (not in rss_mb)
            "duckdb_memory_limit": os.environ.get("FACTORY_DUCKDB_MEMORY", "128MB"),
            "rss_ratio_end_vs_10pct": round(samples["1.00"] / samples["0.10"], 3),
            "rss_ratio_end_vs_25pct": round(samples["1.00"] / samples["0.25"], 3),
            # flat: the largest sample of the last three quarters over the smallest (the LRU is full by then)
            "rss_spread_25_100pct": round(max(v for k, v in samples.items() if float(k) >= 0.25)
                                          / min(v for k, v in samples.items() if float(k) >= 0.25), 3),
            # what is not DuckDB's buffer cache (which fills and empties under its cap between checkpoints)
            "rss_less_duckdb_mb": {k: round(v - (duck[k] or 0), 1) for k, v in samples.items()},
            "judgements": st["judgements"], "worker_renders": st.get("worker_renders"),
            "requests_s": round(n / secs, 1), "exit_code": code}


def latency(tmp: Path, n: int, clients: int, render_workers: int | None = None) -> dict:
    f = tmp / "lat.jsonl"
    f.write_text('{"prompt":"a?","response_a":"x","response_b":"y"}\n')
    svc = Service(pipeline(tmp, f"lat{render_workers}", f, per_pair=2, engine="{kind: fake, seed: 0}"),
                  *(["--render-workers", str(render_workers)] if render_workers is not None else []))
    try:
        c = svc.conn()
        for i in range(5):  # not measured: the service's first requests (its render workers starting)
            post(c, "/v1/preference", {"prompt": f"first {i}", "responses": [f"yes {i}", f"no {i}"]})
        c = svc.conn()
        alone = []
        for i in range(n):
            t = time.perf_counter()
            code, _ = post(c, "/v1/preference", {"prompt": f"alone {i}", "responses": [f"yes {i}", f"no {i}"]})
            alone.append(time.perf_counter() - t)
        hits = []
        body = {"prompt": "alone 0", "responses": ["yes 0", "no 0"]}
        for _ in range(n):
            t = time.perf_counter()
            code, got = post(c, "/v1/preference", body)
            hits.append(time.perf_counter() - t)
        assert got["cached"] == 4, got
        stop = threading.Event()
        load = groups(100_000, 8, "load")

        def background() -> None:
            bc = svc.conn()
            for g in load:
                if stop.is_set():
                    return
                post(bc, "/v1/rewards", g)

        bg = [threading.Thread(target=background) for _ in range(clients)]
        for t in bg:
            t.start()
        time.sleep(1.0)
        loaded = []
        for i in range(n):
            t = time.perf_counter()
            post(c, "/v1/preference", {"prompt": f"loaded {i}", "responses": [f"yes {i}", f"no {i}"]})
            loaded.append(time.perf_counter() - t)
        stop.set()
        for t in bg:
            t.join()
        alive = svc.stats()["render_workers"]
    finally:
        code = svc.stop()
    return {"n": n, "load_clients": clients, "render_workers": alive, "alone_p50_ms": round(pct(alone, 0.5), 2), "alone_p99_ms": round(pct(alone, 0.99), 2),
            "loaded_p50_ms": round(pct(loaded, 0.5), 2), "loaded_p99_ms": round(pct(loaded, 0.99), 2),
            "cache_hit_p50_ms": round(pct(hits, 0.5), 2), "cache_hit_p99_ms": round(pct(hits, 0.99), 2),
            "exit_code": code}


def real(tmp: Path, n_groups: int, clients: int, render_workers: list[int | None] = (None,)) -> dict:
    """Offline (a warmed engine in this process) vs HTTP (a warmed service subprocess) on the embedded model."""
    from common import engine as make_engine

    spec = "{kind: vllm, seed: 0, max_model_len: 2048, kv_cache_gib: 1.0}"
    gs, warm = groups(n_groups, 4, "real"), groups(2, 4, "warm")
    eng = make_engine(kv_cache_gib=1.0)
    try:
        offline(tmp, "realwarm", warm, 2, spec, eng)
        off = offline(tmp, "realoff", gs, 2, spec, eng)
    finally:
        eng.close()
    out = {"groups": n_groups, "k": 4, "offline": off}
    for w in render_workers:  # each number of render workers, after the same offline run
        tag = "" if len(render_workers) == 1 else f"/w{w}"
        on = out[f"http{tag}"] = http_run(tmp, f"realhttp{w}", gs, 2, spec, clients, path="/v1/rewards", warm=warm,
                                          render_workers=w)
        out[f"http_vs_offline{tag}"] = round(on["judgements_s"] / off["judgements_s"], 3)
    return out


def throughput(tmp: Path, gs: list[dict], fake: str, clients: list[int], reps: int,
               render_workers: list[int | None] = (None,)) -> dict:
    """Each rep: the offline run, then right after it the service at each client count (``/v1/rewards``,
    one group a request, and ``/v1/preferences``, 32 pairs a request), with each number of render
    workers (``--render-workers``, keys ``…/wN`` when several are compared); single pairs
    (``/v1/preference``) once, at 16 clients. Ratios are taken within a rep (the machine drifts by
    ±15% between runs); the medians over reps are the figures."""
    runs: list[dict] = []
    warm = groups(WARM_GROUPS, 8, "warm")
    offline(tmp, "offline-warm", warm, 2, fake)  # once: later offline runs reuse this process's warm state
    for rep in range(reps):
        r: dict = {"offline": offline(tmp, f"offline-{rep}", gs, 2, fake)}
        for c in clients:
            for key, path in (("rewards", "/v1/rewards"), ("preferences_batched", "/v1/preferences")):
                for w in render_workers:
                    tag = f"{key}@{c}" + (f"/w{w}" if len(render_workers) > 1 else "")
                    h = http_run(tmp, f"http-{key}-{c}-{w}-{rep}", gs, 2, fake, c, path=path, warm=warm,
                                 render_workers=w)
                    h["vs_offline"] = round(h["judgements_s"] / r["offline"]["judgements_s"], 3)
                    r[tag] = h
        if rep == 0:
            h = http_run(tmp, "http-preference", gs, 2, fake, 16, path="/v1/preference")
            h["vs_offline"] = round(h["judgements_s"] / r["offline"]["judgements_s"], 3)
            r["preference@16"] = h
        print(json.dumps({k: v["judgements_s"] if k == "offline" else v["vs_offline"] for k, v in r.items()}), flush=True)
        runs.append(r)
    med = {"offline_judgements_s": statistics.median(r["offline"]["judgements_s"] for r in runs)}
    for k in runs[0]:
        if k != "offline":
            got = [r[k] for r in runs if k in r]
            med[k] = {"judgements_s": statistics.median(x["judgements_s"] for x in got),
                      "vs_offline": statistics.median(x["vs_offline"] for x in got),
                      "vs_offline_each_rep": [x["vs_offline"] for x in got],
                      "server_cpu_ms_per_request": statistics.median(x["server_cpu_ms_per_request"] for x in got),
                      "transactions": statistics.median(x["transactions"] for x in got)}
    return {"reps": reps, "clients": clients, "render_workers": list(render_workers), "groups": len(gs), "k": 8,
            "median": med, "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--groups", type=int, default=600, help="throughput: groups of 8 completions (28 pairs each)")
    ap.add_argument("--memory-requests", type=int, default=20_000)
    ap.add_argument("--clients", default="8,16,32,64",
                    help="throughput: concurrent clients, a comma list (each count is measured in every rep)")
    ap.add_argument("--reps", type=int, default=3, help="throughput: reps of offline then HTTP, side by side")
    ap.add_argument("--render-workers", default="",
                    help="throughput: the service's --render-workers, a comma list compared side by side in each "
                    "rep (e.g. 0,1); default: the service's own default (one per spare core, at most 4)")
    ap.add_argument("--real", type=int, default=0, help="also the embedded model on vLLM: this many groups of 4")
    ap.add_argument("--parts", default="throughput,memory,latency",
                    help="which fake-engine parts to run: throughput, memory, latency, preference (single pairs "
                    "only), panel (two judges on two engines: offline vs HTTP)")
    a = ap.parse_args()
    n_groups, n_mem, n_lat = (40, 2_000, 50) if a.quick else (a.groups, a.memory_requests, 300)
    if a.quick:
        a.reps, a.clients = 1, "16"
    out: dict = {"quick": a.quick}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        gs = groups(n_groups, 8, "tp")
        fake = "{kind: fake, seed: 0}"
        parts = a.parts.split(",")
        rw = [int(w) for w in a.render_workers.split(",")] if a.render_workers else [None]
        if "throughput" in parts:
            out["throughput"] = throughput(tmp, gs, fake, [int(c) for c in str(a.clients).split(",")], a.reps, rw)
            print(json.dumps(out["throughput"]["median"]), flush=True)
        if "preference" in parts:  # single pairs over HTTP only (no offline run): for A/B runs of two trees
            out["preference_only"] = http_run(tmp, "http-pref-only", gs, 2, fake, 16, path="/v1/preference")
            print(json.dumps(out["preference_only"]), flush=True)
        if "panel" in parts:  # two fake judges (weights 1 and 2), each on its own engine: offline vs HTTP
            p = out["panel"] = {"offline": offline(tmp, "panel-off", gs, 2, fake, judges=PANEL)}
            for k, path in (("http_rewards", "/v1/rewards"), ("http_preference", "/v1/preference")):
                p[k] = http_run(tmp, f"panel-{k}", gs, 2, fake, 16, path=path, judges=PANEL)
                p[k]["vs_offline"] = round(p[k]["judgements_s"] / p["offline"]["judgements_s"], 3)
            print(json.dumps({"panel": p}), flush=True)
        if "memory" in parts:
            out["memory"] = memory(tmp, n_mem, 16, cache_size=10_000 if not a.quick else 1_000)
            print(json.dumps(out["memory"]), flush=True)
        if "latency" in parts:
            for w in rw:
                out["latency" + (f"/w{w}" if len(rw) > 1 else "")] = got = latency(tmp, n_lat, 8, w)
                print(json.dumps(got), flush=True)
        if a.real:
            out["real"] = real(tmp, a.real, 8, rw)
            print(json.dumps(out["real"]), flush=True)
    path = record("service", out)
    print(f"recorded in {path}")


if __name__ == "__main__":
    main()
