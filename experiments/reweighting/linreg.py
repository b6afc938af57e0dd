#!/usr/bin/env python
"""The seed paper's linear-regression check (Sow et al., ICLR 2025, convergence analysis and Fig. 7).

What the paper claims: its convergence analysis (convex, *interpolation* regime: one w* fits every
sample) says that down-weighting low-loss samples tightens the convergence bound of SGD, and its
Fig. 7 shows test loss vs steps on a toy regression where LinUpper converges fastest and
Quadratic also beats uniform (r = 1). This script makes that claim testable with the same
weighting code the trainer uses (:func:`megareweight.reweighting.compute_weights`).

Setup (streaming least squares, one fresh mini-batch per step, like single-pass pretraining):

* ``d = 50``, ``w*`` a random unit vector per seed, ``w_0 = 0``;
* samples of heterogeneous scale: ``x = s * g``, ``g ~ N(0, I_d)``, ``s`` in {0.25, 1, 2} with
  probabilities {0.5, 0.35, 0.15}. Half the stream is small-scale, low-loss, low-gradient
  "redundant" data; the large-scale samples carry most of the signal;
* targets ``y = x.w* + e``. Two regimes:
  - ``interpolation``: e = 0, the paper's theoretical setting;
  - ``noisy``: 20 % of samples get e ~ N(0, 2^2) (heterogeneous noise; outside the theory):
    late in training the highest-loss samples are the noisy ones, so up-weighting them
    should raise the error floor: the reason LinUpper caps weights instead of being linear;
* mini-batch G = 32, SGD ``w <- w - lr * sum_i w_i (x_i.w - y_i) x_i`` with weights
  ``w_i = compute_weights(l_i, strategy, r = 1, delta = 1)`` of the per-sample losses
  ``l_i = (x_i.w - y_i)^2 / 2`` (uniform: 1/G), every method with the same constant lr, for
  each lr of {0.01, 0.02, 0.04, 0.08, 0.16}: a weighting that mostly acts as a larger step size
  would win only at small lr and diverge first at large lr, so the sweep separates the two;
* metrics on 4,096 fixed noise-free test samples from the same mixture: test excess loss
  ``mean((x.(w - w*))^2) / 2`` and ``||w - w*||^2`` (the distance to the optimum). Speed: log10
  test loss at step 100, and (interpolation) steps to reach 1e-6; noisy regime: the error floor,
  mean over the last 10 % of steps;
* seeds 0..9: a seed fixes w*, the data stream and the test set; every method and lr sees the same
  stream, so differences are paired by seed (95 % t-intervals from :mod:`megareweight.stats`).

What the paper predicts: in the interpolation regime LinUpper converges fastest and Quadratic
beats uniform (Fig. 7). Its analysis says nothing about label noise; there one expects
up-weighting high-loss samples to cost a higher floor.

Usage (from the repository root): ``python experiments/reweighting/linreg.py`` (about 2-3 min on
2 CPU cores) writes ``linreg_results.json``, ``linreg.md`` and ``linreg.png`` here.
``tests/test_linreg_experiment.py`` runs a small version in ``make test``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from megareweight.reweighting import compute_weights  # noqa: E402
from megareweight.stats import mean_ci_bands, paired_diff  # noqa: E402

HERE = Path(__file__).resolve().parent
METHODS = ("uniform", "linupper", "quadratic", "extremes")
R, DELTA = 1.0, 1.0
LR = 0.02
LR_SWEEP = (0.01, 0.02, 0.04, 0.08, 0.16)


@dataclass(frozen=True)
class Regime:
    name: str
    noise_fraction: float
    noise_sd: float
    steps: int


REGIMES = (Regime("interpolation", 0.0, 0.0, 400), Regime("noisy", 0.2, 2.0, 1500))
DIM, BATCH, TEST_SAMPLES = 50, 32, 4096
SCALES, SCALE_PROBS = (0.25, 1.0, 2.0), (0.5, 0.35, 0.15)
EVAL_EVERY = 10


def _sample(rng: np.random.Generator, n: int, w_star: np.ndarray, regime: Regime) -> tuple[np.ndarray, np.ndarray]:
    s = rng.choice(SCALES, size=n, p=SCALE_PROBS)
    x = rng.standard_normal((n, DIM)) * s[:, None]
    noisy = rng.random(n) < regime.noise_fraction
    e = rng.standard_normal(n) * np.where(noisy, regime.noise_sd, 0.0)
    return x, x @ w_star + e


def sgd_run(seed: int, method: str, regime: Regime, lr: float = LR, steps: int | None = None) -> dict[str, np.ndarray]:
    """One run; returns ``{"step", "test_loss", "distance"}`` every ``EVAL_EVERY`` steps (and step 0)."""
    steps = steps or regime.steps
    setup = np.random.default_rng([seed, 0])
    w_star = setup.standard_normal(DIM)
    w_star /= np.linalg.norm(w_star)
    test_x = setup.choice(SCALES, size=TEST_SAMPLES, p=SCALE_PROBS)[:, None] * setup.standard_normal((TEST_SAMPLES, DIM))
    stream = np.random.default_rng([seed, 1])  # the same data for every method and lr
    w = np.zeros(DIM)
    rows = {"step": [], "test_loss": [], "distance": []}

    def record(step: int) -> None:
        diff = w - w_star
        rows["step"].append(step)
        rows["test_loss"].append(0.5 * float(np.mean((test_x @ diff) ** 2)))
        rows["distance"].append(float(diff @ diff))

    record(0)
    for step in range(1, steps + 1):
        x, y = _sample(stream, BATCH, w_star, regime)
        residual = x @ w - y
        if method == "uniform":
            weights = np.full(BATCH, 1.0 / BATCH)
        else:
            losses = torch.from_numpy(0.5 * residual**2)
            weights = compute_weights(losses, method, R, DELTA).double().numpy()
        w = w - lr * (weights * residual) @ x
        if not np.all(np.isfinite(w)) or float(w @ w) > 1e12:
            raise FloatingPointError(f"{method} diverged at step {step} (lr {lr}, seed {seed})")
        if step % EVAL_EVERY == 0:
            record(step)
    return {k: np.asarray(v) for k, v in rows.items()}


#: The step at which "speed" is read off (mid-convergence at lr 0.02 in both regimes).
EARLY_STEP = 100
#: Interpolation regime: steps to reach this test excess loss (w_0 = 0 starts at about 0.49).
TARGET = 1e-6


def metrics(run: dict[str, np.ndarray], regime: Regime) -> dict[str, float]:
    """The compared numbers of one run.

    * ``early_log10_loss``: log10 test excess loss at step ``EARLY_STEP`` (speed; losses span decades);
    * interpolation: ``steps_to_target``, first logged step with test loss <= ``TARGET`` (inf if
      never: then the run did not converge in the budget);
    * noisy: ``floor_loss`` and ``floor_distance``, mean over the last 10 % of the curve (the error
      floor of constant-step SGD; single points are jumpy).
    A diverged run has every value inf.
    """
    if run is None:
        return {k: math.inf for k in ("early_log10_loss", "steps_to_target", "floor_loss", "floor_distance")}
    early = int(np.nonzero(run["step"] == EARLY_STEP)[0][0])
    out = {"early_log10_loss": math.log10(max(float(run["test_loss"][early]), 1e-300))}
    if regime.noise_fraction == 0:
        hit = np.nonzero(run["test_loss"] <= TARGET)[0]
        out["steps_to_target"] = float(run["step"][hit[0]]) if hit.size else math.inf
    else:
        tail = max(1, len(run["step"]) // 10)
        out["floor_loss"] = float(np.mean(run["test_loss"][-tail:]))
        out["floor_distance"] = float(np.mean(run["distance"][-tail:]))
    return out


def _safe_run(seed: int, method: str, regime: Regime, lr: float, steps: int) -> dict[str, np.ndarray] | None:
    try:
        return sgd_run(seed, method, regime, lr, steps)
    except FloatingPointError:
        return None


def experiment(seeds: int, regimes=REGIMES, lrs=LR_SWEEP, steps: dict[str, int] | None = None) -> dict:
    """Every (regime, method, lr, seed): per-run metrics and paired comparisons vs uniform at the same lr."""
    out: dict = {}
    for regime in regimes:
        n_steps = (steps or {}).get(regime.name, regime.steps)
        runs = {(m, lr): [_safe_run(s, m, regime, lr, n_steps) for s in range(seeds)] for m in METHODS for lr in lrs}
        table: dict = {}
        for lr in lrs:
            base = [metrics(r, regime) for r in runs["uniform", lr]]
            for m in METHODS:
                mets = [metrics(r, regime) for r in runs[m, lr]]
                cell = {"diverged": sum(r is None for r in runs[m, lr])}
                for key in mets[0]:
                    vals = [x[key] for x in mets]
                    entry: dict = {"per_seed": vals, "median": float(np.median(vals))}
                    if all(math.isfinite(v) for v in vals):
                        entry["mean"] = float(np.mean(vals))
                        ref = [x[key] for x in base]
                        if m != "uniform" and all(math.isfinite(v) for v in ref):
                            diff = paired_diff(ref, vals)
                            entry["diff_vs_uniform"] = diff.to_dict()
                            entry["verdict"] = diff.verdict(a="uniform", b=m)
                    cell[key] = entry
                table.setdefault(str(lr), {})[m] = cell
        curves = {m: {"step": next(r for r in runs[m, LR] if r is not None)["step"].tolist(),
                      "test_loss": [r["test_loss"].tolist() for r in runs[m, LR] if r is not None]} for m in METHODS}
        out[regime.name] = {"regime": regime.__dict__ | {"steps": n_steps}, "table": table, "curves": curves}
    return out


METRIC_TITLES = {
    "early_log10_loss": f"log10 test excess loss at step {EARLY_STEP} (speed)",
    "steps_to_target": f"steps to test excess loss <= {TARGET:g}",
    "floor_loss": "error floor: test excess loss, mean of the last 10 % of steps",
    "floor_distance": "error floor: ||w - w*||^2, mean of the last 10 % of steps",
}


def markdown(results: dict, seeds: int) -> str:
    lines = []
    for name, res in results.items():
        reg = res["regime"]
        noise = "none" if reg["noise_fraction"] == 0 else f"{reg['noise_fraction']:.0%} of samples with sd {reg['noise_sd']:g}"
        lines += [f"### {name} regime ({reg['steps']} steps; label noise: {noise}; {seeds} seeds)", ""]
        keys = [k for k in METRIC_TITLES if k in next(iter(next(iter(res["table"].values())).values()))]
        for key in keys:
            lines += [f"{METRIC_TITLES[key]}: mean over seeds; method - uniform at the same lr, paired by seed, "
                      "95 % t-interval; lower is better:", "",
                      "| lr | " + " | ".join(METHODS) + " |", "|---" * (len(METHODS) + 1) + "|"]
            for lr, row in res["table"].items():
                cells = [lr]
                for m in METHODS:
                    c = row[m]
                    e = c[key]
                    if c["diverged"]:
                        cells.append(f"diverged ({c['diverged']}/{seeds})")
                    elif "mean" not in e:
                        cells.append(f"median {e['median']:g} (some runs never reached it)")
                    elif "diff_vs_uniform" in e:
                        d = e["diff_vs_uniform"]
                        cells.append(f"{e['mean']:.4g} ({d['mean']:+.3g} [{d['low']:+.3g}, {d['high']:+.3g}]; {e['verdict']})")
                    else:
                        cells.append(f"{e['mean']:.4g}")
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
            if key == "steps_to_target":
                lines += ["Each method at its best lr of the grid (fewest mean steps): " + ", ".join(
                    f"{m} {lr} ({steps:.0f} steps)" for m, (lr, steps) in best_lr(res["table"], key).items()), ""]
    return "\n".join(lines)


def best_lr(table: dict, key: str) -> dict[str, tuple[str, float]]:
    """Per method, the lr with the lowest mean ``key`` over seeds (runs that all finished only):
    whether a method's advantage survives tuning the step size for every method."""
    best = {}
    for m in METHODS:
        options = [(lr, row[m][key]["mean"]) for lr, row in table.items() if "mean" in row[m][key]]
        if options:
            best[m] = min(options, key=lambda o: o[1])
    return best


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip(METHODS, ("tab:blue", "tab:orange", "tab:green", "tab:red")))
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2), squeeze=False)
    for ax, (name, res) in zip(axes[0], results.items()):
        for m, curve in res["curves"].items():
            ys = np.log10(np.maximum(np.asarray(curve["test_loss"]), 1e-300))
            mean, lo, hi = mean_ci_bands(ys)
            ax.plot(curve["step"], 10**mean, color=colors[m], label=f"{m} ({len(ys)} seeds)")
            ax.fill_between(curve["step"], 10**lo, 10**hi, color=colors[m], alpha=0.2)
        ax.set_yscale("log")
        ax.set_title(f"{name}: test excess loss (lr {LR}, r {R})")
        ax.set_xlabel("SGD step (batch 32)")
        ax.set_ylabel("geometric mean over seeds, 95 % CI band")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--out", default=str(HERE))
    args = ap.parse_args()
    if args.seeds < 2:
        ap.error("--seeds must be >= 2 (paired intervals)")
    torch.set_num_threads(1)
    start = time.time()
    results = experiment(args.seeds)
    seconds = time.time() - start
    out = Path(args.out)
    machine = f"{platform.machine()} {os.cpu_count()}-core CPU, no GPU"
    (out / "linreg_results.json").write_text(json.dumps(
        {"command": "python experiments/reweighting/linreg.py", "machine": machine, "seconds": seconds,
         "seeds": args.seeds, "r": R, "delta": DELTA, "lr": LR, "lr_sweep": LR_SWEEP, "dim": DIM, "batch": BATCH,
         "scales": SCALES, "scale_probs": SCALE_PROBS, "results": results}, indent=1) + "\n")
    header = (f"# Linear regression: uniform vs LinUpper vs Quadratic vs Extremes (r = {R}, delta = {DELTA})\n\n"
              f"Generated by `python experiments/reweighting/linreg.py` in {seconds:.0f} s on {machine}.\n\n")
    (out / "linreg.md").write_text(header + markdown(results, args.seeds))
    plot(results, out / "linreg.png")
    print((out / "linreg.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
