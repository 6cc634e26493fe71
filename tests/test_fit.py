"""`factory audit fit`: weights fitted to human labels on a train split, audited on held-out pairs."""

from __future__ import annotations

import json

import pytest

from factory.audit.fit import fit
from factory.audit.run import audit
from factory.engines.fake import FakeEngine
from factory.store import Store, StoreError

from conftest import HH_RLHF, REPO

pytestmark = pytest.mark.usefixtures("hh_rlhf")


def audit_file(tmp, name: str, judge: str = "") -> object:
    const = tmp / "four.yaml"
    const.write_text("""name: four
version: "1"
principles:
  - {id: good, critique: c, revision: r, comparison: "Which response is less harmful?"}
  - {id: contrary, critique: c, revision: r, comparison: "Which response is more harmful?"}
  - {id: noise1, critique: c, revision: r, comparison: "Which response is shorter?"}
  - {id: noise2, critique: c, revision: r, comparison: "Which response is more formal?"}
""")
    path = tmp / f"{name}.yaml"
    path.write_text(f"""kind: audit
name: {name}
constitution: {const}
human: {{path: {HH_RLHF}, format: hh-rlhf, limit: 240, name: hh240}}
judge: {{template: {REPO}/prompts/judge.j2{", " + judge if judge else ""}}}
engine: {{kind: fake}}
db: {tmp / 'f.duckdb'}
audit: {{n_bootstrap: 200}}
""")
    return path


def plant(db, run_id: str) -> None:
    """Make 'good' agree with the human (P(human's choice) .8) and 'contrary' disagree (.2), each judgement
    keeping its order's meaning: the constitution's equal weights cancel them; a fit should not."""
    with Store(db, writer_run="plant") as st:
        for principle, p_human in (("good", 0.8), ("contrary", 0.2)):
            st.con.execute(f"""UPDATE judgements j SET p_a = CASE WHEN h.human_choice = 'a' THEN {p_human}
                                                                   ELSE 1 - {p_human} END
                               FROM human_labels h WHERE h.pair_id = j.pair_id AND j.principle_id = '{principle}'""")
            st.con.execute("""UPDATE judgements SET p_first = CASE WHEN "order" = 'ab' THEN p_a ELSE 1 - p_a END""")


def test_fit_finds_planted_weights_and_reports_held_out_gain(tmp_path):
    s = audit(audit_file(tmp_path, "base"), engine=FakeEngine(model="m"), quiet=True)
    db = tmp_path / "f.duckdb"
    with Store(db, read_only=True) as st:
        run_id = st.one("SELECT run_id FROM audits")[0]
    plant(db, run_id)
    r = fit(db, run_id, "hh240", "planted", n_bootstrap=200)
    assert r.weights["good"] > 0 > r.weights["contrary"]
    assert abs(r.weights["good"]) > 3 * max(abs(r.weights["noise1"]), abs(r.weights["noise2"]))
    assert r.n_train + r.n_test == 240 and min(r.n_train, r.n_test) > 80
    # constitution weights: good and contrary cancel → near chance; fitted → clearly better, interval above 0
    assert r.fitted.agreement > r.uniform.agreement and r.delta_ci[0] > 0 and r.verdict.startswith("gain")
    with Store(db, read_only=True) as st:
        body = json.loads(st.one("SELECT body FROM weight_sets WHERE name = 'planted'")[0])
    assert body["weights"] == r.weights and body["heldout"]["verdict"] == r.verdict
    # the weight set is a value a run can use: the audit's label now pools log-odds with the fitted
    # weights, and the same pairs under the constitution's weights are shown beside it
    path = audit_file(tmp_path, "fitted", judge="weights: planted")
    eng = FakeEngine(model="m")
    s2 = audit(path, engine=eng, quiet=True)
    assert eng.requests == 0  # the judgements are reused: weights change labels, not what is asked
    d = s2[1].to_dict()
    assert d["settings"]["label_rule"]["name"] == "planted" and d["settings"]["label_rule"]["pool"] == "logit"
    names = [v["name"] for v in d["variants"]]
    assert "constitution weights" in names
    const = next(v for v in d["variants"] if v["name"] == "constitution weights")
    assert d["overall"]["agreement"] > const["agreement"]


def test_random_judge_shows_no_gain_and_small_sets_are_refused(tmp_path):
    audit(audit_file(tmp_path, "base"), engine=FakeEngine(model="m"), quiet=True)
    db = tmp_path / "f.duckdb"
    with Store(db, read_only=True) as st:
        run_id = st.one("SELECT run_id FROM audits")[0]
    r = fit(db, run_id, "hh240", "noise", n_bootstrap=200)
    assert r.delta_ci[0] <= 0 <= r.delta_ci[1] and r.verdict.startswith("no gain")
    with pytest.raises(StoreError, match="unknown|no human set"):
        fit(db, run_id, "nope", "x")
    with pytest.raises(StoreError, match="train-frac"):
        fit(db, run_id, "hh240", "x", train_frac=0.99)
