"""The engine protocol: what every backend (vLLM offline, OpenAI-compatible server, Ray, fake) offers.

Stages build ``Request``s and read ``Completion``s; they never know which backend answered.
``generate`` takes any iterable of requests, possibly a lazy generator over a whole run, and
yields completions as they finish (any order). An engine pulls requests only as it has room (a
bounded window in flight), and only from the caller's thread (the iterator may do database work),
so a run of millions of requests costs bounded memory and the engine's batch never drains between
chunks. ``capabilities`` says how the engine can score option tokens (see :class:`Capabilities`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterable, Iterator, Literal, Protocol


class EngineError(RuntimeError):
    """An engine that cannot be used as configured (unreachable server, wrong model, …)."""


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters of one request. ``n`` > 1 asks for several samples of one prompt."""

    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        return {**asdict(self), "stop": list(self.stop)}


@dataclass
class Request:
    key: str  # content key; echoed back on the completion
    messages: list[dict]
    sampling: Sampling
    # Score these option labels at the first generated position (use max_tokens=1): the engine
    # answers with one log-prob per option in ``Completion.option_logprobs``. ``option_ids`` are the
    # labels' single token ids where a tokenizer is known (vLLM offline and vLLM's token-id server
    # extension use them); a standard top-k endpoint matches the labels by token text instead.
    options: tuple[str, ...] | None = None
    option_ids: tuple[int, ...] | None = None
    # Continue the final (assistant) message instead of starting a new turn.
    continue_final: bool = False
    # A reward-model judgement: full chat conversations (the judged conversation + one assistant turn
    # each, in the order shown: first, second). A reward-model engine answers with
    # ``option_logprobs = (log σ(r1 − r2), log σ(r2 − r1))``.
    candidates: tuple[tuple[dict, ...], ...] | None = None


@dataclass
class Completion:
    key: str
    texts: list[str] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # one log-prob per ``Request.options`` entry (None when the request scored nothing)
    option_logprobs: tuple[float, ...] | None = None
    # indexes into ``Request.options`` that were not among a top-k answer and got the floor value
    floored: tuple[int, ...] = ()
    error: str | None = None  # set when the request could not run (e.g. prompt too long)
    status: str = "ok"  # ok | failed | skipped


@dataclass(frozen=True)
class Capabilities:
    """What an engine can do for a judge, detected or known at start-up (recorded in run lineage).

    ``scoring``: how the log-probabilities of given option tokens are obtained:
    ``token_ids`` (exactly those ids: vLLM offline, or vLLM's ``logprob_token_ids`` server
    extension), ``top_k`` (the standard OpenAI ``top_logprobs``: an option outside the top k gets
    a floor and is flagged on the completion), or ``none`` (no log-probs: only sampled verdicts).
    ``prefill``: the engine can continue a final assistant message (the judge's answer prefix).
    """

    scoring: Literal["token_ids", "top_k", "none"] = "token_ids"
    top_k: int = 0
    prefill: bool = True


class Engine(Protocol):
    model: str  # what really answers: a content fingerprint or the server's model id (lineage, keys)
    seed: int | None  # the engine seed actually applied (part of content keys)
    max_model_len: int
    capabilities: Capabilities

    def generate(self, requests: Iterable[Request]) -> Iterator[Completion]: ...

    def token_ids(self, text: str) -> list[int]: ...

    def close(self) -> None: ...
