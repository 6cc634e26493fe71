"""Server backend vs offline engine on the same requests: a local vLLM OpenAI-compatible server
(started here on loopback) through the factory's OpenAIEngine, and the in-process VLLMEngine.

    python bench/bench_server.py            # 128 requests × 64 tokens, concurrency 64
    python bench/bench_server.py --quick    # 16 × 16
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import engine, hh_prompts, record


def timed(eng, reqs) -> tuple[int, float]:
    t = time.perf_counter()
    outs = list(eng.generate(reqs))
    dt = time.perf_counter() - t
    assert all(o.status == "ok" for o in outs), [o.error for o in outs if o.status != "ok"][:3]
    return sum(o.completion_tokens for o in outs), dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    if a.quick:
        a.requests, a.max_tokens = 16, 16

    from factory import models
    from factory.engines.base import Request, Sampling
    from factory.engines.openai import OpenAIEngine
    from factory.engines.serve import VLLMServer

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

    with tempfile.TemporaryDirectory() as tmp:
        server = VLLMServer(models.resolve(None), Path(tmp) / "server.log")
        try:
            server.wait()
            srv = OpenAIEngine(server.url, "smollm2-135m", seed=0, max_concurrency=64)
            timed(srv, warm)
            srv_tok, srv_s = timed(srv, reqs)
            srv.close()
        finally:
            server.stop()
    srv_tps, off_tps = srv_tok / srv_s, off_tok / off_s
    print(f"RESULT server: vllm serve via OpenAIEngine {srv_tps:.0f} tok/s vs offline {off_tps:.0f} tok/s, "
          f"ratio {srv_tps / off_tps:.2f} ({a.requests} requests x {a.max_tokens} tokens, greedy)")
    record("server", {"requests": a.requests, "max_tokens": a.max_tokens, "server_tok_s": round(srv_tps, 1),
                      "offline_tok_s": round(off_tps, 1), "ratio": round(srv_tps / off_tps, 3), "quick": a.quick})


if __name__ == "__main__":
    main()
