"""Errors and warnings raised by :mod:`megareweight.mixing`.

All errors subclass :class:`ValueError` so callers that only know "bad input" can catch that,
while the CLI can tell a bad fit from an infeasible budget and say which one it was.
"""
from __future__ import annotations


class MixingError(ValueError):
    """Base class: the inputs of a domain-mixing computation are unusable."""


class FitError(MixingError):
    """A power law cannot be fitted to the given points (too few, non-finite, not decreasing...)."""


class InfeasibleError(MixingError):
    """No allocation satisfies the budget together with the per-domain bounds or caps."""


class MixingWarning(UserWarning):
    """A mixture had to be changed to respect data availability (e.g. capped repetition)."""
