"""``loss.impl=torch_core``: PyTorch's own chunked ``F.linear_cross_entropy`` with this project's
reweighting outside it, so that a user can train with the core op and compare.

Why it exists: PyTorch 2.13 ships ``torch.nn.functional.linear_cross_entropy`` (chunked over the
batch with ``LinearCrossEntropyOptions``, ``reduction="none"`` supported), the first baseline users
reach for. It returns per-token losses; per-sample means, the all-gathered global weights and the
weighted loss then follow in autograd exactly as in the reference
(:func:`~megareweight.kernels.weighted_ce.reference.reweight_token_losses`). What it cannot do:
the z-loss (the op does not expose the log-sum-exp) and torch < 2.13 (the op does not exist).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megareweight.kernels.weighted_ce.reference import (
    LossOutput,
    check_labels,
    check_strategy,
    reweight_token_losses,
    samples_per_call,
)


def available() -> bool:
    """True when this torch has the core op and its chunking options (torch >= 2.13)."""
    return hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")


def linear_weighted_ce_torch_core(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    strategy: str = "linupper",
    r: float = 1.0,
    delta: float = 1.0,
    ignore_index: int = -100,
    group: Optional[dist.ProcessGroup] = None,
    segment_ids: Optional[torch.Tensor] = None,
    num_segments: Optional[int] = None,
    sample_log_prior: Optional[torch.Tensor] = None,
    z_loss: float = 0.0,
) -> LossOutput:
    """The reference's contract, with the per-token losses from ``F.linear_cross_entropy``."""
    if not available():
        raise RuntimeError(f"loss.impl=torch_core needs torch >= 2.13 (F.linear_cross_entropy); this is {torch.__version__}")
    if z_loss:
        raise ValueError("loss.z_loss: not available with loss.impl=torch_core (F.linear_cross_entropy does not "
                         "expose the log-sum-exp); use fused, chunked or reference")
    b, t, d = hidden.shape
    check_strategy(strategy, sample_log_prior, samples_per_call(b, segment_ids, num_segments))
    check_labels(labels, weight.shape[0], ignore_index)
    flat = labels.reshape(-1)
    token_losses = F.linear_cross_entropy(hidden.reshape(-1, d), weight, flat, ignore_index=ignore_index,
                                          reduction="none", options=torch.nn.LinearCrossEntropyOptions())
    return reweight_token_losses(token_losses.float(), labels, flat != ignore_index, strategy, r, delta, group,
                                 segment_ids, num_segments, sample_log_prior)
