"""The review app's safety rules, each in one place.

- **Binding.** Loopback (127.0.0.1, ::1, localhost) by default; any other address needs
  ``allow_remote`` and a token (:func:`check_bind`).
- **Token.** With a token, every request must carry it: ``?token=`` once (answered with an HttpOnly
  cookie and a redirect that drops it from the address bar), the cookie, or ``Authorization: Bearer``.
- **Host header.** Without a token only loopback host names are answered (a DNS-rebinding page on
  another site cannot talk to the app through a name of its own).
- **CSRF.** Every POST carries ``csrf`` (form field or ``X-CSRF-Token`` header) equal to an HMAC of
  the browser's session cookie under the workspace's secret; a cross-site page can neither read
  nor compute it. A POST whose ``Origin`` is another origin is refused as well.
- **Headers.** A Content-Security-Policy that allows scripts only from the app's own static files
  (no inline script, no ``eval``, no plugins, no framing), ``nosniff``, no referrer to other origins.
- Escaping is Jinja's autoescape (see ``web.py``); plots are SVG images, which never run scripts.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from typing import Any
from urllib.parse import urlencode

from starlette.datastructures import URL, MutableHeaders
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
SVG_CSP = "default-src 'none'; style-src 'unsafe-inline'"
SESSION_COOKIE = "review_session"
TOKEN_COOKIE = "review_token"


class BindError(ValueError):
    """A bind address that needs ``--allow-remote`` (and a token)."""


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, allow_remote: bool, token: str | None) -> str | None:
    """The token to require (generated when a remote bind gives none), or an error for a remote bind
    without ``allow_remote``."""
    if is_loopback(host):
        return token
    if not allow_remote:
        raise BindError(f"--host {host} would let other machines reach the review app (and every pair's text); "
                        "pass --allow-remote to mean it: a token is then required on every request "
                        "(--token, or one is generated and printed once)")
    return token or secrets.token_urlsafe(24)


def csrf_token(secret: bytes, session: str) -> str:
    return hmac.new(secret, f"csrf:{session}".encode(), hashlib.sha256).hexdigest()


def csrf_ok(request: Request, secret: bytes, submitted: str | None) -> bool:
    session = request.cookies.get(SESSION_COOKIE)
    if not session or not submitted:
        return False
    if not hmac.compare_digest(csrf_token(secret, session), submitted):
        return False
    origin = request.headers.get("origin")
    return origin is None or origin == f"{request.url.scheme}://{request.headers.get('host', '')}"


class Guard:
    """ASGI middleware: host check, token, session cookie, security headers."""

    def __init__(self, app: Any, *, token: str | None):
        self.app = app
        self.token = token

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        refused = self._refuse(request)
        if refused is not None:
            return await refused(scope, receive, send)
        if self.token and request.query_params.get("token") == self.token:
            return await self._adopt_token(request)(scope, receive, send)
        new_session = None if request.cookies.get(SESSION_COOKIE) else secrets.token_urlsafe(24)
        if new_session:  # handlers see the session the response is about to set
            scope["review_session"] = new_session

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("content-security-policy", CSP)
                headers["x-content-type-options"] = "nosniff"
                headers["referrer-policy"] = "same-origin"  # no-referrer would make Chrome send `Origin: null`
                headers["x-frame-options"] = "DENY"
                headers.setdefault("cache-control", "no-store")
                if new_session:
                    headers.append("set-cookie", _cookie(SESSION_COOKIE, new_session))
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _refuse(self, request: Request) -> PlainTextResponse | None:
        if self.token:
            given = (request.cookies.get(TOKEN_COOKIE) or request.query_params.get("token")
                     or request.headers.get("authorization", "").removeprefix("Bearer ").strip())
            if not given or not hmac.compare_digest(given.encode(), self.token.encode()):
                return PlainTextResponse("401: this review app needs its token: open the URL it printed at start "
                                         "(…/?token=…)", status_code=401)
            return None
        host = _hostname(request.headers.get("host") or "")
        if host not in LOOPBACK_NAMES:
            return PlainTextResponse(f"400: unexpected Host {host!r}: the review app answers only on localhost",
                                     status_code=400)
        return None

    def _adopt_token(self, request: Request) -> RedirectResponse:
        rest = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
        url = URL(request.url.path + (f"?{urlencode(rest)}" if rest else ""))
        response = RedirectResponse(str(url), status_code=303)
        response.set_cookie(TOKEN_COOKIE, self.token, httponly=True, samesite="strict")
        return response


def _hostname(host: str) -> str:
    """The name part of a Host header (``[::1]:8000`` → ``[::1]``, ``localhost:8000`` → ``localhost``)."""
    if host.startswith("["):
        return host.split("]")[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _cookie(name: str, value: str) -> str:
    return f"{name}={value}; Path=/; HttpOnly; SameSite=Strict"


def session_of(request: Request) -> str:
    """The browser's session id (set by :class:`Guard` on its first response)."""
    return request.cookies.get(SESSION_COOKIE) or request.scope.get("review_session", "")


def session_label(request: Request) -> str | None:
    """A short, stable name for the browser session, stored beside the annotator with its verdicts (a hash:
    the cookie itself never reaches the database)."""
    session = session_of(request)
    return hashlib.sha256(f"review-session:{session}".encode()).hexdigest()[:10] if session else None
