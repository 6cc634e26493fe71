"""The one run lifecycle, and the registry of run kinds.

Every kind of run (``sl`` critique→revise, ``prefs`` AI preference labels, ``audit`` labels vs
human labels) goes through :func:`run`: load and check the pipeline file, take the database's
writer lock and record the run, build every role's engine (the policy's, each judge's; roles with the
same model and engine settings share one) or borrow the caller's, stream the kind's stages through
:class:`~factory.runner.Runner` (each job to its role's engine), finish the run with its counts and
status (``done``, ``stopped`` after Ctrl-C/SIGTERM, ``failed`` with the reason), and release the
lock and every engine it built. A finished run rerun with nothing to do starts no engine. A kind is
one :class:`RunKind` subclass registered by name with ``factory.kinds.register_kind`` (the kinds live
side by side in :mod:`factory.kinds`, above this lifecycle); ``factory run``, ``validate``,
``render`` and ``show`` look kinds up there and nowhere else.

Resume is not a mode: the run id hashes everything that decides what the run makes (pipeline,
constitution, templates; not operational knobs like ``chunk_rows``), so rerunning the same command
continues the same run, skipping finished input chunks and stored rows.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from .engines import Engine, EngineError
from .loaded import OPERATIONAL, Loaded, Summary  # noqa: F401  (re-exported: the kinds import them here)
from .runner import EngineFailed, InputChunk, Runner
from .store import Store, StoreError


class RunKind:
    """One kind of run. Subclasses set ``name``, ``tables`` (generated tables whose failed/skipped
    rows the summary counts) and implement ``load``, ``execute`` and ``render``."""

    name: str = ""
    tables: tuple[str, ...] = ()

    def load(self, path: str | Path) -> Loaded:
        raise NotImplementedError

    def execute(self, ctx: "RunContext") -> None:
        raise NotImplementedError

    def render(self, lp: Loaded, stage: str, example: int) -> list[dict]:
        raise NotImplementedError

    def describe(self, lp: Loaded) -> str:
        return f"{len(lp.constitution.principles)} principles"

    def finish(self, ctx: "RunContext") -> None:
        """Work on the whole run after its stages (SQL in the database): labels, audits."""

    def input_fingerprints(self, lp: Loaded) -> dict[str, str | None] | None:
        """stage -> the fingerprint of its input as it is now, for a finished run rerun with nothing to
        do (its chunk records must match it); None: the kind cannot tell cheaply, so it always runs."""
        return None


class RunContext:
    """What a kind's ``execute`` works with: the open store, the loaded pipeline, each role's engine,
    the summary, and :meth:`stream` to run jobs through the engines."""

    def __init__(self, kind: RunKind, lp: Loaded, store: Store, summary: Summary, *, engines: dict[str, Engine],
                 owned: list[Engine], quiet: bool, retry_failed: bool, options: dict[str, Any]):
        self.kind, self.lp, self.store, self.summary = kind, lp, store, summary
        self.quiet, self.retry_failed, self.options = quiet, retry_failed, options
        self.owned = owned
        self.engines = engines  # role name -> engine (roles with the same settings share one)
        self.runner: Runner | None = None
        self.stop_requested = False
        self.own_runs: list[str] = []  # other run ids this run makes rows under (an audit's naive pass)

    @property
    def run_id(self) -> str:
        return self.lp.run_id

    def engine(self, role: str | None = None) -> Engine:
        """The engine of ``role`` (default: the run's first role)."""
        if role is None:
            return next(iter(self.engines.values()))
        return self.engines[role]

    @property
    def identity(self) -> str:
        """What answers the run, recorded with each finished chunk (another engine redoes the chunk)."""
        ident = self.lp.identity({r: e.model for r, e in self.engines.items()})
        return ident if isinstance(ident, str) else json.dumps(ident, sort_keys=True)

    def stream(self, stage: str, inputs: Iterable[InputChunk], *, progress: Callable[[], float | None] = lambda: None,
               own_runs: Iterable[str] = (), full_probe: bool = False) -> Runner:
        """Run the jobs of ``inputs`` (and their follow-ups) through the engines into the store."""
        cfg = self.lp.cfg
        cls = Runner
        if len({id(e) for e in self.engines.values()}) > 1:
            from .fanout import RoutedRunner as cls  # noqa: N813
        self.runner = cls(self.store, self.engine(), self.run_id, stage=stage, chunk_rows=cfg.chunk_rows,
                          retry_failed=self.retry_failed, own_runs=own_runs, full_probe=full_probe,
                          progress=progress, quiet=self.quiet, routes=dict(self.engines), identity=self.identity)
        if self.stop_requested:
            self.runner.request_stop()
        try:
            self.runner.run(inputs)
        finally:
            self.summary.stages.extend(self.runner.stats.values())
            if self.runner.first_write_at is not None and "first_write_at" not in self.summary.extra:
                self.summary.extra["first_write_at"] = self.runner.first_write_at.isoformat()
        if self.runner.stopped:
            raise _Stopped()
        return self.runner

    def done_chunks(self, stage: str, fingerprint: str | None = None) -> tuple[dict[int, dict], bool]:
        """Finished input chunks of this run's ``stage`` (index -> the meta recorded with it) that a
        restart may skip, and whether planned keys must be looked up everywhere. Chunks are not
        skipped when the input changed since they were recorded (``fingerprint`` differs: their
        records are dropped, stored rows are still reused by key) or when the run answers with
        another engine; with ``--retry-failed`` the chunks holding failed rows are planned again."""
        done = self.store.chunk_records(self.run_id, stage)
        engine = self.identity
        if any(m.get("fingerprint") != fingerprint or m.get("engine", engine) != engine for m, _ in done.values()):
            self.store.drop_chunk_records(self.run_id, stage)
            return {}, True
        full = False
        if self.retry_failed and done:
            failed, linked = self.store.failed_chunks(self.run_id, [self.run_id, *self.own_runs],
                                                      self.kind.tables)
            full = linked  # failed rows this run reused from another run: their chunks are unknown here
            done = {} if linked else {i: v for i, v in done.items() if i not in failed}
        self.summary.skipped_chunks += len(done)
        self.summary.skipped_jobs += sum(n for _, n in done.values())
        return {i: m for i, (m, _) in done.items()}, full

    def request_stop(self) -> None:
        self.stop_requested = True
        if self.runner is not None:
            self.runner.request_stop()


class _Stopped(Exception):
    """The run stopped on request (first Ctrl-C / SIGTERM) after writing what had completed."""


def build_engines(lp: Loaded, engine: Engine | None, overrides: dict[str, Engine] | None,
                  owned: list[Engine]) -> dict[str, Engine]:
    """Every role's engine: ``overrides[role]`` where given, else the caller's ``engine`` for every
    role, else one built per distinct (model, engine settings) and appended to ``owned``. All are
    built before any work, so an unreachable judge server is an error before sampling starts."""
    from .engines import make_engine

    built: dict[str, Engine] = {}
    out: dict[str, Engine] = {}
    for role in lp.roles():
        if overrides and role.name in overrides:
            out[role.name] = overrides[role.name]
        elif engine is not None:
            out[role.name] = engine
        else:
            key = role.engine_key()
            if key not in built:
                try:
                    built[key] = make_engine(role.engine, role.model)
                except (StoreError, EngineError) as e:
                    who = "the policy" if role.name == "policy" else f"judge '{role.name}'"
                    raise type(e)(f"{who} ({role.model}): {e}") from e
                owned.append(built[key])
            out[role.name] = built[key]
    return out


def execute(kind: RunKind, lp: Loaded, *, engine: Engine | None = None, engines: dict[str, Engine] | None = None,
            quiet: bool = False, retry_failed: bool = False, **options: Any) -> Summary:
    """Run (or resume) the loaded pipeline ``lp`` of ``kind`` (``factory.kinds.run`` loads a file and
    calls this). ``engine``: one engine for every role; ``engines``: role name -> engine (tests,
    drills). ``options`` go to the kind (e.g. an audit's ``naive_principle``)."""
    start = time.perf_counter()
    # the writer lock first (a second process learns at once that the database is busy), then the
    # engines (their identities complete the run id), then the run's row
    lp.engine_model = lp.expected_engine_model()  # the lock names the real run id wherever it is known before the engines
    store = Store(lp.cfg.db, writer_run=lp.run_id if lp.engine_model else f"{lp.cfg.name} (id pending: its engine is starting)",
                  run_memory=True)
    owned: list[Engine] = []
    try:
        if engine is None and not engines and not retry_failed and _finished_already(store, kind, lp):
            release(store, owned)
            return _noop_summary(kind, lp, start)
        roles = build_engines(lp, engine, engines, owned)
        lp.engine_model = lp.identity({r: e.model for r, e in roles.items()})
        store.relabel_lock(lp.run_id)
        record_run(store, lp, roles)
    except BaseException:
        release(store, owned)
        raise
    summary = Summary(run_id=lp.run_id, db=str(lp.cfg.db), kind=kind.name)
    ctx = RunContext(kind, lp, store, summary, engines=roles, owned=owned, quiet=quiet, retry_failed=retry_failed,
                     options=options)
    restore = _install_signals(ctx)
    try:
        try:
            kind.execute(ctx)
            kind.finish(ctx)
            summary.status = "done"
        except _Stopped:
            summary.status = "stopped"
        except KeyboardInterrupt:  # a second signal (or Ctrl-C outside a stream): abort at once
            summary.status, summary.error = "stopped", "aborted by a second interrupt"
            _finish(store, lp, kind, summary, start)
            raise
        except EngineFailed as e:
            summary.status, summary.error = "failed", f"engine failed: {e}"
        except Exception as e:
            summary.status, summary.error = "failed", f"{type(e).__name__}: {str(e)[:500]}"
            _finish(store, lp, kind, summary, start)
            raise
        _finish(store, lp, kind, summary, start)
    finally:
        restore()
        release(store, ctx.owned)
    if summary.status == "failed":
        raise EngineFailed(f"run {lp.run_id} failed: {summary.error}; everything completed before is stored: "
                           f"rerun the same command to resume (add --retry-failed to redo failed rows)")
    return summary


def record_run(store: Store, lp: Loaded, engines: dict[str, Engine]) -> None:
    """Record the run, its lineage blobs and what answers (each role's engine identity and capabilities)."""
    c = lp.constitution
    store.put_config("constitution", c.model_dump(), key=c.hash)
    for t in lp.templates.values():
        store.put_config("template", {"path": t.path, "source": t.source}, key=t.hash)

    def caps(e: Engine) -> dict | None:
        cap = getattr(e, "capabilities", None)
        return cap.__dict__ if cap is not None else None

    first = next(iter(engines.values()))
    lineage = {"engine_model": first.model, "engine_seed": first.seed, "capabilities": caps(first)}
    if len({id(e) for e in engines.values()}) > 1 or getattr(lp.cfg, "uses_roles", lambda: False)():
        lineage["roles"] = {r: {"model": e.model, "seed": e.seed, "capabilities": caps(e)} for r, e in engines.items()}
    store.record_run(run_id=lp.run_id, name=lp.cfg.name, kind=lp.kind, path=lp.path, config_hash=lp.config_hash,
                     config=lp.cfg.snapshot(), constitution=c, model=_models_text(lp),
                     engine_json=lp.cfg.engine.model_dump_json(), lineage=lineage)


def _models_text(lp: Loaded) -> str:
    """The run's ``model`` column: the one model, or each role's (``policy=…, j1=…``)."""
    if not getattr(lp.cfg, "uses_roles", lambda: False)():
        return lp.cfg.model
    return ", ".join(f"{r.name}={r.model}" for r in lp.roles())


def _finished_already(store: Store, kind: RunKind, lp: Loaded) -> bool:
    """A run recorded ``done`` under the id its engines' identities (known from files) give, whose
    inputs are unchanged since its chunk records were written: a rerun has nothing to do, so no engine
    starts (its chunk records and rows are all stored)."""
    fingerprints = kind.input_fingerprints(lp)
    ident = lp.expected_engine_model() if fingerprints else None
    if ident is None:
        return False
    lp.engine_model = ident
    status, config_hash = store.run_status(lp.run_id)
    if status != "done" or config_hash != lp.config_hash:
        return False
    for stage, fp in fingerprints.items():
        done = store.chunk_records(lp.run_id, stage)
        if fp is None or not done or any(m.get("fingerprint") != fp for m, _ in done.values()):
            return False
    return True


def _noop_summary(kind: "RunKind", lp: Loaded, start: float) -> Summary:
    """The summary of a finished run rerun with nothing to do (read from its row; no engine started)."""
    s = Summary(run_id=lp.run_id, db=str(lp.cfg.db), kind=kind.name, status="done")
    with Store(lp.cfg.db, read_only=True) as store:
        row = store.run_row(lp.run_id) or {}
        done = json.loads(row.get("summary_json") or "{}")
        s.pairs = store.count("run_pairs", "run_id = ?", [lp.run_id])
        s.prompts = store.count("run_prompts", "run_id = ?", [lp.run_id])
    s.skipped_jobs = int(done.get("written", 0)) + int(done.get("reused", 0))
    s.extra = {"noop": True}
    s.seconds = time.perf_counter() - start
    return s


def _finish(store: Store, lp: Loaded, kind: RunKind, summary: Summary, start: float) -> None:
    """Count the run's failed/skipped rows and input skips (SQL over the whole run), mark its status."""
    summary.seconds = time.perf_counter() - start
    try:
        for table, reason, status, n in store.failure_counts(lp.run_id, kind.tables):
            key = f"{table} {status}: {reason.split(';')[0]}"
            summary.failures[key] = summary.failures.get(key, 0) + n
        from .human import skip_reason

        for reason, n in store.input_skip_counts(lp.run_id):
            r = skip_reason(reason)
            summary.input_skips[r] = summary.input_skips.get(r, 0) + n
        stages: dict[str, dict] = {}
        for w in summary.stages:  # this invocation's rows, requests and seconds per table (engine start excluded)
            d = stages.setdefault(w.table, {"written": 0, "reused": 0, "requests": 0, "prompt_tokens": 0,
                                            "completion_tokens": 0, "seconds": 0.0})
            for k in d:
                d[k] += getattr(w, k)
        body = {"written": summary.written, "reused": summary.reused, "failures": summary.failures,
                "input_skips": sum(summary.input_skips.values()), "seconds": round(summary.seconds, 2),
                "stages": {t: {**d, "seconds": round(d["seconds"], 2)} for t, d in stages.items()},
                **summary.extra}
        store.finish_run(lp.run_id, summary.status, summary.error, body)
    except Exception:  # the store itself failed (disk full): the status could not be written; say so
        if summary.status == "done":
            raise
        summary.error = (summary.error or "") + " (the run's status could not be written to the database)"


def release(store: Store, owned: list) -> None:
    """Close the store (freeing the writer lock) and any engine the run built itself."""
    try:
        store.close()
    finally:
        for engine in owned:
            engine.close()


def _install_signals(ctx: RunContext) -> Callable[[], None]:
    """First SIGINT/SIGTERM: finish and write what completed, mark the run stopped; second: abort."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    count = {"n": 0}

    def handler(signum, frame):
        count["n"] += 1
        if count["n"] > 1:
            raise KeyboardInterrupt
        ctx.request_stop()
        if not ctx.quiet:
            from rich.console import Console

            Console(stderr=True).print(f"[yellow]stopping[/yellow] ({signal.Signals(signum).name}): writing what has "
                                       "completed; press Ctrl-C again to abort at once (nothing is lost either way)")

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    return lambda: [signal.signal(s, h) for s, h in old.items()] and None
