"""Seed noise: how large a difference between runs has to be before it means anything.

Two tools, both used by the AutoScale workflow and its experiment:

* :func:`blocked_noise_sd` estimates the seed-to-seed standard deviation of one run's score from
  a table ``Y[g, k]`` (setting ``g``, replica ``k``) in which replica ``k`` of every setting used
  the same seed. The seed is a block (same initialisation, same sampler stream), so the residual of
  the two-way additive model ``Y[g, k] = mu_g + s_k + e`` is the noise that a comparison of two
  settings at the same seeds actually sees; its ``(G - 1)(K - 1)`` degrees of freedom pool every
  setting, which with 2 seeds is far more stable than one standard deviation per setting.
* :func:`t_interval` is the usual t-based confidence interval of a mean (of paired differences):
  :func:`megareweight.stats.mean_ci` with this package's input checks and error type.

Pure numpy/scipy.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from megareweight.mixing._validate import ArrayLike, as_vector
from megareweight.mixing.errors import MixingError
from megareweight.stats import mean_ci


class Noise(NamedTuple):
    sd: float
    dof: int


def blocked_noise_sd(table: ArrayLike) -> Noise:
    """Residual standard deviation of ``table[g, k] = mu_g + s_k + e`` and its degrees of freedom.

    Needs at least 2 settings and 2 replicas (else there are no residual degrees of freedom).
    """
    y = np.asarray(table, dtype=float)
    if y.ndim != 2:
        raise MixingError(f"table must be 2-D (settings x replicas), got shape {y.shape}")
    g, k = y.shape
    if g < 2 or k < 2:
        raise MixingError(f"need >= 2 settings and >= 2 replicas to estimate seed noise, got {g} x {k}")
    if not np.all(np.isfinite(y)):
        raise MixingError("table contains non-finite values")
    resid = y - y.mean(axis=1, keepdims=True) - y.mean(axis=0, keepdims=True) + y.mean()
    dof = (g - 1) * (k - 1)
    return Noise(float(np.sqrt((resid ** 2).sum() / dof)), dof)


class Interval(NamedTuple):
    mean: float
    low: float
    high: float
    n: int

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def t_interval(values: ArrayLike, level: float = 0.95) -> Interval:
    """Mean of ``values`` with its two-sided t-based ``level`` confidence interval (n >= 2)."""
    v = as_vector("values", values)
    if v.size < 2:
        raise MixingError(f"a t-interval needs at least 2 values, got {v.size}")
    if not 0 < level < 1:
        raise MixingError(f"level must be in (0, 1), got {level!r}")
    mean, low, high = mean_ci(v, level)
    return Interval(mean, low, high, int(v.size))
