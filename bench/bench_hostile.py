"""Hostile inputs, timed and measured (peak RSS) each in a fresh process:

- config files: `factory validate` refusing each hostile YAML file (target: < 1 s and < 200 MB each),
  beside a valid constitution for scale;
- data files (issue 22): `factory run` of a fake-engine prefs pipeline over each file of the hostile data
  corpus (tests/hostile_data.py: lone surrogates, 10,000-level nesting, NUL bytes, invalid UTF-8, wrong
  types, duplicates, BOM, CR-only line ends, a 24 MiB line, a gzip bomb whose last line expands to
  1.5 GB, a 6 MiB field, a parquet folder with a wrong schema, …): every good row judged, every bad row
  a skip with its row and reason, target < 500 MB peak RSS and < 10 s each;
- databases (issue 22): a damaged file named as damaged by `factory status` (target < 1 s), and a lock
  left by a killed writer taken over (target < 1 s).

    python bench/bench_hostile.py            # everything; config files best of 3
    python bench/bench_hostile.py --quick    # one pass
    python bench/bench_hostile.py --only data

Each child runs `python -m factory.cli …` under a 1 GiB (config files) or 4 GiB (data, databases)
address-space limit; its wall time and peak RSS (``wait4``'s ``ru_maxrss``) include the interpreter and
the CLI's imports. ``loader_ms`` is the YAML loader alone (``load_yaml_data``), timed in this process.
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


def _limit(limit: int = LIMIT_AS):
    return lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def child(args: list, limit: int = LIMIT_AS, env: dict | None = None) -> tuple[float, float, int, str]:
    """(seconds, peak RSS in MB, exit code, stdout + stderr) of one `python -m factory.cli ARGS` child."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "1000", "NO_COLOR": "1", **(env or {})}
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "factory.cli", *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=_limit(limit))
    out = proc.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    dt = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keep Popen from waiting again
    child.cpu_s = usage.ru_utime + usage.ru_stime  # CPU seconds: what a loaded machine does not stretch
    return dt, usage.ru_maxrss / 1024, proc.returncode, out


def validate(path: Path) -> tuple[float, float, int, str]:
    """(seconds, peak RSS in MB, exit code, output) of one `factory validate` child."""
    return child(["validate", path])


def loader_ms(path: Path) -> float:
    from factory.yamlconf import ConfigError, load_yaml_data

    t = time.perf_counter()
    try:
        load_yaml_data(path)
    except ConfigError:
        pass
    return (time.perf_counter() - t) * 1000


def yaml_part(reps: int, quick: bool) -> bool:
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
                       "per_file": rows, "quick": quick})
    return all(r["as_expected"] for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=("yaml", "data", "db"))
    a = ap.parse_args()
    from hostile_runs import data_part, db_part

    parts = {"yaml": lambda: yaml_part(1 if a.quick else 3, a.quick), "data": lambda: data_part(child, a.quick),
             "db": lambda: db_part(child, a.quick)}
    failed = [name for name, part in parts.items() if (a.only in (None, name)) and not part()]
    if failed:
        sys.exit(f"hostile inputs not handled as expected: {', '.join(failed)}")


if __name__ == "__main__":
    main()
