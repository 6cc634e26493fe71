"""SL-CAI stages: initial answer → critique (per chosen principle) → revision, for 1–4 rounds.

Records in, jobs out: these functions render templates, compute content keys and chain each job to
its follow-ups; they know nothing about the engine backend or SQL. Round r critiques the chain's
current head (the initial answer for r=1, the round r-1 revision after that) under the principles
chosen for that round; when all of a head's critiques of the round are stored and ok, one revision
addresses them all, and its row is the head of round r+1. Jobs flow as soon as their parents are
stored, so answers, critiques and revisions of different prompts share the engine's batch.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

from ..constitution import Constitution, Principle
from ..engines.base import Request, Sampling
from ..runner import Job, gen_row
from ..store import content_key
from ..templates import Template

STAGES = ("answer", "critique", "revise")
TABLE = {"answer": "responses", "critique": "critiques", "revise": "revisions"}


@dataclass
class Ctx:
    """What every row of a run carries for lineage, and what goes into its content key."""

    run_id: str
    model: str
    seed: int | None
    constitution: Constitution
    templates: dict[str, Template]
    sampling: dict[str, Sampling]
    sampling_hash: dict[str, str]
    rounds: int = 1
    strategy: str = "random"
    per_round: int = 1
    choice_seed: int = 0
    only: list[str] | None = None
    shots: Any = None  # few-shot demonstrations (factory.fewshot.SLShots), None without `few_shot`

    def job(self, stage: str, messages: list[dict], *, prompt_id: str, parents: list[str], round: int,
            principles: list[Principle], then=None) -> Job:
        table, sh = TABLE[stage], self.sampling_hash[stage]
        key = content_key(table, self.model, self.seed, sh, messages, parents)
        row = {
            "run_id": self.run_id,
            "prompt_id": prompt_id,
            "parent_id": parents[0] if parents else None,
            "parent_ids": json.dumps(parents),
            "round": round,
            "principle_ids": json.dumps([p.id for p in principles]),
            "constitution_hash": self.constitution.hash if principles else None,
            "template_hash": self.templates[stage].hash,
            "model": self.model,
            "sampling_hash": sh,
            "messages": json.dumps(messages, ensure_ascii=False),
        }
        request = Request(key=key, messages=messages, sampling=self.sampling[stage])
        return Job(table, key, row, build=lambda: request, to_rows=gen_row, then=then, need=("text",))


@dataclass
class Head:
    """The current end of one prompt's chain: the text the next critique looks at."""

    prompt_id: str
    id: str
    text: str
    conversation: list[dict]
    index: int  # the prompt's position among the run's prompts (round-robin principles)


def answer_jobs(ctx: Ctx, prompts: list[tuple[str, list[dict], int]]) -> list[Job]:
    """One answer per (prompt id, conversation, index); each answer's critiques follow it."""
    jobs = []
    for pid, conv, index in prompts:
        def then(rows, pid=pid, conv=conv, index=index):
            r = rows[0]
            return critique_jobs(ctx, Head(pid, r["id"], r["text"], conv, index), 1) if r["status"] == "ok" else []

        jobs.append(ctx.job("answer", ctx.templates["answer"].render(conversation=conv), prompt_id=pid, parents=[],
                            round=0, principles=[], then=then))
    return jobs


def principles_for(constitution: Constitution, strategy: str, per_round: int, seed: int, prompt_id: str,
                   index: int, round: int, only: list[str] | None = None) -> list[Principle]:
    """Principles critiqued for one prompt in ``round`` (1-based): deterministic for a seed and index."""
    pool = [constitution.principle(i) for i in only] if only else list(constitution.sl_principles)  # critique+revision
    k = min(per_round, len(pool))
    if strategy == "all":
        return pool
    if strategy == "round_robin":
        start = (index + (round - 1) * k) % len(pool)
        return [pool[(start + j) % len(pool)] for j in range(k)]
    # seeded random, independent of batch composition: seeded by (seed, prompt, round)
    return random.Random(content_key(seed, prompt_id, round)).sample(pool, k)


def choose_principles(constitution: Constitution, strategy: str, per_round: int, seed: int, prompt_ids: list[str],
                      round: int, only: list[str] | None = None) -> dict[str, list[Principle]]:
    """:func:`principles_for` of every prompt, the index being its position in ``prompt_ids``."""
    return {pid: principles_for(constitution, strategy, per_round, seed, pid, i, round, only)
            for i, pid in enumerate(prompt_ids)}


class _Round:
    """One head's critiques in one round: the revision is planned when the last one is stored."""

    def __init__(self, ctx: Ctx, head: Head, round: int, principles: list[Principle]):
        self.ctx, self.head, self.round, self.principles = ctx, head, round, principles
        self.got: dict[str, dict] = {}

    def stored(self, p: Principle, rows: list[dict]) -> list[Job]:
        self.got[p.id] = rows[0]
        if len(self.got) < len(self.principles) or any(r["status"] != "ok" for r in self.got.values()):
            return []  # a head is revised only when all of its round's critiques succeeded
        return [revise_job(self.ctx, self.head, self.round,
                           [(p, self.got[p.id]["id"], self.got[p.id]["text"]) for p in self.principles])]


def critique_jobs(ctx: Ctx, head: Head, round: int) -> list[Job]:
    if round > ctx.rounds:
        return []
    principles = principles_for(ctx.constitution, ctx.strategy, ctx.per_round, ctx.choice_seed, head.prompt_id,
                                head.index, round, ctx.only)
    state = _Round(ctx, head, round, principles)
    return [ctx.job("critique", critique_messages(ctx.templates, ctx.shots, head.prompt_id, head.conversation, head.text,
                                                  p, round),
                    prompt_id=head.prompt_id, parents=[head.id], round=round, principles=[p],
                    then=lambda rows, p=p: state.stored(p, rows))
            for p in principles]


def revise_job(ctx: Ctx, head: Head, round: int, items: list[tuple[Principle, str, str]]) -> Job:
    """``items`` = [(principle, critique id, critique text)] for ``head`` in ``round``."""
    messages = revise_messages(ctx.templates, ctx.shots, head.prompt_id, head.conversation, head.text,
                               [(p, text) for p, _, text in items], round)

    def then(rows):
        r = rows[0]
        nxt = Head(head.prompt_id, r["id"], r["text"], head.conversation, head.index)
        return critique_jobs(ctx, nxt, round + 1) if r["status"] == "ok" else []

    return ctx.job("revise", messages, prompt_id=head.prompt_id, parents=[head.id] + [cid for _, cid, _ in items],
                   round=round, principles=[p for p, _, _ in items], then=then)


def critique_messages(templates: dict[str, Template], shots: Any, prompt_id: str, conversation: list[dict],
                      response: str, p: Principle, round: int) -> list[dict]:
    """A critique request, after its few-shot demonstrations when the run has them."""
    messages = templates["critique"].render(conversation=conversation, response=response, principle=p, round=round)
    return shots.critique(messages, prompt_id, round, p) if shots else messages


def revise_messages(templates: dict[str, Template], shots: Any, prompt_id: str, conversation: list[dict],
                    response: str, critiques: list[tuple[Principle, str]], round: int) -> list[dict]:
    """A revision request for the round's critiques, after its few-shot demonstrations when the run has them."""
    messages = templates["revise"].render(conversation=conversation, response=response, round=round,
                                          critiques=[{"principle": p, "text": text} for p, text in critiques])
    return shots.revise(messages, prompt_id, round, [p for p, _ in critiques]) if shots else messages
