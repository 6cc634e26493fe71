"""The recipe's commands: the summary of `factory run recipes/X.yaml` and `factory lineage ID`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

console = Console()


def print_recipe(summary, path) -> None:
    console.print(summary.table())
    counts = summary.counts()
    console.print(f"{counts.get('done', 0)} steps run, {counts.get('skipped', 0)} finished before (skipped), "
                  f"{summary.seconds:.1f} s")
    if summary.report is not None:
        from .report import table

        console.print(table(summary.report))
        console.print(f"report: [bold]{summary.report['html']}[/bold]")
    if summary.status == "stopped":
        Console(stderr=True).print(f"[yellow]stopped[/yellow]: {summary.error}")
        raise typer.Exit(1)


def lineage_cmd(key: str = typer.Argument(..., metavar="ID", help="a row id, a run id, or a model (fingerprint or folder)"),
                db: Path = typer.Option(Path("data/demo.duckdb"), help="the DuckDB file"),
                as_json: bool = typer.Option(False, "--json", help="the chain as JSON")):
    """Where it came from: constitution → runs → export → model → the runs that model answered.

    Example: factory lineage data/recipes/cai/models/dpo-r1-0123456789 --db data/cai.duckdb
    """
    from .lineage import lineage, render

    chain = lineage(db, key)
    if as_json:
        import json

        print(json.dumps(chain, indent=2, default=str))
    else:
        console.print(render(chain))
