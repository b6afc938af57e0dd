"""Baseline mixtures to compare AutoScale against.

* uniform: every domain the same weight;
* natural: weights proportional to the tokens each domain has (sampling the concatenated corpus);
* UniMax (Chung et al., "UniMax: Fairer and More Effective Language Sampling for Large-Scale
  Multilingual Pretraining", ICLR 2023): spread the token budget uniformly over domains, but never
  repeat a domain more than ``max_epochs`` times; what a capped domain cannot take is shared
  uniformly by the rest. Processing domains from the smallest up makes one pass enough: if the
  smallest remaining domain is not capped by its uniform share, no larger one is.
"""
from __future__ import annotations

import numpy as np

from megareweight.mixing._validate import ArrayLike, as_vector, positive_scalar
from megareweight.mixing.errors import InfeasibleError, MixingError


def uniform_weights(m: int) -> np.ndarray:
    """``m`` equal weights summing to 1."""
    if isinstance(m, bool) or int(m) != m or m < 1:
        raise MixingError(f"number of domains must be an integer >= 1, got {m!r}")
    return np.full(int(m), 1.0 / int(m))


def _tokens(tokens: ArrayLike) -> np.ndarray:
    t = as_vector("tokens", tokens)
    if (t < 0).any():
        raise MixingError(f"tokens must be >= 0; negative at positions {np.flatnonzero(t < 0).tolist()}")
    if t.sum() <= 0:
        raise MixingError("tokens must have a positive total")
    return t


def natural_weights(tokens: ArrayLike) -> np.ndarray:
    """Weights proportional to each domain's token count."""
    t = _tokens(tokens)
    return t / t.sum()


def unimax_counts(tokens: ArrayLike, budget: float, max_epochs: float = 1.0) -> np.ndarray:
    """UniMax token allocation (Chung et al. 2023): per-domain tokens summing to ``budget``.

    Raises :class:`InfeasibleError` when ``budget > max_epochs * sum(tokens)`` (no allocation can
    respect the epoch cap).
    """
    t = _tokens(tokens)
    B = positive_scalar("budget", budget)
    epochs = positive_scalar("max_epochs", max_epochs)
    cap = t * epochs
    if B > cap.sum() * (1 + 1e-12):
        raise InfeasibleError(f"budget {B:.6g} exceeds max_epochs * total tokens = {cap.sum():.6g}")
    out = np.zeros_like(t)
    remaining = B
    order = np.argsort(t, kind="stable")
    for k, i in enumerate(order):
        share = remaining / (t.size - k)
        out[i] = min(share, cap[i])
        remaining -= out[i]
    return out


def unimax_weights(tokens: ArrayLike, budget: float, max_epochs: float = 1.0) -> np.ndarray:
    """UniMax mixture weights: :func:`unimax_counts` divided by ``budget``."""
    counts = unimax_counts(tokens, budget, max_epochs)
    return counts / counts.sum()
