"""``factory serve …``: long-running services over a pipeline (registered in cli.py as the ``serve`` group)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

serve_app = typer.Typer(no_args_is_help=True, help="Services for online training: `factory serve judge PIPELINE`.")


@serve_app.command("judge")
def judge_cmd(pipeline: Path = typer.Argument(..., help="a `kind: prefs` (or audit) pipeline: its judge, constitution, "
                                              "model, engine and db"),
              port: int = typer.Option(8000, help="port (0: any free port)"),
              host: str = typer.Option("127.0.0.1", help="address to listen on (loopback unless --allow-remote)"),
              allow_remote: bool = typer.Option(False, help="allow a non-loopback --host (a token is then required)"),
              token: Optional[str] = typer.Option(None, help="require `Authorization: Bearer TOKEN` on every request "
                                                  "(generated and printed once with --allow-remote when not given)"),
              max_completions: int = typer.Option(16, help="completions per /v1/rewards group"),
              max_concurrent: int = typer.Option(64, help="requests judged at once; more get 429 + Retry-After"),
              max_body_kb: int = typer.Option(1024, help="request body cap in KiB (413 above)"),
              timeout_s: float = typer.Option(120.0, help="per-request timeout (504; the judgements still get stored)"),
              cache_size: int = typer.Option(100_000, help="judgements kept in memory for instant answers")):
    """Serve a pipeline's constitutional judge over HTTP for online RL (TRL GRPO / Online DPO, OpenRLHF).

    Example: factory serve judge pipelines/hh-prefs.yaml --port 8000
    then: curl -s localhost:8000/v1/preference -d '{"prompt": "Hi?", "responses": ["Hello!", "Go away."]}'
    """
    from .cli import err, user_errors
    from .review.security import BindError
    from .serve.app import Limits
    from .serve.service import serve

    limits = Limits(max_body_bytes=max_body_kb * 1024, max_completions=max_completions, max_concurrent=max_concurrent,
                    timeout_s=timeout_s)

    @user_errors
    def go() -> int:
        try:
            return serve(pipeline, host=host, port=port, allow_remote=allow_remote, token=token, limits=limits,
                         cache_size=cache_size, echo=lambda s: print(s, flush=True))
        except BindError as e:
            err.print(f"[red]error:[/red] {e}", highlight=False)
            raise typer.Exit(2)

    code = go()
    if code:
        raise typer.Exit(code)
