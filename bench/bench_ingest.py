"""DuckDB ingest: rows/s of the store's chunked Arrow writes (INSERT OR IGNORE on content keys).

    python bench/bench_ingest.py            # 1,000,000 judgement rows in chunks of 10,000
    python bench/bench_ingest.py --quick    # 50,000 rows
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from common import record


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--chunk", type=int, default=10_000)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    if a.quick:
        a.rows = 50_000

    from factory.store import JUDGEMENT_SCHEMA, Store, now

    rng = np.random.default_rng(0)

    def chunk(start: int, n: int) -> pa.Table:
        lp = np.log(rng.uniform(0.01, 1, size=(2, n)))
        p = np.exp(lp[0]) / (np.exp(lp[0]) + np.exp(lp[1]))
        ids = pa.array([f"{i:024x}" for i in range(start, start + n)])
        cols = {f.name: pa.nulls(n, f.type) for f in JUDGEMENT_SCHEMA}
        cols.update(id=ids, run_id=pa.array(["bench"] * n), pair_id=pa.array([f"p{i // 8}" for i in range(start, start + n)]),
                    principle_id=pa.array([f"q{i % 4}" for i in range(start, start + n)]),
                    order=pa.array(["ab", "ba"] * (n // 2)), logprob_first=pa.array(lp[0]), logprob_second=pa.array(lp[1]),
                    p_first=pa.array(p), p_a=pa.array(p), status=pa.array(["ok"] * n),
                    created_at=pa.array([now()] * n, pa.timestamp("us", tz="UTC")))
        return pa.table(cols, schema=JUDGEMENT_SCHEMA)

    chunks = [chunk(s, min(a.chunk, a.rows - s)) for s in range(0, a.rows, a.chunk)]
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "i.duckdb", writer_run="bench")
        t = time.perf_counter()
        n = sum(store.insert("judgements", c) for c in chunks)
        dt = time.perf_counter() - t
        again = store.insert("judgements", chunks[0])  # a resumed chunk: all keys exist, nothing added
        store.close()
    assert n == a.rows and again == 0
    print(f"RESULT ingest: {n:,} rows in {dt:.2f} s = {n / dt:,.0f} rows/s (chunks of {a.chunk:,}, one transaction each)")
    record("ingest", {"rows": n, "seconds": round(dt, 2), "rows_s": round(n / dt), "chunk": a.chunk, "quick": a.quick})


if __name__ == "__main__":
    main()
