"""What a finished training run measured, checked against what was planned.

The fit trusts three things from a run directory, all written by :func:`megareweight.train.loop.train`:

* ``summary.json``: the final validation loss per domain (``loss/<domain>``), the world size, and
  ``tokens_per_domain``, the tokens the sampler actually drew from each domain. The sampler draws
  each slot's domain at random, so at small budgets the actual amounts differ from the planned
  ones by several percent (more for a domain scaled down); the power laws are fitted to the actual
  amounts.
* ``config.yaml``: the config the run really used, compared with the planned one;
* the total token count, compared with the plan's ``steps x tokens_per_step``: a run trained with
  another world size, batch or step count is refused here instead of being fitted silently.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from megareweight.autoscale.files import WorkflowError, read_json
from megareweight.config import ExperimentConfig, load_config


@dataclass(frozen=True)
class RunMeasurement:
    out: Path
    losses: dict[str, float]   # final validation loss (nats/token) per trained domain
    tokens: dict[str, int]     # actual training tokens drawn per trained domain
    steps: int
    world_size: int

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens.values())


def same_config(path: Path, cfg: ExperimentConfig) -> bool:
    """Whether the config a run saved equals ``cfg`` (both with defaults filled in, so a field added
    to the config schema later does not make finished runs look different)."""
    try:
        return load_config(path).to_dict() == cfg.to_dict()
    except ValueError:  # ConfigError (e.g. a key that no longer exists) or unreadable YAML
        return False


def read_summary(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        raise WorkflowError(f"{path}: not found; the run has not finished (train it with `megareweight mix run` "
                            "or `megareweight train --resume`)")
    return read_json(path, "run summary")


def measure_run(run_dir: str | Path, domains: Sequence[str], *, config: Optional[ExperimentConfig] = None,
                total_tokens: Optional[int] = None, world_size: Optional[int] = None) -> RunMeasurement:
    """Read a finished run; check its config, world size and token total against the plan when given."""
    out = Path(run_dir)
    summary = read_summary(out)
    where = out / "summary.json"
    if config is not None and not same_config(out / "config.yaml", config):
        raise WorkflowError(f"{out / 'config.yaml'}: the run was trained with a different config than planned; "
                            "delete the run directory and train it again")
    ws = summary.get("world_size")
    if world_size is not None and ws != world_size:
        raise WorkflowError(f"{where}: world_size {ws}, the plan is for {world_size} data-parallel rank(s) "
                            "(its tokens per step depend on it); train the run with that many ranks")
    counts = summary.get("tokens_per_domain")
    if not isinstance(counts, dict):
        raise WorkflowError(f"{where}: no tokens_per_domain (written by megareweight train since issue 12); "
                            "train the run again with this version")
    missing = [d for d in domains if d not in counts]
    if missing:
        raise WorkflowError(f"{where}: tokens_per_domain has no entry for domain {missing[0]!r}")
    tokens = {d: int(counts[d]) for d in domains}
    trained = sum(int(v) for v in counts.values())
    if total_tokens is not None and trained != total_tokens:
        raise WorkflowError(f"{where}: the run trained {trained:,} tokens, the plan expects {total_tokens:,} "
                            "(steps x tokens per step); was it run with another world size, batch size or max_steps?")
    losses = {}
    for d in domains:
        value = summary.get(f"loss/{d}")
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise WorkflowError(f"{where}: loss/{d} is {value!r}; need a finite validation loss > 0 for every "
                                "trained domain")
        losses[d] = float(value)
    return RunMeasurement(out, losses, tokens, int(summary.get("step", 0)), int(ws) if ws is not None else 1)
