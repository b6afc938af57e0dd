"""Small input checks shared by the mixing modules (private).

Each helper names the offending argument so an error points at the field the user has to fix.
"""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np

from megareweight.mixing.errors import MixingError

ArrayLike = Union[Sequence[float], np.ndarray]
Bound = Union[float, Sequence[float], np.ndarray, None]


def as_vector(name: str, values: ArrayLike, *, allow_inf: bool = False) -> np.ndarray:
    """Return ``values`` as a 1-D float array; refuse empty, multi-dimensional or NaN/inf input."""
    try:
        arr = np.asarray(values, dtype=float)
    except (TypeError, ValueError) as exc:
        raise MixingError(f"{name} must be a sequence of numbers: {exc}") from None
    if arr.ndim != 1:
        raise MixingError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        raise MixingError(f"{name} must not be empty")
    bad = np.isnan(arr) if allow_inf else ~np.isfinite(arr)
    if bad.any():
        raise MixingError(f"{name} contains non-finite values at positions {np.flatnonzero(bad).tolist()}")
    return arr


def as_positive_vector(name: str, values: ArrayLike) -> np.ndarray:
    """A finite 1-D array whose entries are all > 0."""
    arr = as_vector(name, values)
    if (arr <= 0).any():
        raise MixingError(f"{name} must be > 0 everywhere; non-positive at positions "
                          f"{np.flatnonzero(arr <= 0).tolist()}")
    return arr


def broadcast_bound(name: str, value: Bound, m: int, default: float) -> np.ndarray:
    """A scalar or per-domain bound as an array of length ``m`` (``None`` gives ``default``)."""
    if value is None:
        return np.full(m, float(default))
    arr = np.asarray(value, dtype=float)
    if arr.ndim == 0:
        arr = np.full(m, float(arr))
    if arr.shape != (m,):
        raise MixingError(f"{name} must be a scalar or have one entry per domain ({m}), got shape {arr.shape}")
    if np.isnan(arr).any():
        raise MixingError(f"{name} contains NaN")
    return arr


def positive_scalar(name: str, value: float) -> float:
    """A finite number > 0."""
    v = float(value)
    if not np.isfinite(v) or v <= 0:
        raise MixingError(f"{name} must be a finite number > 0, got {value!r}")
    return v


def domain_label(i: int, names: Sequence[str] | None) -> str:
    """How to refer to domain ``i`` in messages: its name when known, else its index."""
    return f"{names[i]!r}" if names is not None else f"#{i}"
