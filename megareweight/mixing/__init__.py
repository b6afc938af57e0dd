"""Domain mixing: AutoScale (Kang et al., 2024) and baseline mixtures.

The outer loop around training runs (see DESIGN.md, "AutoScale"):

1. train the 2m+1 perturbed-mixture runs at a budget (base, and each domain scaled down and up);
2. :func:`fit_domain_curves` fits one power law ``(x + a)^(-b) + c`` per domain;
3. :func:`solve_ddo` finds the optimal per-domain data amounts at that budget, exactly;
4. with optima at two budgets, :func:`extrapolate` (AutoScale's rule) or :func:`extrapolate_to`
   (any chosen total) predicts the mixture at larger budgets, capped by data availability.

Baselines: :func:`uniform_weights`, :func:`natural_weights`, :func:`unimax_weights` (UniMax,
Chung et al., 2023). Pure numpy/scipy; errors are ``ValueError`` subclasses.
"""
from __future__ import annotations

from megareweight.mixing.baselines import natural_weights, uniform_weights, unimax_counts, unimax_weights
from megareweight.mixing.ddo import ddo_objective, solve_ddo
from megareweight.mixing.errors import FitError, InfeasibleError, MixingError, MixingWarning
from megareweight.mixing.extrapolate import (
    DEFAULT_MAX_EPOCHS,
    cap_by_availability,
    counts_to_weights,
    extrapolate,
    extrapolate_to,
)
from megareweight.mixing.powerlaw import PowerLaw, fit_domain_curves, fit_power_law, interpolating_power_laws

__all__ = [
    "PowerLaw",
    "fit_power_law",
    "fit_domain_curves",
    "interpolating_power_laws",
    "solve_ddo",
    "ddo_objective",
    "extrapolate",
    "extrapolate_to",
    "cap_by_availability",
    "counts_to_weights",
    "DEFAULT_MAX_EPOCHS",
    "uniform_weights",
    "natural_weights",
    "unimax_counts",
    "unimax_weights",
    "MixingError",
    "FitError",
    "InfeasibleError",
    "MixingWarning",
]
