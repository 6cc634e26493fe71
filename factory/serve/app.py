"""The HTTP contract of the judge service (starlette), with its limits.

- ``POST /v1/preference`` ``{"prompt": str | messages, "responses": [a, b]}`` →
  ``{"p_a", "chosen", "tie", "principles": {id: {"ab": p, "ba": p}}, "pair_id", "n_failed", "cached"}``
- ``POST /v1/preferences`` ``{"items": [{"prompt", "responses": [a, b]}, ...]}`` →
  ``{"results": [<one /v1/preference answer per item, in order>]}``: many pairs in one request (a
  trainer's batch), handed to the batcher as one ticket and answered once all its judgements are
  committed (usually one transaction); per request the HTTP and commit costs are paid once instead of
  once a pair (at most ``max_batch_pairs`` items).
- ``POST /v1/rewards`` ``{"prompt", "completions": [...], "reference"?, "opponents"?, "seed"?}`` →
  ``{"rewards": [...], "pairs", "judgements", "cached"}`` (:mod:`factory.serve.rewards`)
- ``POST /v1/openrlhf`` OpenRLHF's ``--remote_rm_url`` shape ``{"query": [...], "prompts": [...],
  "labels": [...]}`` → ``{"rewards": [...]}``: responses are ``query[i]`` minus its ``prompts[i]``,
  grouped by prompt; ``?reference=labels`` compares each with its label instead of its group.
- ``GET /health`` (200 ok, 503 with the reason once the engine died or while stopping), ``GET /v1/stats``.

Every refusal is JSON ``{"error": "..."}`` saying what to fix: 400 malformed JSON, 413 body over
the cap, 422 a missing or wrong field (or too many completions), 429 + ``Retry-After`` over the
concurrency or queue limit, 503 engine dead, 504 past the per-request timeout (the judgements
still complete and are stored: the same request again is answered from the store).
"""

from __future__ import annotations

import asyncio
import hmac
import time
from dataclasses import asdict, dataclass
from typing import Annotated, Any, Literal

import pydantic_core
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ..review.security import LOOPBACK_NAMES, _hostname
from ..store import content_key
from . import rewards as R
from .batcher import Batcher, Ticket
from .judging import JudgePlan, conversation_of


@dataclass
class Limits:
    max_body_bytes: int = 1 << 20
    max_completions: int = 16
    max_batch_pairs: int = 256  # items of one /v1/preferences request
    max_concurrent: int = 64  # requests being judged at once; more: 429
    max_pending: int = 50_000  # judgements queued for the engine or the writer; more: 429
    timeout_s: float = 120.0
    retry_after_s: int = 1


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Message(_In):
    role: Literal["system", "user", "assistant"]
    content: str


Prompt = str | Annotated[list[Message], Field(min_length=1)]


class PreferenceIn(_In):
    prompt: Prompt
    responses: Annotated[list[str], Field(min_length=2, max_length=2)]


class PreferencesIn(_In):
    items: Annotated[list[PreferenceIn], Field(min_length=1)]


class RewardsIn(_In):
    prompt: Prompt
    completions: Annotated[list[str], Field(min_length=1)]
    reference: str | None = None
    opponents: int | None = Field(None, ge=1, description="sample this many opponents per completion (seeded)")
    seed: int = 0


class OpenRLHFIn(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenRLHF forks send more fields
    query: list[str]
    prompts: list[str]
    labels: list[Any] | None = None


class HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        self.status, self.message, self.headers = status, message, headers or {}


class _Json(JSONResponse):
    """A JSON answer encoded by pydantic's serializer (Rust): several times faster than ``json.dumps`` on
    a batch's answers; a non-finite float (never produced by the label rule) is written as null."""

    def render(self, content: Any) -> bytes:
        return pydantic_core.to_json(content, inf_nan_mode="null")


def _error(e: HTTPError) -> JSONResponse:
    return JSONResponse({"error": e.message}, status_code=e.status, headers=e.headers)


class JudgeApp:
    def __init__(self, batcher: Batcher, plan: JudgePlan, *, run_id: str, limits: Limits = Limits()):
        self.batcher, self.plan, self.run_id, self.limits = batcher, plan, run_id, limits
        self.active = 0
        self.refused: dict[int, int] = {}
        self.started = time.time()
        self.draining = False

    def routes(self) -> list[Route]:
        return [Route("/health", self.health), Route("/v1/stats", self.stats),
                Route("/v1/preference", self._wrap(self.preference), methods=["POST"]),
                Route("/v1/preferences", self._wrap(self.preferences), methods=["POST"]),
                Route("/v1/rewards", self._wrap(self.rewards), methods=["POST"]),
                Route("/v1/openrlhf", self._wrap(self.openrlhf), methods=["POST"])]

    # -- plumbing --------------------------------------------------------------------------------
    def _wrap(self, handler):
        async def endpoint(request: Request) -> JSONResponse:
            try:
                if self.batcher.fatal:
                    raise HTTPError(503, f"the judge is down ({self.batcher.fatal}); the service is exiting")
                if self.active >= self.limits.max_concurrent or self.batcher.pending() > self.limits.max_pending:
                    raise HTTPError(429, f"busy: {self.active} requests in progress, {self.batcher.pending()} judgements "
                                    "queued; retry after the Retry-After seconds",
                                    {"Retry-After": str(self.limits.retry_after_s)})
                self.active += 1
                try:
                    return _Json(await handler(request))
                finally:
                    self.active -= 1
            except HTTPError as e:
                self.refused[e.status] = self.refused.get(e.status, 0) + 1
                return _error(e)
        return endpoint

    async def _parse(self, request: Request, model: type[BaseModel]) -> Any:
        cap = self.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > cap:
            raise HTTPError(413, f"request body of {declared} bytes is over the {cap}-byte cap; send fewer or shorter texts")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > cap:
                raise HTTPError(413, f"request body is over the {cap}-byte cap; send fewer or shorter texts")
        try:
            return model.model_validate_json(bytes(body))
        except ValidationError as e:
            errs = e.errors(include_url=False)
            if any(x["type"] == "json_invalid" for x in errs):
                raise HTTPError(400, f"malformed JSON: {errs[0]['msg']}; send one JSON object") from None
            msg = "; ".join(f"{'.'.join(map(str, x['loc'])) or 'body'}: {x['msg']}" for x in errs[:5])
            raise HTTPError(422, f"invalid request: {msg}") from None

    async def _judge(self, items: list[tuple[list[dict], str, str]], *, each_cached: bool = False,
                     only_p: bool = False) -> tuple[list[dict], dict]:
        """Judge each ``(conversation, a, b)`` of one request as one ticket (one hand-over to the batcher
        and one wait, however many pairs): per pair its label and per-principle answers (with
        ``each_cached``: its own count of judgements answered from the store, ``cached``; with ``only_p``
        only its ``p_a``), and the request's counts (judgements, cached)."""
        per_pair = self.plan.pairs(items, self.run_id)
        jobs = [j for _, pj in per_pair for j in pj]
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def done(_t: Ticket) -> None:
            try:
                loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(None))
            except RuntimeError:  # the request's event loop is gone (its client left): nothing to tell
                pass

        ticket = Ticket(jobs=jobs, pairs=[row for row, _ in per_pair], done=done)
        self.batcher.submit(ticket)
        try:
            await asyncio.wait_for(asyncio.shield(fut), self.limits.timeout_s)
        except asyncio.TimeoutError:
            raise HTTPError(504, f"not judged within {self.limits.timeout_s:g} s; the judgements continue and are "
                            "stored: send the same request again to get them from the store") from None
        if ticket.error:
            raise HTTPError(503, f"not judged: {ticket.error}")
        answer = self._p_a if only_p else self._answer
        out = [answer(row, pj, ticket.got) for row, pj in per_pair]
        if each_cached:
            hits = set(ticket.hits)
            for ans, (_, pj) in zip(out, per_pair):
                ans["cached"] = sum(1 for j in pj if j.key in hits) if hits else 0
        return out, {"judgements": len({j.key for j in jobs}), "cached": ticket.cached}

    def _answer(self, row: dict, pj: list, got: dict) -> dict:
        """One pair's answer: its label, per-principle answers (and a panel's per-judge labels)."""
        if row["status"] != "ok":
            p = R.fixed_preference(row["response_a"], row["response_b"])
            return {"p_a": p, "chosen": None if p == 0.5 else ("a" if p > 0.5 else "b"), "tie": p == 0.5,
                    "principles": {}, "pair_id": row["pair_id"], "n_failed": 0, "skipped": row["error"]}
        cells = [(j.route, j.row["principle_id"], j.row["order"], *got[j.key]) for j in pj]
        lab = self.plan.label(cells)
        principles: dict[str, dict[str, dict]] = {}  # judge -> principle -> order -> P(a)
        for judge, pid, order, status, p in cells:
            principles.setdefault(judge, {}).setdefault(pid, {})[order] = p if status == "ok" else None
        failed = sum(1 for c in cells if c[3] != "ok" or c[4] is None)
        p_a = lab["p_a"]
        first = self.plan.panel[0].name
        ans = {"p_a": 0.5 if p_a is None else p_a, "chosen": lab["chosen"], "tie": p_a is None or lab["is_tie"],
               "principles": principles.get(first, {}), "pair_id": row["pair_id"], "n_failed": failed}
        if self.plan.is_panel:  # each judge's own label and answers; `principles` above: the first judge's
            own = lab["judges"] if self.plan.answer_rule.judges else {}
            ans.update(n_judges=lab["n_judges"], judges_agree=lab["judges_agree"], judges={
                j.name: {"p_a": own.get(j.name, {}).get("p_a"), "chosen": own.get(j.name, {}).get("chosen"),
                         "tie": own.get(j.name, {}).get("is_tie", False), "weight": j.weight,
                         "model": j.ctx.model, "principles": principles.get(j.name, {})}
                for j in self.plan.panel})
        return ans

    def _p_a(self, row: dict, pj: list, got: dict) -> dict:
        """Only the label's ``p_a`` (what a group's rewards use)."""
        if row["status"] != "ok":
            return {"p_a": R.fixed_preference(row["response_a"], row["response_b"])}
        p_a = self.plan.p_a([(j.route, j.row["principle_id"], j.row["order"], *got[j.key]) for j in pj])
        return {"p_a": 0.5 if p_a is None else p_a}

    # -- endpoints -------------------------------------------------------------------------------
    async def health(self, request: Request) -> JSONResponse:
        if self.batcher.fatal:
            return JSONResponse({"status": "down", "reason": self.batcher.fatal}, status_code=503)
        if self.draining or self.batcher.stopping:
            return JSONResponse({"status": "stopping"}, status_code=503)
        return JSONResponse({"status": "ok", "run_id": self.run_id, "model": self.plan.model})

    async def stats(self, request: Request) -> JSONResponse:
        s = asdict(self.batcher.stats)
        return JSONResponse({**s, "tokens": s["prompt_tokens"] + s["completion_tokens"], "run_id": self.run_id,
                             "in_progress": self.active, "queued_judgements": self.batcher.pending(),
                             "rss_mb": _rss_mb(), "duckdb_mb": self._duckdb_mb(),
                             "refused": {str(k): v for k, v in self.refused.items()},
                             "uptime_s": round(time.time() - self.started, 1)})

    async def preference(self, request: Request) -> dict:
        req = await self._parse(request, PreferenceIn)
        conv = conversation_of(_plain(req.prompt))
        out, meta = await self._judge([(conv, *req.responses)])
        return {**out[0], "cached": meta["cached"]}

    async def preferences(self, request: Request) -> dict:
        req = await self._parse(request, PreferencesIn)
        if len(req.items) > self.limits.max_batch_pairs:
            raise HTTPError(422, f"{len(req.items)} items is over the limit of {self.limits.max_batch_pairs} per "
                            "/v1/preferences request; split the batch")
        convs: dict[str, list[dict]] = {}  # a prompt string's conversation, once: its pairs share its JSON
        items = [((convs.get(it.prompt) or convs.setdefault(it.prompt, conversation_of(it.prompt)))
                  if isinstance(it.prompt, str) else conversation_of(_plain(it.prompt)), *it.responses)
                 for it in req.items]
        out, _ = await self._judge(items, each_cached=True)  # one ticket: one hand-over and one wait for the batch
        return {"results": out}

    async def rewards(self, request: Request) -> dict:
        req = await self._parse(request, RewardsIn)
        if len(req.completions) > self.limits.max_completions:
            raise HTTPError(422, f"{len(req.completions)} completions is over the limit of {self.limits.max_completions} "
                            "per request (a group costs k(k-1) judge calls per principle); send fewer, or use "
                            "`opponents`")
        return await self._group(conversation_of(_plain(req.prompt)), req.completions, req.reference, req.opponents,
                                 req.seed)

    async def _group(self, conv, completions, reference, m, seed) -> dict:
        opps = R.opponents(len(completions), m=m, reference=reference is not None, seed=seed,
                           salt=lambda: content_key(conv, completions, reference))
        text = lambda i: reference if i == R.REF else completions[i]  # noqa: E731
        pairs = R.pairs_of(opps)
        results, meta = await self._judge([(conv, text(i), text(j)) for i, j in pairs], only_p=True)
        p = {pair: r["p_a"] for pair, r in zip(pairs, results)}
        return {"rewards": R.group_rewards(opps, p), "pairs": len(pairs), **meta}

    async def openrlhf(self, request: Request) -> dict:
        req = await self._parse(request, OpenRLHFIn)
        if len(req.query) != len(req.prompts) or (req.labels is not None and len(req.labels) != len(req.query)):
            raise HTTPError(422, f"query ({len(req.query)}), prompts ({len(req.prompts)}) and labels "
                            f"({len(req.labels or [])}) must have one entry per sample")
        bad = [i for i, (q, p) in enumerate(zip(req.query, req.prompts)) if not q.startswith(p)]
        if bad:
            raise HTTPError(422, f"query[{bad[0]}] does not start with prompts[{bad[0]}]; send the prompt and the "
                            "prompt+response texts as OpenRLHF does")
        use_ref = request.query_params.get("reference") == "labels"
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(req.prompts):
            groups.setdefault(p if not use_ref else f"{i}", []).append(i)
        for idx in groups.values():
            if len(idx) > self.limits.max_completions:
                raise HTTPError(422, f"{len(idx)} samples of one prompt is over the limit of {self.limits.max_completions}")
        rewards = [0.0] * len(req.query)

        async def one(idx: list[int]) -> None:
            prompt = req.prompts[idx[0]]
            comps = [req.query[i][len(prompt):] for i in idx]
            ref = str(req.labels[idx[0]]) if use_ref and req.labels else None
            got = await self._group(conversation_of(prompt), comps, ref, None, 0)
            for i, r in zip(idx, got["rewards"]):
                rewards[i] = r

        await asyncio.gather(*(one(idx) for idx in groups.values()))
        return {"rewards": rewards}


    def _duckdb_mb(self) -> float | None:
        """DuckDB's own accounting of its memory (its buffer cache is capped by the store's memory limit)."""
        try:
            return round(self.batcher.store.one("SELECT sum(memory_usage_bytes) FROM duckdb_memory()")[0] / 2**20, 1)
        except Exception:  # noqa: BLE001 - a figure for operators, never a failed request
            return None


def _rss_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            return next(round(int(x.split()[1]) / 1024, 1) for x in f if x.startswith("VmRSS:"))
    except (OSError, StopIteration, ValueError):
        return None


def _plain(prompt: Any) -> Any:
    return prompt if isinstance(prompt, str) else [m.model_dump() for m in prompt]


class ApiGuard:
    """ASGI middleware: with a token, every request carries ``Authorization: Bearer TOKEN``; without one
    (loopback only) only loopback Host names are answered (no DNS rebinding). The bind rule itself is
    ``factory.review.security.check_bind``."""

    def __init__(self, app: Any, *, token: str | None):
        self.app, self.token = app, token

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            request = Request(scope)
            refused = None
            if self.token:
                given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
                if not given or not hmac.compare_digest(given.encode(), self.token.encode()):
                    refused = JSONResponse({"error": "this judge service needs its token: send "
                                            "`Authorization: Bearer TOKEN`"}, status_code=401)
            elif _hostname(request.headers.get("host") or "") not in LOOPBACK_NAMES:
                refused = JSONResponse({"error": "unexpected Host: this judge service answers only on localhost"},
                                       status_code=400)
            if refused is not None:
                return await refused(scope, receive, send)
        await self.app(scope, receive, send)


def create_app(japp: JudgeApp, *, token: str | None = None) -> Any:
    return ApiGuard(Starlette(routes=japp.routes()), token=token)
