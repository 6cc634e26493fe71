"""A deterministic fake engine for tests, benchmarks and fault drills (never for data).

Text is a pure function of the request's content (so keys and resume logic can be tested without
vLLM); option log-probabilities are derived from a hash of the prompt. Its identity is
``fake:<alias>``, so its rows never share keys or a model name with a real engine's.

Knobs for tests: ``empty_every`` (every k-th request answers ""), ``fail_every`` (every k-th request
is a failed completion), ``die_after`` (raise after that many completions, like an engine crash),
``scoring``/``prefill`` (pretend to be an endpoint with top-k or no log-probs, or no prefill),
``latency_s`` (each request takes that long, as a slow model would: overlap benchmarks).
"""

from __future__ import annotations

import hashlib
import math
import time
from typing import Iterable, Iterator

from .base import Capabilities, Completion, EngineError, Request


class FakeEngine:
    def __init__(self, model: str = "fake", seed: int = 0, max_model_len: int = 2048, empty_every: int = 0,
                 fail_every: int = 0, die_after: int | None = None, scoring: str = "token_ids", prefill: bool = True,
                 latency_s: float = 0.0):
        self.model = model if model.startswith("fake:") else f"fake:{model}"
        self.seed = seed
        self.max_model_len = max_model_len
        self.empty_every = empty_every
        self.fail_every = fail_every
        self.die_after = die_after
        self.latency_s = latency_s
        self.capabilities = Capabilities(scoring=scoring, top_k=20 if scoring == "top_k" else 0, prefill=prefill)
        self.calls: list[int] = []  # requests received per generate() call that received any
        self.requests = 0

    def token_ids(self, text: str) -> list[int]:
        return [ord(ch) for ch in text]

    def _digest(self, req: Request, i: int = 0) -> str:
        """A pure function of what the request asks (messages and sampling), not of its key."""
        s = req.sampling
        text = "\x1e".join(f"{m['role']}\x1f{m['content']}" for m in req.messages)
        return hashlib.md5(f"{text}\0{s.max_tokens},{s.temperature},{s.top_p},{s.n},{s.stop}\0{self.seed}\0{i}"
                           .encode()).hexdigest()  # md5: not for security, a fast stand-in for a model

    def generate(self, requests: Iterable[Request | None]) -> Iterator[Completion]:
        got = 0
        try:
            for req in requests:
                if req is None:  # the caller has nothing right now; we hold nothing in flight
                    continue
                got += 1
                self.requests += 1
                if self.die_after is not None and self.requests > self.die_after:
                    raise EngineError(f"fake engine died after {self.die_after} completions (injected fault)")
                yield self._one(req)
        finally:
            if got:
                self.calls.append(got)

    def _one(self, req: Request) -> Completion:
        k = self.requests
        if self.latency_s:
            time.sleep(self.latency_s)
        if self.fail_every and k % self.fail_every == 0:
            return Completion(key=req.key, status="failed", error="injected engine error")
        n_prompt = sum(len(m["content"]) // 4 + 4 for m in req.messages)  # ~4 characters a token
        if n_prompt + req.sampling.max_tokens > self.max_model_len:
            return Completion(key=req.key, prompt_tokens=n_prompt, status="skipped",
                              error=f"prompt too long: {n_prompt} tokens > max_model_len {self.max_model_len}")
        texts = []
        for i in range(req.sampling.n):
            d = self._digest(req, i)
            words = [d[j:j + 5] for j in range(0, min(len(d), 5 * max(1, req.sampling.max_tokens // 8)), 5)]
            if req.options and req.sampling.max_tokens > 1:  # a sampled verdict: an option, or (1 in 8) not one
                b = int(d[:2], 16)
                texts.append("not sure" if b % 8 == 0 else ("(" * (b % 2)) + req.options[b % len(req.options)])
                continue
            texts.append("" if self.empty_every and k % self.empty_every == 0 else "fake " + " ".join(words))
        logprobs, floored = None, ()
        if req.options and self.capabilities.scoring != "none" and req.sampling.max_tokens == 1:
            d = self._digest(req)
            raw = [-(int(d[2 * j:2 * j + 2], 16) / 64.0) for j in range(len(req.options))]
            z = math.log(sum(math.exp(x) for x in raw)) + 0.1
            logprobs = tuple(x - z for x in raw)
            if self.capabilities.scoring == "top_k" and int(d[-1], 16) == 0:  # 1 in 16: second option not in top-k
                logprobs, floored = (logprobs[0], min(logprobs) - math.log(2)), (1,)
        return Completion(key=req.key, texts=texts, finish_reasons=["length"] * len(texts), prompt_tokens=n_prompt,
                          completion_tokens=sum(len(t.split()) for t in texts), option_logprobs=logprobs,
                          floored=floored)

    def close(self) -> None:
        pass
