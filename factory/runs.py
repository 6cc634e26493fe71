"""The one run lifecycle, and the registry of run kinds.

Every kind of run (``sl`` critique→revise, ``prefs`` AI preference labels, ``audit`` labels vs
human labels) goes through :func:`run`: load and check the pipeline file, take the database's
writer lock and record the run, build the engine (or borrow the caller's) when the kind first needs
it, stream the kind's stages through :class:`~factory.runner.Runner`, finish the run with its counts
and status (``done``, ``stopped`` after Ctrl-C/SIGTERM, ``failed`` with the reason), and release
the lock and any engine it built. A kind is one :class:`RunKind` registered by name in ``KINDS``;
``factory run``, ``validate``, ``render`` and ``show`` look kinds up there and nowhere else.

Resume is not a mode: the run id hashes everything that decides what the run makes (pipeline,
constitution, templates; not operational knobs like ``chunk_rows``), so rerunning the same command
continues the same run, skipping finished input chunks and stored rows.
"""

from __future__ import annotations

import importlib
import json
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from .constitution import Constitution
from .engines import Engine, ensure_engine
from .runner import EngineFailed, InputChunk, Runner, TableStats
from .store import Store, StoreError, now
from .templates import Template

# kind name -> module defining ``KIND`` (imported only when a pipeline of that kind is used)
KIND_MODULES = {"sl": "factory.pipeline", "prefs": "factory.prefs", "audit": "factory.audit.run",
                "recipe": "factory.recipes.kind"}  # issue 23: a recipe (standalone: its own lifecycle of many steps)
# config keys that change how a run is executed, not what it makes: left out of the run id
OPERATIONAL = ("chunk_rows", "chunk_inputs")


@dataclass
class Loaded:
    """A pipeline with everything it names loaded and checked (no engine, no database yet)."""

    path: str
    kind: str
    cfg: Any
    constitution: Constitution
    templates: dict[str, Template]
    # what answers (the engine's identity): part of the run id, so the same pipeline run with another
    # engine (a trial on the fake engine, a retrained checkpoint, another served model) is another run
    engine_model: str | None = None

    @property
    def run_id(self) -> str:
        return f"{self.cfg.name}-{self.config_hash[:10]}"

    @property
    def config_hash(self) -> str:
        from .store import content_key

        body = {k: v for k, v in self.cfg.snapshot().items() if k not in OPERATIONAL + getattr(self.cfg, "NOT_IDENTITY", ())}
        return content_key(self.kind, body, self.constitution.hash, {k: t.hash for k, t in self.templates.items()},
                           self.engine_model)

    def expected_engine_model(self) -> str | None:
        """The engine identity known without starting the engine (for `factory validate`): fake, or a
        local model folder's fingerprint; None where only the engine can say (a server's model)."""
        from . import models

        kind = self.cfg.engine.kind
        if kind == "fake":
            return f"fake:{self.cfg.model}"
        if kind in ("vllm", "ray"):
            try:
                return models.identity(self.cfg.model, models.resolve(self.cfg.model, pull=False))
            except (models.ModelError, OSError):
                return None
        return None


@dataclass
class Summary:
    """What a run did in this invocation (``stages``), and its totals from the database."""

    run_id: str
    db: str
    kind: str = ""
    status: str = "running"
    error: str | None = None
    stages: list[TableStats] = field(default_factory=list)
    input_skips: dict[str, int] = field(default_factory=dict)  # reason -> rows (the whole run)
    prompts: int = 0
    pairs: int = 0
    seconds: float = 0.0
    failures: dict[str, int] = field(default_factory=dict)  # "table status: reason" -> rows (the whole run)
    labels: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    skipped_chunks: int = 0  # input chunks finished by an earlier invocation: not read again
    skipped_jobs: int = 0  # the jobs those chunks had

    @property
    def written(self) -> int:
        return sum(w.written for w in self.stages)

    @property
    def reused(self) -> int:
        """Rows this invocation did not have to make: found stored, or in finished chunks."""
        return sum(w.reused for w in self.stages) + self.skipped_jobs

    @property
    def requests(self) -> int:
        return sum(w.requests for w in self.stages)

    @property
    def completion_tokens(self) -> int:
        return sum(w.completion_tokens for w in self.stages)

    @property
    def prompt_tokens(self) -> int:
        return sum(w.prompt_tokens for w in self.stages)


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


def kind_of(path: str | Path) -> str:
    from .yamlconf import load_yaml_data

    data, _ = load_yaml_data(path)
    kind = data.get("kind", "sl") if isinstance(data, dict) else "sl"
    return kind if isinstance(kind, str) else "sl"


def get_kind(name: str) -> RunKind:
    if name not in KIND_MODULES:
        raise StoreError(f"unknown pipeline kind '{name}'; use one of {', '.join(KIND_MODULES)}")
    return importlib.import_module(KIND_MODULES[name]).KIND


def load(path: str | Path) -> tuple[RunKind, Loaded]:
    """The kind of the pipeline file at ``path`` and the pipeline, loaded and checked."""
    k = get_kind(kind_of(path))
    return k, k.load(path)


class RunContext:
    """What a kind's ``execute`` works with: the open store, the loaded pipeline, the engine (built on
    first use), the summary, and :meth:`stream` to run jobs through the engine."""

    def __init__(self, lp: Loaded, store: Store, summary: Summary, *, engine: Engine, owned: list[Engine],
                 quiet: bool, retry_failed: bool, options: dict[str, Any]):
        self.lp, self.store, self.summary = lp, store, summary
        self.quiet, self.retry_failed, self.options = quiet, retry_failed, options
        self.owned = owned
        self._engine = engine
        self.runner: Runner | None = None
        self.stop_requested = False
        self.own_runs: list[str] = []  # other run ids this run makes rows under (an audit's naive pass)

    @property
    def run_id(self) -> str:
        return self.lp.run_id

    def engine(self) -> Engine:
        return self._engine

    def stream(self, stage: str, inputs: Iterable[InputChunk], *, progress: Callable[[], float | None] = lambda: None,
               own_runs: Iterable[str] = (), full_probe: bool = False) -> Runner:
        """Run the jobs of ``inputs`` (and their follow-ups) through the engine into the store."""
        cfg = self.lp.cfg
        self.runner = Runner(self.store, self.engine(), self.run_id, stage=stage, chunk_rows=cfg.chunk_rows,
                             retry_failed=self.retry_failed, own_runs=own_runs, full_probe=full_probe,
                             progress=progress, quiet=self.quiet)
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
        rows = self.store.con.execute("SELECT chunk, meta_json, n_jobs FROM chunks WHERE run_id = ? AND stage = ?",
                                      [self.run_id, stage]).fetchall()
        done = {i: (json.loads(m), n) for i, m, n in rows}
        engine = self.engine().model
        if any(m.get("fingerprint") != fingerprint or m.get("engine", engine) != engine for m, _ in done.values()):
            self.store.con.execute("DELETE FROM chunks WHERE run_id = ? AND stage = ?", [self.run_id, stage])
            return {}, True
        full = False
        if self.retry_failed and done:
            failed, linked = self._failed_chunks()
            full = linked  # failed rows this run reused from another run: their chunks are unknown here
            done = {} if linked else {i: v for i, v in done.items() if i not in failed}
        self.summary.skipped_chunks += len(done)
        self.summary.skipped_jobs += sum(n for _, n in done.values())
        return {i: m for i, (m, _) in done.items()}, full

    def _failed_chunks(self) -> tuple[set[int], bool]:
        """The input chunks with failed rows this run made, and whether it uses failed rows it did not make."""
        kind = get_kind(self.lp.kind)
        own_ids = [self.run_id, *self.own_runs]
        failed: set[int] = set()
        linked = False
        for table in kind.tables:
            failed |= {c for (c,) in self.store.con.execute(
                f"SELECT DISTINCT chunk FROM {table} WHERE status = 'failed' AND run_id IN ({', '.join('?' * len(own_ids))})",
                own_ids).fetchall()}
            linked = linked or bool(self.store.one(
                f"""SELECT 1 FROM {table} t SEMI JOIN run_items i ON i.id = t.id AND i."table" = '{table}'
                    AND i.run_id = ? WHERE t.status = 'failed' LIMIT 1""", [self.run_id]))
        return failed, linked

    def request_stop(self) -> None:
        self.stop_requested = True
        if self.runner is not None:
            self.runner.request_stop()


class _Stopped(Exception):
    """The run stopped on request (first Ctrl-C / SIGTERM) after writing what had completed."""


def run(path: str | Path, *, engine: Engine | None = None, quiet: bool = False, retry_failed: bool = False,
        **options: Any) -> Summary:
    """Run (or resume) the pipeline at ``path``, whatever its kind. ``options`` go to the kind
    (e.g. an audit's ``naive_principle``)."""
    standalone = get_kind(kind_of(path))
    if getattr(standalone, "standalone", False):  # issue 23: a recipe runs its steps itself
        return standalone.run_path(path, quiet=quiet, retry_failed=retry_failed, **options)
    kind, lp = load(path)
    start = time.perf_counter()
    # the writer lock first (a second process learns at once that the database is busy), then the
    # engine (its identity completes the run id), then the run's row
    store = Store(lp.cfg.db, writer_run=lp.run_id, run_memory=True)
    owned: list[Engine] = []
    try:
        engine = ensure_engine(engine, lp.cfg.engine, lp.cfg.model, owned)
        lp.engine_model = engine.model
        store.relabel_lock(lp.run_id)
        record_run(store, lp, engine)
    except BaseException:
        release(store, owned)
        raise
    summary = Summary(run_id=lp.run_id, db=str(lp.cfg.db), kind=kind.name)
    ctx = RunContext(lp, store, summary, engine=engine, owned=owned, quiet=quiet, retry_failed=retry_failed,
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


def record_run(store: Store, lp: Loaded, engine: Engine) -> None:
    """Record the run, its lineage blobs and what answers (the engine's identity and capabilities)."""
    c = lp.constitution
    store.put_config("constitution", c.model_dump(), key=c.hash)
    for t in lp.templates.values():
        store.put_config("template", {"path": t.path, "source": t.source}, key=t.hash)
    store.con.execute(
        """INSERT OR IGNORE INTO runs (run_id, name, kind, pipeline_path, config_hash, config_json, constitution_name,
           constitution_version, constitution_hash, model, engine_json, started_at, status)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'running')""",
        [lp.run_id, lp.cfg.name, lp.kind, lp.path, lp.config_hash, json.dumps(lp.cfg.snapshot()), c.name, c.version,
         c.hash, lp.cfg.model, lp.cfg.engine.model_dump_json(), now()],
    )
    caps = getattr(engine, "capabilities", None)
    lineage = {"engine_model": engine.model, "engine_seed": engine.seed,
               "capabilities": caps.__dict__ if caps is not None else None}
    store.con.execute("UPDATE runs SET status = 'running', error = NULL, lineage_json = ? WHERE run_id = ?",
                      [json.dumps(lineage, default=str), lp.run_id])


def _finish(store: Store, lp: Loaded, kind: RunKind, summary: Summary, start: float) -> None:
    """Count the run's failed/skipped rows and input skips (SQL over the whole run), mark its status."""
    summary.seconds = time.perf_counter() - start
    try:
        for table in kind.tables:
            for reason, status, n in store.con.execute(
                    f"""SELECT coalesce(t.error, ''), t.status, count(*) FROM {store.run_rows(table, '$run')} t
                        WHERE t.status <> 'ok' GROUP BY 1, 2""", {"run": lp.run_id}).fetchall():
                key = f"{table} {status}: {reason.split(';')[0]}"
                summary.failures[key] = summary.failures.get(key, 0) + n
        from .human import skip_reason

        for reason, n in store.con.execute("SELECT reason, count(*) FROM skips WHERE run_id = ? GROUP BY 1",
                                           [lp.run_id]).fetchall():
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
        store.con.execute("UPDATE runs SET status = ?, error = ?, finished_at = ?, summary_json = ? WHERE run_id = ?",
                          [summary.status, summary.error, now(), json.dumps(body, default=str), lp.run_id])
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
