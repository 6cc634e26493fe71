"""``factory review``: open the review session, bind the socket, print the URL, serve until Ctrl-C."""

from __future__ import annotations

import getpass
import signal
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .security import BindError, check_bind
from .session import Review


def serve(db: str | Path, audit_id: str | None = None, *, host: str = "127.0.0.1", port: int = 8765,
          allow_remote: bool = False, token: str | None = None, read_only: bool = False,
          annotator: str | None = None, sync_interval: float = 5.0, echo: Callable[[str], None] = print) -> None:
    """Serve the review app for ``db`` until interrupted; pending verdicts get a last copy on the way out."""
    import uvicorn

    from . import queue as Q
    from .web import create_app

    token = check_bind(host, allow_remote, token)  # before anything is opened
    sock = _bind(host, port)
    try:
        review = Review(db, audit_id, annotator=annotator or _user(), read_only=read_only, sync_interval=sync_interval)
    except BaseException:
        sock.close()
        raise
    try:
        app = create_app(review, token=token)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
        review.start_background()
        p = Q.progress(review.ws, review.audit_id, Q.Filters())
        a = review.audit
        name = f"[{host}]" if ":" in host else host
        url = f"http://{name}:{sock.getsockname()[1]}/" + (f"?token={token}" if token else "")
        echo(f"reviewing audit {a['audit_id']} (run {a['run_id']}, human set {a['set_id']}): {p['disagreements']} "
             f"disagreements, {p['ties']} ties, {p['done']} adjudicated")
        echo(f"workspace: {review.ws.path}" + (" (read-only)" if read_only else ""))
        if review.state.busy:
            echo(f"note: {review.state.busy}; browsing the workspace copy, verdicts are queued until it is free")
        echo(f"open {url}   (Ctrl-C to stop)")
        with _stop_quietly():
            server.run(sockets=[sock])
    finally:
        review.close()
        sock.close()
    left = review.ws_pending_at_close
    echo(f"stopped; {left} verdict(s) still queued in {review.ws.path}: they are copied into {db} by the next "
         "`factory review`" if left else f"stopped; every verdict is in {db}")


@contextmanager
def _stop_quietly() -> Iterator[None]:
    """uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again for the handler that was
    there before it; a no-op handler here lets the last copy of queued verdicts run instead of dying."""
    before = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as e:
        sock.close()
        raise BindError(f"cannot listen on {host}:{port}: {e.strerror}; pick another --port (0: any free port)") from None
    sock.listen(128)
    return sock


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "annotator"
