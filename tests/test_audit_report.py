"""Audit report: terminal table, self-contained and escaped HTML, comparison of two audits."""

from __future__ import annotations

import json
import re

import pyarrow as pa
import pytest
from rich.console import Console

from factory.audit.metrics import compute_audit
from factory.audit.report import compare, compare_table, render_terminal, verdict, write_html

EVIL = "<script>alert(1)</script>"


def audit(n: int, right: int, *, principle: str = "harmless", texts: bool = False):
    """n pairs judged on one principle (both orders); the first `right` agree with the human."""
    ids = [f"p{i:03d}" for i in range(n)]
    p = [0.9 if i < right else 0.1 for i in range(n)]
    j = pa.table({"pair_id": [i for i in ids for _ in "ab"], "principle_id": [principle] * 2 * n,
                  "order": ["ab", "ba"] * n, "p_a": [x for x in p for _ in "ab"]})
    lengths = [100 + 50 * (i % 2) for i in range(n)]
    cols = {"pair_id": ids, "human_choice": ["a"] * n, "len_a": lengths, "len_b": [100] * n}
    if texts:
        cols |= {"conversation": ["hi"] * n, "response_a": [EVIL] * n, "response_b": ["fine"] * n}
    return compute_audit(j, pa.table(cols), {principle: 1.0}, n_bootstrap=200)


@pytest.fixture(scope="module")
def html_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("audit") / "report.html"
    meta = {"model": f"judge{EVIL}", "constitution": {"name": "hh", "version": "1", "hash": "abc123"},
            "run_id": "run-7", "date": "2025-01-01", "skips": [{"reason": f"too long {EVIL}", "count": 17}]}
    write_html(audit(40, 10, principle=f"p{EVIL}", texts=True), path, title=f"Audit {EVIL}", meta=meta)
    return path.read_text(encoding="utf-8")


def test_html_escapes_planted_script(html_text):
    assert "<script" not in html_text.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html_text  # response text, meta, title, principle id


def test_html_is_self_contained_with_plots(html_text):
    assert html_text.count("<svg") == 4
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", html_text, re.I)
    assert "<link" not in html_text and "@import" not in html_text
    assert not re.search(r"""url\(\s*["']?(?!#)""", html_text)  # only in-document refs (SVG clip paths)


def test_html_has_meta_counts_and_skips(html_text):
    for needle in ("run-7", "abc123", "2025-01-01", "judgements_failed", "Skipped rows", "17",
                   "too long &lt;script&gt;", "Most confident disagreements"):
        assert needle in html_text


def test_terminal_rows_and_chance_verdict():
    console = Console(record=True, width=220)
    render_terminal(audit(40, 20), console)  # 20 of 40 right: agreement 0.5
    out = console.export_text()
    for row in ("factory default", "naive baseline", "always longer", "always shorter", "chance (0.5)"):
        assert row in out
    assert "0.500" in out and "not distinguishable from chance" in out


def test_verdict_above_below_and_empty():
    assert "above chance" in verdict(audit(40, 38))
    assert "below 0.5" in verdict(audit(40, 2))
    assert "nothing to audit" in verdict(audit(0, 0))


def test_report_renders_from_saved_json(tmp_path):
    d = json.loads(json.dumps(audit(10, 7).to_dict()))
    render_terminal(d, Console(record=True, width=200))
    assert "<svg" in write_html(d, tmp_path / "r.html", title="t", meta={}).read_text()


def test_compare_deltas_and_missing_principles():
    a, b = audit(40, 20).to_dict(), audit(40, 30, principle="helpful").to_dict()
    diff = compare(a, b)
    agree = {r["metric"]: r for r in diff["overall"]}["agreement"]
    assert (agree["a"], agree["b"]) == (0.5, 0.75) and agree["delta"] == pytest.approx(0.25)
    assert set(diff["per_principle"]) == {"harmless", "helpful"}
    only_a = {r["metric"]: r for r in diff["per_principle"]["harmless"]}["agreement"]
    assert only_a["b"] is None and only_a["delta"] is None
    table = compare_table(a, b)
    assert table.row_count == len(diff["overall"]) * 4


def test_small_samples_and_all_ties_print_no_degenerate_interval():
    console = Console(record=True, width=240)
    render_terminal(audit(1, 1), console)  # one pair: no verdict, an exact interval instead of [1, 1]
    out = console.export_text()
    assert "[1.000, 1.000]" not in out and "too few to say: 1/1 [0.025, 1.000]" in out
    assert "verdict: too few pairs to say (n=1 decided" in out
    ties = compute_audit(pa.table({"pair_id": ["p", "p", "q", "q"], "principle_id": ["h"] * 4,
                                   "order": ["ab", "ba"] * 2, "p_a": [0.5] * 4}),
                         pa.table({"pair_id": ["p", "q"], "human_choice": ["a", "b"], "len_a": [1, 1],
                                   "len_b": [1, 1]}), {"h": 1.0})
    console = Console(record=True, width=240)
    render_terminal(ties, console)
    out = console.export_text()
    assert "[0.500, 0.500]" not in out and "no pair decided (all 2 ties)" in out
    assert "verdict: no pair was decided (all 2 are ties)" in out
