"""A tiny OpenAI-compatible HTTP server for tests, with injectable faults (stdlib only).

Serves ``/v1/models``, ``/v1/chat/completions`` and ``/tokenize`` on 127.0.0.1 (a free port), in
OpenAI's response schema (``choices[].logprobs.content[].top_logprobs`` with token/logprob/bytes).
Answers are a pure function of the request, so tests compute expectations by hand:
- text: ``"echo: " + <last message content>``, finish reason ``stop``;
- usage: prompt_tokens = words of all messages + 1 end-of-turn per message + 1 for the generation
  prompt, like a chat template; a continued final assistant message (``prefill="honour"`` and
  ``continue_final_message``) has no end-of-turn, ``add_generation_prompt: false`` no generation
  prompt; completion_tokens = words of the text;
- log-probs at the first position come from ``top`` (token text → log-prob, best first; the first
  one is the "sampled" token), or from ``top_for[<substring of the last message>]``:
  ``top_logprobs: k`` answers the k best; ``logprob_token_ids`` (vLLM's extension, ``logprobs="ids"``)
  answers id ``t`` with the log-prob of the token ``chr(t)`` in ``top`` or else ``-t / 10``, in the
  ``token_id:<id>`` form, plus the sampled ``token_id:0`` at -0.01 (``/tokenize`` gives ``ord(c)``);
- a prompt longer than ``max_model_len`` words: HTTP 400 with vLLM's context-length message.

Switches: ``logprobs`` "ids" (vLLM: both), "top_k" (standard only, the extension ignored), "none"
(no ``logprobs`` field at all); ``prefill`` "honour" | "ignore" | "reject" (400 on the fields);
``strict`` (a hosted API: any field it does not know is a 400); ``tokenize`` / ``list_models``
(False: 404, as on hosted APIs); ``max_top_logprobs`` (a larger k is a 400); ``api_key`` (401 without it).

Faults: ``faults`` is a list of actions consumed by successive chat requests (any request), and
``sticky`` maps a substring of the last message to an action applied on every attempt. Actions:
an HTTP status such as ``"500"``, ``"503"``, ``"408"`` or ``"400"`` (an error body), ``"429"``
(with ``Retry-After: retry_after``), ``"slow"`` (sleep ``slow_s`` before answering), ``"drop"``
(close the connection without a response), ``"malformed"`` (200 with a cut-off JSON body),
``"notchat"`` (200 with JSON that has no ``choices``).
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# best first; sums to < 1 like a real distribution with a long tail
DEFAULT_TOP = [("A", -0.5), ("B", -1.5), (" A", -3.0), (" B", -3.5)] + [(f"t{i}", -6.0 - 0.1 * i) for i in range(30)]
KNOWN_FIELDS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop", "seed",
                "logprobs", "top_logprobs", "stream", "user", "presence_penalty", "frequency_penalty", "logit_bias"}


def entry(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


class FakeServer:
    def __init__(self, models=("fake-model",), *, port: int = 0, max_model_len: int = 2048, logprobs: str = "ids",
                 prefill: str = "honour", strict: bool = False, tokenize: bool = True, list_models: bool = True,
                 max_top_logprobs: int = 20, api_key: str | None = None, retry_after: float = 0.05, slow_s: float = 1.0):
        self.models = list(models)
        self.max_model_len = max_model_len
        self.logprobs = logprobs
        self.prefill = prefill
        self.strict = strict
        self.tokenize = tokenize
        self.list_models = list_models
        self.max_top_logprobs = max_top_logprobs
        self.api_key = api_key  # when set, requests without "Authorization: Bearer <api_key>" get a 401
        self.retry_after = retry_after
        self.slow_s = slow_s
        self.top: list[tuple[str, float]] = list(DEFAULT_TOP)
        self.top_for: dict[str, list[tuple[str, float]]] = {}
        self.faults: list[str] = []
        self.sticky: dict[str, str] = {}
        self.attempts: dict[str, int] = {}  # last message content -> chat requests received
        self.bodies: list[dict] = []
        self.auth: list[str | None] = []  # Authorization header of each chat request
        self.dead = False  # set by stop(): open keep-alive connections are dropped, as by a dying server
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> "FakeServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self.dead = True
        self.httpd.shutdown()
        self.httpd.server_close()

    def error(self, code: int, message: str) -> tuple[int, dict]:
        return code, {"error": {"message": message, "type": "BadRequestError", "code": code}}

    def answer(self, body: dict) -> tuple[int, dict]:
        unknown = sorted(set(body) - KNOWN_FIELDS)
        if self.strict and unknown:
            return self.error(400, f"Unrecognized request argument supplied: {unknown[0]}")
        flags = {"continue_final_message", "add_generation_prompt"} & set(body)
        if self.prefill == "reject" and flags:
            return self.error(400, f"Unrecognized request argument supplied: {sorted(flags)[0]}")
        msgs = body["messages"]
        last = msgs[-1]["content"]
        n_words = sum(len(m["content"].split()) for m in msgs)
        if n_words > self.max_model_len:
            return self.error(400, f"This model's maximum context length is {self.max_model_len} tokens. "
                                   f"However, your prompt contains {n_words} input tokens.")
        honour = self.prefill == "honour"
        n_prompt = n_words + len(msgs) + 1
        if honour and body.get("add_generation_prompt") is False:
            n_prompt -= 1
        if honour and body.get("continue_final_message"):
            n_prompt -= 1
        k = body.get("top_logprobs") or 0
        if k > self.max_top_logprobs:
            return self.error(400, f"top_logprobs must be <= {self.max_top_logprobs}, got {k}")
        text = f"echo: {last}"
        choice: dict = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop",
                        "logprobs": None}
        if body.get("logprobs") and self.logprobs != "none":
            top = next((t for s, t in self.top_for.items() if s in last), self.top)
            ids = body.get("logprob_token_ids")
            if ids and self.logprobs == "ids":
                by_text = dict(top)
                scored = [entry(f"token_id:{t}", by_text.get(chr(t), -t / 10)) for t in ids]
                pos = {**entry("token_id:0", -0.01), "top_logprobs": scored + [entry("token_id:0", -0.01)]}
            else:
                pos = {**entry(*top[0]), "top_logprobs": [entry(t, lp) for t, lp in top[:k]]}
            choice["logprobs"] = {"content": [pos]}
        else:
            del choice["logprobs"]  # no field at all
        choices = [{**choice, "index": i} for i in range(body.get("n", 1))]
        usage = {"prompt_tokens": n_prompt, "completion_tokens": len(text.split()) * len(choices),
                 "total_tokens": n_prompt + len(text.split()) * len(choices)}
        return 200, {"id": "chatcmpl-x", "object": "chat.completion", "created": 0, "model": body["model"],
                     "choices": choices, "usage": usage}

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out as separate writes

            def log_message(self, *args) -> None:
                pass

            def _send_raw(self, code: int, data: bytes, headers: dict | None = None) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

            def _send(self, code: int, payload: dict, headers: dict | None = None) -> None:
                self._send_raw(code, json.dumps(payload).encode(), headers)

            def _denied(self) -> bool:
                if server.api_key and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    self._send(401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}})
                    return True
                return False

            def do_GET(self) -> None:
                if server.dead:
                    self.close_connection = True
                    return
                if self._denied():
                    return
                if self.path == "/v1/models" and server.list_models:
                    data = [{"id": m, "object": "model", "max_model_len": server.max_model_len} for m in server.models]
                    self._send(200, {"object": "list", "data": data})
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if server.dead:
                    self.close_connection = True
                    return
                if self._denied():
                    return
                if self.path == "/tokenize" and server.tokenize:
                    self._send(200, {"tokens": [ord(c) for c in body["prompt"]], "count": len(body["prompt"])})
                    return
                if self.path != "/v1/chat/completions":
                    self._send(404, {"error": {"message": "not found"}})
                    return
                if body.get("model") not in server.models:
                    self._send(404, {"error": {"message": f"The model `{body.get('model')}` does not exist."}})
                    return
                last = body["messages"][-1]["content"]
                with server.lock:
                    server.bodies.append(body)
                    server.auth.append(self.headers.get("Authorization"))
                    server.attempts[last] = server.attempts.get(last, 0) + 1
                    action = next((a for s, a in server.sticky.items() if s in last), None)
                    if action is None and server.faults:
                        action = server.faults.pop(0)
                if action == "429":
                    self._send(429, {"error": {"message": "rate limited"}}, {"Retry-After": str(server.retry_after)})
                elif action is not None and action.isdigit():
                    self._send(int(action), {"error": {"message": f"injected {action}"}})
                elif action == "drop":
                    self.close_connection = True  # no response at all: the client sees a disconnect
                elif action == "malformed":
                    self._send_raw(200, b'{"id": "chatcmpl-x", "object": "chat.completion", "choices": [{"ind')
                elif action == "notchat":
                    self._send(200, {"object": "error", "message": "upstream overloaded"})
                else:
                    if action == "slow":
                        time.sleep(server.slow_s)
                    self._send(*server.answer(body))

        return Handler
