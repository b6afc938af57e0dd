"""Exact DDO solver (megareweight.mixing.ddo) against scipy's SLSQP and hand-derived optima."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

from megareweight.mixing import InfeasibleError, MixingError, PowerLaw, ddo_objective, solve_ddo


def slsqp(fits, budget, lower, upper):
    a = np.array([f.a for f in fits])
    b = np.array([f.b for f in fits])
    m = len(fits)
    lo = np.broadcast_to(np.asarray(lower, float), (m,))
    hi = np.broadcast_to(np.asarray(upper, float), (m,))
    x0 = np.clip(np.full(m, budget / m), lo, hi)
    res = minimize(lambda x: np.sum((x + a) ** (-b)), x0, jac=lambda x: -b * (x + a) ** (-b - 1),
                   method="SLSQP", bounds=list(zip(lo, np.where(np.isinf(hi), None, hi))),
                   constraints=[{"type": "eq", "fun": lambda x: x.sum() - budget, "jac": lambda x: np.ones(m)}],
                   options={"ftol": 1e-14, "maxiter": 1000})
    return res.x


def random_problem(rng, m, active):
    fits = [PowerLaw(rng.uniform(0.05, 1.5), rng.uniform(0.1, 2.5), rng.uniform(0, 2)) for _ in range(m)]
    budget = float(m)
    if active:
        lower = rng.uniform(0.05, 0.6, m)
        upper = rng.uniform(0.8, 2.5, m)
        upper *= max(1.0, 1.05 * budget / upper.sum())
    else:
        lower, upper = 0.0, np.inf
    return fits, budget, lower, upper


@pytest.mark.parametrize("active", [False, True])
def test_matches_slsqp_on_random_problems(active):
    rng = np.random.default_rng(1 + active)
    n_active_bounds = 0
    for _ in range(15):
        m = int(rng.integers(2, 7))
        fits, budget, lower, upper = random_problem(rng, m, active)
        x = solve_ddo(fits, budget, lower, upper)
        ref = slsqp(fits, budget, lower, upper)
        assert abs(x.sum() - budget) <= 1e-12 * budget
        assert np.all(x >= np.asarray(lower) - 1e-15) and np.all(x <= np.asarray(upper) + 1e-15)
        assert ddo_objective(fits, x) <= ddo_objective(fits, ref) + 1e-10
        np.testing.assert_allclose(x, ref, atol=1e-5)
        lo = np.broadcast_to(lower, (m,))
        hi = np.broadcast_to(upper, (m,))
        n_active_bounds += int(np.sum(np.isclose(x, lo) | np.isclose(x, hi)))
    if active:
        assert n_active_bounds > 0   # the "active" problems really exercise the bounds


def test_kkt_equal_marginals_for_free_domains():
    fits = [PowerLaw(0.3, 0.5, 1.0), PowerLaw(0.1, 1.5, 0.0), PowerLaw(0.8, 0.9, 2.0), PowerLaw(0.2, 0.3, 0.0)]
    x = solve_ddo(fits, 4.0, lower=0.0, upper=[10.0, 10.0, 10.0, 0.4])
    a = np.array([f.a for f in fits])
    b = np.array([f.b for f in fits])
    marginal = b * (x + a) ** (-b - 1)
    free = x < np.array([10.0, 10.0, 10.0, 0.4]) - 1e-12
    assert not free.all()                     # domain 3 sits at its upper bound
    np.testing.assert_allclose(marginal[free], marginal[free][0], rtol=1e-9)
    assert marginal[~free][0] > marginal[free][0]   # it would want more than it may have


def test_hand_derived_equal_exponents():
    # equal b: stationarity gives equal x_i + a_i, so x_i = (B + sum a)/m - a_i
    fits = [PowerLaw(0.1, 0.7, 0.0), PowerLaw(0.5, 0.7, 0.0), PowerLaw(0.9, 0.7, 0.0)]
    x = solve_ddo(fits, 3.0)
    np.testing.assert_allclose(x, (3.0 + 1.5) / 3 - np.array([0.1, 0.5, 0.9]), rtol=1e-12)
    same = solve_ddo([PowerLaw(0.2, 1.0, 0.0)] * 4, 2.0)
    np.testing.assert_allclose(same, 0.5, rtol=1e-12)


def test_budget_at_the_sum_of_bounds():
    fits = [PowerLaw(0.2, 1.0, 0.0), PowerLaw(0.4, 0.5, 0.0)]
    np.testing.assert_array_equal(solve_ddo(fits, 3.0, lower=0.5, upper=[1.0, 2.0]), [1.0, 2.0])
    np.testing.assert_array_equal(solve_ddo(fits, 1.0, lower=0.5, upper=[1.0, 2.0]), [0.5, 0.5])


def test_negative_shift_keeps_x_above_minus_a():
    fits = [PowerLaw(-0.15, 2.0, 0.0), PowerLaw(0.5, 0.3, 0.0)]
    x = solve_ddo(fits, 0.5)               # default lower 0 lies below -a for domain 0
    assert x[0] > 0.15 and abs(x.sum() - 0.5) < 1e-12
    with pytest.raises(InfeasibleError, match="below the smallest feasible"):
        solve_ddo(fits, 0.15)


@pytest.mark.parametrize("budget", [1e-3, 1.0, 1e3, 1e6])
def test_budget_hit_exactly_over_scales(budget):
    fits = [PowerLaw(0.3, 0.2, 0.0), PowerLaw(0.01, 3.0, 0.0), PowerLaw(5.0, 0.05, 0.0)]
    x = solve_ddo(fits, budget)
    assert abs(x.sum() - budget) <= 1e-12 * budget
    assert np.all(x >= 0)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6).flatmap(lambda m: st.tuples(
    st.lists(st.tuples(st.floats(0.01, 3.0), st.floats(0.05, 4.0)), min_size=m, max_size=m),
    st.floats(0.1, 50.0), st.lists(st.floats(0.0, 1.0), min_size=m, max_size=m),
    st.lists(st.floats(0.05, 1.0), min_size=m, max_size=m))))
def test_feasible_and_optimal_property(problem):
    params, budget, lower, spans = problem
    fits = [PowerLaw(a, b, 0.0) for a, b in params]
    lower = np.array(lower) * budget / len(fits) * 0.9
    spans = np.array(spans)
    upper = lower + spans / spans.sum() * (budget - lower.sum()) * 1.3   # often active, always feasible
    x = solve_ddo(fits, budget, lower, upper)
    assert abs(x.sum() - budget) <= 1e-12 * budget
    assert np.all(x >= lower) and np.all(x <= upper)
    # no feasible pairwise transfer improves the objective
    f0 = ddo_objective(fits, x)
    eps = 1e-6 * budget
    for i in range(len(fits)):
        for j in range(len(fits)):
            if i != j and x[i] + eps <= upper[i] and x[j] - eps >= lower[j]:
                y = x.copy()
                y[i] += eps
                y[j] -= eps
                assert ddo_objective(fits, y) >= f0 - 1e-12 * max(1.0, f0)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(budget=10.0, upper=[1.0, 2.0]), InfeasibleError, "exceeds the sum of upper bounds"),
    (dict(budget=1.0, lower=[0.6, 0.6]), InfeasibleError, "below the smallest feasible"),
    (dict(budget=2.0, lower=[1.5, 0.0], upper=[1.0, 5.0]), MixingError, "lower > upper"),
    (dict(budget=0.0), MixingError, "budget must be"),
    (dict(budget=float("nan")), MixingError, "budget must be"),
    (dict(budget=2.0, lower=[0.0, 0.0, 0.0]), MixingError, "one entry per domain"),
    (dict(budget=2.0, lower=float("-inf")), MixingError, "finite"),
])
def test_bad_inputs(kwargs, error, match):
    fits = [PowerLaw(0.2, 1.0, 0.0), PowerLaw(0.4, 0.5, 0.0)]
    with pytest.raises(error, match=match):
        solve_ddo(fits, **kwargs)


def test_bad_fits():
    with pytest.raises(MixingError, match="at least one"):
        solve_ddo([], 1.0)
    with pytest.raises(MixingError, match="b > 0"):
        solve_ddo([PowerLaw(0.2, 0.0, 0.0), PowerLaw(0.2, 1.0, 0.0)], 1.0)
    assert issubclass(InfeasibleError, ValueError)
