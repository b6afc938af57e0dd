"""Baseline mixtures: uniform, natural and UniMax (Chung et al., 2023)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megareweight.mixing import (
    InfeasibleError,
    MixingError,
    natural_weights,
    uniform_weights,
    unimax_counts,
    unimax_weights,
)


def test_uniform_and_natural():
    np.testing.assert_allclose(uniform_weights(4), [0.25] * 4)
    np.testing.assert_allclose(natural_weights([1, 3, 0, 4]), [0.125, 0.375, 0.0, 0.5])
    with pytest.raises(MixingError):
        uniform_weights(0)
    with pytest.raises(MixingError, match="positive total"):
        natural_weights([0, 0])
    with pytest.raises(MixingError, match=">= 0"):
        natural_weights([1, -1])


def test_unimax_hand_computed():
    # smallest first: domain 0 wants 60/3 = 20 but may take 2*1; then 58/2 = 29 > 2*10 -> 20; rest 38
    np.testing.assert_allclose(unimax_counts([1, 10, 100], 60, max_epochs=2), [2, 20, 38])
    np.testing.assert_allclose(unimax_weights([1, 10, 100], 60, max_epochs=2), [2 / 60, 20 / 60, 38 / 60])
    # order of domains does not matter
    np.testing.assert_allclose(unimax_counts([100, 1, 10], 60, max_epochs=2), [38, 2, 20])
    # nothing capped: uniform
    np.testing.assert_allclose(unimax_weights([50, 60, 70], 90, max_epochs=1), [1 / 3] * 3)
    # exactly all data at the cap
    np.testing.assert_allclose(unimax_counts([1, 2, 3], 12, max_epochs=2), [2, 4, 6])


def test_unimax_infeasible_and_bad_inputs():
    with pytest.raises(InfeasibleError, match="exceeds"):
        unimax_counts([1, 2], 10, max_epochs=2)
    with pytest.raises(MixingError, match="budget"):
        unimax_counts([1, 2], 0)
    with pytest.raises(MixingError, match="max_epochs"):
        unimax_counts([1, 2], 1, max_epochs=-1)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(1.0, 1e9), min_size=1, max_size=8), st.floats(0.01, 1.0), st.floats(0.5, 8.0))
def test_unimax_properties(tokens, fraction, epochs):
    tokens = np.array(tokens)
    budget = fraction * epochs * tokens.sum()
    counts = unimax_counts(tokens, budget, epochs)
    assert counts.sum() == pytest.approx(budget, rel=1e-9)
    assert np.all(counts <= epochs * tokens * (1 + 1e-12))
    # uncapped domains all get the same (largest) share
    uncapped = counts < epochs * tokens * (1 - 1e-9)
    if uncapped.any():
        np.testing.assert_allclose(counts[uncapped], counts[uncapped][0], rtol=1e-9)
        assert np.all(counts <= counts[uncapped][0] * (1 + 1e-9))
