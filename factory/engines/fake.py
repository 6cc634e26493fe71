"""A deterministic fake engine for fast unit tests only (never for data).

Text is a pure function of the request's content (so keys and resume logic can be tested without
vLLM); option-token log-probabilities are derived from a hash of the prompt.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Iterator, Sequence

from .base import Completion, Request


class FakeEngine:
    def __init__(self, model: str = "fake", seed: int = 0, max_model_len: int = 2048, empty_every: int = 0):
        self.model = model
        self.seed = seed
        self.max_model_len = max_model_len
        self.empty_every = empty_every  # every k-th request returns "" (to test failure handling)
        self.calls: list[int] = []  # batch sizes received

    def token_ids(self, text: str) -> list[int]:
        return [ord(ch) for ch in text]

    def _digest(self, req: Request, i: int = 0) -> str:
        blob = json.dumps([req.messages, req.sampling.as_dict(), self.seed, i], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def generate(self, requests: Sequence[Request]) -> Iterator[Completion]:
        self.calls.append(len(requests))
        for k, req in enumerate(requests, 1):
            n_prompt = sum(len(m["content"].split()) + 4 for m in req.messages)
            if n_prompt + req.sampling.max_tokens > self.max_model_len:
                yield Completion(key=req.key, prompt_tokens=n_prompt, status="skipped",
                                 error=f"prompt too long: {n_prompt} tokens > max_model_len {self.max_model_len}")
                continue
            texts = []
            for i in range(req.sampling.n):
                d = self._digest(req, i)
                words = [d[j:j + 5] for j in range(0, min(len(d), 5 * max(1, req.sampling.max_tokens // 8)), 5)]
                texts.append("" if self.empty_every and k % self.empty_every == 0 else "fake " + " ".join(words))
            logprobs = None
            if req.options:
                d = self._digest(req)
                raw = [-(int(d[2 * j:2 * j + 2], 16) / 64.0) for j in range(len(req.options))]
                z = math.log(sum(math.exp(x) for x in raw)) + 0.1
                logprobs = tuple(x - z for x in raw)
            yield Completion(key=req.key, texts=texts, finish_reasons=["length"] * len(texts), prompt_tokens=n_prompt,
                             completion_tokens=sum(len(t.split()) for t in texts), option_logprobs=logprobs)

    def close(self) -> None:
        pass
