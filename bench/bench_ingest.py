"""DuckDB ingest: rows/s of the store's chunked Arrow writes (INSERT OR IGNORE on content keys), side
by side with DuckDB's own idempotent insert (``INSERT ... ON CONFLICT DO NOTHING``) of the same Arrow
batches into the same table in a fresh database of the same schema, in one run.

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

    import duckdb

    from factory.store import CHECKPOINT_THRESHOLD, JUDGEMENT_SCHEMA, Store, now

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

    def factory_pass(path: Path) -> tuple[int, float]:
        store = Store(path, writer_run="bench")
        t = time.perf_counter()
        n = 0
        for c in chunks:
            with store.transaction():  # as the runner writes: one transaction per chunk
                n += store.insert("judgements", c)
        dt = time.perf_counter() - t
        assert store.insert("judgements", chunks[0]) == 0  # a resumed chunk: all keys exist, nothing added
        store.close()
        return n, dt

    def duckdb_pass(path: Path) -> tuple[int, float]:
        Store(path, writer_run="bench").close()  # the same schema, then DuckDB alone
        con = duckdb.connect(str(path), config={"checkpoint_threshold": CHECKPOINT_THRESHOLD})
        cols = ", ".join(f'"{f.name}"' for f in JUDGEMENT_SCHEMA)
        t = time.perf_counter()
        n = 0
        for c in chunks:
            con.register("_b", c)
            n += con.execute(f"INSERT INTO judgements ({cols}) SELECT {cols} FROM _b ON CONFLICT DO NOTHING").fetchone()[0]
            con.unregister("_b")
        dt = time.perf_counter() - t
        con.close()
        return n, dt

    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for rep in range(2):  # alternate, best of two each: the machine is shared and noisy
            for name, fn in (("factory", factory_pass), ("duckdb", duckdb_pass)):
                n, dt = fn(Path(tmp) / f"{name}{rep}.duckdb")
                assert n == a.rows
                results[name] = min(results.get(name, dt), dt)
    n = a.rows
    f, d = results["factory"], results["duckdb"]
    print(f"RESULT ingest: store.insert {n / f:,.0f} rows/s vs DuckDB's own ON CONFLICT DO NOTHING {n / d:,.0f} rows/s "
          f"(ratio {d / f:.2f}; {n:,} rows in chunks of {a.chunk:,})")
    record("ingest", {"rows": n, "seconds": round(f, 2), "rows_s": round(n / f), "duckdb_rows_s": round(n / d),
                      "ratio": round(d / f, 3), "chunk": a.chunk, "quick": a.quick})


if __name__ == "__main__":
    main()
