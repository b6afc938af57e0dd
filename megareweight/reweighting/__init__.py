"""Instance-level dynamic loss reweighting (Sow et al., ICLR 2025).

The formulas follow the seed paper's official trainers (their GPT-2 trainer and the FSDP trainer
used for 1.4B/7B agree on them):

* per-sample loss ``l_i`` = mean token cross-entropy over the sample's non-ignored tokens;
* the detached losses are all-gathered over the data-parallel group (global batch of size G);
* ``x_i = 2*delta*(l_i - (l_max + l_min)/2) / max(l_max - l_min, 1e-6)`` lies in [-delta, delta];
* a strategy ``f`` maps ``x`` to a score, ``w = softmax(f(x) / r)`` over the global batch;
* each rank takes its slice of ``w`` by its GLOBAL rank and back-propagates
  ``sum_i w_i * l_i * world_size``, so the data-parallel gradient average equals
  ``sum_i w_i * grad l_i``. Weights carry no gradient.

Samples that cannot be scored (no valid token, or a non-finite loss) are excluded from the
normalisation and get weight 0; the remaining weights still sum to 1.
"""
from __future__ import annotations

from megareweight.reweighting.strategies import STRATEGIES, Strategy, strategy_scores
from megareweight.reweighting.weights import (
    WeightedLoss,
    compute_weights,
    normalize_losses,
    weight_statistics,
    weighted_loss,
)
from megareweight.reweighting.schedule import ReweightSchedule

__all__ = [
    "STRATEGIES",
    "Strategy",
    "strategy_scores",
    "normalize_losses",
    "compute_weights",
    "weighted_loss",
    "WeightedLoss",
    "weight_statistics",
    "ReweightSchedule",
]
