"""SL-CAI stages: initial answer → critique (per chosen principle) → revision, for 1–4 rounds.

Records in, jobs out: these functions render templates and compute content keys; they know
nothing about the engine backend or SQL. Round r critiques the chain's current head (the initial
answer for r=1, the round r-1 revision after that) under the principles chosen for that round and
writes one revision addressing all of that round's critiques.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from ..constitution import Constitution, Principle
from ..engines.base import Request, Sampling
from ..runner import Job
from ..store import content_key
from ..templates import Template


@dataclass
class Ctx:
    """What every row of a run carries for lineage, and what goes into its content key."""

    run_id: str
    model: str
    seed: int | None
    constitution: Constitution

    def job(self, table: str, messages: list[dict], sampling: Sampling, sampling_hash: str, template: Template,
            *, prompt_id: str, parents: list[str], round: int, principles: list[Principle]) -> Job:
        key = content_key(table, self.model, self.seed, sampling_hash, messages, parents)
        row = {
            "run_id": self.run_id,
            "prompt_id": prompt_id,
            "parent_id": parents[0] if parents else None,
            "round": round,
            "principle_ids": json.dumps([p.id for p in principles]),
            "constitution_hash": self.constitution.hash if principles else None,
            "template_hash": template.hash,
            "model": self.model,
            "sampling_hash": sampling_hash,
            "messages": json.dumps(messages, ensure_ascii=False),
        }
        return Job(Request(key=key, messages=messages, sampling=sampling), row)


@dataclass
class Head:
    """The current end of one prompt's chain: the text the next critique looks at."""

    prompt_id: str
    id: str
    text: str
    conversation: list[dict]


def answer_jobs(prompts: list[tuple[str, list[dict]]], tmpl: Template, sampling: Sampling, sampling_hash: str,
                ctx: Ctx) -> list[Job]:
    return [
        ctx.job("responses", tmpl.render(conversation=conv), sampling, sampling_hash, tmpl,
                prompt_id=pid, parents=[], round=0, principles=[])
        for pid, conv in prompts
    ]


def choose_principles(constitution: Constitution, strategy: str, per_round: int, seed: int, prompt_ids: list[str],
                      round: int, only: list[str] | None = None) -> dict[str, list[Principle]]:
    """Principles for each prompt in ``round`` (1-based); deterministic for a given seed and order."""
    pool = [constitution.principle(i) for i in only] if only else list(constitution.principles)
    k = min(per_round, len(pool))
    chosen: dict[str, list[Principle]] = {}
    for index, pid in enumerate(prompt_ids):
        if strategy == "all":
            chosen[pid] = pool
        elif strategy == "round_robin":
            start = (index + (round - 1) * k) % len(pool)
            chosen[pid] = [pool[(start + j) % len(pool)] for j in range(k)]
        else:  # seeded random, independent of batch composition: seeded by (seed, prompt, round)
            chosen[pid] = random.Random(content_key(seed, pid, round)).sample(pool, k)
    return chosen


def critique_jobs(heads: list[Head], chosen: dict[str, list[Principle]], round: int, tmpl: Template,
                  sampling: Sampling, sampling_hash: str, ctx: Ctx) -> list[Job]:
    jobs = []
    for h in heads:
        for p in chosen[h.prompt_id]:
            messages = tmpl.render(conversation=h.conversation, response=h.text, principle=p, round=round)
            jobs.append(ctx.job("critiques", messages, sampling, sampling_hash, tmpl, prompt_id=h.prompt_id,
                                parents=[h.id], round=round, principles=[p]))
    return jobs


def revise_jobs(heads: list[Head], critiques: dict[str, list[tuple[Principle, str, str]]], round: int,
                tmpl: Template, sampling: Sampling, sampling_hash: str, ctx: Ctx) -> list[Job]:
    """``critiques[head.id]`` = [(principle, critique id, critique text)] for that head this round."""
    jobs = []
    for h in heads:
        items = critiques.get(h.id)
        if not items:
            continue
        messages = tmpl.render(conversation=h.conversation, response=h.text, round=round,
                               critiques=[{"principle": p, "text": text} for p, _, text in items])
        jobs.append(ctx.job("revisions", messages, sampling, sampling_hash, tmpl, prompt_id=h.prompt_id,
                            parents=[h.id] + [cid for _, cid, _ in items], round=round, principles=[p for p, _, _ in items]))
    return jobs
