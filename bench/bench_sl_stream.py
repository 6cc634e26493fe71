"""The whole SL pipeline (answer → critique → revise, 2 rounds) streamed by the factory's runner vs a
hand-written script that calls ``LLM.chat`` stage by stage, on the same engine, templates, prompts,
principles and sampling.

The script waits for every answer before any critique, for every critique before any revision: the
engine's batch drains at each of the 5 stage boundaries. The runner sends a prompt's critique as
soon as its answer is stored, so the batch stays full across stages. Passes alternate script /
factory; the prefix cache is reset before each; a warm-up batch runs first. Generated tokens/s,
and why each generation stopped on each side: one that stops at ``max_tokens`` ("length") ends on
the same step as its batch-mates, so the script's batch drains at a stage boundary only as far as
generations stop early ("stop"); that share bounds what streaming can gain.

    python bench/bench_sl_stream.py                      # 64 prompts × 48 new tokens a stage
    python bench/bench_sl_stream.py --pipeline-lengths   # each stage's max_tokens from pipelines/demo.yaml (128/96/128)
    python bench/bench_sl_stream.py --quick              # 16 × 16
    python bench/bench_sl_stream.py --prompts 24 --pipeline-lengths --curve   # + step time vs batch size

``--curve`` measures the engine's decode step time at batch sizes 1…prompts (fixed-length
generations, ``ignore_eos``; a step's time = (time for K+1 tokens − time for 1) / K) and replays the
script's own stages on that curve: a stage's decode time is the sum over its steps of the step time
at the number of generations still running, against every token at the full-batch time per token.
That ratio is what the drain of the decode batches alone costs the script. It is not a bound on the
runner's gain or loss: prefill is left out, and the stream also runs new requests' prefill in the
same engine steps as other requests' decoding, which the script, stage by stage, never does.
Measure on a quiet machine: passes under other jobs' load moved by ±15%.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from common import REPO, engine, hh_prompts, record

ROUNDS = 2


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--pipeline-lengths", action="store_true",
                    help="each stage's max_tokens as pipelines/demo.yaml sets it (instead of --max-tokens for all)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--curve", action="store_true",
                    help="also measure step time vs batch size and replay the script's decode batches on it")
    a = ap.parse_args()
    if a.quick:
        a.prompts, a.max_tokens = 16, 16
    import yaml

    stages = ("answer", "critique", "revise")
    demo = yaml.safe_load((REPO / "pipelines/demo.yaml").read_text())["sampling"]
    max_tokens = {s: (demo[s]["max_tokens"] if a.pipeline_lengths else a.max_tokens) for s in stages}

    from vllm import SamplingParams

    from factory.constitution import load_constitution
    from factory.engines.base import Sampling
    from factory.runner import InputChunk, Runner
    from factory.stages import sl
    from factory.store import Store, content_key
    from factory.templates import load_template

    eng = engine()
    const = load_constitution(REPO / "constitutions/harmless.yaml")
    t = {s: load_template(REPO / f"prompts/{s}.j2") for s in ("answer", "critique", "revise")}
    convs = hh_prompts(a.prompts)
    sampling = {s: Sampling(max_tokens=max_tokens[s], temperature=0.7, top_p=0.95) for s in stages}
    params = {s: SamplingParams(max_tokens=max_tokens[s], temperature=0.7, top_p=0.95) for s in stages}
    eng.llm.chat([t["answer"].render(conversation=c) for c in convs[:8]], params["answer"], use_tqdm=False)  # warm-up

    finish: dict[str, dict[str, int]] = {"script": {}, "factory": {}}  # why each generation stopped, per side
    stage_lengths: list[list[int]] = []  # the script's generated tokens per request, stage by stage (last pass)

    def chat(stage: str, messages: list[list[dict]]) -> tuple[list[str], int]:
        outs = eng.llm.chat(messages, params[stage], use_tqdm=False)
        for o in outs:
            why = str(o.outputs[0].finish_reason)
            finish["script"][why] = finish["script"].get(why, 0) + 1
        stage_lengths.append([len(o.outputs[0].token_ids) for o in outs])
        return [o.outputs[0].text for o in outs], sum(len(o.outputs[0].token_ids) for o in outs)

    def script(rep: int) -> tuple[int, float]:
        eng.llm.reset_prefix_cache()
        stage_lengths.clear()
        ids = [content_key(rep, c) for c in convs]
        start = time.perf_counter()
        heads, tokens = chat("answer", [t["answer"].render(conversation=c) for c in convs])
        for r in range(1, ROUNDS + 1):
            ps = [sl.principles_for(const, "random", 1, 0, pid, i, r)[0] for i, pid in enumerate(ids)]
            crits, n1 = chat("critique", [t["critique"].render(conversation=c, response=h, principle=p, round=r)
                              for c, h, p in zip(convs, heads, ps)])
            heads, n2 = chat("revise", [t["revise"].render(conversation=c, response=h, critiques=[{"principle": p, "text": x}],
                                                 round=r) for c, h, p, x in zip(convs, heads, ps, crits)])
            tokens += n1 + n2
        return tokens, time.perf_counter() - start

    def factory(rep: int) -> tuple[int, float]:
        eng.llm.reset_prefix_cache()
        with tempfile.TemporaryDirectory() as tmp:
            store = Store(Path(tmp) / "b.duckdb", writer_run="bench")
            ctx = sl.Ctx(run_id="bench", model=eng.model, seed=eng.seed, constitution=const, templates=t,
                         sampling={s: sampling[s] for s in sl.STAGES}, sampling_hash={s: s for s in sl.STAGES},
                         rounds=ROUNDS, strategy="random", per_round=1)
            prompts = [(content_key(rep, c), c, i) for i, c in enumerate(convs)]
            start = time.perf_counter()
            runner = Runner(store, eng, "bench", stage="prompts")
            runner.run([InputChunk(0, {}, lambda: sl.answer_jobs(ctx, prompts))])
            dt = time.perf_counter() - start
            tokens = sum(s.completion_tokens for s in runner.stats.values())
            for table in ("responses", "critiques", "revisions"):
                for why, n in store.con.execute(f"SELECT finish_reason, count(*) FROM {table} GROUP BY 1").fetchall():
                    finish["factory"][str(why)] = finish["factory"].get(str(why), 0) + n
            store.close()
            return tokens, dt

    rows = []
    for rep in range(a.reps):
        st, ss = script(rep)
        ft, fs = factory(rep)
        rows.append((st / ss, ft / fs))
        print(f"pass {rep}: script {st} tok in {ss:.1f}s = {st / ss:.0f} tok/s | factory {ft} tok in {fs:.1f}s = "
              f"{ft / fs:.0f} tok/s", flush=True)
    s_tps, f_tps = max(r for r, _ in rows), max(f for _, f in rows)
    # a generation that stops at max_tokens ("length") ends on the same step as its batch-mates: the
    # script's batch drains at a stage boundary only as far as generations stop early ("stop")
    length_share = {k: round(v.get("length", 0) / max(1, sum(v.values())), 3) for k, v in finish.items()}
    replay = step_curve(eng, [t["answer"].render(conversation=c) for c in convs], stage_lengths) if a.curve else None
    load = [round(x, 1) for x in os.getloadavg()]
    print(f"RESULT sl-stream: script {s_tps:.0f} tok/s, factory {f_tps:.0f} tok/s, ratio {f_tps / s_tps:.3f}; "
          f"finish reasons {finish}; load average {load}")
    record("sl_stream", {"prompts": a.prompts, "max_tokens": max_tokens if a.pipeline_lengths else a.max_tokens,
                         "rounds": ROUNDS,
                         "script_tok_s": round(s_tps, 1), "factory_tok_s": round(f_tps, 1),
                         "ratio": round(f_tps / s_tps, 3), "finish_reasons": finish, "length_share": length_share,
                         "passes": [{"script_tok_s": round(x, 1), "factory_tok_s": round(y, 1), "ratio": round(y / x, 3)}
                                    for x, y in rows],
                         "load_avg_1_5_15": load, "quick": a.quick, **({"decode_replay": replay} if replay else {})})
    eng.close()


def step_curve(eng, prompts: list, stage_lengths: list[list[int]], k: int = 24) -> dict:
    """Decode step time vs batch size on ``eng``, and the script's stages replayed on it (module docstring)."""
    import numpy as np
    from vllm import SamplingParams

    full = len(prompts)
    sizes = sorted({b for b in (1, 2, 4, 8, 16, 32, 48, 64, 96, 128) if b < full} | {full})

    def timed(batch: list, n: int) -> float:
        eng.llm.reset_prefix_cache()
        start = time.perf_counter()
        eng.llm.chat(batch, SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.7), use_tqdm=False)
        return time.perf_counter() - start

    step = {}
    for b in sizes:
        batch = prompts[:b]
        step[b] = max(1e-6, (min(timed(batch, k + 1) for _ in range(2)) - min(timed(batch, 1) for _ in range(2))) / k)
        print(f"  batch {b:4d}: step {step[b] * 1000:.1f} ms, {b / step[b]:.0f} tok/s", flush=True)
    xs = np.array(sizes, float)
    ys = np.array([step[b] for b in sizes])

    def t(b: int) -> float:
        return float(np.interp(b, xs, ys))

    script = 0.0
    tokens = 0
    for lengths in stage_lengths:
        ls = np.array(lengths)
        tokens += int(ls.sum())
        script += sum(t(int((ls >= s).sum())) for s in range(1, int(ls.max(initial=0)) + 1))
    stream = tokens * step[full] / full
    out = {"k": k, "step_ms": {str(b): round(step[b] * 1000, 2) for b in sizes},
           "tok_s": {str(b): round(b / step[b], 1) for b in sizes},
           "script_decode_s": round(script, 2), "full_batch_decode_s": round(stream, 2),
           "drain": round(script / stream, 3) if stream else None}
    print(f"DECODE REPLAY: the script's decode batches replayed on this curve take {script:.1f} s; every token at "
          f"the full-batch rate {stream:.1f} s: the drain alone costs the script {out['drain']}x (prefill left out)",
          flush=True)
    return out


if __name__ == "__main__":
    main()
