"""Pure-PyTorch twin of the fused kernel: materialises the [N, V] logits.

Same signature and semantics as :func:`kernels.fused_linear_weighted_ce`; it is the ground truth
for the kernel tests and the loss path for tiny CPU models.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megareweight.reweighting import weighted_loss


class LossOutput(NamedTuple):
    """``loss``: scalar to back-propagate (already scaled by world size);
    ``per_sample_loss``: [S] this rank's detached per-sample mean CE, NaN where a sample has no
    valid token; ``weights``: [S * world_size] detached weights over the global batch."""

    loss: torch.Tensor
    per_sample_loss: torch.Tensor
    weights: torch.Tensor


def sample_index(labels: torch.Tensor, segment_ids: Optional[torch.Tensor], num_segments: Optional[int]) -> tuple[torch.Tensor, int]:
    """Map every token to its sample: the row, or (row, segment) for packed documents.

    Returns (index [B*T], number of samples). Without ``num_segments`` the segment count is read
    from ``segment_ids.max()`` (one host sync).
    """
    b, t = labels.shape
    rows = torch.arange(b, device=labels.device).repeat_interleave(t)
    if segment_ids is None:
        return rows, b
    if num_segments is None:
        num_segments = int(segment_ids.max().item()) + 1
    seg = segment_ids.reshape(-1).long()
    return rows * num_segments + seg, b * num_segments


def per_sample_ce(
    token_losses: torch.Tensor, valid: torch.Tensor, index: torch.Tensor, num_samples: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean token loss per sample and token count per sample (sum / count, scatter-add)."""
    sums = torch.zeros(num_samples, dtype=torch.float32, device=token_losses.device)
    sums = sums.index_add(0, index, torch.where(valid, token_losses.float(), torch.zeros_like(token_losses, dtype=torch.float32)))
    counts = torch.zeros(num_samples, dtype=torch.float32, device=token_losses.device)
    counts = counts.index_add(0, index, valid.float())
    return sums / torch.clamp(counts, min=1.0), counts


def linear_weighted_ce(
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
) -> LossOutput:
    """Logits = hidden @ weight.T in the inputs' dtype, CE in fp32, then the reweighted loss."""
    b, t, d = hidden.shape
    logits = (hidden.reshape(-1, d) @ weight.t()).float()
    flat = labels.reshape(-1)
    valid = flat != ignore_index
    token_losses = F.cross_entropy(logits, torch.where(valid, flat, torch.zeros_like(flat)), reduction="none")
    index, n = sample_index(labels, segment_ids, num_segments)
    losses, counts = per_sample_ce(token_losses, valid, index, n)
    out = weighted_loss(losses, strategy, r, group=group, delta=delta, mask=counts > 0)
    per_sample = torch.where(counts > 0, losses.detach(), torch.full_like(losses, float("nan")))
    return LossOutput(out.loss, per_sample, out.weights)
