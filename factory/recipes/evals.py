"""Eval steps of a recipe, one function per ``eval:`` value; each returns the step's output (JSON),
with the figures the report reads: ``accuracy`` (+ ``ci``) and ``margin`` for rm/dpo on a human set,
behaviour ``rates`` (value, lo, hi, n) per model."""

from __future__ import annotations

from typing import Callable

import numpy as np

from .steps import Node, StepStopped


def _human(node: Node):
    human = node.spec.human or node.recipe.cfg.human
    if human is None:
        raise StepStopped(f"step '{node.tag}': an {node.spec.eval} eval needs a human set: give `human: {{path: …}}` "
                          "in the step or at the top of the recipe")
    return human


def _pairwise(r) -> dict:
    a, b = np.asarray(r.details["score_a"]), np.asarray(r.details["score_b"])
    choice = np.asarray([c == "a" for c in _choices(r)])
    margin = np.where(choice, a - b, b - a) if len(a) else np.array([])
    lo, hi = r.details.get("ci", (None, None))
    return {"value": r.eval_id, "eval_id": r.eval_id, "accuracy": r.accuracy, "ci": [lo, hi], "n": r.n,
            "ties": r.ties, "margin": float(np.mean(margin)) if len(margin) else None, "model": r.model}


def _choices(r) -> list[str]:
    correct = np.asarray(r.details["correct"], dtype=bool)
    a, b = np.asarray(r.details["score_a"]), np.asarray(r.details["score_b"])
    # the human's side, recovered from which score was judged correct (ties count as wrong either way)
    return ["a" if (c and x > y) or (not c and y > x) else "b" for c, x, y in zip(correct, a, b)]


def eval_rm(node: Node) -> dict:
    from ..evals.ensemble import eval_rm_ensemble, is_ensemble
    from ..evaluate import eval_rm as run_rm

    h = _human(node)
    model = node.value(node.spec.model)
    if is_ensemble(model):
        eval_rm_ensemble(model, h.path, limit=h.limit, offset=h.offset, db=node.recipe.cfg.db)  # stored in `evals`
        return {"value": str(model), "ensemble": True}
    return _pairwise(run_rm(model, h.path, limit=h.limit, offset=h.offset, db=node.recipe.cfg.db))


def eval_dpo(node: Node) -> dict:
    from ..evaluate import eval_dpo as run_dpo

    h = _human(node)
    model = node.value(node.spec.model)
    ref = node.value(node.spec.ref) if node.spec.ref is not None else "smollm2-135m"
    return _pairwise(run_dpo(model, ref, h.path, beta=node.spec.beta, limit=h.limit, offset=h.offset,
                             db=node.recipe.cfg.db))


def eval_behaviour(node: Node) -> dict:
    from ..config import EngineSettings
    from ..evals.behaviour import Settings, evaluate
    from ..evals.report import write_html

    spec = node.spec
    models = [node.value(spec.model), *(node.value(a) for a in spec.against)]
    engine = EngineSettings.model_validate({"engine": spec.engine}).engine
    settings = Settings(max_tokens=spec.max_tokens, limit=spec.limit)
    result = evaluate(models, db=node.recipe.cfg.db, judge=spec.judge, engine_spec=engine, settings=settings,
                      quiet=node.quiet)
    report = write_html(result, node.recipe.state_dir / "reports" / f"behaviour-{node.tag}.html")
    rates = {m.name: {k: r.to_dict() for k, r in m.rates.items()} for m in result.models}
    return {"value": str(report), "report": str(report), "models": models, "rates": rates}


EVALS: dict[str, Callable[[Node], dict]] = {"rm": eval_rm, "dpo": eval_dpo, "behaviour": eval_behaviour}
