"""DuckDB ingest: rows/s of the store's chunked Arrow writes, side by side with DuckDB's own insert of
the same Arrow batches into the same table (a fresh database of the same schema each), in one run:

- ``judgements`` (no primary key; the runner only inserts keys it found missing): ``store.insert``
  vs DuckDB's plain ``INSERT``;
- a keyed table (``responses``, content keys, idempotent): ``store.insert`` (``INSERT OR IGNORE``)
  vs DuckDB's ``INSERT ... ON CONFLICT DO NOTHING``.

    python bench/bench_ingest.py            # 1,000,000 rows in chunks of 10,000
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

    from factory.store import GEN_SCHEMA, JUDGEMENT_SCHEMA, MEMORY_LIMIT, Store, now

    rng = np.random.default_rng(0)

    def chunk(schema: pa.Schema, start: int, n: int) -> pa.Table:
        lp = np.log(rng.uniform(0.01, 1, size=(2, n)))
        p = np.exp(lp[0]) / (np.exp(lp[0]) + np.exp(lp[1]))
        cols = {f.name: pa.nulls(n, f.type) for f in schema}
        cols.update(id=pa.array([f"{i:024x}" for i in range(start, start + n)]), run_id=pa.array(["bench"] * n),
                    status=pa.array(["ok"] * n), created_at=pa.array([now()] * n, pa.timestamp("us", tz="UTC")))
        if "p_a" in cols:
            cols.update(pair_id=pa.array([f"p{i // 8}" for i in range(start, start + n)]),
                        principle_id=pa.array([f"q{i % 4}" for i in range(start, start + n)]),
                        order=pa.array(["ab", "ba"] * (n // 2)), logprob_first=pa.array(lp[0]),
                        logprob_second=pa.array(lp[1]), p_first=pa.array(p), p_a=pa.array(p))
        else:
            cols.update(prompt_id=pa.array([f"p{i // 4}" for i in range(start, start + n)]),
                        text=pa.array([f"answer number {i}" for i in range(start, start + n)]))
        return pa.table(cols, schema=schema)

    def factory_pass(path: Path, table: str, chunks: list[pa.Table]) -> float:
        store = Store(path, writer_run="bench")
        t = time.perf_counter()
        n = 0
        for c in chunks:
            with store.transaction():  # as the runner writes: one transaction per chunk
                n += store.insert(table, c)
        dt = time.perf_counter() - t
        assert n == a.rows
        if table != "judgements":
            assert store.insert(table, chunks[0]) == 0  # a resumed chunk: all keys exist, nothing added
        store.close()
        return dt

    def duckdb_pass(path: Path, table: str, chunks: list[pa.Table], verb: str) -> float:
        Store(path, writer_run="bench").close()  # the same schema, then DuckDB alone
        con = duckdb.connect(str(path), config={"memory_limit": MEMORY_LIMIT})
        cols = ", ".join(f'"{f}"' for f in chunks[0].column_names)
        t = time.perf_counter()
        n = 0
        for c in chunks:
            con.register("_b", c)
            n += con.execute(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM _b {verb}").fetchall()[0][0]
            con.unregister("_b")
        dt = time.perf_counter() - t
        con.close()
        assert n == a.rows
        return dt

    out = {"rows": a.rows, "chunk": a.chunk, "quick": a.quick}
    for table, schema, verb in (("judgements", JUDGEMENT_SCHEMA, ""), ("responses", GEN_SCHEMA, "ON CONFLICT DO NOTHING")):
        chunks = [chunk(schema, s, min(a.chunk, a.rows - s)) for s in range(0, a.rows, a.chunk)]
        best: dict[str, float] = {}
        with tempfile.TemporaryDirectory() as tmp:
            for rep in range(2):  # alternate, best of two each: the machine is shared and noisy
                f = factory_pass(Path(tmp) / f"f{rep}.duckdb", table, chunks)
                d = duckdb_pass(Path(tmp) / f"d{rep}.duckdb", table, chunks, verb)
                best["f"], best["d"] = min(best.get("f", f), f), min(best.get("d", d), d)
        f, d = best["f"], best["d"]
        print(f"RESULT ingest {table}: store.insert {a.rows / f:,.0f} rows/s vs DuckDB's own "
              f"{'INSERT ' + verb if verb else 'INSERT'} {a.rows / d:,.0f} rows/s (ratio {d / f:.2f})")
        key = "keyed" if verb else "judgements"
        out.update({f"{key}_rows_s": round(a.rows / f), f"{key}_duckdb_rows_s": round(a.rows / d),
                    f"{key}_ratio": round(d / f, 3)})
    out.update(rows_s=out["judgements_rows_s"], seconds=round(a.rows / out["judgements_rows_s"], 2))
    record("ingest", out)


if __name__ == "__main__":
    main()
