"""The audit flow on the fake engine: import, judge (resumable), metrics, stored row, HTML, compare."""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path

import pytest
from rich.console import Console

from factory import prefs
from factory.audit.run import audit, compare_audits, naive_run
from factory.engines.fake import FakeEngine
from factory.store import Store

from conftest import HH_RLHF, REPO

pytestmark = pytest.mark.usefixtures("hh_rlhf")  # fails, never skips, when the shared file is missing
SCRIPT = "<script>alert(1)</script>"
ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"


# -- helpers shared with test_audit_engine ------------------------------------------------------


def audit_yaml(tmp: Path, *, name: str, human: str, judge: str = "per_pair: 2", constitution: str | None = None,
               audit_cfg: str = "{}", engine: str = "fake") -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(f"""kind: audit
name: {name}
constitution: {constitution or REPO / 'constitutions/harmless.yaml'}
human: {human}
judge: {{template: {REPO}/prompts/judge.j2, {judge}}}
engine: {{kind: {engine}}}
db: {tmp / 'a.duckdb'}
chunk_rows: 16
audit: {audit_cfg}
""")
    return path


def planted_set(tmp: Path) -> tuple[str, Path]:
    """Two mirrored pairs (a and b swapped, human picks 'a' in both) holding a <script>: the judge's
    p_a for one is 1 - p_a of the other (same rendered prompts), so with tie_eps 0 exactly one of them
    is a disagreement and lands in the divergence table. Plus one bad row (counted skip)."""
    evil, plain = f"Sure, paste this: {SCRIPT}", "I can't help with running scripts on other people's pages."
    prompt = f"What does {SCRIPT} do on a web page?"
    rows = [{"prompt": prompt, "response_a": evil, "response_b": plain, "human_choice": "a"},
            {"prompt": prompt, "response_a": plain, "response_b": evil, "human_choice": "a"},
            {"prompt": prompt, "response_a": "x", "response_b": "y", "human_choice": "maybe"}]
    path = tmp / "planted.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    const = tmp / "two.yaml"
    const.write_text("""name: two
version: "1"
principles:
  - {id: harm, critique: c, revision: r, comparison: "Which response is less harmful?"}
  - {id: honest, critique: c, revision: r, comparison: "Which response is more honest?", weight: 2}
""")
    return f"{{path: {path}, format: jsonl, name: planted}}", const


def in01(x) -> bool:
    return x is not None and 0.0 <= x <= 1.0


def check_block(b: dict, *, required: bool) -> None:
    """Every metric the issue lists is present and in its valid range (None only where undefined)."""
    for key in ("name", "n_pairs", "n_ties", "human_p_a", "agreement", "agreement_excl_ties", "agreement_ci",
                "cohen_kappa", "kappa_note", "n_decided", "n_agree", "decided_ci", "agreement_ci_method", "chance",
                "position", "length", "calibration"):
        assert key in b, key
    if b["n_pairs"] == 0 and not required:
        return
    assert b["n_pairs"] > 0 and 0 <= b["n_ties"] <= b["n_pairs"]
    lo, hi = b["agreement_ci"]
    if b["n_decided"] == 0:  # all ties: agreement is 0.5 by the tie rule, and no interval is claimed
        assert b["agreement"] == 0.5 and lo is None and hi is None and b["chance"] == "all_ties"
    else:
        assert in01(b["agreement"]) and in01(lo) and in01(hi) and lo <= b["agreement"] + 1e-12 <= hi + 2e-12
        dlo, dhi = b["decided_ci"]
        assert in01(dlo) and in01(dhi) and dlo <= b["n_agree"] / b["n_decided"] <= dhi
        assert b["chance"] in ("too_few", "above", "below", "chance")
    assert b["agreement_excl_ties"] is None or in01(b["agreement_excl_ties"])
    k = b["cohen_kappa"]
    assert (k is None and b["kappa_note"]) or -1.0 <= k <= 1.0
    pos = b["position"]
    assert pos["consistency"] is None or in01(pos["consistency"])
    assert in01(pos["p_prefers_first"]) and pos["n_judgements"] > 0
    ln = b["length"]
    assert ln["n"] >= 0
    for key in ("ai_p_prefers_longer", "ai_mean_p_longer", "human_p_prefers_longer", "ai_agreement",
                "always_longer_agreement", "always_shorter_agreement"):
        assert key in ln and (ln[key] is None or in01(ln[key])), key
    if ln["n"]:
        assert ln["always_longer_agreement"] + ln["always_shorter_agreement"] == pytest.approx(1.0)
    cal = b["calibration"]
    assert sum(cal["count"]) == cal["n"] == b["n_pairs"] and len(cal["edges"]) == len(cal["count"]) + 1
    assert in01(cal["ece"]) and in01(cal["brier"]) and cal["log_loss"] >= 0
    for m, o, c in zip(cal["mean_predicted"], cal["observed"], cal["count"]):
        assert (m is None and o is None) if c == 0 else (in01(m) and in01(o))


def check_result(d: dict, principles: list[str], n_pairs: int) -> None:
    check_block(d["overall"], required=True)
    check_block(d["naive"], required=True)
    assert d["overall"]["n_pairs"] == d["counts"]["pairs_evaluated"] == n_pairs
    assert sorted(b["name"] for b in d["per_principle"]) == sorted(principles)
    for b in d["per_principle"]:
        check_block(b, required=False)
    for row in d["divergence"]:
        assert row["human_choice"] != row["ai_choice"] and in01(row["p_a"]) and in01(row["margin"])
        assert {"conversation", "response_a", "response_b", "drivers"} <= set(row)
    margins = [r["margin"] for r in d["divergence"]]
    assert margins == sorted(margins, reverse=True)


def check_report(path: Path, *, planted: bool) -> str:
    html = path.read_text(encoding="utf-8")
    assert html.count("<svg") >= 4  # reliability, agreement, length, position plots
    assert "<script" not in html.lower()
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", html)  # self-contained: no external assets
    if planted:
        assert ESCAPED in html
        assert "unknown choice value" in html  # the skipped row is counted in the report
    return html


def table_text(table) -> str:
    buf = io.StringIO()
    Console(file=buf, width=200).print(table)
    return buf.getvalue()


def principle_ids(const: Path) -> list[str]:
    from factory.constitution import load_constitution

    return load_constitution(const).ids


# -- the test -----------------------------------------------------------------------------------


def test_audit_flow_resume_run_variant_and_compare(tmp_path):
    harmless = REPO / "constitutions/harmless.yaml"
    human = f"{{path: {HH_RLHF}, format: hh-rlhf, limit: 30}}"
    path = audit_yaml(tmp_path, name="hh", human=human, audit_cfg="{n_bootstrap: 500, top_divergent: 5}")
    eng = FakeEngine(model="smollm2-135m")
    aid, result, report = audit(path, engine=eng, quiet=True)
    d = result.to_dict()
    check_result(d, principle_ids(harmless), 30)
    # the naive principle (the constitution's first) was judged on every pair, in both orders
    assert d["settings"]["naive_principle"] == "harm-to-others" and d["naive"]["n_pairs"] == 30
    check_report(report, planted=False)
    assert report.parent == tmp_path and report.name == f"a-audit-{aid}.html"

    db = tmp_path / "a.duckdb"
    with Store(db, read_only=True) as st:
        run_id, set_id, stored, rpath = st.one("SELECT run_id, set_id, result_json, report_path FROM audits")
        assert json.loads(stored) == d and rpath == str(report)
        assert st.one("SELECT kind, status FROM runs WHERE run_id = ?", [run_id]) == ("audit", "done")
        # independent of compute_audit: agreement from the run's stored labels joined to the human choices
        agree = st.one("""SELECT avg(CASE WHEN p.is_tie THEN 0.5 WHEN p.chosen = h.human_choice THEN 1 ELSE 0 END)
                          FROM preferences p JOIN human_labels h USING (pair_id)
                          WHERE p.run_id = ? AND h.set_id = ?""", [run_id, set_id])[0]
        # and the naive baseline by hand: order ab of the naive principle, hard label, p = 0.5 a tie
        naive = st.con.execute(f"""SELECT avg(CASE WHEN j.p_a = 0.5 THEN 0.5 WHEN (j.p_a > 0.5) = (h.human_choice = 'a')
                                     THEN 1 ELSE 0 END), count(*)
                          FROM {st.run_rows('judgements', '$run')} j JOIN human_labels h USING (pair_id)
                          WHERE j."order" = 'ab' AND h.set_id = $set""",
                               {"run": naive_run(run_id), "set": set_id}).fetchone()
        n_judged = st.count("judgements")
    assert d["overall"]["agreement"] == pytest.approx(agree)
    assert (d["naive"]["agreement"], d["naive"]["n_pairs"]) == (pytest.approx(naive[0]), naive[1])

    # resume: nothing is sent to the engine again, same audit id, row replaced (not duplicated)
    eng2 = FakeEngine(model="smollm2-135m")
    aid2, result2, _ = audit(path, engine=eng2, quiet=True)
    assert eng2.calls == [] and aid2 == aid and result2.to_dict() == d
    assert d["settings"]["n_bootstrap"] == 500 and len(d["divergence"]) <= 5
    # `--run` on the same run's stored judgements (and its audit settings): the same audit, same id
    aid3, result3, _ = audit(None, db=db, run_id=run_id, human_set=set_id, quiet=True)
    assert aid3 == aid and result3.to_dict() == d
    # a prefs run with the same judge settings over the same pairs reuses every judgement; auditing it
    # with --run gives the same factory-default numbers
    ppath = tmp_path / "prefs.yaml"
    ppath.write_text(f"""kind: prefs
name: pp
constitution: {harmless}
pairs: {{source: file, path: {HH_RLHF}, format: hh-rlhf, limit: 30}}
judge: {{template: {REPO}/prompts/judge.j2, per_pair: 2}}
engine: {{kind: fake}}
db: {db}
""")
    eng3 = FakeEngine(model="smollm2-135m")
    s = prefs.run(ppath, engine=eng3, quiet=True)
    assert eng3.calls == []
    _, result4, _ = audit(None, db=db, run_id=s.run_id, human_set=set_id, quiet=True)
    assert result4.overall.agreement == pytest.approx(d["overall"]["agreement"])
    assert result4.overall.cohen_kappa == pytest.approx(d["overall"]["cohen_kappa"], nan_ok=True)

    # a second audit over a planted generic set: escaping, skips in the report, then compare
    phuman, const = planted_set(tmp_path)
    ppath2 = audit_yaml(tmp_path, name="planted", human=phuman, judge="tie_eps: 0.0", constitution=str(const))
    bid, bres, breport = audit(ppath2, engine=FakeEngine(model="smollm2-135m"), quiet=True)
    b = bres.to_dict()
    check_result(b, ["harm", "honest"], 2)
    assert len(b["divergence"]) == 1  # exactly one of the mirrored pairs disagrees with the human
    assert b["overall"]["agreement"] == 0.5
    check_report(breport, planted=True)
    with Store(db, read_only=True) as st:
        assert st.count("audits") == 3 and st.count("judgements") == n_judged + 2 * 2 * 2

    text = table_text(compare_audits(db, aid, bid))
    assert aid in text and bid in text
    delta = b["overall"]["agreement"] - d["overall"]["agreement"]
    line = next(ln for ln in text.splitlines() if "overall" in ln and "│ agreement " in ln)
    assert f"{d['overall']['agreement']:.3f}" in line and f"{delta:+.3f}" in line
    assert not math.isnan(delta)
