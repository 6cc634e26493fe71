"""Run (or continue) a recipe: each (step, round) in order, skipped when a step of the same identity
finished before, otherwise run and recorded; then the report across rounds.

Resume is not a mode: after a crash or kill -9 the same command finds the finished steps by identity
and re-enters the interrupted one, which continues by content (a run skips its stored rows and
finished chunks; training resumes from its last checkpoint; a behavioural eval skips stored rows).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from . import state
from .spec import POLICY, Recipe, load_recipe
from .steps import KINDS, Node, StepStopped, policy_input


@dataclass
class StepResult:
    step: str
    round: int
    identity: str
    status: str  # done | skipped | stopped | failed
    seconds: float = 0.0
    output: dict = field(default_factory=dict)
    error: str | None = None


@dataclass
class RecipeSummary:
    name: str
    db: str
    kind: str = "recipe"
    status: str = "running"
    error: str | None = None
    steps: list[StepResult] = field(default_factory=list)
    seconds: float = 0.0
    report: dict | None = None

    @property
    def run_id(self) -> str:
        return self.name

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.steps:
            out[s.status] = out.get(s.status, 0) + 1
        return out

    def table(self):
        from rich.table import Table

        t = Table(title=f"recipe {self.name} ({self.status})", show_edge=False)
        for c in ("step", "round", "identity", "status", "seconds", "output"):
            t.add_column(c)
        for s in self.steps:
            shown = s.error or str(s.output.get("value", ""))
            t.add_row(s.step, str(s.round or "once"), s.identity[:10], s.status, f"{s.seconds:.1f}", shown[:80])
        return t


def _inputs(recipe: Recipe, node_step: str, rnd: int, outputs: dict) -> dict[str, dict]:
    got: dict[str, dict] = {}
    for e in recipe.steps[node_step].deps:
        if e.dst == POLICY:
            got[POLICY] = policy_input(recipe, rnd, outputs)
        else:
            got[e.dst] = outputs[(e.dst, 0 if recipe.steps[e.dst].once else rnd)]
    return got


def _exists(output: dict) -> bool:
    """A finished step's files are still there (a deleted export or model folder is made again)."""
    v = output.get("value")
    if isinstance(v, str) and ("/" in v) and not output.get("run_id"):
        return Path(v).exists()
    return True


def run_recipe(path: str | Path, *, quiet: bool = False, report: bool = True, retry_failed: bool = False) -> RecipeSummary:
    """Run (or continue) the recipe at ``path``; ``retry_failed`` goes to its run steps that run now."""
    recipe = load_recipe(path)
    cfg = recipe.cfg
    summary = RecipeSummary(cfg.name, cfg.db)
    start = time.perf_counter()
    outputs: dict[tuple[str, int], dict] = {}
    say = (lambda *a: None) if quiet else _say
    try:
        for sid, rnd in recipe.nodes():
            step = recipe.steps[sid]
            node = Node(recipe, step, rnd, _inputs(recipe, sid, rnd, outputs), quiet=quiet, retry_failed=retry_failed)
            kind = KINDS[step.action]
            identity = kind.plan(node)
            done = state.finished(cfg.db, cfg.name, sid, rnd, identity)
            if done is not None and _exists(done):
                outputs[(sid, rnd)] = {**done, "identity": identity}
                summary.steps.append(StepResult(sid, rnd, identity, "skipped", output=done))
                continue
            say(f"[bold]step[/bold] {node.tag} ({step.action}, identity {identity[:10]})")
            state.start(cfg.db, cfg.name, sid, rnd, identity, step.action, node.input_identities())
            t0 = time.perf_counter()
            try:
                out = kind.run(node, identity)
            except StepStopped as e:
                secs = time.perf_counter() - t0
                state.finish(cfg.db, cfg.name, sid, rnd, identity, "stopped", error=str(e), seconds=secs)
                summary.steps.append(StepResult(sid, rnd, identity, "stopped", secs, error=str(e)))
                summary.status, summary.error = "stopped", str(e)
                break
            except Exception as e:
                secs = time.perf_counter() - t0
                state.finish(cfg.db, cfg.name, sid, rnd, identity, "failed", error=f"{type(e).__name__}: {e}"[:2000],
                             seconds=secs)
                summary.steps.append(StepResult(sid, rnd, identity, "failed", secs, error=str(e)))
                summary.status, summary.error = "failed", f"step {node.tag}: {e}"
                raise
            secs = time.perf_counter() - t0
            state.finish(cfg.db, cfg.name, sid, rnd, identity, "done", output=out, seconds=secs)
            outputs[(sid, rnd)] = {**out, "identity": identity}
            summary.steps.append(StepResult(sid, rnd, identity, "done", secs, output=out))
        else:
            summary.status = "done"
    finally:
        summary.seconds = time.perf_counter() - start
    if report and summary.status == "done":
        from .report import build_report

        summary.report = build_report(recipe, outputs)
    return summary


def _say(text: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(text)


def validate_recipe(path: str | Path) -> str:
    """`factory validate` on a recipe: the graph, and what a run would do (from the store)."""
    recipe = load_recipe(path)
    cfg = recipe.cfg
    once = [s for s in recipe.order if recipe.steps[s].once]
    per = [s for s in recipe.order if not recipe.steps[s].once]
    import duckdb

    from ..store import StoreError

    try:
        done = {(h["step"], h["round"]) for h in state.history(cfg.db, cfg.name) if h["status"] == "done"}
    except (StoreError, OSError, duckdb.Error):  # the database is in use by a run, or older than recipes
        done = set()
    nodes = recipe.nodes()
    n_done = sum(1 for n in nodes if n in done)
    return (f"ok, recipe '{cfg.name}': {len(recipe.steps)} steps ({', '.join(once) or 'none'} once; "
            f"{' → '.join(per)} × {cfg.rounds} rounds), {len(nodes)} step runs, {n_done} recorded done")
