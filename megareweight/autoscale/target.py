"""A complete train config for a mixture at a token budget: what `megareweight train --config` runs as is.

The config is the plan's base config (``base.yaml``, the config given to ``mix plan``) with three
fields replaced and everything else unchanged (model, optimiser, schedule shape, eval, wandb):

* ``data.mixture``: the weights, at full precision (the config requires them to sum to 1);
* ``data.train_domains``: the mixture's domains, so a domain of the corpus outside the mixture
  stays out of training (it is still evaluated unless ``data.eval_domains`` says otherwise);
* ``train.max_steps``: ``round(tokens / tokens_per_step)`` for the plan's world size, so the run
  trains the budget the mixture was computed for (the learning-rate schedule follows ``max_steps``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import yaml

from megareweight.autoscale.plan import tokens_per_step
from megareweight.config import ExperimentConfig, config_from_dict


def target_config(base: ExperimentConfig, weights: Mapping[str, float], tokens: int,
                  world_size: int = 1) -> tuple[ExperimentConfig, int]:
    """``(config, steps)``: ``base`` set to train ``weights`` for about ``tokens`` tokens."""
    total = float(sum(weights.values()))
    steps = max(1, int(round(tokens / tokens_per_step(base, world_size))))
    raw = base.to_dict()
    raw["data"]["mixture"] = {d: float(w) / total for d, w in weights.items()}
    raw["data"]["train_domains"] = list(weights)
    raw["train"]["max_steps"] = steps
    return config_from_dict(raw), steps


def write_target_config(path: str | Path, base: ExperimentConfig, weights: Mapping[str, float], tokens: int,
                        world_size: int = 1, header: str = "") -> dict[str, int]:
    """Write :func:`target_config` as YAML (with ``header`` as comment lines); returns steps and tokens."""
    cfg, steps = target_config(base, weights, tokens, world_size)
    trained = steps * tokens_per_step(base, world_size)
    lines = [f"# {line}" for line in header.splitlines()] if header else []
    lines.append(f"# {steps} steps x {tokens_per_step(base, world_size):,} tokens per step on {world_size} rank(s) "
                 f"= {trained:,} tokens; run with: megareweight train --config {Path(path).name} --out RUN_DIR")
    Path(path).write_text("\n".join(lines) + "\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return {"steps": steps, "tokens": trained, "world_size": int(world_size)}
