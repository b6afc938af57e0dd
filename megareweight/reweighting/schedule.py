"""Warm-up schedule for reweighting.

The seed trainers start with a plain mean loss (or a very high temperature, r = 100) for the first
K steps, while per-sample losses are still dominated by initialisation noise, then switch to the
target temperature.
"""
from __future__ import annotations

from dataclasses import dataclass

from megareweight.reweighting.strategies import STRATEGIES

WARMUP_MODES = ("uniform", "temperature")


@dataclass(frozen=True)
class ReweightSchedule:
    """Which (strategy, r) to use at a step.

    ``warmup_mode="uniform"`` trains with uniform weights for ``warmup_steps``;
    ``"temperature"`` keeps the strategy but uses ``warmup_r`` (100 in the seed code) instead.
    """

    strategy: str = "uniform"
    r: float = 1.0
    delta: float = 1.0
    warmup_steps: int = 0
    warmup_mode: str = "uniform"
    warmup_r: float = 100.0

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(
                f"reweight.strategy: unknown {self.strategy!r}; allowed: {', '.join(sorted(STRATEGIES))}"
            )
        if self.warmup_mode not in WARMUP_MODES:
            raise ValueError(
                f"reweight.warmup_mode: unknown {self.warmup_mode!r}; allowed: {', '.join(WARMUP_MODES)}"
            )
        if self.r <= 0 or self.warmup_r <= 0 or self.delta <= 0:
            raise ValueError("reweight.r, reweight.warmup_r and reweight.delta must be > 0")
        if self.warmup_steps < 0:
            raise ValueError("reweight.warmup_steps must be >= 0")

    def at(self, step: int) -> tuple[str, float]:
        """(strategy, r) in force at 0-based optimizer ``step``."""
        if step < self.warmup_steps:
            if self.warmup_mode == "uniform":
                return "uniform", self.r
            return self.strategy, self.warmup_r
        return self.strategy, self.r

    def in_warmup(self, step: int) -> bool:
        return step < self.warmup_steps
