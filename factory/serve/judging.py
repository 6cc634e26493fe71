"""What the service asks and how one pair's answer is read.

:func:`judge_plan` is the one function that builds the judge(s) of a pipeline and the jobs for one
pair. Today it builds the single judge of ``judge:`` (``factory.judges.setup``) and plans a pair
exactly as a ``prefs`` run does (``judges.pair_jobs`` with the seeded ``per_pair`` principle
choice), so a judgement the service makes has the same content key as the same judgement made
offline, and each answers for the other. Where panels exist (several judges, each on its own
engine) this function is what changes: one plan per judge, jobs routed to each judge's engine.

:func:`pair_label` is the label of ONE pair under a :class:`~factory.labels.LabelRule`, in Python:
the SQL of :func:`factory.labels.labels_sql` costs ~10–30 ms a call on this machine, far over a
cache hit's budget. It mirrors that SQL step for step (clamp, orders averaged per principle,
weighted mean or logit pool, tie band) and ``tests/test_serve.py`` checks it against
:func:`factory.labels.labels_of` on random judgements. Batch calibration needs a whole run's
priors, so online answers use the rule without it (the stored run is labelled with the full rule
when the service stops).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .. import judges
from ..labels import EPS, LabelRule, rule_for
from ..runner import Job
from ..stages import judge as J
from ..store import StoreError


@dataclass
class JudgePlan:
    """The judge(s) the service asks, and how a pair becomes jobs."""

    ctx: Any  # stages.judge.JudgeCtx
    mode: Any  # judges.JudgeMode
    constitution: Any
    spec: Any  # config.JudgeSpec
    rule: LabelRule  # the run's label rule (stored labels)
    answer_rule: LabelRule  # what online answers use (the rule without batch calibration)
    model: str
    sampling_hash: str

    def jobs(self, pair: J.Pair) -> list[Job]:
        """Every (principle, order) judgement of ``pair`` (principles chosen as a prefs run chooses them)."""
        jobs = judges.pair_jobs(self.ctx, self.mode, [pair], self._principles)
        for job in jobs:
            job.row["chunk"] = None
        return jobs

    def _principles(self, pair: J.Pair):
        return J.choose(self.constitution, self.spec.per_pair, self.spec.seed, pair.pair_id)

    def forget(self, pair_id: str) -> None:
        """Drop the render skeletons kept for a pair (a pair answered from the store never renders,
        and a service runs for days)."""
        for order in J.ORDERS:
            self.ctx._uses.pop((pair_id, order), None)
            self.ctx._skel.pop((pair_id, order), None)


def judge_plan(store: Any, lp: Any, engine: Any, run_id: str) -> JudgePlan:
    """Build the judge(s) of pipeline ``lp`` on ``engine`` and the way a pair becomes jobs.

    THE switch point for panels (issue 20): build one judge per ``judges:`` entry on its own engine
    here and return a plan whose ``jobs`` routes each job to its judge's engine; the batcher feeds
    one engine per plan today."""
    spec = lp.judge_roles()[0].judge  # the one judge's effective settings (factory.roles.Role)
    if spec.mode == "cot":
        raise StoreError("judge.mode cot (a rationale before each answer) is not served yet: its answers need two "
                         "engine calls in sequence; serve a logprob or vote judge")
    ctx, mode = judges.setup(store, engine, spec, run_id=run_id, constitution=lp.constitution,
                             template=lp.templates["judge"])
    rule = rule_for(store, lp.constitution, spec)
    missing = [p.id for p in lp.constitution.principles if p.id not in rule.weights]
    if missing:
        raise StoreError(f"weight set '{rule.name}' has no weight for principle(s) {missing[:5]}; fit it again over "
                         "this constitution or remove judge.weights")
    return JudgePlan(ctx=ctx, mode=mode, constitution=lp.constitution, spec=spec, rule=rule,
                     answer_rule=rule.with_(calibrate=False), model=engine.model, sampling_hash=ctx.sampling_hash)


def conversation_of(prompt: str | list[dict]) -> list[dict]:
    """A prompt string is one user turn; messages are kept as given (validated by the app)."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def _logit(p: float) -> float:
    p = min(max(p, EPS), 1 - EPS)
    return math.log(p / (1 - p))


def pair_label(judgements: list[tuple[str, str, str, float | None]], rule: LabelRule) -> dict:
    """The label of one pair from its judgements ``(principle_id, order, status, p_a)`` under ``rule``
    (no batch calibration): ``p_a`` (None when no judgement is valid), ``chosen``, ``is_tie``.
    Mirrors :func:`factory.labels.labels_sql` (module docstring)."""
    if rule.calibrate:
        raise ValueError("pair_label has no batch priors; pass rule.with_(calibrate=False)")
    lo, hi = rule.clamp if rule.clamp else (0.0, 1.0)
    by: dict[str, dict[str, list[float]]] = {}
    for pid, order, status, p in judgements:
        cell = by.setdefault(pid, {"ab": [], "ba": []})
        if status == "ok" and p is not None and p == p:
            cell[order].append(min(max(p, lo), hi))
    num = den = lsum = 0.0
    any_p = any_l = False
    for pid, cell in by.items():
        ab, ba = cell["ab"], cell["ba"]
        if not ab and not ba:
            continue
        w = rule.weights[pid]
        if ab and ba:
            p = (sum(ab) / len(ab) + sum(ba) / len(ba)) / 2
            lg = (sum(map(_logit, ab)) / len(ab) + sum(map(_logit, ba)) / len(ba)) / 2
        else:
            xs = ab or ba
            p, lg = sum(xs) / len(xs), sum(map(_logit, xs)) / len(xs)
        num, den, lsum, any_p, any_l = num + w * p, den + w, lsum + w * lg, True, True
    if rule.pool == "logit":
        p_a = 1 / (1 + math.exp(-lsum)) if any_l else None
    else:
        p_a = num / den if any_p and den != 0 else None
    tie = p_a is not None and (abs(p_a - 0.5) < rule.tie_eps or p_a == 0.5)
    chosen = None if p_a is None or tie else ("a" if p_a > 0.5 else "b")
    return {"p_a": p_a, "chosen": chosen, "is_tie": tie}
