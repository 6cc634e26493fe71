"""`factory review` in a real headless Chromium (Debian's, driven by Playwright; nothing downloaded):
keyboard adjudication with the stored rows checked, XSS payloads that must not run, a cross-site
POST, a run holding the database, the token mode."""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from factory.review.maindb import adjudicated_set
from factory.review.workspace import Workspace, workspace_path
from factory.store import Store

from conftest import REPO
from reviewdb import PAYLOADS, review_audit  # noqa: F401 (a fixture)
from test_review import holder, release

pytestmark = [pytest.mark.browser, pytest.mark.usefixtures("hh_rlhf")]
CHROMIUM = Path(os.environ.get("FACTORY_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} not found: the browser tests drive Debian's chromium; install it with "
                    "`apt-get install -y chromium chromium-driver` (`./factory.sh test` does it when run as root)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def db(review_audit, tmp_path):
    dst = tmp_path / "hh.duckdb"
    shutil.copy(review_audit[0], dst)
    return dst


class Server:
    """`factory review` in its own process (as a user runs it), its output collected by a thread."""

    def __init__(self, db: Path, *args: str):
        cmd = [sys.executable, "-c", "from factory.cli import app; app()", "review", "--db", str(db), "--port", "0",
               "--annotator", "alice", "--sync-interval", "0.3", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                                     env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"})
        self.lines: list[str] = []
        self._q: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.url = self._wait_for_url()
        self.base = self.url.split("?")[0]

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            self._q.put(line)
        self._q.put(None)

    def _wait_for_url(self, timeout: float = 90) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                line = self._q.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                break
            if line.startswith("open http"):
                return line.split()[1]
        self.proc.kill()
        raise AssertionError("factory review did not start:\n" + "".join(self.lines))

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)  # graceful: a last copy of queued verdicts
        return self.proc.wait(timeout=60)


def shown_pair(page) -> str:
    return page.locator("h1 code").inner_text()


def press(page, key: str) -> None:
    with page.expect_navigation():
        page.keyboard.press(key)


def test_keyboard_adjudication_is_stored_and_payloads_do_not_run(browser, db):
    with Store(db, read_only=True) as st:
        payload_pairs = [r[0] for r in st.con.execute(
            "SELECT pair_id FROM pairs WHERE " + " OR ".join(["response_a LIKE ? OR response_b LIKE ?"] * 2),
            [f"%{p}%" for p in PAYLOADS for _ in (0, 1)]).fetchall()]
    server = Server(db)
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(server.base + "queue")
        order = [tr.get_attribute("data-href").split("/pair/")[1] for tr in page.locator("#queue tbody tr").all()]
        assert len(order) >= 6
        press(page, "Enter")
        assert shown_pair(page) == order[0]
        for k, key in enumerate("213"):  # AI right, human right, both acceptable; each moves to the next pair
            assert shown_pair(page) == order[k]
            press(page, key)
        assert shown_pair(page) == order[3]
        press(page, "u")  # undo: back to the third pair, its verdict gone
        assert shown_pair(page) == order[2] and page.locator("p.current").count() == 0
        press(page, "j")
        assert shown_pair(page) == order[3]
        press(page, "k")
        assert shown_pair(page) == order[2]
        press(page, "ArrowRight")
        assert shown_pair(page) == order[3]
        page.keyboard.press("n")  # the note, then neither acceptable
        page.keyboard.type("both replies miss the question")
        page.keyboard.press("Escape")
        press(page, "4")
        assert shown_pair(page) == order[4]
        assert "adjudicated 3 of" in page.locator("#progress").inner_text()

        # the judge's exact messages, on demand
        page.goto(server.base + f"pair/{order[0]}")
        button = page.locator("button.messages").first
        judgement = button.get_attribute("data-judgement")
        button.click()
        out = page.locator(f"#messages-{judgement}")
        out.locator(".msg").first.wait_for()
        shown_messages = out.locator(".msg .text").all_inner_texts()

        # XSS payloads in responses and prompts are shown as text and never run
        seen = set()
        for pid in payload_pairs:
            response = page.goto(server.base + f"pair/{pid}")
            if response.status == 404:  # a mirrored twin the AI agreed with is not in the queue
                continue
            text = page.locator("main").inner_text()
            seen |= {p for p in PAYLOADS if p in text}  # shown as text
            assert page.evaluate("typeof window.__xss") == "undefined"
            assert page.locator("main img[src='x']").count() == 0 and page.locator("main script").count() == 0
        assert seen == set(PAYLOADS)

        # a page of another origin posting a verdict form is refused (no session cookie, no token)
        page.set_content(f"""<form method="post" action="{server.base}verdict"><input name="pair_id" value="{order[5]}">
                             <input name="verdict" value="ai"><input name="csrf" value="guessed"></form>""")
        with page.expect_navigation():
            page.evaluate("document.forms[0].submit()")
        assert "CSRF" in page.locator("body").inner_text()
        assert errors == []
    finally:
        page.close()
        rc = server.stop()
    assert rc == 0, server.output

    ws = Workspace(workspace_path(db))
    try:
        events = ws.rows("SELECT pair_id, action, verdict, note, annotator, synced_at FROM events ORDER BY seq")
        current = {r["pair_id"]: (r["verdict"], r["note"]) for r in ws.rows("SELECT * FROM current")}
        items = {r["pair_id"]: r for r in ws.rows("SELECT pair_id, human_choice, ai_choice FROM items")}
    finally:
        ws.close()
    assert [(e["pair_id"], e["action"], e["verdict"]) for e in events] == [
        (order[0], "set", "ai"), (order[1], "set", "human"), (order[2], "set", "both"), (order[2], "undo", None),
        (order[3], "set", "neither")]
    assert all(e["annotator"] == "alice" and e["synced_at"] is not None for e in events)
    assert current == {order[0]: ("ai", None), order[1]: ("human", None),
                       order[3]: ("neither", "both replies miss the question")}
    from factory.lineage import row_messages

    with Store(db, read_only=True) as st:
        assert st.count("review_verdicts") == 5
        labels = dict(st.con.execute("SELECT pair_id, human_choice FROM human_labels WHERE set_id = ?",
                                     [adjudicated_set(st.one("SELECT audit_id FROM audits")[0])]).fetchall())
        assert shown_messages == [m["content"] for m in row_messages(st, judgement)]
    assert labels[order[0]] == items[order[0]]["ai_choice"] != items[order[0]]["human_choice"]
    assert labels[order[1]] == items[order[1]]["human_choice"]
    assert order[2] in labels and order[3] not in labels  # undone: original label; neither: left out


def test_a_run_holding_the_database(browser, db, tmp_path):
    server = Server(db)  # the workspace copy is made while the database is free
    page = browser.new_page()
    banner = page.locator("#banner")
    from playwright.sync_api import expect

    busy = holder(db)
    try:
        page.goto(server.base + "queue")
        press(page, "Enter")
        first = shown_pair(page)
        press(page, "1")
        expect(banner).to_contain_text(f"in use by run busy-run (pid {busy.pid})", timeout=20_000)
        expect(banner).to_contain_text("1 verdict(s) are saved in the review workspace")
        expect(banner).to_contain_text("queued")
        press(page, "j")  # browsing goes on from the workspace
        assert page.locator("#response-a .text").inner_text().strip()
    finally:
        release(busy)
    expect(banner).to_contain_text("All verdicts are saved in", timeout=20_000)
    page.close()
    assert server.stop() == 0, server.output
    with Store(db, read_only=True) as st:
        assert st.one("SELECT pair_id, verdict, annotator FROM review_verdicts") == (first, "human", "alice")

    # started while a run holds the database: the existing copy is browsed and the banner says why
    busy = holder(db)
    try:
        server = Server(db)
        assert f"in use by run busy-run (pid {busy.pid})" in server.output
        page = browser.new_page()
        page.goto(server.base + "queue")
        expect(page.locator("#banner")).to_contain_text("browsing the review workspace copied at")
        assert page.locator("#queue tbody tr").count() > 0
        page.close()
        assert server.stop() == 0
    finally:
        release(busy)

    # no copy yet: a clear refusal
    fresh = tmp_path / "fresh" / "hh.duckdb"
    fresh.parent.mkdir()
    shutil.copy(db, fresh)
    busy = holder(fresh)
    try:
        done = subprocess.run([sys.executable, "-c", "from factory.cli import app; app()", "review", "--db", str(fresh)],
                              capture_output=True, text=True, cwd=REPO, timeout=120,
                              env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "300"})
    finally:
        release(busy)
    assert done.returncode == 2
    assert f"in use by run busy-run (pid {busy.pid})" in done.stderr and "has no copy of any audit yet" in done.stderr


def test_token_mode(browser, db):
    server = Server(db, "--token", "t0ken-for-tests")
    page = browser.new_page()
    try:
        response = page.goto(server.base + "queue")
        assert response.status == 401 and "needs its token" in page.locator("body").inner_text()
        assert server.url.endswith("?token=t0ken-for-tests")
        page.goto(server.url)  # the printed URL: the token becomes a cookie and leaves the address bar
        assert "token" not in page.url and page.locator("#queue tbody tr").count() > 0
        press(page, "Enter")
        first = shown_pair(page)
        press(page, "2")
        assert shown_pair(page) != first
    finally:
        page.close()
        assert server.stop() == 0, server.output
    with Store(db, read_only=True) as st:
        assert st.one("SELECT pair_id, verdict FROM review_verdicts") == (first, "ai")
