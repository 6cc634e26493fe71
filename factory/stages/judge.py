"""RLAIF stages: sample response pairs, then judge each pair per principle in both orders.

The judge's answer is read from the next-token log-probabilities of the option tokens after an
answer prefix ("The better option is ("), not from generated text: one decode step per label.
The chain-of-thought variant first generates a short rationale, then scores the options after it.
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass

from ..constitution import Constitution, Principle
from ..engines.base import Completion, Request, Sampling
from ..prefmath import renormalize
from ..runner import Job
from ..store import content_key, now
from ..templates import Template

SCORE = Sampling(max_tokens=1, temperature=0.0)
ORDERS = ("ab", "ba")


class OptionError(Exception):
    """The judge's option labels do not map to single tokens of this model."""


def option_token_ids(engine, options: list[str]) -> list[int]:
    """One token id per option label as it follows "(", checked at start-up."""
    ids = []
    for opt in options:
        toks = engine.token_ids(opt)
        if len(toks) != 1:
            raise OptionError(
                f"judge option '{opt}' is {len(toks)} tokens for model {engine.model} (ids {toks}); "
                "choose option labels that are single tokens (e.g. A/B or 1/2) in judge.options")
        ids.append(toks[0])
    if len(set(ids)) != len(ids):
        raise OptionError(f"judge options {options} map to the same token; choose distinct labels")
    return ids


@dataclass
class Pair:
    pair_id: str
    conversation: list[dict]
    a: str
    b: str


def truncate(conversation: list[dict], max_chars: int) -> list[dict]:
    """Keep the last turns whose text fits in ``max_chars`` (always the final user turn, cut if needed)."""
    kept, total = [], 0
    for turn in reversed(conversation):
        total += len(turn["content"])
        if kept and total > max_chars:
            break
        kept.append(turn)
    kept.reverse()
    if len(kept[0]["content"]) > max_chars:
        kept[0] = {**kept[0], "content": "…" + kept[0]["content"][-max_chars:]}
    return kept


def choose(constitution: Constitution, per_pair: int | None, seed: int, pair_id: str) -> list[Principle]:
    """All principles, or a seeded sample of ``per_pair`` for this pair (independent of batch order)."""
    pool = list(constitution.principles)
    if per_pair is None or per_pair >= len(pool):
        return pool
    return random.Random(content_key(seed, pair_id)).sample(pool, per_pair)


@dataclass
class JudgeCtx:
    run_id: str
    model: str
    seed: int | None
    constitution: Constitution
    template: Template
    options: list[str]
    option_ids: list[int]
    sampling_hash: str
    max_chars: int
    cot: bool = False
    cot_sampling: Sampling | None = None


def _messages(ctx: JudgeCtx, pair: Pair, p: Principle, order: str, rationale: str | None) -> list[dict]:
    first, second = (pair.a, pair.b) if order == "ab" else (pair.b, pair.a)
    return ctx.template.render(conversation=truncate(pair.conversation, ctx.max_chars), first=first, second=second,
                               principle=p, options=ctx.options, cot=ctx.cot, rationale=rationale)


def _base(ctx: JudgeCtx, pair: Pair, p: Principle, order: str, messages: list[dict]) -> dict:
    return {"run_id": ctx.run_id, "pair_id": pair.pair_id, "principle_id": p.id, "principle_hash": p.hash,
            "order": order, "constitution_hash": ctx.constitution.hash, "template_hash": ctx.template.hash,
            "model": ctx.model, "sampling_hash": ctx.sampling_hash, "messages": json.dumps(messages, ensure_ascii=False)}


def rationale_jobs(ctx: JudgeCtx, pairs: list[Pair], chosen: dict[str, list[Principle]]) -> list[Job]:
    """Chain-of-thought step 1: a short rationale per (pair, principle, order)."""
    jobs = []
    for pair in pairs:
        for p in chosen[pair.pair_id]:
            for order in ORDERS:
                m = _messages(ctx, pair, p, order, None)
                key = content_key("rationales", ctx.model, ctx.seed, ctx.cot_sampling.as_dict(), m)
                # pair_id/principle_id/order are not rationales columns (dropped on insert) but let the
                # caller match each rationale to its scoring request
                row = {**_base(ctx, pair, p, order, m), "prompt_id": pair.pair_id, "parent_id": None, "round": 0,
                       "principle_ids": json.dumps([p.id])}
                jobs.append(Job(Request(key, m, ctx.cot_sampling, continue_final=True), row))
    return jobs


def judge_jobs(ctx: JudgeCtx, pairs: list[Pair], chosen: dict[str, list[Principle]],
               rationales: dict[tuple[str, str, str], str] | None = None) -> list[Job]:
    """One scoring request per (pair, principle, order); with CoT, only where the rationale exists."""
    jobs = []
    for pair in pairs:
        for p in chosen[pair.pair_id]:
            for order in ORDERS:
                rationale = None
                if ctx.cot:
                    rationale = (rationales or {}).get((pair.pair_id, p.id, order))
                    if rationale is None:
                        continue
                m = _messages(ctx, pair, p, order, rationale)
                key = content_key("judgements", ctx.model, ctx.seed, ctx.sampling_hash, m, pair.pair_id, p.hash, order,
                                  ctx.options)
                row = {**_base(ctx, pair, p, order, m), "rationale": rationale}
                jobs.append(Job(Request(key, m, SCORE, options=tuple(ctx.options), option_ids=tuple(ctx.option_ids), continue_final=True), row))
    return jobs


def cache_waves(jobs: list[Job]) -> list[list[Job]]:
    """Split judge jobs so vLLM's prefix cache can pay: the first principle of every (pair, order)
    goes in a first wave, which fills the cache with the shared [instructions][conversation][A][B]
    prefix; the remaining principles follow and hit it. (Identical prefixes scheduled in the same
    engine step are each computed, so sending everything at once reuses far less.)"""
    first, rest, seen = [], [], set()
    for j in jobs:
        k = (j.row["pair_id"], j.row["order"])
        (rest if k in seen else first).append(j)
        seen.add(k)
    return [w for w in (first, rest) if w]


def judgement_row(option_ids: list[int]):
    """Completion → judgements row: option log-probs, renormalised P(first), P(a)."""

    def to_rows(job: Job, c: Completion) -> list[dict]:
        row = {**job.row, "id": job.request.key, "status": c.status, "error": c.error, "prompt_tokens": c.prompt_tokens,
               "completion_tokens": c.completion_tokens, "created_at": now(),
               "logprob_first": None, "logprob_second": None, "p_first": None, "p_a": None}
        if c.status == "ok":
            lp = c.option_logprobs
            if not lp or len(lp) != 2:
                row.update(status="failed", error=f"engine returned no log-probabilities for option tokens {option_ids}")
            else:
                first, second = lp
                p_first = float(renormalize(first, second))
                row.update(logprob_first=first, logprob_second=second, p_first=p_first,
                           p_a=p_first if job.row["order"] == "ab" else 1.0 - p_first)
        return [row]

    return to_rows


def sample_rows(job: Job, c: Completion) -> list[dict]:
    """A completion with n samples → n rows of ``samples`` (each keyed by request key + index)."""
    rows = []
    texts = c.texts or [None]
    for i, text in enumerate(texts):
        status, error = c.status, c.error
        if status == "ok" and not (text or "").strip():
            status, error = "failed", "empty model output"
        rows.append({**job.row, "id": content_key(job.request.key, i), "sample_index": i, "text": text,
                     "status": status, "error": error, "prompt_tokens": c.prompt_tokens,
                     "completion_tokens": c.completion_tokens // max(len(texts), 1),
                     "finish_reason": c.finish_reasons[i] if i < len(c.finish_reasons) else None, "created_at": now()})
    return rows


def pairs_from_samples(samples: list[dict], conv: dict[str, list[dict]]) -> list[dict]:
    """All unordered pairs of a prompt's ok samples; identical texts are recorded as skipped pairs."""
    by_prompt: dict[str, list[dict]] = {}
    for s in samples:
        if s["status"] == "ok":
            by_prompt.setdefault(s["prompt_id"], []).append(s)
    out = []
    for pid, group in by_prompt.items():
        group.sort(key=lambda s: s["sample_index"])
        for x, y in itertools.combinations(group, 2):
            out.append(pair_row(conv[pid], x["text"], y["text"], source="sampled", prompt_id=pid,
                                a_id=x["id"], b_id=y["id"]))
    return out


def pair_row(conversation: list[dict], a: str, b: str, *, source: str, prompt_id: str | None = None,
             a_id: str | None = None, b_id: str | None = None, run_id: str | None = None) -> dict:
    status, error = "ok", None
    if a.strip() == b.strip():
        status, error = "skipped", "identical responses: nothing to judge"
    elif not a.strip() or not b.strip():
        status, error = "skipped", "empty response"
    return {"pair_id": content_key(conversation, a, b), "run_id": run_id, "source": source, "prompt_id": prompt_id,
            "conversation": json.dumps(conversation, ensure_ascii=False), "response_a": a, "response_b": b,
            "response_a_id": a_id, "response_b_id": b_id, "status": status, "error": error, "created_at": now()}
