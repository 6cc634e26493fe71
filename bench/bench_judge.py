"""Preference-judge speed on the same pairs, model and principles, in one run:

1. the factory's log-probability judge (one decode step per label) vs a judge that generates its
   verdict as text (up to 64 tokens, then parsed): labels/s, ratio, generated tokens per label;
2. labels/s with vLLM prefix caching on vs off (the constitution/instructions and the pair form
   a shared prefix across principles). Each setting runs in its own engine process.

    python bench/bench_judge.py            # 48 hh-rlhf pairs × 4 principles × 2 orders = 384 labels
    python bench/bench_judge.py --quick    # CI smoke: 6 pairs × 2 principles
    python bench/bench_judge.py --few-shot 2   # with judge.few_shot: 2 (demonstrations: 8 more hh-rlhf
                                               # pairs, labelled by their human choice, both orders each)
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import HH, REPO, engine, record


DEMO_POOL = 8  # pairs read after the judged ones, as the constitution's comparison examples (--few-shot)


def setup(n_pairs: int, k: int, few_shot: int = 0):
    from factory.constitution import Constitution, load_constitution
    from factory.sources import read_pairs
    from factory.stages import judge as J
    from factory.templates import load_template

    table, _ = read_pairs(HH, format="hh-rlhf", limit=n_pairs + (200 if few_shot else 0))
    rows = table.to_pylist()
    pairs = [J.Pair(r["pair_id"], json.loads(r["conversation"]), r["response_a"], r["response_b"]) for r in rows[:n_pairs]]
    c = load_constitution(REPO / "constitutions/harmless.yaml")
    if few_shot:  # the shortest of the next 200 pairs: demonstrations must leave room for the request
        size = lambda r: len(r["conversation"]) + len(r["response_a"]) + len(r["response_b"])  # noqa: E731
        demos = [{"kind": "comparison", "conversation": json.loads(r["conversation"]), "response_a": r["response_a"],
                  "response_b": r["response_b"], "preferred": "b" if r["swapped"] else "a"}
                 for r in sorted(rows[n_pairs:], key=size)[:DEMO_POOL]]
        c = Constitution.model_validate({**c.model_dump(exclude_none=True), "examples": demos})
    chosen = {p.pair_id: J.choose(c, k, 0, p.pair_id) for p in pairs}
    return J, c, load_template(REPO / "prompts/judge.j2"), pairs, chosen


FEW_SHOT = 0  # judge.few_shot of this process's passes (set from --few-shot)


def judge_ctx(eng, c, tmpl, tag):
    from factory import judges
    from factory.roles import JudgeSpec

    ctx, mode = judges.setup(None, eng, JudgeSpec(few_shot=FEW_SHOT), run_id="bench", constitution=c, template=tmpl)
    ctx.sampling_hash = tag
    return ctx, mode


def logprob_pass(eng, J, c, tmpl, pairs, chosen, tag) -> tuple[int, float, int]:
    from factory import judges
    from factory.runner import InputChunk, Runner
    from factory.store import Store

    ctx, mode = judge_ctx(eng, c, tmpl, tag)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "j.duckdb", writer_run="bench")
        t = time.perf_counter()
        # the streaming runner as prefs runs use it, jobs in prefix-cache order (first principles first)
        runner = Runner(store, eng, "bench", stage="pairs")
        runner.run([InputChunk(0, {}, lambda: judges.pair_jobs(ctx, mode, pairs, lambda p: chosen[p.pair_id]))])
        ptoks = runner.stats["judgements"].prompt_tokens
        dt = time.perf_counter() - t
        ok = store.count("judgements", "status = 'ok'")
        store.close()
    return ok, dt, ptoks


def text_pass(eng, J, c, tmpl, pairs, chosen) -> tuple[int, float, int, int]:
    from factory.engines.base import Request, Sampling

    from factory import judges

    ctx, mode = judge_ctx(eng, c, tmpl, "text")
    reqs = []
    for j in judges.pair_jobs(ctx, mode, pairs, lambda p: chosen[p.pair_id]):
        msgs = j.build().messages[:-1]  # no answer prefix: the model writes its verdict
        reqs.append(Request("t" + j.key, msgs, Sampling(max_tokens=64, temperature=0.0)))
    t = time.perf_counter()
    outs = list(eng.generate(reqs))
    dt = time.perf_counter() - t
    parsed = sum(1 for o in outs if o.texts and re.search(r"\(?\b([AB])\b\)?", o.texts[0]))
    return len(outs), dt, sum(o.completion_tokens for o in outs), parsed


def phase(args) -> dict:
    """One engine process: warm up, then the requested passes; prints a JSON line."""
    global FEW_SHOT
    FEW_SHOT = args.few_shot
    J, c, tmpl, pairs, chosen = setup(args.pairs, args.principles, args.few_shot)
    eng = engine(enable_prefix_caching=args.prefix_caching == "on")
    warm = {p.pair_id: chosen[p.pair_id][:1] for p in pairs[:2]}
    logprob_pass(eng, J, c, tmpl, pairs[:2], warm, "warm")
    out = {"prefix_caching": args.prefix_caching}
    if args.prefix_caching == "on":
        eng.llm.reset_prefix_cache()
    n, dt, ptoks = logprob_pass(eng, J, c, tmpl, pairs, chosen, "lp")
    out.update(logprob_labels=n, logprob_s=dt, prompt_tokens_per_label=ptoks / max(n, 1))
    if args.text:
        eng.llm.reset_prefix_cache()  # the text judge must not reuse the log-prob pass's cached prompts
        n, dt, gen, parsed = text_pass(eng, J, c, tmpl, pairs, chosen)
        out.update(text_labels=n, text_s=dt, text_tokens_per_label=gen / max(n, 1), text_parsed=parsed)
    eng.close()
    print("PHASE " + json.dumps(out), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=48)
    ap.add_argument("--principles", type=int, default=4)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--few-shot", type=int, default=0, help="judge.few_shot (comparison demonstrations per request)")
    ap.add_argument("--cache-only", action="store_true", help="only the prefix cache on/off comparison (no text judge)")
    ap.add_argument("--phase", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--prefix-caching", default="on", help=argparse.SUPPRESS)
    ap.add_argument("--text", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.quick:
        a.pairs, a.principles = 6, 2
    if a.phase:
        phase(a)
        return
    results = {}
    for pc, text in (("on", not a.cache_only), ("off", False)):
        cmd = [sys.executable, __file__, "--phase", "--pairs", str(a.pairs), "--principles", str(a.principles),
               "--prefix-caching", pc, "--few-shot", str(a.few_shot)] + (["--text"] if text else [])
        done = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in done.stdout.splitlines() if x.startswith("PHASE ")), None)
        if line is None:
            sys.exit(f"phase prefix_caching={pc} failed:\n{done.stderr[-3000:]}")
        results[pc] = json.loads(line[6:])
    on, off = results["on"], results["off"]
    lp_rate = on["logprob_labels"] / on["logprob_s"]
    off_rate = off["logprob_labels"] / off["logprob_s"]
    if a.cache_only:
        print(f"RESULT judge (few_shot {a.few_shot}): prefix cache on {lp_rate:.2f} vs off {off_rate:.2f} labels/s = "
              f"{lp_rate / off_rate:.2f}x; {on['prompt_tokens_per_label']:.0f} prompt tokens/label")
        record("judge", {"pairs": a.pairs, "principles": a.principles, "labels": on["logprob_labels"],
                         "prompt_tokens_per_label": round(on["prompt_tokens_per_label"], 1),
                         "cache_on_labels_s": round(lp_rate, 2), "cache_off_labels_s": round(off_rate, 2),
                         "cache_on_vs_off": round(lp_rate / off_rate, 2), "few_shot": a.few_shot, "cache_only": True,
                         "load_average": round(__import__("os").getloadavg()[0], 1), "quick": a.quick})
        return
    text_rate = on["text_labels"] / on["text_s"]
    off_rate = off["logprob_labels"] / off["logprob_s"]
    summary = {
        "pairs": a.pairs, "principles": a.principles, "labels": on["logprob_labels"],
        "logprob_labels_s": round(lp_rate, 2), "text_labels_s": round(text_rate, 2),
        "logprob_vs_text": round(lp_rate / text_rate, 2),
        "logprob_gen_tokens_per_label": 1, "text_gen_tokens_per_label": round(on["text_tokens_per_label"], 1),
        "text_verdicts_parsed": f'{on["text_parsed"]}/{on["text_labels"]}',
        "prompt_tokens_per_label": round(on["prompt_tokens_per_label"], 1),
        "cache_on_labels_s": round(lp_rate, 2), "cache_off_labels_s": round(off_rate, 2),
        "cache_on_vs_off": round(lp_rate / off_rate, 2), "quick": a.quick,
        **({"few_shot": a.few_shot} if a.few_shot else {}),
    }
    print(f"RESULT judge (few_shot {a.few_shot}): logprob {lp_rate:.2f} labels/s vs text {text_rate:.2f} labels/s = {lp_rate / text_rate:.1f}x "
          f"(1 vs {on['text_tokens_per_label']:.1f} generated tokens/label); prefix cache on {lp_rate:.2f} vs off "
          f"{off_rate:.2f} labels/s = {lp_rate / off_rate:.2f}x; {on['prompt_tokens_per_label']:.0f} prompt tokens/label")
    record("judge", summary)


if __name__ == "__main__":
    main()
