"""Judge modes: how one (pair, principle, order) is asked and read. One class per mode, registered by
name in ``MODES``; ``judge.mode`` in a pipeline picks one. A new mode is one class and one name.

- ``logprob`` (default): one decode step after the answer prefix "The better option is (", scored
  by the log-probabilities of the option tokens (renormalised over the options). On an endpoint that
  cannot continue an assistant message, the template asks for a single letter instead and the first
  generated token is scored.
- ``cot``: a short rationale first (``rationales`` table), then the log-prob step after it.
- ``vote``: for endpoints with no log-probs at all: ``votes`` sampled verdicts per order, each parsed
  by :func:`parse_verdict`; P(first) is the share of parseable votes for the first option, an
  unparseable verdict is stored as text and never guessed.

Every mode writes the same ``judgements`` row (``p_first``, ``p_a``, lineage), so labels, export and
audit treat them alike.
"""

from __future__ import annotations

import json
import re
from typing import Any

from .engines.base import Completion, EngineError, Request, Sampling
from .prefmath import renormalize
from .runner import Job, gen_row
from .stages.judge import SCORE, JudgeCtx, Pair, messages_hash
from .store import now

MODES: dict[str, type["JudgeMode"]] = {}


def register(cls: type["JudgeMode"]) -> type["JudgeMode"]:
    MODES[cls.name] = cls
    return cls


def get(name: str) -> "JudgeMode":
    if name not in MODES:
        raise ValueError(f"unknown judge mode '{name}'; use one of {', '.join(MODES)}")
    return MODES[name]()


class JudgeMode:
    name = ""
    tables: tuple[str, ...] = ("judgements",)
    uses_logprobs = True  # needs option log-probs from the engine

    def settings(self, spec: Any) -> dict:
        """The mode's part of the judge settings (hashed into every key it makes)."""
        return {}

    def check(self, engine: Any) -> None:
        caps = getattr(engine, "capabilities", None)
        if self.uses_logprobs and caps is not None and caps.scoring == "none":
            raise EngineError(f"the engine ({engine.model}) returns no log-probabilities, which judge.mode "
                              f"'{self.name}' reads; use judge.mode: vote (sampled verdicts) with this endpoint")

    def jobs(self, ctx: JudgeCtx, pair: Pair, p: Any, order: str, run_id: str | None = None) -> list[Job]:
        raise NotImplementedError

    # shared by the modes that score options after the messages
    def _score_job(self, ctx: JudgeCtx, pair: Pair, p: Any, order: str, run_id: str | None,
                   rationale: tuple[str, str] | None = None) -> Job:
        key = ctx.key("judgements", pair, p, order, rationale[0] if rationale else None)
        row = {**ctx.row(pair, p, order, run_id), "rationale": rationale[1] if rationale else None}
        cot = rationale is not None

        def build() -> Request:
            m = ctx.messages(pair, p, order, cot=cot, rationale=rationale[1] if rationale else None)
            row["messages_hash"] = messages_hash(m)
            return Request(key, m, self.sampling(ctx), options=tuple(ctx.options),
                           option_ids=tuple(ctx.option_ids) if ctx.option_ids else None,
                           continue_final=ctx.prefill or cot)

        return Job("judgements", key, row, build=build, to_rows=lambda job, c: self.to_rows(job, c, ctx))

    def sampling(self, ctx: JudgeCtx) -> Sampling:
        return SCORE

    def to_rows(self, job: Job, c: Completion, ctx: JudgeCtx) -> list[dict]:
        row = _judgement(job, c)
        if c.status == "ok":
            lp = c.option_logprobs
            if not lp or len(lp) != 2:
                row.update(status="failed", error="the engine returned no log-probabilities for the options")
            else:
                p_first = float(renormalize(lp[0], lp[1]))
                row.update(logprob_first=lp[0], logprob_second=lp[1], p_first=p_first,
                           p_a=p_first if job.row["order"] == "ab" else 1.0 - p_first,
                           floored=sum(1 << i for i in c.floored))
                if p_first != p_first:  # both -inf: nothing to renormalise
                    row.update(status="failed", error="both options have zero probability", p_first=None, p_a=None)
        return [row]


def _judgement(job: Job, c: Completion) -> dict:
    return {**job.row, "id": job.key, "status": c.status, "error": c.error, "prompt_tokens": c.prompt_tokens,
            "completion_tokens": c.completion_tokens, "created_at": now(), "logprob_first": None,
            "logprob_second": None, "p_first": None, "p_a": None, "floored": 0, "verdicts": None}


@register
class LogprobMode(JudgeMode):
    name = "logprob"

    def jobs(self, ctx, pair, p, order, run_id=None):
        return [self._score_job(ctx, pair, p, order, run_id)]


@register
class CotMode(JudgeMode):
    name = "cot"
    tables = ("rationales", "judgements")

    def settings(self, spec):
        return {"cot": Sampling(max_tokens=spec.cot_max_tokens, temperature=spec.cot_temperature).as_dict()}

    def check(self, engine):
        super().check(engine)
        caps = getattr(engine, "capabilities", None)
        if caps is not None and not caps.prefill:
            raise EngineError(f"judge.mode cot continues the judge's own reasoning, which this endpoint "
                              f"({engine.model}) cannot (no assistant prefill); use judge.mode logprob or vote")

    def jobs(self, ctx, pair, p, order, run_id=None):
        key = ctx.key("rationales", pair, p, order)
        row = {**ctx.row(pair, p, order, run_id), "prompt_id": pair.pair_id, "parent_id": None, "round": 0,
               "principle_ids": json.dumps([p.id])}
        cot = Sampling(**{**ctx.mode_settings["cot"], "stop": tuple(ctx.mode_settings["cot"]["stop"])})

        def build() -> Request:
            m = ctx.messages(pair, p, order, cot=True)
            row["messages_hash"] = messages_hash(m)
            return Request(key, m, cot, continue_final=True)

        def then(rows):
            r = rows[0]
            if r["status"] != "ok":
                return []
            return [self._score_job(ctx, pair, p, order, run_id, (r["id"], r["text"].strip()))]

        return [Job("rationales", key, row, build=build, to_rows=gen_row, then=then, need=("text",))]


_VERDICT = re.compile(r"^\(?\s*([^()\s.]+)\s*\)?\s*\.?$")


def parse_verdict(text: str | None, options: list[str]) -> int | None:
    """The option a sampled verdict names, or None. Accepted, after trimming whitespace: the label
    alone, optionally in parentheses and/or followed by a full stop (``A``, ``(A)``, ``A)``, ``A.``).
    Anything else, e.g. "A or B" or "Option A", is unparseable and stored as such."""
    m = _VERDICT.match((text or "").strip())
    if not m or m.group(1) not in options:
        return None
    return options.index(m.group(1))


@register
class VoteMode(JudgeMode):
    name = "vote"
    uses_logprobs = False

    def settings(self, spec):
        return {"votes": spec.votes, "vote_temperature": spec.vote_temperature, "vote_max_tokens": spec.vote_max_tokens}

    def jobs(self, ctx, pair, p, order, run_id=None):
        return [self._score_job(ctx, pair, p, order, run_id)]

    def sampling(self, ctx):
        s = ctx.mode_settings
        return Sampling(max_tokens=s["vote_max_tokens"], temperature=s["vote_temperature"], n=s["votes"])

    def to_rows(self, job, c, ctx):
        row = _judgement(job, c)
        if c.status != "ok":
            return [row]
        picks = [parse_verdict(t, ctx.options) for t in c.texts]
        valid = [x for x in picks if x is not None]
        row["verdicts"] = json.dumps(c.texts, ensure_ascii=False)
        if not valid:
            row.update(status="failed", error=f"no parseable verdict among {len(c.texts)} samples")
        else:
            p_first = sum(1 for x in valid if x == 0) / len(valid)
            row.update(p_first=p_first, p_a=p_first if job.row["order"] == "ab" else 1.0 - p_first)
        return [row]


def setup(store: Any, engine: Any, spec: Any, *, run_id: str, constitution: Any, template: Any) -> tuple[JudgeCtx, JudgeMode]:
    """Check the engine can serve ``spec.mode``, store the judge settings, build the judge context."""
    from .fewshot import judge_shots
    from .stages.judge import option_token_ids

    mode = get(spec.mode)
    mode.check(engine)
    caps = getattr(engine, "capabilities", None)
    prefill = caps.prefill if caps is not None else True
    option_ids = option_token_ids(engine, spec.options) if mode.uses_logprobs else None
    settings = {"mode": spec.mode, "options": spec.options, "engine_seed": engine.seed, "prefill": prefill,
                "scoring": caps.scoring if caps is not None and mode.uses_logprobs else None,
                "max_conversation_chars": spec.max_conversation_chars, **mode.settings(spec)}
    if getattr(spec, "few_shot", 0):  # issue 21: demonstrations (absent when 0: settings hashes unchanged)
        settings.update(few_shot=spec.few_shot, few_shot_seed=spec.seed)
    sampling_hash = store.put_config("judge", settings) if store is not None else ""
    ctx = JudgeCtx(run_id=run_id, model=engine.model, seed=engine.seed, constitution=constitution, template=template,
                   options=list(spec.options), option_ids=option_ids, sampling_hash=sampling_hash,
                   max_chars=spec.max_conversation_chars, prefill=prefill, mode_settings=settings)
    ctx.shots = judge_shots(constitution, spec)  # issue 21: None without judge.few_shot
    return ctx, mode


def pair_jobs(ctx: JudgeCtx, mode: JudgeMode, pairs: list[Pair], principles, run_id: str | None = None) -> list[Job]:
    """Every (pair, chosen principle, order) of ``pairs`` in prefix-cache order; ``principles(pair)``
    gives a pair's principles."""
    from .stages.judge import ORDERS, cache_order

    cells = []
    for pair in pairs:
        ps = principles(pair)
        for order in ORDERS:
            if mode.name != "cot":  # rendered from one skeleton per (pair, order): free it after the last
                ctx.expect(pair, order, len(ps))
            cells.append([j for p in ps for j in mode.jobs(ctx, pair, p, order, run_id)])
    return cache_order(cells)
