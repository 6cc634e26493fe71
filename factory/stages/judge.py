"""RLAIF stage: judge each pair per principle in both orders, through a judge mode.

What is shared by every mode lives here: pairs (built from samples, SL runs or files), the seeded
choice of principles per pair, conversation truncation, the judge context, rendering, the content
key and the lineage of a judgement row. How one (pair, principle, order) is asked and read (a
log-prob step, a rationale first, sampled votes) is a judge mode: see :mod:`factory.judges`.

A judgement's key is a hash of everything that decides its messages and outcome (the model that
answers, engine seed, judge settings, template hash, pair id, principle hash, order, options,
rationale and, with ``judge.few_shot``, the hashes of the demonstrations shown): it is known without rendering, so a restart or a reused row costs no render. The
messages themselves are not stored: ``messages_hash`` is, and `factory show ID` re-renders them
from the stored inputs and checks both.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import uuid
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from ..constitution import Constitution, Principle
from ..engines.base import Sampling
from ..store import content_key, now
from ..templates import Template

ORDERS = ("ab", "ba")
# Bump when code (not the template) changes how judge messages are rendered (e.g. `truncate`).
RENDER_VERSION = 1


class OptionError(Exception):
    """The judge's option labels do not map to single tokens of this model."""


def option_token_ids(engine, options: list[str]) -> list[int] | None:
    """One token id per option label as it follows "(", checked at start-up; None where the engine
    matches options by text (a standard top-k endpoint without a tokenizer)."""
    caps = getattr(engine, "capabilities", None)
    try:
        toks_of = [engine.token_ids(opt) for opt in options]
    except Exception:
        if caps is not None and caps.scoring != "token_ids":
            return None
        raise
    ids = []
    for opt, toks in zip(options, toks_of):
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
    """All principles with a comparison question, or a seeded sample of ``per_pair`` of them for this
    pair (independent of batch order)."""
    pool = list(constitution.rl_principles)
    if per_pair is None or per_pair >= len(pool):
        return pool
    return random.Random(content_key(seed, pair_id)).sample(pool, per_pair)


def _canonical(value) -> str:
    """JSON exactly as :func:`factory.store.content_key` writes it."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)


def messages_hash(messages: list[dict]) -> str:
    """sha256 (16 hex) of the messages' roles and contents, unambiguously separated."""
    return hashlib.sha256("\x1e".join(f"{m['role']}\x1f{m['content']}" for m in messages).encode()).hexdigest()[:16]


def judge_messages(template: Template, conversation: list[dict], a: str, b: str, principle: Principle, order: str,
                   options: list[str], *, max_chars: int, prefill: bool = True, cot: bool = False,
                   rationale: str | None = None, demos: list[dict] | None = None) -> list[dict]:
    """The judge template rendered for one (pair, principle, order): every caller renders through here.
    ``demos``: few-shot turns (:mod:`factory.fewshot`), put after the system message: the shared prefix."""
    first, second = (a, b) if order == "ab" else (b, a)
    messages = template.render(conversation=truncate(conversation, max_chars), first=first, second=second,
                               principle=principle, options=list(options), cot=cot, rationale=rationale, prefill=prefill)
    if demos:
        from ..fewshot import insert

        messages = insert(messages, demos)
    return messages


@dataclass
class JudgeCtx:
    run_id: str
    model: str
    seed: int | None
    constitution: Constitution
    template: Template
    options: list[str]
    option_ids: list[int] | None
    sampling_hash: str  # -> configs: the judge settings (mode, options, truncation, sampling, engine seed)
    max_chars: int
    prefill: bool = True  # end with the answer prefix (else ask for a single letter)
    mode_settings: dict = field(default_factory=dict)
    skeletons: bool = True  # render each (pair, order) once and fill in the principles (checked, below)
    shots: Any = None  # few-shot demonstrations (factory.fewshot.JudgeShots), None without judge.few_shot

    def __post_init__(self) -> None:
        self._skel: dict[tuple[str, str], list] = {}
        self._uses: dict[tuple[str, str], int] = {}  # principles still to render per (pair, order)
        self._key_prefix: dict[str, str] = {}
        self._checked: bool | None = None if self.skeletons else False
        nonce = uuid.uuid4().hex
        self._marks = {f: f"\x00{nonce}:{f}\x00" for f in ("id", "critique", "revision", "comparison")}
        self._sentinel = SimpleNamespace(**self._marks, tags=[], weight=1.0, hash="")

    def render(self, pair: Pair, p: Principle, order: str, *, cot: bool = False, rationale: str | None = None
               ) -> list[dict]:
        """The template rendered in full: the reference that lineage checks and skeletons must match."""
        demos = self.shots.turns(self, pair.pair_id, cot=cot) if self.shots else None
        return judge_messages(self.template, pair.conversation, pair.a, pair.b, p, order, self.options,
                              max_chars=self.max_chars, prefill=self.prefill, cot=cot, rationale=rationale, demos=demos)

    def messages(self, pair: Pair, p: Principle, order: str, *, cot: bool = False, rationale: str | None = None
                 ) -> list[dict]:
        """The judge's messages. Every principle of a (pair, order) shares everything but the principle's
        text, so the template is rendered once per (pair, order) with unique marks in place of the
        principle's fields and each principle's text is put in (then each message stripped, as a full
        render does). Exact: on the first pair of a run every principle is rendered both ways and any
        difference (a template that branches on a principle's text, say) turns skeletons off."""
        if cot or rationale is not None or self._checked is False:
            return self.render(pair, p, order, cot=cot, rationale=rationale)
        if self._checked is None:
            sk = self._split(self.render(pair, self._sentinel, order))
            self._checked = all(self._fill(sk, q) == self.render(pair, q, order) for q in self.constitution.rl_principles)
            if not self._checked:
                return self.render(pair, p, order)
        key = (pair.pair_id, order)
        sk = self._skel.get(key)
        if sk is None:
            if len(self._skel) >= 65536:  # a safety net: entries normally leave with their last principle
                self._skel.clear()
            sk = self._skel[key] = self._split(self.render(pair, self._sentinel, order))
        left = self._uses.get(key, 1) - 1
        if left <= 0:
            self._skel.pop(key, None)
            self._uses.pop(key, None)
        else:
            self._uses[key] = left
        return self._fill(sk, p)

    def forget(self, pair_id: str, orders: tuple[str, ...] = ORDERS) -> None:
        """Drop what is kept to render ``pair_id`` (its skeletons and the principles still expected)."""
        for order in orders:
            self._skel.pop((pair_id, order), None)
            self._uses.pop((pair_id, order), None)

    def expect(self, pair: Pair, order: str, n: int) -> None:
        """``n`` principles of (pair, order) will be rendered: its skeleton is dropped after the last."""
        key = (pair.pair_id, order)
        self._uses[key] = self._uses.get(key, 0) + n

    def _fill(self, skeleton: list[tuple[str, list[str] | str]], p: Principle) -> list[dict]:
        out = []
        for role, parts in skeleton:
            if isinstance(parts, str):
                out.append({"role": role, "content": parts})
            else:  # text, field, text, field, …, text
                out.append({"role": role, "content": "".join(
                    getattr(p, x) if i % 2 else x for i, x in enumerate(parts)).strip()})
        return out

    def _split(self, messages: list[dict]) -> list[tuple[str, list[str] | str]]:
        """A sentinel render cut at the principle's marks: [text, field name, text, …] per message."""
        import re

        pattern = re.compile("(" + "|".join(re.escape(m) for m in self._marks.values()) + ")")
        names = {m: f for f, m in self._marks.items()}
        out = []
        for m in messages:
            pieces = pattern.split(m["content"])
            out.append((m["role"], m["content"]) if len(pieces) == 1 else
                       (m["role"], [names[x] if i % 2 else x for i, x in enumerate(pieces)]))
        return out

    def key(self, table: str, pair: Pair, p: Principle, order: str, rationale_id: str | None = None) -> str:
        """``content_key(table, model, seed, judge settings, template, RENDER_VERSION, pair, principle, order,
        options, rationale)``, its canonical JSON built from a per-table prefix computed once (the same
        bytes, so the same key: a judgement's key is computed millions of times a run)."""
        prefix = self._key_prefix.get(table)
        if prefix is None:
            head = _canonical([table, self.model, self.seed, self.sampling_hash, self.template.hash, RENDER_VERSION])
            prefix = self._key_prefix[table] = head[:-1] + ","
            self._options_json = _canonical(self.options)
        blob = (f"{prefix}{_canonical(pair.pair_id)},{_canonical(p.hash)},{_canonical(order)},"
                f"{self._options_json},{_canonical(rationale_id)}"
                + (f",{_canonical(self.shots.ident(pair.pair_id))}]" if self.shots else "]"))  # the demonstrations shown
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    def row(self, pair: Pair, p: Principle, order: str, run_id: str | None = None) -> dict:
        """The lineage every judgement (and rationale) row carries; ``messages_hash`` is added when rendered."""
        return {"run_id": run_id or self.run_id, "pair_id": pair.pair_id, "principle_id": p.id,
                "principle_hash": p.hash, "order": order, "constitution_hash": self.constitution.hash,
                "template_hash": self.template.hash, "model": self.model, "sampling_hash": self.sampling_hash}


def cache_order(jobs_by_cell: list[list]) -> list:
    """Order a chunk's jobs so vLLM's prefix cache can pay: the first principle of every (pair, order)
    first, which fills the cache with the shared [instructions][conversation][A][B] prefix; the other
    principles follow and hit it. (Identical prefixes scheduled in the same engine step are each
    computed, so sending everything at once reuses far less.) ``jobs_by_cell`` holds, per (pair,
    order), its jobs in principle order."""
    first = [cell[0] for cell in jobs_by_cell if cell]
    rest = [j for cell in jobs_by_cell for j in cell[1:]]
    return first + rest


def pairs_from_samples(samples: list[dict], conv: list[dict], prompt_id: str) -> list[dict]:
    """All unordered pairs of one prompt's ok samples; identical texts are recorded as skipped pairs."""
    ok = sorted((s for s in samples if s["status"] == "ok"), key=lambda s: s["sample_index"])
    return [pair_row(conv, x["text"], y["text"], source="sampled", prompt_id=prompt_id, a_id=x["id"], b_id=y["id"])
            for x, y in itertools.combinations(ok, 2)]


def pair_row(conversation: list[dict], a: str, b: str, *, source: str, prompt_id: str | None = None,
             a_id: str | None = None, b_id: str | None = None, run_id: str | None = None,
             pair_id: str | None = None, conversation_json: str | None = None, created_at: Any = None) -> dict:
    """A ``pairs`` row; ``pair_id``/``conversation_json`` when the caller already computed them (they
    must be ``content_key(conversation, a, b)`` and the conversation's JSON); ``created_at``: one time
    for a request's pairs (default: now)."""
    status, error = "ok", None
    if a.strip() == b.strip():
        status, error = "skipped", "identical responses: nothing to judge"
    elif not a.strip() or not b.strip():
        status, error = "skipped", "empty response"
    return {"pair_id": pair_id or content_key(conversation, a, b), "run_id": run_id, "source": source,
            "prompt_id": prompt_id, "conversation": conversation_json or json.dumps(conversation, ensure_ascii=False),
            "response_a": a, "response_b": b,
            "response_a_id": a_id, "response_b_id": b_id, "status": status, "error": error,
            "created_at": created_at or now()}


SCORE = Sampling(max_tokens=1, temperature=0.0)
