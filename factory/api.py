"""The Python API: what the ``factory`` command does, callable from a notebook or a script.

Everything here is re-exported by :mod:`factory` (``import factory; factory.run(...)``) and
imports nothing heavy until it is called::

    import factory

    summary = factory.run("pipelines/hh-prefs.yaml", **{"pairs.limit": 10, "engine": {"kind": "fake"}})
    db = factory.open(summary.db)
    db.runs()                                  # pyarrow.Table, one row per run
    db.preferences(summary.run_id)             # pandas.DataFrame, one row per labelled pair
    factory.export("prefs", summary.db, summary.run_id, "data/exports/hh", require_audit="kappa>=0.2")

Overrides: ``factory.run(path, **overrides)`` changes the pipeline before it runs, without writing
a file. A key is a top-level key of the pipeline (``db="x.duckdb"``, ``engine={"kind": "fake"}``) or
a dotted path (``**{"pairs.limit": 10}``); a dict value is merged into the mapping it names
(``judge={"per_pair": 2}`` keeps the file's other judge keys). The run id is the one the changed
pipeline would have as a file.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Mapping

if TYPE_CHECKING:  # pragma: no cover
    import pandas
    import pyarrow as pa

    from .engines import Engine
    from .export import ExportResult
    from .runs import Summary


from .store import StoreError  # noqa: E402  (duckdb/pyarrow: the API reads databases anyway)


class ApiError(StoreError):
    """A misuse of the Python API that the message explains (an unknown table, a bad override)."""


# ---------------------------------------------------------------------------------------- run


def _merge(data: dict, key: str, value: Any) -> None:
    """Set ``key`` (dotted) in ``data``; a dict value is merged into an existing mapping."""
    *parents, last = key.split(".")
    node = data
    for i, part in enumerate(parents):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ApiError(f"override {key!r}: {'.'.join(parents[:i + 1])!r} is not a mapping in the pipeline")
        node = nxt
    if isinstance(value, Mapping) and isinstance(node.get(last), dict):
        for k, v in value.items():
            _merge(node[last], str(k), v)
    else:
        node[last] = dict(value) if isinstance(value, Mapping) else value


def apply_overrides(data: Any, overrides: Mapping[str, Any]) -> Any:
    """A copy of a pipeline's data with ``overrides`` applied (see the module docstring)."""
    import copy

    if not isinstance(data, dict):
        raise ApiError("overrides apply to a pipeline file whose top level is a mapping")
    out = copy.deepcopy(data)
    for key, value in overrides.items():
        _merge(out, key, value)
    return out


@contextlib.contextmanager
def overridden(path: str | Path, overrides: Mapping[str, Any]):
    """While inside, reading the pipeline file at ``path`` gives its data with ``overrides`` applied."""
    from .yamlconf import OVERLAY

    if not overrides:
        yield
        return
    target = Path(path).resolve()
    token = OVERLAY.set(lambda p, data: apply_overrides(data, overrides) if Path(p).resolve() == target else data)
    try:
        yield
    finally:
        OVERLAY.reset(token)


MAIN_GUARD = ("factory.run() was called while a worker process was importing your script {script} again: "
              "vLLM on CPU starts its engine in a spawned process, and a spawned process re-imports the main "
              "module, so a run at the top level of a script starts again in the worker. Put the call under "
              "`if __name__ == \"__main__\":` (or run it from a notebook, `python -c`, or `factory run`).")


def _check_not_bootstrapping() -> None:
    """Refuse to start a run inside a spawned process that is still importing the parent's main module
    (what multiprocessing's own check says for Process.start, in words that name the fix)."""
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        import sys

        script = getattr(sys.modules.get("__main__"), "__file__", None) or "(the main module)"
        raise ApiError(MAIN_GUARD.format(script=script))


def run(path: str | Path, *, quiet: bool = True, retry_failed: bool = False, verbose: bool = False,
        engine_instance: "Engine | None" = None, **overrides: Any) -> "Summary":
    """Run (or resume) the pipeline at ``path``; return its :class:`~factory.runs.Summary`.

    Args:
        path: a pipeline YAML (any kind: ``sl``, ``prefs``, ``audit``).
        quiet: no progress bar (the default here; the CLI shows one).
        retry_failed: run rows stored as failed again.
        verbose: let vLLM log at its own level (it is quiet otherwise).
        engine_instance: an engine already started (reused across runs in one process).
        **overrides: changes to the pipeline (module docstring), e.g. ``**{"pairs.limit": 10}``.

    Example:
        >>> s = factory.run("pipelines/hh-prefs.yaml", **{"pairs.limit": 8, "engine": {"kind": "fake"}})  # doctest: +SKIP
        >>> s.run_id, s.status  # doctest: +SKIP
        ('hh-prefs-…', 'done')

    The summary's ``extra["cost"]`` holds the run's tokens (and $ where ``engine.price`` is set).
    """
    _check_not_bootstrapping()
    quiet_engines(verbose)
    from .kinds import run as run_any

    with overridden(path, overrides):
        summary = run_any(path, engine=engine_instance, quiet=quiet, retry_failed=retry_failed)
        price = _price_of(path)
    from .results import record_cost

    with contextlib.suppress(Exception):  # the cost is a report: never fail a finished run over it
        summary.extra["cost"] = record_cost(summary.db, summary.run_id, price)
    return summary


def _price_of(path: str | Path) -> dict | None:
    from .kinds import load

    _, lp = load(path)
    price = getattr(getattr(getattr(lp, "cfg", None), "engine", None), "price", None)  # a recipe has none of its own
    return price.model_dump() if price is not None else None


def quiet_engines(verbose: bool = False) -> None:
    """vLLM's own logging (start-up banners, Triton/NUMA notices, leaked-semaphore warnings) at ERROR
    unless ``verbose``; set before vLLM is imported, inherited by its worker processes."""
    import logging
    import os

    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout keeps the results (`run --json`)
    if verbose:
        os.environ["VLLM_LOGGING_LEVEL"] = "INFO"
        os.environ.pop("FACTORY_QUIET_VLLM", None)
        return
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # torch's C++ notices (NUMA binding)
    os.environ["FACTORY_QUIET_VLLM"] = "1"  # read by factory/__init__ in vLLM's spawned workers, and the engine
    # vLLM warns before it configures its logging (Triton on CPU): the logger's level stops those too
    logging.getLogger("vllm").setLevel(logging.ERROR)
    have = os.environ.get("PYTHONWARNINGS", "")
    for warn in ("ignore::UserWarning:multiprocessing.resource_tracker",  # leaked semaphores at exit
                 "ignore::FutureWarning:vllm.triton_utils.dispatcher"):  # torch.distributed.reduce_op
        if warn not in have:
            have = f"{have},{warn}" if have else warn
    os.environ["PYTHONWARNINGS"] = have


def summary_dict(summary: "Summary") -> dict[str, Any]:
    """A run's summary as plain JSON-able data (``factory run --json``)."""
    d = {k: v for k, v in asdict(summary).items() if k != "stages"}
    d["stages"] = [asdict(s) for s in summary.stages]
    d.update(written=summary.written, reused=summary.reused, requests=summary.requests,
             prompt_tokens=summary.prompt_tokens, completion_tokens=summary.completion_tokens)
    return json.loads(json.dumps(d, default=str))


# ------------------------------------------------------------------------------------ reading

AS = Literal["pandas", "arrow", "dataset"]


def _convert(table: "pa.Table", as_: AS):
    if as_ == "arrow":
        return table
    if as_ == "pandas":
        return table.to_pandas()
    if as_ == "dataset":
        import datasets

        return datasets.Dataset(table)
    raise ApiError(f"as_ must be 'pandas', 'arrow' or 'dataset'; got {as_!r}")


class Database:
    """A factory database (DuckDB file), read-only. Each call opens and closes the file, so a run may
    write to it between calls (DuckDB refuses readers while a run holds it).

    Example:
        >>> db = factory.open("data/hh.duckdb")  # doctest: +SKIP
        >>> db.runs().column("run_id").to_pylist()  # doctest: +SKIP
        >>> db.preferences("hh-prefs-6857ef6484").head()  # doctest: +SKIP
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise ApiError(f"{self.path}: no such database; run a pipeline first (`factory.run(...)`)")

    def __repr__(self) -> str:
        return f"Database({str(self.path)!r})"

    @contextlib.contextmanager
    def store(self):
        """The underlying :class:`~factory.store.Store`, read-only (for SQL of your own)."""
        from .store import Store

        with Store(self.path, read_only=True) as s:
            yield s

    def sql(self, query: str, params: Any = None) -> "pa.Table":
        """Any read-only SQL over the database, as a pyarrow Table."""
        with self.store() as s:
            return s.con.sql(query, params=params).to_arrow_table()

    def tables(self) -> list[str]:
        """The tables in the database."""
        with self.store() as s:
            return [r[0] for r in s.con.execute("SELECT table_name FROM information_schema.tables "
                                                "WHERE table_schema = 'main' ORDER BY 1").fetchall()]

    def runs(self) -> "pa.Table":
        """One row per run: id, name, kind, status, model, constitution (name, version, hash), times, error."""
        return self.sql("""SELECT run_id, name, kind, status, model, constitution_name, constitution_version,
                                  constitution_hash, pipeline_path, started_at, finished_at, error
                           FROM runs ORDER BY started_at, run_id""")

    def rows(self, table: str, run: str | None = None) -> "pa.Table":
        """The rows of ``table`` (all, or those that belong to ``run``: rows it made or reused, the
        pairs and prompts it listed; :meth:`factory.store.Store.run_rows`)."""
        from .store import MEMBERSHIP

        with self.store() as s:
            cols = {c for (c,) in s.con.execute("SELECT column_name FROM information_schema.columns "
                                                "WHERE table_schema = 'main' AND table_name = ?", [table]).fetchall()}
            if not cols:
                raise ApiError(f"{self.path}: no table {table!r}; tables: {', '.join(self._tables(s))}")
            if run is None:
                return s.con.sql(f'SELECT * FROM "{table}"').to_arrow_table()
            self._check_run(s, run)
            if table in MEMBERSHIP or {"id", "run_id"} <= cols:
                return s.con.sql(f"SELECT * FROM {s.run_rows(table, '$run')}", params={"run": run}).to_arrow_table()
            if "run_id" in cols:
                return s.con.sql(f'SELECT * FROM "{table}" WHERE run_id = ?', params=[run]).to_arrow_table()
            raise ApiError(f"table {table!r} has no run membership; call rows({table!r}) without run=")

    @staticmethod
    def _tables(s) -> list[str]:
        return [r[0] for r in s.con.execute("SELECT table_name FROM information_schema.tables "
                                            "WHERE table_schema = 'main' ORDER BY 1").fetchall()]

    def _check_run(self, s, run: str) -> None:
        if not s.one("SELECT 1 FROM runs WHERE run_id = ?", [run]):
            known = [r[0] for r in s.con.execute("SELECT run_id FROM runs ORDER BY started_at").fetchall()]
            raise ApiError(f"{self.path}: no run {run!r}; runs: {', '.join(known) or 'none'}")

    def _one_run(self, s, run: str | None, kind: str) -> str:
        if run is not None:
            self._check_run(s, run)
            return run
        runs = [r[0] for r in s.con.execute("SELECT run_id FROM runs WHERE kind = ? ORDER BY started_at", [kind]).fetchall()]
        if len(runs) != 1:
            raise ApiError(f"{self.path}: {len(runs)} {kind} runs ({', '.join(runs) or 'none'}); pass run=")
        return runs[0]

    def preferences(self, run: str | None = None, *, truncate: int | None = 200, as_: AS = "pandas"):
        """One row per labelled pair: the prompt and both responses (truncated to ``truncate`` characters;
        None keeps them whole), the label (chosen, p_a, margin, is_tie, orders_agree, principles_agree)
        and one ``p_<principle>`` column per principle (docs: Preference labels).

        Example:
            >>> db.preferences("hh-prefs-6857ef6484")[["chosen", "p_a", "margin"]].describe()  # doctest: +SKIP
        """
        from .results import labels_table

        with self.store() as s:
            return _convert(labels_table(s, self._one_run(s, run, "prefs"), truncate=truncate), as_)

    def revisions(self, run: str | None = None, *, as_: AS = "pandas"):
        """The revisions of an SL run with their prompt: prompt_id, round, principle_ids, prompt, text, status."""
        with self.store() as s:
            run = self._one_run(s, run, "sl")
            t = s.con.sql(f"""SELECT r.id, r.prompt_id, r.round, r.principle_ids,
                                         json_extract_string(p.messages, '$[#-1].content') AS prompt, r.text,
                                         r.status, r.error, r.model, r.prompt_tokens, r.completion_tokens
                                  FROM {s.run_rows('revisions', '$run')} r LEFT JOIN prompts p USING (prompt_id)
                                  ORDER BY r.prompt_id, r.round""", params={"run": run}).to_arrow_table()
            return _convert(t, as_)

    def judgements(self, run: str | None = None, *, as_: AS = "pandas"):
        """The judgements of a run: one row per (pair, principle, order), with p_a and status."""
        with self.store() as s:
            run = self._one_run(s, run, "prefs")
            t = s.con.sql(f"""SELECT id, pair_id, principle_id, "order", p_first, p_a, status, error, model,
                                         prompt_tokens, completion_tokens
                                  FROM {s.run_rows('judgements', '$run')} ORDER BY pair_id, principle_id, "order" """,
                              params={"run": run}).to_arrow_table()
            return _convert(t, as_)

    def audits(self, run: str | None = None) -> "pa.Table":
        """Stored audits (of ``run``, or all): id, run, human set, date, agreement, κ, report."""
        return self.sql("""SELECT audit_id, run_id, set_id, created_at,
                                  (result_json::JSON->'overall'->>'agreement')::DOUBLE AS agreement,
                                  (result_json::JSON->'overall'->>'cohen_kappa')::DOUBLE AS kappa,
                                  (result_json::JSON->'overall'->>'n_pairs')::BIGINT AS n_pairs, report_path
                           FROM audits WHERE $run IS NULL OR run_id = $run ORDER BY created_at""", {"run": run})


def open(db_path: str | Path) -> Database:  # noqa: A001 - the API's name (factory.open)
    """The factory database at ``db_path``, for reading (see :class:`Database`).

    Example:
        >>> db = factory.open("data/demo.duckdb")  # doctest: +SKIP
        >>> db.rows("revisions").num_rows  # doctest: +SKIP
    """
    return Database(db_path)


# ----------------------------------------------------------------------------- audit / export


@dataclass
class Audit:
    """A stored audit: its id, the report's path and the result (agreement, κ, biases per block)."""

    audit_id: str
    report: Path
    result: Any  # factory.audit.metrics.AuditResult
    cost: dict | None = None  # tokens and $ of the audited run (factory.results.run_cost)

    @property
    def agreement(self) -> float:
        return self.result.overall.agreement

    @property
    def kappa(self) -> float:
        return self.result.overall.cohen_kappa


def audit(pipeline: str | Path | None = None, *, db: str | Path | None = None, run: str | None = None,
          human: str | None = None, quiet: bool = True, **options: Any) -> Audit:
    """Audit AI labels against human labels: an audit pipeline (judging what is missing), or the stored
    judgements of ``run`` in ``db`` against an imported human set ``human``.

    Example:
        >>> a = factory.audit("pipelines/hh-audit.yaml")  # doctest: +SKIP
        >>> a.agreement, a.kappa  # doctest: +SKIP
    """
    _check_not_bootstrapping()
    quiet_engines(False)
    from .audit.run import audit as run_audit

    audit_id, result, report = run_audit(pipeline, db=db, run_id=run, human_set=human, quiet=quiet, **options)
    out = Audit(audit_id, Path(report), result)
    with contextlib.suppress(Exception):  # the cost of the audited run's labels (a report: never fails the audit)
        from .results import record_cost
        from .store import Store

        if pipeline is not None:
            from .kinds import load

            db = load(pipeline)[1].cfg.db
        with Store(db, read_only=True) as s:
            audited = s.one("SELECT run_id FROM audits WHERE audit_id = ?", [audit_id])[0]
        out.cost = record_cost(db, audited, _price_of(pipeline) if pipeline is not None else None)
    return out


def export(kind: Literal["prefs", "sft", "human"], db: str | Path | None, run: str | None, out: str | Path, *,
           require_audit: str | None = None, push_to_hub: str | None = None, **options: Any) -> "ExportResult":
    """Export a run as a Hugging Face dataset folder with a dataset card (``README.md``) and ``export.json``.

    Args:
        kind: ``prefs`` (prompt/chosen/rejected), ``sft`` (messages) or ``human`` (``db`` is then the
            human pairs file and ``run`` is None).
        require_audit: a bar such as ``"kappa>=0.2"`` or ``"agreement>=0.6"``: refuse labels whose latest
            audit falls below it or that have no audit (``prefs`` only).
        push_to_hub: a Hub dataset repo id: push through ``datasets`` (needs ``HF_TOKEN``).
        **options: the kind's filters (``min_confidence``, ``position_consistent_only``, ``principles``, …).

    Example:
        >>> r = factory.export("prefs", "data/hh.duckdb", "hh-prefs-6857ef6484", "data/exports/hh",
        ...                    require_audit="kappa>=0.2")  # doctest: +SKIP
    """
    from .export import export_human, export_prefs, export_sft

    if kind == "prefs":
        if require_audit:
            from .card import check_gate

            check_gate(db, run, require_audit)
        result = export_prefs(db, run, out, **options)
    elif kind == "sft":
        result = export_sft(db, run, out, **options)
    elif kind == "human":
        result = export_human(db, out, **options)
    else:
        raise ApiError(f"unknown export kind {kind!r}; use prefs, sft or human")
    if push_to_hub:
        from .card import push

        push(result.out, push_to_hub)
    return result


__all__ = ["ApiError", "Audit", "Database", "apply_overrides", "audit", "export", "open", "quiet_engines", "run",
           "summary_dict"]
