"""Per-domain power laws of loss against data amount (Kang et al., "AutoScale", 2024).

AutoScale models the validation loss of a run trained on ``x_i`` units of domain ``i`` as

    L(x) = sum_i (x_i + a_i)^(-b_i) + c,

where ``x_i`` is domain ``i``'s data as a multiple of a base run's. The curve for one domain is
the 3-parameter law ``(x + a)^(-b) + c`` with no amplitude factor: the shift ``a`` plays that role
(``x + a`` small means a large loss term). The official notebooks fit each domain from 3 runs
(e.g. ``x in {0.2, 1, 3}``), where the fit is exact; with more runs it is a regression and this
module reports how well the curve explains the points (``residuals``, ``rmse``).

Three points do not always determine the curve: in random trials (x = 0.2, 1, 3; a in
[-0.15, 2], b in [0.05, 3], c in [0, 3]) about three quarters of the triples are interpolated by
TWO parameter sets, which agree at the points and differ between and beyond them. The 3-point case is therefore solved by enumerating the exact
solutions (a 1-D root search, see :func:`interpolating_power_laws`) and picking one by a stated
rule, instead of returning whatever a local optimiser happens to converge to.

Fitting uses :func:`scipy.optimize.least_squares` with bounds that keep the model meaningful:
``a > -min(x)`` (so ``x + a > 0`` at every observed point), ``b > 0`` (loss falls with data) and
``c >= 0`` (an irreducible loss cannot be negative). The objective is not convex in ``(a, b, c)``,
so the regression with more points starts from several points: a cheap grid over ``(a, c)`` where
the best ``b`` has a closed form (a no-intercept regression of ``log(y - c)`` on ``log(x + a)``),
plus the exact curves through 3 representative points.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Sequence, Union

import numpy as np
from scipy.optimize import brentq, least_squares

from megareweight.mixing._validate import ArrayLike, as_vector, domain_label
from megareweight.mixing.errors import FitError, MixingError, MixingWarning

Number = Union[float, np.ndarray]


@dataclass(frozen=True)
class PowerLaw:
    """The curve ``L(x) = (x + a)^(-b) + c``.

    ``residuals`` (observed minus fitted, in the order of the fitted points) and ``rmse`` are
    filled in by :func:`fit_power_law`; they describe the fit, not the curve, so they take no
    part in equality or hashing and ``PowerLaw(a, b, c)`` builds a curve by hand.
    """

    a: float
    b: float
    c: float
    residuals: tuple[float, ...] = field(default=(), compare=False, repr=False)
    rmse: float = field(default=float("nan"), compare=False)

    def __call__(self, x: Number) -> Number:
        """Evaluate the curve; ``x`` may be a scalar or an array (NaN where ``x + a <= 0``)."""
        xa = np.asarray(x, dtype=float) + self.a
        with np.errstate(invalid="ignore", divide="ignore"):
            out = np.where(xa > 0, np.power(np.where(xa > 0, xa, 1.0), -self.b), np.nan) + self.c
        return float(out) if out.ndim == 0 else out

    def term(self, x: Number) -> Number:
        """The data-dependent part ``(x + a)^(-b)``: what domain mixing can reduce."""
        value = self(x)
        return value - self.c


def _model(p: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.power(x + p[0], -p[1]) + p[2]


def _jac(p: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    xa = x + p[0]
    t = np.power(xa, -p[1])
    return np.column_stack([-p[1] * t / xa, -t * np.log(xa), np.ones_like(x)])


def _distinct_means(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct ``x`` (sorted) and the mean loss at each; refuses malformed points."""
    if x.shape != y.shape:
        raise FitError(f"x and losses must have the same length, got {x.size} and {y.size}")
    if x.size < 3:
        raise FitError(f"need at least 3 points to fit (x + a)^(-b) + c, got {x.size}")
    if (x <= 0).any():
        raise FitError(f"data amounts x must be > 0, got {x[x <= 0].tolist()}")
    if (y <= 0).any():
        raise FitError("losses must be > 0: the model (x + a)^(-b) + c with c >= 0 is positive")
    xs = np.unique(x)
    if xs.size < 3:
        raise FitError(f"need at least 3 distinct data amounts, got {xs.tolist()}")
    return xs, np.array([y[x == v].mean() for v in xs])


def _check_points(x: np.ndarray, y: np.ndarray) -> None:
    """Refuse data from which a decreasing power law cannot be identified."""
    xs, means = _distinct_means(x, y)
    if xs.size == 3 and not np.all(np.diff(means) < 0):
        raise FitError(f"loss is not decreasing as data grows: x={xs.tolist()} -> losses={means.tolist()}")
    if means[-1] >= means[0]:
        raise FitError(f"loss does not fall as data grows: loss {means[0]:.6g} at x={xs[0]:.6g} but "
                       f"{means[-1]:.6g} at x={xs[-1]:.6g}")


def _starting_points(x: np.ndarray, y: np.ndarray, a_lo: float, count: int) -> list[np.ndarray]:
    """Best few ``(a, b, c)`` of a grid over ``(a, c)`` with ``b`` from a closed-form regression."""
    xmin, xmax = float(x.min()), float(x.max())
    a_grid = -xmin + np.geomspace(1e-6 * xmin, 1e3 * xmax, 48)
    c_grid = float(y.min()) * np.array([0.0, 0.25, 0.5, 0.75, 0.9, 0.97, 0.99, 0.999])
    a_grid = np.maximum(a_grid, a_lo)
    logx = np.log(x[None, :] + a_grid[:, None])                   # (A, n)
    logy = np.log(y[None, :] - c_grid[:, None])                   # (C, n); y > c always
    num = -(logx[:, None, :] * logy[None, :, :]).sum(-1)          # (A, C)
    den = (logx ** 2).sum(-1)[:, None]
    b = np.clip(num / np.maximum(den, 1e-300), 1e-6, 1e3)
    pred = np.exp(-b[..., None] * logx[:, None, :]) + c_grid[None, :, None]
    sse = ((pred - y) ** 2).sum(-1)
    sse = np.where(np.isfinite(sse), sse, np.inf)
    order = np.argsort(sse, axis=None)[:count]
    ia, ic = np.unravel_index(order, sse.shape)
    return [np.array([a_grid[i], b[i, j], c_grid[j]]) for i, j in zip(ia, ic)]


# --- exact 3-point solutions -------------------------------------------------------------------
# Through 3 points (x1 < x2 < x3, y1 > y2 > y3) the curve must satisfy, with u_k = x_k + a,
#   ratio(a, b) = (u1^-b - u2^-b) / (u2^-b - u3^-b) = (y1 - y2) / (y2 - y3) = rho,
#   gap(a, b)   = u2^-b - u3^-b = y2 - y3,          and then  c = y3 - u3^-b.
# For each b the ratio falls from +inf (a -> -x1) to (x2 - x1) / (x3 - x2) (a -> inf, where the
# curve looks straight), so the first equation gives one a(b) (when the points are convex enough);
# the roots of gap(a(b), b) = y2 - y3 along that curve are the exact fits. There are often TWO.

_B_GRID = np.geomspace(1e-5, 1e3, 600)


def _ratio(u1: np.ndarray, u2: np.ndarray, u3: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        return np.expm1(b * np.log(u2 / u1)) / -np.expm1(b * np.log(u2 / u3))


def _gap(u2: np.ndarray, u3: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        return np.exp(-b * np.log(u2)) * -np.expm1(b * np.log(u2 / u3))


def _shift_for(b: np.ndarray, x: np.ndarray, rho: float) -> np.ndarray:
    """``a(b)`` solving ``ratio = rho`` (vectorised bisection on ``log(x1 + a)``); NaN if out of range."""
    s_lo = np.full(b.shape, np.log(1e-12 * x[0]))
    s_hi = np.full(b.shape, np.log(1e7 * x[2]))
    for _ in range(120):
        s = 0.5 * (s_lo + s_hi)
        u1 = np.exp(s)
        a = u1 - x[0]
        too_small = _ratio(u1, x[1] + a, x[2] + a, b) > rho      # ratio is too steep: raise a
        s_lo = np.where(too_small, s, s_lo)
        s_hi = np.where(too_small, s_hi, s)
    s = 0.5 * (s_lo + s_hi)
    edge = (s - np.log(1e-12 * x[0]) < 1e-6) | (np.log(1e7 * x[2]) - s < 1e-6)
    return np.where(edge, np.nan, np.exp(s) - x[0])


def interpolating_power_laws(x: ArrayLike, losses: ArrayLike) -> list[PowerLaw]:
    """Every curve ``(x + a)^(-b) + c`` with ``c >= 0`` passing exactly through 3 points.

    Three points do not always pin the curve down: typically two parameter sets interpolate
    them, and they disagree away from the points. :func:`fit_power_law` picks the one with the
    largest ``c`` (the smallest predicted gain from data beyond the observed range); this function
    lets a caller see the alternatives. Returns an empty list when no curve fits exactly (the
    loss falls faster at larger ``x``). Sorted by decreasing ``c``.
    """
    xv = as_vector("x", x)
    yv = as_vector("losses", losses)
    _check_points(xv, yv)
    if xv.size != 3:
        raise FitError(f"exactly 3 points are needed for an exact fit, got {xv.size}")
    order = np.argsort(xv)
    xs, ys = xv[order], yv[order]
    rho = (ys[0] - ys[1]) / (ys[1] - ys[2])
    target = ys[1] - ys[2]
    a_grid = _shift_for(_B_GRID, xs, rho)
    f = _gap(xs[1] + a_grid, xs[2] + a_grid, _B_GRID) - target
    ok = np.isfinite(f)
    roots: list[np.ndarray] = []
    for i in np.flatnonzero(ok[:-1] & ok[1:] & (np.sign(f[:-1]) != np.sign(f[1:]))):
        def along(log_b: float) -> float:
            bb = np.array([np.exp(log_b)])
            aa = _shift_for(bb, xs, rho)
            return float(_gap(xs[1] + aa, xs[2] + aa, bb)[0] - target)
        try:
            log_b = brentq(along, np.log(_B_GRID[i]), np.log(_B_GRID[i + 1]), xtol=1e-14, rtol=1e-14)
        except ValueError:
            continue
        b = float(np.exp(log_b))
        a = float(_shift_for(np.array([b]), xs, rho)[0])
        if not np.isfinite(a):
            continue
        c = float(ys[2] - (xs[2] + a) ** (-b))
        if c < -1e-9 * max(1.0, float(ys.max())):
            continue
        roots.append(_polish(np.array([a, b, max(c, 0.0)]), xs, ys))
    laws = []
    for p in sorted(roots, key=lambda p: -p[2]):
        res = yv - _model(p, xv)
        laws.append(PowerLaw(float(p[0]), float(p[1]), float(p[2]),
                             residuals=tuple(float(r) for r in res), rmse=float(np.sqrt(np.mean(res ** 2)))))
    return laws


def _bounds(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    xmin, xmax = float(x.min()), float(x.max())
    return np.array([-xmin * (1.0 - 1e-9), 1e-9, 0.0]), np.array([1e4 * xmax, 1e3, np.inf])


def _solve(p0: np.ndarray, x: np.ndarray, y: np.ndarray, loss: str, scale: float):
    lower, upper = _bounds(x)
    p0 = np.clip(p0, lower + 1e-12 * np.maximum(1.0, np.abs(lower)), upper)  # strictly inside
    return least_squares(lambda p: _model(p, x) - y, p0, jac=lambda p: _jac(p, x, y),
                         bounds=(lower, upper), loss=loss, f_scale=scale, x_scale="jac",
                         ftol=1e-15, xtol=1e-15, gtol=1e-15, max_nfev=1500)


def _polish(p: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A few least-squares steps from an (almost) exact solution; keep whichever fits better."""
    before = float(np.sum((_model(p, x) - y) ** 2))
    try:
        res = _solve(p, x, y, "linear", 1.0)
    except ValueError:
        return p
    return res.x if 2 * res.cost < before else p


def _summary_points(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """3 representative points (smallest, middle, largest x; mean loss at each) if decreasing."""
    xs = np.unique(x)
    mid = xs[1:-1][np.argmin(np.abs(np.log(xs[1:-1]) - 0.5 * np.log(xs[0] * xs[-1])))]
    px = np.array([xs[0], mid, xs[-1]])
    py = np.array([y[x == v].mean() for v in px])
    return (px, py) if np.all(np.diff(py) < 0) else None


def shape_problem(x: ArrayLike, losses: ArrayLike) -> str | None:
    """Why a decreasing convex power law cannot describe these points, or ``None`` if it can.

    AutoScale's model needs each domain's loss to fall as its data grows, and to fall more slowly
    at larger ``x`` (``(x + a)^(-b)`` is convex). Noisy runs often violate one or the other, and a
    curve forced through such points sends DDO to a corner (a near-linear curve puts every token
    on one domain). The check is on the mean loss at each distinct ``x``; with more than 3 of them
    it uses the smallest, the (geometrically) middle and the largest, the points that decide the
    curve's overall shape. Reasons returned:

    * ``"not decreasing"``: the loss does not fall strictly from one ``x`` to the next;
    * ``"concave"``: it falls at least as fast per unit of ``x`` between the upper two points as
      between the lower two (a straight line or worse).

    Points that pass can still be too steep for the model, which has no amplitude factor:
    :func:`fit_power_law` then warns and returns a least-squares curve that misses them.

    Raises :class:`FitError` only for malformed input (lengths, non-finite values, ``x <= 0``,
    losses ``<= 0``).
    """
    try:
        xv = as_vector("x", x)
        yv = as_vector("losses", losses)
    except MixingError as exc:
        raise FitError(str(exc)) from None
    xs, means = _distinct_means(xv, yv)
    mid = 1 + int(np.argmin(np.abs(np.log(xs[1:-1]) - 0.5 * np.log(xs[0] * xs[-1]))))
    px, py = xs[[0, mid, -1]], means[[0, mid, -1]]
    if not np.all(np.diff(py) < 0):
        return "not decreasing"
    if (py[0] - py[1]) * (px[2] - px[1]) <= (py[1] - py[2]) * (px[1] - px[0]):
        return "concave"
    return None


def fit_power_law(x: ArrayLike, losses: ArrayLike, *, robust: bool | None = None,
                  f_scale: float | None = None, n_starts: int = 6) -> PowerLaw:
    """Fit ``L(x) = (x + a)^(-b) + c`` to measured losses (AutoScale, Kang et al. 2024).

    With exactly 3 points (AutoScale's setting) the 3 parameters interpolate them. The solution
    is often not unique (see :func:`interpolating_power_laws`); the one with the largest ``c`` is
    returned, a deterministic and conservative choice. With more points the fit is a regression by
    :func:`scipy.optimize.least_squares` from several starting points (a grid, and the exact
    curves through 3 representative points). ``robust`` (default: on when there are more than 3
    points) uses the ``soft_l1`` loss, so one bad run cannot drag the curve; ``f_scale`` is the
    residual size beyond which points are down-weighted (default 5% of the loss range).

    Raises :class:`FitError` (a ``ValueError``) on fewer than 3 points, mismatched lengths,
    non-finite values, non-positive ``x`` or losses, or losses that do not fall as ``x`` grows.
    Warns (:class:`MixingWarning`) when 3 points cannot be interpolated and returns the
    least-squares curve: either the loss falls faster at larger ``x`` (no convex curve fits), or
    the drop is too large for the model, which has no amplitude factor (``(x + a)^(-b)`` with
    ``x + a >= 1`` never exceeds 1), so the units of ``x`` and of the loss matter.
    """
    try:
        xv = as_vector("x", x)
        yv = as_vector("losses", losses)
    except MixingError as exc:
        raise FitError(str(exc)) from None
    _check_points(xv, yv)
    n = xv.size
    y_range = float(yv.max() - yv.min())
    if n == 3:
        exact = interpolating_power_laws(xv, yv)
        if exact:
            return exact[0]
    use_robust = n > 3 if robust is None else robust
    loss = "soft_l1" if use_robust else "linear"
    scale = float(f_scale) if f_scale is not None else 0.05 * y_range
    if not np.isfinite(scale) or scale <= 0:
        raise FitError(f"f_scale must be a finite number > 0, got {f_scale!r}")
    lower, _ = _bounds(xv)
    starts = _starting_points(xv, yv, float(lower[0]), max(1, n_starts))
    summary = _summary_points(xv, yv) if n > 3 else None
    if summary is not None:
        starts += [np.array([law.a, law.b, law.c]) for law in interpolating_power_laws(*summary)]
    best: np.ndarray | None = None
    best_cost = np.inf
    for p0 in starts:
        try:
            res = _solve(p0, xv, yv, loss, scale)
        except (ValueError, FloatingPointError):  # a start at the edge of the domain
            continue
        if np.all(np.isfinite(res.fun)) and res.cost < best_cost:
            best, best_cost = res.x, float(res.cost)
    if best is None:
        raise FitError("power-law fit failed from every starting point")
    residuals = yv - _model(best, xv)
    rmse = float(np.sqrt(np.mean(residuals ** 2)))
    if n == 3:
        xs, ys = np.sort(xv), yv[np.argsort(xv)]
        if (ys[0] - ys[1]) * (xs[2] - xs[1]) <= (ys[1] - ys[2]) * (xs[1] - xs[0]):
            why = "the loss falls faster at larger x, which no convex power law does"
        else:
            why = ("the drop is too large for a curve with no amplitude factor; express losses relative "
                   "to the base run (AutoScale divides by the base run's) or x in other units")
        warnings.warn(f"3 points could not be fit exactly (max residual {np.abs(residuals).max():.3g}): {why}",
                      MixingWarning, stacklevel=2)
    return PowerLaw(float(best[0]), float(best[1]), float(best[2]),
                    residuals=tuple(float(r) for r in residuals), rmse=rmse)


def fit_domain_curves(x_per_domain: Sequence[ArrayLike], losses: Sequence[ArrayLike], *,
                      names: Sequence[str] | None = None, robust: bool | None = None) -> list[PowerLaw]:
    """Fit one power law per domain from AutoScale's 2m+1 perturbed runs.

    ``x_per_domain[i]`` holds the amounts of domain ``i`` (as multiples of the base run's data of
    that domain, e.g. ``[0.2, 1, 3]``) in the runs where ONLY domain ``i`` was changed, the base
    run (x = 1) included; ``losses[i]`` holds those runs' measured loss (the average validation
    loss over domains, or AutoScale's perplexity ratio to the base run).

    Why a separate constant per domain: the model is ``L(x) = sum_j (x_j + a_j)^(-b_j) + c``. When
    only ``x_i`` moves, every term ``j != i`` stays at its base value, so the observed curve is
    ``(x_i + a_i)^(-b_i) + c_i`` with ``c_i = c + sum_{j != i} (1 + a_j)^(-b_j)``. Each domain's
    points therefore determine ``(a_i, b_i, c_i)``, and the ``c_i`` differ by domain. DDO
    (:func:`megareweight.mixing.solve_ddo`) only uses ``a_i`` and ``b_i``: the constants do not
    change where the optimum lies.

    Errors name the domain (by ``names`` when given, else its index).
    """
    if len(x_per_domain) != len(losses):
        raise FitError(f"x_per_domain has {len(x_per_domain)} domains but losses has {len(losses)}")
    if len(x_per_domain) == 0:
        raise FitError("no domains given")
    if names is not None and len(names) != len(x_per_domain):
        raise FitError(f"names has {len(names)} entries for {len(x_per_domain)} domains")
    fits: list[PowerLaw] = []
    for i, (xi, yi) in enumerate(zip(x_per_domain, losses)):
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", MixingWarning)
                fits.append(fit_power_law(xi, yi, robust=robust))
        except FitError as exc:
            raise FitError(f"domain {domain_label(i, names)}: {exc}") from None
        for w in caught:
            warnings.warn(f"domain {domain_label(i, names)}: {w.message}", MixingWarning, stacklevel=2)
    return fits
