"""Scale: a fake-engine preference run over N file pairs × 4 principles × 2 orders, end to end.

    python bench/bench_scale.py                 # 100,000 and 1,000,000 pairs (0.8M and 8M judgements)
    python bench/bench_scale.py --quick         # 2,000 and 10,000 pairs
    python bench/bench_scale.py --sizes 20000   # any sizes
    python bench/bench_scale.py --real-pairs 0  # without the real-engine pass
    python bench/bench_scale.py --real-only     # only the real-engine pass
    python bench/bench_scale.py --dedup --sizes 100000   # dedup + decontamination vs the plain run

For each size, in fresh processes (peak RSS is the child's own): the full run (judgements/s, peak
RSS), the database's bytes per judgement, a rerun with nothing left to do, and a run killed with
SIGKILL at about half way then restarted (seconds from the restart's process start to its first
committed row, and a check that the final table has every judgement exactly once). The fake
engine answers instantly, so this measures the factory itself: reading, planning, keys, probes,
rendering, writing and labelling. Figures go to bench/results/scale.jsonl.

Then a real-engine pass: the same pipeline shape (4 principles, both orders, log-prob judge) over
the first hh-rlhf pairs of the shared file with the embedded model on vLLM, through `factory run`
in a fresh process: judgements/s of the judging stage (engine start excluded), comparable with
`bench_judge.py`'s log-prob labels/s on the same 48 pairs (which warms its engine first).
"""

from __future__ import annotations

import argparse
import json
import random
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

from common import HH, REPO, record

WORDS = ("the of and to in is you that it he was for on are as with his they at be this have from or one had by "
         "word but not what all were we when your can said there use an each which she do how their if will up "
         "other about out many then them these so some her would make like him into time has look two more write "
         "go see number no way could people my than first water been call who oil its now find long down day did "
         "get come made may part").split()
PER_PAIR, ORDERS = 4, 2


def make_pairs(path: Path, n: int) -> None:
    """JSONL with prompt/response_a/response_b of about 500 characters each (as in the issue)."""
    rng = random.Random(0)

    def text() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(110))[:500]

    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"{i}: {text()}", "response_a": text(), "response_b": text()}) + "\n")


def pipeline(tmp: Path, n: int) -> Path:
    path = tmp / f"scale{n}.yaml"
    path.write_text(f"""kind: prefs
name: scale{n}
constitution: {REPO}/constitutions/harmless.yaml
pairs: {{source: file, path: {tmp}/pairs{n}.jsonl}}
judge: {{template: {REPO}/prompts/judge.j2, per_pair: {PER_PAIR}}}
engine: {{kind: fake}}
db: {tmp}/scale{n}.duckdb
chunk_rows: 10000
""")
    return path


# The child: the factory CLI, writing its own peak RSS (VmHWM, kB) at exit (not after kill -9).
CHILD = """import atexit, os
def _hwm():
    kb = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0]
    open(os.environ['BENCH_HWM'], 'w').write(kb)
atexit.register(_hwm)
from factory.cli import app
app()"""


def factory(args: list[str], *, kill_after: float | None = None) -> dict:
    """Run `factory ARGS` in a child: wall time, the child's own peak RSS (MB), exit code; with
    ``kill_after``, SIGKILL it after that many seconds."""
    start = time.time()
    with tempfile.TemporaryFile("w+") as err, tempfile.NamedTemporaryFile("r") as hwm:
        proc = subprocess.Popen([sys.executable, "-c", CHILD, *args], stdout=subprocess.DEVNULL, stderr=err,
                                env={**os.environ, "BENCH_HWM": hwm.name})
        timer = threading.Timer(kill_after, proc.send_signal, [signal.SIGKILL]) if kill_after else None
        if timer:
            timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if timer:
            timer.cancel()
        err.seek(0)
        text = err.read()[-2000:]
        own = hwm.read().strip()
    # the child's own peak (VmHWM of its image); ru_maxrss also counts this parent's peak, which Linux
    # hands to a child it starts (vfork + exec), e.g. the parent's count(DISTINCT id) over 8M rows
    peak_kb = int(own) if own else usage.ru_maxrss
    return {"seconds": time.time() - start, "start": start, "rc": proc.returncode, "stderr": text,
            "peak_rss_mb": peak_kb / 1024, "cpu_s": usage.ru_utime + usage.ru_stime}


def db_facts(db: Path, run_id: str | None = None) -> dict:
    import duckdb

    con = duckdb.connect(str(db), read_only=True)
    try:
        n, distinct = con.execute("SELECT count(*), count(DISTINCT id) FROM judgements").fetchone()
        summary = con.execute("SELECT summary_json, status FROM runs ORDER BY started_at DESC LIMIT 1").fetchone()
        labels = con.execute("SELECT count(*) FROM preferences").fetchone()[0]
    finally:
        con.close()
    return {"judgements": n, "distinct": distinct, "labels": labels, "summary": json.loads(summary[0] or "{}"),
            "status": summary[1]}


def one_size(tmp: Path, n: int) -> dict:
    make_pairs(tmp / f"pairs{n}.jsonl", n)
    pipe = pipeline(tmp, n)
    db = tmp / f"scale{n}.duckdb"
    expected = n * PER_PAIR * ORDERS
    full = factory(["run", str(pipe), "--quiet"])
    rss = full["peak_rss_mb"]
    assert full["rc"] == 0, full["stderr"]
    facts = db_facts(db)
    assert facts["judgements"] == facts["distinct"] == expected, facts
    size = db.stat().st_size
    rerun = factory(["run", str(pipe), "--quiet"])
    rerun_rss = rerun["peak_rss_mb"]
    assert rerun["rc"] == 0 and db_facts(db)["judgements"] == expected
    # kill -9 at about half way, then restart and time its first committed row
    db.unlink()
    killed = factory(["run", str(pipe), "--quiet"], kill_after=full["seconds"] / 2)
    assert killed["rc"] == -signal.SIGKILL, killed
    partial = db_facts(db)["judgements"]
    restart = factory(["run", str(pipe), "--quiet"])
    assert restart["rc"] == 0, restart["stderr"]
    after = db_facts(db)
    first = after["summary"].get("first_write_at")
    first_s = (datetime.fromisoformat(first).timestamp() - restart["start"]) if first else float("nan")
    assert after["judgements"] == after["distinct"] == expected, after
    out = {"pairs": n, "judgements": expected, "seconds": round(full["seconds"], 1),
           "judgements_s": round(expected / full["seconds"]), "peak_rss_mb": round(rss), "rerun_s": round(rerun["seconds"], 1),
           "rerun_peak_rss_mb": round(rerun_rss), "db_bytes": size, "bytes_per_judgement": round(size / expected, 1),
           "killed_at_judgements": partial, "restart_first_row_s": round(first_s, 1),
           "restart_total_s": round(restart["seconds"], 1), "lost": expected - after["distinct"],
           "duplicated": after["judgements"] - after["distinct"]}
    print("RESULT scale: " + json.dumps(out), flush=True)
    return out


SCREEN = f"dedup: {{exact: true, near: 0.8}}\ndecontaminate: {{against: [evals, {HH}]}}\n"


def plant(path: Path, every: int = 1000) -> int:
    """Every ``every``-th pair becomes a re-cased, re-spaced copy of the pair before it, and the one after
    it gets an eval prompt inside its prompt: the screens have something to find. Returns rows planted."""
    evals = [json.loads(l)["prompt"] for l in (REPO / "data/evals/harmful.jsonl").read_text().splitlines()[1:]]
    rows = path.read_text().splitlines()
    for i in range(every, len(rows) - 1, every):
        prev = json.loads(rows[i - 1])
        rows[i] = json.dumps({k: "  " + v.upper() + " " for k, v in prev.items()})
        nxt = json.loads(rows[i + 1])
        nxt["prompt"] += " " + evals[(i // every) % len(evals)]
        rows[i + 1] = json.dumps(nxt)
    path.write_text("\n".join(rows) + "\n")
    return 2 * len(range(every, len(rows) - 1, every))


def dedup_pass(tmp: Path, n: int, rounds: int = 2, together: bool = False) -> dict:
    """The same pairs through the plain pipeline and through one with `dedup` (exact + MinHash 0.8) and
    `decontaminate` (data/evals and the hh-rlhf test file): wall time and peak RSS side by side, in
    alternating fresh processes and fresh databases (plain, screened, plain, screened); ``together``:
    each round's two runs at the same time (half the wall time; both share the CPUs, so CPU seconds
    and peak RSS compare and wall time does not)."""
    make_pairs(tmp / f"pairs{n}.jsonl", n)
    planted = plant(tmp / f"pairs{n}.jsonl")
    plain = pipeline(tmp, n)
    screened = tmp / f"screened{n}.yaml"
    screened.write_text(plain.read_text().replace(f"scale{n}.duckdb", f"screened{n}.duckdb") + SCREEN)
    runs: dict[str, list[dict]] = {"plain": [], "screened": []}
    def one(name: str, pipe: Path) -> None:
        db = tmp / f"{'scale' if name == 'plain' else 'screened'}{n}.duckdb"
        db.unlink(missing_ok=True)
        r = factory(["run", str(pipe), "--quiet"])
        assert r["rc"] == 0, r["stderr"]
        runs[name].append({**r, **db_facts(db)})

    for _ in range(rounds):
        sides = (("plain", plain), ("screened", screened))
        if together:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(2) as pool:
                list(pool.map(lambda side: one(*side), sides))
        else:
            for side in sides:
                one(*side)
    best = {k: min(v, key=lambda r: r["seconds"]) for k, v in runs.items()}
    skipped = best["screened"]["summary"].get("input_skips", 0)
    load = os.getloadavg()
    out = {"pairs": n, "planted": planted, "skipped": skipped, "rounds": rounds, "load_avg_1_5_15": [round(x, 1) for x in load],
           "plain_s": round(best["plain"]["seconds"], 1), "screened_s": round(best["screened"]["seconds"], 1),
           "extra_time": round(best["screened"]["seconds"] / best["plain"]["seconds"] - 1, 3),
           # CPU seconds (user + system) of the run's process: what the factory itself did, less sensitive
           # than wall time to other jobs on a shared machine
           "plain_cpu_s": round(min(r["cpu_s"] for r in runs["plain"]), 1),
           "screened_cpu_s": round(min(r["cpu_s"] for r in runs["screened"]), 1),
           "plain_peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs["plain"])),
           "screened_peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs["screened"])),
           "all_s": {k: [round(r["seconds"], 1) for r in v] for k, v in runs.items()}, "together": together}
    out["rss_ratio"] = round(out["screened_peak_rss_mb"] / out["plain_peak_rss_mb"], 3)
    out["extra_cpu"] = round(out["screened_cpu_s"] / out["plain_cpu_s"] - 1, 3)
    print("RESULT scale-dedup: " + json.dumps(out), flush=True)
    return out


def real_pass(tmp: Path, n_pairs: int) -> dict:
    """`factory run` of a preference pipeline on the real engine over ``n_pairs`` hh-rlhf pairs."""
    pipe = tmp / "real.yaml"
    pipe.write_text(f"""kind: prefs
name: scale-real
constitution: {REPO}/constitutions/harmless.yaml
pairs: {{source: file, path: {HH}, format: hh-rlhf, limit: {n_pairs}}}
judge: {{template: {REPO}/prompts/judge.j2, per_pair: {PER_PAIR}, seed: 0}}
engine: {{kind: vllm, seed: 0, max_model_len: 2048}}
db: {tmp}/real.duckdb
""")
    run = factory(["run", str(pipe), "--quiet"])
    assert run["rc"] == 0, run["stderr"]
    facts = db_facts(tmp / "real.duckdb")
    stage = facts["summary"]["stages"]["judgements"]
    assert stage["written"] == facts["judgements"] == n_pairs * PER_PAIR * ORDERS, (stage, facts)
    out = {"pairs": n_pairs, "judgements": stage["written"], "stage_seconds": stage["seconds"],
           "judgements_s": round(stage["written"] / stage["seconds"], 2),
           "prompt_tokens_per_judgement": round(stage["prompt_tokens"] / stage["written"], 1),
           "process_seconds": round(run["seconds"], 1), "peak_rss_mb": round(run["peak_rss_mb"])}
    print("RESULT scale-real: " + json.dumps(out), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="*")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dir", help="work folder (default: a temporary one; 1M pairs need ~4 GB)")
    ap.add_argument("--real-pairs", type=int, help="hh-rlhf pairs for the real-engine pass (0: skip; default 48, quick 6)")
    ap.add_argument("--real-only", action="store_true", help="only the real-engine pass")
    ap.add_argument("--dedup", action="store_true", help="only the dedup + decontamination comparison")
    ap.add_argument("--rounds", type=int, default=2, help="--dedup: alternating plain/screened rounds")
    ap.add_argument("--together", action="store_true", help="--dedup: each round's plain and screened runs at the same time")
    a = ap.parse_args()
    if a.dedup:
        with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
            for n in a.sizes or ([2_000] if a.quick else [100_000]):
                record("scale-dedup", {**dedup_pass(Path(tmp), n, a.rounds, a.together), "quick": a.quick})
        return
    sizes = a.sizes or ([2_000, 10_000] if a.quick else [100_000, 1_000_000])
    real_pairs = a.real_pairs if a.real_pairs is not None else (6 if a.quick else 48)
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        if not a.real_only:
            results = [one_size(Path(tmp), n) for n in sizes]
            big, small = results[-1], results[0]
            summary = {"sizes": results, "rss_ratio_large_vs_small": round(big["peak_rss_mb"] / small["peak_rss_mb"], 3),
                       "quick": a.quick}
            print("RESULT scale-summary: " + json.dumps({k: v for k, v in summary.items() if k != "sizes"}))
            record("scale", summary)
        if real_pairs:
            record("scale-real", {**real_pass(Path(tmp), real_pairs), "quick": a.quick})


if __name__ == "__main__":
    main()
