"""The quantity AutoScale's power laws are fitted to: one number per training run.

AutoScale's official DDO notebook scores a run by the mean validation *perplexity* over the
domains, divided by the base run's; the relative form keeps the power law ``(x + a)^(-b) + c``
(no amplitude factor) well posed. Perplexity and loss rank mixtures differently: the mean of
``exp(loss_d)`` weighs a domain by its perplexity, so the domains with the highest loss count most,
and the optimum moves when the mean loss is used instead (issue 12 reports a weight moving from
0.232 to 0.2 on the notebook's data). ``"ppl"`` is therefore the default; ``"loss"`` (mean loss
over domains, divided by the base run's) is kept for comparison. Pure numpy.
"""
from __future__ import annotations

from typing import Literal, Sequence

import numpy as np

from megareweight.mixing.errors import MixingError

Objective = Literal["ppl", "loss"]
OBJECTIVES: tuple[str, ...] = ("ppl", "loss")
DEFAULT_OBJECTIVE: Objective = "ppl"

DESCRIPTIONS = {
    "ppl": "mean over the trained domains of exp(final validation loss), divided by the base run's "
           "(AutoScale's notebook)",
    "loss": "mean over the trained domains of the final validation loss, divided by the base run's",
}


def check_objective(kind: str) -> Objective:
    """``kind`` if it is a known objective, else a :class:`MixingError` naming the allowed values."""
    if kind not in OBJECTIVES:
        raise MixingError(f"objective {kind!r} is not allowed; allowed values: {', '.join(OBJECTIVES)}")
    return kind  # type: ignore[return-value]


def run_objective(losses: Sequence[float], kind: str = DEFAULT_OBJECTIVE) -> float:
    """One run's score from its per-domain validation losses (nats/token), before dividing by the base's."""
    check_objective(kind)
    arr = np.asarray(losses, dtype=float)
    if arr.ndim != 1 or arr.size == 0 or not np.all(np.isfinite(arr)) or (arr <= 0).any():
        raise MixingError(f"losses must be a non-empty list of finite numbers > 0, got {np.asarray(losses).tolist()}")
    return float(np.mean(np.exp(arr)) if kind == "ppl" else np.mean(arr))
