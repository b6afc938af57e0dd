"""Domain mixing maths: AutoScale (Kang et al., 2024) and baseline mixtures. No training code.

The pieces of AutoScale's outer loop (DESIGN.md, "AutoScale"), as pure numpy/scipy functions:

1. :func:`run_objective` scores a run (mean perplexity or loss over the trained domains; divided
   by the base run's, as the official notebook does);
2. :func:`shape_problem` says whether a domain's points can be a decreasing convex power law at
   all, and :func:`fit_power_law` / :func:`fit_domain_curves` fit ``(x + a)^(-b) + c``;
3. :func:`solve_ddo` finds the optimal per-domain data amounts at a budget, exactly;
4. with optima at two budgets, :func:`extrapolate` (AutoScale's rule), :func:`extrapolate_to`
   (any chosen total) and :func:`extrapolate_partial` (domains on a bound keep their share)
   predict larger budgets, capped by data availability;
5. :func:`blocked_noise_sd` and :func:`t_interval` say how large an effect must be to beat seed noise.

The workflow around training runs (plan, run, fit, extrapolate, validate: files on disk and the
``megareweight mix`` command) is :mod:`megareweight.autoscale`, which imports this package; this
package imports nothing from training (a test checks that importing it loads neither torch nor
``megareweight.train``).

Baselines: :func:`uniform_weights`, :func:`natural_weights`, :func:`unimax_weights` (UniMax,
Chung et al., 2023). Errors are ``ValueError`` subclasses.
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
    extrapolate_partial,
    extrapolate_to,
)
from megareweight.mixing.objective import DEFAULT_OBJECTIVE, OBJECTIVES, check_objective, run_objective
from megareweight.mixing.powerlaw import (
    PowerLaw,
    fit_domain_curves,
    fit_power_law,
    interpolating_power_laws,
    shape_problem,
)
from megareweight.mixing.stats import Interval, Noise, blocked_noise_sd, t_interval

__all__ = [
    "PowerLaw",
    "fit_power_law",
    "fit_domain_curves",
    "interpolating_power_laws",
    "shape_problem",
    "solve_ddo",
    "ddo_objective",
    "extrapolate",
    "extrapolate_to",
    "extrapolate_partial",
    "cap_by_availability",
    "counts_to_weights",
    "DEFAULT_MAX_EPOCHS",
    "run_objective",
    "check_objective",
    "OBJECTIVES",
    "DEFAULT_OBJECTIVE",
    "blocked_noise_sd",
    "t_interval",
    "Noise",
    "Interval",
    "uniform_weights",
    "natural_weights",
    "unimax_counts",
    "unimax_weights",
    "MixingError",
    "FitError",
    "InfeasibleError",
    "MixingWarning",
]
