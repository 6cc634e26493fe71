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
from dataclasses import dataclass
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
    orders: tuple[str, ...] = ("ab", "ba")  # the orders each (pair, principle) is judged in
    engine_kinds: tuple[str, ...] | None = None  # only these engine kinds (None: any generative engine)

    def settings(self, spec: Any) -> dict:
        """The mode's part of the judge settings (hashed into every key it makes)."""
        return {}

    def principles(self, spec: Any, constitution: Any, per_pair: Any) -> Any:
        """``pair -> principles`` to judge: the constitution's (a seeded sample per pair by default)."""
        from .stages.judge import choose

        return lambda pair: choose(constitution, spec.per_pair, spec.seed, pair.pair_id)

    def check(self, engine: Any) -> None:
        kind = getattr(engine, "kind", None)
        if kind == "reward_model" and self.engine_kinds is None:
            raise EngineError(f"a reward model ({engine.model}) scores pairs and cannot answer judge.mode "
                              f"'{self.name}'; use judge.mode reward_model (or a chat model's engine for this mode)")
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

        def build(rendered: tuple | None = None) -> Request:
            """``rendered``: the messages a render worker made of ``Job.render`` (factory.serve.render_pool)."""
            if rendered is None:
                m = ctx.messages(pair, p, order, cot=cot, rationale=rationale[1] if rationale else None)
                row["messages_hash"] = messages_hash(m)
            else:
                row["messages_hash"], flat = rendered
                m = [{"role": flat[i], "content": flat[i + 1]} for i in range(0, len(flat), 2)]
            return Request(key, m, self.sampling(ctx), options=tuple(ctx.options),
                           option_ids=tuple(ctx.option_ids) if ctx.option_ids else None,
                           continue_final=ctx.prefill or cot)

        return Job("judgements", key, row, build=build, to_rows=lambda job, c: self.to_rows(job, c, ctx),
                   render=None if cot else (ctx, pair, p, order))

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
        cot = spec.settings_for("cot")
        return {"cot": Sampling(max_tokens=cot.max_tokens, temperature=cot.temperature).as_dict()}

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
        v = spec.settings_for("vote")
        return {"votes": v.votes, "vote_temperature": v.temperature, "vote_max_tokens": v.max_tokens}

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


@register
class RewardModelMode(JudgeMode):
    """A reward-model engine (``kind: reward_model``) scores both candidates once: one judgement per
    pair, under the pseudo-principle ``judge.reward_model.principle_id`` ("reward"), in order ``ab``
    only (σ(r_a − r_b) does not depend on the order shown, so ``ba`` would repeat the same passes).
    The engine answers ``option_logprobs = (log σ(r1 − r2), log σ(r2 − r1))``: read as any log-prob
    judgement."""

    name = "reward_model"
    uses_logprobs = False
    orders = ("ab",)
    engine_kinds = ("reward_model",)

    def settings(self, spec):
        return {"reward_model": spec.settings_for("reward_model").model_dump()}

    def principles(self, spec, constitution, per_pair):
        from .constitution import Principle

        pid = spec.settings_for("reward_model").principle_id
        p = Principle(id=pid, critique="(reward model)", revision="(reward model)",
                      comparison="Which response does the reward model score higher?")
        return lambda pair: [p]

    def check(self, engine):
        if getattr(engine, "kind", None) != "reward_model":
            raise EngineError(f"judge.mode reward_model needs a reward-model engine (kind: reward_model), not "
                              f"{engine.model}; use judge.mode logprob (or cot, vote) with a chat model")

    def jobs(self, ctx, pair, p, order, run_id=None):
        key = ctx.key("judgements", pair, p, order)
        row = {**ctx.row(pair, p, order, run_id), "rationale": None}
        conv = _truncate_rm(pair.conversation, ctx.max_chars)

        def build() -> Request:
            first, second = (pair.a, pair.b) if order == "ab" else (pair.b, pair.a)
            cands = (tuple(conv) + ({"role": "assistant", "content": first},),
                     tuple(conv) + ({"role": "assistant", "content": second},))
            row["messages_hash"] = messages_hash([*conv, {"role": "assistant", "content": first},
                                                  {"role": "assistant", "content": second}])
            return Request(key, list(conv), SCORE, options=tuple(ctx.options), candidates=cands)

        return [Job("judgements", key, row, build=build, to_rows=lambda job, c: self.to_rows(job, c, ctx))]


def _truncate_rm(conversation, max_chars):
    from .stages.judge import truncate

    return truncate(conversation, max_chars)


def check_role(name: str, engine: Any, spec: Any) -> "JudgeMode":
    """The judge mode of judge ``name``, checked against its engine: an error naming the judge."""
    mode = get(spec.mode)
    try:
        mode.check(engine)
    except EngineError as e:
        raise EngineError(f"judge '{name}': {e}") from None
    return mode


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
    from .stages.judge import cache_order

    cells = []
    for pair in pairs:
        ps = principles(pair)
        for order in mode.orders:
            if mode.name != "cot":  # rendered from one skeleton per (pair, order): free it after the last
                ctx.expect(pair, order, len(ps))
            cells.append([j for p in ps for j in mode.jobs(ctx, pair, p, order, run_id)])
    return cache_order(cells)


@dataclass
class PanelJudge:
    """One judge of a run's panel, ready to make jobs: its name and weight, context and mode."""

    name: str
    weight: float
    ctx: JudgeCtx
    mode: JudgeMode
    principles: Any  # pair -> principles to judge


def setup_panel(store: Any, engines: dict[str, Any], roles: list[Any], *, run_id: str, constitution: Any,
                templates: dict[str, Any]) -> list[PanelJudge]:
    """Every judge role set up on its engine (checked before any request: a judge whose engine cannot
    serve its mode is an error naming the judge), and recorded as the run's judges."""
    from .stages.judge import OptionError

    panel: list[PanelJudge] = []
    seen: dict[tuple, str] = {}
    for role in roles:
        engine, spec = engines[role.name], role.judge
        check_role(role.name, engine, spec)
        try:
            jctx, mode = setup(store, engine, spec, run_id=run_id, constitution=constitution,
                               template=templates.get(f"judge:{role.name}", templates["judge"]))
        except (EngineError, OptionError) as e:
            raise type(e)(f"judge '{role.name}': {e}") from None
        sig = (jctx.model, jctx.sampling_hash)
        if sig in seen:
            raise EngineError(f"judges '{seen[sig]}' and '{role.name}' are the same model ({jctx.model}) with the same "
                              "settings, so they would give the same judgements; remove one, or give it another model, "
                              "seed or judge mode")
        seen[sig] = role.name
        panel.append(PanelJudge(role.name, role.weight, jctx, mode, mode.principles(spec, constitution, spec.per_pair)))
    if store is not None:
        store.record_judges(run_id, [{"judge": j.name, "model": j.ctx.model, "sampling_hash": j.ctx.sampling_hash,
                                      "mode": j.mode.name, "weight": j.weight} for j in panel])
    return panel


def panel_jobs(panel: list[PanelJudge], pairs: list[Pair], run_id: str | None = None,
               principles: Any = None) -> list[Job]:
    """Every judge's jobs for ``pairs``, each routed to its judge's engine (``principles``: override
    the judges' own choice, e.g. an audit's naive principle; a reward model keeps its own)."""
    jobs = []
    for j in panel:
        choose = principles if principles is not None and j.mode.engine_kinds is None else j.principles
        for job in pair_jobs(j.ctx, j.mode, pairs, choose, run_id):
            job.route = j.name
            if job.then is not None:  # cot: the scored judgement after the rationale goes to the same judge
                job.then = _routed(job.then, j.name)
            jobs.append(job)
    return jobs


def _routed(then: Any, route: str) -> Any:
    """``then`` whose follow-up jobs go to the engine of ``route`` (without it a follow-up took the
    run's default engine: another judge's, or the policy's)."""
    def follow(rows: list[dict]) -> list:
        out = list(then(rows))
        for f in out:
            if isinstance(f, Job):
                f.route = route
        return out
    return follow
