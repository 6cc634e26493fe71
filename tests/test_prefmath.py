"""Preference maths: hand-computed examples and a cross-check against a plain-Python reference."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pyarrow as pa
import pytest

from factory.prefmath import aggregate_pairs, decide, p_a, renormalize


def test_renormalize_hand_values():
    # softmax over log(0.2), log(0.6): 0.2 / (0.2 + 0.6) = 0.25
    assert renormalize(math.log(0.2), math.log(0.6)) == pytest.approx(0.25)
    # only the difference matters: sigmoid(1) = 1 / (1 + e^-1) = 0.7310585786
    assert renormalize(-1000.0, -1001.0) == pytest.approx(0.7310585786)
    assert renormalize(1e6, -1e6) == 1.0 and renormalize(-1e6, 1e6) == 0.0


def test_renormalize_inf_and_nan_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = renormalize([-np.inf, math.log(0.5), -np.inf, np.nan], [math.log(0.5), -np.inf, -np.inf, 0.0])
    assert out[0] == 0.0 and out[1] == 1.0
    assert np.isnan(out[2]) and np.isnan(out[3])


def test_renormalize_matches_scipy_softmax():
    from scipy.special import softmax

    rng = np.random.default_rng(1)
    l1, l2 = rng.normal(scale=20, size=500), rng.normal(scale=20, size=500)
    expected = softmax(np.stack([l1, l2]), axis=0)[0]
    np.testing.assert_allclose(renormalize(l1, l2), expected, rtol=1e-12, atol=1e-300)


def test_p_a_orders_strings_bools_and_arrow():
    # "ab": a shown first, P(a) = p_first; "ba": P(a) = 1 - p_first
    np.testing.assert_allclose(p_a([0.8, 0.8, 0.3], ["ab", "ba", "ba"]), [0.8, 0.2, 0.7])
    np.testing.assert_allclose(p_a(np.array([0.8, 0.8]), np.array([True, False])), [0.8, 0.2])
    np.testing.assert_allclose(p_a(pa.array([0.9, 0.9]), pa.array(["ba", "ab"])), [0.1, 0.9])


def test_p_a_rejects_unknown_order():
    with pytest.raises(ValueError, match=r"order must be 'ab' or 'ba'.*'AB'"):
        p_a([0.5, 0.5], ["ab", "AB"])


def _table_rows(t: pa.Table) -> dict[str, dict]:
    return {r["pair_id"]: r for r in t.to_pylist()}


def test_aggregate_pairs_hand_example():
    rows = [
        # p1: x (w=2): ab .9, ba .7 -> .8 ; y (w=1): ab .2, ba .4 -> .3 ; p = (2*.8 + .3)/3 = .633333
        ("p1", "x", "ab", 0.9), ("p1", "x", "ba", 0.7), ("p1", "y", "ab", 0.2), ("p1", "y", "ba", 0.4),
        # p2: x: ab .6, ba .3 -> .45 (orders disagree) ; y: only ab .52 ; p = (2*.45 + .52)/3 = .473333 -> tie
        ("p2", "x", "ab", 0.6), ("p2", "x", "ba", 0.3), ("p2", "y", "ab", 0.52),
        # p3: every judgement failed
        ("p3", "x", "ab", float("nan")), ("p3", "y", "ba", float("nan")),
    ]
    pid, prin, order, p = map(list, zip(*rows, strict=True))
    t = _table_rows(aggregate_pairs(pid, prin, order, p, {"x": 2.0, "y": 1.0}, tie_eps=0.05))
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
    assert math.isnan(p3["p_a"]) and p3["chosen"] is None and p3["n_failed"] == 2 and p3["n_principles"] == 0
    assert p1["n_judgements"] == 4 and p1["n_failed"] == 0


def test_aggregate_pairs_clamp_and_duplicates():
    # clamp (.1, .9): ab .999 -> .9, ba .95 -> .9, mean .9 (unclamped: .9745)
    pid, prin, order, p = ["q"] * 2, ["x"] * 2, ["ab", "ba"], [0.999, 0.95]
    assert aggregate_pairs(pid, prin, order, p, {"x": 1})["p_a"][0].as_py() == pytest.approx(0.9745)
    assert aggregate_pairs(pid, prin, order, p, {"x": 1}, clamp=(0.1, 0.9))["p_a"][0].as_py() == pytest.approx(0.9)
    # duplicate ab rows are averaged within the order: ab (.2+.4)/2 = .3, ba .9 -> (.3 + .9)/2 = .6
    t = aggregate_pairs(["q"] * 3, ["x"] * 3, ["ab", "ab", "ba"], [0.2, 0.4, 0.9], {"x": 1})
    assert t["p_a"][0].as_py() == pytest.approx(0.6)


def test_decide_exact_half_is_a_tie_even_at_zero_eps():
    chose_a, tie, margin = decide(np.array([0.5, 0.51, 0.2]), 0.0)
    assert tie.tolist() == [True, False, False] and chose_a.tolist() == [False, True, False]
    np.testing.assert_allclose(margin, [0.0, 0.02, 0.6])


def test_aggregate_pairs_errors_name_the_fix():
    with pytest.raises(ValueError, match=r"no constitution weight for principle.*'y'"):
        aggregate_pairs(["p"], ["y"], ["ab"], [0.5], {"x": 1})
    with pytest.raises(ValueError, match="p_a must be a probability"):
        aggregate_pairs(["p"], ["x"], ["ab"], [1.5], {"x": 1})


def _reference(rows, weights, tie_eps):
    """Plain-Python re-implementation of the documented formulas."""
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
        num = sum(weights[k] * v for k, v in pk.items())
        p = num / sum(weights[k] for k in pk)
        out[pid] = (p, abs(p - 0.5) < tie_eps, len(pk))
    return out


def test_aggregate_pairs_matches_reference_and_ignores_row_order():
    rng = np.random.default_rng(7)
    n = 600
    rows = [
        (f"p{rng.integers(80)}", f"k{rng.integers(5)}", "ab" if rng.random() < 0.5 else "ba",
         float("nan") if rng.random() < 0.05 else float(rng.random()))
        for _ in range(n)
    ]
    weights = {f"k{i}": float(i + 1) for i in range(5)}
    ref = _reference(rows, weights, 0.05)
    pid, prin, order, p = map(list, zip(*rows, strict=True))
    got = _table_rows(aggregate_pairs(pid, prin, order, p, weights))
    assert list(got) == sorted(got)
    for key, (rp, rtie, rn) in ref.items():
        assert got[key]["p_a"] == pytest.approx(rp) and got[key]["is_tie"] == rtie and got[key]["n_principles"] == rn
    perm = rng.permutation(n)
    cols = [np.asarray(c, dtype=object)[perm] for c in (pid, prin, order)]
    shuffled = aggregate_pairs(*cols, np.asarray(p)[perm], weights)["p_a"].to_numpy()
    np.testing.assert_allclose(shuffled, aggregate_pairs(pid, prin, order, p, weights)["p_a"].to_numpy())
