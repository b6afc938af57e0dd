"""The AutoScale workflow around training runs: plan -> run -> fit -> extrapolate.

The library pieces (power-law fits, DDO, extrapolation) live in the sibling modules; this module
turns them into files on disk, so each stage can run on a different machine or day:

``make_plan``
    The base run trains on mixture ``w`` for ``B`` tokens, i.e. ``n_i = w_i * B`` tokens of each
    domain. AutoScale (Kang et al., 2024; DESIGN.md) perturbs ONE domain at a time: for every
    domain ``i`` and factor ``f != 1`` a run trains on ``f * n_i`` tokens of domain ``i`` and
    ``n_j`` of every other domain. The total of such a run is therefore NOT ``B``
    (``B + (f - 1) n_i``): that is how AutoScale does it, the ``x_i`` of the loss model being
    "domain ``i``'s data as a multiple of the base run's". Each run's config gets
    ``data.mixture`` = its normalised counts, ``data.train_domains`` = the base's domains, and
    ``train.max_steps = round(total / tokens_per_step)``. Step rounding changes the totals a
    little; ``plan.json`` records the planned and the actually trained (expected) tokens, and the
    fit uses the actual ones for the scaled domain. Rounding also moves the OTHER domains of a
    perturbed run by up to half a step's worth of tokens; the fit ignores that (it assumes only
    the scaled domain changed). Budgets whose runs are whole numbers of steps avoid it.
``run_plan``
    Trains the runs one after another; a run whose ``summary.json`` exists for the same config is
    skipped, an interrupted one resumes from its last checkpoint. Or lists the commands instead.
``fit_plan``
    The loss of a run is its final average validation loss over the trained domains
    (``avg_trained`` of ``eval.jsonl``) DIVIDED BY THE BASE RUN'S, as AutoScale's notebook does
    (it used perplexity / base perplexity). Relative losses keep the power law well posed: the
    model ``(x + a)^(-b) + c`` has no amplitude factor, so raw losses of ~3-7 nats often cannot be
    interpolated. Per domain the points are ``x = actual domain-i tokens / base domain-i tokens``
    of the base run (x = 1) and of the runs that scaled domain ``i``. Then DDO finds the optimal
    amounts at the base budget (``sum_i n_i x_i = B``; with a uniform base that is AutoScale's
    ``sum_i x_i = m`` and :func:`~megareweight.mixing.solve_ddo` is used as is; with a non-uniform
    base the same KKT solution is computed with each domain's token price ``n_i``, see
    :func:`solve_ddo_tokens`). Bounds: ``x_i >= min_x`` (default 0.01, so no domain is dropped
    entirely and the geometric extrapolation stays defined) and ``x_i <= max_epochs * D_i / n_i``
    (the domain's ``D_i`` training tokens repeated at most ``max_epochs`` times).
``extrapolate_fits``
    With the optimal counts ``N(1)``, ``N(2)`` of two fits (smaller budget first),
    :func:`~megareweight.mixing.extrapolate_to` predicts ``N`` at a target budget, capped by
    availability.

Outputs are plain JSON/YAML; ``weights.yaml`` is a ``{domain: weight}`` mapping that can be
pasted under ``data.mixture`` or passed as ``--set "data.mixture=$(cat weights.yaml)"``.
"""
from __future__ import annotations

import json
import math
import shlex
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import yaml

from megareweight.config import ExperimentConfig, config_from_dict, dump_config, load_config
from megareweight.mixing.ddo import ddo_objective, solve_ddo
from megareweight.mixing.errors import FitError, MixingError, MixingWarning
from megareweight.mixing.extrapolate import DEFAULT_MAX_EPOCHS, extrapolate_to
from megareweight.mixing.powerlaw import PowerLaw, fit_domain_curves

PLAN_FILE = "plan.json"
FIT_FILE = "fit.json"
WEIGHTS_FILE = "weights.yaml"
EXTRAPOLATION_FILE = "extrapolation.json"
DEFAULT_FACTORS = (0.2, 1.0, 3.0)
DEFAULT_MIN_X = 0.01


class WorkflowError(MixingError):
    """A plan directory, run output or fit file is missing, unfinished or inconsistent."""


# --- small helpers --------------------------------------------------------------------------------

_SUFFIXES = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_tokens(text: str | float | int, what: str = "tokens") -> int:
    """``"200k"``, ``"1.5M"``, ``"2e6"`` or ``300000`` -> a positive integer token count."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        s = str(text).strip().lower().replace("_", "").replace(",", "")
        scale = 1.0
        if s and s[-1] in _SUFFIXES:
            scale, s = _SUFFIXES[s[-1]], s[:-1]
        try:
            value = float(s) * scale
        except ValueError:
            raise WorkflowError(f"{what}: cannot read {text!r} as a token count (e.g. 200000, 200k, 1.5M)") from None
    if not math.isfinite(value) or value < 1:
        raise WorkflowError(f"{what}: must be a token count >= 1, got {text!r}")
    return int(round(value))


def parse_factors(text: str | Sequence[float]) -> list[float]:
    """``"0.2,1,3"`` -> ``[0.2, 1.0, 3.0]``: distinct positive factors, 1 added if missing.

    At least two factors other than 1 are needed: with the base run that gives each domain the
    3 points a 3-parameter power law needs.
    """
    if isinstance(text, str):
        parts = [p for p in text.replace(" ", "").split(",") if p]
        try:
            factors = [float(p) for p in parts]
        except ValueError:
            raise WorkflowError(f"--factors: expected comma-separated numbers like 0.2,1,3, got {text!r}") from None
    else:
        factors = [float(f) for f in text]
    if any(not math.isfinite(f) or f <= 0 for f in factors):
        raise WorkflowError(f"--factors: every factor must be a finite number > 0, got {factors}")
    if len(set(factors)) != len(factors):
        raise WorkflowError(f"--factors: factors must be distinct, got {factors}")
    if 1.0 not in factors:
        factors.append(1.0)
    if len(factors) < 3:
        raise WorkflowError(f"--factors: need at least two factors besides 1 (3 points per domain), got {sorted(factors)}")
    return sorted(factors)


def _fmt_factor(f: float) -> str:
    return f"{f:g}"


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise WorkflowError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise WorkflowError(f"{path}: not valid JSON ({exc})") from None


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def write_weights_yaml(path: Path, weights: dict[str, float], header: str = "") -> None:
    """``{domain: weight}`` as YAML (full precision, so the weights sum to 1 as the config requires)."""
    lines = [f"# {line}" for line in header.splitlines()] if header else []
    text = yaml.safe_dump({d: float(w) for d, w in weights.items()}, sort_keys=False)
    path.write_text("\n".join(lines) + ("\n" if lines else "") + text)


# --- plan -----------------------------------------------------------------------------------------

def _base_domains(cfg: ExperimentConfig) -> tuple[list[str], dict[str, float], dict[str, int]]:
    """Trained domains, their base weights and their available training tokens (from the manifest)."""
    from megareweight.data.shards import PreparedData
    from megareweight.train.loop import plan_domains

    if not cfg.data.prepared:
        raise WorkflowError("data.prepared: the base config must name a prepared directory")
    data = PreparedData.open(cfg.data.prepared)
    dp = plan_domains(cfg, data)
    available = {d: int(data.manifest["domains"][d]["train"]["tokens"]) for d in dp.train}
    return list(dp.train), dict(dp.weights), available


def run_name(domain: Optional[str], factor: float) -> str:
    return "base" if domain is None else f"{domain}-x{_fmt_factor(factor)}"


def make_plan(base: ExperimentConfig | str | Path, budget_tokens: int | str, out_dir: str | Path,
              factors: Sequence[float] | str = DEFAULT_FACTORS, overrides: Sequence[str] = (),
              world_size: int = 1, force: bool = False) -> dict[str, Any]:
    """Write the 2m+1 run configs (``configs/<run>.yaml``) and ``plan.json`` under ``out_dir``.

    ``base`` is a config (or a YAML path, with ``overrides``); its mixture is the base mixture and
    its trained domains are the ones perturbed. ``world_size`` is the number of data-parallel
    ranks the runs will use (it sets the tokens per step). Returns the plan dictionary.
    """
    cfg = base if isinstance(base, ExperimentConfig) else load_config(base, list(overrides))
    budget = parse_tokens(budget_tokens, "--budget")
    factor_list = parse_factors(factors)
    if isinstance(world_size, bool) or int(world_size) != world_size or world_size < 1:
        raise WorkflowError(f"--world-size must be an integer >= 1, got {world_size!r}")
    domains, weights, available = _base_domains(cfg)
    zero = [d for d in domains if weights[d] <= 0]
    if zero:
        raise WorkflowError(f"data.mixture: the base mixture gives domain {zero[0]!r} weight 0; "
                            "AutoScale scales each domain's base amount, so every trained domain needs a positive weight")
    tps = cfg.data.seq_len * cfg.data.micro_batch_size * cfg.train.gradient_accumulation_steps * int(world_size)
    base_counts = {d: weights[d] * budget for d in domains}

    out = Path(out_dir)
    runs = []
    specs: list[tuple[Optional[str], float]] = [(None, 1.0)]
    specs += [(d, f) for d in domains for f in factor_list if f != 1.0]
    for domain, factor in specs:
        counts = {d: base_counts[d] * (factor if d == domain else 1.0) for d in domains}
        total = sum(counts.values())
        steps = int(round(total / tps))
        if steps < 1:
            raise WorkflowError(f"--budget {budget}: run {run_name(domain, factor)} would train {total:.0f} tokens, "
                                f"less than one step ({tps} tokens); raise the budget")
        mixture = {d: counts[d] / total for d in domains}
        actual_total = steps * tps
        name = run_name(domain, factor)
        raw = cfg.to_dict()
        raw["data"]["mixture"] = mixture
        raw["data"]["train_domains"] = list(domains)
        raw["train"]["max_steps"] = steps
        if raw["train"]["eval_interval"] >= steps:
            raw["train"]["eval_interval"] = 0
        raw["wandb"]["name"] = f"mix-{name}"
        run_cfg = config_from_dict(raw)
        runs.append({
            "name": name,
            "domain": domain,
            "factor": factor,
            "config": f"configs/{name}.yaml",
            "out": f"runs/{name}",
            "steps": steps,
            "planned_tokens": {d: float(c) for d, c in counts.items()},
            "tokens": int(actual_total),
            "domain_tokens": {d: float(mixture[d] * actual_total) for d in domains},
            "epochs": {d: float(mixture[d] * actual_total / available[d]) if available[d] else float("inf")
                       for d in domains},
            "_cfg": run_cfg,
        })
    plan = {
        "version": 1,
        "method": "AutoScale (Kang et al., 2024): base run + each domain scaled by each factor, others unchanged",
        "budget_tokens": budget,
        "factors": factor_list,
        "domains": domains,
        "base_weights": weights,
        "base_tokens": {d: float(c) for d, c in base_counts.items()},
        "available_tokens": available,
        "tokens_per_step": tps,
        "world_size": int(world_size),
        "prepared": cfg.data.prepared,
        "runs": [{k: v for k, v in r.items() if k != "_cfg"} for r in runs],
    }
    plan_path = out / PLAN_FILE
    if plan_path.is_file() and not force:
        old = _read_json(plan_path, "plan")
        if old != json.loads(json.dumps(plan)):
            raise WorkflowError(f"{plan_path}: a different plan is already there; use another --out or --force")
    (out / "configs").mkdir(parents=True, exist_ok=True)
    for r in runs:
        dump_config(r["_cfg"], out / r["config"])
    _write_json(plan_path, plan)
    return plan


def load_plan(plan_dir: str | Path) -> dict[str, Any]:
    plan = _read_json(Path(plan_dir) / PLAN_FILE, "plan (run `megareweight mix plan` first)")
    for key in ("budget_tokens", "domains", "runs", "tokens_per_step", "base_tokens", "available_tokens"):
        if key not in plan:
            raise WorkflowError(f"{Path(plan_dir) / PLAN_FILE}: missing key {key!r}")
    return plan


# --- run ------------------------------------------------------------------------------------------

def _same_config(path: Path, cfg: ExperimentConfig) -> bool:
    """Whether the config a run saved equals ``cfg`` (both with defaults filled in, so a field added
    to the config schema later does not make finished runs look different)."""
    try:
        return load_config(path).to_dict() == cfg.to_dict()
    except ValueError:  # ConfigError (e.g. a key that no longer exists) or unreadable YAML
        return False


def run_status(plan_dir: str | Path, run: dict[str, Any]) -> str:
    """``"done"`` (summary for this very config), ``"partial"`` (started) or ``"todo"``."""
    root = Path(plan_dir)
    out = root / run["out"]
    if (out / "summary.json").is_file():
        cfg = load_config(root / run["config"])
        if not _same_config(out / "config.yaml", cfg):
            raise WorkflowError(f"{out}: finished with a different config than {root / run['config']}; "
                                "delete that run directory to retrain it")
        return "done"
    return "partial" if out.exists() else "todo"


def run_commands(plan_dir: str | Path, launcher: str = "megareweight train", only_pending: bool = True) -> list[str]:
    """One shell command per run (pending ones only by default), for a cluster or by hand."""
    root = Path(plan_dir)
    plan = load_plan(root)
    cmds = []
    for run in plan["runs"]:
        if only_pending and run_status(root, run) == "done":
            continue
        cmds.append(f"{launcher} --config {shlex.quote(str(root / run['config']))} "
                    f"--out {shlex.quote(str(root / run['out']))} --resume")
    return cmds


def run_plan(plan_dir: str | Path, progress: bool = True,
             train_fn: Optional[Callable[..., Any]] = None) -> dict[str, str]:
    """Train every run of the plan in order; finished runs are skipped, partial ones resumed.

    Returns ``{run name: "skipped" | "trained"}``.
    """
    root = Path(plan_dir)
    plan = load_plan(root)
    if train_fn is None:
        from megareweight.train.loop import train as train_fn
    result = {}
    for k, run in enumerate(plan["runs"], 1):
        status = run_status(root, run)
        if status == "done":
            if progress:
                print(f"[mix] {k}/{len(plan['runs'])} {run['name']}: finished earlier, skipped")
            result[run["name"]] = "skipped"
            continue
        cfg = load_config(root / run["config"])
        if progress:
            verb = "resuming" if status == "partial" else "training"
            print(f"[mix] {k}/{len(plan['runs'])} {run['name']}: {verb} {run['steps']} steps, {run['tokens']:,} tokens")
        train_fn(cfg, root / run["out"], resume=True, progress=progress)
        result[run["name"]] = "trained"
    return result


# --- fit ------------------------------------------------------------------------------------------

def final_eval(run_dir: str | Path, steps: Optional[int] = None) -> dict[str, Any]:
    """The last row of a run's ``eval.jsonl`` (checked to be at ``steps`` when given)."""
    path = Path(run_dir) / "eval.jsonl"
    if not path.is_file():
        raise WorkflowError(f"{path}: not found; the run has not finished (train it with `megareweight mix run`)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise WorkflowError(f"{path}: empty; the run has not finished")
    last = rows[-1]
    if steps is not None and last.get("step") != steps:
        raise WorkflowError(f"{path}: last evaluation at step {last.get('step')}, the plan has {steps} steps; "
                            "the run has not finished")
    return last


def run_loss(row: dict[str, Any], domains: Sequence[str], where: str = "") -> float:
    """Mean final validation loss over ``domains`` (the trained ones)."""
    missing = [d for d in domains if f"loss/{d}" not in row]
    if missing:
        raise WorkflowError(f"{where}: no validation loss for domain {missing[0]!r}")
    values = [float(row[f"loss/{d}"]) for d in domains]
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise WorkflowError(f"{where}: non-finite or non-positive validation loss {values}")
    return float(np.mean(values))


def solve_ddo_tokens(fits: Sequence[PowerLaw], unit_tokens: Sequence[float], budget_tokens: float,
                     lower: Any = 0.0, upper: Any = None) -> np.ndarray:
    """DDO when the budget is in tokens and ``x_i`` in units of ``unit_tokens[i]``.

    Minimises ``sum_i (x_i + a_i)^(-b_i)`` subject to ``sum_i n_i x_i = budget_tokens`` and
    ``lower <= x <= upper``: :func:`solve_ddo` with costs ``n_i``. With equal ``n_i`` this is
    AutoScale's ``sum x = m`` for a uniform base.
    """
    n = np.asarray(unit_tokens, dtype=float)
    if n.shape != (len(fits),) or not np.all(np.isfinite(n)) or (n <= 0).any():
        raise MixingError(f"unit_tokens must hold one positive count per fit, got {n.tolist()}")
    return solve_ddo(fits, budget_tokens, lower, upper, costs=n)


def fit_plan(plan_dir: str | Path, *, min_x: float = DEFAULT_MIN_X, max_epochs: float = DEFAULT_MAX_EPOCHS,
             plots: bool = True, hold_unfit: bool = False) -> dict[str, Any]:
    """Fit the per-domain curves from the finished runs, solve DDO, write ``fit.json`` + ``weights.yaml``.

    A domain whose runs show no loss decrease as its data grows cannot be fitted (noise, or runs
    too short for data to matter). By default that is a :class:`FitError`; with ``hold_unfit``
    such domains are held at their base amount (``x = 1``) and DDO optimises the others; they are
    listed under ``held_domains`` in ``fit.json`` and their ``curves`` entry has ``held: true``.

    Returns the content of ``fit.json``.
    """
    root = Path(plan_dir)
    plan = load_plan(root)
    if not math.isfinite(min_x) or min_x < 0:
        raise WorkflowError(f"--min-x must be a number >= 0, got {min_x!r}")
    if not math.isfinite(max_epochs) or max_epochs <= 0:
        raise WorkflowError(f"--max-epochs must be a number > 0, got {max_epochs!r}")
    domains: list[str] = plan["domains"]
    runs = plan["runs"]
    base = next((r for r in runs if r["domain"] is None), None)
    if base is None:
        raise WorkflowError(f"{root / PLAN_FILE}: no base run")
    losses = {}
    for r in runs:
        row = final_eval(root / r["out"], r["steps"])
        losses[r["name"]] = run_loss(row, domains, str(root / r["out"] / "eval.jsonl"))
    base_loss = losses[base["name"]]
    base_dom = np.array([base["domain_tokens"][d] for d in domains])

    xs, ys, used = [], [], []
    for i, d in enumerate(domains):
        pts = [(1.0, 1.0, base["name"])]
        for r in runs:
            if r["domain"] == d:
                pts.append((r["domain_tokens"][d] / base_dom[i], losses[r["name"]] / base_loss, r["name"]))
        pts.sort()
        if len(pts) < 3:
            raise WorkflowError(f"domain {d!r}: only {len(pts)} runs (need the base and two perturbed runs)")
        xs.append([p[0] for p in pts])
        ys.append([p[1] for p in pts])
        used.append([p[2] for p in pts])
    fits: list[PowerLaw] = []
    held: dict[str, str] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MixingWarning)
        for i, d in enumerate(domains):
            try:
                fits.append(fit_domain_curves([xs[i]], [ys[i]], names=[d])[0])
            except FitError as exc:
                if not hold_unfit:
                    raise FitError(f"{exc} (relative losses; the runs may be too short or too noisy to show "
                                   "a data effect: raise the budget or widen the factors, or pass --hold-unfit "
                                   "to keep such domains at their base amount)") from None
                held[d] = str(exc)
                fits.append(PowerLaw(0.0, 1.0, 0.0))       # placeholder; the domain is pinned at x = 1
    fit_warnings = [str(w.message) for w in caught if issubclass(w.category, MixingWarning)]
    fit_warnings += [f"held at the base amount (no usable fit): {msg}" for msg in held.values()]
    if len(held) == len(domains):
        raise FitError("no domain could be fitted: " + "; ".join(held.values()))
    available = np.array([plan["available_tokens"][d] for d in domains], dtype=float)
    upper = max_epochs * available / base_dom
    pinned = np.array([d in held for d in domains])
    lower = np.where(pinned, 1.0, min_x)
    upper = np.where(pinned, 1.0, upper)
    budget_actual = float(base_dom.sum())
    x_opt = solve_ddo_tokens(fits, base_dom, budget_actual, lower=lower, upper=upper)
    counts = x_opt * base_dom
    budget = float(plan["budget_tokens"])
    counts = counts * (budget / counts.sum())
    weights = counts / counts.sum()
    x_base = np.ones(len(domains))
    fit = {
        "version": 1,
        "plan_dir": str(root.resolve()),
        "budget_tokens": budget,
        "budget_tokens_trained_by_base": budget_actual,
        "domains": domains,
        "loss": "final mean validation loss over the trained domains / the base run's",
        "base_loss": base_loss,
        "base_weights": plan["base_weights"],
        "base_tokens": {d: float(v) for d, v in zip(domains, base_dom)},
        "available_tokens": plan["available_tokens"],
        "bounds": {"min_x": min_x, "max_epochs": max_epochs,
                   "upper_x": {d: float(u) for d, u in zip(domains, upper)}},
        "curves": {d: ({"held": True, "error": held[d], "x": xs[i], "relative_loss": ys[i], "runs": used[i]}
                       if d in held else
                       {"a": f.a, "b": f.b, "c": f.c, "x": xs[i], "relative_loss": ys[i],
                        "runs": used[i], "residuals": list(f.residuals), "rmse": f.rmse})
                   for i, (d, f) in enumerate(zip(domains, fits))},
        "held_domains": sorted(held),
        "warnings": fit_warnings,
        "optimal_x": {d: float(v) for d, v in zip(domains, x_opt)},
        "optimal_tokens": {d: float(v) for d, v in zip(domains, counts)},
        "weights": {d: float(v) for d, v in zip(domains, weights)},
        "predicted_objective": {  # sum of the fitted domains' terms (x + a)^(-b); held domains excluded
            "base": ddo_objective([f for f, p in zip(fits, pinned) if not p], x_base[~pinned]),
            "optimal": ddo_objective([f for f, p in zip(fits, pinned) if not p], x_opt[~pinned])},
        "runs": {r["name"]: {"relative_loss": losses[r["name"]] / base_loss, "loss": losses[r["name"]],
                             "tokens": r["tokens"], "out": r["out"]} for r in runs},
    }
    _write_json(root / FIT_FILE, fit)
    write_weights_yaml(root / WEIGHTS_FILE, fit["weights"],
                       f"AutoScale DDO mixture at {budget:,.0f} tokens (megareweight mix fit {root})\n"
                       "use as data.mixture, e.g. --set \"data.mixture=$(cat weights.yaml)\"")
    if plots:
        plot_fit(fit, root)
    return fit


def plot_fit(fit: dict[str, Any], out_dir: Path) -> list[Path]:
    """One PNG per domain (``fit_<domain>.png``: points, fitted curve, optimum) and ``fit.png`` (all)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = fit["domains"]
    paths = []

    def draw(ax, d: str) -> None:
        c = fit["curves"][d]
        xs = np.asarray(c["x"])
        x_opt = fit["optimal_x"][d]
        if c.get("held"):
            ax.text(0.5, 0.9, "no usable fit: held at x = 1", transform=ax.transAxes, ha="center", fontsize=8)
        else:
            law = PowerLaw(c["a"], c["b"], c["c"])
            hi = max(xs.max(), x_opt) * 1.3
            lo = max(min(xs.min(), x_opt) * 0.5, -c["a"] + 1e-3, 1e-3)
            grid = np.geomspace(lo, hi, 200)
            ax.plot(grid, law(grid), color="tab:blue", label=f"(x{c['a']:+.3g})^-{c['b']:.3g} + {c['c']:.3g}")
        ax.scatter(xs, c["relative_loss"], color="black", zorder=3, label="runs")
        ax.axvline(x_opt, color="tab:red", ls="--", label=f"DDO optimum x={x_opt:.3g}")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(d)
        ax.set_xlabel("x = domain tokens / base run's")
        ax.set_ylabel("val loss / base run's")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)

    for d in domains:
        fig, ax = plt.subplots(figsize=(5, 3.6))
        draw(ax, d)
        fig.tight_layout()
        path = out_dir / f"fit_{d}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    cols = min(3, len(domains))
    rows = math.ceil(len(domains) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.4 * rows), squeeze=False)
    for ax, d in zip(axes.flat, domains):
        draw(ax, d)
    for ax in list(axes.flat)[len(domains):]:
        ax.axis("off")
    fig.suptitle(f"AutoScale fits at {fit['budget_tokens']:,.0f} tokens")
    fig.tight_layout()
    path = out_dir / "fit.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)
    return paths


# --- extrapolate ----------------------------------------------------------------------------------

def load_fit(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        p = p / FIT_FILE
    fit = _read_json(p, "fit file (run `megareweight mix fit` first)")
    for key in ("budget_tokens", "domains", "optimal_tokens"):
        if key not in fit:
            raise WorkflowError(f"{p}: missing key {key!r}; not a fit.json written by `megareweight mix fit`")
    fit["_path"] = str(p)
    return fit


def extrapolate_fits(small: dict[str, Any] | str | Path, large: dict[str, Any] | str | Path, target_tokens: int | str,
                     *, max_epochs: Optional[float] = None, available: Optional[dict[str, float]] = None) -> dict[str, Any]:
    """Predict the optimal counts at ``target_tokens`` from two fits (smaller budget first).

    Capping uses each domain's available training tokens (from the fits unless ``available``
    is given) and ``max_epochs`` (default: the larger fit's, else 4); capped domains are listed.
    """
    f1 = small if isinstance(small, dict) else load_fit(small)
    f2 = large if isinstance(large, dict) else load_fit(large)
    target = parse_tokens(target_tokens, "--target")
    if sorted(f1["domains"]) != sorted(f2["domains"]):     # the order may differ: matched by name
        raise WorkflowError(f"the two fits have different domains: {f1['domains']} vs {f2['domains']}")
    domains = list(f1["domains"])
    b1, b2 = float(f1["budget_tokens"]), float(f2["budget_tokens"])
    if b1 >= b2:
        raise WorkflowError(f"the first --fit must be the smaller budget: got {b1:,.0f} then {b2:,.0f} tokens")
    if target < b2:
        warnings.warn(f"target {target:,} tokens is below the larger fitted budget {b2:,.0f}: this interpolates",
                      MixingWarning, stacklevel=2)
    n1 = np.array([f1["optimal_tokens"][d] for d in domains], dtype=float)
    n2 = np.array([f2["optimal_tokens"][d] for d in domains], dtype=float)
    if max_epochs is None:
        max_epochs = float(f2.get("bounds", {}).get("max_epochs", DEFAULT_MAX_EPOCHS))
    avail = available if available is not None else f2.get("available_tokens")
    avail_vec = None if avail is None else np.array([float(avail[d]) for d in domains])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MixingWarning)
        uncapped = extrapolate_to(n1, n2, target, names=domains)
        counts = extrapolate_to(n1, n2, target, available=avail_vec, max_epochs=max_epochs, names=domains)
    notes = [str(w.message) for w in caught if issubclass(w.category, MixingWarning)]
    weights = counts / counts.sum()
    capped = [d for d, u, c in zip(domains, uncapped, counts) if c < u * (1 - 1e-9)]
    return {
        "version": 1,
        "method": "AutoScale extrapolation N_i(t) = N_i(1) (N_i(2)/N_i(1))^(t-1), t solved for the target total; "
                  "capped at available * max_epochs",
        "target_tokens": target,
        "domains": domains,
        "fits": [{"path": f.get("_path"), "budget_tokens": f["budget_tokens"], "optimal_tokens": f["optimal_tokens"]}
                 for f in (f1, f2)],
        "max_epochs": max_epochs,
        "available_tokens": None if avail_vec is None else {d: float(v) for d, v in zip(domains, avail_vec)},
        "uncapped_tokens": {d: float(v) for d, v in zip(domains, uncapped)},
        "tokens": {d: float(v) for d, v in zip(domains, counts)},
        "weights": {d: float(v) for d, v in zip(domains, weights)},
        "capped_domains": capped,
        "warnings": notes,
    }


def write_extrapolation(result: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / EXTRAPOLATION_FILE, result)
    write_weights_yaml(out / WEIGHTS_FILE, result["weights"],
                       f"AutoScale extrapolated mixture at {result['target_tokens']:,} tokens "
                       "(from fits at " + ", ".join(f"{f['budget_tokens']:,.0f}" for f in result["fits"]) + ")\n"
                       "use as data.mixture, e.g. --set \"data.mixture=$(cat weights.yaml)\"")
    return out / EXTRAPOLATION_FILE, out / WEIGHTS_FILE
