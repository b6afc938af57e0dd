"""PNG plots of a fit (points, replicas, curve, bounds, optimum) and of a validation (predicted vs actual)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from megareweight.mixing import PowerLaw


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _draw_domain(ax, fit: dict[str, Any], d: str) -> None:
    import matplotlib.ticker

    c = fit["curves"][d]
    xs = np.asarray(c["x"])
    x_opt = fit["optimal_x"][d]
    lo, hi = fit["bounds"]["lower"], fit["bounds"]["upper_x"][d]
    for rx, ry in zip(c["replica_x"], c["replica_relative_objective"]):
        ax.scatter(rx, ry, color="gray", s=12, zorder=2)
    ax.scatter(xs, c["relative_objective"], color="black", zorder=3, label="mean of seeds")
    if c["status"] == "held":
        ax.text(0.5, 0.92, "held at x = 1: " + c["reason"].split(":")[0], transform=ax.transAxes, ha="center",
                fontsize=7, wrap=True)
    else:
        law = PowerLaw(c["a"], c["b"], c["c"])
        grid = np.geomspace(max(min(xs.min(), lo) * 0.8, -c["a"] + 1e-3, 1e-3), max(xs.max(), hi) * 1.2, 200)
        ax.plot(grid, law(grid), color="tab:blue", label=f"(x{c['a']:+.3g})^-{c['b']:.3g} + {c['c']:.3g}")
    ax.axvspan(lo, hi, color="tab:green", alpha=0.06, label="DDO bounds")
    tag = f" ({c['bound']} bound)" if c.get("bound") else ""
    ax.axvline(x_opt, color="tab:red", ls="--", label=f"optimum x={x_opt:.3g}{tag}")
    if c.get("effect_se"):
        ax.set_title(f"{d}: effect {c['effect']:.3g} = {c['effect_z']:.1f} se", fontsize=9)
    else:
        ax.set_title(d, fontsize=9)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("x = domain tokens / base run's")
    ax.set_ylabel(f"{fit['objective']['kind']} / base run's")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)


def plot_fit(fit: dict[str, Any], out_dir: Path) -> list[Path]:
    """``fit_<domain>.png`` per domain and ``fit.png`` with all of them."""
    plt = _pyplot()
    domains = fit["domains"]
    paths = []
    for d in domains:
        fig, ax = plt.subplots(figsize=(5, 3.6))
        _draw_domain(ax, fit, d)
        fig.tight_layout()
        paths.append(out_dir / f"fit_{d}.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    cols = min(3, len(domains))
    rows = math.ceil(len(domains) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.5 * rows), squeeze=False)
    for ax, d in zip(axes.flat, domains):
        _draw_domain(ax, fit, d)
    for ax in list(axes.flat)[len(domains):]:
        ax.axis("off")
    fig.suptitle(f"AutoScale fits at {fit['budget_tokens']:,.0f} tokens ({len(fit['seeds'])} seed(s) per run)")
    fig.tight_layout()
    paths.append(out_dir / "fit.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


def plot_validation(result: dict[str, Any], out_dir: Path) -> Path:
    """``validation.png``: predicted against actual relative objective, plan settings and checked runs."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    s = result["plan_settings"]
    ax.scatter([p["predicted"] for p in s], [p["actual"] for p in s], color="gray", label="plan settings (seen)")
    r = result["runs"]
    se = result["mean"]["standard_error"]
    ax.scatter([p["predicted"] for p in r], [p["actual"] for p in r], color="tab:red", marker="x",
               label="checked runs (unseen)")
    ax.errorbar([result["mean"]["predicted"]], [result["mean"]["actual"]], yerr=None if se is None else [[2 * se]],
                color="tab:red", marker="o", capsize=4, label="their mean" + ("" if se is None else " +- 2 se"))
    values = [p["predicted"] for p in s + r] + [p["actual"] for p in s + r]
    lo, hi = min(values), max(values)
    pad = 0.1 * (hi - lo or 0.01)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="black", lw=0.8, label="actual = predicted")
    ax.set_xlabel(f"predicted {result['objective']['kind']} / base run's")
    ax.set_ylabel(f"actual {result['objective']['kind']} / base run's")
    ax.set_title("AutoScale: predicted vs actual", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "validation.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
