"""Normalisation, softmax weights and the weighted loss over the global (data-parallel) batch.

Everything here stays on the losses' device and never calls ``.item()``: it runs inside the
training step and inside the fused kernel's epilogue, where a host sync would stall the GPU.

Samples that cannot be scored are marked invalid and receive weight 0: a sample with no
non-ignored token, or one whose loss is NaN/inf. They are also left out of ``l_min``/``l_max`` so
one bad sample cannot flatten everybody else's weights. Over the wire an invalid sample travels as
NaN, so one all-gather carries both losses and validity.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

from megareweight.reweighting.strategies import PRIOR_STRATEGIES, strategy_scores

#: Smallest loss range used by the normalisation (the seed code's epsilon).
MIN_RANGE = 1e-6


class WeightedLoss(NamedTuple):
    """Result of :func:`weighted_loss`.

    ``loss`` is this rank's scalar to back-propagate; ``weights``, ``losses`` and ``valid`` cover
    the whole global batch (rank-major order), for metrics.
    """

    loss: torch.Tensor
    weights: torch.Tensor
    losses: torch.Tensor
    valid: torch.Tensor


def _valid_mask(losses: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    valid = torch.isfinite(losses)
    if mask is not None:
        valid = valid & mask.to(torch.bool)
    return valid


def normalize_losses(
    losses: torch.Tensor, delta: float = 1.0, mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Min-max normalise losses to [-delta, delta] (the paper's ``x_i``).

    ``x_i = 2*delta*(l_i - (l_max + l_min)/2) / max(l_max - l_min, 1e-6)``. Entries excluded by
    ``mask`` or non-finite are returned as 0 and ignored for ``l_min``/``l_max``.
    """
    if delta <= 0:
        raise ValueError(f"delta must be > 0, got {delta}")
    losses = losses.detach().float()
    valid = _valid_mask(losses, mask)
    # Python scalars, not torch.tensor(inf, device=...): that is a host-to-device copy from
    # pageable memory, which synchronises the CUDA stream on every call.
    l_max = torch.where(valid, losses, float("-inf")).amax()
    l_min = torch.where(valid, losses, float("inf")).amin()
    spread = torch.clamp(l_max - l_min, min=MIN_RANGE)
    x = 2.0 * delta * (losses - (l_max + l_min) / 2.0) / spread
    return torch.where(valid, x, torch.zeros_like(x))


def check_prior(strategy: str, log_prior: Optional[torch.Tensor]) -> None:
    """The ``domain`` strategy has no weights without its per-sample prior: fail loudly, not uniformly."""
    if strategy in PRIOR_STRATEGIES and log_prior is None:
        raise ValueError(f"reweighting strategy {strategy!r} needs per-sample log weights (sample_log_prior); "
                         "in training they come from reweight.domain_weights")


def compute_weights(
    losses: torch.Tensor,
    strategy: str,
    r: float,
    delta: float = 1.0,
    mask: Optional[torch.Tensor] = None,
    log_prior: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Weights over the global batch: ``softmax(f(x) / r + log_prior)`` with invalid samples at 0.

    The weights sum to 1 whenever at least one sample is valid and are all 0 otherwise (the
    trainer then skips the step). ``r`` is the temperature: ``r -> inf`` gives uniform weights and
    the largest possible weight ratio is ``exp(range(f) / r)``. ``log_prior`` (per sample, same
    shape as ``losses``) multiplies each sample's weight by ``exp(log_prior)`` before the
    normalisation; the ``domain`` strategy's weights are exactly that (score 0).
    """
    check_prior(strategy, log_prior)
    if r <= 0:
        raise ValueError(f"temperature r must be > 0, got {r}")
    losses = losses.detach().float()
    valid = _valid_mask(losses, mask)
    x = normalize_losses(losses, delta, valid)
    scores = strategy_scores(x, strategy, delta) / r
    if log_prior is not None:
        scores = scores + log_prior.detach().float()
    scores = torch.where(valid, scores, torch.full_like(scores, float("-inf")))
    # Softmax by hand so that an all-invalid batch gives zeros, not NaN.
    top = torch.where(valid.any(), scores.amax(), torch.zeros((), device=scores.device))
    expd = torch.where(valid, torch.exp(scores - top), torch.zeros_like(scores))
    total = expd.sum()
    return torch.where(total > 0, expd / torch.clamp(total, min=1e-30), torch.zeros_like(expd))


def _gather(losses: torch.Tensor, group: Optional[dist.ProcessGroup]) -> tuple[torch.Tensor, int, int]:
    """All-gather detached per-sample losses over ``group``; returns (global, rank, world_size).

    Every rank must contribute the same number of samples (the mixture sampler guarantees it).
    The rank is the rank *within the group*, which is the global data-parallel rank: the order of
    ``all_gather``'s output. (One of the seed trainers sliced by the node-local rank, which is wrong
    on multi-node jobs.)
    """
    if not (dist.is_available() and dist.is_initialized()):
        return losses, 0, 1
    world = dist.get_world_size(group)
    if world == 1:
        return losses, 0, 1
    parts = [torch.empty_like(losses) for _ in range(world)]
    dist.all_gather(parts, losses.contiguous(), group=group)
    return torch.cat(parts), dist.get_rank(group), world


def gather_prior(log_prior: Optional[torch.Tensor], group: Optional[dist.ProcessGroup]) -> Optional[torch.Tensor]:
    """This rank's per-sample log prior -> the global batch's (rank-major, like the losses)."""
    if log_prior is None:
        return None
    return _gather(log_prior.detach().float(), group)[0]


def weighted_loss(
    per_sample_losses: torch.Tensor,
    strategy: str,
    r: float,
    group: Optional[dist.ProcessGroup] = None,
    delta: float = 1.0,
    mask: Optional[torch.Tensor] = None,
    log_prior: Optional[torch.Tensor] = None,
    extra: Optional[torch.Tensor] = None,
) -> WeightedLoss:
    """Reweighted loss of this rank's samples, with weights computed over the global batch.

    ``per_sample_losses`` [b] carries gradients; ``mask`` [b] marks scorable samples (e.g. those
    with at least one non-ignored token); ``log_prior`` [b] is this rank's per-sample log weight
    (the ``domain`` strategy), all-gathered like the losses; ``extra`` [b] is a per-sample loss term
    (the z-loss) weighted like the loss but left out of the weights. Returns ``sum_i w_i * l_i * world_size``
    over this rank's slice, so that DDP/ZeRO's gradient *average* over ranks yields
    ``sum_i w_i grad l_i``.
    """
    local = per_sample_losses.detach().float()
    local_valid = _valid_mask(local, mask)
    wire = torch.where(local_valid, local, torch.full_like(local, float("nan")))
    global_losses, rank, world = _gather(wire, group)
    global_valid = torch.isfinite(global_losses)
    global_prior = gather_prior(log_prior, group)
    weights = compute_weights(global_losses, strategy, r, delta, global_valid, global_prior)
    b = per_sample_losses.shape[0]
    local_w = weights[rank * b : (rank + 1) * b].to(per_sample_losses.dtype)
    total = per_sample_losses if extra is None else per_sample_losses + extra
    safe = torch.where(local_valid, total, torch.zeros_like(total))
    loss = (local_w * safe).sum() * world
    return WeightedLoss(loss, weights, global_losses, global_valid)


def weight_statistics(
    weights: torch.Tensor,
    valid: torch.Tensor,
    domain_ids: Optional[torch.Tensor] = None,
    num_domains: int = 0,
) -> dict[str, torch.Tensor]:
    """Summary of one step's weights (device tensors; the logger converts them once per step).

    ``ess`` is the effective sample size ``1 / sum w^2`` (G for uniform weights, 1 when a single
    sample takes all the weight); ``entropy`` is in nats (log G for uniform). ``share`` [D] is the
    total weight that each domain received.
    """
    w = weights.detach().float()
    valid = valid.to(torch.bool)
    stats = {
        "min": torch.where(valid, w, float("inf")).amin(),
        "max": torch.where(valid, w, float("-inf")).amax(),
        "entropy": -(torch.where(w > 0, w * torch.log(w), torch.zeros_like(w))).sum(),
        "ess": 1.0 / torch.clamp((w * w).sum(), min=1e-30),
        "valid": valid.sum(),
    }
    if domain_ids is not None and num_domains > 0:
        share = torch.zeros(num_domains, device=w.device, dtype=w.dtype)
        stats["share"] = share.scatter_add_(0, domain_ids.to(w.device).long(), w)
    return stats
