"""AutoScale's extrapolation rule, its real-valued version and availability caps."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megareweight.mixing import (
    InfeasibleError,
    MixingError,
    MixingWarning,
    cap_by_availability,
    counts_to_weights,
    extrapolate,
    extrapolate_partial,
    extrapolate_to,
)


def test_rule_on_hand_computed_numbers():
    np.testing.assert_allclose(extrapolate([1, 4], [2, 8]), [4, 16])
    np.testing.assert_allclose(extrapolate([1, 4], [2, 8], steps=2), [8, 32])
    # domains growing at different rates: N3 = N2^2 / N1
    np.testing.assert_allclose(extrapolate([2, 10], [4, 12]), [8, 14.4])
    np.testing.assert_allclose(extrapolate([2, 10], [4, 12], steps=2), [16, 14.4 ** 2 / 12])
    np.testing.assert_allclose(counts_to_weights(extrapolate([2, 10], [4, 12])), [8 / 22.4, 14.4 / 22.4])


def test_extrapolate_to_hits_target_and_matches_integer_steps():
    n1, n2 = [2.0, 10.0, 3.0], [4.0, 12.0, 3.5]
    for steps in (1, 2, 3):
        expected = extrapolate(n1, n2, steps)
        got = extrapolate_to(n1, n2, expected.sum())
        np.testing.assert_allclose(got, expected, rtol=1e-10)
    np.testing.assert_allclose(extrapolate_to(n1, n2, sum(n1)), n1, rtol=1e-10)
    np.testing.assert_allclose(extrapolate_to(n1, n2, sum(n2)), n2, rtol=1e-10)
    for target in (16.0, 30.0, 77.7, 1e6):
        out = extrapolate_to(n1, n2, target)
        assert abs(out.sum() - target) <= 1e-12 * target
        assert np.all(out > 0)


def test_extrapolate_to_between_steps_is_log_linear():
    n1, n2 = np.array([1.0, 4.0]), np.array([2.0, 8.0])   # both double per step
    out = extrapolate_to(n1, n2, 10.0 * np.sqrt(2))      # half a step past N(2)
    np.testing.assert_allclose(out, n2 * np.sqrt(2), rtol=1e-12)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5).flatmap(lambda m: st.tuples(
    st.lists(st.floats(1.0, 1e6), min_size=m, max_size=m),
    st.lists(st.floats(0.5, 3.0), min_size=m, max_size=m))), st.integers(1, 4))
def test_extrapolate_to_agrees_with_rule_property(problem, steps):
    n1, growth = map(np.array, problem)
    n2 = n1 * growth
    if n2.sum() <= n1.sum() * (1 + 1e-9):
        return   # the totals must grow
    expected = extrapolate(n1, n2, steps)
    got = extrapolate_to(n1, n2, expected.sum())
    np.testing.assert_allclose(got, expected, rtol=1e-8)


def test_availability_caps_and_warning_names_domain():
    with pytest.warns(MixingWarning, match=r"'code'.*would need 4 epochs.*max_epochs=2"):
        out = extrapolate([1, 4], [2, 8], available=[1.0, 100.0], max_epochs=2, names=["code", "web"])
    np.testing.assert_allclose(out, [2.0, 18.0])          # total 20 kept
    with pytest.warns(MixingWarning, match="#0"):
        out = extrapolate_to([1, 4], [2, 8], 40.0, available=[1.0, 100.0])   # max_epochs 4 by default
    np.testing.assert_allclose(out, [4.0, 36.0])


def test_no_warning_when_nothing_is_capped():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = extrapolate([1, 4], [2, 8], available=[10.0, 10.0], max_epochs=4)
    np.testing.assert_allclose(out, [4, 16])


def test_caps_cascade_and_keep_total():
    # capping domain 0 pushes domain 1 over its cap; domain 2 takes the rest
    with pytest.warns(MixingWarning) as record:
        out = cap_by_availability([50.0, 30.0, 20.0], available=[10.0, 9.0, 100.0], max_epochs=2)
    np.testing.assert_allclose(out, [20.0, 18.0, 62.0])
    assert "#0" in str(record[0].message) and "#1" in str(record[0].message)
    with pytest.raises(InfeasibleError, match="allow only"):
        cap_by_availability([50.0, 50.0], available=[10.0, 10.0], max_epochs=4)


@pytest.mark.parametrize("call, match", [
    (lambda: extrapolate([1, 2], [2, 4, 8]), "one count per domain"),
    (lambda: extrapolate([1, 0], [2, 4]), "must be > 0"),
    (lambda: extrapolate([1, np.nan], [2, 4]), "non-finite"),
    (lambda: extrapolate([1, 2], [2, 4], steps=0), "steps"),
    (lambda: extrapolate([1, 2], [2, 4], steps=1.5), "steps"),
    (lambda: extrapolate_to([2, 4], [1, 2], 10.0), "second budget must be larger"),
    (lambda: extrapolate_to([1, 2], [2, 4], 1.0), "below the smaller budget"),
    (lambda: extrapolate_to([1, 2], [2, 4], -5.0), "target_tokens"),
    (lambda: extrapolate([1, 2], [2, 4], available=[1.0]), "available"),
    (lambda: extrapolate([1, 2], [2, 4], available=[10.0, 10.0], max_epochs=0), "max_epochs"),
    (lambda: counts_to_weights([0.0, 0.0]), "positive total"),
    (lambda: counts_to_weights([1.0, -1.0]), ">= 0"),
])
def test_bad_inputs(call, match):
    with pytest.raises(MixingError, match=match):
        call()


def test_extrapolate_partial_freezes_shares_and_extrapolates_the_rest():
    n1, n2 = np.array([10.0, 600.0, 390.0]), np.array([667.0, 800.0, 533.0])
    out = extrapolate_partial(n1, n2, 8000, [0.3, np.nan, np.nan])
    assert out[0] == pytest.approx(2400.0) and out.sum() == pytest.approx(8000)
    assert out[1:] == pytest.approx(extrapolate_to(n1[1:], n2[1:], 5600))
    no_frozen = extrapolate_partial(n1, n2, 8000, [np.nan] * 3)
    assert no_frozen == pytest.approx(extrapolate_to(n1, n2, 8000))
    assert extrapolate_partial(n1, n2, 8000, [0.2, 0.5, 0.3]) == pytest.approx([1600, 4000, 2400])


@pytest.mark.parametrize("shares, match", [([0.2, 0.5, 0.2], "sum to 0.9, not 1"), ([0.6, 0.5, np.nan], "nothing is left"),
                                           ([-0.1, np.nan, np.nan], ">= 0"), ([0.1, np.nan], "one entry per domain")])
def test_extrapolate_partial_bad_shares(shares, match):
    with pytest.raises(MixingError, match=match):
        extrapolate_partial([10.0, 600.0, 390.0], [667.0, 800.0, 533.0], 8000, shares)


def test_extrapolate_partial_free_domains_must_grow():
    with pytest.raises(MixingError, match="free domains"):
        extrapolate_partial([100.0, 500.0, 400.0], [1500.0, 300.0, 200.0], 8000, [0.75, np.nan, np.nan],
                            names=["a", "b", "c"])
