"""Plain-autograd ground truth of the reweighted linear cross-entropy: materialises [N, V] logits.

Same contract as :func:`megareweight.kernels.weighted_ce.fused_linear_weighted_ce` (without its ``mode``/``chunk_size``/
``epilogue`` knobs); it is the ground truth for the kernel tests and ``loss.impl=reference``. The
small helpers below (:func:`sample_index`, :func:`reweight_from_sums`) are shared with
:mod:`megareweight.kernels.weighted_ce.function` so that both agree on what a sample is and on the weights.

Reweighting follows Sow et al. (ICLR 2025), see :mod:`megareweight.reweighting`:
``l_i`` = mean token CE of sample i; ``x_i = 2*delta*(l_i - (l_max+l_min)/2) / max(l_max-l_min,
1e-6)`` over the all-gathered global batch; ``w = softmax(f(x)/r)``; this rank back-propagates
``sum_i w_i * l_i * world_size``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megareweight.reweighting import STRATEGIES, compute_weights, weighted_loss
from megareweight.reweighting.weights import _gather, check_prior, gather_prior


class LossOutput(NamedTuple):
    """``loss``: scalar to back-propagate (already scaled by world size);
    ``per_sample_loss``: [S] this rank's detached per-sample mean CE, NaN where a sample has no
    valid token; ``weights``: [S * world_size] detached weights over the global batch;
    ``z_loss``: [S] this rank's detached per-sample mean z-loss ``z_loss * lse^2`` (NaN where a
    sample has no valid token), None when the z-loss coefficient is 0."""

    loss: torch.Tensor
    per_sample_loss: torch.Tensor
    weights: torch.Tensor
    z_loss: Optional[torch.Tensor] = None


def check_labels(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Labels outside [0, V) other than ``ignore_index`` fail, as in ``F.cross_entropy``.

    Without this a fused loss would mask the target logit to 0 and train on the token's LSE
    (finite, plausible, wrong). No host sync: an asynchronous device assert (on CUDA it fires
    when the stream reaches it, like ``F.cross_entropy``'s own; on CPU it raises at once). The
    trainer also checks token ids where the batch is read (the shard is named there).
    """
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    torch._assert_async(torch.logical_not(bad.any()),
                        f"labels: a label is outside [0, {vocab}) and is not ignore_index={ignore_index} "
                        "(a corrupt shard, or data tokenized for another vocabulary)")


def check_z_loss(z_loss: float) -> float:
    """The z-loss coefficient: finite and >= 0 (0 disables it)."""
    z = float(z_loss)
    if not (z >= 0.0 and z < float("inf")):
        raise ValueError(f"z_loss: must be a finite number >= 0 (0 disables it), got {z_loss!r}")
    return z


def check_strategy(strategy: str, sample_log_prior: Optional[torch.Tensor] = None, num_samples: Optional[int] = None) -> None:
    """Fail before any heavy compute (and before a collective) on a misspelt strategy, a ``domain``
    strategy without its per-sample log weights, or log weights of the wrong length."""
    if strategy not in STRATEGIES:
        raise ValueError(
            f"unknown reweighting strategy {strategy!r}; allowed: {', '.join(sorted(STRATEGIES))}"
        )
    check_prior(strategy, sample_log_prior)
    if sample_log_prior is not None and num_samples is not None and tuple(sample_log_prior.shape) != (num_samples,):
        raise ValueError(f"sample_log_prior: expected shape ({num_samples},) (one per sample), "
                         f"got {tuple(sample_log_prior.shape)}")


def samples_per_call(rows: int, segment_ids: Optional[torch.Tensor], num_segments: Optional[int]) -> Optional[int]:
    """Samples of one call without a host read: a row each, or ``num_segments`` per row (None:
    unknown until ``segment_ids.max()`` is read)."""
    if segment_ids is None:
        return rows
    return rows * num_segments if num_segments else None


def sample_index(labels: torch.Tensor, segment_ids: Optional[torch.Tensor], num_segments: Optional[int]) -> tuple[torch.Tensor, int]:
    """Map every token to its sample: the row, or (row, segment) for packed documents.

    Returns (index [B*T], number of samples). Without ``num_segments`` the segment count is read
    from ``segment_ids.max()`` (one host sync): pass it in the training loop.
    """
    b, t = labels.shape
    rows = torch.arange(b, device=labels.device).repeat_interleave(t)
    if segment_ids is None:
        return rows, b
    if num_segments is None:
        num_segments = int(segment_ids.max().item()) + 1
    seg = segment_ids.reshape(-1).long().to(labels.device)
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


class Epilogue(NamedTuple):
    """Everything the custom-autograd paths need after the per-sample reduction.

    ``coef[i] = w_i * world_size / count_i`` is d loss / d (sum of sample i's token losses): the
    backward scales each token's ``softmax - onehot`` by it (0 for samples without valid tokens).
    """

    loss: torch.Tensor
    per_sample_loss: torch.Tensor
    weights: torch.Tensor
    coef: torch.Tensor
    z_loss: Optional[torch.Tensor] = None


def reweight_from_sums(
    sums: torch.Tensor,
    counts: torch.Tensor,
    strategy: str,
    r: float,
    delta: float,
    group: Optional[dist.ProcessGroup],
    log_prior: Optional[torch.Tensor] = None,
    z_sums: Optional[torch.Tensor] = None,
) -> Epilogue:
    """Per-sample sums/counts -> all-gather -> global weights -> this rank's weighted loss.

    Device-side only (no ``.item()``): mirrors :func:`megareweight.reweighting.weighted_loss`
    exactly (invalid samples travel as NaN and get weight 0; the rank's slice is taken by its
    rank in ``group``), but also returns the per-sample gradient coefficient.
    """
    sums = sums.float()
    counts = counts.float()
    losses = sums / torch.clamp(counts, min=1.0)
    has_tokens = counts > 0
    local_valid = has_tokens & torch.isfinite(losses)
    wire = torch.where(local_valid, losses, torch.full_like(losses, float("nan")))
    global_losses, rank, world = _gather(wire, group)
    weights = compute_weights(global_losses, strategy, r, delta, torch.isfinite(global_losses),
                              gather_prior(log_prior, group))
    s = losses.shape[0]
    local_w = weights[rank * s : (rank + 1) * s]
    safe = torch.where(local_valid, losses, torch.zeros_like(losses))
    z_per_sample = None
    if z_sums is not None:  # weighted like the CE, but not part of what the weights are computed from
        z_mean = z_sums.float() / torch.clamp(counts, min=1.0)
        safe = safe + torch.where(local_valid, z_mean, torch.zeros_like(z_mean))
        z_per_sample = torch.where(has_tokens, z_mean, torch.full_like(z_mean, float("nan")))
    loss = (local_w * safe).sum() * world
    coef = torch.where(local_valid, local_w * world / torch.clamp(counts, min=1.0), torch.zeros_like(losses))
    per_sample = torch.where(has_tokens, losses, torch.full_like(losses, float("nan")))
    return Epilogue(loss, per_sample, weights, coef, z_per_sample)


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
    sample_log_prior: Optional[torch.Tensor] = None,
    z_loss: float = 0.0,
) -> LossOutput:
    """Logits = hidden @ weight.T in the inputs' dtype, CE in fp32, then the reweighted loss.

    Plain autograd through everything, so it is slow and memory-hungry ([N, V] logits plus their
    fp32 copy and gradient) but obviously right: the other paths are tested against it.
    ``sample_log_prior`` [S]: per-sample log weights (the ``domain`` strategy), see
    :func:`megareweight.reweighting.compute_weights`. ``z_loss`` (PaLM's auxiliary loss,
    ``z_loss * lse^2`` per token, 1e-4 in PaLM and OLMo): added to every token's loss before the
    per-sample mean, so it is weighted like the CE; the weights themselves come from the CE alone.
    """
    b, t, d = hidden.shape
    check_strategy(strategy, sample_log_prior, samples_per_call(b, segment_ids, num_segments))
    z_loss = check_z_loss(z_loss)
    check_labels(labels, weight.shape[0], ignore_index)
    logits = (hidden.reshape(-1, d) @ weight.t()).float()
    flat = labels.reshape(-1)
    valid = flat != ignore_index
    token_losses = F.cross_entropy(logits, torch.where(valid, flat, torch.zeros_like(flat)), reduction="none")
    z_tokens = z_loss * torch.logsumexp(logits, dim=1).square() if z_loss else None
    return reweight_token_losses(token_losses, labels, valid, strategy, r, delta, group, segment_ids, num_segments,
                                 sample_log_prior, z_tokens)


def reweight_token_losses(token_losses: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, strategy: str,
                          r: float, delta: float, group: Optional[dist.ProcessGroup],
                          segment_ids: Optional[torch.Tensor], num_segments: Optional[int],
                          sample_log_prior: Optional[torch.Tensor] = None,
                          z_tokens: Optional[torch.Tensor] = None) -> LossOutput:
    """Per-token losses (with autograd) -> per-sample means -> global weights -> the weighted loss;
    the autograd tail shared by the reference and ``loss.impl=torch_core``. ``z_tokens``: the
    per-token z-loss, weighted like the loss, left out of the weights."""
    index, n = sample_index(labels, segment_ids, num_segments)
    losses, counts = per_sample_ce(token_losses, valid, index, n)
    z_mean = None
    if z_tokens is not None:
        z_mean, _ = per_sample_ce(z_tokens, valid, index, n)
    out = weighted_loss(losses, strategy, r, group=group, delta=delta, mask=counts > 0, log_prior=sample_log_prior,
                        extra=z_mean)
    empty = torch.full_like(losses, float("nan"))
    per_sample = torch.where(counts > 0, losses.detach(), empty)
    z_out = None if z_mean is None else torch.where(counts > 0, z_mean.detach(), empty)
    return LossOutput(out.loss, per_sample, out.weights, z_out)
