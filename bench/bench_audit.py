"""Benchmark ``compute_audit`` on synthetic judgements: 1,000,000 labels by default.

125,000 pairs × 4 principles × 2 orders, with a latent quality per pair that drives both the
human choice and the judge (plus noise, a slight first-position bias and 1% failed judgements).
Synthesis is not timed; the timed call includes the first scikit-learn import (κ), as a CLI run
would. The bootstrap uses the default n_bootstrap=1000: agreement scores take three values, so
resamples are drawn as multinomial counts (see ``bootstrap_mean_ci``), whose cost does not grow
with the number of pairs.

    python bench/bench_audit.py            # 1M labels, fails above 10 s
    python bench/bench_audit.py --quick    # 50k labels
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from factory.audit.metrics import compute_audit

PRINCIPLES = np.array(["harmless", "helpful", "honest", "polite"])
WEIGHTS = {"harmless": 2.0, "helpful": 1.0, "honest": 1.0, "polite": 0.5}


def synthesize(n_labels: int, seed: int = 0) -> tuple[pa.Table, pa.Table]:
    """(judgements, human) tables with ``n_labels`` judgements (rounded down to whole pairs)."""
    rng = np.random.default_rng(seed)
    per_pair = len(PRINCIPLES) * 2
    n = max(n_labels // per_pair, 1)
    ids = np.char.add("pair-", np.arange(n).astype(str))
    quality = rng.normal(size=n)
    human = pa.table({
        "pair_id": ids,
        "human_choice": np.where(quality + rng.normal(scale=0.7, size=n) > 0, "a", "b"),
        "len_a": rng.integers(20, 2000, n),
        "len_b": rng.integers(20, 2000, n),
    })
    order = np.tile(np.array(["ab", "ba"]), n * len(PRINCIPLES))
    logit = np.repeat(quality, per_pair) + rng.normal(size=n * per_pair) + np.where(order == "ab", 0.2, -0.2)
    p = 1.0 / (1.0 + np.exp(-logit))
    p[rng.random(len(p)) < 0.01] = np.nan
    judgements = pa.table({
        "pair_id": np.repeat(ids, per_pair),
        "principle_id": np.tile(np.repeat(PRINCIPLES, 2), n),
        "order": order,
        "p_a": p,
    })
    return judgements, human


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="50,000 labels instead of 1,000,000")
    ap.add_argument("--labels", type=int, default=None, help="number of judgements to synthesise")
    ap.add_argument("--max-seconds", type=float, default=10.0, help="exit 1 when compute_audit takes longer")
    args = ap.parse_args(argv)
    n_labels = args.labels or (50_000 if args.quick else 1_000_000)
    judgements, human = synthesize(n_labels)
    start = time.perf_counter()
    result = compute_audit(judgements, human, WEIGHTS)
    seconds = time.perf_counter() - start
    print(f"RESULT audit: {judgements.num_rows:,} labels: {seconds:.2f} s "
          f"(agreement {result.overall.agreement:.3f}, {result.overall.n_pairs:,} pairs)")
    from common import record

    record("audit", {"labels": judgements.num_rows, "seconds": round(seconds, 2), "quick": args.quick})
    if seconds > args.max_seconds:
        print(f"slower than --max-seconds {args.max_seconds:g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
