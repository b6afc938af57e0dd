"""Loss kernels: LM head + cross-entropy + instance reweighting (Sow et al., ICLR 2025).

Three implementations with one contract (see :func:`kernels.reference.linear_weighted_ce`):

* ``reference`` – plain autograd, materialises [N, V] logits (ground truth for tests);
* ``chunked``   – PyTorch custom autograd over token chunks (CPU training);
* ``fused``     – Triton kernels (CUDA; runs on CPU only under ``TRITON_INTERPRET=1``).

Triton is imported lazily so that ``import kernels`` works where it is missing (macOS) and so that
``TRITON_INTERPRET`` can still be set by the caller before the first fused call.
"""
from __future__ import annotations

import importlib.util
from typing import Callable

import torch

from kernels.reference import LossOutput

LOSS_IMPLS = ("auto", "fused", "chunked", "reference")


def triton_available() -> bool:
    """True when the ``triton`` package can be imported (not whether a GPU exists)."""
    return importlib.util.find_spec("triton") is not None


def fused_linear_weighted_ce(*args, **kwargs) -> LossOutput:
    """Lazy forwarder to :func:`kernels.fused_ce.fused_linear_weighted_ce`."""
    from kernels.fused_ce import fused_linear_weighted_ce as impl

    return impl(*args, **kwargs)


def get_loss_impl(name: str, device: torch.device | str) -> tuple[str, Callable[..., LossOutput]]:
    """Resolve a ``loss.impl`` config value to (concrete name, function).

    ``auto`` picks ``fused`` on CUDA when Triton is importable and ``chunked`` otherwise.
    """
    if name not in LOSS_IMPLS:
        raise ValueError(f"loss.impl: unknown {name!r}; allowed: {', '.join(LOSS_IMPLS)}")
    device = torch.device(device)
    if name == "auto":
        name = "fused" if device.type == "cuda" and triton_available() else "chunked"
    if name == "fused":
        if not triton_available():
            raise RuntimeError("loss.impl=fused needs the triton package; use 'chunked' or 'reference'")
        return name, fused_linear_weighted_ce
    if name == "chunked":
        from kernels.chunked import linear_weighted_ce as chunked

        return name, chunked
    from kernels.reference import linear_weighted_ce as reference

    return name, reference


__all__ = ["LossOutput", "LOSS_IMPLS", "fused_linear_weighted_ce", "get_loss_impl", "triton_available"]
