"""``python -m bench [--quick]``: run every benchmark, then print and save one table.

Each figure comes from its own script (bench/bench_*.py), run in a fresh process; the table is
written to bench/results/SUMMARY.md with the machine description and package versions.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = Path(os.environ.get("FACTORY_BENCH_RESULTS", HERE / "results"))
SCRIPTS = ["bench_sl.py", "bench_judge.py", "bench_server.py", "bench_ingest.py", "bench_scale.py", "bench_audit.py",
           "bench_hostile.py", "bench_review.py"]


def latest(quick: bool, name: str, key: str | None = None) -> dict | None:
    """The newest recorded result of one benchmark in the given mode (quick or full) that has ``key``."""
    path = RESULTS / f"{name}.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    rows = [r for r in rows if bool(r.get("quick")) == quick and (key is None or key in r)]
    return rows[-1] if rows else None


def table(quick: bool = False) -> list[tuple[str, str]]:
    rows = []
    if r := latest(quick, "sl"):
        rows.append(("critique→revise answer stage: raw vLLM vs factory tok/s",
                     f"{r['raw_tok_s']:.0f} vs {r['factory_tok_s']:.0f} (ratio {r['ratio']:.3f}; {r['prompts']}×{r['max_tokens']})"))
    if r := latest(quick, "judge"):
        rows.append(("judge: log-prob vs text verdict labels/s",
                     f"{r['logprob_labels_s']} vs {r['text_labels_s']} ({r['logprob_vs_text']}×; 1 vs "
                     f"{r['text_gen_tokens_per_label']} generated tokens/label)"))
        rows.append(("judge: prefix cache on vs off labels/s",
                     f"{r['cache_on_labels_s']} vs {r['cache_off_labels_s']} ({r['cache_on_vs_off']}×; "
                     f"{r['prompt_tokens_per_label']} prompt tokens/label)"))
    if r := latest(quick, "server", "server_tok_s"):
        rows.append(("server (vllm serve) vs offline engine tok/s",
                     f"{r['server_tok_s']:.0f} vs {r['offline_tok_s']:.0f} (ratio {r['ratio']:.2f}; {r['requests']} requests)"))
    if r := latest(quick, "server", "top_k_labels_s"):
        rows.append(("server judge: standard top-k vs token-id extension labels/s",
                     f"{r['top_k_labels_s']} vs {r['token_ids_labels_s']} (best passes {r['top_k_vs_token_ids']:.3f}, "
                     f"per-round median {r['top_k_vs_token_ids_median']:.3f}; {r['judge_labels']} labels, "
                     f"{r['top_k_floored_labels']} with a floored option)"))
        if "top_k_vs_token_ids_cpu" in r:
            rows.append(("server judge: standard top-k vs token-id extension labels per server CPU s",
                         f"{r['top_k_labels_per_cpu_s']} vs {r['token_ids_labels_per_cpu_s']} (ratio {r['top_k_vs_token_ids_cpu']:.3f})"))
    if r := latest(quick, "ingest"):
        if "keyed_ratio" in r:
            rows.append(("ingest rows/s: store.insert vs DuckDB's own insert of the same batches",
                         f"judgements {r['judgements_rows_s']:,} vs {r['judgements_duckdb_rows_s']:,} (ratio "
                         f"{r['judgements_ratio']:.2f}); keyed, idempotent: {r['keyed_rows_s']:,} vs "
                         f"{r['keyed_duckdb_rows_s']:,} (ratio {r['keyed_ratio']:.2f}); {r['rows']:,} rows"))
        else:
            rows.append(("DuckDB ingest rows/s", f"{r['rows_s']:,} ({r['rows']:,} rows)"))
    if r := latest(quick, "scale"):
        for sz in r["sizes"]:
            rows.append((f"scale, fake engine: {sz['pairs']:,} pairs ({sz['judgements']:,} judgements)",
                         f"{sz['judgements_s']:,} judgements/s, peak {sz['peak_rss_mb']} MB, "
                         f"{sz['bytes_per_judgement']} B/judgement, rerun {sz['rerun_s']} s, "
                         f"restart after kill -9 at {sz['killed_at_judgements']:,}: first row in "
                         f"{sz['restart_first_row_s']} s, lost {sz['lost']}, duplicated {sz['duplicated']}"))
    if real := latest(quick, "scale-real"):
        rows.append((f"scale, real engine (vLLM, embedded model): {real['pairs']} hh-rlhf pairs through `factory run`",
                     f"{real['judgements_s']} judgements/s ({real['judgements']} judgements in "
                     f"{real['stage_seconds']} s, engine start excluded)"))
    if r := latest(quick, "audit"):
        rows.append(("audit over AI labels (s)", f"{r['seconds']} s for {r['labels']:,} labels"))
    if r := latest(quick, "hostile", "worst_loader_ms"):
        rows.append(("hostile config files: worst `factory validate` time / peak RSS",
                     f"{r['worst_seconds']:.2f} s / {r['worst_peak_rss_mb']:.0f} MB over {r['files']} files "
                     f"(loader alone ≤ {r['worst_loader_ms']:.0f} ms; all refused: {r['all_refused']})"))
    if r := latest(quick, "hostile", "data_files"):
        rows.append(("hostile data files: worst `factory run` time / peak RSS (every good row judged)",
                     f"{r['worst_seconds']:.2f} s / {r['worst_peak_rss_mb']:.0f} MB over {r['data_files']} files "
                     f"(as expected: {r['all_as_expected']})"))
    if r := latest(quick, "hostile", "damaged_named_s"):
        rows.append(("damaged database named / stale lock taken over",
                     f"{r.get('damaged_named_ms', 0):.0f} ms ({r['damaged_named_s']:.2f} s whole CLI) / "
                     f"{r['stale_lock_takeover_ms']:.0f} ms"))
    if r := latest(quick, "review"):
        rows.append(("review app: slowest page median (ms)",
                     f"{r['worst_ms']} ms over {r['labels']:,} judgements; workspace build {r['build_s']} s"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small CI-sized runs of every benchmark")
    ap.add_argument("--only", nargs="*", help="run only these scripts")
    a = ap.parse_args()
    failed = []
    for script in a.only or SCRIPTS:
        if not (HERE / script).exists():
            continue
        print(f"== {script}", flush=True)
        done = subprocess.run([sys.executable, str(HERE / script)] + (["--quick"] if a.quick else []),
                              capture_output=True, text=True, cwd=HERE)
        lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT")]
        print("\n".join(lines) if lines else done.stderr[-2000:], flush=True)
        if done.returncode != 0:
            failed.append(script)
    sys.path.insert(0, str(HERE))
    from common import machine

    rows = table(a.quick)
    md = ["| figure | measured |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    md.append("")
    md.append("machine: " + json.dumps(machine()))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / ("SUMMARY-quick.md" if a.quick else "SUMMARY.md")).write_text("\n".join(md) + "\n")
    print("\n".join(md))
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
