"""Choosing a loss implementation: ``loss.impl`` (+ ``loss.mode``, ``loss.chunk_size``) -> a function.

One algorithm (:mod:`megareweight.kernels.weighted_ce.function`) in two modes (``fast``:
6NDV FLOPs and a stored gradient; ``lean``: 8NDV and one logit block of memory) with two
implementations of its elementwise part; ``loss.impl`` picks one of:

* ``fused``     – Triton epilogue kernels (CUDA; CPU only under ``TRITON_INTERPRET=1``);
* ``chunked``   – PyTorch elementwise epilogue (the CPU training path);
* ``reference`` – plain autograd, materialises [N, V] logits (ground truth for tests);
* ``torch_core`` – PyTorch's chunked ``F.linear_cross_entropy`` (torch >= 2.13) + the same
  reweighting in autograd: the core op as a baseline to train and compare with;
* ``auto``      – ``fused`` on CUDA when Triton is importable, else ``chunked``.

Triton is imported lazily so that ``import megareweight.kernels.weighted_ce`` works where it is missing (macOS) and so that
``TRITON_INTERPRET`` can still be set by the caller before the first Triton call.
"""
from __future__ import annotations

import functools
import importlib.util
from typing import Callable, Optional

import torch

from megareweight.kernels.weighted_ce.function import MODES, check_options, fused_linear_weighted_ce
from megareweight.kernels.weighted_ce.reference import LossOutput

LOSS_IMPLS = ("auto", "fused", "chunked", "reference", "torch_core")


def triton_available() -> bool:
    """True when the ``triton`` package can be imported (not whether a GPU exists)."""
    return importlib.util.find_spec("triton") is not None


def get_loss_impl(
    name: str, device: torch.device | str, mode: str = "auto", chunk_size: Optional[int] = None,
    z_loss: float = 0.0,
) -> tuple[str, Callable[..., LossOutput]]:
    """Resolve ``loss.impl`` (+ ``loss.mode``, ``loss.chunk_size``; 0 or None = auto;
    ``loss.z_loss``) to (concrete name, loss function with the trainer's call signature)."""
    if name not in LOSS_IMPLS:
        raise ValueError(f"loss.impl: unknown {name!r}; allowed: {', '.join(LOSS_IMPLS)}")
    chunk_size = chunk_size or None
    try:
        check_options(mode, chunk_size)
    except ValueError as exc:
        raise ValueError(f"loss.{exc}") from None
    device = torch.device(device)
    if name == "auto":
        name = "fused" if device.type == "cuda" and triton_available() else "chunked"
    if name == "reference":
        from megareweight.kernels.weighted_ce.reference import linear_weighted_ce

        return name, (functools.partial(linear_weighted_ce, z_loss=z_loss) if z_loss else linear_weighted_ce)
    if name == "torch_core":
        from megareweight.kernels.weighted_ce import torch_core

        if z_loss:
            raise ValueError("loss.z_loss: not available with loss.impl=torch_core (F.linear_cross_entropy does not "
                             "expose the log-sum-exp); use fused, chunked or reference")
        if not torch_core.available():
            raise RuntimeError(f"loss.impl=torch_core needs torch >= 2.13; this is {torch.__version__}")
        return name, torch_core.linear_weighted_ce_torch_core
    if name == "fused" and not triton_available():
        raise RuntimeError("loss.impl=fused needs the triton package; use 'chunked' or 'reference'")
    epilogue = "triton" if name == "fused" else "torch"
    return name, functools.partial(fused_linear_weighted_ce, mode=mode, chunk_size=chunk_size, epilogue=epilogue,
                                   z_loss=z_loss)

