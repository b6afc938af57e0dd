"""Power-law fits of AutoScale (megareweight.mixing.powerlaw) on synthetic ground truth."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megareweight.mixing import (
    FitError,
    MixingWarning,
    PowerLaw,
    fit_domain_curves,
    fit_power_law,
    solve_ddo,
)
from megareweight.mixing.powerlaw import interpolating_power_laws, shape_problem

X3 = np.array([0.2, 1.0, 3.0])          # AutoScale's perturbation levels
XN = np.array([0.1, 0.2, 0.5, 1.0, 2.0, 3.0, 5.0])


def close_params(fit: PowerLaw, true: PowerLaw, rtol: float) -> bool:
    return (abs(fit.a - true.a) <= rtol * (1 + abs(true.a)) and abs(fit.b - true.b) <= rtol * true.b
            and abs(fit.c - true.c) <= rtol * (1 + true.c))


def test_powerlaw_record():
    p = PowerLaw(0.5, 1.0, 2.0)
    assert p(1.5) == pytest.approx(2.5)
    np.testing.assert_allclose(p(np.array([0.5, 1.5])), [3.0, 2.5])
    assert p.term(1.5) == pytest.approx(0.5)
    assert np.isnan(p(-1.0))                                 # outside the domain x + a > 0
    assert PowerLaw(0.5, 1.0, 2.0, residuals=(1.0,), rmse=1.0) == p   # fit details not compared
    assert hash(PowerLaw(0.5, 1.0, 2.0, rmse=3.0)) == hash(p)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.a = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("true", [PowerLaw(0.3, 0.7, 2.1), PowerLaw(-0.1, 1.5, 0.4), PowerLaw(1.0, 0.5, 0.0),
                                  PowerLaw(0.05, 0.25, 3.0)])
def test_three_points_exact(true):
    fit = fit_power_law(X3, true(X3))
    assert fit.rmse < 1e-10
    np.testing.assert_allclose(fit(X3), true(X3), rtol=0, atol=1e-10)
    assert len(fit.residuals) == 3
    # the truth is among the exact solutions (3 points may admit two)
    assert any(close_params(s, true, 1e-6) for s in interpolating_power_laws(X3, true(X3)))


def test_three_points_two_solutions_largest_c_chosen():
    true = PowerLaw(1.6934, 0.149, 2.189)   # a case with two exact curves; the truth has the smaller c
    sols = interpolating_power_laws(X3, true(X3))
    assert len(sols) == 2
    assert sols[0].c > sols[1].c
    for s in sols:
        np.testing.assert_allclose(s(X3), true(X3), atol=1e-10)
    assert close_params(sols[1], true, 1e-6)
    assert fit_power_law(X3, true(X3)) == sols[0]
    assert abs(sols[0](10.0) - sols[1](10.0)) > 1e-3    # they disagree beyond the data


@settings(max_examples=25, deadline=None)
@given(a=st.floats(-0.15, 2.0), b=st.floats(0.05, 3.0), c=st.floats(0.0, 3.0))
def test_three_points_exact_property(a, b, c):
    true = PowerLaw(a, b, c)
    y = true(X3)
    fit = fit_power_law(X3, y)
    np.testing.assert_allclose(fit(X3), y, atol=1e-9 * max(1.0, float(y.max())))
    assert fit.b > 0 and fit.c >= 0 and fit.a > -X3.min()


@pytest.mark.parametrize("true", [PowerLaw(0.3, 0.7, 2.1), PowerLaw(-0.05, 1.2, 0.0), PowerLaw(1.5, 1.8, 1.0)])
def test_more_points_recovers_parameters(true):
    fit = fit_power_law(XN, true(XN))
    assert close_params(fit, true, 1e-5)
    assert fit.rmse < 1e-7


def test_noisy_points_predictions_close():
    rng = np.random.default_rng(0)
    true = PowerLaw(0.3, 0.8, 2.0)
    x = np.repeat(XN, 3)
    sigma = 2e-3
    y = true(x) + rng.normal(0.0, sigma, x.size)
    fit = fit_power_law(x, y)
    grid = np.linspace(0.1, 5.0, 50)
    assert np.max(np.abs(fit(grid) - true(grid))) < 5 * sigma
    assert 0.3 * sigma < fit.rmse < 3 * sigma
    np.testing.assert_allclose(fit.residuals, y - fit(x), atol=1e-12)


def test_robust_fit_resists_an_outlier():
    true = PowerLaw(0.3, 0.8, 2.0)
    y = true(XN).copy()
    y[3] += 0.3                                    # one broken run
    grid = np.linspace(0.1, 5.0, 50)
    robust = fit_power_law(XN, y)
    plain = fit_power_law(XN, y, robust=False)
    err_robust = np.max(np.abs(robust(grid) - true(grid)))
    err_plain = np.max(np.abs(plain(grid) - true(grid)))
    assert err_robust < 0.5 * err_plain
    assert abs(robust.residuals[3]) > 0.2           # the outlier shows up in the residuals


def test_raw_token_units():
    true = PowerLaw(2e6, 0.3, 1.5)
    x = np.array([2e6, 1e7, 3e7])
    fit = fit_power_law(x, true(x))
    np.testing.assert_allclose(fit(x), true(x), atol=1e-10)


def test_non_convex_triple_warns_and_returns_best_curve():
    with pytest.warns(MixingWarning, match="falls faster at larger x"):
        fit = fit_power_law(X3, [3.0, 2.95, 2.0])   # not convex
    assert fit.rmse > 0
    with pytest.warns(MixingWarning, match="no amplitude factor"):
        fit = fit_power_law(X3, [3.0, 2.0, 1.5])    # convex, but too large a drop for the model
    assert fit.rmse > 0
    fit_power_law(X3, np.array([3.0, 2.0, 1.5]) / 30)    # fine once relative to a base loss


@pytest.mark.parametrize("x, y, match", [
    ([1.0, 2.0], [2.0, 1.0], "at least 3 points"),
    ([1.0, 2.0, 3.0], [2.0, 1.0], "same length"),
    ([1.0, 2.0, np.nan], [3.0, 2.0, 1.0], "non-finite"),
    ([1.0, 2.0, 3.0], [3.0, np.inf, 1.0], "non-finite"),
    ([0.0, 2.0, 3.0], [3.0, 2.0, 1.0], "must be > 0"),
    ([-1.0, 2.0, 3.0], [3.0, 2.0, 1.0], "must be > 0"),
    ([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], "not decreasing"),
    ([1.0, 2.0, 3.0], [2.0, 2.0, 2.0], "not decreasing"),
    ([1.0, 2.0, 3.0], [3.0, 1.0, 2.0], "not decreasing"),
    ([1.0, 2.0, 3.0, 4.0], [2.0, 2.5, 2.2, 2.1], "does not fall"),
    ([1.0, 1.0, 3.0], [3.0, 2.9, 1.0], "3 distinct"),
    ([1.0, 2.0, 3.0], [3.0, 2.0, -1.0], "losses must be > 0"),
    ([[1.0, 2.0, 3.0]], [[3.0, 2.0, 1.0]], "one-dimensional"),
])
def test_bad_inputs(x, y, match):
    with pytest.raises(FitError, match=match):
        fit_power_law(x, y)
    assert issubclass(FitError, ValueError)


def additive_loss(x: np.ndarray, laws: list[PowerLaw], c: float) -> float:
    return float(sum(l.term(xi) for l, xi in zip(laws, x)) + c)


def test_fit_domain_curves_from_perturbed_runs():
    """2m+1 runs of the additive AutoScale model: each domain's curve is recovered with its own c_i."""
    laws = [PowerLaw(0.2, 0.6, 0.0), PowerLaw(0.5, 1.1, 0.0), PowerLaw(-0.1, 0.4, 0.0)]
    c = 1.3
    m = len(laws)
    base = np.ones(m)
    xs, ys = [], []
    for i in range(m):
        levels = [0.2, 1.0, 3.0]
        runs = []
        for level in levels:
            x = base.copy()
            x[i] = level
            runs.append(additive_loss(x, laws, c))
        xs.append(levels)
        ys.append(runs)
    fits = fit_domain_curves(xs, ys)
    for i, (fit, law) in enumerate(zip(fits, laws)):
        c_i = c + sum(l.term(1.0) for j, l in enumerate(laws) if j != i)
        np.testing.assert_allclose(fit(np.array(xs[i])), ys[i], atol=1e-10)
        assert any(close_params(s, PowerLaw(law.a, law.b, c_i), 1e-6)
                   for s in interpolating_power_laws(xs[i], ys[i]))


def test_fit_domain_curves_then_ddo_matches_truth_with_more_points():
    laws = [PowerLaw(0.2, 0.6, 0.0), PowerLaw(0.5, 1.1, 0.0), PowerLaw(-0.1, 0.4, 0.0)]
    levels = [0.2, 0.5, 1.0, 2.0, 3.0]
    xs, ys = [], []
    for i in range(3):
        xs.append(levels)
        ys.append([additive_loss(np.where(np.arange(3) == i, lv, 1.0), laws, 1.0) for lv in levels])
    fits = fit_domain_curves(xs, ys, names=["web", "code", "math"])
    np.testing.assert_allclose(solve_ddo(fits, 3.0), solve_ddo(laws, 3.0), rtol=1e-5)


def test_fit_domain_curves_errors_name_the_domain():
    with pytest.raises(FitError, match="domain 'code'.*not decreasing"):
        fit_domain_curves([[0.2, 1, 3], [0.2, 1, 3]], [[1.1, 1.0, 0.97], [1, 2, 3]], names=["web", "code"])
    with pytest.raises(FitError, match="domain #0"):
        fit_domain_curves([[0.2, 1]], [[3, 2]])
    with pytest.raises(FitError, match="2 domains"):
        fit_domain_curves([[0.2, 1, 3], [0.2, 1, 3]], [[3, 2, 1.5]])
    with pytest.warns(MixingWarning, match="domain 'b'"):
        fit_domain_curves([[0.2, 1, 3], [0.2, 1, 3]], [[1.1, 1.0, 0.97], [3.0, 2.95, 2.0]], names=["a", "b"])


@pytest.mark.parametrize("x, y, expect", [
    (X3, np.array([3.0, 2.0, 1.5]) / 30, None),
    (X3, [1.001, 1.0, 0.95], "concave"),                      # falls faster at larger x
    ([1.0, 2.0, 3.0], [3.0, 2.0, 1.0], "concave"),            # a straight line is not a power law either
    (X3, [0.99, 1.0, 1.01], "not decreasing"),
    (X3, [1.0, 1.0, 0.99], "not decreasing"),
    (X3, [1.0, 0.98, 0.99], "not decreasing"),
    ([0.25, 0.5, 1, 2, 4], [1.1, 1.05, 1.0, 0.98, 0.97], None),   # 5 points: judged on 0.25, 1, 4
    ([0.25, 0.5, 1, 2, 4], [1.1, 1.2, 1.0, 0.98, 0.97], None),    # a bump between them is the regression's job
    ([0.25, 0.5, 1, 2, 4], [1.01, 1.05, 1.0, 0.98, 0.94], "concave"),
])
def test_shape_problem(x, y, expect):
    assert shape_problem(x, y) == expect
    if expect is None and len(x) == 3:
        fit_power_law(x, y)                                     # what passes is interpolated exactly


def test_shape_problem_refuses_malformed_input():
    with pytest.raises(FitError, match="must be > 0"):
        shape_problem([0.0, 1.0, 2.0], [1.0, 0.9, 0.8])
    with pytest.raises(FitError, match="3 distinct"):
        shape_problem([1.0, 1.0, 2.0], [1.0, 0.9, 0.8])
