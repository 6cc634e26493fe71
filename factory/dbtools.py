"""`factory db check` and `factory db backup`: is a database file readable, and a consistent copy of it.

    factory db check data/hh.duckdb           # reads every table through DuckDB; exit 1 when damaged
    factory db backup data/hh.duckdb backups/hh-2026-12-06.duckdb

``check`` opens the file read-only, compares its length with what its header counts, then reads every
row of every table (all columns, in Arrow batches: memory stays bounded) and says which tables read and
which do not. ``backup`` takes the writer lock (so no run writes meanwhile; like any writer it brings an older
schema up to date first), checkpoints (the log is folded into the file), copies the file beside the destination, checks the copy the same way and only
then renames it into place.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import typer

db_app = typer.Typer(no_args_is_help=True, help="Check a database file, or take a consistent backup of it.")


@dataclass
class CheckResult:
    path: Path
    opened: bool = False
    problem: str | None = None  # why it did not open (damaged, in use, …)
    tables: list[tuple[str, int | None, str | None]] = field(default_factory=list)  # (table, rows, error)

    @property
    def damaged(self) -> bool:
        return bool(self.problem) or any(err for _, _, err in self.tables)


def check(path: str | Path, batch_rows: int = 8192) -> CheckResult:
    """Read every table of ``path``; raises StoreError only for what is not damage (missing, in use)."""
    import duckdb

    from .store import DamagedError, Store, StoreError

    res = CheckResult(Path(path))
    try:
        store = Store(path, read_only=True)
    except DamagedError as e:
        res.problem = str(e)
        return res
    except StoreError:
        raise
    res.opened = True
    with store:
        try:
            names = [r[0] for r in store.con.execute(
                "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database() "
                "ORDER BY table_name").fetchall()]
        except duckdb.Error as e:
            res.problem = f"cannot list its tables ({str(e).splitlines()[0][:300]})"
            return res
        for name in names:
            rows = 0
            try:
                reader = store.con.sql(f'SELECT * FROM "{name}"').to_arrow_reader(batch_rows)
                for batch in reader:
                    rows += batch.num_rows
                res.tables.append((name, rows, None))
            except duckdb.Error as e:
                res.tables.append((name, rows, str(e).splitlines()[0][:300]))
    return res


def backup(path: str | Path, dest: str | Path, *, force: bool = False) -> tuple[Path, CheckResult]:
    """A consistent copy of ``path`` at ``dest``, taken under the writer lock and checked before it is kept."""
    from .store import Store, StoreError

    src, dest = Path(path), Path(dest)
    if not src.exists():
        raise StoreError(f"{src}: no such database")
    if dest.is_dir():
        dest = dest / src.name
    if dest.exists() and not force:
        raise StoreError(f"{dest} exists; choose another path or pass --force to replace it")
    if dest.resolve() == src.resolve():
        raise StoreError(f"{dest} is the database itself; choose another path")
    tmp = dest.with_name(dest.name + ".partial")
    with Store(src, writer_run=f"backup to {dest}") as store:  # the writer lock: no run writes meanwhile
        store.con.execute("CHECKPOINT")  # fold the log (a killed run's last commits) into the file
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, tmp)
    result = check(tmp)
    if result.damaged:
        tmp.unlink(missing_ok=True)
        return dest, result
    tmp.replace(dest)
    result.path = dest
    return dest, result


def _report(res: CheckResult) -> None:
    from .cli import console, err

    if res.problem:
        err.print(f"[red]damaged:[/red] {res.problem}", highlight=False)
        return
    for name, rows, error in res.tables:
        if error:
            console.print(f"  [red]✗[/red] {name}: {error} (after {rows:,} rows)", highlight=False)
        else:
            console.print(f"  ✓ {name}: {rows:,} rows", highlight=False)
    bad = [t for t in res.tables if t[2]]
    if bad:
        err.print(f"[red]damaged:[/red] {res.path}: {len(bad)} of {len(res.tables)} tables cannot be read; copy out "
                  "what reads (`factory export …`) and restore the file from a backup, or move it aside and rerun",
                  highlight=False)
    else:
        console.print(f"ok: {res.path}: {len(res.tables)} tables, {sum(r or 0 for _, r, _ in res.tables):,} rows, "
                      "all readable", highlight=False)


def _user_errors(fn):
    from .cli import user_errors

    return user_errors(fn)


@db_app.command("check")
@_user_errors
def check_cmd(db: Path = typer.Argument(..., help="the DuckDB file")):
    """Read every table of a database through DuckDB and say what is wrong (exit 1 when damaged).

    Example: factory db check data/hh.duckdb
    """
    res = check(db)
    _report(res)
    if res.damaged:
        raise typer.Exit(1)


@db_app.command("backup")
@_user_errors
def backup_cmd(db: Path = typer.Argument(..., help="the DuckDB file"),
               dest: Path = typer.Argument(..., help="where the copy goes (a file, or a folder to put it in)"),
               force: bool = typer.Option(False, help="replace an existing file at DEST")):
    """A consistent copy taken under the writer lock (no run writes meanwhile), checked before it is kept.

    Example: factory db backup data/hh.duckdb backups/hh.duckdb
    """
    from .cli import console

    out, res = backup(db, dest, force=force)
    if res.damaged:
        _report(res)
        raise typer.Exit(1)
    console.print(f"backup: {out} ({len(res.tables)} tables, {sum(r or 0 for _, r, _ in res.tables):,} rows, "
                  "checked readable)", highlight=False)
