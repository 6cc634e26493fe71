"""OpenAI-compatible endpoint engine (``vllm serve``, SGLang, llama.cpp, hosted APIs): concurrent
HTTP requests with retries, option log-probs through whatever the endpoint supports.

Why it looks like this:
- ``generate`` takes any iterable, possibly a lazy generator over millions of requests that does
  database work as it is iterated. It is pulled only in the caller's thread (the one iterating
  ``generate``), and only while fewer than ``2 × max_concurrency`` requests are submitted and not
  yet handed back; each is submitted to a private asyncio loop (a daemon thread, one per engine,
  so the connection pool survives across calls), where at most ``max_concurrency`` are on the
  wire. Completions come back as they finish. Memory is bounded whatever the number of requests.
- Every request yields exactly one completion. Timeouts, connection errors, 408/409/425/429 and
  5xx are retried with exponential backoff and jitter (``Retry-After`` is honoured); after
  ``max_retries`` the request comes back ``failed`` with the last error. A body that is not JSON
  is retried too (a proxy cut it); JSON that is not a chat completion is ``failed`` at once. A
  400 about the context length comes back ``skipped`` with the server's reason. Other 4xx are
  ``failed`` at once.
- Whole-run problems raise ``EndpointError`` instead: unreachable at start-up, a bad key, a model
  name the endpoint does not serve, or a server that went away mid-run (a request ran out of
  retries on refused connections and the endpoint no longer answers). Stored ``failed`` rows are
  final on resume, so a dead server stops the run rather than recording every remaining row as
  failed; completions already yielded stay yielded and nothing in flight is reported.
- Start-up detects what the endpoint can do (``self.capabilities``; see ``endpoint.py``): option
  log-probs through vLLM's ``logprob_token_ids`` (exact token ids), the standard ``top_logprobs``
  (labels matched by token text; an option outside the top k gets a floor and is flagged in
  ``Completion.floored``), or none; and whether it continues a final assistant message. Each can be
  forced (``scoring``/``prefill``). One line on the ``factory`` logger says what was chosen. A
  request the endpoint cannot serve (options with no log-probs, a prefill it cannot continue) is
  an ``EngineError`` before anything is sent: the caller picks a mode that fits ``capabilities``.
- ``self.model`` is the id the endpoint reports for the model it serves (the pipeline's name is
  matched to it), so row keys and the ``model`` column name what really answered; when that id (or
  the ``root`` vLLM lists) is a folder on this machine, its weights fingerprint is added
  (``<id>@<fingerprint>``), and ``engine.model_id`` replaces it all (:func:`served_identity`).
- Token ids: the model's tokenizer when it is on disk here (or ``tokenizer=``), else the server's
  ``/tokenize``. Hosted endpoints have neither: ``token_ids`` raises ``EngineError`` saying so, and
  option scoring goes by token text (top-k).
- Prompt length: the server is the authority. vLLM's server clamps ``max_tokens`` to the room left
  in the context instead of rejecting, so a prompt that fits but leaves less than ``max_tokens``
  room is generated (finish reason ``length``), not skipped.
- Seeds: by default every request carries ``seed`` = the engine seed (reproducible per request).
  Caution: on the CPU build of vLLM 0.32, seeded requests whose sampled token is discarded (a
  prompt prefilled in chunks) crash the server's engine ("CPU Generator does not use offset").
  Start such a server with ``--no-enable-chunked-prefill``, or pass ``seed_per_request=False``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import email.utils
import logging
import os
import queue
import random
import re
import threading
import time
from typing import Any, Iterable, Iterator
from urllib.parse import urlsplit

import httpx

from . import endpoint as ep
from .base import Completion, EngineError, Request
from .endpoint import EndpointError

RETRY_STATUS = {408, 409, 425, 429}
LENGTH_ERROR = re.compile(r"context length|too long|maximum.*tokens", re.I)
NO_CHOICE_LOGPROBS = "this endpoint does not return log-probabilities for the given token ids (logprob_token_ids)"
log = logging.getLogger("factory.engines.openai")


class BadResponse(ValueError):
    """A JSON answer that is not an OpenAI chat completion."""


def api_key_from_env(name: str | None) -> str | None:
    """The API key from environment variable ``name`` (settings name the variable, never the key)."""
    if not name:
        return None
    key = os.environ.get(name)
    if not key:
        raise EngineError(f"engine.api_key_env names ${name}, which is not set; export {name}=<your key> first")
    return key


def split_url(base_url: str) -> tuple[str, str]:
    """``(api base, server root)``: ``http://h:8000/v1`` and ``http://h:8000`` both mean the API at
    ``http://h:8000/v1`` on the server ``http://h:8000`` (where vLLM's /tokenize and /health live);
    any other path (``https://host/v1beta/openai``) is the API base itself."""
    url = base_url.rstrip("/")
    if url.endswith("/v1"):
        return url, url[: -len("/v1")]
    if urlsplit(url).path in ("", "/"):
        return f"{url}/v1", url
    return url, url


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


def _announce(message: str) -> None:
    """One line a user running the CLI sees (the ``factory`` logger gets a stderr handler when the
    application configured none)."""
    root = logging.getLogger("factory")
    if not root.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
    log.info(message)


_END = object()  # the end of the request stream (None means "nothing right now")


def served_identity(served: str, info: dict, model_id: str | None = None) -> str:
    """What a served model's rows are keyed by: ``model_id`` when the pipeline gives one; else the server's
    id, with the weights fingerprint of the local folder it serves (its id, or the ``root`` vLLM lists)
    when there is one, so a checkpoint retrained into the same folder and served again gets new keys
    (as offline engines do, :func:`factory.models.identity`)."""
    if model_id:
        return model_id
    from .. import models

    for folder in (served, info.get("root")):
        if isinstance(folder, str) and folder and os.path.isdir(os.path.expanduser(folder)):
            return f"{served}@{models.fingerprint(os.path.expanduser(folder))}"
    return served


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
        scoring: str = "auto",
        top_logprobs: int = 20,
        prefill: bool | str = "auto",
        tokenizer: str | None = None,
        model_id: str | None = None,
    ):
        """``model`` is the pipeline's model name; the endpoint must serve it under that name or
        under the local path it resolves to. ``scoring`` (auto | token_ids | top_k | none) and
        ``prefill`` (auto | True | False) force what is otherwise detected."""
        self.api, self.root = split_url(base_url)
        self.seed = seed
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.seed_per_request = seed_per_request
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._sync = httpx.Client(base_url=self.api, headers=self.headers, timeout=min(timeout_s, 30.0))
        try:
            served = self._models()
            self.served_model, info = ep.match_served(model, served) if served is not None else (model, {})
            self.model = served_identity(self.served_model, info, model_id)  # what answers, in row keys
            self.max_model_len = int(info.get("max_model_len") or max_model_len)
            self._tokenizer_path = tokenizer or ep.local_tokenizer(model, self.served_model)
            self._tokenizer: Any = None
            self._tokenize_error: str | None = None
            self.capabilities, self.detection = ep.detect(self._probe, self.served_model, self.token_ids,
                                                           scoring=scoring, k=top_logprobs, prefill=prefill)
        except BaseException:
            self._sync.close()
            raise
        _announce(f"openai engine {self.api} ({self.model}): option scoring {self.capabilities.scoring} — "
                  f"{self.detection['scoring']}; prefill {'yes' if self.capabilities.prefill else 'no'} — "
                  f"{self.detection['prefill']}")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="openai-engine", daemon=True)
        self._thread.start()
        self._slots: asyncio.Semaphore | None = None  # created on the loop
        limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency)
        self._client = httpx.AsyncClient(base_url=self.api, headers=self.headers, timeout=timeout_s, limits=limits)

    # --- start-up -------------------------------------------------------------------------------
    def _models(self) -> dict[str, dict] | None:
        """The models the endpoint lists (None when it has no /models: then the name is taken as is)."""
        url = f"{self.api}/models"
        try:
            resp = self._sync.get("models")
        except httpx.HTTPError as e:
            raise EndpointError(
                f"cannot reach the OpenAI-compatible endpoint {url} ({type(e).__name__}: {e}); is the server "
                "running (e.g. `vllm serve <model> --port 8000`) and engine.base_url right?"
            ) from e
        if resp.status_code in (401, 403):
            raise EndpointError(f"{url}: {_error_text(resp)}; set engine.api_key_env to the variable holding the key")
        if resp.status_code == 404:
            return None
        if resp.status_code != 200:
            raise EndpointError(f"{url}: {_error_text(resp)}; is this an OpenAI-compatible server?")
        try:
            return {m["id"]: m for m in resp.json().get("data", [])}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise EndpointError(f"{url}: the model list is not in OpenAI's format ({e!r})") from None

    def _probe(self, body: dict) -> tuple[int, Any, str]:
        """One start-up request (transient failures retried like any request): ``(status, json, error)``."""
        error = "not attempted"
        for attempt in range(self.max_retries + 1):
            retry_after = None
            try:
                resp = self._sync.post("chat/completions", json=body)
            except httpx.TransportError as e:
                error = f"{type(e).__name__}: {e or 'no detail'}"
            else:
                if resp.status_code == 200:
                    try:
                        return 200, resp.json(), ""
                    except ValueError as e:
                        error = f"invalid JSON in response: {e}"
                elif resp.status_code in (401, 403):
                    raise EndpointError(f"{self.api}/chat/completions: {_error_text(resp)}; "
                                        "set engine.api_key_env to the variable holding the key")
                elif resp.status_code == 404:
                    raise EndpointError(f"{self.api}/chat/completions: {_error_text(resp)}; check engine.base_url "
                                        "and the pipeline's `model`")
                elif resp.status_code in RETRY_STATUS or resp.status_code >= 500:
                    error, retry_after = _error_text(resp), _retry_after(resp)
                else:
                    return resp.status_code, None, _error_text(resp)
            time.sleep(self._delay(attempt, retry_after))
        raise EndpointError(f"{self.api}/chat/completions keeps failing at start-up: {error}")

    # --- tokens ---------------------------------------------------------------------------------
    def token_ids(self, text: str) -> list[int]:
        """The model's tokenizer when it is on disk here, else the server's ``/tokenize``; an
        ``EngineError`` where neither exists (hosted APIs): match option labels by text instead."""
        if self._tokenizer_path:
            if self._tokenizer is None:
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(self._tokenizer_path)
            return self._tokenizer.encode(text, add_special_tokens=False)
        if self._tokenize_error:
            raise EngineError(self._tokenize_error)
        url = f"{self.root}/tokenize"
        try:
            resp = self._sync.post(url, json={"model": self.served_model, "prompt": text, "add_special_tokens": False})
            tokens = resp.json()["tokens"] if resp.status_code == 200 else None
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
            resp, tokens = None, f"{type(e).__name__}: {e}"
        if not isinstance(tokens, list):
            self._tokenize_error = (
                f"token ids of {self.served_model} are unavailable: {url} answered "
                f"{_error_text(resp) if resp is not None else tokens} and no local tokenizer was found; option "
                "scoring matches labels by token text (top_logprobs) instead; set engine.tokenizer to a local "
                "tokenizer folder to use token ids")
            raise EngineError(self._tokenize_error)
        return [int(t) for t in tokens]

    # --- one request ----------------------------------------------------------------------------
    def _use_ids(self, req: Request) -> bool:
        return bool(req.option_ids) and self.capabilities.scoring == "token_ids"

    def _check(self, req: Request) -> None:
        """Refuse, before sending anything, a request this endpoint cannot answer as asked."""
        caps = self.capabilities
        if req.continue_final and not caps.prefill:
            raise EngineError(
                f"the endpoint {self.api} cannot continue a final assistant message ({self.detection['prefill']}); "
                "use a judge template that asks for a single letter without an answer prefix, or set "
                "engine.prefill: true if it does")
        if req.options and not self._use_ids(req):
            if caps.scoring == "token_ids" and not caps.top_k:
                raise EngineError("engine.scoring is token_ids but the request has no option token ids")
            if not caps.top_k:
                raise EngineError(f"the endpoint {self.api} returns no option log-probabilities "
                                  f"({self.detection['scoring']}); use a sampled-verdict judge (judge.mode: vote)")
            if not ep.distinct_labels(req.options):
                raise EngineError(f"option labels {list(req.options)} cannot be told apart by token text; "
                                  "choose distinct labels such as A/B")

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
        if req.options and self._use_ids(req):  # vLLM: log-probs of exactly these ids, as "token_id:<id>"
            body.update(logprobs=True, logprob_token_ids=list(req.option_ids), return_tokens_as_token_ids=True)
        elif req.options:
            body.update(logprobs=True, top_logprobs=self.capabilities.top_k)
        return body

    def _completion(self, req: Request, data: Any) -> Completion:
        choices = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices, list) or not choices or not all(isinstance(c, dict) for c in choices):
            raise BadResponse(f"no `choices` list in {str(data)[:200]!r}")
        choices = sorted(choices, key=lambda c: c.get("index", 0))
        usage = data.get("usage") or {}
        logprobs, floored = None, ()
        if req.options:
            pos = ep.first_position(choices[0])
            if self._use_ids(req):
                got = {int(t.split(":", 1)[1]): x for t, x in ep.top_entries(pos) if t.startswith("token_id:")}
                if not set(req.option_ids) <= set(got):
                    raise EndpointError(NO_CHOICE_LOGPROBS)
                logprobs = tuple(got[t] for t in req.option_ids)
            else:
                try:
                    logprobs, floored = ep.option_logprobs(req.options, pos or {})
                except ValueError as e:
                    return Completion(key=req.key, status="failed", error=f"no option log-probs in the answer: {e}")
        return Completion(
            key=req.key,
            texts=[(c.get("message") or {}).get("content") or "" for c in choices],
            finish_reasons=[str(c.get("finish_reason")) for c in choices],
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            option_logprobs=logprobs,
            floored=floored,
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
                resp = await self._client.post("chat/completions", json=body)
            except httpx.TransportError as e:  # timeouts, refused/dropped connections, protocol errors
                error = f"{type(e).__name__}: {e or 'no detail'}"
                refused = isinstance(e, httpx.ConnectError)
            else:
                refused = False
                if resp.status_code == 200:
                    try:
                        data = resp.json()
                    except ValueError as e:  # a truncated body from a proxy: try again
                        error = f"invalid JSON in response: {e}"
                    else:
                        try:
                            return self._completion(req, data)
                        except (BadResponse, KeyError, TypeError, ValueError) as e:
                            return Completion(key=req.key, status="failed",
                                              error=f"response is not an OpenAI chat completion: {e}")
                elif resp.status_code in RETRY_STATUS or resp.status_code >= 500:
                    error, retry_after = _error_text(resp), _retry_after(resp)
                else:
                    error = _error_text(resp)
                    if self._use_ids(req) and "logprob_token_ids" in error:
                        raise EndpointError(f"{NO_CHOICE_LOGPROBS} ({error})")
                    status = "skipped" if resp.status_code == 400 and LENGTH_ERROR.search(error) else "failed"
                    return Completion(key=req.key, status=status, error=error)
            if attempt < self.max_retries:
                await asyncio.sleep(self._delay(attempt, retry_after))
        if refused and not await self._alive():  # the server is gone: stop rather than record failures
            raise EndpointError(f"the endpoint {self.api} went away mid-run ({error}); rows already written are kept: "
                                "rerun the same command once the server is back to resume")
        return Completion(key=req.key, status="failed", error=f"gave up after {self.max_retries + 1} attempts: {error}")

    async def _alive(self) -> bool:
        try:
            return (await self._client.get("models", timeout=10.0)).status_code < 500
        except httpx.HTTPError:
            return False

    async def _one(self, req: Request, out: queue.Queue) -> None:
        """Run one request under the concurrency limit; put exactly one item (a completion or the
        run-stopping EndpointError) on ``out`` unless cancelled."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_concurrency)
        async with self._slots:
            try:
                out.put(await self._request(req))
            except EndpointError as e:
                out.put(e)
            except Exception as e:  # a bug must not lose the request: report it on the row
                out.put(Completion(key=req.key, status="failed", error=f"client error: {e!r}"))

    # --- many requests --------------------------------------------------------------------------
    def generate(self, requests: Iterable[Request | None]) -> Iterator[Completion]:
        it = iter(requests)
        out: queue.Queue = queue.Queue()
        window = 2 * self.max_concurrency
        futures: set[concurrent.futures.Future] = set()
        waiting = 0  # submitted and not yet handed back
        more = True
        try:
            while True:
                while more and waiting < window:  # pull lazily, in this (the caller's) thread
                    req = next(it, _END)
                    if req is _END:
                        more = False
                        break
                    if req is None:  # the caller has nothing right now: pull again after a completion
                        break
                    self._check(req)
                    futures.add(asyncio.run_coroutine_threadsafe(self._one(req, out), self._loop))
                    waiting += 1
                if not waiting:
                    if more:
                        continue  # None with nothing in flight: the caller makes progress on its own
                    return
                item = out.get()
                waiting -= 1
                if isinstance(item, BaseException):
                    raise item
                if len(futures) > 2 * window:
                    futures = {f for f in futures if not f.done()}
                yield item
        finally:
            for f in futures:  # the consumer stopped early or an error was raised: drop what is in flight
                f.cancel()

    def close(self) -> None:
        if self._loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(self._client.aclose(), self._loop).result(timeout=5)
            except Exception:  # best effort
                pass
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
        self._sync.close()
