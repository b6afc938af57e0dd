"""``mix fit``: per-domain power laws from a plan's finished runs, guarded, then DDO.

What is fitted. Each run is scored by the objective (:mod:`megareweight.mixing.objective`;
default ``ppl``, the official notebook's mean validation perplexity over the trained domains),
divided by the mean score of the base run's replicas. A run's ``x_i`` is the number of tokens it
actually drew from domain ``i`` (``summary.json``'s ``tokens_per_domain``), divided by the mean of
the base replicas' draws: planned amounts are only expectations of the random per-slot draws.
Replicas of a setting (same mixture, different seeds) are averaged, ``x`` and score alike, so each
domain gets one point per setting: the base (x = 1, score 1) and the runs that scaled it.

Guards: a domain is *held* at its base amount (``x = 1``, not optimised) when

* its points are not a decreasing convex triple (:func:`~megareweight.mixing.shape_problem`):
  a concave or flat curve forced through them sends DDO to a corner; or, with 3 points, no curve
  ``(x + a)^(-b) + c`` passes through them (a drop too steep for the model);
* with 2 or more seeds, its effect (mean score at its smallest ``x`` minus at its largest) is
  smaller than ``significance`` (default 2) standard errors. The standard error of a difference
  of two settings' means is ``sd * sqrt(2 / K)``, with ``sd`` the seed noise of one run estimated
  from all settings at once, seeds as blocks (:func:`~megareweight.mixing.blocked_noise_sd`).
  Holding rather than fitting is deliberate: a curve through noise yields a confident mixture
  that the next seed would overturn, and extrapolation compounds it. With one seed there is no
  standard error: every fit is then reported as unverified (a warning), not held.

DDO (:func:`~megareweight.mixing.solve_ddo` with each domain's base tokens as its cost, so the
budget is in tokens) then minimises the fitted terms subject to ``sum_i n_i x_i = sum_i n_i`` and
bounds that default to the plan's measured range, ``[smallest factor, largest factor]``: the
official notebook keeps the optimum inside the points it measured, and a curve extrapolated 20x
below its smallest point decides nothing. ``min_x``/``max_x`` may widen that range (with a
warning); the upper bound is also capped at ``max_epochs`` passes over the domain's data. An
optimum that lands on a bound is reported (``bound_domains``): the curve wanted to go further
than was measured, so its amount is a bound, not an optimum, and extrapolation freezes it.

Outputs: ``fit.json`` (everything above, with the replicas), ``weights.yaml`` and
``mixture_config.yaml`` (the base config training the DDO mixture at this budget, for
``mix validate``), and plots (``fit.png``, ``fit_<domain>.png``).
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np

from megareweight.autoscale.files import (
    BASE_CONFIG_FILE,
    FIT_FILE,
    MIXTURE_CONFIG_FILE,
    WEIGHTS_FILE,
    WorkflowError,
    read_json,
    write_json,
    write_weights_yaml,
)
from megareweight.autoscale.measure import RunMeasurement, measure_run
from megareweight.autoscale.plan import BASE_GROUP, groups, load_plan
from megareweight.autoscale.target import write_target_config
from megareweight.config import load_config
from megareweight.mixing import (
    DEFAULT_MAX_EPOCHS,
    DEFAULT_OBJECTIVE,
    FitError,
    MixingWarning,
    PowerLaw,
    blocked_noise_sd,
    check_objective,
    fit_power_law,
    run_objective,
    shape_problem,
    solve_ddo,
)
from megareweight.mixing.objective import DESCRIPTIONS

FIT_VERSION = 2
DEFAULT_SIGNIFICANCE = 2.0
_AT_BOUND = 1e-6   # relative distance to a bound that counts as "on" it
_EXACT = 1e-6      # largest residual (relative objective) of a 3-point fit that counts as exact


def _measure_all(root: Path, plan: dict[str, Any]) -> dict[str, RunMeasurement]:
    out = {}
    for run in plan["runs"]:
        cfg = load_config(root / run["config"])
        out[run["name"]] = measure_run(root / run["out"], plan["domains"], config=cfg, total_tokens=run["tokens"],
                                       world_size=plan["world_size"])
    return out


def _check_options(objective: str, min_x: Optional[float], max_x: Optional[float], max_epochs: float,
                   significance: float) -> None:
    try:
        check_objective(objective)
    except ValueError as exc:
        raise WorkflowError(f"--objective: {exc}") from None
    for flag, value in (("--min-x", min_x), ("--max-x", max_x)):
        if value is not None and (not math.isfinite(value) or value <= 0):
            raise WorkflowError(f"{flag} must be a number > 0, got {value!r}")
    if min_x is not None and max_x is not None and min_x >= max_x:
        raise WorkflowError(f"--min-x {min_x:g} must be below --max-x {max_x:g}")
    if not math.isfinite(max_epochs) or max_epochs <= 0:
        raise WorkflowError(f"--max-epochs must be a number > 0, got {max_epochs!r}")
    if not math.isfinite(significance) or significance < 0:
        raise WorkflowError(f"--significance must be a number >= 0, got {significance!r}")


def _guarded_fit(x: list[float], y: list[float], noise: Optional[dict[str, Any]],
                 significance: float) -> tuple[Optional[PowerLaw], Optional[str], list[str]]:
    """``(law, None, warnings)`` for a domain that passes the guards, ``(None, reason, [])`` for one held."""
    try:
        problem = shape_problem(x, y)
    except FitError as exc:                 # e.g. a scaled-down domain drew no tokens at all (x = 0)
        return None, f"{exc} (the budget is too small for the planned amounts)", []
    if problem is not None:
        return None, (f"{problem}: relative objective {', '.join(f'{v:.5f}' for v in y)} at x = "
                      f"{', '.join(f'{v:.3g}' for v in x)}"), []
    effect = y[0] - y[-1]
    if noise is not None and effect < significance * noise["effect_se"]:
        return None, (f"effect {effect:.4g} is below {significance:g} standard errors "
                      f"({significance:g} x {noise['effect_se']:.3g}): not distinguishable from seed noise"), []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MixingWarning)
        try:
            law = fit_power_law(x, y)
        except FitError as exc:
            return None, str(exc), []
    messages = [str(w.message) for w in caught]
    if len(x) == 3 and max(abs(r) for r in law.residuals) > _EXACT:
        # 3 points the model cannot pass through: a curve that misses them decides nothing
        return None, "no exact power law: " + "; ".join(messages), []
    return law, None, messages


def _noise(by_group: dict[str, list[dict[str, Any]]], rel: dict[str, float], n_seeds: int) -> Optional[dict[str, Any]]:
    """Seed noise of one run's relative objective (seeds as blocks) and the standard error of an effect."""
    if n_seeds < 2:
        return None
    sd, dof = blocked_noise_sd([[rel[r["name"]] for r in runs] for runs in by_group.values()])
    return {"sd": sd, "dof": dof, "effect_se": sd * math.sqrt(2.0 / n_seeds)}


def _solve_bounded(fits: list[PowerLaw], pinned: np.ndarray, n_bar: np.ndarray, lower: float, upper: np.ndarray,
                   avail_limited: np.ndarray) -> tuple[np.ndarray, list[Optional[str]]]:
    """DDO with held domains pinned at x = 1; which free domains ended on which bound."""
    lo = np.where(pinned, 1.0, lower)
    hi = np.where(pinned, 1.0, upper)
    if pinned.all():
        return np.ones(len(fits)), [None] * len(fits)
    x_opt = solve_ddo(fits, float(n_bar.sum()), lower=lo, upper=hi, costs=n_bar)
    kinds: list[Optional[str]] = []
    for i in range(len(fits)):
        kind = None
        if not pinned[i] and x_opt[i] <= lo[i] * (1 + _AT_BOUND):
            kind = "lower"
        elif not pinned[i] and x_opt[i] >= hi[i] * (1 - _AT_BOUND):
            kind = "availability" if avail_limited[i] else "upper"
        kinds.append(kind)
    return x_opt, kinds


def fit_plan(plan_dir: str | Path, *, objective: str = DEFAULT_OBJECTIVE, min_x: Optional[float] = None,
             max_x: Optional[float] = None, max_epochs: float = DEFAULT_MAX_EPOCHS,
             significance: float = DEFAULT_SIGNIFICANCE, plots: bool = True) -> dict[str, Any]:
    """Fit, guard and solve DDO for a plan directory; write the outputs; return ``fit.json``'s content."""
    root = Path(plan_dir)
    plan = load_plan(root)
    _check_options(objective, min_x, max_x, max_epochs, significance)
    domains: list[str] = plan["domains"]
    by_group = groups(plan)
    if BASE_GROUP not in by_group:
        raise WorkflowError(f"{root}: the plan has no base run")
    meas = _measure_all(root, plan)
    notes: list[str] = []

    # scores and actual amounts, relative to the mean of the base replicas
    base_runs = by_group[BASE_GROUP]
    n_bar = np.array([np.mean([meas[r["name"]].tokens[d] for r in base_runs]) for d in domains])
    if (n_bar <= 0).any():
        raise WorkflowError(f"the base run drew no tokens of domain {domains[int(np.argmin(n_bar))]!r}; "
                            "raise the budget")
    score = {name: run_objective([m.losses[d] for d in domains], objective) for name, m in meas.items()}
    base_score = float(np.mean([score[r["name"]] for r in base_runs]))
    rel = {name: s / base_score for name, s in score.items()}
    xs = {name: np.array([m.tokens[d] for d in domains]) / n_bar for name, m in meas.items()}
    noise = _noise(by_group, rel, len(plan["seeds"]))
    if noise is None:
        notes.append("one seed per run: the seed noise is unknown, so no effect can be told from noise "
                     "(plan with --seeds 2 or more)")

    # per domain: the mean of the replicas at each setting that scaled it, guards, fit
    curves: dict[str, dict[str, Any]] = {}
    fits: list[PowerLaw] = []
    for i, d in enumerate(domains):
        settings = [BASE_GROUP] + [g for g, runs in by_group.items() if runs[0]["domain"] == d]
        if len(settings) < 3:
            raise WorkflowError(f"domain {d!r}: only {len(settings)} settings (need the base and two perturbed runs)")
        pts = sorted((float(np.mean([xs[r["name"]][i] for r in by_group[g]])),
                      float(np.mean([rel[r["name"]] for r in by_group[g]])), g) for g in settings)
        x, y = [p[0] for p in pts], [p[1] for p in pts]
        law, reason, messages = _guarded_fit(x, y, noise, significance)
        notes += [f"domain {d!r}: {m}" for m in messages]
        curve: dict[str, Any] = {
            "status": "held" if law is None else "fitted", "reason": reason,
            "x": x, "relative_objective": y, "settings": [p[2] for p in pts],
            "replica_x": [[float(xs[r["name"]][i]) for r in by_group[p[2]]] for p in pts],
            "replica_relative_objective": [[rel[r["name"]] for r in by_group[p[2]]] for p in pts],
            "effect": y[0] - y[-1],
            "effect_se": None if noise is None else noise["effect_se"],
            "effect_z": None if noise is None else (y[0] - y[-1]) / noise["effect_se"],
        }
        if law is not None:
            curve.update(a=law.a, b=law.b, c=law.c, rmse=law.rmse, residuals=list(law.residuals))
        else:
            notes.append(f"domain {d!r} held at its base amount: {reason}")
        curves[d] = curve
        fits.append(law if law is not None else PowerLaw(0.0, 1.0, 0.0))   # a held domain is pinned at x = 1
    held = [d for d in domains if curves[d]["status"] == "held"]
    if len(held) == len(domains):
        notes.append("every domain is held: the DDO mixture is the base mixture")

    # bounds (default: the measured range), DDO, bound-hitting optima
    measured = (float(min(plan["factors"])), float(max(plan["factors"])))
    lower = measured[0] if min_x is None else float(min_x)
    upper_user = measured[1] if max_x is None else float(max_x)
    if lower < measured[0] or upper_user > measured[1]:
        notes.append(f"DDO bounds [{lower:g}, {upper_user:g}] extend beyond the measured range [{measured[0]:g}, "
                     f"{measured[1]:g}]: an optimum out there rests on the fitted curves' extrapolation")
    avail_upper = max_epochs * np.array([plan["available_tokens"][d] for d in domains], dtype=float) / n_bar
    upper = np.minimum(upper_user, avail_upper)
    x_opt, kinds = _solve_bounded(fits, np.array([d in held for d in domains]), n_bar, lower, upper,
                                  avail_upper < upper_user)
    bounds = {}
    for d, x_d, kind in zip(domains, x_opt, kinds):
        curves[d].update(optimal_x=float(x_d), bound=kind)
        if kind is not None:
            bounds[d] = kind
            notes.append(f"domain {d!r}: optimum on its {kind} bound (x = {x_d:.4g}); the fitted curves ask for "
                         "an amount beyond it, so this amount is a bound, not an optimum")
    budget = float(plan["budget_tokens"])
    counts = x_opt * n_bar
    counts = counts * (budget / counts.sum())
    weights = counts / counts.sum()
    predicted = 1.0 + sum(float(f(x_d) - f(1.0)) for f, x_d, d in zip(fits, x_opt, domains) if d not in held)

    fit = {
        "version": FIT_VERSION,
        "plan_dir": str(root.resolve()),
        "budget_tokens": budget,
        "base_total_tokens": float(n_bar.sum()),
        "domains": domains,
        "objective": {"kind": objective, "description": DESCRIPTIONS[objective]},
        "base_objective": base_score,
        "seeds": plan["seeds"],
        "noise": noise,
        "significance": significance,
        "base_weights": plan["base_weights"],
        "base_tokens": {d: float(v) for d, v in zip(domains, n_bar)},
        "available_tokens": plan["available_tokens"],
        "world_size": plan["world_size"],
        "bounds": {"lower": lower, "upper": upper_user, "measured_range": list(measured), "max_epochs": max_epochs,
                   "upper_x": {d: float(u) for d, u in zip(domains, upper)}},
        "curves": curves,
        "held_domains": held,
        "bound_domains": bounds,
        "frozen_domains": sorted(set(held) | set(bounds)),
        "warnings": notes,
        "optimal_x": {d: float(v) for d, v in zip(domains, x_opt)},
        "optimal_tokens": {d: float(v) for d, v in zip(domains, counts)},
        "weights": {d: float(v) for d, v in zip(domains, weights)},
        "predicted_relative_objective": {"base": 1.0, "optimal": predicted},
        "settings": {g: {"domain": runs[0]["domain"], "factor": runs[0]["factor"],
                         "x": {d: float(np.mean([xs[r["name"]][i] for r in runs])) for i, d in enumerate(domains)},
                         "relative_objective": float(np.mean([rel[r["name"]] for r in runs]))}
                     for g, runs in by_group.items()},
        "runs": {r["name"]: {"group": r["group"], "seed": r["seed"], "objective": score[r["name"]],
                             "relative_objective": rel[r["name"]], "losses": meas[r["name"]].losses,
                             "tokens": meas[r["name"]].tokens, "out": r["out"]} for r in plan["runs"]},
    }
    write_weights_yaml(root / WEIGHTS_FILE, fit["weights"],
                       f"AutoScale DDO mixture at {budget:,.0f} tokens (megareweight mix fit {root})\n"
                       f"the full train config is {MIXTURE_CONFIG_FILE} beside this file")
    fit["mixture_config"] = write_target_config(
        root / MIXTURE_CONFIG_FILE, load_config(root / BASE_CONFIG_FILE), fit["weights"], int(budget),
        plan["world_size"], header=f"AutoScale DDO mixture at {budget:,.0f} tokens, from {root / FIT_FILE};\n"
                                   "train it and check the prediction with `megareweight mix validate`")
    write_json(root / FIT_FILE, fit)
    if plots:
        from megareweight.autoscale.plots import plot_fit

        plot_fit(fit, root)
    return fit


def load_fit(path: str | Path) -> dict[str, Any]:
    """A ``fit.json`` (or the plan directory holding it) written by this version of ``mix fit``."""
    p = Path(path)
    if p.is_dir():
        p = p / FIT_FILE
    fit = read_json(p, "fit file (run `megareweight mix fit` first)")
    if fit.get("version") != FIT_VERSION:
        raise WorkflowError(f"{p}: fit version {fit.get('version')!r}, this megareweight reads version {FIT_VERSION}; "
                            "run `megareweight mix fit` again")
    for key in ("budget_tokens", "domains", "optimal_tokens", "weights", "curves", "frozen_domains", "plan_dir"):
        if key not in fit:
            raise WorkflowError(f"{p}: missing key {key!r}; not a fit.json written by `megareweight mix fit`")
    fit["_path"] = str(p)
    return fit
