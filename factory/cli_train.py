"""`factory export`, `factory train`, `factory eval`: datasets out of runs, TRL training, evaluations."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .cli_common import console, user_errors

# -- export / train / eval (issue 5) ----------------------------------------------------------
export_app = typer.Typer(no_args_is_help=True, help="DuckDB runs → Hugging Face datasets in TRL formats.")
train_app = typer.Typer(no_args_is_help=True, help="TRL training from a YAML config (train/*.yaml).")
eval_app = typer.Typer(no_args_is_help=True, help="Trained models: human labels (rm, dpo), behaviour, best-of-n.")


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
