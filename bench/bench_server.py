"""The OpenAI-compatible server backend, against one local ``vllm serve`` (started here on loopback):

1. generation: the server through the factory's OpenAIEngine vs the in-process VLLMEngine on the
   same requests (tok/s);
2. judging: option log-probs through the standard ``top_logprobs`` (what hosted APIs offer, labels
   matched by token text) vs vLLM's private ``logprob_token_ids`` extension, on the same judge
   requests to the same server (labels/s; target: top-k ≥ 0.95× the extension). The server runs in
   dev mode so its prefix cache is reset before every pass; the passes alternate in rounds (ids then
   top-k, then top-k then ids, ...) and both the best passes' ratio and the median of the per-round
   ratios are reported (this machine is shared: adjacent passes see similar load), and labels per
   CPU second of the server's processes, which other jobs on the machine hardly affect.

    python bench/bench_server.py            # 128 requests × 64 tokens; 24 hh-rlhf pairs × 4 principles × 2 orders
    python bench/bench_server.py --quick    # 16 × 16; 6 pairs × 2 principles × 2 orders
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

from common import HH, REPO, engine, hh_prompts, record


def timed(eng, reqs) -> tuple[int, float]:
    t = time.perf_counter()
    outs = list(eng.generate(reqs))
    dt = time.perf_counter() - t
    assert all(o.status == "ok" for o in outs), [o.error for o in outs if o.status != "ok"][:3]
    return sum(o.completion_tokens for o in outs), dt


def judge_requests(n_pairs: int, n_principles: int, option_ids: tuple[int, int]) -> list[list]:
    """Judge requests as the preference stage builds them (repo template, answer prefix, A/B), in the
    two prefix-cache waves it sends: the first principle of every (pair, order), then the rest."""
    from factory.constitution import load_constitution
    from factory.engines.base import Request, Sampling
    from factory.sources import read_pairs
    from factory.stages.judge import judge_messages
    from factory.templates import load_template

    table, _ = read_pairs(HH, format="hh-rlhf", limit=n_pairs)
    principles = load_constitution(REPO / "constitutions/harmless.yaml").principles[:n_principles]
    tmpl = load_template(REPO / "prompts/judge.j2")
    waves: list[list] = [[], []]
    for r in table.to_pylist():
        conv = json.loads(r["conversation"])
        for j, p in enumerate(principles):
            for order in ("ab", "ba"):
                msgs = judge_messages(tmpl, conv, r["response_a"], r["response_b"], p, order, ["A", "B"], max_chars=3000)
                waves[j > 0].append(Request(f"{r['pair_id']}/{p.id}/{order}", msgs, Sampling(max_tokens=1, temperature=0.0),
                                            options=("A", "B"), option_ids=option_ids, continue_final=True))
    return [w for w in waves if w]


def server_cpu(pid: int) -> float:
    """CPU seconds used so far by the server process and its children (vLLM's engine core is a child):
    unlike wall time, hardly affected by other jobs on a shared machine."""
    import psutil

    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def judge_pass(eng, waves, reset, pid: int) -> tuple[float, float, dict]:
    """labels/s (wall), labels per server CPU second, completions."""
    reset()
    c0, t = server_cpu(pid), time.perf_counter()
    outs = {c.key: c for wave in waves for c in eng.generate(wave)}
    dt, cpu = time.perf_counter() - t, server_cpu(pid) - c0
    assert all(o.status == "ok" for o in outs.values()), [o.error for o in outs.values() if o.status != "ok"][:3]
    return len(outs) / dt, len(outs) / cpu, outs


def p_first(c) -> float:
    a, b = c.option_logprobs
    return 1.0 / (1.0 + math.exp(b - a))


def judging(url: str, reset, pid: int, a) -> dict:
    """Standard top-k vs the token-id extension on the same judge requests to the same server."""
    from factory.engines.openai import OpenAIEngine

    ids = OpenAIEngine(url, "smollm2-135m", seed=0, max_concurrency=64)  # detects the extension
    top = OpenAIEngine(url, "smollm2-135m", seed=0, max_concurrency=64, scoring="top_k")
    try:
        assert ids.capabilities.scoring == "token_ids" and top.capabilities.scoring == "top_k"
        waves = judge_requests(a.pairs, a.principles, tuple(ids.token_ids(x)[0] for x in ("A", "B")))
        judge_pass(ids, waves[:1], reset, pid)  # warm-up, both paths
        judge_pass(top, waves[:1], reset, pid)
        rates: dict[str, list[float]] = {"ids": [], "top": []}
        per_cpu: dict[str, list[float]] = {"ids": [], "top": []}
        outs: dict[str, dict] = {}
        for r in range(a.rounds):  # adjacent passes share the machine's load; alternate who goes first
            for name, eng in (("ids", ids), ("top", top))[:: 1 if r % 2 == 0 else -1]:
                rate, cpu_rate, outs[name] = judge_pass(eng, waves, reset, pid)
                rates[name].append(rate)
                per_cpu[name].append(cpu_rate)
    finally:
        ids.close()
        top.close()
    ids_s, top_s = max(rates["ids"]), max(rates["top"])
    median = statistics.median(t / i for t, i in zip(rates["top"], rates["ids"]))
    cpu_ids, cpu_top = statistics.median(per_cpu["ids"]), statistics.median(per_cpu["top"])
    labels = len(outs["top"])
    floored = sum(bool(c.floored) for c in outs["top"].values())
    # vs the single-token extension: the top-k path also adds the " A" spellings, so P differs a little
    diff = max(abs(p_first(c) - p_first(outs["ids"][k])) for k, c in outs["top"].items() if not c.floored)
    ptoks = sum(c.prompt_tokens for c in outs["top"].values()) / labels
    print(f"RESULT server judge: standard top-k {top_s:.2f} vs token-id extension {ids_s:.2f} labels/s, "
          f"ratio {top_s / ids_s:.3f} (best passes; median of per-round ratios {median:.3f}; {labels} labels, "
          f"{ptoks:.0f} prompt tokens/label; passes top-k {[round(x, 2) for x in rates['top']]}, ids "
          f"{[round(x, 2) for x in rates['ids']]}; {floored} labels with a floored option; max |P(first) diff| {diff:.4f})")
    print(f"RESULT server judge CPU: standard top-k {cpu_top:.2f} vs token-id extension {cpu_ids:.2f} labels per server "
          f"CPU second (medians), ratio {cpu_top / cpu_ids:.3f}")
    return {"judge_labels": labels, "judge_prompt_tokens_per_label": round(ptoks, 1),
            "token_ids_labels_s": round(ids_s, 2), "top_k_labels_s": round(top_s, 2),
            "top_k_vs_token_ids": round(top_s / ids_s, 3), "top_k_vs_token_ids_median": round(median, 3),
            "top_k_passes": [round(x, 2) for x in rates["top"]], "token_ids_passes": [round(x, 2) for x in rates["ids"]],
            "top_k_floored_labels": floored, "p_first_max_abs_diff": round(diff, 5),
            "token_ids_labels_per_cpu_s": round(cpu_ids, 3), "top_k_labels_per_cpu_s": round(cpu_top, 3),
            "top_k_vs_token_ids_cpu": round(cpu_top / cpu_ids, 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--pairs", type=int, default=24)
    ap.add_argument("--principles", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=4, help="alternating pass pairs (ids, top-k) per judge path")
    ap.add_argument("--only", choices=["generation", "judge"], help="run one of the two comparisons")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    if a.quick:
        a.requests, a.max_tokens, a.pairs, a.principles, a.rounds = 16, 16, 6, 2, 2

    import httpx

    from factory import models
    from factory.engines.base import Request, Sampling
    from factory.engines.openai import OpenAIEngine
    from factory.engines.serve import VLLMServer

    result: dict = {}
    if a.only != "judge":
        convs = hh_prompts(a.requests + 8)
        sampling = Sampling(max_tokens=a.max_tokens, temperature=0.0)
        reqs = [Request(f"r{i}", c, sampling) for i, c in enumerate(convs[8:])]
        warm = [Request(f"w{i}", c, sampling) for i, c in enumerate(convs[:8])]
        off = engine(kv_cache_gib=1.0)
        timed(off, warm)
        off.llm.reset_prefix_cache()
        off_tok, off_s = timed(off, reqs)
        off.close()
        del off

    os.environ["VLLM_SERVER_DEV_MODE"] = "1"  # exposes POST /reset_prefix_cache (loopback only)
    with tempfile.TemporaryDirectory() as tmp:
        server = VLLMServer(models.resolve(None), Path(tmp) / "server.log")
        try:
            server.wait()
            root = server.url.removesuffix("/v1")

            def reset() -> None:
                httpx.post(f"{root}/reset_prefix_cache", timeout=30).raise_for_status()

            if a.only != "judge":
                srv = OpenAIEngine(server.url, "smollm2-135m", seed=0, max_concurrency=64)
                timed(srv, warm)
                srv_tok, srv_s = timed(srv, reqs)
                srv.close()
                srv_tps, off_tps = srv_tok / srv_s, off_tok / off_s
                print(f"RESULT server: vllm serve via OpenAIEngine {srv_tps:.0f} tok/s vs offline {off_tps:.0f} tok/s, "
                      f"ratio {srv_tps / off_tps:.2f} ({a.requests} requests x {a.max_tokens} tokens, greedy)")
                result.update(requests=a.requests, max_tokens=a.max_tokens, server_tok_s=round(srv_tps, 1),
                              offline_tok_s=round(off_tps, 1), ratio=round(srv_tps / off_tps, 3))
            if a.only != "generation":
                result.update(judging(server.url, reset, server.proc.pid, a))
        finally:
            server.stop()
    record("server", {**result, "quick": a.quick})


if __name__ == "__main__":
    main()
