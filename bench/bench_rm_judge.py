"""Benchmark the reward-model judge engine on CPU: hh-rlhf pairs per second at the embedded size.

The reward model is the embedded model (SmolLM2-135M) as a sequence classifier with a fresh
one-logit head (``AutoModelForSequenceClassification``, num_labels=1): the architecture and size of
what ``factory train rm`` writes from it, so the speed is the same (the head's weights do not
matter for speed). Each pair is the hh-rlhf conversation plus response a / response b, scored
through ``RewardModelEngine.generate`` exactly as a judge run sends it. Model load is not timed.
The machine is shared: besides wall-clock pairs/s the script records the process's CPU
seconds (pairs per CPU-second: the rate with one core to itself) and the 1-minute load average.
Also times ``compute_panel`` (3 judges) on synthetic probabilities.

    python bench/bench_rm_judge.py                 # 64 pairs, float32 and bfloat16, batch 8 and 16, max_length 512
    python bench/bench_rm_judge.py --pairs 16 --batch-sizes 8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rm_folder(root: Path) -> Path:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from factory.models import resolve

    base = resolve(None)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(base)
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(root / "rm")
    tok.save_pretrained(root / "rm")
    return root / "rm"


def requests(n: int) -> list:
    from common import HH

    from factory.engines.base import Request, Sampling
    from factory.export import human_pairs

    table, _ = human_pairs(HH, limit=n)
    out = []
    for i, (conv, a, b) in enumerate(zip(*(table.column(c).to_pylist() for c in ("conversation", "response_a",
                                                                                   "response_b")))):
        conv = json.loads(conv)
        req = Request(key=f"k{i}", messages=conv, sampling=Sampling(max_tokens=1, temperature=0.0))
        req.candidates = tuple(tuple(conv) + ({"role": "assistant", "content": r},) for r in (a, b))
        out.append(req)
    return out


def bench_panel(n_pairs: int = 100_000) -> float:
    import pyarrow as pa

    from factory.audit.panel import compute_panel

    rng = np.random.default_rng(0)
    human = rng.random(n_pairs) < 0.5
    ids = np.char.add("q", np.arange(n_pairs).astype(str))
    p = [np.clip(np.where(human, 0.65, 0.35) + rng.normal(scale=0.25, size=n_pairs), 0, 1) for _ in range(3)]
    judgements = pa.table({"pair_id": np.tile(ids, 3), "judge": np.repeat(["j0", "j1", "j2"], n_pairs),
                           "p_a": np.concatenate(p)})
    labels = pa.table({"pair_id": ids, "human_choice": np.where(human, "a", "b")})
    start = time.perf_counter()
    compute_panel(judgements, labels)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--batch-sizes", default="8,16")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--dtypes", default="auto,bfloat16", help="auto = float32 on CPU")
    args = ap.parse_args(argv)
    import torch

    from common import record

    from factory.engines.reward_model import RewardModelEngine

    reqs = requests(args.pairs)
    with tempfile.TemporaryDirectory(prefix="bench-rm-") as tmp:
        folder = rm_folder(Path(tmp))
        ref = None  # P(first) of the first configuration, to count decisions another dtype flips
        for dtype in args.dtypes.split(","):
            for bs in [int(x) for x in args.batch_sizes.split(",")]:
                eng = RewardModelEngine(folder, model_name="smollm2-135m-rm", batch_size=bs,
                                        max_length=args.max_length, dtype=dtype)
                list(eng.generate(reqs[:2]))  # warm-up (first forward pass)
                eng.truncated = 0
                start, cpu_start = time.perf_counter(), time.process_time()
                out = list(eng.generate(iter(reqs)))
                seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
                tokens = sum(c.prompt_tokens for c in out)
                ok = sum(c.status == "ok" for c in out)
                p = np.exp([c.option_logprobs[0] for c in out])
                ref = p if ref is None else ref
                flips = int(((p > 0.5) != (ref > 0.5)).sum())
                print(f"RESULT rm_judge: {ok} pairs, {dtype}, batch {bs}, max_length {args.max_length}: {seconds:.1f} s "
                      f"= {ok / seconds:.2f} pairs/s, {tokens / seconds:,.0f} tokens/s ({eng.truncated} sequences cut, "
                      f"{tokens / max(ok, 1):.0f} tokens/pair, {torch.get_num_threads()} threads; vs the first "
                      f"configuration: max |dp| {np.abs(p - ref).max():.4f}, {flips} decisions flipped; "
                      f"{cpu:.1f} CPU-s = {ok / cpu:.2f} pairs per CPU-second)")
                record("rm_judge", {"pairs": ok, "dtype": dtype, "batch_size": bs, "max_length": args.max_length,
                                    "seconds": round(seconds, 2), "pairs_per_s": round(ok / seconds, 3),
                                    "cpu_seconds": round(cpu, 2), "pairs_per_cpu_s": round(ok / cpu, 3),
                                    "tokens_per_s": round(tokens / seconds), "tokens_per_pair": round(tokens / max(ok, 1)),
                                    "truncated": eng.truncated, "threads": torch.get_num_threads(),
                                    "max_abs_dp_vs_first": round(float(np.abs(p - ref).max()), 5), "flips_vs_first": flips,
                                    "loadavg_1m": round(os.getloadavg()[0], 2)})
                eng.close()
    seconds = bench_panel()
    print(f"RESULT panel_audit: 3 judges x 100,000 pairs: {seconds:.2f} s")
    record("rm_judge", {"panel_audit_pairs": 100_000, "judges": 3, "seconds": round(seconds, 2)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
