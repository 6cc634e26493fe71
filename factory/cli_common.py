"""What every ``factory`` command shares: the consoles and the user-error wrapper."""

from __future__ import annotations

import functools

import typer
from rich.console import Console

console = Console()
err = Console(stderr=True)


def user_errors(fn):
    """Turn the factory's user-facing errors into one red message and exit code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .constitution import UnknownPrinciple
        from .engines.base import EngineError
        from .models import ModelError
        from .stages.judge import OptionError
        from .sources import SourceError
        from .store import StoreError
        from .templates import TemplateError
        from .yamlconf import ConfigError

        try:
            return fn(*args, **kwargs)
        except (ConfigError, TemplateError, StoreError, SourceError, ModelError, UnknownPrinciple, OptionError, EngineError) as e:
            err.print(f"[red]error:[/red] {e}", highlight=False, markup=True)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/yellow]: everything written so far is kept; rerun the same command to continue")
            raise typer.Exit(130)
        except Exception as e:  # a database damaged where only a query reads it (issue 22): named, no traceback
            damage = _as_damage(e, kwargs.get("db"))
            if damage is None:
                raise
            err.print(f"[red]error:[/red] {damage}", highlight=False, markup=True)
            raise typer.Exit(2)

    return wrapper


def _as_damage(e: BaseException, db) -> Exception | None:
    import sys

    if "duckdb" not in sys.modules:  # nothing read a database
        return None
    from .store import as_damage

    return as_damage(e, db)
