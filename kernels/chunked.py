"""Chunked linear + reweighted cross-entropy in plain PyTorch (the CPU training path).

Why: the reference materialises [N, V] logits, their fp32 copy and their gradient; for a 32k
vocabulary that dominates activation memory. Here a custom autograd Function walks over token
chunks: the forward keeps only the per-token log-sum-exp ([N] fp32) and the per-sample sums, the
backward recomputes each chunk's logits and turns them into dH and dW (fp32 accumulation). Peak
extra memory is one [chunk, V] block. This is ``loss.impl=chunked``.

Why recompute instead of computing gradients during the forward (as Liger's fused linear CE
does): a token's gradient is ``(softmax - onehot) * w_i * world_size / count_i`` and the weight
``w_i`` of its sample (Sow et al., ICLR 2025: softmax over the *global* batch of normalised
losses) is only known after every token of every rank has been reduced and all-gathered.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from kernels.reference import LossOutput, check_strategy, reweight_from_sums, sample_index

#: Logit elements per chunk (fp32: 16 MiB); a chunk holds at least one token.
DEFAULT_CHUNK_ELEMENTS = 1 << 22


def _chunks(n: int, chunk: int):
    for start in range(0, n, chunk):
        yield start, min(start + chunk, n)


class _ChunkedLinearWeightedCE(torch.autograd.Function):
    """Forward: chunked log-sum-exp + target logit -> per-sample sums -> reweighting epilogue.
    Backward: recompute the chunk's logits, ``g = (softmax - onehot) * coef_token * grad``."""

    @staticmethod
    def forward(ctx, h2d, weight, labels, index, num_samples, strategy, r, delta, ignore_index, group, chunk):
        n = h2d.shape[0]
        valid = labels != ignore_index
        safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
        lse = torch.empty(n, dtype=torch.float32, device=h2d.device)
        target = torch.empty(n, dtype=torch.float32, device=h2d.device)
        with torch.no_grad():
            for s, e in _chunks(n, chunk):
                logits = (h2d[s:e] @ weight.t()).float()
                lse[s:e] = torch.logsumexp(logits, dim=-1)
                target[s:e] = logits.gather(1, safe_labels[s:e, None]).squeeze(1)
                del logits
        token_loss = torch.where(valid, lse - target, torch.zeros_like(lse))
        sums = torch.zeros(num_samples, dtype=torch.float32, device=h2d.device).index_add_(0, index, token_loss)
        counts = torch.zeros(num_samples, dtype=torch.float32, device=h2d.device).index_add_(0, index, valid.float())
        ep = reweight_from_sums(sums, counts, strategy, r, delta, group)
        coef_token = torch.where(valid, ep.coef[index], torch.zeros_like(lse))
        ctx.save_for_backward(h2d, weight, safe_labels, lse, coef_token)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(ep.per_sample_loss, ep.weights)
        return ep.loss, ep.per_sample_loss, ep.weights

    @staticmethod
    def backward(ctx, grad_loss, _grad_per_sample, _grad_weights):
        h2d, weight, labels, lse, coef_token = ctx.saved_tensors
        dh, dw = chunked_backward(h2d, weight, labels, lse, coef_token * grad_loss.float(),
                                  ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.chunk)
        return dh, dw, None, None, None, None, None, None, None, None, None


def chunked_backward(
    h2d: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    scale: torch.Tensor,
    need_h: bool,
    need_w: bool,
    chunk: int,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """dH and dW of ``sum_n scale_n * CE_n`` by recomputing logits one token chunk at a time.

    ``labels`` must hold valid class ids everywhere (ignored tokens carry scale 0); ``lse`` is
    the forward's per-token log-sum-exp. Three GEMMs per chunk run in the inputs' dtype, so on a
    GPU they hit the tensor cores; dW is accumulated across chunks in fp32 (on CPU, or for fp32
    inputs, the dW GEMM itself runs in fp32). Shared with the Triton path's ``backward="gemm"``.
    """
    low_precision_gemm = h2d.device.type == "cuda" and h2d.dtype != torch.float32
    dh = torch.empty_like(h2d) if need_h else None
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    for s, e in _chunks(h2d.shape[0], chunk):
        h = h2d[s:e]
        g = torch.exp((h @ weight.t()).float() - lse[s:e, None])
        g[torch.arange(e - s, device=g.device), labels[s:e]] -= 1.0
        g.mul_(scale[s:e, None])
        gd = g.to(h2d.dtype)
        if need_h:
            # Same precision as autograd on the reference: grad cast to the input dtype.
            dh[s:e] = gd @ weight
        if need_w:
            if low_precision_gemm:
                dw.add_(gd.t() @ h)
            else:
                dw.addmm_(g.t(), h.float())
        del g, gd
    return dh, (dw.to(weight.dtype) if need_w else None)


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
    chunk_size: Optional[int] = None,
) -> LossOutput:
    """Reweighted LM-head cross-entropy without holding [N, V] logits.

    Same contract as :func:`kernels.reference.linear_weighted_ce`; ``chunk_size`` (tokens per
    chunk) defaults to ``DEFAULT_CHUNK_ELEMENTS // V``.
    """
    check_strategy(strategy)
    b, t, d = hidden.shape
    v = weight.shape[0]
    index, num_samples = sample_index(labels, segment_ids, num_segments)
    chunk = chunk_size or max(1, DEFAULT_CHUNK_ELEMENTS // v)
    loss, per_sample, weights = _ChunkedLinearWeightedCE.apply(
        hidden.reshape(b * t, d), weight, labels.reshape(-1).long(), index, num_samples,
        strategy, float(r), float(delta), ignore_index, group, int(chunk),
    )
    return LossOutput(loss, per_sample, weights)
