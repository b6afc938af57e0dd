"""``mix validate``: does the fitted model predict a run it has not seen?

The fitted model is AutoScale's additive one, relative to the base run:

    L(x) / L(base) = 1 + sum_i [ f_i(x_i) - f_i(1) ],   f_i(x) = (x + a_i)^(-b_i) + c_i,

with held domains contributing nothing (their curve is unknown; they were pinned at x = 1). For a
trained run of the DDO mixture (``mixture_config.yaml`` written by ``mix fit``), or of any mixture
of the same domains, the prediction is made at the run's *actual* per-domain amounts (its
``tokens_per_domain`` over the base replicas' mean), and compared with its actual score, on the
fit's objective, divided by the fit's base score.

Pairing. A run trained with one of the plan's seeds is compared with the base replica of that
seed (same initialisation, same sampler seed): ``actual = score(run) / score(base, same seed)``.
The seed effect then cancels, and the fit's noise estimate (the per-run residual with seeds as
blocks, ``sd``) applies: the standard error of the mean miss of ``n`` paired runs is
``sd * sqrt(2 / n)``. A run with another seed is compared with the mean of the base replicas; that
comparison also carries the seed effect, which ``sd`` leaves out, so its standard error
``sd * sqrt(1/n + 1/K)`` is a lower bound (noted in the output). The fit's own parameters are
noisy too, so even paired, a miss within 2 standard errors is consistent with the model and a
larger one is evidence against it, not proof. The same prediction is computed for the plan's own
settings, whose amounts the model saw (off-axis deviations included), as a reference.

Outputs: ``validation.json`` and ``validation.png`` (predicted against actual) in the plan directory
or ``--out``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from megareweight.autoscale.files import VALIDATION_FILE, WorkflowError, write_json
from megareweight.autoscale.fit import load_fit
from megareweight.autoscale.measure import measure_run
from megareweight.config import load_config
from megareweight.mixing import PowerLaw, run_objective


def predict_relative(fit: dict[str, Any], x: dict[str, float]) -> float:
    """The fitted model's relative objective at per-domain amounts ``x`` (multiples of the base run's)."""
    total = 1.0
    for d in fit["domains"]:
        c = fit["curves"][d]
        if c["status"] == "fitted":
            law = PowerLaw(c["a"], c["b"], c["c"])
            total += float(law(x[d]) - law(1.0))
    return total


def validate_fit(plan_dir: str | Path, run_dirs: Sequence[str | Path], *, out_dir: Optional[str | Path] = None,
                 plots: bool = True) -> dict[str, Any]:
    """Compare the fit of ``plan_dir`` with the finished runs ``run_dirs``; write and return the result."""
    if not run_dirs:
        raise WorkflowError("give at least one trained run directory to validate against")
    fit = load_fit(plan_dir)
    domains = fit["domains"]
    kind = fit["objective"]["kind"]
    lo, hi = fit["bounds"]["measured_range"]
    n_bar = fit["base_tokens"]
    base_by_seed = {r["seed"]: r["objective"] for r in fit["runs"].values() if r["group"] == "base"}
    rows, notes = [], []
    for run_dir in run_dirs:
        m = measure_run(run_dir, domains)
        x = {d: m.tokens[d] / n_bar[d] for d in domains}
        seed = _run_seed(Path(run_dir))
        paired = seed in base_by_seed
        base = base_by_seed[seed] if paired else fit["base_objective"]
        actual = run_objective([m.losses[d] for d in domains], kind) / base
        predicted = predict_relative(fit, x)
        outside = [d for d in domains if not lo * 0.95 <= x[d] <= hi * 1.05]
        if outside:
            notes.append(f"{run_dir}: x outside the measured range [{lo:g}, {hi:g}] for {', '.join(outside)}: "
                         "the prediction extrapolates the fitted curves")
        mixture = _run_mixture(Path(run_dir))
        if mixture is not None:
            gap = max(abs(mixture.get(d, 0.0) - fit["weights"][d]) for d in domains)
            if gap > 1e-6:
                notes.append(f"{run_dir}: its mixture is not the fit's DDO mixture (largest weight difference {gap:.3g})")
        rows.append({"run": str(run_dir), "seed": seed, "paired_with_base_seed": paired, "x": x, "tokens": m.tokens,
                     "losses": m.losses, "predicted": predicted, "actual": actual, "difference": actual - predicted})
    noise = fit.get("noise")
    n, k = len(rows), len(fit["seeds"])
    all_paired = all(r["paired_with_base_seed"] for r in rows)
    mean_pred = float(np.mean([r["predicted"] for r in rows]))
    mean_act = float(np.mean([r["actual"] for r in rows]))
    if noise is None:
        se = None
    elif all_paired:
        se = noise["sd"] * math.sqrt(2.0 / n)
    else:
        se = noise["sd"] * math.sqrt(1.0 / n + 1.0 / k)
        notes.append("some runs use a seed the plan's base run does not have: compared with the mean base run, "
                     "whose seed effect the standard error leaves out (it is a lower bound)")
    diff = mean_act - mean_pred
    if se is None:
        verdict = "no seed noise estimate (the fit used one seed): cannot say whether the miss is noise"
    elif abs(diff) <= 2 * se:
        verdict = f"actual within 2 standard errors of the prediction ({diff:+.4g}, se {se:.3g})"
    else:
        verdict = f"actual {'worse' if diff > 0 else 'better'} than predicted by {abs(diff) / se:.1f} standard errors " \
                  f"({diff:+.4g}, se {se:.3g}): the fitted model does not hold at this mixture"
    settings = []
    for g, s in fit["settings"].items():
        settings.append({"setting": g, "predicted": predict_relative(fit, s["x"]), "actual": s["relative_objective"]})
    result = {
        "version": 1,
        "fit": fit["_path"],
        "objective": fit["objective"],
        "runs": rows,
        "mean": {"predicted": mean_pred, "actual": mean_act, "difference": diff, "standard_error": se,
                 "paired": all_paired,
                 "predicted_gain": 1.0 - mean_pred, "actual_gain": 1.0 - mean_act},
        "verdict": verdict,
        "plan_settings": settings,
        "warnings": notes,
    }
    out = Path(out_dir) if out_dir is not None else Path(fit["_path"]).parent
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / VALIDATION_FILE, result)
    if plots:
        from megareweight.autoscale.plots import plot_validation

        plot_validation(result, out)
    return result


def _run_config(run_dir: Path):
    try:
        return load_config(run_dir / "config.yaml")
    except ValueError:         # missing or unreadable: the comparison still works, unpaired
        return None


def _run_seed(run_dir: Path) -> Optional[int]:
    cfg = _run_config(run_dir)
    return None if cfg is None else cfg.train.seed


def _run_mixture(run_dir: Path) -> Optional[dict[str, float]]:
    """The ``data.mixture`` a run trained on, when it was an explicit mapping."""
    cfg = _run_config(run_dir)
    return cfg.data.mixture if cfg is not None and isinstance(cfg.data.mixture, dict) else None
