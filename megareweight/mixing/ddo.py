"""Direct Data Optimisation (DDO) of AutoScale (Kang et al., 2024), solved exactly.

Given per-domain fits ``L_i(x) = (x + a_i)^(-b_i) + c_i`` (see :mod:`.powerlaw`), the best mixture
at a budget ``B`` (in units of the base run's data, so the base budget is ``m``) solves

    minimise    sum_i (x_i + a_i)^(-b_i)
    subject to  sum_i x_i = B,   lower_i <= x_i <= upper_i.

Each term is convex and decreasing on ``x_i > -a_i`` (``b_i > 0``), so the problem is convex and
the KKT conditions characterise the optimum. With multiplier ``lambda`` for the budget,
stationarity of a free coordinate reads

    d/dx (x + a)^(-b) = -b (x + a)^(-b-1) = -lambda
    =>  x_i(lambda) = (lambda / b_i)^(-1/(b_i + 1)) - a_i,

and a coordinate at a bound is the same expression clipped to ``[lower_i, upper_i]`` (the
projection of the stationary point onto an interval is the minimiser of a 1-D convex function
there). Every ``x_i(lambda)`` is non-increasing in ``lambda``, so the budget equation
``sum_i x_i(lambda) = B`` has a root found by bisection on ``log(lambda)``, then a final
Newton-like correction puts the total on ``B`` to rounding error. AutoScale's notebook fixed
negative solutions by hand; here the bounds are part of the problem.

With per-domain costs ``c_i`` (e.g. tokens per unit of ``x_i`` when the budget is in tokens and
the base mixture is not uniform) the constraint is ``sum_i c_i x_i = B`` and the same argument
gives ``x_i(lambda) = (lambda c_i / b_i)^(-1/(b_i + 1)) - a_i``.

Upper bounds model data availability: a domain with ``D_i`` tokens that may be repeated at most
``E`` times, measured in multiples of the base run's ``n_i`` tokens, has ``upper_i = E * D_i / n_i``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from megareweight.mixing._validate import ArrayLike, Bound, broadcast_bound, positive_scalar
from megareweight.mixing.errors import InfeasibleError, MixingError
from megareweight.mixing.powerlaw import PowerLaw

_BISECTION_STEPS = 400


def _params(fits: Sequence[PowerLaw]) -> tuple[np.ndarray, np.ndarray]:
    if len(fits) == 0:
        raise MixingError("fits must contain at least one PowerLaw")
    a = np.array([float(f.a) for f in fits])
    b = np.array([float(f.b) for f in fits])
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise MixingError("fits contain non-finite parameters")
    if (b <= 0).any():
        raise MixingError(f"every fit needs b > 0 (loss falling with data); b <= 0 for domains "
                          f"{np.flatnonzero(b <= 0).tolist()}")
    return a, b


def ddo_objective(fits: Sequence[PowerLaw], x: ArrayLike) -> float:
    """The DDO objective ``sum_i (x_i + a_i)^(-b_i)`` (``inf`` where some ``x_i + a_i <= 0``)."""
    a, b = _params(fits)
    xa = np.asarray(x, dtype=float) + a
    if xa.shape != a.shape:
        raise MixingError(f"x must have one entry per fit ({a.size}), got shape {xa.shape}")
    if (xa <= 0).any():
        return float("inf")
    return float(np.sum(xa ** (-b)))


def _allocation(log_lam: float, a: np.ndarray, b: np.ndarray, log_c: np.ndarray, lo: np.ndarray,
                hi: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = np.exp(-(log_lam + log_c - np.log(b)) / (b + 1.0)) - a
    return np.clip(x, lo, hi)


def solve_ddo(fits: Sequence[PowerLaw], budget: float, lower: Bound = None, upper: Bound = None,
              costs: Bound = None) -> np.ndarray:
    """Optimal per-domain data amounts ``x`` for the fitted curves at ``budget`` (DDO, AutoScale).

    ``lower`` defaults to 0 and ``upper`` to +inf; both may be scalars or per-domain sequences.
    The result satisfies the bounds and ``sum(x) == budget`` to ~1e-12 relative. The constant
    ``c`` of each fit plays no role. A domain whose lower bound lies at or below ``-a_i`` (where its
    loss term is infinite) never reaches it: its amount stays strictly above ``-a_i``.

    Raises :class:`InfeasibleError` when ``sum(lower) > budget`` or ``sum(upper) < budget`` (taking
    ``-a_i`` as the effective floor where larger), and :class:`MixingError` (both are
    ``ValueError``) when ``lower > upper`` somewhere or the inputs are malformed.

    ``costs`` (default 1) weighs each domain in the budget: ``sum_i costs_i * x_i == budget``.
    """
    a, b = _params(fits)
    m = a.size
    B = positive_scalar("budget", budget)
    lo = broadcast_bound("lower", lower, m, 0.0)
    hi = broadcast_bound("upper", upper, m, np.inf)
    c = broadcast_bound("costs", costs, m, 1.0)
    if not np.all(np.isfinite(c)) or (c <= 0).any():
        raise MixingError(f"costs must be finite and > 0, got {c.tolist()}")
    log_c = np.log(c)
    if np.isinf(lo).any():
        raise MixingError("lower bounds must be finite")
    if (hi == -np.inf).any():
        raise MixingError("upper bounds must not be -inf")
    if (lo > hi).any():
        bad = np.flatnonzero(lo > hi).tolist()
        raise MixingError(f"lower > upper for domains {bad}")
    if (hi + a <= 0).any():
        bad = np.flatnonzero(hi + a <= 0).tolist()
        raise InfeasibleError(f"upper bound <= -a for domains {bad}: their loss term is infinite everywhere allowed")
    floor = np.maximum(lo, -a)          # infimum of each domain's reachable amounts
    open_floor = lo <= -a               # that infimum is not attained
    total_floor, total_cap = float((c * floor).sum()), float((c * hi).sum())
    tol = 1e-12 * max(B, 1.0)
    if total_floor > B + tol or (open_floor.any() and total_floor >= B):
        raise InfeasibleError(f"budget {B:.6g} is below the smallest feasible total {total_floor:.6g} "
                              "(sum of lower bounds, or of -a where that is larger)")
    if total_cap < B - tol:
        raise InfeasibleError(f"budget {B:.6g} exceeds the sum of upper bounds {total_cap:.6g} "
                              "(not enough data for this budget at the allowed repetition)")
    if total_cap <= B:
        return hi.copy()
    if total_floor >= B:
        return lo.copy()

    def total(u: float) -> float:
        return float((c * _allocation(u, a, b, log_c, lo, hi)).sum())

    # Bracket the multiplier: total(u) is non-increasing in u = log(lambda).
    u_lo, u_hi, step = 0.0, 0.0, 1.0
    while total(u_lo) < B:
        u_lo -= step
        step *= 2.0
        if step > 1e300:
            raise InfeasibleError("could not bracket the budget multiplier (budget too large?)")
    step = 1.0
    while total(u_hi) > B:
        u_hi += step
        step *= 2.0
        if step > 1e300:
            raise InfeasibleError("could not bracket the budget multiplier (budget too small?)")
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (u_lo + u_hi)
        if mid <= u_lo or mid >= u_hi:
            break
        if total(mid) > B:
            u_lo = mid
        else:
            u_hi = mid
    x = _allocation(0.5 * (u_lo + u_hi), a, b, log_c, lo, hi)
    # Polish: spread the leftover over movable coordinates in proportion to dx/dlog(lambda).
    for _ in range(8):
        gap = B - float((c * x).sum())
        if abs(gap) <= 1e-15 * B:
            break
        movable = (x < hi) if gap > 0 else (x > floor)
        if not movable.any():
            break
        sens = np.where(movable, (x + a) / (b + 1.0), 0.0)
        if sens.sum() <= 0:
            sens = movable.astype(float)
        x = np.clip(x + gap * sens / (c * sens).sum(), lo, hi)
    return x
