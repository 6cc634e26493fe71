"""Issue 22 in the review app: unknown ids are 404; a verdict carries the version it was made against and
the browser session that gave it, so a second session adjudicating the same pair gets a conflict and sees
the other verdict; the queue shows each pair's prompt and selects nothing before the first key."""

from __future__ import annotations

import html
import json
import re
import shutil

import pytest
from starlette.testclient import TestClient

from factory.review.session import Review
from factory.review.web import create_app

from reviewdb import review_audit  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("hh_rlhf")
LOCAL = "http://127.0.0.1"


@pytest.fixture
def review(review_audit, tmp_path):
    shutil.copy(review_audit[0], tmp_path / "hh.duckdb")
    r = Review(tmp_path / "hh.duckdb", annotator="alice")
    yield r
    r.close()


def form_of(html: str) -> dict[str, str]:
    """The verdict form's hidden fields as a browser would send them."""
    form = html.split('id="verdict-form"')[1].split("</form>")[0]
    return dict(re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)"', form))


def first_pair(client: TestClient) -> str:
    return client.get("/queue").text.split('href="/pair/')[1].split('"')[0].split("?")[0]


def test_unknown_ids_answer_404_not_500(review):
    client = TestClient(create_app(review), base_url=LOCAL, raise_server_exceptions=False)
    r = client.get("/judgement/nonexistent/messages")
    assert r.status_code == 404 and "not one of this audit" in r.json()["error"]
    assert client.get("/pair/nonexistent").status_code == 404
    assert client.get("/plot/pair-nonexistent.svg").status_code == 404
    known = review.ws.one("SELECT id FROM judgements WHERE audit_id = ? LIMIT 1", [review.audit_id])["id"]
    assert client.get(f"/judgement/{known}/messages").status_code == 200


def test_a_second_session_gets_a_conflict_and_sees_the_other_verdict(review):
    app = create_app(review)
    a, b = TestClient(app, base_url=LOCAL), TestClient(app, base_url=LOCAL)  # two browsers, one annotator
    pid = first_pair(a)
    form_a, form_b = form_of(a.get(f"/pair/{pid}").text), form_of(b.get(f"/pair/{pid}").text)
    assert form_a["base"] == form_b["base"] == ""  # both opened the pair before any verdict
    r = a.post("/verdict", data={**form_a, "verdict": "human"}, follow_redirects=False)
    assert r.status_code == 303
    r = b.post("/verdict", data={**form_b, "verdict": "ai"}, follow_redirects=False)
    assert r.status_code == 409
    assert "Another session" in r.text and "human right" in r.text and "was not saved" in r.text
    assert review.ws.one("SELECT verdict FROM current WHERE pair_id = ?", [pid])["verdict"] == "human"
    again = form_of(r.text)  # the conflict page is the pair as it is now: giving it again replaces theirs
    assert again["base"] and again["base"] != form_b["base"]
    r = b.post("/verdict", data={**again, "verdict": "ai"}, follow_redirects=False)
    assert r.status_code == 303
    events = review.ws.rows("SELECT annotator, session, base, verdict FROM events WHERE pair_id = ? ORDER BY seq", [pid])
    assert [e["verdict"] for e in events] == ["human", "ai"]
    assert {e["annotator"] for e in events} == {"alice"}
    assert events[0]["session"] and events[1]["session"] and events[0]["session"] != events[1]["session"]
    assert events[1]["base"] == again["base"]
    page = a.get(f"/pair/{pid}").text  # each session's verdicts can be told apart on the page
    assert events[1]["session"] in page and f"session {events[0]['session']}, this one" in page


def test_the_same_session_may_change_its_own_verdict(review):
    client = TestClient(create_app(review), base_url=LOCAL)
    pid = first_pair(client)
    form = form_of(client.get(f"/pair/{pid}").text)
    assert client.post("/verdict", data={**form, "verdict": "human"}, follow_redirects=False).status_code == 303
    # the back button: the same stale page, the same session
    assert client.post("/verdict", data={**form, "verdict": "both"}, follow_redirects=False).status_code == 303
    assert review.ws.one("SELECT verdict FROM current WHERE pair_id = ?", [pid])["verdict"] == "both"


def test_an_undo_over_another_sessions_verdict_is_a_conflict(review):
    app = create_app(review)
    a, b = TestClient(app, base_url=LOCAL), TestClient(app, base_url=LOCAL)
    pid = first_pair(a)
    form_a = form_of(a.get(f"/pair/{pid}").text)
    assert a.post("/verdict", data={**form_a, "verdict": "human"}, follow_redirects=False).status_code == 303
    form_b = form_of(b.get(f"/pair/{pid}").text)
    assert b.post("/verdict", data={**form_b, "verdict": "neither"}, follow_redirects=False).status_code == 303
    r = a.post("/undo", data={"csrf": form_a["csrf"], "q": ""}, follow_redirects=False)
    assert r.status_code == 409 and "your undo was not saved" in r.text
    assert review.ws.one("SELECT verdict FROM current WHERE pair_id = ?", [pid])["verdict"] == "neither"


def test_the_queue_shows_prompts_and_selects_nothing(review):
    client = TestClient(create_app(review), base_url=LOCAL)
    rows = re.findall(r'<tr data-href="/pair/([0-9a-f]+)[^"]*"([^>]*)>(.*?)</tr>', client.get("/queue").text, re.S)
    assert rows and all("selected" not in attrs for _, attrs, _ in rows)  # j then Enter opens the first pair
    for pid, _, cells in rows[:5]:
        conv = json.loads(review.ws.one("SELECT conversation FROM texts WHERE pair_id = ?", [pid])["conversation"])
        prompt = " ".join(conv[-1]["content"].split())
        shown = html.unescape(re.search(r'<td class="prompt">(.*?)</td>', cells, re.S).group(1))
        assert shown and shown.rstrip("…") == prompt[:len(shown.rstrip("…"))], (prompt, shown)


@pytest.mark.browser
def test_j_then_enter_opens_the_first_pair_in_a_browser(review_audit, tmp_path):
    """Nothing is selected when the queue loads: the first j selects the first row (issue 22: it used to be
    preselected, so j then Enter opened the second pair)."""
    from playwright.sync_api import sync_playwright

    from test_review_browser import CHROMIUM, CHROMIUM_ARGS, Server, press, shown_pair

    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} not found: the browser tests drive Debian's chromium")
    db = tmp_path / "hh.duckdb"
    shutil.copy(review_audit[0], db)
    server = Server(db)
    try:
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
            page = b.new_page()
            page.goto(server.base + "queue")
            order = [tr.get_attribute("data-href").split("/pair/")[1] for tr in page.locator("#queue tbody tr").all()]
            assert page.locator("#queue tbody tr.selected").count() == 0
            page.keyboard.press("j")
            assert page.locator("#queue tbody tr.selected").count() == 1
            press(page, "Enter")
            assert shown_pair(page) == order[0]
            page.goto(server.base + "queue")
            page.keyboard.press("j")
            page.keyboard.press("j")
            press(page, "Enter")
            assert shown_pair(page) == order[1]
            b.close()
    finally:
        server.stop()
