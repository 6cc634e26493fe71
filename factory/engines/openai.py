"""OpenAI-compatible server engine (typically ``vllm serve``): concurrent HTTP requests with retries.

Why it looks like this:
- ``generate`` is an ordinary generator. The HTTP work runs on a private asyncio loop in a daemon
  thread (one per engine, so the connection pool survives across waves); completions come back
  through a thread-safe queue as each request finishes. At most ``max_concurrency`` requests are
  in flight, and tasks are created only as slots free up, so a million-request wave costs no memory.
- Every request yields exactly one completion. Timeouts, connection errors, 408/409/429 and 5xx
  are retried with exponential backoff and jitter (``Retry-After`` is honoured); after
  ``max_retries`` the request comes back ``failed`` with the last error. A 400 about the context
  length comes back ``skipped`` with the server's reason. Other 4xx are ``failed`` at once.
- Whole-run problems raise ``EndpointError`` instead: unreachable at start-up, a model name the
  endpoint does not serve, an endpoint that ignores vLLM's choice-token log-probability fields
  (``logprob_token_ids``), or a server that went away mid-run (a request ran out of retries on
  refused connections and ``/v1/models`` no longer answers). Stored ``failed`` rows are final on
  resume, so a dead server must stop the run rather than record every remaining row as failed.
- Prompt length: the server is the authority. Unlike the offline engine, vLLM's server clamps
  ``max_tokens`` to the room left in the context instead of rejecting, so a prompt that fits but
  leaves less than ``max_tokens`` room is generated (finish reason ``length``), not skipped.
- Seeds: by default every request carries ``seed`` = the engine seed (reproducible per request).
  Caution: on the CPU build of vLLM 0.32, seeded requests whose sampled token is discarded
  (a prompt prefilled in chunks) crash the server's engine ("CPU Generator does not use offset").
  Start such a server with ``--no-enable-chunked-prefill`` (verified: 48 seeded 1.5k-token prompts
  run clean), or pass ``seed_per_request=False`` and rely on the server's ``--seed``.
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import queue
import random
import re
import threading
import time
from typing import Any, Iterator, Sequence

import httpx

from .base import Completion, EngineError, Request

RETRY_STATUS = {408, 409, 425, 429}
LENGTH_ERROR = re.compile(r"context length|too long|maximum.*tokens", re.I)
NO_CHOICE_LOGPROBS = "this endpoint does not support choice-token log-probabilities; use a vLLM server"


class EndpointError(EngineError):
    """The endpoint cannot serve this run at all (unreachable, wrong model, missing features)."""


def _root(base_url: str) -> str:
    """``http://h:8000/v1`` and ``http://h:8000`` both mean the server root ``http://h:8000``."""
    url = base_url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def _error_text(resp: httpx.Response) -> str:
    try:
        err = resp.json()
        msg = err.get("error", err) if isinstance(err, dict) else err
        msg = msg.get("message", msg) if isinstance(msg, dict) else msg
    except ValueError:
        msg = resp.text
    return f"HTTP {resp.status_code}: {str(msg)[:500]}"


class OpenAIEngine:
    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        seed: int = 0,
        max_model_len: int = 2048,
        max_concurrency: int = 32,
        timeout_s: float = 120.0,
        max_retries: int = 6,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        seed_per_request: bool = True,
        tokenizer: str | None = None,
    ):
        """``model`` is the pipeline's model name (kept for lineage and content keys, so rows are
        keyed the same as with the offline engine); the endpoint must serve it under that name or
        under the local path it resolves to."""
        self.root = _root(base_url)
        self.model = model
        self.seed = seed
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.seed_per_request = seed_per_request
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._sync = httpx.Client(base_url=self.root, headers=self.headers, timeout=min(timeout_s, 30.0))
        served = self._models()
        self.served_model, info = self._match(model, served)
        self.max_model_len = int(info.get("max_model_len") or max_model_len)
        self._tokenizer_path = tokenizer or self._local_tokenizer(model, self.served_model)
        self._tokenizer: Any = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="openai-engine", daemon=True)
        self._thread.start()
        limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency)
        self._client = httpx.AsyncClient(base_url=self.root, headers=self.headers, timeout=timeout_s, limits=limits)

    # --- start-up -------------------------------------------------------------------------------
    def _models(self) -> dict[str, dict]:
        url = f"{self.root}/v1/models"
        try:
            resp = self._sync.get("/v1/models")
        except httpx.HTTPError as e:
            raise EndpointError(
                f"cannot reach the OpenAI-compatible endpoint {url} ({type(e).__name__}: {e}); is the server "
                "running (e.g. `vllm serve <model> --port 8000`) and engine.base_url right?"
            ) from e
        if resp.status_code in (401, 403):
            raise EndpointError(f"{url}: {_error_text(resp)}; set engine.api_key_env to the variable holding the key")
        if resp.status_code != 200:
            raise EndpointError(f"{url}: {_error_text(resp)}; is this an OpenAI-compatible server?")
        return {m["id"]: m for m in resp.json().get("data", [])}

    @staticmethod
    def _match(model: str, served: dict[str, dict]) -> tuple[str, dict]:
        from .. import models

        candidates = [model]
        try:
            candidates.append(models.resolve(model, pull=False))
        except models.ModelError:
            pass
        real = {os.path.realpath(s): s for s in served if os.path.exists(s)}
        for c in candidates:
            if c in served:
                return c, served[c]
            if os.path.exists(c) and os.path.realpath(c) in real:
                return real[os.path.realpath(c)], served[real[os.path.realpath(c)]]
        raise EndpointError(
            f"endpoint serves {sorted(served)}; set the pipeline's `model` to one of them "
            f"(or start the server with --served-model-name {model})"
        )

    @staticmethod
    def _local_tokenizer(model: str, served: str) -> str | None:
        from .. import models

        for name in (model, served):
            try:
                path = models.resolve(name, pull=False)
            except models.ModelError:
                continue
            if os.path.isdir(path):
                return path
        return None

    # --- tokens ---------------------------------------------------------------------------------
    def token_ids(self, text: str) -> list[int]:
        """The model's tokenizer when it is on disk here, else the server's ``/tokenize``."""
        if self._tokenizer_path:
            if self._tokenizer is None:
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(self._tokenizer_path)
            return self._tokenizer.encode(text, add_special_tokens=False)
        resp = self._sync.post("/tokenize", json={"model": self.served_model, "prompt": text, "add_special_tokens": False})
        if resp.status_code != 200:
            raise EndpointError(f"{self.root}/tokenize: {_error_text(resp)}; the endpoint cannot tokenize "
                                "(use a vLLM server, or a model available locally)")
        return list(resp.json()["tokens"])

    # --- generation -----------------------------------------------------------------------------
    def _body(self, req: Request) -> dict:
        s = req.sampling
        body: dict[str, Any] = {
            "model": self.served_model, "messages": req.messages, "max_tokens": s.max_tokens,
            "temperature": s.temperature, "top_p": s.top_p, "n": s.n,
        }
        if s.stop:
            body["stop"] = list(s.stop)
        if self.seed_per_request and self.seed is not None:
            body["seed"] = self.seed
        if req.continue_final:
            body.update(continue_final_message=True, add_generation_prompt=False)
        if req.option_ids:  # vLLM: log-probs of exactly these ids, reported as "token_id:<id>"
            body.update(logprobs=True, logprob_token_ids=list(req.option_ids), return_tokens_as_token_ids=True)
        return body

    def _completion(self, req: Request, data: dict) -> Completion:
        choices = sorted(data.get("choices") or [], key=lambda c: c.get("index", 0))
        usage = data.get("usage") or {}
        logprobs = None
        if req.option_ids:
            logprobs = {}
            content = ((choices[0].get("logprobs") or {}).get("content") or []) if choices else []
            for entry in content[0].get("top_logprobs", []) if content else []:
                tok = str(entry.get("token", ""))
                if tok.startswith("token_id:"):
                    logprobs[int(tok.split(":", 1)[1])] = float(entry["logprob"])
            if not set(req.option_ids) <= set(logprobs):
                raise EndpointError(NO_CHOICE_LOGPROBS)
            logprobs = tuple(logprobs[t] for t in req.option_ids)
        return Completion(
            key=req.key,
            texts=[(c.get("message") or {}).get("content") or "" for c in choices],
            finish_reasons=[str(c.get("finish_reason")) for c in choices],
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            option_logprobs=logprobs,
        )

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, 600.0)
        cap = min(self.max_backoff_s, self.backoff_s * 2**attempt)
        return cap / 2 + random.uniform(0, cap / 2)  # "equal jitter": spread retries, keep a floor

    async def _request(self, req: Request) -> Completion:
        body, error = self._body(req), "not attempted"
        refused = False
        for attempt in range(self.max_retries + 1):
            retry_after = None
            try:
                resp = await self._client.post("/v1/chat/completions", json=body)
            except httpx.TransportError as e:  # timeouts, refused/dropped connections, protocol errors
                error = f"{type(e).__name__}: {e or 'no detail'}"
                refused = isinstance(e, httpx.ConnectError)
            else:
                refused = False
                if resp.status_code == 200:
                    try:
                        return self._completion(req, resp.json())
                    except ValueError as e:  # a truncated body from a proxy: try again
                        error = f"invalid JSON in response: {e}"
                elif resp.status_code in RETRY_STATUS or resp.status_code >= 500:
                    error, retry_after = _error_text(resp), _retry_after(resp)
                else:
                    error = _error_text(resp)
                    if req.option_ids and "logprob_token_ids" in error:
                        raise EndpointError(f"{NO_CHOICE_LOGPROBS} ({error})")
                    status = "skipped" if resp.status_code == 400 and LENGTH_ERROR.search(error) else "failed"
                    return Completion(key=req.key, status=status, error=error)
            if attempt < self.max_retries:
                await asyncio.sleep(self._delay(attempt, retry_after))
        if refused and not await self._alive():  # the server is gone: stop rather than record failures
            raise EndpointError(f"the endpoint {self.root} went away mid-run ({error}); rows already written are kept: "
                                "rerun the same command once the server is back to resume")
        return Completion(key=req.key, status="failed", error=f"gave up after {self.max_retries + 1} attempts: {error}")

    async def _alive(self) -> bool:
        try:
            return (await self._client.get("/v1/models", timeout=10.0)).status_code == 200
        except httpx.HTTPError:
            return False

    async def _drive(self, requests: Sequence[Request], out: queue.Queue) -> None:
        slots = asyncio.Semaphore(self.max_concurrency)
        tasks: set[asyncio.Task] = set()

        async def one(req: Request) -> None:
            try:
                out.put(await self._request(req))
            except EndpointError as e:
                out.put(e)
            except Exception as e:  # a bug must not lose the request: report it on the row
                out.put(Completion(key=req.key, status="failed", error=f"client error: {e!r}"))
            finally:
                slots.release()

        try:
            for req in requests:
                await slots.acquire()
                task = asyncio.create_task(one(req))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            while tasks:
                await asyncio.wait(set(tasks))
        finally:
            for task in list(tasks):
                task.cancel()

    def generate(self, requests: Sequence[Request]) -> Iterator[Completion]:
        if not requests:
            return
        out: queue.Queue = queue.Queue()
        fut = asyncio.run_coroutine_threadsafe(self._drive(requests, out), self._loop)
        fut.add_done_callback(lambda f: None if f.cancelled() or f.exception() is None else out.put(f.exception()))
        try:
            for _ in range(len(requests)):
                item = out.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            fut.cancel()  # the consumer stopped early or an error was raised: drop what is in flight

    def close(self) -> None:
        if self._loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(self._client.aclose(), self._loop).result(timeout=5)
            except Exception:  # best effort
                pass
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
        self._sync.close()
