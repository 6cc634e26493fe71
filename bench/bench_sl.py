"""Factory vs raw vLLM on the same initial-answer requests, in one process and one engine.

Raw: one ``LLM.chat`` call with every conversation. Factory: the answer stage as the pipeline runs
it (template rendering, content keys, resume check, DuckDB writes in chunks). The prefix cache is
reset between passes; a warm-up batch runs first; passes alternate raw/factory/raw/factory.

    python bench/bench_sl.py              # 256 prompts × 64 new tokens (the issue's setting)
    python bench/bench_sl.py --quick      # CI smoke: 32 × 16
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import REPO, engine, hh_prompts, record


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    if a.quick:
        a.prompts, a.max_tokens, a.reps = 32, 16, 1

    from vllm import SamplingParams

    from factory.constitution import load_constitution
    from factory.engines.base import Sampling
    from factory.runner import InputChunk, Runner
    from factory.stages import sl
    from factory.store import Store, content_key
    from factory.templates import load_template

    eng = engine()
    tmpl = load_template(REPO / "prompts/answer.j2")
    convs = hh_prompts(a.prompts)
    sampling = Sampling(max_tokens=a.max_tokens, temperature=0.7, top_p=0.95)
    params = SamplingParams(max_tokens=a.max_tokens, temperature=0.7, top_p=0.95)
    messages = [tmpl.render(conversation=c) for c in convs]
    eng.llm.chat(messages[:16], params, use_tqdm=False)  # warm-up

    def raw() -> tuple[int, float]:
        eng.llm.reset_prefix_cache()
        t = time.perf_counter()
        outs = eng.llm.chat(messages, params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs), time.perf_counter() - t

    def factory(rep: int) -> tuple[int, float]:
        eng.llm.reset_prefix_cache()
        with tempfile.TemporaryDirectory() as tmp:
            store = Store(Path(tmp) / "b.duckdb", writer_run="bench")
            ctx = sl.Ctx(run_id="bench", model=eng.model, seed=eng.seed,
                         constitution=load_constitution(REPO / "constitutions/harmless.yaml"),
                         templates={"answer": tmpl}, sampling={"answer": sampling}, sampling_hash={"answer": "bench"},
                         rounds=0)  # the answer stage alone
            prompts = [(content_key(rep, c), c, i) for i, c in enumerate(convs)]
            t = time.perf_counter()
            runner = Runner(store, eng, "bench", stage="prompts")
            runner.run([InputChunk(0, {}, lambda: sl.answer_jobs(ctx, prompts))])  # the streaming runner, as runs use it
            w = runner.stats["responses"]
            dt = time.perf_counter() - t
            assert store.count("responses") == len(convs)
            store.close()
            return w.completion_tokens, dt

    rows = []
    for rep in range(a.reps):
        rt, rs = raw()
        ft, fs = factory(rep)
        rows.append((rt / rs, ft / fs))
        print(f"pass {rep}: raw {rt} tok in {rs:.1f}s = {rt / rs:.0f} tok/s | factory {ft} tok in {fs:.1f}s = {ft / fs:.0f} tok/s")
    raw_tps = max(r for r, _ in rows)
    fac_tps = max(f for _, f in rows)
    ratio = fac_tps / raw_tps
    print(f"RESULT sl: raw vLLM {raw_tps:.0f} tok/s, factory {fac_tps:.0f} tok/s, ratio {ratio:.3f} "
          f"({a.prompts} prompts x {a.max_tokens} new tokens, best of {a.reps})")
    record("sl", {"prompts": a.prompts, "max_tokens": a.max_tokens, "raw_tok_s": round(raw_tps, 1),
                  "factory_tok_s": round(fac_tps, 1), "ratio": round(ratio, 3), "quick": a.quick})
    eng.close()


if __name__ == "__main__":
    main()
