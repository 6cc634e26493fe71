"""The review web app: Starlette routes over a :class:`~factory.review.session.Review`.

Pages are rendered on the server by Jinja with autoescape on (every model and human text is
escaped); ``static/review.js`` adds the keyboard shortcuts, the judge-message loader and the
banner refresh. Writes are form POSTs checked by :func:`security.csrf_ok`; ``--read-only`` refuses
them. The queue's SQL lives in :mod:`.queue`; this module only wires requests to it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import jinja2
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from . import maindb, plots
from . import queue as Q
from .security import SVG_CSP, Guard, csrf_ok, csrf_token, session_label, session_of
from .session import Review
from .verdicts import VERDICTS
from .workspace import Conflict

HERE = Path(__file__).resolve().parent
SVG_CACHE = 256  # plots kept in memory
DONE_MESSAGES = {"undo": "Undid your last verdict.", "nothing": "Nothing to undo.",
                 "end": "That was the last pair under this filter.", "synced": "All verdicts are in the database.",
                 "queued": "Verdicts are queued in the workspace; the database is in use.",
                 "refreshed": "The workspace was rebuilt from the database."}


def banner(s: dict[str, Any]) -> list[tuple[str, str]]:
    """(level, text) lines saying where verdicts are and why, from :meth:`Review.status`."""
    lines = []
    if s["read_only"]:
        lines.append(("info", "Read-only mode: browsing only, verdicts cannot be given."))
    if s["busy"]:
        built = _when(s["built_at"])
        if s["read_only"]:
            lines.append(("warn", f"{s['db']} is in use by {s['busy']}: browsing the review workspace copied at {built}."))
        elif s["pending"]:
            lines.append(("warn", f"{s['db']} is in use by {s['busy']}, so verdicts cannot be written into it right "
                                  f"now. Your {s['pending']} verdict(s) are saved in the review workspace "
                                  f"({s['workspace']}) and queued: they are copied into the database (human set "
                                  f"{s['set_id']}) as soon as it is free (retrying every {s['retry_s']:g} s)."))
        else:
            lines.append(("warn", f"{s['db']} is in use by {s['busy']}: browsing the review workspace copied at "
                                  f"{built}. Verdicts you give are saved in the workspace and copied into the "
                                  "database when it is free."))
    elif s["pending"] and not s["read_only"]:
        lines.append(("info", f"{s['pending']} verdict(s) saved in the review workspace, being copied into {s['db']}."))
    if s["error"]:
        lines.append(("error", f"Copying verdicts into the database failed: {s['error']}. They stay queued in the "
                               "workspace and the copy is retried."))
    if not lines and s["synced_at"]:
        a = s["adjudicated"]
        counts = f": {a['n_pairs']:,} pairs, {a['reviewed']:,} adjudicated" if a else ""
        lines.append(("ok", f"All verdicts are saved in {s['db']} (human set {s['set_id']}{counts}) as of "
                            f"{_when(s['synced_at'])}."))
    return lines


def _when(t: Any) -> str:
    return t.astimezone().strftime("%H:%M:%S") if t is not None else "never"


def _f(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:.{digits}f}"


def _ci(block: dict[str, Any]) -> str:
    lo, hi = block.get("agreement_ci") or (None, None)
    return f"{_f(block['agreement'])} [{_f(lo)}, {_f(hi)}]" if lo is not None else _f(block["agreement"])


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    env.filters.update(f3=_f, ci=_ci, when=_when, qs=lambda p: urlencode(p))
    return env


def create_app(review: Review, *, token: str | None = None) -> Guard:
    """The ASGI app (wrapped in :class:`security.Guard`). The caller owns ``review`` (start/close)."""
    templates = Jinja2Templates(env=_environment())
    secret = review.ws.secret()
    ws, aid = review.ws, review.audit_id
    svg_cache: dict[str, str] = {}

    def render(request: Request, name: str, status_code: int = 200, **ctx: Any) -> Response:
        f: Q.Filters = ctx.get("f") or Q.Filters()
        status = review.status()
        ctx.update(audit=review.audit, status=status, banner=banner(status), annotator=review.annotator,
                   csrf=csrf_token(secret, session_of(request)), verdicts=VERDICTS, read_only=review.read_only,
                   prog=Q.progress(ws, aid, f), f=f, fq=f.params(),
                   done=DONE_MESSAGES.get(request.query_params.get("done", "")), here=_here(request))
        return templates.TemplateResponse(request, name, ctx, status_code=status_code)

    def home(request: Request) -> Response:
        return RedirectResponse(ws.recall(aid, "last_url") or "/queue", status_code=303)

    def queue_page(request: Request) -> Response:
        f = Q.Filters.parse(request.query_params)
        number = _int(request.query_params.get("page", "1"), "page")
        total = Q.count(ws, aid, f)
        rows = Q.page(ws, aid, f, number)
        ws.remember(aid, "last_url", _here(request))
        principles = sorted(b["name"] for b in review.audit["result"]["per_principle"])
        return render(request, "queue.html", f=f, rows=rows, number=number, total=total,
                      pages=max(1, -(-total // Q.PAGE_SIZE)), page_size=Q.PAGE_SIZE, sources=Q.sources(ws, aid),
                      principles=principles, choices=Q.CHOICES)

    def pair_page(request: Request) -> Response:
        return pair_response(request, request.path_params["pair_id"], Q.Filters.parse(request.query_params))

    def pair_response(request: Request, pair_id: str, f: Q.Filters, status_code: int = 200,
                      conflict: str | None = None) -> Response:
        item = Q.pair_detail(ws, aid, pair_id)
        if item is None:
            raise HTTPException(404, f"pair {pair_id} is not in the review queue of audit {aid}")
        item["conversation"] = json.loads(item["conversation"])
        weights = review.audit["result"]["settings"]["weights"]
        place = Q.place(ws, aid, f, pair_id)
        ws.remember(aid, "last_url", _here(request))
        link = lambda pid: f"/pair/{pid}" + (f"?{urlencode(f.params())}" if f.params() else "")  # noqa: E731
        return render(request, "pair.html", status_code=status_code, f=f, item=item, weights=weights, place=place,
                      next_url=link(place.next) if place.next else "", prev_url=link(place.prev) if place.prev else "",
                      conflict=conflict, session=session_label(request))

    def principles_page(request: Request) -> Response:
        result = review.audit["result"]
        return render(request, "principles.html", result=result, stats=Q.principle_stats(ws, aid),
                      blocks=sorted(result["per_principle"], key=lambda b: (b["agreement"] is None, b["agreement"] or 0)))

    def status_json(request: Request) -> Response:
        s = review.status()
        return JSONResponse({"banner": banner(s), "pending": s["pending"], "busy": s["busy"],
                             "busy_run": s["busy_run"], "busy_pid": s["busy_pid"]})

    def messages_json(request: Request) -> Response:
        jid = request.path_params["judgement_id"]
        try:
            return JSONResponse({"messages": review.messages(jid)})
        except KeyError as e:  # an id that is not one of this audit's judgements
            return JSONResponse({"error": str(e.args[0]) if e.args else f"no judgement {jid}"}, status_code=404)
        except maindb.Busy as b:
            return JSONResponse({"error": f"{b}: the judge's messages are read from the database, so they can be "
                                          "shown when it is free (messages shown once are kept in the workspace)"},
                                status_code=409)

    def svg(request: Request) -> Response:
        what = request.path_params["what"]
        if what not in svg_cache:
            if len(svg_cache) >= SVG_CACHE:
                svg_cache.pop(next(iter(svg_cache)))  # the oldest
            result = review.audit["result"]
            if what == "principles.svg":
                svg_cache[what] = plots.principles_svg(result)
            elif what == "position.svg":
                svg_cache[what] = plots.position_svg(result)
            elif what.startswith("pair-") and what.endswith(".svg"):
                item = Q.pair_detail(ws, aid, what[5:-4])
                if item is None:
                    raise HTTPException(404, "no such pair in the review queue")
                svg_cache[what] = plots.pair_svg(item["cells"], item["human_choice"], item["p_a"])
            else:
                raise HTTPException(404, "no such plot")
        return Response(svg_cache[what], media_type="image/svg+xml",
                        headers={"content-security-policy": SVG_CSP, "cache-control": "private, max-age=600"})

    async def form(request: Request, *, writes: bool = True) -> dict[str, str]:
        data = dict((await request.form()).items())
        if not csrf_ok(request, secret, data.get("csrf") or request.headers.get("x-csrf-token")):
            raise HTTPException(403, "403: missing or wrong CSRF token: reload the page and try again")
        if writes and review.read_only:
            raise HTTPException(403, "403: this review app runs with --read-only: verdicts cannot be given")
        return data

    def give(pair_id: str, verdict: str, note: str | None, f: Q.Filters, session: str | None,
             base: str | None) -> str | None:
        """Record the verdict; the next pair under the filter (None at the end)."""
        try:
            review.record(pair_id, verdict, note, session=session, base=base)
        except KeyError as e:
            raise HTTPException(404, str(e.args[0])) from None
        return Q.place(ws, aid, f, pair_id).next

    async def verdict(request: Request) -> Response:
        data = await form(request)
        pair_id, f = data.get("pair_id", ""), Q.Filters.parse(dict(parse_qsl(data.get("q", ""))))
        if data.get("verdict") not in VERDICTS:
            raise HTTPException(400, f"verdict must be one of {', '.join(VERDICTS)}")
        try:
            nxt = await run_in_threadpool(give, pair_id, data["verdict"], data.get("note"), f, session_label(request),
                                          data.get("base"))
        except Conflict as c:  # another session changed the pair after this one opened it: show theirs
            return pair_response(request, pair_id, f, status_code=409, conflict=str(c))
        q = f"?{urlencode(f.params())}" if f.params() else ""
        return RedirectResponse(f"/pair/{nxt}{q}" if nxt else f"/queue?{urlencode({**f.params(), 'done': 'end'})}",
                                status_code=303)

    async def undo(request: Request) -> Response:
        data = await form(request)
        f = Q.Filters.parse(dict(parse_qsl(data.get("q", ""))))
        try:
            event = await run_in_threadpool(lambda: review.undo(session=session_label(request)))
        except Conflict as c:
            return pair_response(request, c.other["pair_id"], f, status_code=409, conflict=str(c))
        if event is None:
            return RedirectResponse(_back(data, "nothing"), status_code=303)
        return RedirectResponse(f"/pair/{event['pair_id']}?{urlencode({**f.params(), 'done': 'undo'})}",
                                status_code=303)

    async def sync(request: Request) -> Response:
        data = await form(request)
        done = await run_in_threadpool(review.sync)
        return RedirectResponse(_back(data, "synced" if done else "queued"), status_code=303)

    async def refresh(request: Request) -> Response:
        data = await form(request, writes=False)
        try:
            await run_in_threadpool(review.refresh)
        except maindb.Busy:
            return RedirectResponse(_back(data, "queued" if review.ws.n_pending(aid) else ""), status_code=303)
        svg_cache.clear()
        return RedirectResponse(_back(data, "refreshed"), status_code=303)

    async def http_error(request: Request, exc: Exception) -> Response:
        code = getattr(exc, "status_code", 400)
        text = getattr(exc, "detail", None) or str(exc)
        if request.method == "GET" and request.url.path.startswith(("/queue", "/pair", "/principles")):
            try:
                return render(request, "error.html", status_code=code, message=text)
            except Exception:  # a filter error in the page's own parameters: plain text
                pass
        return PlainTextResponse(text, status_code=code)

    routes = [
        Route("/", home), Route("/queue", queue_page), Route("/pair/{pair_id}", pair_page),
        Route("/principles", principles_page), Route("/status", status_json),
        Route("/judgement/{judgement_id}/messages", messages_json), Route("/plot/{what}", svg),
        Route("/verdict", verdict, methods=["POST"]), Route("/undo", undo, methods=["POST"]),
        Route("/sync", sync, methods=["POST"]), Route("/refresh", refresh, methods=["POST"]),
        Route("/favicon.ico", lambda request: Response(status_code=204)),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error, Q.FilterError: http_error})
    return Guard(app, token=token)


def _here(request: Request) -> str:
    keep = [(k, v) for k, v in request.query_params.multi_items() if k not in ("done", "token")]
    return request.url.path + (f"?{urlencode(keep)}" if keep else "")


def _back(data: dict[str, str], done: str) -> str:
    """The page a form came from (a local path only), with a ``done`` message code."""
    back = data.get("back") or "/queue"
    if not back.startswith("/") or back.startswith(("//", "/\\")):  # a path here, never another site
        back = "/queue"
    if not done:
        return back
    return back + ("&" if "?" in back else "?") + urlencode({"done": done})


def _int(value: str, name: str) -> int:
    try:
        return max(1, int(value))
    except ValueError:
        raise Q.FilterError(f"{name}={value!r}: give a whole number") from None
