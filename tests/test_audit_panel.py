"""Tests for factory.audit.panel: per-judge audits side by side, inter-judge agreement and correlated errors.

The small examples are worked by hand in the comments; the large ones are simulations whose truth is
known (identical judges err together; independent judges do not).
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from factory.audit.panel import (compute_panel, error_correlation, fleiss_kappa, krippendorff_alpha, n_eff,
                                 panel_lines, panel_rows, panel_section_html)

# 3 judges on 6 pairs: their choices (a/b; "-" = a tie, p = 0.5) and the human's.
#   pair  J1 J2 J3   human
#   1     a  a  a    a
#   2     a  a  b    a
#   3     b  b  b    b
#   4     b  a  b    b
#   5     a  -  a    a
#   6     b  b  a    b
CHOICES = {"J1": "aabbab", "J2": "aaba-b", "J3": "abbbaa"}
HUMAN = "aabbab"
P = {"a": 0.8, "b": 0.3, "-": 0.5}


def _table(choices=CHOICES, pairs: int = 6) -> pa.Table:
    rows = [(f"p{i + 1}", j, P[c[i]]) for j, c in choices.items() for i in range(pairs)]
    return pa.table({"pair_id": [r[0] for r in rows], "judge": [r[1] for r in rows], "p_a": [r[2] for r in rows]})


def _human(choice: str = HUMAN) -> pa.Table:
    return pa.table({"pair_id": [f"p{i + 1}" for i in range(len(choice))], "human_choice": list(choice)})


def test_alpha_and_fleiss_kappa_by_hand():
    r = compute_panel(_table(), _human(), n_bootstrap=200)
    # Krippendorff's α, units with ≥ 2 decided values (all 6; pair 5 has 2):
    #   a_u = 3,2,0,1,2,1   m_u = 3,3,3,3,2,3   Σ a_u·b_u/(m_u−1) = 0 + 1 + 0 + 1 + 0 + 1 = 3
    #   n = 17, n_a = 9, n_b = 8:  α = 1 − (n−1)·3/(n_a·n_b) = 1 − 48/72 = 1/3
    assert r.alpha.value == pytest.approx(1 / 3) and r.alpha.n_items == 6
    # Fleiss' κ on the 5 pairs every judge decided (not pair 5), m = 3: a_i = 3,2,0,1,1
    #   P_i = (a² + b² − 3)/6 = 1, 1/3, 1, 1/3, 1/3 → P̄ = 0.6;  p_a = 7/15, P_e = (49 + 64)/225 = 113/225
    #   κ = (0.6 − 113/225)/(1 − 113/225) = 22/112 = 11/56
    assert r.fleiss.value == pytest.approx(11 / 56) and r.fleiss.n_items == 5
    assert r.alpha.too_few and r.fleiss.too_few and r.errors.too_few  # 6 items < 30


def test_per_judge_agreement_and_kappa_by_hand():
    r = compute_panel(_table(), _human(), n_bootstrap=200)
    by = {b.name: b for b in r.per_judge}
    assert by["J1"].agreement == 1.0 and by["J1"].cohen_kappa == pytest.approx(1.0)
    # J2: decided on 1,2,3,4,6: right on 1,2,3,6, wrong on 4; a tie (scores 0.5) on 5 → (4 + 0.5)/6 = 0.75
    assert by["J2"].agreement == pytest.approx(0.75) and by["J2"].n_ties == 1 and by["J2"].n_decided == 5
    # J3 vs human: (a,a)=2 (pairs 1,5), (a,b)=1 (pair 2), (b,b)=2 (3,4), (b,a)=1 (6)
    #   p_o = 4/6, both say a half the time: p_e = 0.5 → κ = (2/3 − 1/2)/(1/2) = 1/3
    assert by["J3"].cohen_kappa == pytest.approx(1 / 3)
    assert by["J3"].chance == "too_few"  # 6 decided pairs
    lo, hi = by["J3"].kappa_ci
    assert lo <= 1 / 3 <= hi and lo < hi
    # no panel labels given: the panel is the mean p_a of the judges (pair 4: (0.3 + 0.8 + 0.3)/3 < 0.5 → b)
    assert "mean p_a" in r.settings["panel_rule"] and r.panel.n_pairs == 6


def test_error_correlation_by_hand():
    # errors on 4 pairs: J1 = J2 = [1,0,0,1], J3 = [0,1,0,1]
    #   ρ(J1,J2) = 1;  ρ(J1,J3): both have mean 1/2, E[xy] = 1/4 → cov 0 → ρ = 0;  ρ(J2,J3) = 0
    #   ρ̄ = 1/3 → n_eff = 3/(1 + 2/3) = 1.8
    e = np.array([[1, 1, 0], [0, 0, 1], [0, 0, 0], [1, 1, 1]], dtype=float)
    r = error_correlation(e, ["J1", "J2", "J3"], n_bootstrap=100)
    np.testing.assert_allclose(r.rho, [[1, 1, 0], [1, 1, 0], [0, 0, 1]], atol=1e-12)
    assert r.rho_mean == pytest.approx(1 / 3) and r.n_eff == pytest.approx(1.8) and r.too_few
    assert n_eff(3, 0.0) == 3 and n_eff(3, 1.0) == 1 and n_eff(3, -0.6) == math.inf


def test_a_judge_whose_errors_do_not_vary_is_named_and_left_out():
    e = np.array([[0, 1, 1], [0, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=float)  # J1 never errs
    r = error_correlation(e, ["J1", "J2", "J3"], n_bootstrap=50)
    assert math.isnan(r.rho[0][1]) and "J1" in r.note
    # J2 = [1,0,1,0], J3 = [1,0,0,1]: means 1/2, E[xy] = 1/4 → ρ = 0, the only defined pair
    assert r.rho_mean == pytest.approx(0.0) and r.n_eff == pytest.approx(3.0)


def _simulated(n_pairs: int, n_judges: int, accuracy: float, same: bool, seed: int = 1):
    rng = np.random.default_rng(seed)
    human = rng.random(n_pairs) < 0.5
    rows = {"pair_id": [], "judge": [], "p_a": []}
    right = rng.random(n_pairs) < accuracy
    for j in range(n_judges):
        ok = right if same else rng.random(n_pairs) < accuracy
        chose_a = np.where(ok, human, ~human)
        rows["pair_id"] += [f"q{i}" for i in range(n_pairs)]
        rows["judge"] += [f"judge-{j}"] * n_pairs
        rows["p_a"] += np.where(chose_a, 0.9, 0.1).tolist()
    labels = pa.table({"pair_id": [f"q{i}" for i in range(n_pairs)], "human_choice": np.where(human, "a", "b").tolist()})
    return pa.table(rows), labels


def test_identical_judges_are_worth_one_judge():
    j, h = _simulated(300, 3, 0.7, same=True)
    r = compute_panel(j, h, n_bootstrap=300)
    assert r.errors.rho_mean == pytest.approx(1.0) and r.errors.n_eff == pytest.approx(1.0)
    assert r.errors.n_eff_ci == pytest.approx((1.0, 1.0))
    assert r.alpha.value == pytest.approx(1.0) and r.fleiss.value == pytest.approx(1.0)
    assert not (r.alpha.too_few or r.fleiss.too_few or r.errors.too_few)


def test_independent_judges_are_worth_n_judges():
    j, h = _simulated(20_000, 4, 0.7, same=False)
    r = compute_panel(j, h, n_bootstrap=300)
    assert abs(r.errors.rho_mean) < 0.02
    lo, hi = r.errors.n_eff_ci
    assert lo <= 4.0 <= hi and r.errors.n_eff == pytest.approx(4.0, abs=0.25)
    # they agree with each other only through the truth: P(same side) = 0.7² + 0.3² = 0.58, base rate 1/2
    #   → α ≈ κ ≈ (0.58 − 0.5)/(1 − 0.5) = 0.16
    assert r.alpha.value == pytest.approx(0.16, abs=0.02) and r.fleiss.value == pytest.approx(0.16, abs=0.02)
    assert all(b.chance == "above" for b in r.per_judge)


def test_random_judges_agree_at_chance_level():
    rng = np.random.default_rng(3)
    choice = (rng.random((5000, 3)) < 0.5).astype(float)
    a, f = krippendorff_alpha(choice, 200, rng), fleiss_kappa(choice, 200, rng)
    assert a.ci[0] <= 0 <= a.ci[1] and f.ci[0] <= 0 <= f.ci[1] and abs(a.value) < 0.03


def test_position_and_length_bias_from_optional_columns():
    n = 40
    # a judge that always prefers the response shown first: P(a) = 0.9 with a first, 0.1 with b first
    j = pa.table({"pair_id": [f"q{i}" for i in range(n)] * 2, "judge": ["first"] * n + ["longer"] * n,
                  "p_a": [0.5] * n + [0.8 if i % 2 else 0.2 for i in range(n)],
                  "p_ab": [0.9] * n + [None] * n, "p_ba": [0.1] * n + [None] * n,
                  "len_a": [100.0 + 200 * (i % 2) for i in range(n)] * 2, "len_b": [200.0] * 2 * n})
    h = pa.table({"pair_id": [f"q{i}" for i in range(n)], "human_choice": ["a" if i % 3 else "b" for i in range(n)]})
    r = compute_panel(j, h, n_bootstrap=100)
    first, longer = r.per_judge
    assert first.position["p_prefers_first"] == 1.0 and first.position["consistency"] == 0.0
    assert first.position["mean_shift_to_first"] == pytest.approx(0.8) and not first.position["too_few"]
    assert first.position["p_prefers_first_ci"][0] > 0.9
    # "longer" picks a exactly when a is longer (odd i: len_a 300 > 200)
    assert longer.length["ai_p_prefers_longer"] == 1.0 and longer.length["n"] == n
    assert longer.position["n_judgements"] == 0


def test_too_few_items_are_said_everywhere_and_html_escapes():
    choices = {"<b>big</b>": "aabbab", "small": "abbbaa"}
    r = compute_panel(_table(choices), _human(), n_bootstrap=50)
    lines = panel_lines(r)
    assert len(lines) == 3 and all("too few items to conclude" in line for line in lines)
    rows = panel_rows(r)
    assert [row["labeller"] for row in rows] == ["<b>big</b>", "small", "panel"]
    assert all(row["vs chance: agree/decided (exact 95% CI)"].startswith("too few") for row in rows)
    html = panel_section_html(r)
    assert "&lt;b&gt;big&lt;/b&gt;" in html and "<b>big" not in html
    assert html.count("<table>") == 2
    assert r.to_dict()["errors"]["n_items"] == 6  # strict JSON (NaN → None) round trip


def test_given_panel_labels_are_audited_and_bad_input_is_named():
    panel = pa.table({"pair_id": [f"p{i + 1}" for i in range(6)], "p_a": [0.9, 0.9, 0.1, 0.1, 0.9, 0.1]})
    r = compute_panel(_table(), _human(), panel, n_bootstrap=50)
    assert r.panel.agreement == 1.0 and "factory.labels" in r.settings["panel_rule"]
    dup = pa.concat_tables([_table(), _table().slice(0, 1)])
    with pytest.raises(ValueError, match=r"judge 'J1' has more than one row for pair_id 'p1'"):
        compute_panel(dup, _human())
    with pytest.raises(ValueError, match=r"missing column\(s\) \['judge'\]"):
        compute_panel(_table().drop_columns(["judge"]), _human())
    with pytest.raises(ValueError, match="probability"):
        compute_panel(_table().set_column(2, "p_a", pa.array([1.5] * 18)), _human())
