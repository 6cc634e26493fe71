"""A tiny OpenAI-compatible HTTP server for tests, with injectable faults (stdlib only).

Serves ``/v1/models``, ``/v1/chat/completions`` and ``/tokenize`` on 127.0.0.1 (a free port).
Answers are a pure function of the request, so tests compute expectations by hand:
- text: ``"echo: " + <last message content>``, finish reason ``stop``;
- usage: prompt_tokens = total words of all messages, completion_tokens = words of the text;
- with ``logprob_token_ids`` (and ``supports_logprob_ids``): token id ``t`` gets logprob ``-t / 10``,
  plus the "sampled" token id 0 at logprob -0.01, in vLLM's ``token_id:<id>`` form;
- a prompt longer than ``max_model_len`` words: HTTP 400 with vLLM's context-length message.

Faults: ``faults`` is a list of actions consumed by successive chat requests (any request), and
``sticky`` maps a substring of the last message to an action applied on every attempt. Actions:
``"500"``, ``"503"``, ``"429"`` (with ``Retry-After: retry_after``), ``"slow"`` (sleep
``slow_s`` before answering), ``"drop"`` (close the connection without a response), ``"400"``.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeServer:
    def __init__(self, models=("fake-model",), *, port: int = 0, max_model_len: int = 2048,
                 supports_logprob_ids: bool = True, retry_after: float = 0.05, slow_s: float = 1.0):
        self.models = list(models)
        self.max_model_len = max_model_len
        self.supports_logprob_ids = supports_logprob_ids
        self.retry_after = retry_after
        self.slow_s = slow_s
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

    def answer(self, body: dict) -> tuple[int, dict]:
        msgs = body["messages"]
        last = msgs[-1]["content"]
        n_prompt = sum(len(m["content"].split()) for m in msgs)
        if n_prompt > self.max_model_len:
            return 400, {"error": {"message": f"This model's maximum context length is {self.max_model_len} tokens. "
                                              f"However, your prompt contains {n_prompt} input tokens.",
                                   "type": "BadRequestError", "code": 400}}
        text = f"echo: {last}"
        choice: dict = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        ids = body.get("logprob_token_ids")
        if body.get("logprobs") and ids and self.supports_logprob_ids:
            top = [{"token": f"token_id:{t}", "logprob": -t / 10} for t in ids] + [{"token": "token_id:0", "logprob": -0.01}]
            choice["logprobs"] = {"content": [{"token": "token_id:0", "logprob": -0.01, "top_logprobs": top}]}
        choices = [{**choice, "index": i} for i in range(body.get("n", 1))]
        usage = {"prompt_tokens": n_prompt, "completion_tokens": len(text.split()) * len(choices)}
        return 200, {"id": "x", "object": "chat.completion", "model": body["model"], "choices": choices, "usage": usage}

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _send(self, code: int, payload: dict, headers: dict | None = None) -> None:
                data = json.dumps(payload).encode()
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

            def do_GET(self) -> None:
                if server.dead:
                    self.close_connection = True
                    return
                if self.path == "/v1/models":
                    data = [{"id": m, "object": "model", "max_model_len": server.max_model_len} for m in server.models]
                    self._send(200, {"object": "list", "data": data})
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if server.dead:
                    self.close_connection = True
                    return
                if self.path == "/tokenize":
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
                if action in ("500", "503", "400"):
                    self._send(int(action), {"error": {"message": f"injected {action}"}})
                elif action == "429":
                    self._send(429, {"error": {"message": "rate limited"}}, {"Retry-After": str(server.retry_after)})
                elif action == "drop":
                    self.close_connection = True  # no response at all: the client sees a disconnect
                else:
                    if action == "slow":
                        time.sleep(server.slow_s)
                    self._send(*server.answer(body))

        return Handler
