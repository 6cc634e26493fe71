"""The review app's HTTP rules without a browser (Starlette's test client): escaping, CSRF on every
POST, read-only, the token, the Host check, security headers, bind refusal."""

from __future__ import annotations

import re
import shutil

import pytest
from starlette.routing import Route
from starlette.testclient import TestClient
from typer.testing import CliRunner

from factory.review.security import CSP, BindError, check_bind
from factory.review.session import Review
from factory.review.web import create_app

from reviewdb import PAYLOADS, XSS_SCRIPT, review_audit  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("hh_rlhf")  # the shared human labels: a test fails without them
LOCAL = "http://127.0.0.1"


@pytest.fixture
def built(review_audit):
    return review_audit


@pytest.fixture
def review(built, tmp_path):
    shutil.copy(built[0], tmp_path / "hh.duckdb")
    r = Review(tmp_path / "hh.duckdb", annotator="alice")
    yield r
    r.close()


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


def payload_pairs(review: Review) -> list[str]:
    rows = review.ws.rows("SELECT pair_id, response_a, response_b FROM texts WHERE audit_id = ?", [review.audit_id])
    return [r["pair_id"] for r in rows if any(p in r["response_a"] + r["response_b"] for p in PAYLOADS)]


def payload_texts(review: Review) -> list[str]:
    rows = review.ws.rows("SELECT response_a || response_b AS t FROM texts WHERE audit_id = ?", [review.audit_id])
    return [r["t"] for r in rows]


def n_events(review: Review) -> int:
    return review.ws.one("SELECT count(*) AS n FROM events")["n"]


def test_pages_escape_every_text_and_send_a_strict_csp(review):
    assert "script-src 'self';" in CSP and "unsafe" not in CSP and "default-src 'none'" in CSP
    client = TestClient(create_app(review), base_url=LOCAL)
    for path in ("/queue", "/queue?ties=include&page=1", "/principles", "/status", "/static/review.js"):
        r = client.get(path)
        assert r.status_code == 200, (path, r.text[:300])
        assert r.headers["content-security-policy"] == CSP
        assert r.headers["x-content-type-options"] == "nosniff" and r.headers["x-frame-options"] == "DENY"
    pairs = payload_pairs(review)  # the queued ones (a mirrored twin the AI agrees with is not queued)
    assert all(any(p in texts for texts in payload_texts(review)) for p in PAYLOADS)
    for pid in pairs:
        r = client.get(f"/pair/{pid}")
        assert r.status_code == 200
        assert "&lt;script&gt;window.__xss" in r.text or "&lt;img src=x onerror=" in r.text
        for payload in PAYLOADS:
            assert payload not in r.text
        assert "<img src=x" not in r.text and "<script>window" not in r.text
        # the only script a page loads is the app's own file
        assert re.findall(r"<script[^>]*>", r.text) == ['<script src="/static/review.js" defer>']
        svg = client.get(f"/plot/pair-{pid}.svg")
        assert svg.headers["content-type"].startswith("image/svg+xml") and "<script" not in svg.text
        assert svg.headers["content-security-policy"].startswith("default-src 'none'")


def test_every_post_needs_the_csrf_token(review):
    app = create_app(review)
    client = TestClient(app, base_url=LOCAL)
    posts = [r.path for r in app.app.routes if isinstance(r, Route) and "POST" in (r.methods or ())]
    assert sorted(posts) == ["/refresh", "/sync", "/undo", "/verdict"]
    pid = client.get("/queue").text.split('href="/pair/')[1].split('"')[0]
    token = csrf_of(client.get(f"/pair/{pid}").text)
    form = {"pair_id": pid, "verdict": "human", "q": "", "back": "/queue"}
    for path in posts:
        assert client.post(path, data=form).status_code == 403, path
        assert client.post(path, data={**form, "csrf": "0" * 64}).status_code == 403, path
        other = TestClient(app, base_url=LOCAL)  # another browser session: its own cookie, not this token
        other.get("/queue")
        assert other.post(path, data={**form, "csrf": token}).status_code == 403, path
        r = client.post(path, data={**form, "csrf": token}, headers={"origin": "http://evil.example"})
        assert r.status_code == 403, path
    assert n_events(review) == 0
    r = client.post("/verdict", data={**form, "csrf": token}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/pair/")
    r = client.post("/verdict", data={**form, "csrf": token}, headers={"origin": LOCAL}, follow_redirects=False)
    assert r.status_code == 303 and n_events(review) == 2
    r = client.post("/verdict", data={**form, "csrf": token, "verdict": "maybe"})
    assert r.status_code == 400 and n_events(review) == 2
    for back in ("//evil.example/x", "/\\evil.example", "https://evil.example"):  # never sent to another site
        r = client.post("/sync", data={"csrf": token, "back": back}, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"].startswith("/queue?done=")


def test_read_only_refuses_writes(built, tmp_path):
    shutil.copy(built[0], tmp_path / "hh.duckdb")
    r = Review(tmp_path / "hh.duckdb", annotator="alice", read_only=True)
    try:
        client = TestClient(create_app(r), base_url=LOCAL)
        pid = client.get("/queue").text.split('href="/pair/')[1].split('"')[0]
        html = client.get(f"/pair/{pid}").text
        assert 'id="verdict-form"' not in html and "Read-only mode" in html
        token = csrf_of(html)
        for path in ("/verdict", "/undo", "/sync"):
            resp = client.post(path, data={"csrf": token, "pair_id": pid, "verdict": "ai"})
            assert resp.status_code == 403 and "read-only" in resp.text
        assert n_events(r) == 0
        with pytest.raises(PermissionError):
            r.record(pid, "ai", None)
    finally:
        r.close()


def test_a_token_is_required_on_every_request(review):
    app = create_app(review, token="s3cret-token")
    client = TestClient(app, base_url=LOCAL)
    for path in ("/", "/queue", "/static/review.js", "/status", "/plot/principles.svg"):
        r = client.get(path)
        assert r.status_code == 401 and "needs its token" in r.text
    assert client.get("/queue?token=wrong").status_code == 401
    r = client.get("/queue?ties=include&token=s3cret-token", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/queue?ties=include"  # the token leaves the URL
    assert client.get("/queue").status_code == 200  # the cookie carries it from now on
    bearer = TestClient(app, base_url=LOCAL)
    assert bearer.get("/queue", headers={"authorization": "Bearer s3cret-token"}).status_code == 200


def test_only_loopback_host_names_are_answered_without_a_token(review):
    app = create_app(review)
    assert TestClient(app, base_url="http://localhost:8765").get("/queue").status_code == 200
    assert TestClient(app, base_url="http://[::1]:8765").get("/queue").status_code == 200
    r = TestClient(app, base_url="http://rebind.evil.example:8765").get("/queue")
    assert r.status_code == 400 and "only on localhost" in r.text


def test_binding_beyond_loopback_needs_allow_remote_and_a_token(built):
    assert check_bind("127.0.0.1", False, None) is None and check_bind("::1", False, "t") == "t"
    with pytest.raises(BindError, match="--allow-remote"):
        check_bind("0.0.0.0", False, None)
    with pytest.raises(BindError):
        check_bind("192.168.1.5", False, "t")
    generated = check_bind("0.0.0.0", True, None)
    assert len(generated) >= 24 and check_bind("0.0.0.0", True, None) != generated
    assert check_bind("0.0.0.0", True, "mine") == "mine"
    from factory.cli import app

    out = CliRunner().invoke(app, ["review", "--db", str(built[0]), "--host", "0.0.0.0"])
    assert out.exit_code == 2 and "--allow-remote" in out.output


def test_bad_parameters_are_clear_pages(review):
    client = TestClient(create_app(review), base_url=LOCAL)
    r = client.get("/queue?ties=sometimes")
    assert r.status_code == 400 and "ties=&#39;sometimes&#39;: use one of exclude, include, only" in r.text
    r = client.get("/pair/nope")
    assert r.status_code == 404 and "not in the review queue" in r.text
    r = client.get(f"/queue?source={XSS_SCRIPT}")
    assert r.status_code == 200 and XSS_SCRIPT not in r.text


def test_state_is_kept_across_reloads(review):
    client = TestClient(create_app(review), base_url=LOCAL)
    client.get("/queue?ties=only&min_gap=10")
    assert client.get("/", follow_redirects=False).headers["location"] == "/queue?ties=only&min_gap=10"
    fresh = TestClient(create_app(review), base_url=LOCAL)  # a restart: kept in the workspace
    assert fresh.get("/", follow_redirects=False).headers["location"] == "/queue?ties=only&min_gap=10"
