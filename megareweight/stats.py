"""Paired comparisons over seeds: mean difference, 95 % t-interval and a plain verdict.

Why paired: every comparison in this project runs both methods with the same seed, i.e. the same
initialisation and the same data order, so the seed-to-seed spread (often larger than the effect)
cancels in the per-seed difference. The interval is Student's t on those n differences,
``mean ± t_{0.975, n-1} * sd / sqrt(n)``; with n = 3 seeds t = 4.30, so the demo can only detect
effects several times its seed spread, which is why it reports "inconclusive" so often and points
to the powered experiment. One module, used by the demo and by both experiments under
``experiments/reweighting/``, so that they all compute and word the statistics the same way.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from scipy import stats as _scipy_stats

CONFIDENCE = 0.95


@dataclass(frozen=True)
class PairedDiff:
    """Summary of ``b - a`` over paired samples (e.g. ``linupper - uniform`` per seed)."""

    n: int
    mean: float
    sd: float  # sample standard deviation of the differences (ddof = 1); nan when n < 2
    low: float  # lower end of the two-sided t-interval; nan when n < 2
    high: float
    confidence: float = CONFIDENCE

    @property
    def excludes_zero(self) -> bool:
        return self.n >= 2 and (self.low > 0 or self.high < 0)

    def verdict(self, lower_is_better: bool = True, a: str = "a", b: str = "b") -> str:
        """Which side won, only when the interval excludes 0: "{b} better", "{a} better" or
        "inconclusive" (the interval covers 0, or fewer than two pairs)."""
        if not self.excludes_zero:
            return "inconclusive"
        b_lower = self.high < 0
        return f"{b} better" if b_lower == lower_is_better else f"{a} better"

    def format(self, digits: int = 4) -> str:
        """``+0.0123 [+0.0050, +0.0196]`` (or just the mean with one pair)."""
        if self.n < 2:
            return f"{self.mean:+.{digits}f} (1 pair, no interval)"
        return f"{self.mean:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"

    def to_dict(self) -> dict:
        return {**asdict(self), "excludes_zero": self.excludes_zero}


def t_quantile(n: int, confidence: float = CONFIDENCE) -> float:
    """Two-sided Student-t critical value for a mean of ``n`` samples (n - 1 degrees of freedom)."""
    if n < 2:
        raise ValueError(f"a t-interval needs at least 2 samples, got {n}")
    return float(_scipy_stats.t.ppf(0.5 + confidence / 2, n - 1))


def mean_ci(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(mean, low, high) of the t-interval of the mean; (mean, nan, nan) with one value."""
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or x.size == 0:
        raise ValueError("mean_ci needs a non-empty 1-D sequence")
    mean = float(x.mean())
    if x.size < 2:
        return mean, math.nan, math.nan
    half = t_quantile(x.size, confidence) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return mean, mean - half, mean + half


def paired_diff(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> PairedDiff:
    """``b - a`` paired element by element (same seed at the same index)."""
    a_arr, b_arr = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a_arr.shape != b_arr.shape or a_arr.ndim != 1 or a_arr.size == 0:
        raise ValueError(f"paired_diff needs two non-empty sequences of equal length, got {a_arr.shape} and {b_arr.shape}")
    d = b_arr - a_arr
    mean, low, high = mean_ci(d, confidence)
    sd = float(d.std(ddof=1)) if d.size > 1 else math.nan
    return PairedDiff(int(d.size), mean, sd, low, high, confidence)


def mean_ci_bands(curves: np.ndarray, confidence: float = CONFIDENCE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pointwise (mean, low, high) over the first axis of ``curves`` [seeds, points] (for plots)."""
    c = np.asarray(curves, dtype=float)
    mean = c.mean(axis=0)
    if c.shape[0] < 2:
        return mean, mean, mean
    half = t_quantile(c.shape[0], confidence) * c.std(axis=0, ddof=1) / math.sqrt(c.shape[0])
    return mean, mean - half, mean + half
