"""``factory serve judge``: the service's lifecycle, on the project's run lifecycle.

1. the bind rule first (loopback, or ``--allow-remote`` and a token: ``factory.review.security``),
   then the socket, so a refused address opens nothing;
2. the pipeline (``kind: prefs`` or ``audit``: its ``judge:`` section or ``judges:`` panel,
   constitution and engines);
3. the store's writer lock (held while the service runs), each judge's engine (the run lifecycle's
   ``runs.build_engines``), and the service's run: kind ``serve``, its id the pipeline's name and a
   hash of the pipeline, constitution, judge template(s) and the engines' identities
   (``runs.Loaded.run_id``), so a restart continues the same run; its judges are recorded
   (``run_judges``) as a prefs run records them, so a panel's stored labels pool over them;
4. the batcher thread and uvicorn; the first SIGTERM/SIGINT stops accepting, lets the requests in
   flight finish (their judgements committed), then the batcher drains; the run is labelled by the
   one label rule (``preferences``) and its status written (``done``, or ``failed`` with the
   reason); exit 0. An engine or store failure answers 503 with the reason, stops the server and
   exits 3. A second signal aborts at once; what was committed stays.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from .. import runs
from ..labelrun import label_run
from ..review.security import BindError, check_bind, is_loopback
from ..runner import TableStats
from ..store import Store, StoreError
from .app import JudgeApp, Limits, create_app
from .batcher import Batcher
from ..writer import quiet_gc
from .judging import judge_plan
from .render_pool import default_workers

EXIT_FAILED = 3


class _ServeKind(runs.RunKind):
    """What the run lifecycle's bookkeeping needs to know of a service run."""

    name = "serve"
    tables = ("judgements",)


def guard_bind(host: str, allow_remote: bool, token: str | None) -> str | None:
    if not is_loopback(host) and not allow_remote:
        raise BindError(f"--host {host} would let other machines use the judge (and read what it is sent); pass "
                        "--allow-remote to mean it: a token is then required on every request as "
                        "`Authorization: Bearer TOKEN` (--token, or one is generated and printed once)")
    return check_bind(host, allow_remote, token)


class _Judges(runs.Loaded):
    """The pipeline as the service's run: its roles are its judges (a prefs pipeline's policy samples
    nothing here, so no engine is built for it)."""

    def roles(self) -> list:
        return self.judge_roles()


def open_service(path: str | Path) -> tuple[runs.Loaded, Store, dict[str, Any], list]:
    """The pipeline as a ``serve`` run: store locked, every judge's engine built (by the run lifecycle's
    :func:`factory.runs.build_engines`: judges with the same model and engine settings share one), run
    recorded (the lifecycle's first half). Returns the run, the store, judge name -> engine, and the
    engines to close."""
    from ..kinds import load

    kind, lp = load(path)
    if not hasattr(lp.cfg, "judge"):
        raise StoreError(f"{path}: a `kind: {kind.name}` pipeline has no judge; serve a `kind: prefs` (or audit) "
                         "pipeline: its judge:, constitution, model and engine are what the service uses")
    if not lp.judge_roles():
        raise StoreError(f"{path}: `judges: []` names no judge; name at least one judge to serve")
    templates = {k: t for k, t in lp.templates.items() if k == "judge" or k.startswith("judge:")}
    slp = _Judges(lp.path, "serve", lp.cfg, lp.constitution, templates)
    store = Store(lp.cfg.db, writer_run=f"serve:{lp.cfg.name}", run_memory=True)
    owned: list = []
    try:
        engines = runs.build_engines(slp, None, None, owned)
        slp.engine_model = slp.identity({name: e.model for name, e in engines.items()})
        store.relabel_lock(slp.run_id)
        runs.record_run(store, slp, engines)
    except BaseException:
        runs.release(store, owned)
        raise
    return slp, store, engines, owned


def close_service(slp: runs.Loaded, store: Store, owned: list, batcher: Batcher | None, start: float) -> runs.Summary:
    """Label the run and write its status and counts (the lifecycle's second half); release everything."""
    s = runs.Summary(run_id=slp.run_id, db=str(slp.cfg.db), kind="serve")
    try:
        if batcher is not None:
            st = batcher.stats
            s.stages = [TableStats("judgements", planned=st.judgements + st.cache_hits, reused=st.cache_hits,
                                   written=st.judgements, requests=st.engine_requests, prompt_tokens=st.prompt_tokens,
                                   completion_tokens=st.completion_tokens)]
            s.extra = {"http_requests": st.requests, "pairs": st.pairs, "linked": st.linked}
            s.status, s.error = ("failed", batcher.fatal) if batcher.fatal else ("done", None)
        else:
            s.status, s.error = "failed", "the service did not start"
        try:
            s.pairs = store.count("run_pairs", "run_id = ?", [slp.run_id])
            s.labels = label_run(store, slp.run_id, slp.constitution, slp.cfg.judge)
        except Exception as e:  # noqa: BLE001 - labels can be remade; the status must still be written
            s.status, s.error = "failed", f"labelling failed: {type(e).__name__}: {str(e)[:300]}"
        runs._finish(store, slp, _ServeKind(), s, start)
    finally:
        runs.release(store, owned)
    return s


class Service:
    """A pipeline's judge, ready to serve: the run opened, the plan, the batcher (started) and the ASGI app.
    ``close()`` drains the batcher, labels the run, writes its status and releases the store and engine."""

    def __init__(self, path: str | Path, *, limits: Limits = Limits(), cache_size: int = 100_000,
                 token: str | None = None, on_fatal: Callable[[str], None] = lambda reason: None,
                 render_workers: int | None = None):
        """``render_workers``: processes that render judge prompts (None: one per spare core, at most 4;
        0: the batcher renders them, :mod:`factory.serve.render_pool`)."""
        self.start_time = time.perf_counter()
        self.limits = limits
        self.slp, self.store, self.engines, self.owned = open_service(path)
        self.engine = next(iter(self.engines.values()))  # the first judge's
        self.batcher: Batcher | None = None
        self.closed: runs.Summary | None = None
        try:
            self.plan = judge_plan(self.store, self.slp, self.engines, self.slp.run_id)
            self.batcher = Batcher(self.store, self.engines, self.slp.run_id, identities=self.plan.identities,
                                   cache_size=cache_size, chunk_rows=self.slp.cfg.chunk_rows,
                                   forget=self.plan.forget, on_fatal=on_fatal,
                                   render_ctxs=[j.ctx for j in self.plan.panel],
                                   render_workers=default_workers() if render_workers is None else render_workers)
            self.japp = JudgeApp(self.batcher, self.plan, run_id=self.slp.run_id, limits=limits)
            self.app = create_app(self.japp, token=token)
            self.batcher.start()
        except BaseException:
            self.close()
            raise

    @property
    def run_id(self) -> str:
        return self.slp.run_id

    def close(self) -> runs.Summary:
        if self.closed is None:
            if self.batcher is not None:
                if hasattr(self, "japp"):
                    self.japp.draining = True
                self.batcher.stop(timeout=self.limits.timeout_s)
            self.closed = close_service(self.slp, self.store, self.owned, self.batcher, self.start_time)
        return self.closed


def serve(path: str | Path, *, host: str = "127.0.0.1", port: int = 8000, allow_remote: bool = False,
          token: str | None = None, limits: Limits = Limits(), cache_size: int = 100_000,
          echo: Callable[[str], None] = print, render_workers: int | None = None) -> int:
    """Serve the judge of the pipeline at ``path`` until SIGTERM/SIGINT; returns the exit code."""
    import uvicorn

    from ..review.server import _bind, _stop_quietly

    token = guard_bind(host, allow_remote, token)
    sock = _bind(host, port)
    server_box: dict[str, Any] = {}

    def on_fatal(reason: str) -> None:
        echo(f"error: {reason}; answering 503 and stopping (everything answered is stored)")
        if "server" in server_box:
            server_box["server"].should_exit = True

    try:
        svc = Service(path, limits=limits, cache_size=cache_size, token=token, on_fatal=on_fatal,
                      render_workers=render_workers)
    except BaseException:
        sock.close()
        raise
    try:
        # proxy_headers off: X-Forwarded-For is not used (no per-client logic) and its middleware costs every request
        config = uvicorn.Config(svc.app, log_level="warning", access_log=False, lifespan="off", proxy_headers=False,
                                timeout_graceful_shutdown=int(limits.timeout_s) + 5, timeout_keep_alive=30)
        server = server_box["server"] = uvicorn.Server(config)
        if svc.batcher.fatal:  # died before the server existed
            server.should_exit = True
        name = f"[{host}]" if ":" in host else host
        echo(f"judge service for run {svc.run_id} ({svc.plan.model}; db {svc.slp.cfg.db}; "
             f"render workers: {svc.batcher.stats.render_workers})")
        if token and not is_loopback(host):
            echo(f"token: {token}   (send `Authorization: Bearer <token>`)")
        echo(f"listening on http://{name}:{sock.getsockname()[1]}   (SIGTERM or Ctrl-C: finish what is in flight, stop)")
        with _stop_quietly(), quiet_gc():  # the offline runner's GC settings: a request allocates by the thousand
            server.run(sockets=[sock])
    finally:
        sock.close()
        s = svc.close()
    st = svc.batcher.stats
    echo(f"stopped: {st.requests} requests, {st.judgements} new judgements, {st.cache_hits} from the store; run "
         f"{svc.run_id} {s.status}" + (f" ({s.error})" if s.error else ""))
    return EXIT_FAILED if s.status == "failed" else 0
