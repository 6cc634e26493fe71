"""Issue 22's audit details: a human set starting at an offset, below-chance flagged under 30 pairs, the
position plot saying when every value is 0, disagreements with their prompt, each scope once in
`audit adjudicated`, and labels from incomplete principle coverage flagged and filterable."""

from __future__ import annotations

import json

import pyarrow as pa

from factory import prefs
from factory.audit.metrics import compute_audit
from factory.audit.report import verdict, write_html
from factory.constitution import load_constitution
from factory.engines.base import Completion
from factory.engines.fake import FakeEngine
from factory.export import export_prefs
from factory.human import import_human
from factory.review.agreement import side_by_side_table
from factory.review.plots import position_svg
from runkit import REPO, invoke, pair_records, prefs_yaml, query, wide, write_jsonl  # noqa: F401


def _judgements(rows):
    pid, prin, order, p = (list(c) for c in zip(*rows, strict=True))
    return pa.table({"pair_id": pid, "principle_id": prin, "order": order, "p_a": pa.array(p, pa.float64())})


def _human(ids, **texts):
    return pa.table({"pair_id": ids, "human_choice": ["a"] * len(ids), "len_a": pa.array([10] * len(ids), pa.int64()),
                     "len_b": pa.array([10] * len(ids), pa.int64()), **texts})


def _audit(agree: int, disagree: int, **kw):
    ps = [0.9] * agree + [0.1] * disagree
    ids = [f"p{i:03d}" for i in range(len(ps))]
    j = _judgements([(pid, "x", o, p) for pid, p in zip(ids, ps) for o in ("ab", "ba")])
    return compute_audit(j, _human(ids, **kw), {"x": 1.0}, n_bootstrap=100)


def test_an_interval_wholly_below_chance_is_flagged_under_30_pairs():
    r = _audit(2, 16)  # 2 of 18: exact interval [0.014, 0.347]
    assert r.overall.n_decided == 18 and r.overall.decided_ci[1] < 0.5
    assert r.overall.chance == "below"
    v = verdict(r)
    assert "below 0.5" in v and "only 18 decided pairs" in v and "too few" not in v
    assert _audit(16, 2).overall.chance == "too_few"  # good-looking but few: still no verdict
    assert _audit(5, 5).overall.chance == "too_few"


def test_the_position_plot_says_when_every_value_is_0():
    r, r2 = _audit(3, 3).to_dict(), _audit(3, 3).to_dict()
    for b in (r["overall"], *r["per_principle"]):  # no pair judged in both orders: no value
        b["position"].update(consistency=None, p_prefers_first=None)
    for b in (r2["overall"], *r2["per_principle"]):
        b["position"].update(consistency=0.0, p_prefers_first=0.0)
    assert "every value is 0" in position_svg(r2)
    assert "no value to plot" in position_svg(r)
    assert "every value is 0" not in position_svg(_audit(3, 3).to_dict())


def test_most_confident_disagreements_show_their_prompt(tmp_path):
    convs = [json.dumps([{"role": "user", "content": f"What is the capital of place {i}?"}]) for i in range(6)]
    r = _audit(3, 3, conversation=convs, response_a=["ra"] * 6, response_b=["rb"] * 6)
    out = write_html(r, tmp_path / "r.html", title="t", meta={})
    html = out.read_text()
    summaries = [s.split("</summary>")[0] for s in html.split("<summary>")[1:]]
    assert len(summaries) == 3 and all("What is the capital of place" in s for s in summaries)


def test_audit_adjudicated_prints_each_scope_once():
    a, b = _audit(20, 5).to_dict(), _audit(18, 7).to_dict()
    t = side_by_side_table(a, b, ("x", "y"))
    scopes = list(t.columns[0].cells)
    assert scopes.count("factory default") == 1 and scopes.count("naive") == 1 and len(scopes) == len(set(scopes))


def test_human_import_offset_and_audit_human_offset(tmp_path, wide):
    rows = [{"prompt": f"q{i}", "response_a": f"a{i}", "response_b": f"b{i}", "human_choice": "a"} for i in range(10)]
    rows.insert(4, {"prompt": "no choice", "response_a": "x", "response_b": "y"})  # a skipped row inside the slice
    f = write_jsonl(tmp_path / "h.jsonl", rows)
    db = tmp_path / "h.duckdb"
    whole, n_whole, _ = import_human(db, f, format="jsonl")
    tail, n_tail, skips = import_human(db, f, format="jsonl", offset=3)
    assert (n_whole, n_tail) == (10, 7) and whole != tail
    got = [r[0] for r in query(db, "SELECT source_row FROM human_labels WHERE set_id = ? ORDER BY 1", [tail])]
    assert got == [4, 6, 7, 8, 9, 10, 11]  # 1-based lines; line 5 is the skipped one
    assert [s.row for s in skips] == [5]
    # offset and limit count the source's pairs as `export human` does (line 5, without a choice, is one)
    code, out, _ = invoke(["human", "import", f, "--db", db, "--format", "jsonl", "--offset", "3", "--limit", "3"])
    assert code == 0 and ": 2 pairs, 1 rows skipped" in out
    code, out, _ = invoke(["human", "import", f, "--db", db, "--format", "jsonl", "--offset", "50"])
    assert code == 2 and "past its 11 pairs" in out
    from factory.kinds import load

    y = tmp_path / "a.yaml"
    base = (f"kind: audit\nname: a\nconstitution: {REPO}/constitutions/harmless.yaml\n"
            f"engine: {{kind: fake}}\ndb: {db}\n")
    ids = []
    for human in (f"{{path: {f}, format: jsonl}}", f"{{path: {f}, format: jsonl, offset: 0}}",
                  f"{{path: {f}, format: jsonl, offset: 3}}"):
        y.write_text(base + f"human: {human}\n")
        _, lp = load(y)
        lp.engine_model = lp.expected_engine_model()
        ids.append(lp.run_id)
    assert ids[0] == ids[1] != ids[2]  # offset 0 is the old file: its run id is unchanged


class FailSome(FakeEngine):
    """Fails every request about the listed pairs that asks one of the listed principles."""

    def __init__(self, markers, questions, **kw):
        super().__init__(model="smollm2-135m", **kw)
        self.markers, self.questions = markers, questions

    def _one(self, req):
        text = "\n".join(m["content"] for m in req.messages)
        if any(m in text for m in self.markers) and any(q in text for q in self.questions):
            return Completion(key=req.key, status="failed", error="injected: empty rationale")
        return super()._one(req)


def test_labels_from_incomplete_principle_coverage_are_flagged_and_filtered(tmp_path, wide):
    recs = pair_records(6)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", recs)
    db = tmp_path / "o.duckdb"
    y = prefs_yaml(tmp_path / "p.yaml", pairs=pairs, db=db, per_pair=4)
    c = load_constitution(REPO / "constitutions/harmless.yaml")
    questions = [p.comparison for p in c.principles]
    engine = FailSome([recs[1]["response_a"], recs[2]["response_a"]], questions[: len(questions) // 2])
    s = prefs.run(y, engine=engine, quiet=True)
    rows = query(db, "SELECT pair_id, n_principles FROM preferences ORDER BY pair_id")
    short = [pid for pid, n in rows if n < 4]
    assert short, rows  # the injected failures left some labels with fewer principles than asked
    from factory.coverage import COVERAGE_KEY

    assert s.labels[COVERAGE_KEY] == len(short)
    code, out, _ = invoke(["status", "--db", db])
    assert f"{len(short)} of 6 labels pooled from incomplete principle coverage" in out
    full = export_prefs(db, s.run_id, tmp_path / "all")
    done = export_prefs(db, s.run_id, tmp_path / "complete", complete_only=True)
    assert done.dropped.get("incomplete principle coverage") == len([p for p in short if p in _decided(db)])
    assert full.rows - done.rows == done.dropped.get("incomplete principle coverage", 0)


def _decided(db):
    return {pid for (pid,) in query(db, "SELECT pair_id FROM preferences WHERE NOT is_tie AND p_a IS NOT NULL")}


def test_a_human_pair_that_could_never_fit_is_skipped_before_it_is_stored(tmp_path):
    from factory.human import import_into
    from factory.store import Store

    rows = [{"prompt": f"q{i}", "response_a": f"a{i}", "response_b": f"b{i}", "human_choice": "a"} for i in range(4)]
    rows[2]["response_a"] = "x" * 5000
    f = write_jsonl(tmp_path / "h.jsonl", rows)
    with Store(tmp_path / "h.duckdb", writer_run="t") as store:
        _, n, skips = import_into(store, f, format="jsonl", max_chars=1000)
        stored = store.one("SELECT max(length(response_a)) FROM pairs")[0]
    assert n == 3 and [s.row for s in skips] == [3] and "could never fit" in skips[0].reason and stored < 1000
