"""``mix plan``: the 2m+1 perturbed-mixture runs of AutoScale at one budget, times the seeds.

The base run trains on mixture ``w`` for ``B`` tokens, i.e. ``n_i = w_i * B`` tokens of each
domain. AutoScale (Kang et al., 2024; DESIGN.md) perturbs ONE domain at a time: for every domain
``i`` and factor ``f != 1`` a run trains on ``f * n_i`` tokens of domain ``i`` and ``n_j`` of every
other domain. Such a run's total is ``B + (f - 1) n_i``, not ``B``: ``x_i`` in the loss model is
"domain ``i``'s data as a multiple of the base run's". Each run's config gets ``data.mixture`` = its
normalised counts, ``data.train_domains`` = the base's domains and ``train.max_steps =
round(total / tokens_per_step)``.

Seeds: ``seeds=K`` replicates every run K times with ``train.seed = s0 + k`` (``s0`` the base
config's seed), the same K seeds for every setting, so replica k of every setting shares its
initialisation and sampler seed and differences between settings are paired. The fit averages the
replicas and estimates the seed noise from them (:mod:`megareweight.autoscale.fit`).

The token counts in ``plan.json`` are expectations: the sampler draws each slot's domain at
random, so a run's actual per-domain tokens differ (its ``summary.json`` records them, and the
fit uses those).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

from megareweight.autoscale.files import BASE_CONFIG_FILE, PLAN_FILE, WorkflowError, parse_tokens, read_json, write_json
from megareweight.config import ExperimentConfig, config_from_dict, dump_config, load_config

PLAN_VERSION = 2
DEFAULT_FACTORS = (0.2, 1.0, 3.0)   # the official notebooks' perturbations
BASE_GROUP = "base"


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


def tokens_per_step(cfg: ExperimentConfig, world_size: int) -> int:
    """Training tokens (inputs) of one optimiser step on ``world_size`` data-parallel ranks."""
    return cfg.data.seq_len * cfg.data.micro_batch_size * cfg.train.gradient_accumulation_steps * int(world_size)


def group_name(domain: Optional[str], factor: float) -> str:
    """``"base"`` or ``"<domain>-x<factor>"``: one setting of the plan (all its seeds)."""
    return BASE_GROUP if domain is None else f"{domain}-x{factor:g}"


def run_name(group: str, seed: int) -> str:
    return f"{group}-seed{seed}"


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


def _positive_int(value: Any, flag: str) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise WorkflowError(f"{flag} must be an integer >= 1, got {value!r}")
    return int(value)


def make_plan(base: ExperimentConfig | str | Path, budget_tokens: int | str, out_dir: str | Path,
              factors: Sequence[float] | str = DEFAULT_FACTORS, overrides: Sequence[str] = (),
              world_size: int = 1, seeds: int = 1, force: bool = False) -> dict[str, Any]:
    """Write ``base.yaml``, one ``configs/<run>.yaml`` per run and ``plan.json`` under ``out_dir``.

    ``base`` is a config (or a YAML path, with ``overrides``); its mixture is the base mixture and
    its trained domains are the ones perturbed. ``world_size`` is the number of data-parallel
    ranks the runs will use (it sets the tokens per step; the fit refuses runs trained otherwise).
    ``seeds`` replicates every run. Returns the plan dictionary.
    """
    cfg = base if isinstance(base, ExperimentConfig) else load_config(base, list(overrides))
    budget = parse_tokens(budget_tokens, "--budget")
    factor_list = parse_factors(factors)
    world = _positive_int(world_size, "--world-size")
    n_seeds = _positive_int(seeds, "--seeds")
    domains, weights, available = _base_domains(cfg)
    zero = [d for d in domains if weights[d] <= 0]
    if zero:
        raise WorkflowError(f"data.mixture: the base mixture gives domain {zero[0]!r} weight 0; "
                            "AutoScale scales each domain's base amount, so every trained domain needs a positive weight")
    tps = tokens_per_step(cfg, world)
    base_counts = {d: weights[d] * budget for d in domains}
    seed_list = [cfg.train.seed + k for k in range(n_seeds)]

    runs, configs = [], {}
    settings: list[tuple[Optional[str], float]] = [(None, 1.0)]
    settings += [(d, f) for d in domains for f in factor_list if f != 1.0]
    for domain, factor in settings:
        group = group_name(domain, factor)
        counts = {d: base_counts[d] * (factor if d == domain else 1.0) for d in domains}
        total = sum(counts.values())
        steps = int(round(total / tps))
        if steps < 1:
            raise WorkflowError(f"--budget {budget}: run {group} would train {total:.0f} tokens, "
                                f"less than one step ({tps} tokens); raise the budget")
        mixture = {d: counts[d] / total for d in domains}
        for replica, seed in enumerate(seed_list):
            name = run_name(group, seed)
            raw = cfg.to_dict()
            raw["data"]["mixture"] = mixture
            raw["data"]["train_domains"] = list(domains)
            raw["train"]["max_steps"] = steps
            raw["train"]["seed"] = seed
            if raw["train"]["eval_interval"] >= steps:
                raw["train"]["eval_interval"] = 0
            raw["wandb"]["name"] = f"mix-{name}"
            configs[name] = config_from_dict(raw)
            runs.append({
                "name": name, "group": group, "domain": domain, "factor": factor, "seed": seed,
                "replica": replica, "config": f"configs/{name}.yaml", "out": f"runs/{name}", "steps": steps,
                "tokens": steps * tps,
                "planned_tokens": {d: float(c) for d, c in counts.items()},
                "expected_tokens": {d: float(mixture[d] * steps * tps) for d in domains},
            })
    plan = {
        "version": PLAN_VERSION,
        "method": "AutoScale (Kang et al., 2024): base run + each domain scaled by each factor, others unchanged",
        "budget_tokens": budget,
        "factors": factor_list,
        "seeds": seed_list,
        "domains": domains,
        "base_weights": weights,
        "base_tokens": {d: float(c) for d, c in base_counts.items()},
        "available_tokens": available,
        "tokens_per_step": tps,
        "world_size": world,
        "prepared": cfg.data.prepared,
        "base_config": BASE_CONFIG_FILE,
        "runs": runs,
    }
    out = Path(out_dir)
    plan_path = out / PLAN_FILE
    if plan_path.is_file() and not force:
        old = read_json(plan_path, "plan")
        if old != json.loads(json.dumps(plan)):
            raise WorkflowError(f"{plan_path}: a different plan is already there; use another --out or --force")
    (out / "configs").mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / BASE_CONFIG_FILE)
    for r in runs:
        dump_config(configs[r["name"]], out / r["config"])
    write_json(plan_path, plan)
    return plan


def load_plan(plan_dir: str | Path) -> dict[str, Any]:
    """``plan.json`` of a plan directory, checked to be one this version of the workflow wrote."""
    path = Path(plan_dir) / PLAN_FILE
    plan = read_json(path, "plan (run `megareweight mix plan` first)")
    if plan.get("version") != PLAN_VERSION:
        raise WorkflowError(f"{path}: plan version {plan.get('version')!r}, this megareweight reads version "
                            f"{PLAN_VERSION}; write the plan again with `megareweight mix plan ... --force`")
    for key in ("budget_tokens", "domains", "runs", "tokens_per_step", "base_tokens", "available_tokens",
                "factors", "seeds", "world_size"):
        if key not in plan:
            raise WorkflowError(f"{path}: missing key {key!r}")
    return plan


def groups(plan: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The plan's runs by setting (``base``, ``<domain>-x<f>``), replicas in seed order."""
    out: dict[str, list[dict[str, Any]]] = {}
    for run in plan["runs"]:
        out.setdefault(run["group"], []).append(run)
    for runs in out.values():
        runs.sort(key=lambda r: r["replica"])
    return out
