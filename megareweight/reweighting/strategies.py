"""Reweighting strategies: score functions f(x) of the normalised loss x in [-delta, delta].

A higher score means a larger weight after ``softmax(f / r)``. Formulas from the seed paper's
official code (Sow et al., ICLR 2025):

* ``linupper``  = min(x + delta, delta): ramps up with the loss, then flat for the upper half, so
  the easiest samples are down-weighted without chasing the noisiest ones (the paper's main method);
* ``quadratic`` = 1 - x^2 / delta^2: favours medium losses, down-weights both extremes;
* ``extremes``  = |x|: favours both the easiest and the hardest samples;
* ``linear``    = 0.5 * x + 0.5 * delta: monotone in the loss;
* ``uniform``   = no reweighting, every sample weighs 1/G;
* ``domain``    = a constant weight per domain (``reweight.domain_weights``), not a function of the
  loss: its score is 0 and the weights come from the per-sample log prior ``log c_domain``
  (:func:`megareweight.reweighting.weights.compute_weights`), so ``w_i = c_{d(i)} / sum_j c_{d(j)}``
  over the global batch. It is the loss-side counterpart of ``data.mixture`` and the control that
  separates a domain-level shift from instance-level reweighting.
"""
from __future__ import annotations

from typing import Callable

import torch

Strategy = Callable[[torch.Tensor, float], torch.Tensor]


def _uniform(x: torch.Tensor, delta: float) -> torch.Tensor:
    return torch.zeros_like(x)


def _linear(x: torch.Tensor, delta: float) -> torch.Tensor:
    return 0.5 * x + 0.5 * delta


def _linupper(x: torch.Tensor, delta: float) -> torch.Tensor:
    return torch.clamp(x + delta, max=delta)


def _quadratic(x: torch.Tensor, delta: float) -> torch.Tensor:
    return 1.0 - x * x / (delta * delta)


def _extremes(x: torch.Tensor, delta: float) -> torch.Tensor:
    return x.abs()


STRATEGIES: dict[str, Strategy] = {
    "uniform": _uniform,
    "linear": _linear,
    "linupper": _linupper,
    "quadratic": _quadratic,
    "extremes": _extremes,
    "domain": _uniform,
}

#: Strategies whose weights need a per-sample log prior (the caller supplies it).
PRIOR_STRATEGIES = ("domain",)


def strategy_scores(x: torch.Tensor, strategy: str, delta: float = 1.0) -> torch.Tensor:
    """Apply the named strategy to normalised losses ``x``; unknown names are a clear error."""
    try:
        fn = STRATEGIES[strategy]
    except KeyError:
        raise ValueError(
            f"unknown reweighting strategy {strategy!r}; allowed: {', '.join(sorted(STRATEGIES))}"
        ) from None
    return fn(x, delta)
