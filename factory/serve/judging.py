"""What the service asks and how one pair's answer is read.

:func:`judge_plan` builds the judge(s) of a pipeline exactly as a ``prefs`` run does
(:func:`factory.judges.setup_panel` over every judge role, on the engines the run lifecycle builds,
:func:`factory.runs.build_engines`), and plans a pair exactly as a ``prefs`` run does
(:func:`factory.judges.panel_jobs`: each judge's principles, both orders, each job routed to its
judge's engine), so a judgement the service makes has the same content key as the same judgement
made offline, one judge or a panel, and each answers for the other. A ``cot`` judge's job is its
rationale, whose own follow-up (``CotMode``'s ``then``) is the scored judgement: the batcher chains
the two and answers the request's key with the judgement.

The label of one pair is :func:`factory.labels.pair_label`, the one label rule (judges ×
principles, per-judge weights, tie band) in Python beside its SQL. Batch calibration needs a whole
run's priors, so online answers use the rule without it (the stored run is labelled with the full
rule when the service stops).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from .. import judges
from ..labels import LabelRule, cell_weights, pair_label, pair_p_a, rule_for
from ..runner import Job
from ..stages import judge as J
from ..stages.judge import _canonical
from ..store import StoreError


@dataclass
class JudgePlan:
    """The judge(s) the service asks, and how a pair becomes jobs and its answers a label."""

    panel: list  # judges.PanelJudge, in the pipeline's `judges:` order
    rule: LabelRule  # the run's label rule (stored labels)
    answer_rule: LabelRule  # what online answers use (the rule without batch calibration)
    weights: dict = field(default_factory=dict)  # labels.cell_weights(answer_rule), computed once

    @property
    def is_panel(self) -> bool:
        return len(self.panel) > 1

    @property
    def model(self) -> str:
        """Who judges: the one judge's model, or ``name=model`` of each judge of a panel."""
        if not self.is_panel:
            return self.panel[0].ctx.model
        return ", ".join(f"{j.name}={j.ctx.model}" for j in self.panel)

    @property
    def identities(self) -> list[tuple[str, str]]:
        """(model, judge settings hash) of each judge: what its stored judgements carry."""
        return [(j.ctx.model, j.ctx.sampling_hash) for j in self.panel]

    def jobs_of(self, pairs: list[J.Pair]) -> list[Job]:
        """Every judge's (principle, order) judgements of ``pairs``, each routed to its judge's engine."""
        jobs = judges.panel_jobs(self.panel, pairs)
        for job in jobs:
            job.row["chunk"] = None
        return jobs

    def pairs(self, items: list[tuple[list[dict], str, str]], run_id: str) -> list[tuple[dict, list[Job]]]:
        """Each ``(conversation, a, b)`` of one request as its ``pairs`` row and its jobs (none for a
        skipped pair). Made once per request, not once per pair: a conversation's canonical JSON (a
        group's pairs share it), a response's (each completion of a group is in k-1 pairs), the time,
        and the jobs (one call for all the request's pairs; a pair a batch repeats gets its jobs
        once). The pair id is :func:`factory.store.content_key` ``(conversation, a, b)``, byte for byte
        (``tests/test_serve_speed.py`` checks)."""
        convs: dict[int, tuple[str, str]] = {}  # id(conversation) -> (canonical JSON, stored JSON)
        texts: dict[str, str] = {}  # a response's canonical JSON
        at = J.now()
        rows, todo = [], {}  # todo: pair id -> Pair, the request's distinct pairs to judge
        for conv, a, b in items:
            cj = convs.get(id(conv))
            if cj is None:
                cj = convs[id(conv)] = (_canonical(conv), json.dumps(conv, ensure_ascii=False))
            ca = texts.get(a) or texts.setdefault(a, _canonical(a))
            cb = texts.get(b) or texts.setdefault(b, _canonical(b))
            pid = hashlib.sha256(f"[{cj[0]},{ca},{cb}]".encode()).hexdigest()[:24]
            row = J.pair_row(conv, a, b, source="serve", run_id=run_id, pair_id=pid, conversation_json=cj[1],
                             created_at=at)
            rows.append(row)
            if row["status"] == "ok" and pid not in todo:
                todo[pid] = J.Pair(pid, conv, a, b)
        by_pair: dict[str, list[Job]] = {}
        for job in self.jobs_of(list(todo.values())):
            by_pair.setdefault(job.row["pair_id"], []).append(job)
        return [(row, by_pair.get(row["pair_id"], []) if row["status"] == "ok" else []) for row in rows]

    def forget(self, pair_id: str) -> None:
        """Drop the render skeletons kept for a pair (a pair answered from the store never renders,
        and a service runs for days)."""
        for j in self.panel:
            j.ctx.forget(pair_id)

    def label(self, cells: list[tuple[str, str, str, str, float | None]]) -> dict:
        """The label of one pair from its judgements ``(judge, principle_id, order, status, p_a)``."""
        return pair_label(cells, self.answer_rule, self.weights)

    def p_a(self, cells: list[tuple[str, str, str, str, float | None]]) -> float | None:
        """Only the label's pooled ``p_a`` (:func:`factory.labels.pair_p_a`; what a group's rewards read)."""
        return pair_p_a(cells, self.answer_rule, self.weights)[0]


def judge_plan(store: Any, lp: Any, engines: dict[str, Any], run_id: str) -> JudgePlan:
    """Set up every judge of pipeline ``lp`` on its engine (``engines``: judge name -> engine) and
    record them as the run's judges (``run_judges``: a panel's stored labels pool over them)."""
    roles = lp.judge_roles()
    panel = judges.setup_panel(store, engines, roles, run_id=run_id, constitution=lp.constitution,
                               templates=lp.templates)
    rule = rule_for(store, lp.constitution, lp.cfg.judge, run_id)
    known = set(rule.weights) | {k.split("/", 1)[-1] for k in rule.weights}
    missing = [p.id for p in lp.constitution.principles if p.id not in known]
    if missing:
        raise StoreError(f"weight set '{rule.name}' has no weight for principle(s) {missing[:5]}; fit it again over "
                         "this constitution or remove judge.weights")
    answer = rule.with_(calibrate=False)
    return JudgePlan(panel=panel, rule=rule, answer_rule=answer, weights=cell_weights(answer))


def conversation_of(prompt: str | list[dict]) -> list[dict]:
    """A prompt string is one user turn; messages are kept as given (validated by the app)."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": m["role"], "content": m["content"]} for m in prompt]
