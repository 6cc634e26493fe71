"""Helpers for the streaming and fault-injection suites: input files, pipelines, child runs, database facts.

A child run is ``python -c <prelude> ... app()`` with ``factory run`` arguments: the prelude may
patch the factory in the child only (slow the fake engine down, announce commits), then it prints
``READY`` on stdout once everything a run needs is imported, so a test can time a kill or a signal from the
start of the run itself rather than from the interpreter's start.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest
from typer.testing import CliRunner

from conftest import REPO

WORDS = ("the of and to in is you that it he was for on are as with his they at be this have from or one had by "
         "word but not what all were we when your can said there use an each which she do how their if will up "
         "other about out many then them these so some her would make like him into time has look two more").split()


# -- inputs -------------------------------------------------------------------------------------------
def pair_records(n: int, *, seed: int = 0, chars: int = 160, start: int = 0) -> list[dict]:
    """``n`` distinct prompt/response_a/response_b records (``start`` numbers them on, for appending)."""
    rng = random.Random(seed * 1_000_003 + start)

    def text() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(chars // 4))[:chars]

    return [{"prompt": f"{start + i}: {text()}", "response_a": f"a{start + i} {text()}",
             "response_b": f"b{start + i} {text()}"} for i in range(n)]


def write_jsonl(path: Path, records: list[dict], mode: str = "w") -> Path:
    with open(path, mode) as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def prefs_yaml(path: Path, *, pairs: Path | str, db: Path, name: str = "f", per_pair: int = 2,
               chunk_inputs: int = 1024, chunk_rows: int = 1024, engine: str = "{kind: fake}",
               judge: str = "", source: str | None = None, extra: str = "") -> Path:
    """A prefs pipeline over a pairs file (or any ``source`` mapping) on the repo's constitution and judge."""
    src = source or f"{{source: file, path: {pairs}}}"
    path.write_text(f"""kind: prefs
name: {name}
constitution: {REPO}/constitutions/harmless.yaml
pairs: {src}
judge: {{template: {REPO}/prompts/judge.j2, per_pair: {per_pair}{', ' + judge if judge else ''}}}
answer_template: {REPO}/prompts/answer.j2
engine: {engine}
db: {db}
chunk_inputs: {chunk_inputs}
chunk_rows: {chunk_rows}
{extra}""")
    return path


def sl_yaml(path: Path, *, prompts: Path, db: Path, name: str = "s", rounds: int = 2, chunk_inputs: int = 1024,
            chunk_rows: int = 1024, principles: str = "{strategy: random, per_round: 2}") -> Path:
    path.write_text(f"""name: {name}
prompts: {{path: {prompts}}}
constitution: {REPO}/constitutions/harmless.yaml
templates: {{answer: {REPO}/prompts/answer.j2, critique: {REPO}/prompts/critique.j2, revise: {REPO}/prompts/revise.j2}}
model: smollm2-135m
engine: {{kind: fake}}
rounds: {rounds}
principles: {principles}
sampling:
  answer: {{max_tokens: 16}}
  critique: {{max_tokens: 16}}
  revise: {{max_tokens: 16}}
db: {db}
chunk_inputs: {chunk_inputs}
chunk_rows: {chunk_rows}
""")
    return path


# -- child runs ---------------------------------------------------------------------------------------
# Announce every committed write on stdout ("COMMIT <rows in the transaction>"), for tests that must
# signal a run that has really started writing.
ANNOUNCE_COMMITS = """
import factory.runner as _R
_flush = _R.Runner._flush
def _announced(self):
    n = self._buffered
    _flush(self)
    if n:
        print(f"COMMIT {n}", flush=True)
_R.Runner._flush = _announced
"""


def slow_fake(seconds: float) -> str:
    """A prelude making every fake-engine request take ``seconds`` (so a run lasts long enough to signal)."""
    return f"""
import time as _t
import factory.engines.fake as _F
_one = _F.FakeEngine._one
def _slow(self, req):
    _t.sleep({seconds})
    return _one(self, req)
_F.FakeEngine._one = _slow
"""


# What `factory run` imports lazily, imported before READY so that READY means "the run starts now".
PREIMPORT = "import duckdb, pyarrow, factory.runs, factory.prefs, factory.pipeline, factory.engines.fake"


def child(args: list[str], *, prelude: str = "", stdout=subprocess.PIPE) -> subprocess.Popen:
    """Start ``factory ARGS`` in a child process (see module docstring); stderr goes to a pipe too."""
    code = f"{prelude}\n{PREIMPORT}\nfrom factory.cli import app\nprint('READY', flush=True)\napp()\n"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "COLUMNS": "400", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=stdout, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=REPO)


def wait_line(proc: subprocess.Popen, prefix: str, timeout: float = 60.0) -> str:
    """Read the child's stdout until a line starting with ``prefix`` (fails if the child ends first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"child ended before printing {prefix!r}: rc {proc.wait()}, stderr:\n"
                                 f"{proc.stderr.read()[-3000:]}")
        if line.startswith(prefix):
            return line
    raise AssertionError(f"no {prefix!r} from the child within {timeout} s")


def finish(proc: subprocess.Popen, timeout: float = 120.0) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def peak_rss_run(args: list[str], *, prelude: str = "") -> tuple[int, float, str]:
    """Run ``factory ARGS`` in a child and reap it with ``os.wait4``: (exit code, the child's own peak RSS
    in MB, stderr tail)."""
    import tempfile

    code = f"{prelude}\nfrom factory.cli import app\napp()\n"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.DEVNULL, stderr=err, env=env,
                                cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        return proc.returncode, usage.ru_maxrss / 1024, err.read()[-3000:]


def kill9(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    return proc.returncode


# -- database facts -----------------------------------------------------------------------------------
def connect(db: Path) -> duckdb.DuckDBPyConnection:
    return duckdb.connect(str(db), read_only=True)


def query(db: Path, sql: str, params: list | None = None) -> list[tuple]:
    con = connect(db)
    try:
        return con.execute(sql, params or []).fetchall()
    finally:
        con.close()


def judgement_counts(db: Path) -> tuple[int, int]:
    """(rows, distinct ids) of ``judgements``; (0, 0) when the table is not there yet."""
    if not Path(db).exists():
        return 0, 0
    con = connect(db)
    try:
        if not con.execute("SELECT 1 FROM information_schema.tables WHERE table_name = 'judgements'").fetchall():
            return 0, 0
        return con.execute("SELECT count(*), count(DISTINCT id) FROM judgements").fetchone()
    finally:
        con.close()


def judgement_values(db: Path) -> dict[str, tuple]:
    """id -> (pair, principle, order, status, p_a) of every stored judgement."""
    return {r[0]: r[1:] for r in query(db, 'SELECT id, pair_id, principle_id, "order", status, p_a FROM judgements')}


def labels(db: Path) -> dict[str, tuple]:
    """pair_id -> (p_a, chosen) of every stored preference (one run per database in these tests)."""
    return {p: (a, c) for p, a, c in query(db, "SELECT pair_id, p_a, chosen FROM preferences")}


def same_labels(got: dict[str, tuple], want: dict[str, tuple]) -> list[str]:
    """Pairs whose label differs (or is missing on one side); p_a compared to 1e-12."""
    bad = [k for k in want.keys() | got.keys() if k not in got or k not in want]
    for k in want.keys() & got.keys():
        (pa, ca), (pb, cb) = got[k], want[k]
        if ca != cb or (pa is None) != (pb is None) or (pa is not None and not math.isclose(pa, pb, rel_tol=1e-12,
                                                                                            abs_tol=1e-12)):
            bad.append(k)
    return sorted(bad)


def run_status(db: Path) -> tuple[str, str | None]:
    return query(db, "SELECT status, error FROM runs ORDER BY started_at DESC LIMIT 1")[0]


# Columns that depend on when or as which run (or in which chunk) a row was made, not on what it is.
VOLATILE = {"created_at", "chunk", "run_id", "first_run_id", "done_at", "applied_at", "started_at", "finished_at"}
# Tables that describe the run itself, its chunking or the schema, not its results.
RUN_TABLES = {"runs", "chunks", "meta", "migrations"}


def table_rows(db: Path) -> dict[str, list[tuple]]:
    """Every result table's rows (volatile columns left out), sorted: for comparing two databases."""
    con = connect(db)
    try:
        out = {}
        for (t,) in con.execute("SELECT table_name FROM information_schema.tables ORDER BY 1").fetchall():
            if t in RUN_TABLES:
                continue
            cols = [c for (c,) in con.execute("SELECT column_name FROM information_schema.columns WHERE table_name = ? "
                                              "ORDER BY ordinal_position", [t]).fetchall() if c not in VOLATILE]
            sel = ", ".join(f'"{c}"' for c in cols)
            out[t] = [tuple(zip(cols, r)) for r in con.execute(f"SELECT {sel} FROM {t} ORDER BY ALL").fetchall()]
        return out
    finally:
        con.close()


def rows_differ(a: list[tuple], b: list[tuple]) -> str | None:
    """None when the two sorted row lists are equal (floats to 1e-12), else the first difference."""
    if len(a) != len(b):
        return f"{len(a)} rows vs {len(b)}"
    for x, y in zip(a, b):
        for (col, u), (_, v) in zip(x, y):
            if isinstance(u, float) and isinstance(v, float):
                if not math.isclose(u, v, rel_tol=1e-12, abs_tol=1e-12):
                    return f"column {col}: {u} vs {v} in {dict(x)}"
            elif u != v:
                return f"column {col}: {u!r} vs {v!r} in {dict(x)}"
    return None


# -- the fault suites' shared pieces ----------------------------------------------------------------------
RESULTS: list[dict] = []  # per case: fault, how injected, times, rows lost, rows duplicated


@pytest.fixture(scope="module", autouse=True)
def fault_report():
    """Print the per-case counts after a module (and append them to $FACTORY_FAULT_REPORT); a fault
    module imports this fixture."""
    yield
    if not RESULTS:
        return
    lines = [f"{'fault':<44} {'how injected':<58} {'times':>5} {'lost':>5} {'dup':>5}"]
    lines += [f"{r['fault']:<44} {r['how']:<58} {r['times']:>5} {r['lost']:>5} {r['duplicated']:>5}" for r in RESULTS]
    print("\nfault-injection results\n" + "\n".join(lines))
    out = os.environ.get("FACTORY_FAULT_REPORT")
    if out:
        with open(out, "a") as f:
            for r in RESULTS:
                f.write(json.dumps(r) + "\n")
    RESULTS.clear()


def record(fault: str, how: str, times: int, lost: int, duplicated: int) -> None:
    RESULTS.append({"fault": fault, "how": how, "times": times, "lost": lost, "duplicated": duplicated})


def fake(**kw):
    from factory.engines.fake import FakeEngine

    return FakeEngine(model="smollm2-135m", **kw)


@pytest.fixture
def wide(monkeypatch):
    """The CLI's consoles wide enough that paths and messages are not wrapped in captured output."""
    from factory import cli

    # the private field, so that undoing restores "no fixed width" (undoing the `width` property would
    # fix the width at whatever the console measured when the test started)
    monkeypatch.setattr(cli.console, "_width", 1000)
    monkeypatch.setattr(cli.err, "_width", 1000)


def invoke(args: list[str]):
    """``factory ARGS`` in-process: (exit code, output, exception)."""
    from factory import cli

    r = CliRunner().invoke(cli.app, [str(a) for a in args])
    return r.exit_code, r.output, r.exception


class Reference:
    """An uninterrupted run of a pipeline into its own database: what every faulted run must equal."""

    def __init__(self, path: Path, db: Path, engine=None):
        from factory import prefs

        prefs.run(path, engine=engine, quiet=True)  # engine None: the pipeline's own (a server, say)
        self.db, self.values, self.labels = db, judgement_values(db), labels(db)
        assert self.values and self.labels

    @classmethod
    def of(cls, tmp: Path, pairs: Path, *, per_pair: int, **kw) -> "Reference":
        """The same file pairs on the fake engine, in ``tmp/reference/``."""
        d = tmp / "reference"
        d.mkdir()
        db = d / "ref.duckdb"
        return cls(prefs_yaml(d / "ref.yaml", pairs=pairs, db=db, per_pair=per_pair, **kw), db, fake())

    def compare(self, db: Path) -> tuple[int, int]:
        """(lost, duplicated) judgements of ``db``; asserts values and labels equal the reference's."""
        n, distinct = judgement_counts(db)
        got = judgement_values(db)
        lost, dup = len(self.values.keys() - got.keys()), n - distinct
        assert not got.keys() - self.values.keys(), "rows the uninterrupted run does not have"
        changed = [k for k in self.values.keys() & got.keys() if got[k] != self.values[k]]
        assert not changed, f"{len(changed)} judgements differ from the uninterrupted run, e.g. {got[changed[0]]}"
        bad = same_labels(labels(db), self.labels)
        assert not bad, f"{len(bad)} labels differ from the uninterrupted run"
        return lost, dup


def finished_chunks_complete(db: Path, per_pair: int) -> None:
    """Every input chunk recorded as finished has all its judgements stored (no partial chunk)."""
    for meta, in query(db, "SELECT meta_json FROM chunks"):
        m = json.loads(meta)
        want, got = query(db, """SELECT count(DISTINCT p.pair_id) * ?, count(j.id) FROM run_pairs p
                                 LEFT JOIN judgements j ON j.pair_id = p.pair_id
                                 WHERE p.source_row BETWEEN ? AND ?""", [2 * per_pair, m["first"], m["last"]])[0]
        assert got == want, f"chunk at lines {m['first']}-{m['last']} is recorded as finished with {got}/{want} judgements"


