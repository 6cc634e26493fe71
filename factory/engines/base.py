"""The engine protocol: what every backend (vLLM offline, OpenAI-compatible server, Ray, fake) offers.

Stages build ``Request``s and read ``Completion``s; they never know which backend answered.
``generate`` takes a whole batch and yields completions as they finish (any order), so the
caller can write results in chunks while the engine keeps its batch full.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterator, Protocol, Sequence


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
    # Return the log-probabilities of exactly these token ids at the first generated position
    # (the preference judge reads its answer from them; use max_tokens=1).
    score_token_ids: list[int] | None = None
    # Continue the final (assistant) message instead of starting a new turn.
    continue_final: bool = False


@dataclass
class Completion:
    key: str
    texts: list[str] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    token_logprobs: dict[int, float] | None = None
    error: str | None = None  # set when the request could not run (e.g. prompt too long)
    status: str = "ok"  # ok | failed | skipped


class Engine(Protocol):
    model: str  # what produced the rows (lineage)
    seed: int | None  # the engine seed actually applied (part of content keys)
    max_model_len: int

    def generate(self, requests: Sequence[Request]) -> Iterator[Completion]: ...

    def token_ids(self, text: str) -> list[int]: ...

    def close(self) -> None: ...
