"""`factory human`, `factory audit`, `factory review`: held-out human labels and the audit of AI labels."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .cli_common import console, err, user_errors

# -- human labels and audits (issue 4) --------------------------------------------------------
from typer.core import TyperGroup  # noqa: E402


class _DefaultRun(TyperGroup):
    """`factory audit X.yaml` / `factory audit --run R --human S` mean `factory audit run …`;
    `factory audit compare A B` is the subcommand."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


human_app = typer.Typer(no_args_is_help=True, help="Held-out human preference labels (for audits).")
audit_app = typer.Typer(cls=_DefaultRun, no_args_is_help=True,
                        help="AI labels vs human labels: `factory audit PIPELINE`, `--run R --human S`, `compare A B`.")


@human_app.command("import")
@user_errors
def human_import_cmd(spec: str = typer.Argument(..., help="an hh-rlhf / JSONL(.gz) file, parquet, or HF dataset name"),
                     db: Path = typer.Option(..., help="the DuckDB file"),
                     format: str = typer.Option("auto", help="auto | hh-rlhf | jsonl"),
                     name: Optional[str] = typer.Option(None, help="set id (default: file stem + content hash)"),
                     limit: Optional[int] = typer.Option(None, help="the first N usable pairs"),
                     offset: int = typer.Option(0, help="skip the first N pairs (counted as `export human --offset`)"),
                     split: str = typer.Option("test"), data_dir: Optional[str] = typer.Option(None)):
    """Import human-labelled pairs; skipped rows are counted by reason (idempotent)."""
    from .human import import_human, skip_counts

    set_id, n, skips = import_human(db, spec, format=format, name=name, limit=limit, split=split, data_dir=data_dir,
                                    offset=offset)
    console.print(f"human set [bold]{set_id}[/bold]: {n} pairs, {len(skips)} rows skipped ({db})")
    for s in skip_counts(skips, max_rows=5):
        console.print(f"  {s['count']}× {s['reason']} (rows {', '.join(map(str, s['rows']))}…)", markup=False)


@human_app.command("list")
@user_errors
def human_list_cmd(db: Path = typer.Option(..., help="the DuckDB file")):
    """The human sets in a database."""
    from .human import list_sets

    t = Table(show_edge=False)
    rows = list_sets(db).to_pylist()
    for col in ("set_id", "pairs", "skipped", "format", "source"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["set_id"], str(r["n_pairs"]), str(r["n_skipped"]), r["format"], r["source"])
    console.print(t if rows else "no human sets; import one with `factory human import`")


@audit_app.command("run")
@user_errors
def audit_cmd(pipeline: Optional[Path] = typer.Argument(None, help="a `kind: audit` pipeline YAML"),
              run_id: Optional[str] = typer.Option(None, "--run", help="audit this run's stored judgements"),
              human: Optional[str] = typer.Option(None, help="the human set id (with --run)"),
              db: Optional[Path] = typer.Option(None, help="the DuckDB file (with --run)"),
              naive_principle: Optional[str] = typer.Option(None, help="the naive baseline's principle"),
              report_dir: Optional[Path] = typer.Option(None, help="HTML report folder (default: beside the db)"),
              quiet: bool = typer.Option(False, help="no progress bar")):
    """Label the human pairs (resumable), score the labels against humans, write the HTML report."""
    from .api import audit
    from .results import cost_line

    a = audit(pipeline, db=db, run=run_id, human=human, quiet=quiet, naive_principle=naive_principle,
              report_dir=report_dir)
    if a.cost:
        console.print("cost of the audited labels: " + cost_line(a.cost), markup=False, highlight=False)


@audit_app.command("fit")
@user_errors
def audit_fit_cmd(db: Path = typer.Option(..., help="the DuckDB file"),
                  run_id: str = typer.Option(..., "--run", help="a run that judged the human set's pairs"),
                  human: str = typer.Option(..., help="the human set id"),
                  name: str = typer.Option(..., help="the weight set's name (use it as judge.weights)"),
                  train_frac: float = typer.Option(0.5, help="share of pairs to fit on; the rest is held out"),
                  folds: int = typer.Option(5, help="cross-validation folds for the regularisation strength"),
                  seed: int = typer.Option(0)):
    """Fit principle weights and a temperature to human labels; audit them against the constitution's
    weights on held-out pairs; store them as a named weight set."""
    from .audit.fit import fit, show

    show(fit(db, run_id, human, name, train_frac=train_frac, folds=folds, seed=seed))


@audit_app.command("compare")
@user_errors
def audit_compare_cmd(a: str, b: str, db: Path = typer.Option(..., help="the DuckDB file holding audit A"),
                      db_b: Optional[Path] = typer.Option(None, help="audit B's database, if another")):
    """Two stored audits side by side (B − A per metric, overall, naive and per principle)."""
    from .audit.run import compare_audits

    console.print(compare_audits(db, a, b, db_b))


# -- reviewing disagreements (issue 12) -------------------------------------------------------


@user_errors
def review_cmd(db: Path = typer.Option(..., help="the DuckDB file holding the audit"),
               audit_id: Optional[str] = typer.Option(None, "--audit", help="the audit to review (default: the newest)"),
               host: str = typer.Option("127.0.0.1", help="address to listen on (loopback unless --allow-remote)"),
               port: int = typer.Option(8765, help="port (0: any free port)"),
               allow_remote: bool = typer.Option(False, help="allow a non-loopback --host (a token is then required)"),
               token: Optional[str] = typer.Option(None, help="require this token on every request (generated and "
                                                   "printed once with --allow-remote when not given)"),
               read_only: bool = typer.Option(False, help="browse only: no verdicts"),
               annotator: Optional[str] = typer.Option(None, help="name stored with each verdict (default: $USER)"),
               sync_interval: float = typer.Option(5.0, help="seconds between tries to copy queued verdicts into "
                                                   "the database while a run holds it")):
    """Review and adjudicate an audit's AI-vs-human disagreements in a local web app.

    Example: factory review --db data/hh.duckdb   (then open the printed URL; keys: j/k move, 1-4 verdict, u undo)
    """
    from .review.security import BindError
    from .review.server import serve

    try:
        serve(db, audit_id, host=host, port=port, allow_remote=allow_remote, token=token, read_only=read_only,
              annotator=annotator, sync_interval=sync_interval,
              echo=lambda s: console.print(s, markup=False, highlight=False, soft_wrap=True))
    except BindError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(2)


@audit_app.command("adjudicated")
@user_errors
def audit_adjudicated_cmd(audit_id: str = typer.Argument(..., help="the audit whose pairs were adjudicated"),
                          db: Path = typer.Option(..., help="the DuckDB file"),
                          report_dir: Optional[Path] = typer.Option(None, help="HTML report folder (default: beside the db)")):
    """Agreement against the original and the adjudicated labels side by side (audits the same run
    against human set adjudicated:AUDIT_ID, stored like any audit)."""
    from .review.agreement import adjudicated_audit, side_by_side_table, summary_lines

    original, adj_id, adjudicated, info = adjudicated_audit(db, audit_id, report_dir=report_dir)
    console.print(side_by_side_table(original, adjudicated, (audit_id, adj_id)))
    for line in summary_lines(audit_id, adj_id, info):
        console.print(line, markup=False, highlight=False)
