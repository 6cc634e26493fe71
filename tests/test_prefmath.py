"""Preference maths: option log-probs to probabilities, orders, the tie decision (hand-computed)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pyarrow as pa
import pytest

from factory.prefmath import decide, p_a, renormalize


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


def test_decide_exact_half_is_a_tie_even_at_zero_eps():
    chose_a, tie, margin = decide(np.array([0.5, 0.51, 0.2]), 0.0)
    assert tie.tolist() == [True, False, False] and chose_a.tolist() == [False, True, False]
    np.testing.assert_allclose(margin, [0.0, 0.02, 0.6])
