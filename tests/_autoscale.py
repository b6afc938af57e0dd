"""Fake finished runs for the AutoScale workflow tests: no training, known ground truth.

A fake run directory holds what :func:`megareweight.train.loop.train` would write and the fit
reads: ``config.yaml`` (the planned config) and ``summary.json`` (final per-domain losses,
``world_size``, ``tokens_per_domain``). The losses are chosen so that the run's objective,
relative to the base run, equals a given function of the amounts.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from megareweight.autoscale.plan import load_plan
from megareweight.config import dump_config, load_config
from megareweight.mixing import PowerLaw

TRUE_A = {"prose": 0.5, "code": 1.0, "numbers": 0.2}
TRUE_B = {"prose": 0.3, "code": 0.8, "numbers": 0.45}
BASE_LOSS = 4.0

Relative = Callable[[dict[str, float]], float]


def additive_relative(a: dict[str, float], b: dict[str, float]) -> Relative:
    """``sum_i (x_i + a_i)^(-b_i) + c`` with ``c`` such that the base (every x = 1) scores 1."""
    def rel(x: dict[str, float]) -> float:
        c = 1.0 - sum((1 + a[d]) ** -b[d] for d in x)
        return sum((x[d] + a[d]) ** -b[d] for d in x) + c
    return rel


TRUE_RELATIVE = additive_relative(TRUE_A, TRUE_B)


def true_laws(domains: list[str], a: dict[str, float] = TRUE_A, b: dict[str, float] = TRUE_B) -> list[PowerLaw]:
    return [PowerLaw(a[d], b[d], 0.0) for d in domains]


def losses_for(relative: float, domains: list[str], objective: str = "ppl") -> dict[str, float]:
    """Equal per-domain losses whose objective is ``relative`` times the base run's."""
    if objective == "ppl":
        loss = math.log(math.exp(BASE_LOSS) * relative)
    else:
        loss = BASE_LOSS * relative
    return {d: loss for d in domains}


def write_run(out: Path, config: Optional[Path], losses: dict[str, float], tokens: dict[str, int],
              world_size: int = 1, step: int = 1) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if config is not None:
        dump_config(load_config(config), out / "config.yaml")
    summary = {"step": step, "tokens": sum(tokens.values()), **{f"loss/{d}": v for d, v in losses.items()},
               "world_size": world_size, "tokens_per_domain": tokens}
    (out / "summary.json").write_text(json.dumps(summary))


def split_tokens(total: int, x_scaled: float, domain: Optional[str], base: dict[str, float]) -> dict[str, int]:
    """Per-domain tokens summing to ``total``: ``domain`` at ``x_scaled`` times its base, the rest shared."""
    if domain is None:
        raw = dict(base)
    else:
        rest = total - x_scaled * base[domain]
        others = {d: v for d, v in base.items() if d != domain}
        raw = {d: rest * v / sum(others.values()) for d, v in others.items()}
        raw[domain] = x_scaled * base[domain]
    counts = {d: int(math.floor(v)) for d, v in raw.items()}
    counts[max(counts, key=lambda d: raw[d] - counts[d])] += total - sum(counts.values())
    return counts


def fake_plan_runs(plan_dir: Path, relative: Relative = TRUE_RELATIVE, *, objective: str = "ppl",
                   actual_x: Optional[Callable[[dict], float]] = None, noise: float = 0.0, seed: int = 0,
                   world_size: int = 1) -> None:
    """Write a finished fake run for every run of the plan.

    The perturbed domain's actual amount is ``actual_x(run)`` (default: its factor); only it moves
    the relative objective (the other domains' share of the rest does not), so a fit that reads the
    actual amounts recovers ``relative`` exactly. ``noise`` adds a seed effect and a per-run effect
    (both N(0, noise^2)) to the relative objective.
    """
    plan = load_plan(plan_dir)
    domains = plan["domains"]
    rng = np.random.default_rng(seed)
    seed_effect = {s: rng.normal(0, noise) for s in plan["seeds"]}
    base = plan["base_tokens"]
    for run in plan["runs"]:
        d = run["domain"]
        x_d = 1.0 if d is None else (actual_x(run) if actual_x else run["factor"])
        tokens = split_tokens(run["tokens"], x_d, d, base)
        if d is not None:
            x_d = tokens[d] / base[d]           # what the fit will see: whole tokens
        x = {k: (x_d if k == d else 1.0) for k in domains}
        rel = relative(x) + (seed_effect[run["seed"]] + rng.normal(0, noise) if noise else 0.0)
        write_run(plan_dir / run["out"], plan_dir / run["config"], losses_for(rel, domains, objective), tokens,
                  world_size=world_size, step=run["steps"])
