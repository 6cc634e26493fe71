"""Audit metrics on hand-computed examples, cross-checked with scikit-learn/scipy where the project
computes the value itself, plus degenerate inputs and small samples."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pytest

from factory.audit.metrics import calibration, compute_audit, kappa
from factory.audit.report import verdict
from factory.audit.stats import MIN_DECIDED, _index_bootstrap, bootstrap_mean_ci

# Four pairs, one principle "x", both orders (p_a = P(a better) in each judgement):
#   P1: ab .9, ba .7 -> .8  -> a     human a  (agree)       orders agree   len 100 vs 10
#   P2: ab .8, ba .2 -> .5  -> tie   human b  (scores 0.5)  orders differ  len 10 vs 100
#   P3: ab .3, ba .1 -> .2  -> b     human a  (disagree)    orders agree   len 50 vs 40 (gap 10)
#   P4: ab .4, ba .2 -> .3  -> b     human b  (agree)       orders agree   len 200 vs 100
HAND = [("P1", 0.9, 0.7, "a", 100, 10), ("P2", 0.8, 0.2, "b", 10, 100),
        ("P3", 0.3, 0.1, "a", 50, 40), ("P4", 0.4, 0.2, "b", 200, 100)]


def judgements(rows: list[tuple[str, str, str, float]]) -> pa.Table:
    pid, prin, order, p = (list(c) for c in zip(*rows, strict=True)) if rows else ([], [], [], [])
    return pa.table({"pair_id": pa.array(pid, pa.string()), "principle_id": pa.array(prin, pa.string()),
                     "order": pa.array(order, pa.string()), "p_a": pa.array(p, pa.float64())})


def human(rows: list[tuple[str, str, int, int]], **texts: list[str]) -> pa.Table:
    pid, choice, la, lb = (list(c) for c in zip(*rows, strict=True)) if rows else ([], [], [], [])
    return pa.table({"pair_id": pa.array(pid, pa.string()), "human_choice": pa.array(choice, pa.string()),
                     "len_a": pa.array(la, pa.int64()), "len_b": pa.array(lb, pa.int64()), **texts})


def hand_tables(**texts: list[str]) -> tuple[pa.Table, pa.Table]:
    j = judgements([(pid, "x", o, p) for pid, ab, ba, *_ in HAND for o, p in (("ab", ab), ("ba", ba))])
    return j, human([(pid, h, la, lb) for pid, _, _, h, la, lb in HAND], **texts)


@pytest.fixture(scope="module")
def hand():
    j, h = hand_tables(response_a=["r1", "r2", "<b>bold</b>", "r4"])
    return compute_audit(j, h, {"x": 1.0}, tie_eps=0.05, n_bins=2, n_bootstrap=500)


def test_overall_agreement_ties_and_kappa(hand):
    o = hand.overall
    assert (o.n_pairs, o.n_ties) == (4, 1)
    assert o.agreement == pytest.approx((1 + 0.5 + 0 + 1) / 4)  # the tie counts 0.5
    assert o.agreement_excl_ties == pytest.approx(2 / 3)
    # decided pairs P1, P3, P4: human [a, a, b], AI [a, b, b]: po = 2/3,
    # pe = (2/3)(1/3) + (1/3)(2/3) = 4/9, kappa = (2/3 - 4/9) / (1 - 4/9) = 0.4
    assert o.cohen_kappa == pytest.approx(0.4) and o.kappa_note is None
    lo, hi = o.agreement_ci
    assert lo <= o.agreement <= hi


def from_table(table: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(human chose a, judge chose a) arrays with the counts of a 2×2 confusion table
    [[human a & judge a, human a & judge b], [human b & judge a, human b & judge b]]."""
    y, c = [], []
    for human_a, row in ((True, table[0]), (False, table[1])):
        for judge_a, count in ((True, row[0]), (False, row[1])):
            y += [human_a] * count
            c += [judge_a] * count
    return np.array(y), np.array(c)


@pytest.mark.parametrize("table,expected", [
    # n = 50; po = (20 + 15)/50 = .7; human a 25/50, judge a 30/50:
    # pe = .5·.6 + .5·.4 = .5; κ = (.7 − .5)/(1 − .5) = 0.4
    ([[20, 5], [10, 15]], 0.4),
    # n = 60; po = 52/60; human a 50/60, judge a 48/60: pe = (50·48 + 10·12)/3600 = .7;
    # κ = (52/60 − .7)/.3 = (1/6)/.3 = 5/9
    ([[45, 5], [3, 7]], 5 / 9),
    # always the opposite of the human, balanced: po = 0, pe = .5; κ = −.5/.5 = −1
    ([[0, 10], [10, 0]], -1.0),
    # always the same: po = 1, pe = (12·12 + 8·8)/400 = .52; κ = .48/.48 = 1
    ([[12, 0], [0, 8]], 1.0),
    # the judge's labels independent of the human's: po = (6 + 6)/20 = .6; human a 10/20,
    # judge a 10/20: pe = .5; κ = .1/.5 = 0.2
    ([[6, 4], [4, 6]], 0.2),
])
def test_kappa_against_hand_computed_tables(table, expected):
    y, c = from_table(table)
    value, note = kappa(y, c)
    assert note is None and value == pytest.approx(expected)
    assert kappa(c, y)[0] == pytest.approx(expected)  # κ is symmetric in the two raters


def test_position_metrics(hand):
    pos = hand.overall.position
    assert pos["consistency"] == pytest.approx(3 / 4)  # only P2's orders disagree
    # p_first = p_a for "ab", 1 - p_a for "ba": P1 .9 .3 | P2 .8 .8 | P3 .3 .9 | P4 .4 .8 -> 5 of 8 above .5
    assert pos["p_prefers_first"] == pytest.approx(5 / 8)
    assert (pos["n_cells_both_orders"], pos["n_judgements"]) == (4, 8)


def test_length_metrics(hand):
    ln = hand.overall.length  # gap > 30: P1 (a longer), P2 (b longer), P4 (a longer); P3's gap is 10
    assert ln["n"] == 3
    assert ln["human_p_prefers_longer"] == pytest.approx(2 / 3)  # P1 yes, P2 yes, P4 no
    assert ln["ai_p_prefers_longer"] == pytest.approx(1 / 2)  # decided: P1 longer, P4 shorter (P2 tie)
    assert ln["ai_mean_p_longer"] == pytest.approx((0.8 + 0.5 + 0.3) / 3)
    assert ln["always_longer_agreement"] == pytest.approx(2 / 3)
    assert ln["always_shorter_agreement"] == pytest.approx(1 / 3)
    assert ln["ai_agreement"] == pytest.approx((1 + 0.5 + 1) / 3)


def test_calibration_hand_and_sklearn(hand):
    from sklearn.metrics import brier_score_loss, log_loss

    cal = hand.overall.calibration
    p, y = np.array([0.8, 0.5, 0.2, 0.3]), np.array([1, 0, 1, 0])
    assert cal["brier"] == pytest.approx((0.04 + 0.25 + 0.64 + 0.09) / 4)
    assert cal["brier"] == pytest.approx(brier_score_loss(y, p))
    assert cal["log_loss"] == pytest.approx(-(math.log(0.8) + math.log(0.5) + math.log(0.2) + math.log(0.7)) / 4)
    assert cal["log_loss"] == pytest.approx(log_loss(y, p))
    # two bins, an inner-edge value goes low (sklearn convention): [.5 .2 .3] mean 1/3 obs 1/3; [.8] obs 1
    assert cal["count"] == [3, 1]
    assert cal["ece"] == pytest.approx(0.25 * 0.2)


def test_ece_by_hand_four_samples():
    # bins [0, .5], (.5, 1]: {.1, .3} mean .2 observed .5 (gap .3); {.7, .8} mean .75 observed 1 (gap .25)
    cal = calibration(np.array([0.1, 0.3, 0.7, 0.8]), np.array([0, 1, 1, 1]), 2)
    assert cal["ece"] == pytest.approx((2 * 0.3 + 2 * 0.25) / 4)
    assert cal["mean_predicted"] == pytest.approx([0.2, 0.75]) and cal["observed"] == pytest.approx([0.5, 1.0])


def test_reliability_bins_match_sklearn_calibration_curve():
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import log_loss

    rng = np.random.default_rng(5)
    p = rng.random(1000)
    y = rng.random(1000) < p
    cal = calibration(p, y, 10)
    prob_true, prob_pred = calibration_curve(y, p, n_bins=10)
    keep = np.array(cal["count"]) > 0
    np.testing.assert_allclose(np.array(cal["observed"])[keep], prob_true)
    np.testing.assert_allclose(np.array(cal["mean_predicted"])[keep], prob_pred)
    assert cal["log_loss"] == pytest.approx(log_loss(y, np.clip(p, 1e-6, 1 - 1e-6)))


def test_naive_baseline_uses_ab_only_and_hard_labels(hand):
    nv = hand.naive  # ab only: P1 .9 a (ok), P2 .8 a (human b), P3 .3 b (human a), P4 .4 b (ok)
    assert (nv.n_pairs, nv.n_ties, nv.agreement) == (4, 0, 0.5)
    assert hand.settings["naive_principle"] == "x"


def test_divergence_table(hand):
    div = hand.divergence  # only P3 is a decided disagreement (P2 is a tie)
    assert [d["pair_id"] for d in div] == ["P3"]
    assert div[0]["margin"] == pytest.approx(0.6) and div[0]["human_choice"] == "a" and div[0]["ai_choice"] == "b"
    assert div[0]["drivers"] == [{"principle_id": "x", "p_a": pytest.approx(0.2)}]
    assert div[0]["response_a"] == "<b>bold</b>"


def test_weighted_principles_and_per_principle_rows():
    # x says a (.9/.9), y says b (.2/.2); weights x 1, y 3: p = (.9 + 3*.2)/4 = .375 -> b; human b
    j = judgements([("Q", k, o, p) for k, p in (("x", 0.9), ("y", 0.2)) for o in ("ab", "ba")])
    r = compute_audit(j, human([("Q", "b", 10, 10)]), {"x": 1, "y": 3, "z": 2}, n_bootstrap=50)
    assert r.overall.agreement == 1.0
    rows = {b.name: b for b in r.per_principle}
    assert rows["x"].agreement == 0.0 and rows["y"].agreement == 1.0 and rows["y"].weight == 3
    z = rows["z"]  # in the constitution, never judged: present, empty, NaN
    assert z.n_pairs == 0 and math.isnan(z.agreement) and math.isnan(z.position["consistency"])
    assert r.divergence == []


def test_counts_failed_and_unmatched():
    j = judgements([("A", "x", "ab", 0.9), ("A", "x", "ba", float("nan")), ("B", "x", "ab", 0.2),
                    ("C", "x", "ab", float("nan"))])
    r = compute_audit(j, human([("A", "a", 1, 1), ("C", "b", 1, 1), ("D", "a", 1, 1)]), {"x": 1}, n_bootstrap=10)
    assert r.counts == {"judgements_total": 4, "judgements_failed": 2, "pairs_judged": 3,
                        "pairs_without_valid_judgement": 1, "pairs_without_human_label": 1, "human_pairs": 3,
                        "human_pairs_without_judgements": 2, "pairs_evaluated": 1}


def test_all_ties_and_one_class():
    j = judgements([(p, "x", o, 0.5) for p in "ABC" for o in ("ab", "ba")])
    r = compute_audit(j, human([("A", "a", 1, 1), ("B", "b", 1, 1), ("C", "a", 1, 1)]), {"x": 1}, n_bootstrap=20)
    assert r.overall.n_ties == 3 and r.overall.agreement == 0.5
    assert all(math.isnan(x) for x in (*r.overall.agreement_ci, *r.overall.decided_ci))  # no [0.5, 0.5]
    assert (r.overall.n_decided, r.overall.chance, r.overall.agreement_ci_method) == (0, "all_ties", None)
    assert math.isnan(r.overall.agreement_excl_ties) and math.isnan(r.overall.cohen_kappa)
    assert "no decided" in r.overall.kappa_note
    j = judgements([(p, "x", "ab", v) for p, v in (("A", 0.9), ("B", 0.2))])
    r = compute_audit(j, human([("A", "a", 1, 1), ("B", "a", 1, 1)]), {"x": 1}, n_bootstrap=20)
    assert math.isnan(r.overall.cohen_kappa) and "human labels chose only 'a'" in r.overall.kappa_note
    assert r.overall.length["n"] == 0 and math.isnan(r.overall.length["always_longer_agreement"])


def test_empty_input_does_not_crash():
    r = compute_audit(judgements([]), human([]), {"x": 1})
    assert r.overall.n_pairs == 0 and r.naive.n_pairs == 0 and math.isnan(r.overall.agreement)
    assert [b.name for b in r.per_principle] == ["x"]
    d = r.to_dict()
    assert d["overall"]["agreement"] is None
    json.dumps(d, allow_nan=False)


def test_to_dict_is_strict_json(hand):
    d = json.loads(json.dumps(hand.to_dict(), allow_nan=False))
    assert d["overall"]["agreement"] == pytest.approx(0.625) and d["per_principle"][0]["name"] == "x"


def test_bad_human_labels_name_the_fix():
    j, _ = hand_tables()
    with pytest.raises(ValueError, match=r"human_choice must be 'a' or 'b'.*P2"):
        compute_audit(j, human([("P1", "a", 1, 1), ("P2", "tie", 1, 1)]), {"x": 1})
    with pytest.raises(ValueError, match=r"pair_id\(s\) \['P1'\] appear more than once"):
        compute_audit(j, human([("P1", "a", 1, 1), ("P1", "b", 1, 1)]), {"x": 1})
    with pytest.raises(ValueError, match="naive_principle 'nope'"):
        compute_audit(j, human([("P1", "a", 1, 1)]), {"x": 1}, naive_principle="nope")


def test_bootstrap_deterministic_and_contains_estimate():
    rng = np.random.default_rng(0)
    score = rng.choice([0.0, 0.5, 1.0], size=400, p=[0.3, 0.1, 0.6])
    a, b = bootstrap_mean_ci(score, 1000, seed=4), bootstrap_mean_ci(score, 1000, seed=4)
    assert a == b and a != bootstrap_mean_ci(score, 1000, seed=5)
    assert a[0] < score.mean() < a[1]


def test_multinomial_bootstrap_matches_index_resampling():
    # resampling value counts is the same distribution as resampling indices: the intervals agree
    score = np.r_[np.ones(130), np.zeros(60), np.full(10, 0.5)]
    fast = bootstrap_mean_ci(score, 20000, seed=1)
    slow = np.percentile(_index_bootstrap(score, 20000, np.random.default_rng(2)), [2.5, 97.5])
    np.testing.assert_allclose(fast, slow, atol=0.01)
    cont = np.random.default_rng(3).random(300)  # many distinct values: index-resampling path
    lo, hi = bootstrap_mean_ci(cont, 2000, seed=0)
    se = cont.std() / math.sqrt(300)
    assert lo == pytest.approx(cont.mean() - 1.96 * se, abs=0.01)
    assert hi == pytest.approx(cont.mean() + 1.96 * se, abs=0.01)


# -- small samples: intervals worked out with scipy directly, not through the project's helpers --

def clopper_pearson(k: int, n: int) -> tuple[float, float]:
    """The exact interval from its definition (beta quantiles), independent of binomtest."""
    from scipy.stats import beta

    return (0.0 if k == 0 else beta.ppf(0.025, k, n - k + 1), 1.0 if k == n else beta.ppf(0.975, k + 1, n - k))


def pairs(agree: int, disagree: int, ties: int, principle: str = "x") -> tuple[pa.Table, pa.Table]:
    """Pairs where the human always chose a; the judge says a (.9), b (.1) or tie (.5) in both orders."""
    ps = [0.9] * agree + [0.1] * disagree + [0.5] * ties
    ids = [f"{principle}{i:03d}" for i in range(len(ps))]
    j = judgements([(pid, principle, o, p) for pid, p in zip(ids, ps, strict=True) for o in ("ab", "ba")])
    return j, human([(pid, "a", 10, 10) for pid in ids])


def test_one_pair_is_too_few_and_its_interval_is_not_degenerate():
    j, h = pairs(1, 0, 0)
    o = compute_audit(j, h, {"x": 1}, n_bootstrap=200).overall
    assert (o.n_pairs, o.n_decided, o.n_agree, o.agreement) == (1, 1, 1, 1.0)
    assert o.decided_ci == pytest.approx((0.025, 1.0))  # 1 of 1: lower bound 0.025^(1/1)
    assert o.decided_ci == pytest.approx(clopper_pearson(1, 1))
    assert o.agreement_ci_method == "exact" and o.agreement_ci == pytest.approx(o.decided_ci)  # no ties
    assert o.chance == "too_few"
    v = verdict(compute_audit(j, h, {"x": 1}, n_bootstrap=200))
    assert v.startswith("too few pairs to say (n=1 decided; a verdict needs at least 30)") and "above" not in v
    assert "[1.000, 1.000]" not in v


def test_all_ties_verdict_says_no_pair_was_decided():
    j, h = pairs(0, 0, 40)
    r = compute_audit(j, h, {"x": 1}, n_bootstrap=200)
    assert r.overall.chance == "all_ties" and r.per_principle[0].chance == "all_ties"
    v = verdict(r)
    assert v.startswith("no pair was decided (all 40 are ties)") and "[0.500, 0.500]" not in v


@pytest.mark.parametrize("agree,disagree,ties", [(45, 20, 15), (20, 45, 15), (35, 30, 5), (60, 0, 0)])
def test_decided_pairs_get_an_exact_interval_and_a_verdict(agree, disagree, ties):
    from scipy.stats import binomtest

    j, h = pairs(agree, disagree, ties)
    o = compute_audit(j, h, {"x": 1}, n_bootstrap=2000, seed=1).overall
    nd = agree + disagree
    assert (o.n_pairs, o.n_decided, o.n_agree, o.n_ties) == (nd + ties, nd, agree, ties)
    expected = clopper_pearson(agree, nd)
    assert o.decided_ci == pytest.approx(expected, abs=1e-9)
    test = binomtest(agree, nd, 0.5)  # the interval excludes 0.5 exactly when the exact test rejects
    lo, hi = expected
    assert o.chance == ("above" if lo > 0.5 else "below" if hi < 0.5 else "chance")
    assert (o.chance != "chance") == (test.pvalue < 0.05)
    if agree and disagree:  # scores vary: the bootstrap over pairs, with ties as 0.5
        assert o.agreement_ci_method == "bootstrap"
        assert o.agreement_ci[0] < o.agreement < o.agreement_ci[1]
    else:  # every pair scores 1: the bootstrap would be [1, 1]; the exact interval instead
        assert o.agreement_ci_method == "exact" and o.agreement_ci == pytest.approx(expected)


def test_chance_rule_per_principle_and_its_threshold():
    # principle x: MIN_DECIDED decided pairs (all agree); y: one fewer; z: all ties
    tables = [pairs(MIN_DECIDED, 0, 0, "x"), pairs(MIN_DECIDED - 1, 0, 0, "y"), pairs(0, 0, 5, "z")]
    j = pa.concat_tables([t[0] for t in tables])
    h = pa.concat_tables([t[1] for t in tables])
    r = compute_audit(j, h, {"x": 1, "y": 1, "z": 1}, n_bootstrap=100)
    calls = {b.name: (b.chance, b.n_decided) for b in r.per_principle}
    assert calls == {"x": ("above", MIN_DECIDED), "y": ("too_few", MIN_DECIDED - 1), "z": ("all_ties", 0)}
    x = next(b for b in r.per_principle if b.name == "x")
    assert x.decided_ci == pytest.approx(clopper_pearson(MIN_DECIDED, MIN_DECIDED))
    assert r.settings["min_decided"] == MIN_DECIDED and "Clopper-Pearson" in r.settings["chance_rule"]


def test_length_baselines_get_exact_intervals():
    j, h = hand_tables()
    ln = compute_audit(j, h, {"x": 1.0}).overall.length  # 2 of 3 gap pairs: humans chose the longer
    assert ln["always_longer_ci"] == pytest.approx(clopper_pearson(2, 3))
    assert ln["always_shorter_ci"] == pytest.approx(tuple(1 - x for x in reversed(clopper_pearson(2, 3))))
