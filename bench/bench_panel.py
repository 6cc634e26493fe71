"""Roles and panels: what a panel of judges and a separate policy cost, on fake engines.

    python bench/bench_panel.py                # 20,000 pairs; overlap with 300 prompts
    python bench/bench_panel.py --pairs 100000 # the issue's size (needs a quiet machine)
    python bench/bench_panel.py --quick        # 2,000 pairs; overlap with 60 prompts
    python bench/bench_panel.py --matched      # also one judge over 3× the pairs (the panel's judgements)

1. Panel vs one judge: the same file of pairs, 4 principles, both orders, judged by one fake judge
   and by a panel of three (each on its own fake engine, so the three stream side by side on their
   own threads), each through `factory run` in a fresh process: judgements/s of the stream (from
   the run's own summary) and the child's peak RSS (VmHWM). Target: the panel ≥ 0.9× the one judge's
   judgements/s, peak RSS within 10%. The panel writes 3× the rows of the one judge, and a run's
   peak grows with its rows until DuckDB's memory reaches its cap (~0.5M judgements; the peak comes at
   its checkpoints, its labelling or its closing checkpoint); ``--matched`` adds one judge over 3× the
   pairs, so that the panel is also compared at the same number of judgements.
2. Overlap of two engines: a policy and a judge on fake engines with a fixed per-request latency
   (``engine: {kind: fake, latency_s: …}``), sized so that the policy alone (a policy-only run,
   ``judges: []``) and the judge alone (the same pairs judged with the samples already stored) each
   take about T seconds. Sampling and judging in one fresh run then takes T_both; serial would be
   2T, perfect overlap T. Target: T_both ≤ 0.6 × (T_policy + T_judge).
3. With ``--real N``: the same overlap measurement on real engines over N prompts: the policy on
   vLLM offline and the judge the same embedded model served by a local `vllm serve` (``kind:
   openai``). Both share this machine's cores, so the target is only "no slower than the two
   separate runs" (stream seconds; engine start-up excluded).
Figures go to bench/results/panel.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, record

from bench_scale import CHILD, make_pairs  # the CLI child that writes its peak RSS; ~500-character pairs


def run_child(pipeline: Path, tmp: Path) -> dict:
    hwm = tmp / "hwm"
    env = {**os.environ, "BENCH_HWM": str(hwm), "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", CHILD, "run", str(pipeline), "--quiet"], env=env, cwd=REPO,
                       capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(f"{pipeline} failed:\n{p.stderr[-3000:]}")
    return {"wall_s": wall, "peak_rss_mb": int(hwm.read_text()) / 1024}


def summary_of(db: Path, name: str) -> dict:
    import duckdb

    con = duckdb.connect(str(db), read_only=True)
    try:
        body = con.execute("SELECT summary_json FROM runs WHERE name = ? ORDER BY started_at DESC LIMIT 1",
                           [name]).fetchone()[0]
    finally:
        con.close()
    return json.loads(body)


def panel_vs_one(tmp: Path, n: int, matched: bool = False) -> dict:
    make_pairs(tmp / "pairs.jsonl", n)
    runs = [("one", ["j1"], "pairs.jsonl"), ("panel", ["j1", "j2", "j3"], "pairs.jsonl")]
    if matched:  # one judge over 3× the pairs: as many judgements (and rows written) as the panel
        make_pairs(tmp / "pairs3.jsonl", 3 * n)
        runs.append(("one3x", ["j1"], "pairs3.jsonl"))
    out = {}
    for label, judges, pairs in runs:
        lines = "".join(f"  - {{name: {j}, model: judge-{j}, engine: {{kind: fake, seed: {i}}}}}\n"
                        for i, j in enumerate(judges))
        path = tmp / f"{label}.yaml"
        path.write_text(f"""kind: prefs
name: {label}
constitution: {REPO}/constitutions/harmless.yaml
pairs: {{source: file, path: {tmp}/{pairs}}}
judge: {{template: {REPO}/prompts/judge.j2, per_pair: 4}}
judges:
{lines}db: {tmp}/{label}.duckdb
chunk_rows: 10000
""")
        proc = run_child(path, tmp)
        s = summary_of(tmp / f"{label}.duckdb", label)
        st = s["stages"]["judgements"]
        out[label] = {"judges": len(judges), "judgements": st["written"], "stream_s": round(st["seconds"], 2),
                      "judgements_per_s": round(st["written"] / st["seconds"]), "process_s": round(proc["wall_s"], 1),
                      "peak_rss_mb": round(proc["peak_rss_mb"])}
        print(f"{label}: {json.dumps(out[label])}", flush=True)
    one, panel = out["one"], out["panel"]
    res = {"pairs": n, **{f"{k}_{x}": v for k, d in out.items() for x, v in d.items()},
           "throughput_ratio_panel_vs_one": round(panel["judgements_per_s"] / one["judgements_per_s"], 3),
           "rss_ratio_panel_vs_one": round(panel["peak_rss_mb"] / one["peak_rss_mb"], 3)}
    if matched:
        res["rss_ratio_panel_vs_one_same_judgements"] = round(panel["peak_rss_mb"] / out["one3x"]["peak_rss_mb"], 3)
    return res


def overlap(tmp: Path, prompts: int, latency: float) -> dict:
    """Policy latency L per request (one request samples both answers of a prompt), judge latency L/2
    per request (one pair per prompt, one principle, two orders): the policy alone and the judge alone
    each take about prompts × L."""
    with open(tmp / "prompts.jsonl", "w") as f:
        for i in range(prompts):
            f.write(json.dumps({"prompt": f"Question {i}: how should I handle situation {i}?"}) + "\n")

    def pipe(name: str, db: str, judges: str) -> Path:
        path = tmp / f"{name}.yaml"
        path.write_text(f"""kind: prefs
name: {name}
constitution: {REPO}/constitutions/harmless.yaml
policy: {{model: policy, engine: {{kind: fake, latency_s: {latency}}}}}
{judges}pairs: {{source: sample, prompts: {{path: {tmp}/prompts.jsonl}}, n: 2, sampling: {{max_tokens: 16}}}}
judge: {{template: {REPO}/prompts/judge.j2, per_pair: 1}}
db: {tmp}/{db}
""")
        return path

    judge = f"judges:\n  - {{name: j, model: judge, engine: {{kind: fake, latency_s: {latency / 2}}}}}\n"
    def stream_s(db: str, name: str) -> float:  # the stream's seconds (engine start, labelling excluded)
        return max(st["seconds"] for st in summary_of(tmp / db, name)["stages"].values())

    t_policy = run_child(pipe("policy", "serial.duckdb", "judges: []\n"), tmp)["wall_s"]
    s_policy = stream_s("serial.duckdb", "policy")
    run_child(pipe("judge", "serial.duckdb", judge), tmp)  # samples stored: only the judge works
    s_judge = stream_s("serial.duckdb", "judge")
    run_child(pipe("both", "both.duckdb", judge), tmp)
    s_both = stream_s("both.duckdb", "both")
    out = {"prompts": prompts, "policy_latency_s": latency, "judge_latency_s": latency / 2,
           "T_policy_s": round(s_policy, 2), "T_judge_s": round(s_judge, 2), "T_both_s": round(s_both, 2),
           "ratio_both_vs_serial": round(s_both / (s_policy + s_judge), 3), "policy_process_s": round(t_policy, 1)}
    print(f"overlap: {json.dumps(out)}", flush=True)
    return out


def real_pass(tmp: Path, prompts: int) -> dict:
    from factory import models
    from factory.engines.serve import VLLMServer

    with open(tmp / "prompts.jsonl", "w") as f:
        for i in range(prompts):
            f.write(json.dumps({"prompt": f"Give me a practical tip about topic number {i}."}) + "\n")
    server = VLLMServer(models.resolve("smollm2-135m"), tmp / "server.log")
    try:
        server.wait(timeout=600)

        def pipe(name: str, db: str, judges: str) -> Path:
            path = tmp / f"{name}.yaml"
            path.write_text(f"""kind: prefs
name: {name}
constitution: {REPO}/constitutions/harmless.yaml
policy: {{model: smollm2-135m, engine: {{kind: vllm, seed: 0, kv_cache_gib: 1.0}}}}
{judges}pairs: {{source: sample, prompts: {{path: {tmp}/prompts.jsonl}}, n: 2, sampling: {{max_tokens: 48}}}}
judge: {{template: {REPO}/prompts/judge.j2, per_pair: 2}}
db: {tmp}/{db}
""")
            return path

        def stream_s(db: str, name: str) -> float:
            return max(st["seconds"] for st in summary_of(tmp / db, name)["stages"].values())

        judge = (f"judges:\n  - {{name: served, model: smollm2-135m, engine: {{kind: openai, base_url: "
                 f"'{server.url}', max_concurrency: 16, seed: 0}}}}\n")
        run_child(pipe("rpolicy", "rserial.duckdb", "judges: []\n"), tmp)
        t_p = stream_s("rserial.duckdb", "rpolicy")
        run_child(pipe("rjudge", "rserial.duckdb", judge), tmp)
        t_j = stream_s("rserial.duckdb", "rjudge")
        run_child(pipe("rboth", "rboth.duckdb", judge), tmp)
        t_b = stream_s("rboth.duckdb", "rboth")
    finally:
        server.stop()
    out = {"prompts": prompts, "T_policy_s": round(t_p, 1), "T_judge_s": round(t_j, 1), "T_both_s": round(t_b, 1),
           "ratio_both_vs_separate": round(t_b / (t_p + t_j), 3)}
    print(f"real: {json.dumps(out)}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=20_000)
    ap.add_argument("--prompts", type=int, default=300)
    ap.add_argument("--latency", type=float, default=0.03)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--real", type=int, default=0, help="prompts for the real-engine pass (0: skip)")
    ap.add_argument("--only-real", action="store_true")
    ap.add_argument("--matched", action="store_true",
                    help="also one judge over 3x the pairs (as many judgements as the panel)")
    a = ap.parse_args()
    pairs, prompts = (2_000, 60) if a.quick else (a.pairs, a.prompts)
    with tempfile.TemporaryDirectory() as tmp:
        for d in "abc":
            (Path(tmp) / d).mkdir()
        res = {} if a.only_real else {"panel": panel_vs_one(Path(tmp) / "a", pairs, a.matched),
                                      "overlap": overlap(Path(tmp) / "b", prompts, a.latency)}
        if a.real:
            res["real"] = real_pass(Path(tmp) / "c", a.real)
        res["quick"] = a.quick
    print("RESULT panel: " + json.dumps(res), flush=True)
    record("panel", res)


if __name__ == "__main__":
    main()
