"""`factory validate` on constitutions of growing size: wall time and peak RSS of the whole command
(interpreter and imports included), best of 3, in a fresh child under a 1 GiB address-space limit.

Each case also records its CPU time (user + system): on a shared, loaded machine the wall time
measures the other processes as much as this one (the load average is recorded beside it).

Targets (issue 21): 32 principles with 5 demonstrations < 1 s; 5,000 principles < 3 s and < 300 MB;
an alias bomb written as a constitution still refused (< 1 s, < 200 MB).

    python bench/bench_constitution.py            # best of 3
    python bench/bench_constitution.py --quick    # one pass
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, record

LIMIT_AS = 1 << 30


def _limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT_AS, LIMIT_AS))


def validate(path: Path) -> tuple[float, float, int, str, float]:
    """(wall seconds, peak RSS in MB, exit code, stderr, CPU seconds) of one `factory validate` child
    (as bench_hostile.py measures it, plus the CPU time: the wall time of a loaded machine misleads)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "1000", "NO_COLOR": "1"}
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "factory.cli", "validate", str(path)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=_limit)
    err = proc.stderr.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    dt = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    return dt, usage.ru_maxrss / 1024, proc.returncode, err, usage.ru_utime + usage.ru_stime


def constitution(n: int, demos: int = 0) -> str:
    """``n`` principles (critique, revision and comparison of about 90 characters each) and ``demos``
    critique demonstrations: about 350 bytes a principle, like the shipped ones."""
    lines = [f"name: bench-{n}", 'version: "1"', "principles:"]
    for i in range(n):
        lines += [f"  - id: rule-{i}",
                  f"    critique: Point out every way the reply falls short of rule {i}, which asks for care with facts and people.",
                  f"    revision: Rewrite the reply so that it follows rule {i} fully, while staying as helpful as it can be.",
                  f"    comparison: Which of the two responses better follows rule {i} about care with facts and people?",
                  "    tags: [bench]"]
    if demos:
        lines.append("examples:")
    for d in range(demos):
        conv = json.dumps(f"Human: A question about topic {d}?\n\nAssistant: A careless answer about topic {d}.")
        lines += ["  - kind: critique", f"    conversation: {conv}",
                  f"    critique: The answer about topic {d} is careless with facts.",
                  f"    revision: A careful answer about topic {d}.", f"    principle: rule-{d % n}"]
    return "\n".join(lines) + "\n"


BOMB = """name: bomb
version: "1"
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
principles: [*f]
"""

CASES = {"32 principles + 5 demonstrations": (32, 5, 1.0, None), "1,000 principles": (1000, 0, None, None),
         "5,000 principles": (5000, 0, 3.0, 300.0), "10,000 principles": (10000, 0, None, None)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    reps = 1 if a.quick else 3
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for name, (n, demos, s_max, mb_max) in CASES.items():
            files[name] = (Path(tmp) / f"c{n}.yaml", 0, s_max, mb_max)
            files[name][0].write_text(constitution(n, demos))
        files["alias bomb as a constitution"] = (Path(tmp) / "bomb.yaml", 2, 1.0, 200.0)
        files["alias bomb as a constitution"][0].write_text(BOMB)
        for name, (path, want, s_max, mb_max) in files.items():
            runs = [validate(path) for _ in range(reps)]
            seconds, rss, cpu = min(r[0] for r in runs), max(r[1] for r in runs), min(r[4] for r in runs)
            code, err = runs[-1][2], runs[-1][3]
            met = (s_max is None or seconds < s_max) and (mb_max is None or rss < mb_max)
            rows.append({"case": name, "bytes": path.stat().st_size, "seconds": round(seconds, 3),
                         "cpu_seconds": round(cpu, 3), "peak_rss_mb": round(rss, 1), "exit": code, "as_expected": code == want,
                         "target": f"< {s_max} s" + (f", < {mb_max} MB" if mb_max else "") if s_max else None,
                         "target_met": met if s_max else None})
            print(f"{name:36s} {path.stat().st_size / 1e6:6.2f} MB file {seconds:6.3f} s ({cpu:5.2f} s CPU) {rss:7.1f} MB peak RSS  "
                  f"exit {code}{'' if code == want else '  UNEXPECTED: ' + err[-300:]}"
                  f"{'' if met else '  TARGET MISSED'}", flush=True)
    load = os.getloadavg()[0]
    print("RESULT constitution: " + "; ".join(f"{r['case']}: {r['seconds']:.2f} s ({r['cpu_seconds']:.2f} s CPU), "
                                               f"{r['peak_rss_mb']:.0f} MB" for r in rows) + f"; load average {load:.1f}")
    record("constitution", {"load_average": round(load, 1), "per_case": rows, "all_as_expected": all(r["as_expected"] for r in rows),
                            "targets_met": all(r["target_met"] is not False for r in rows), "quick": a.quick})


if __name__ == "__main__":
    main()
