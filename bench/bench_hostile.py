"""Hostile config files: time and peak RSS of `factory validate` refusing each one (target: < 1 s and
< 200 MB each), beside a valid constitution for scale.

    python bench/bench_hostile.py            # best of 3 per file
    python bench/bench_hostile.py --quick    # one pass

Each file runs in a fresh `python -m factory.cli validate FILE` under a 1 GiB address-space limit;
its wall time and peak RSS (``wait4``'s ``ru_maxrss``) include the interpreter and the CLI's
imports. ``loader_ms`` is the loader alone (``load_yaml_data``), timed in this process.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, record

sys.path[:0] = [str(REPO), str(REPO / "tests")]  # this checkout's factory, and the corpus
from hostile_corpus import all_files  # noqa: E402

LIMIT_AS = 1 << 30


def _limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT_AS, LIMIT_AS))


def validate(path: Path) -> tuple[float, float, int, str]:
    """(seconds, peak RSS in MB, exit code, stderr) of one `factory validate` child."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "1000", "NO_COLOR": "1"}
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "factory.cli", "validate", str(path)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=_limit)
    err = proc.stderr.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    dt = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keep Popen from waiting again
    return dt, usage.ru_maxrss / 1024, proc.returncode, err


def loader_ms(path: Path) -> float:
    from factory.yamlconf import ConfigError, load_yaml_data

    t = time.perf_counter()
    try:
        load_yaml_data(path)
    except ConfigError:
        pass
    return (time.perf_counter() - t) * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    reps = 1 if a.quick else 3
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = {"(valid) constitutions/harmless.yaml": (REPO / "constitutions/harmless.yaml", None, None),
                 **all_files(Path(tmp))}
        for name, (path, line, _) in files.items():
            runs = [validate(path) for _ in range(reps)]
            seconds, rss = min(r[0] for r in runs), max(r[1] for r in runs)
            code, err = runs[-1][2], runs[-1][3]
            ok = code == 0 if line is None else (code == 2 and f"{path}:{line}:" in err and "Traceback" not in err)
            ms = min(loader_ms(path) for _ in range(reps))
            rows.append({"file": name, "seconds": round(seconds, 3), "peak_rss_mb": round(rss, 1),
                         "loader_ms": round(ms, 1), "exit": code, "as_expected": ok})
            print(f"{name:40s} {seconds:6.3f} s {rss:7.1f} MB  loader {ms:7.1f} ms  exit {code}"
                  f"{'' if ok else '  UNEXPECTED: ' + err[-300:]}", flush=True)
    hostile = [r for r in rows if not r["file"].startswith("(valid)")]
    worst_s, worst_mb = max(r["seconds"] for r in hostile), max(r["peak_rss_mb"] for r in hostile)
    worst_ms = max(r["loader_ms"] for r in hostile)
    print(f"RESULT hostile: {len(hostile)} files, worst validate {worst_s:.2f} s / {worst_mb:.0f} MB peak RSS "
          f"(loader alone ≤ {worst_ms:.0f} ms); target < 1 s and < 200 MB")
    record("hostile", {"files": len(hostile), "worst_seconds": worst_s, "worst_peak_rss_mb": worst_mb,
                       "worst_loader_ms": worst_ms, "all_refused": all(r["as_expected"] for r in rows),
                       "per_file": rows, "quick": a.quick})
    if not all(r["as_expected"] for r in rows):
        sys.exit("a hostile file was not refused as expected")


if __name__ == "__main__":
    main()
