"""The one label rule (factory.labels, SQL in DuckDB): hand-computed examples, a plain-Python
reference, calibration, the fitted (logit) pool, and agreement with the audit's tie decision."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from factory.labels import LabelRule, labels_of
from factory.prefmath import decide


def table(rows) -> pa.Table:
    pid, prin, order, p = map(list, zip(*rows, strict=True))
    return pa.table({"pair_id": pid, "principle_id": prin, "order": order, "p_a": pa.array(p, pa.float64())})


def labels(rows, weights, **kw) -> dict[str, dict]:
    return {r["pair_id"]: r for r in labels_of(table(rows), LabelRule(weights, **kw)).to_pylist()}


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_hand_example():
    rows = [
        # p1: x (w=2): ab .9, ba .7 -> .8 ; y (w=1): ab .2, ba .4 -> .3 ; p = (2*.8 + .3)/3 = .633333
        ("p1", "x", "ab", 0.9), ("p1", "x", "ba", 0.7), ("p1", "y", "ab", 0.2), ("p1", "y", "ba", 0.4),
        # p2: x: ab .6, ba .3 -> .45 (orders disagree) ; y: only ab .52 ; p = (2*.45 + .52)/3 = .473333 -> tie
        ("p2", "x", "ab", 0.6), ("p2", "x", "ba", 0.3), ("p2", "y", "ab", 0.52),
        # p3: every judgement failed
        ("p3", "x", "ab", float("nan")), ("p3", "y", "ba", float("nan")),
    ]
    t = labels(rows, {"x": 2.0, "y": 1.0}, tie_eps=0.05)
    p1, p2, p3 = t["p1"], t["p2"], t["p3"]
    assert p1["p_a"] == pytest.approx(1.9 / 3)
    assert (p1["chosen"], p1["is_tie"], p1["n_principles"], p1["orders_complete"]) == ("a", False, 2, True)
    assert p1["margin"] == pytest.approx(abs(1.9 / 3 - 0.5) * 2)
    assert p1["orders_agree"] == 1.0  # x: both > .5, y: both < .5
    assert p1["principles_agree"] == 1  # x (.8) on the pair's side, y (.3) not
    assert p2["p_a"] == pytest.approx(1.42 / 3)
    assert p2["is_tie"] is True and p2["chosen"] is None  # |.4733 - .5| = .0267 < .05: kept, marked
    assert p2["orders_complete"] is False and p2["orders_agree"] == 0.0  # only x has both; they disagree
    assert p2["principles_agree"] == 1  # x (.45) below .5 like the pair; y (.52) above
    assert p3["p_a"] is None and p3["chosen"] is None and p3["n_failed"] == 2 and p3["n_principles"] == 0
    assert p1["n_judgements"] == 4 and p1["n_failed"] == 0


def test_clamp_and_duplicates():
    # clamp (.1, .9): ab .999 -> .9, ba .95 -> .9, mean .9 (unclamped: .9745)
    rows = [("q", "x", "ab", 0.999), ("q", "x", "ba", 0.95)]
    assert labels(rows, {"x": 1})["q"]["p_a"] == pytest.approx(0.9745)
    assert labels(rows, {"x": 1}, clamp=(0.1, 0.9))["q"]["p_a"] == pytest.approx(0.9)
    # a failed judgement is not clamped into the interval: it stays out
    assert labels(rows + [("q", "x", "ab", float("nan"))], {"x": 1}, clamp=(0.1, 0.9))["q"]["p_a"] == pytest.approx(0.9)
    # duplicate ab rows are averaged within the order: ab (.2+.4)/2 = .3, ba .9 -> (.3 + .9)/2 = .6
    assert labels([("q", "x", "ab", 0.2), ("q", "x", "ab", 0.4), ("q", "x", "ba", 0.9)], {"x": 1})["q"]["p_a"] == \
        pytest.approx(0.6)


def test_batch_calibration_divides_out_each_principle_and_order_prior():
    # P(first) per judgement: p_a for ab, 1 - p_a for ba. Priors: ab mean(.9, .7) = .8, ba mean(.6, .8) = .7
    rows = [("p1", "x", "ab", 0.9), ("p1", "x", "ba", 1 - 0.6), ("p2", "x", "ab", 0.7), ("p2", "x", "ba", 1 - 0.8)]
    got = labels(rows, {"x": 1}, calibrate=True, tie_eps=0.0)
    ab1, ba1 = sigmoid(logit(0.9) - logit(0.8)), 1 - sigmoid(logit(0.6) - logit(0.7))
    ab2, ba2 = sigmoid(logit(0.7) - logit(0.8)), 1 - sigmoid(logit(0.8) - logit(0.7))
    assert got["p1"]["p_a"] == pytest.approx((ab1 + ba1) / 2)
    assert got["p2"]["p_a"] == pytest.approx((ab2 + ba2) / 2)
    # a judge that always prefers the first shown by the same amount calibrates to exactly 0.5
    biased = [(f"q{i}", "x", o, 0.7 if o == "ab" else 0.3) for i in range(3) for o in ("ab", "ba")]
    assert all(r["p_a"] == pytest.approx(0.5) and r["is_tie"] for r in labels(biased, {"x": 1}, calibrate=True).values())


def test_logit_pool_of_fitted_weights():
    # cell l = mean over orders of logit(p_a); p = sigmoid(sum w_k l_k); a principle not judged adds nothing
    rows = [("p", "x", "ab", 0.8), ("p", "x", "ba", 0.6), ("p", "y", "ab", 0.3), ("p", "y", "ba", 0.4),
            ("q", "x", "ab", 0.7)]
    got = labels(rows, {"x": 2.0, "y": -0.5, "z": 1.0}, pool="logit", tie_eps=0.0)
    lx, ly = (logit(0.8) + logit(0.6)) / 2, (logit(0.3) + logit(0.4)) / 2
    assert got["p"]["p_a"] == pytest.approx(sigmoid(2.0 * lx - 0.5 * ly))
    assert got["q"]["p_a"] == pytest.approx(sigmoid(2.0 * logit(0.7)))
    # symmetric: swapping a and b (p -> 1 - p everywhere) gives 1 - p, so no position prior sneaks in
    flipped = labels([(k, pr, o, 1 - p) for k, pr, o, p in rows], {"x": 2.0, "y": -0.5}, pool="logit")
    assert flipped["p"]["p_a"] == pytest.approx(1 - got["p"]["p_a"])


def _reference(rows, weights, tie_eps):
    """Plain-Python re-implementation of the documented mean-pool formulas."""
    by_cell: dict = {}
    for pid, prin, order, p in rows:
        if not math.isnan(p):
            by_cell.setdefault((pid, prin), {}).setdefault(order, []).append(p)
    out = {}
    for pid in {r[0] for r in rows}:
        cells = {k[1]: v for k, v in by_cell.items() if k[0] == pid}
        if not cells:
            continue
        pk = {k: np.mean([np.mean(v[o]) for o in v]) for k, v in cells.items()}
        p = sum(weights[k] * v for k, v in pk.items()) / sum(weights[k] for k in pk)
        out[pid] = (p, abs(p - 0.5) < tie_eps, len(pk))
    return out


def test_matches_reference_ignores_row_order_and_agrees_with_decide():
    rng = np.random.default_rng(7)
    rows = [(f"p{rng.integers(80)}", f"k{rng.integers(5)}", "ab" if rng.random() < 0.5 else "ba",
             float("nan") if rng.random() < 0.05 else float(rng.random())) for _ in range(600)]
    weights = {f"k{i}": float(i + 1) for i in range(5)}
    ref = _reference(rows, weights, 0.05)
    got = labels(rows, weights, tie_eps=0.05)
    for key, (rp, rtie, rn) in ref.items():
        assert got[key]["p_a"] == pytest.approx(rp) and got[key]["is_tie"] == rtie and got[key]["n_principles"] == rn
    shuffled = labels([rows[i] for i in rng.permutation(len(rows))], weights, tie_eps=0.05)
    assert all(shuffled[k]["p_a"] == pytest.approx(v["p_a"]) for k, v in got.items() if v["p_a"] is not None)
    # the audit's own labellers decide ties with prefmath.decide: the same band as the SQL rule
    p = np.array([v["p_a"] for v in got.values() if v["p_a"] is not None])
    chose_a, tie, _ = decide(p, 0.05)
    sql = [v for v in got.values() if v["p_a"] is not None]
    assert tie.tolist() == [v["is_tie"] for v in sql]
    assert [("a" if c else "b") if not t else None for c, t in zip(chose_a, tie)] == [v["chosen"] for v in sql]


def test_a_judged_principle_without_weight_is_an_error():
    from factory.store import StoreError

    with pytest.raises(StoreError, match=r"no weight for principle\(s\) \['y'\]"):
        labels([("p", "y", "ab", 0.5)], {"x": 1.0})
