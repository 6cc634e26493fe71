"""What a run takes from its constitution beyond the principle it asks about: the kind of principle
each stage needs, and the few-shot demonstrations put before a request.

Demonstrations are the constitution's ``examples:``. ``few_shot: k`` (SL pipelines) puts k
``kind: critique`` examples before each critique and revision request; ``judge: {few_shot: k}``
puts k ``kind: comparison`` examples before each judge request, each shown in both orders (A/B then
B/A, the label following the preferred response) so that they teach no position.

- A demonstration is rendered with the stage's own template (the request looks exactly like the
  real one), its system messages dropped and the example's answer added as the assistant's turn;
  demonstrations go right after the real request's system message(s), as earlier turns of the
  conversation. For the judge that is the shared prefix: [instructions][demonstrations]
  [conversation][A][B][question], so every principle and both orders of a pair reuse it.
- The choice is seeded and per item (per prompt and round for SL, per pair for judges), made on
  the examples' positions: editing one example changes only the requests that show it, so only
  their rows are made again (SL keys hash the messages; judge keys hash the chosen examples).
- A demonstration shows the requests of its own ``principle`` when it names one, else its own
  ``critique_request``/``revision_request`` (or ``question``), else the principle being asked
  (SL) or :data:`DEFAULT_QUESTION` (judges: the demonstrations stay the same for every principle).
- None of this exists when ``few_shot`` is 0: the messages, keys and run ids are the ones they were.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from .constitution import ComparisonExample, Constitution, CritiqueExample
from .store import content_key
from .yamlconf import ConfigError, error_at, load_yaml_data

DEFAULT_QUESTION = "Which response is better?"


def insert(messages: list[dict], demos: list[dict]) -> list[dict]:
    """``demos`` after the leading system message(s) of ``messages``."""
    if not demos:
        return messages
    n = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
    return messages[:n] + demos + messages[n:]


def pick(n: int, k: int, *parts: Any) -> list[int]:
    """k of ``range(n)``, seeded by ``parts`` (independent of batch order and of other items)."""
    if k <= 0 or n <= 0:
        return []
    return random.Random(content_key("few-shot", *parts)).sample(range(n), min(k, n))


def _turns(rendered: list[dict], answer: str) -> list[dict]:
    """A rendered request without its system messages, answered: a final assistant prefix (the judge's
    "The better option is (") is completed, else the answer is the assistant's turn."""
    turns = [dict(m) for m in rendered if m["role"] != "system"]
    if turns and turns[-1]["role"] == "assistant":
        turns[-1]["content"] += answer
    else:
        turns.append({"role": "assistant", "content": answer})
    return turns


def _stand_in(critique: str | None = None, revision: str | None = None, comparison: str | None = None):
    return SimpleNamespace(id="example", critique=critique, revision=revision, comparison=comparison, tags=[],
                           weight=1.0, hash="")


@dataclass
class SLShots:
    """Critique → revision demonstrations for one SL run."""

    constitution: Constitution
    k: int
    seed: int
    templates: dict  # stage -> Template (critique, revise)

    def __post_init__(self) -> None:
        self.pool: list[CritiqueExample] = self.constitution.examples_of("critique")

    def chosen(self, prompt_id: str, round: int) -> list[CritiqueExample]:
        return [self.pool[i] for i in pick(len(self.pool), self.k, self.seed, prompt_id, round)]

    def _principle(self, ex: CritiqueExample, current) -> Any:
        if ex.principle is not None:
            return self.constitution.principle(ex.principle)
        if ex.critique_request or ex.revision_request:
            return _stand_in(ex.critique_request or current.critique, ex.revision_request or current.revision)
        return current

    def critique(self, messages: list[dict], prompt_id: str, round: int, principle) -> list[dict]:
        demos = []
        for ex in self.chosen(prompt_id, round):
            conv = [t.model_dump() for t in ex.conversation]
            r = self.templates["critique"].render(conversation=conv[:-1], response=conv[-1]["content"],
                                                  principle=self._principle(ex, principle), round=1)
            demos += _turns(r, ex.critique)
        return insert(messages, demos)

    def revise(self, messages: list[dict], prompt_id: str, round: int, principles: list) -> list[dict]:
        demos = []
        for ex in self.chosen(prompt_id, round):
            conv = [t.model_dump() for t in ex.conversation]
            p = self._principle(ex, principles[0])
            r = self.templates["revise"].render(conversation=conv[:-1], response=conv[-1]["content"], round=1,
                                                critiques=[{"principle": p, "text": ex.critique}])
            demos += _turns(r, ex.revision)
        return insert(messages, demos)


def sl_shots(constitution: Constitution, cfg: Any, templates: dict) -> SLShots | None:
    """An SL run's demonstrations (None when ``few_shot`` is 0), chosen with ``principles.seed``."""
    k = getattr(cfg, "few_shot", 0) or 0
    return SLShots(constitution, k, cfg.principles.seed, templates) if k else None


@dataclass
class JudgeShots:
    """Labelled-pair demonstrations for one judge: the same for every principle and order of a pair."""

    constitution: Constitution
    k: int
    seed: int
    _turns: dict = field(default_factory=dict, repr=False)  # (example index, cot, prefill) -> its turns, both orders

    def __post_init__(self) -> None:
        self.pool: list[ComparisonExample] = self.constitution.examples_of("comparison")

    def chosen(self, pair_id: str) -> list[int]:
        return pick(len(self.pool), self.k, self.seed, pair_id)

    def ident(self, pair_id: str) -> list[str]:
        """What the demonstrations of a pair are, for its keys: the chosen examples' hashes in order."""
        return [self.pool[i].hash for i in self.chosen(pair_id)]

    def question(self, ex: ComparisonExample) -> Any:
        if ex.principle is not None:
            return self.constitution.principle(ex.principle)
        return _stand_in(comparison=ex.question or DEFAULT_QUESTION)

    def turns(self, jctx: Any, pair_id: str, *, cot: bool = False) -> list[dict]:
        """The demonstrations of ``pair_id`` as turns, rendered through the judge's template."""
        from .stages.judge import ORDERS, judge_messages

        out = []
        for i in self.chosen(pair_id):
            key = (i, cot, jctx.prefill)
            if key not in self._turns:
                ex, got = self.pool[i], []
                conv = [t.model_dump() for t in ex.conversation]
                use_cot = cot and ex.rationale is not None
                for order in ORDERS:
                    first_is_a = order == "ab"
                    label = jctx.options[0 if (ex.preferred == "a") == first_is_a else 1]
                    r = judge_messages(jctx.template, conv, ex.response_a, ex.response_b, self.question(ex), order,
                                       jctx.options, max_chars=jctx.max_chars, prefill=jctx.prefill, cot=use_cot,
                                       rationale=ex.rationale if use_cot else None)
                    prefixed = r[-1]["role"] == "assistant"
                    got += _turns(r, f"{label})" if prefixed else label)
                self._turns[key] = got
            out += self._turns[key]
        return out


def judge_shots(constitution: Constitution, spec: Any) -> JudgeShots | None:
    """The judge's demonstrations (None when ``judge.few_shot`` is 0 or absent)."""
    k = getattr(spec, "few_shot", 0) or 0
    return JudgeShots(constitution, k, spec.seed) if k else None


# --------------------------------------------------------- what a pipeline needs from its constitution

def _error(path: str, loc: tuple, message: str) -> ConfigError:
    _, marks = load_yaml_data(path)
    return error_at(path, marks, loc, message)


def _name(c: Constitution) -> str:
    return f"constitution '{c.name}' ({c.source or 'in code'})"


def check_sl(path: str, cfg: Any, c: Constitution) -> None:
    """An SL pipeline critiques with principles that have a critique and a revision, and shows
    ``few_shot`` critique demonstrations: each lack is an error at its line of the pipeline."""
    if not c.sl_principles:
        raise _error(path, ("constitution",), f"{_name(c)} has no principle with a critique and a revision "
                     f"(its {len(c.principles)} are comparison-only), which an SL run needs; add `critique` and "
                     "`revision` to some principles, or use this constitution in a prefs or audit pipeline")
    for i, pid in enumerate(cfg.principles.only or []):
        p = c.principle(pid)  # an unknown id is its own clear error
        if not p.sl:
            raise _error(path, ("principles", "only", i), f"principle '{pid}' has no critique and revision "
                         "(it is comparison-only, for judges); an SL run cannot critique with it: remove it")
    _check_shots(path, ("few_shot",), cfg.few_shot, c, "critique")


def check_judge(path: str, cfg: Any, c: Constitution) -> None:
    """A pipeline that judges needs principles with a comparison question, and ``judge.few_shot``
    comparison demonstrations."""
    if not c.rl_principles:
        raise _error(path, ("constitution",), f"{_name(c)} has no principle with a `comparison` question "
                     f"(its {len(c.principles)} are SL-only: critique and revision), which a judge needs; add "
                     "`comparison` to some principles, or use this constitution in an SL pipeline")
    naive = getattr(getattr(cfg, "audit", None), "naive_principle", None)
    if naive is not None and naive in c.ids and not c.principle(naive).rl:
        raise _error(path, ("audit", "naive_principle"), f"principle '{naive}' has no `comparison` question, "
                     "so a judge cannot use it; name a principle with a comparison")
    _check_shots(path, ("judge", "few_shot"), cfg.judge.few_shot, c, "comparison")


def _check_shots(path: str, loc: tuple, k: int, c: Constitution, kind: str) -> None:
    have = len(c.examples_of(kind))
    if k > have:
        raise _error(path, loc, f"few_shot: {k} needs {k} `kind: {kind}` examples in {_name(c)}, which has "
                     f"{have}; add examples to its `examples:` list or lower few_shot")
