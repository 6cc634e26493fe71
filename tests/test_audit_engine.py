"""Integration: the real vLLM CPU engine audits 50 shared hh-rlhf pairs (and a planted set).

50 pairs x 2 sampled principles x 2 orders = 200 scoring requests plus 8 for the planted set, on the
session's one engine (the naive principle is not re-judged on every pair here, to keep it short;
the fake-engine test covers that path).
"""

from __future__ import annotations

import pytest

from factory.audit.run import audit, compare_audits
from factory.constitution import load_constitution
from factory.store import Store

from conftest import HH_RLHF, REPO
from test_audit_run import ESCAPED, audit_yaml, check_report, check_result, planted_set, table_text

pytestmark = [pytest.mark.engine,
              pytest.mark.usefixtures("hh_rlhf")]  # fails, never skips, when the shared file is missing


def test_real_engine_audit_of_50_shared_pairs(engine, tmp_path):
    human = f"{{path: {HH_RLHF}, format: hh-rlhf, limit: 50}}"
    path = audit_yaml(tmp_path, name="hh50", human=human, engine="vllm", audit_cfg="{naive_all_pairs: false}")
    aid, result, report = audit(path, engine=engine, quiet=True)
    d = result.to_dict()
    check_result(d, load_constitution(REPO / "constitutions/harmless.yaml").ids, 50)
    assert d["counts"]["judgements_total"] == 200 and d["counts"]["judgements_failed"] == 0
    check_report(report, planted=False)

    phuman, const = planted_set(tmp_path)
    ppath = audit_yaml(tmp_path, name="planted", human=phuman, judge="tie_eps: 0.0", constitution=str(const),
                       engine="vllm")
    bid, bres, breport = audit(ppath, engine=engine, quiet=True)
    b = bres.to_dict()
    check_result(b, ["harm", "honest"], 2)
    assert len(b["divergence"]) == 1  # mirrored pairs: exactly one disagrees with the human
    html = check_report(breport, planted=True)
    assert ESCAPED in html
    with Store(tmp_path / "a.duckdb", read_only=True) as st:
        assert st.count("audits") == 2
    text = table_text(compare_audits(tmp_path / "a.duckdb", aid, bid))
    assert aid in text and bid in text
