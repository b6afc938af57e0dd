"""Extrapolating optimal mixtures to larger budgets (AutoScale, Kang et al., 2024).

AutoScale observes that the optimal token count of each domain scales exponentially with the
budget step: given the optimal counts ``N(1)`` and ``N(2)`` at two budgets, it predicts
``N_i(3) = N_i(2)^2 / N_i(1)`` and repeats the rule, i.e. ``N_i(k) = N_i(1) (N_i(2)/N_i(1))^(k-1)``.
The weights are ``w_i = N_i / sum_j N_j``.

Two practical gaps in that rule are closed here:

* the rule only reaches the budgets ``sum_i N_i(k)`` at integer ``k``; :func:`extrapolate_to`
  treats ``k`` as a real ``t`` (``log N_i(t)`` is linear in ``t``) and solves for the ``t`` that
  gives any chosen total;
* it ignores how much data each domain has. With ``available`` and ``max_epochs``, each domain is
  capped at ``available_i * max_epochs`` tokens, the excess goes to the uncapped domains in
  proportion to their counts (the total is kept), and a :class:`MixingWarning` names the domains
  that would otherwise repeat their data beyond the allowed number of epochs;
* it assumes every optimum is interior. :func:`extrapolate_partial` keeps domains whose optimum
  sat on a bound, or that could not be fitted, at a fixed share instead of compounding a ratio
  that only reflects the bound.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
from scipy.optimize import brentq

from megareweight.mixing._validate import ArrayLike, as_positive_vector, as_vector, domain_label, positive_scalar
from megareweight.mixing.errors import InfeasibleError, MixingError, MixingWarning

DEFAULT_MAX_EPOCHS = 4.0


def counts_to_weights(counts: ArrayLike) -> np.ndarray:
    """Mixture weights ``counts / sum(counts)`` (counts must be >= 0 with a positive total)."""
    c = as_vector("counts", counts)
    if (c < 0).any():
        raise MixingError(f"counts must be >= 0; negative at positions {np.flatnonzero(c < 0).tolist()}")
    total = c.sum()
    if total <= 0:
        raise MixingError("counts must have a positive total")
    return c / total


def cap_by_availability(counts: ArrayLike, available: ArrayLike, max_epochs: float = DEFAULT_MAX_EPOCHS,
                        names: Sequence[str] | None = None) -> np.ndarray:
    """Cap each domain at ``available_i * max_epochs`` tokens, keeping the total.

    The excess of capped domains is spread over the others in proportion to their counts; that can
    push another domain over its cap, so it repeats until no domain exceeds its cap (at most ``m``
    rounds). Warns with :class:`MixingWarning` naming every capped domain. Raises
    :class:`InfeasibleError` when even all domains at their caps hold fewer tokens than the total.
    """
    n = as_vector("counts", counts)
    if (n < 0).any():
        raise MixingError("counts must be >= 0")
    avail = as_vector("available", available)
    if avail.shape != n.shape:
        raise MixingError(f"available has {avail.size} entries for {n.size} domains")
    if (avail < 0).any():
        raise MixingError("available must be >= 0")
    epochs = positive_scalar("max_epochs", max_epochs)
    if names is not None and len(names) != n.size:
        raise MixingError(f"names has {len(names)} entries for {n.size} domains")
    cap = avail * epochs
    total = float(n.sum())
    if total > cap.sum() * (1 + 1e-12):
        raise InfeasibleError(f"{total:.6g} tokens requested but all domains together allow only "
                              f"{cap.sum():.6g} at max_epochs={epochs:g}")
    capped = np.zeros(n.size, dtype=bool)
    out = n.copy()
    while True:
        free = ~capped
        remaining = total - cap[capped].sum()
        weight = n[free].sum()
        if weight > 0:
            out[free] = n[free] * (remaining / weight)
        elif free.any():                 # only zero-count domains left: share the rest evenly
            out[free] = remaining / free.sum()
        over = free & (out > cap)
        if not over.any():
            break
        capped |= over
        out[capped] = cap[capped]
    if capped.any():
        labels = ", ".join(domain_label(int(i), names) for i in np.flatnonzero(capped))
        epochs_needed = ", ".join(f"{n[i] / avail[i]:.3g}" if avail[i] > 0 else "inf" for i in np.flatnonzero(capped))
        warnings.warn(f"domains {labels} would need {epochs_needed} epochs of their data (max_epochs="
                      f"{epochs:g}); capped and the excess redistributed to the other domains",
                      MixingWarning, stacklevel=3)
    return out


def _pair(n1: ArrayLike, n2: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    a = as_positive_vector("n1", n1)
    b = as_positive_vector("n2", n2)
    if a.shape != b.shape:
        raise MixingError(f"n1 and n2 must have one count per domain, got {a.size} and {b.size}")
    return a, b


def extrapolate(n1: ArrayLike, n2: ArrayLike, steps: int = 1, *, available: ArrayLike | None = None,
                max_epochs: float = DEFAULT_MAX_EPOCHS, names: Sequence[str] | None = None) -> np.ndarray:
    """AutoScale's rule ``N_i(k+1) = N_i(k)^2 / N_i(k-1)`` applied ``steps`` times.

    ``n1`` and ``n2`` are per-domain optimal token counts at the smaller and the larger budget.
    Returns the predicted counts ``n2 * (n2 / n1)^steps`` (weights: :func:`counts_to_weights`).
    With ``available`` (tokens per domain) the result is capped by :func:`cap_by_availability`.
    """
    a, b = _pair(n1, n2)
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise MixingError(f"steps must be an integer >= 1, got {steps!r}")
    out = b.copy()
    prev = a
    for _ in range(int(steps)):      # the recurrence itself, as published
        out, prev = out * out / prev, out
    if available is not None:
        out = cap_by_availability(out, available, max_epochs, names)
    return out


def extrapolate_to(n1: ArrayLike, n2: ArrayLike, target_tokens: float, *, available: ArrayLike | None = None,
                   max_epochs: float = DEFAULT_MAX_EPOCHS, names: Sequence[str] | None = None) -> np.ndarray:
    """Per-domain counts predicted at exactly ``target_tokens`` total.

    The paper's rule can only land on the budgets ``sum_i N_i(k)`` reached after an integer number
    of steps ``k``; it cannot choose the budget. Its closed form ``N_i(k) = N_i(1) r_i^(k-1)`` with
    ``r_i = N_i(2) / N_i(1)`` makes ``log N_i(t) = log N_i(1) + (t - 1) log r_i`` linear in a shared
    ``t``, which is exactly what the recurrence computes at integer ``t`` (``t = 2 + steps`` equals
    :func:`extrapolate` with ``steps``). Here ``t`` is real and solved from
    ``sum_i N_i(t) = target_tokens`` by Brent's method. The total is convex in ``t``, so when it
    grows from budget 1 to budget 2 it is increasing from there on and the solution with
    ``t >= 1`` is unique. Targets below ``sum(n1)`` are refused: that is not extrapolation (solve
    DDO at that budget instead). Capping by ``available`` keeps the total.
    """
    a, b = _pair(n1, n2)
    target = positive_scalar("target_tokens", target_tokens)
    s1, s2 = float(a.sum()), float(b.sum())
    if s2 <= s1:
        raise MixingError(f"the second budget must be larger than the first (sum(n2)={s2:.6g} <= sum(n1)={s1:.6g})")
    if target < s1 * (1 - 1e-12):
        raise MixingError(f"target_tokens={target:.6g} is below the smaller budget sum(n1)={s1:.6g}")
    log1, slope = np.log(a), np.log(b) - np.log(a)

    def counts(t: float) -> np.ndarray:
        return np.exp(log1 + (t - 1.0) * slope)

    # Work in log(total) so huge targets do not overflow before the root is bracketed.
    def gap(t: float) -> float:
        z = log1 + (t - 1.0) * slope
        zmax = z.max()
        return float(zmax + np.log(np.exp(z - zmax).sum()) - np.log(target))

    if gap(1.0) >= 0:
        t = 1.0
    else:
        hi = 2.0
        while gap(hi) < 0:
            hi = 1.0 + 2.0 * (hi - 1.0)
            if hi > 1e15:
                raise MixingError("could not reach target_tokens (counts do not grow)")
        t = brentq(gap, 1.0, hi, xtol=1e-15, rtol=4 * np.finfo(float).eps, maxiter=500)
    out = counts(t)
    out *= target / out.sum()       # remove the last rounding error so the total is exact
    if available is not None:
        out = cap_by_availability(out, available, max_epochs, names)
    return out


def extrapolate_partial(n1: ArrayLike, n2: ArrayLike, target_tokens: float, frozen_shares: ArrayLike, *,
                        available: ArrayLike | None = None, max_epochs: float = DEFAULT_MAX_EPOCHS,
                        names: Sequence[str] | None = None) -> np.ndarray:
    """:func:`extrapolate_to` for the free domains; the others keep a fixed share of the total.

    ``frozen_shares[i]`` is NaN for a free domain and the share of ``target_tokens`` to give
    domain ``i`` otherwise. Why: the rule ``N_i(t) = N_i(1) (N_i(2)/N_i(1))^(t-1)`` reads a trend
    into two interior optima. A domain whose optimum sat on a bound, or that was held at its base
    amount because its runs showed no usable effect, has no such trend: the ratio of its two
    amounts says where the bound or the base was, not where its optimum is going, and compounding
    it explodes (a domain going from a floor of 0.01 to its base amount grows 100-fold per budget
    step). Such domains keep the share they had at the larger budget; the free domains follow the
    rule among themselves, filling the rest. With no free domain the shares are returned scaled to
    the target (they must then sum to 1). Capping by ``available`` applies to the result.
    """
    a, b = _pair(n1, n2)
    target = positive_scalar("target_tokens", target_tokens)
    shares = np.asarray(frozen_shares, dtype=float)
    if shares.shape != a.shape:
        raise MixingError(f"frozen_shares must have one entry per domain ({a.size}), got shape {shares.shape}")
    frozen = ~np.isnan(shares)
    if (shares[frozen] < 0).any() or not np.all(np.isfinite(shares[frozen])):
        raise MixingError("frozen shares must be finite and >= 0")
    fixed = float(shares[frozen].sum())
    out = np.zeros_like(a)
    out[frozen] = shares[frozen] * target
    if frozen.all():
        if abs(fixed - 1.0) > 1e-9:
            raise MixingError(f"every domain is frozen but their shares sum to {fixed:.6g}, not 1")
    else:
        if fixed >= 1.0:
            raise MixingError(f"frozen shares sum to {fixed:.6g}: nothing is left for the free domains")
        free_names = None if names is None else [n for n, f in zip(names, frozen) if not f]
        try:
            out[~frozen] = extrapolate_to(a[~frozen], b[~frozen], target * (1.0 - fixed))
        except MixingError as exc:
            raise MixingError(f"free domains {free_names if free_names else np.flatnonzero(~frozen).tolist()}: "
                              f"{exc}") from None
    if available is not None:
        out = cap_by_availability(out, available, max_epochs, names)
    return out
