"""Client adapters for online trainers. Nothing here imports a trainer (or torch) at import time.

- :func:`reward_function` → a TRL reward function for ``GRPOTrainer(reward_funcs=…)`` (and, on TRL
  1.x, ``trl.experimental.online_dpo.OnlineDPOTrainer(reward_funcs=…)``, which took a pairwise judge
  before TRL removed its judges): ``(prompts, completions, **kwargs) -> list[float]``; completions of
  the same prompt form a group (GRPO's generations) and each gets its mean win probability in the
  group (``POST /v1/rewards``), one request per group, sent concurrently.
- :func:`pairwise_judge` → a judge with TRL's ``BasePairwiseJudge`` interface,
  ``judge(prompts, completions, shuffle_order=True) -> list[int]`` (the index of the better of two
  completions, -1 where no judgement was valid), for TRL versions whose ``OnlineDPOTrainer`` takes
  ``judge=`` (it subclasses ``BasePairwiseJudge`` when the installed TRL still has one). The service
  judges both orders itself, so ``shuffle_order`` changes nothing.
- OpenRLHF needs no client: pass ``--remote_rm_url http://HOST:PORT/v1/openrlhf`` (its request
  ``{"query", "prompts", "labels"}`` carries one response per sample; the service groups the
  samples of a prompt and compares them, or with ``?reference=labels`` compares each with its label).

Failures are never silent: a 429 is retried after its ``Retry-After``; a 503 (the judge is down) or
any other refusal raises :class:`JudgeServiceError` with the service's reason.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable


class JudgeServiceError(RuntimeError):
    """The judge service refused or could not answer (its reason is in the message)."""


class JudgeClient:
    def __init__(self, url: str, *, token: str | None = None, timeout_s: float = 600.0, retries: int = 20,
                 max_connections: int = 16):
        import httpx

        self.url = url.rstrip("/")
        self.retries = retries
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(timeout=timeout_s, headers=headers,
                                  limits=httpx.Limits(max_connections=max_connections))

    def _post(self, path: str, body: dict) -> dict:
        import httpx

        for attempt in range(self.retries + 1):
            try:
                r = self._http.post(self.url + path, json=body)
            except httpx.TransportError as e:
                if attempt == self.retries:
                    raise JudgeServiceError(f"{self.url}{path}: {type(e).__name__}: {e}") from e
                time.sleep(min(2 ** attempt * 0.1, 5.0))
                continue
            if r.status_code == 429 and attempt < self.retries:
                time.sleep(float(r.headers.get("retry-after", "1")))
                continue
            if r.status_code != 200:
                try:
                    reason = r.json().get("error", r.text)
                except ValueError:
                    reason = r.text
                raise JudgeServiceError(f"{self.url}{path} answered {r.status_code}: {reason}")
            return r.json()
        raise JudgeServiceError(f"{self.url}{path}: still busy after {self.retries} retries")

    def preference(self, prompt: str | list[dict], a: str, b: str) -> dict:
        return self._post("/v1/preference", {"prompt": prompt, "responses": [a, b]})

    def preferences(self, items: list[tuple[str | list[dict], str, str]]) -> list[dict]:
        """Many pairs ``(prompt, a, b)`` in one request (``POST /v1/preferences``), answers in order."""
        body = {"items": [{"prompt": p, "responses": [a, b]} for p, a, b in items]}
        return self._post("/v1/preferences", body)["results"]

    def rewards(self, prompt: str | list[dict], completions: list[str], *, reference: str | None = None,
                opponents: int | None = None, seed: int = 0) -> list[float]:
        body: dict[str, Any] = {"prompt": prompt, "completions": completions, "seed": seed}
        if reference is not None:
            body["reference"] = reference
        if opponents is not None:
            body["opponents"] = opponents
        return self._post("/v1/rewards", body)["rewards"]

    def close(self) -> None:
        self._http.close()


def text_of(completion: Any) -> str:
    """A completion's text: a string, or TRL's conversational form (a list of messages: the assistant's
    content, concatenated)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return "".join(m.get("content") or "" for m in completion if m.get("role", "assistant") == "assistant")
    if isinstance(completion, dict):
        return str(completion.get("content") or "")
    raise TypeError(f"cannot read a completion of type {type(completion).__name__}")


def _prompt_of(prompt: Any) -> str | list[dict]:
    if isinstance(prompt, str):
        return prompt
    return [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else text_of(m["content"])}
            for m in prompt]


def reward_function(url: str, *, token: str | None = None, opponents: int | None = None, seed: int = 0,
                    max_workers: int = 8, name: str = "constitutional_judge",
                    client: JudgeClient | None = None) -> Callable[..., list[float]]:
    """A TRL reward function backed by the judge service at ``url`` (module docstring)."""
    c = client or JudgeClient(url, token=token, max_connections=max_workers)

    def reward(prompts: list, completions: list, **kwargs: Any) -> list[float]:
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(json.dumps(p, sort_keys=True, default=str), []).append(i)
        out: list[float] = [0.0] * len(completions)

        def one(idx: list[int]) -> None:
            got = c.rewards(_prompt_of(prompts[idx[0]]), [text_of(completions[i]) for i in idx],
                            opponents=opponents, seed=seed)
            for i, r in zip(idx, got):
                out[i] = float(r)

        with ThreadPoolExecutor(max_workers=max_workers) as pool:
            list(pool.map(one, groups.values()))  # list(): raise the first failure here
        return out

    reward.__name__ = name
    reward.client = c  # type: ignore[attr-defined]
    return reward


def pairwise_judge(url: str, *, token: str | None = None, max_workers: int = 8, batch: int = 64) -> Any:
    """A TRL pairwise judge backed by the judge service (module docstring): a trainer's batch goes in
    requests of ``batch`` pairs (``POST /v1/preferences``), ``max_workers`` of them at once."""
    base: type = object
    for where in ("trl.experimental.judges", "trl"):
        try:
            base = getattr(__import__(where, fromlist=["BasePairwiseJudge"]), "BasePairwiseJudge")
            break
        except (ImportError, AttributeError):
            continue

    class ServicePairwiseJudge(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            self.client = JudgeClient(url, token=token, max_connections=max_workers)

        def judge(self, prompts: list, completions: list, shuffle_order: bool = True,
                  return_scores: bool = False) -> list:
            def answer(r: dict):
                if return_scores:
                    return r["p_a"]
                if r.get("principles") and r["n_failed"] >= 2 * len(r["principles"]):
                    return -1  # no valid judgement
                return 0 if r["p_a"] >= 0.5 else 1

            def part(lo: int) -> list:
                items = [(_prompt_of(prompts[i]), *(text_of(x) for x in completions[i]))
                         for i in range(lo, min(lo + batch, len(prompts)))]
                return [answer(r) for r in self.client.preferences(items)]

            with ThreadPoolExecutor(max_workers=max_workers) as pool:
                return [x for got in pool.map(part, range(0, len(prompts), batch)) for x in got]

    return ServicePairwiseJudge()
