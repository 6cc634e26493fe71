"""The review app's data side without a browser: the queue copied from a real (fake-engine) audit,
its filters and paging in SQL, verdicts and undo, copying them into the database (also while a
run holds it), the adjudicated human set that `factory audit` accepts, and the side-by-side table."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from factory.review import queue as Q
from factory.review.maindb import Busy, adjudicated_set
from factory.review.session import Review
from factory.review.workspace import Workspace, workspace_path
from factory.store import Store, StoreError

from conftest import REPO
from reviewdb import PAYLOADS, review_audit  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("hh_rlhf")  # the shared human labels: a test fails without them


@pytest.fixture
def built(review_audit):
    return review_audit


@pytest.fixture
def db(built, tmp_path):
    """A private copy of the audited database (tests write verdicts into it)."""
    src, audit_id = built
    dst = tmp_path / "hh.duckdb"
    shutil.copy(src, dst)
    return dst, audit_id


@pytest.fixture
def review(db):
    r = Review(db[0], annotator="alice")
    yield r
    r.close()


def all_items(r: Review) -> list[dict]:
    """Every queued item with its verdict, in queue order (the oracle the SQL filters are checked against)."""
    return r.ws.rows("""SELECT i.*, v.verdict FROM items i LEFT JOIN current v USING (audit_id, pair_id)
                        WHERE i.audit_id = ? ORDER BY i.rank""", [r.audit_id])


def holder(db, *, read_only: bool = False) -> subprocess.Popen:
    """Another process holding the database (a run's writer lock, or a read-only open) until stdin closes."""
    kw = "read_only=True" if read_only else "writer_run='busy-run'"
    code = (f"import sys; from factory.store import Store; s = Store({str(db)!r}, {kw}); "
            "print('ready', flush=True); sys.stdin.read(); s.close()")
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.stdout.readline().strip() == "ready"
    return p


def release(p: subprocess.Popen) -> None:
    p.stdin.close()
    assert p.wait(timeout=30) == 0


# -- the queue is the audit's disagreements ----------------------------------------------------


def test_queue_is_the_audits_disagreements_in_its_order(db, review):
    path, audit_id = db
    result = review.audit["result"]
    o = result["overall"]
    items = all_items(review)
    ties = [i for i in items if i["is_tie"]]
    decided = [i for i in items if not i["is_tie"]]
    # the audit scores a tie 0.5, an agreement 1, a disagreement 0: the queue holds exactly the non-agreements
    assert len(ties) == o["n_ties"]
    assert o["agreement"] * o["n_pairs"] == pytest.approx(o["n_pairs"] - len(decided) - 0.5 * len(ties))
    assert all(i["ai_choice"] != i["human_choice"] for i in decided)
    # most confident first: the same order as the audit's own divergence table
    assert [i["pair_id"] for i in decided][:len(result["divergence"])] == [d["pair_id"] for d in result["divergence"]]
    assert [i["rank"] for i in items] == list(range(1, len(items) + 1))
    # each planted payload is in a decided disagreement (they drive the XSS tests)
    texts = review.ws.rows("SELECT pair_id, response_a, response_b FROM texts WHERE audit_id = ?", [audit_id])
    for payload in PAYLOADS:
        assert any(payload in t["response_a"] + t["response_b"] for t in texts if t["pair_id"] in
                   {i["pair_id"] for i in decided}), payload
    # per-principle probabilities are the stored judgements, order by order
    cell = review.ws.one("SELECT pair_id, principle_id, p_ab, p_ba FROM cells WHERE audit_id = ? AND p_ab IS NOT NULL "
                         "AND p_ba IS NOT NULL LIMIT 1", [audit_id])
    with Store(path, read_only=True) as st:
        stored = dict(st.con.execute("""SELECT "order", p_a FROM judgements WHERE pair_id = ? AND principle_id = ?""",
                                     [cell["pair_id"], cell["principle_id"]]).fetchall())
    assert (cell["p_ab"], cell["p_ba"]) == (pytest.approx(stored["ab"]), pytest.approx(stored["ba"]))


def test_filters_paging_and_neighbours_match_a_python_oracle(review):
    items = all_items(review)
    aid = review.audit_id
    cells = review.ws.rows("SELECT pair_id, principle_id, toward_wrong, prank FROM cells WHERE audit_id = ?", [aid])
    first, second, tie = items[0]["pair_id"], items[1]["pair_id"], next(i for i in items if i["is_tie"])["pair_id"]
    review.record(first, "ai", None)
    review.record(tie, "both", "no real difference")
    items = all_items(review)
    principle = max({c["principle_id"] for c in cells}, key=lambda p: sum(c["principle_id"] == p and
                                                                          c["toward_wrong"] > 0.5 for c in cells))

    def longer(i):
        return "a" if i["len_a"] > i["len_b"] else "b" if i["len_b"] > i["len_a"] else None

    oracles = {
        Q.Filters(): [i for i in items if not i["is_tie"]],
        Q.Filters(ties="include"): items,
        Q.Filters(ties="only"): [i for i in items if i["is_tie"]],
        Q.Filters(ties="include", inconsistent="yes"): [i for i in items
                                                       if i["orders_agree"] is not None and i["orders_agree"] < 1],
        Q.Filters(ties="include", inconsistent="no"): [i for i in items if i["orders_agree"] == 1],
        Q.Filters(ties="include", min_gap=40): [i for i in items if abs(i["len_a"] - i["len_b"]) >= 40],
        Q.Filters(ties="include", longer="ai"): [i for i in items if i["ai_choice"] and i["ai_choice"] == longer(i)],
        Q.Filters(ties="include", longer="human"): [i for i in items if i["human_choice"] == longer(i)],
        Q.Filters(ties="include", state="todo"): [i for i in items if i["verdict"] is None],
        Q.Filters(ties="include", state="done"): [i for i in items if i["verdict"] is not None],
        Q.Filters(ties="include", verdict="both"): [i for i in items if i["verdict"] == "both"],
        Q.Filters(source="human:reviewset"): [i for i in items if not i["is_tie"]],
        Q.Filters(source="elsewhere"): [],
    }
    against = sorted((c for c in cells if c["principle_id"] == principle and c["toward_wrong"] > 0.5),
                     key=lambda c: (-c["toward_wrong"], next(i["rank"] for i in items if i["pair_id"] == c["pair_id"])))
    by_id = {i["pair_id"]: i for i in items}
    oracles[Q.Filters(principle=principle, ties="include")] = [by_id[c["pair_id"]] for c in against]
    assert len(against) >= 2
    for f, want in oracles.items():
        want_ids = [i["pair_id"] for i in want]
        assert Q.count(review.ws, aid, f) == len(want_ids), f
        got = Q.page(review.ws, aid, f, 1, size=1000)
        assert [r["pair_id"] for r in got] == want_ids, f
        # pages of 3 concatenate to the whole ordered list
        pages = [r["pair_id"] for n in range(1, len(want_ids) // 3 + 2) for r in Q.page(review.ws, aid, f, n, size=3)]
        assert pages == want_ids, f
        if f not in (Q.Filters(), Q.Filters(principle=principle, ties="include"), Q.Filters(ties="include", state="todo")):
            continue
        for k, pid in enumerate(want_ids):  # position and neighbours under the filters the pair view uses most
            place = Q.place(review.ws, aid, f, pid)
            assert (place.position, place.total) == (k + 1, len(want_ids))
            assert place.prev == (want_ids[k - 1] if k else None) and place.next == (want_ids[k + 1] if k + 1 < len(
                want_ids) else None)
    # the pair just adjudicated has left the "todo" filter; its neighbour is still the next one
    place = Q.place(review.ws, aid, Q.Filters(state="todo"), first)
    assert place.position is None and place.next == second
    progress = Q.progress(review.ws, aid, Q.Filters(ties="include"))
    assert progress == {"disagreements": len(oracles[Q.Filters()]), "ties": len(oracles[Q.Filters(ties="only")]),
                        "done_disagreements": 1, "done": 2, "filtered": len(items), "filtered_done": 2}
    drivers = {r["pair_id"]: r["drivers"] for r in Q.page(review.ws, aid, Q.Filters(ties="include"), 1, size=1000)}
    for pid, text in drivers.items():
        want = [c["principle_id"] for c in sorted(cells, key=lambda c: -c["toward_wrong"])
                if c["pair_id"] == pid and c["toward_wrong"] > 0.5]
        assert (text.split(", ") if text else []) == want


def test_bad_filter_values_say_what_is_allowed():
    with pytest.raises(Q.FilterError, match="ties='maybe': use one of exclude, include, only"):
        Q.Filters.parse({"ties": "maybe"})
    with pytest.raises(Q.FilterError, match="min_gap='x': give a whole number"):
        Q.Filters.parse({"min_gap": "x"})
    with pytest.raises(Q.FilterError, match="verdict='yes'"):
        Q.Filters.parse({"verdict": "yes"})
    f = Q.Filters.parse({"ties": "include", "min_gap": "30", "principle": "", "unknown": "x"})
    assert f == Q.Filters(ties="include", min_gap=30) and f.params() == {"ties": "include", "min_gap": "30"}


def test_clear_errors_for_a_missing_database_or_audit(db, tmp_path):
    path, audit_id = db
    with pytest.raises(StoreError, match="no such database"):
        Review(tmp_path / "nope.duckdb", annotator="alice")
    empty = tmp_path / "empty.duckdb"
    Store(empty).close()
    with pytest.raises(StoreError, match=r"no audits yet; run one first \(`factory audit PIPELINE`"):
        Review(empty, annotator="alice")
    with pytest.raises(StoreError, match=rf"no audit 'abc'; audits in this db: \['{audit_id}'\]"):
        Review(path, "abc", annotator="alice")


# -- verdicts ---------------------------------------------------------------------------------


def test_verdicts_replace_and_undo_per_annotator(review):
    ws, aid = review.ws, review.audit_id
    p1, p2, p3 = [i["pair_id"] for i in all_items(review)[:3]]

    def current():
        return {r["pair_id"]: (r["verdict"], r["note"]) for r in ws.rows("SELECT * FROM current WHERE audit_id = ?", [aid])}

    review.record(p1, "human", "first")
    review.record(p2, "ai", None)
    review.record(p1, "neither", "changed my mind")
    ws.record(aid, p3, "both", None, "bob")  # another annotator's verdict is not in alice's undo history
    assert current() == {p1: ("neither", "changed my mind"), p2: ("ai", None), p3: ("both", None)}
    assert review.undo()["pair_id"] == p1
    assert current() == {p1: ("human", "first"), p2: ("ai", None), p3: ("both", None)}
    assert review.undo()["pair_id"] == p2
    assert review.undo()["pair_id"] == p1
    assert current() == {p3: ("both", None)}
    assert review.undo() is None
    events = ws.rows("SELECT action, annotator, undoes FROM events WHERE audit_id = ? ORDER BY seq", [aid])
    assert [e["action"] for e in events] == ["set"] * 4 + ["undo"] * 3
    assert all(e["undoes"] for e in events[4:]) and {e["annotator"] for e in events[4:]} == {"alice"}
    with pytest.raises(ValueError, match="unknown verdict"):
        review.record(p1, "maybe", None)
    with pytest.raises(KeyError, match="not in the review queue"):
        review.record("no-such-pair", "ai", None)


def test_sync_builds_the_adjudicated_set_that_factory_audit_accepts(db, review, tmp_path):
    from factory.audit.run import audit
    from factory.review.agreement import adjudicated_audit, side_by_side_table

    path, audit_id = db
    items = all_items(review)
    decided = [i for i in items if not i["is_tie"]]
    ties = [i for i in items if i["is_tie"]]
    verdicts = {decided[0]["pair_id"]: "ai", decided[1]["pair_id"]: "ai", decided[2]["pair_id"]: "human",
                decided[3]["pair_id"]: "both", ties[0]["pair_id"]: "neither", ties[1]["pair_id"]: "ai"}
    for pid, v in verdicts.items():
        review.record(pid, v, f"note on {pid}")
    assert review.ws.n_pending(audit_id) == 6
    assert review.sync() and review.ws.n_pending(audit_id) == 0
    # a crash after the database commit and before the workspace noted it: the events go again, once
    review.ws.con.execute("UPDATE events SET synced_at = NULL")
    assert review.sync()
    review.close()
    set_id = adjudicated_set(audit_id)
    with Store(path, read_only=True) as st:
        assert st.count("review_verdicts", "audit_id = ?", [audit_id]) == 6
        original = dict(st.con.execute("SELECT pair_id, human_choice FROM human_labels WHERE set_id = 'reviewset'").fetchall())
        adjudicated = {r[0]: r[1:] for r in st.con.execute(
            "SELECT pair_id, human_choice, annotator FROM human_labels WHERE set_id = ?", [set_id]).fetchall()}
        n_pairs, n_skipped, skips = st.one("SELECT n_pairs, n_skipped, skips_json FROM human_sets WHERE set_id = ?",
                                           [set_id])
        run_id, result = st.one("SELECT run_id, result_json FROM audits WHERE audit_id = ?", [audit_id])
    # both / neither / "AI right" on an AI tie carry no preference: left out, counted by reason
    left_out = {pid for pid, v in verdicts.items() if v in ("both", "neither") or (v == "ai" and pid == ties[1]["pair_id"])}
    assert set(adjudicated) == set(original) - left_out and (n_pairs, n_skipped) == (len(original) - 3, 3)
    reasons = {s["reason"]: s["count"] for s in json.loads(skips)["by_reason"]}
    assert sum(reasons.values()) == 3 and all(r.startswith("adjudicated: ") for r in reasons)
    for pid, (label, annotator) in adjudicated.items():
        item = next((i for i in items if i["pair_id"] == pid), None)
        if pid in verdicts:
            assert annotator == "alice"
            assert label == (item["ai_choice"] if verdicts[pid] == "ai" else item["human_choice"])
        else:
            assert label == original[pid] and annotator != "alice"
    # factory audit takes it like any human set: two AI-right flips score 1 instead of 0; the tie and the
    # decided pair left out no longer count (0.5 and 0)
    o = json.loads(result)["overall"]
    _, adj, _ = audit(None, db=path, run_id=run_id, human_set=set_id, quiet=True, report_dir=tmp_path)
    n1 = o["n_pairs"] - 3
    assert adj.overall.n_pairs == n1
    assert adj.overall.agreement * n1 == pytest.approx(o["agreement"] * o["n_pairs"] - 0.5 - 0.5 + 2)
    # and side by side with the original
    orig_d, adj_id, adj_d, info = adjudicated_audit(path, audit_id, report_dir=tmp_path)
    assert adj_d["overall"]["agreement"] == pytest.approx(adj.overall.agreement) and info["n_pairs"] == n1
    from test_audit_run import table_text

    text = table_text(side_by_side_table(orig_d, adj_d, (audit_id, adj_id)))
    line = next(ln for ln in text.splitlines() if "factory default" in ln)
    assert f"{o['agreement']:.3f}" in line and f"{adj.overall.agreement:.3f}" in line
    assert f"{adj.overall.agreement - o['agreement']:+.3f}" in line
    from typer.testing import CliRunner

    from factory.cli import app

    out = CliRunner().invoke(app, ["audit", "adjudicated", audit_id, "--db", str(path), "--report-dir", str(tmp_path)],
                             env={"COLUMNS": "250"})
    assert out.exit_code == 0, out.output
    assert f"{o['agreement']:.3f}" in out.output and f"human set {set_id}: {n1:,} pairs, 6 adjudicated" in out.output


def test_later_verdicts_and_undo_update_the_set(db, review):
    path, audit_id = db
    item = next(i for i in all_items(review) if not i["is_tie"])
    pid, set_id = item["pair_id"], adjudicated_set(audit_id)

    def label():
        review.sync()
        with Store(path, read_only=True) as st:
            row = st.one("SELECT human_choice FROM human_labels WHERE set_id = ? AND pair_id = ?", [set_id, pid])
            n, skipped = st.one("SELECT n_pairs, n_skipped FROM human_sets WHERE set_id = ?", [set_id])
            assert n == st.count("human_labels", "set_id = ?", [set_id])
        return row[0] if row else None, skipped

    review.record(pid, "ai", None)
    assert label() == (item["ai_choice"], 0)
    review.record(pid, "both", None)
    assert label() == (None, 1)
    review.undo()
    assert label() == (item["ai_choice"], 0)
    review.undo()
    assert label() == (item["human_choice"], 0)


def test_refresh_rebuilds_the_copy_and_keeps_verdicts(db, review):
    before = all_items(review)
    review.record(before[0]["pair_id"], "ai", "kept")
    review.ws.con.execute("DELETE FROM items WHERE rank > 3")  # a stale or damaged copy
    review.refresh()
    review.refresh()  # twice: replacing rows of the same audit in one transaction each time
    after = all_items(review)
    assert [(i["pair_id"], i["rank"]) for i in after] == [(i["pair_id"], i["rank"]) for i in before]
    assert after[0]["verdict"] == "ai" and review.ws.n_pending(review.audit_id) == 1


def test_adjudicated_needs_verdicts_first(db):
    from factory.review.agreement import adjudicated_audit

    with pytest.raises(StoreError, match="no adjudicated labels yet; give verdicts with `factory review"):
        adjudicated_audit(db[0], db[1])


# -- a run holding the database ------------------------------------------------------------------


def test_lock_held_browses_the_workspace_and_queues_verdicts(db):
    path, audit_id = db
    Review(path, annotator="alice").close()  # the workspace copy exists
    busy = holder(path)
    try:
        r = Review(path, annotator="alice")
        assert (r.state.busy.run_id, r.state.busy.pid) == ("busy-run", busy.pid)
        assert f"in use by run busy-run (pid {busy.pid})" in str(r.state.busy)
        pid = all_items(r)[0]["pair_id"]
        assert Q.pair_detail(r.ws, audit_id, pid)["response_a"]  # browsing works from the copy
        r.record(pid, "ai", "queued while busy")
        assert r.sync() is False and r.ws.n_pending(audit_id) == 1
        with pytest.raises(Busy, match="busy-run"):
            r.refresh()
    finally:
        release(busy)
    assert r.sync() is True and r.state.busy is None
    r.close()
    with Store(path, read_only=True) as st:
        assert st.one("SELECT verdict, note, annotator FROM review_verdicts") == ("ai", "queued while busy", "alice")


def test_lock_held_without_a_workspace_copy_is_a_clear_error(db):
    path, _ = db
    busy = holder(path)
    try:
        with pytest.raises(StoreError, match=rf"in use by run busy-run \(pid {busy.pid}\).*has no copy of any audit "
                                             r"yet: start `factory review` again when the run has finished"):
            Review(path, annotator="alice")
    finally:
        release(busy)
    assert not workspace_path(path).exists() or Workspace(workspace_path(path)).audit() is None


def test_a_refused_write_gives_the_lock_back(db):
    """A read-only reader (no writer lock) blocks DuckDB: the sync attempt fails, and must not keep the
    store's writer lock, or every run started afterwards would be refused."""
    path, audit_id = db
    r = Review(path, annotator="alice")
    r.record(all_items(r)[0]["pair_id"], "human", None)
    reader = holder(path, read_only=True)
    try:
        assert r.sync() is False and r.state.busy is not None and r.state.busy.pid == reader.pid
        fd = os.open(f"{path}.lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if the review process still held it
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
    finally:
        release(reader)
    assert r.sync() is True
    r.close()


def test_a_verdict_survives_a_crash(db):
    path, audit_id = db
    Review(path, annotator="alice").close()
    ws = workspace_path(path)
    code = (f"import sys, time; from factory.review.workspace import Workspace; w = Workspace({str(ws)!r}); "
            f"pid = w.one('SELECT pair_id FROM items ORDER BY rank LIMIT 1')['pair_id']; "
            f"w.record({audit_id!r}, pid, 'human', 'before the crash', 'alice'); print(pid, flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    pid = p.stdout.readline().strip()
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    w = Workspace(ws)
    try:
        assert w.one("SELECT pair_id, verdict, note, synced_at FROM events") == {
            "pair_id": pid, "verdict": "human", "note": "before the crash", "synced_at": None}
        assert w.n_pending(audit_id) == 1
    finally:
        w.close()
    r = Review(path, annotator="alice")  # the next session copies it into the database
    assert r.sync() and r.ws.n_pending(audit_id) == 0
    r.close()


def test_judge_messages_on_demand_and_kept(db):
    from factory.lineage import row_messages

    path, audit_id = db
    r = Review(path, annotator="alice")
    jid = r.ws.one("SELECT id FROM judgements WHERE audit_id = ? LIMIT 1", [audit_id])["id"]
    with Store(path, read_only=True) as st:
        want = row_messages(st, jid)
    other = r.ws.one("SELECT id FROM judgements WHERE audit_id = ? AND id <> ? LIMIT 1", [audit_id, jid])["id"]
    assert r.messages(jid) == want and want and want[-1]["role"] in ("user", "assistant")
    busy = holder(path)
    try:
        assert r.messages(jid) == want  # kept in the workspace
        with pytest.raises(Busy, match="busy-run"):
            r.messages(other)
    finally:
        release(busy)
    with pytest.raises(KeyError, match="not one of this audit's queued pairs"):
        r.messages("not-a-judgement")
    r.close()
