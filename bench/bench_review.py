"""Benchmark ``factory review`` over a database of 1,000,000 judgements (125,000 audited pairs).

The database is synthesised (not timed) with ``bench_audit.synthesize``: pairs, human labels, the
run's judgements, and a stored audit computed by ``compute_audit`` on them.
Timed: building the review workspace from it (the first ``factory review``), a restart with the
copy current, and, as medians over repeated requests through the real app (Starlette's in-process
test client: routing, SQL, Jinja rendering; no network), the queue's first and a deep page, a
principle's worst pairs, a combined filter, a pair view, and giving a verdict (a POST, committed
to the workspace, plus the redirect), and copying verdicts into the database (the first copy builds
the adjudicated human set, later ones rewrite the pairs they touch).

    python bench/bench_review.py            # 1M judgements; fails if a page's median is above --max-page-ms
    python bench/bench_review.py --quick    # 50k judgements
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_audit import WEIGHTS, synthesize  # noqa: E402

from factory.audit.metrics import compute_audit  # noqa: E402
from factory.store import PAIR_SCHEMA, Store, now  # noqa: E402

RUN, SET, AUDIT = "bench-run", "bench-set", "bench-audit"


def make_db(path: Path, n_labels: int) -> int:
    """A factory database holding one audit over ``n_labels`` judgements; returns the number of pairs."""
    judgements, human = synthesize(n_labels)
    n = human.num_rows
    ids = pa.array([f"j{i}" for i in range(judgements.num_rows)], pa.string())
    # texts of the synthetic lengths, capped at 600 characters (filters use the stored lengths)
    cap = lambda col: pc.min_element_wise(human[col], pa.scalar(600, pa.int64()))  # noqa: E731
    text = lambda col: pc.binary_repeat(pa.array(["lorem "] * n), pc.divide(cap(col), 6))  # noqa: E731
    conv = pa.array([json.dumps([{"role": "user", "content": f"question {i}?"}]) for i in range(n)])
    t0 = now()
    pairs = pa.table({"pair_id": human["pair_id"], "run_id": pa.array([RUN] * n), "source": pa.array([f"human:{SET}"] * n),
                      "prompt_id": pa.nulls(n, pa.string()), "conversation": conv, "response_a": text("len_a"),
                      "response_b": text("len_b"), "response_a_id": pa.nulls(n, pa.string()),
                      "response_b_id": pa.nulls(n, pa.string()), "status": pa.array(["ok"] * n),
                      "error": pa.nulls(n, pa.string()), "created_at": pa.array([t0] * n, pa.timestamp("us", tz="UTC"))},
                     schema=PAIR_SCHEMA)
    lengths = pairs.select(["pair_id"]).append_column("len_a", pc.utf8_length(pairs["response_a"])).append_column(
        "len_b", pc.utf8_length(pairs["response_b"]))
    human = human.drop_columns(["len_a", "len_b"]).join(lengths, "pair_id")
    m = judgements.num_rows
    failed = pc.is_nan(judgements["p_a"])  # stored as a real run stores them: no probability, status failed
    p_a = pc.if_else(failed, pa.scalar(None, pa.float64()), judgements["p_a"])
    with Store(path, writer_run=RUN) as st:
        st.insert("pairs", pairs)
        st.insert("judgements", pa.table({
            "id": ids, "run_id": pa.array([RUN] * m), "pair_id": judgements["pair_id"],
            "principle_id": judgements["principle_id"], "order": judgements["order"], "p_first": p_a, "p_a": p_a,
            "status": pc.if_else(failed, "failed", "ok"), "model": pa.array(["synthetic"] * m)}))
        st.insert("human_labels", pa.table({"set_id": pa.array([SET] * n), "pair_id": human["pair_id"],
                                            "source_row": pa.array(np.arange(n)), "human_choice": human["human_choice"]}))
        st.con.execute("INSERT INTO human_sets VALUES (?, ?, 'synthetic', 'jsonl', ?, 0, '{}', ?)", [SET, SET, n, t0])
        const = {"name": "bench", "version": "1", "principles": [
            {"id": k, "critique": "c", "revision": "r", "comparison": f"Which response is more {k}?", "weight": w}
            for k, w in WEIGHTS.items()]}
        chash = st.put_config("constitution", const)  # the run's label rule reads its weights from here
        st.con.execute("INSERT INTO runs (run_id, kind, config_json, constitution_hash, status) "
                       "VALUES (?, 'audit', '{}', ?, 'done')", [RUN, chash])
        result = compute_audit(judgements, human, WEIGHTS, n_bootstrap=200)
        st.con.execute("INSERT INTO audits VALUES (?, ?, ?, ?, ?, NULL)", [AUDIT, RUN, SET, t0, json.dumps(result.to_dict())])
    return n


def median_ms(fn, repeat: int) -> float:
    fn()  # warm
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return round(statistics.median(times), 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="50,000 judgements instead of 1,000,000")
    ap.add_argument("--labels", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--max-page-ms", type=float, default=500.0, help="exit 1 when a page's median is slower")
    args = ap.parse_args(argv)
    n_labels = args.labels or (50_000 if args.quick else 1_000_000)
    from starlette.testclient import TestClient

    from factory.review.session import Review
    from factory.review.web import create_app

    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "bench.duckdb"
        n_pairs = make_db(db, n_labels)
        t = time.perf_counter()
        review = Review(db, annotator="bench")
        build_s = time.perf_counter() - t
        review.close()
        t = time.perf_counter()
        review = Review(db, annotator="bench")
        restart_s = time.perf_counter() - t
        items = review.ws.one("SELECT count(*) AS n, count(*) FILTER (WHERE is_tie) AS ties FROM items")
        client = TestClient(create_app(review), base_url="http://127.0.0.1")
        last_page = max(1, (items["n"] - items["ties"]) // 50)
        first_pair = re.search(r'href="/pair/([^"?]+)', client.get("/queue").text).group(1)
        principle = sorted(WEIGHTS)[0]
        pages = {
            "queue_first_page": "/queue",
            "queue_last_page": f"/queue?page={last_page}",
            "principle_worst_pairs": f"/queue?principle={principle}&ties=include",
            "combined_filter": "/queue?ties=include&inconsistent=yes&min_gap=200&longer=ai&state=todo",
            "pair_view": f"/pair/{first_pair}?principle={principle}&ties=include",
        }
        ms = {}
        for name, url in pages.items():
            assert client.get(url).status_code == 200, url
            ms[name] = median_ms(lambda url=url: client.get(url), args.repeat)
        token = re.search(r'name="csrf" value="([^"]+)"', client.get(f"/pair/{first_pair}").text).group(1)
        ms["verdict_post"] = median_ms(lambda: client.post("/verdict", data={"csrf": token, "pair_id": first_pair,
                                                                              "verdict": "human", "q": ""},
                                                           follow_redirects=False), args.repeat)
        t = time.perf_counter()
        review.sync()  # the first copy builds the whole adjudicated set
        sync_s = time.perf_counter() - t
        review.record(first_pair, "ai", None)
        t = time.perf_counter()
        review.sync()  # later copies rewrite the pairs they touch
        sync_next_s = time.perf_counter() - t
        review.close()
        size_mb = sum(p.stat().st_size for p in Path(tmp).glob("bench.duckdb.review.duckdb*")) / 1e6
    worst = max(ms.values())
    print(f"RESULT review: {n_labels:,} judgements, {n_pairs:,} pairs, {items['n']:,} queued ({items['ties']:,} ties): "
          f"workspace build {build_s:.1f} s, restart {restart_s:.2f} s, first copy into the db {sync_s:.2f} s, "
          f"next copy {sync_next_s:.2f} s, workspace {size_mb:.0f} MB; median ms per request: "
          + ", ".join(f"{k} {v}" for k, v in ms.items()))
    from common import record

    record("review", {"labels": n_labels, "pairs": n_pairs, "queued": items["n"], "build_s": round(build_s, 2),
                      "restart_s": round(restart_s, 2), "sync_s": round(sync_s, 2), "sync_next_s": round(sync_next_s, 2), "workspace_mb": round(size_mb),
                      "ms": ms, "worst_ms": worst, "quick": args.quick})
    if worst > args.max_page_ms:
        print(f"a page is slower than --max-page-ms {args.max_page_ms:g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
