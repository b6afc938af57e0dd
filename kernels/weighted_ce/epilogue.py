"""The elementwise half of the algorithm, in two interchangeable implementations.

:mod:`megareweight.kernels.weighted_ce.function` runs the GEMMs and calls an epilogue for everything around
them; the epilogue is the only thing that differs between ``loss.impl=fused`` (Triton kernels,
:class:`TritonEpilogue`) and ``loss.impl=chunked`` (PyTorch elementwise ops, :class:`TorchEpilogue`,
the CPU training path). One algorithm, two ways of doing its elementwise part.

Per-sample sums are a deterministic segmented reduction over the tokens sorted by sample
(:class:`SampleLayout`): ``index_add_`` on CUDA floats uses atomics, whose order, and so whose
rounding, changes from run to run. A sample index can be as large as B*T (packed documents), so
the reduction is O(N) over a stable sort rather than a dense one-hot.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Protocol

import torch

from megareweight.kernels.weighted_ce.reference import sample_index


class SampleLayout(NamedTuple):
    """Which sample every token belongs to, and the tokens grouped by sample.

    ``index`` [N]: sample of each token; ``order`` [N]: token ids sorted by sample (stable, so in
    token order within a sample); ``offsets`` [S+1]: sample ``s`` owns ``order[offsets[s]:offsets[s+1]]``.
    """

    index: torch.Tensor
    order: torch.Tensor
    offsets: torch.Tensor
    num_samples: int


def sample_layout(labels: torch.Tensor, segment_ids: Optional[torch.Tensor], num_segments: Optional[int]) -> SampleLayout:
    """Rows (or packed (row, segment) pairs) -> :class:`SampleLayout`, without a host sync when
    ``num_segments`` is given. Without segments the tokens are already grouped: no sort."""
    b, t = labels.shape
    index, num_samples = sample_index(labels, segment_ids, num_segments)
    device = labels.device
    if segment_ids is None:
        order = torch.arange(b * t, device=device)
        offsets = torch.arange(b + 1, device=device) * t
    else:
        sorted_index, order = torch.sort(index, stable=True)
        offsets = torch.searchsorted(sorted_index, torch.arange(num_samples + 1, device=device))
    return SampleLayout(index, order, offsets, num_samples)


class EpilogueOps(Protocol):
    """What :class:`megareweight.kernels.weighted_ce.function.LinearWeightedCE` needs besides GEMMs."""

    name: str

    def lse_target(self, z: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, target: torch.Tensor,
                   write_grad: bool, z_scale: float = 0.0) -> None:
        """Fill ``lse``/``target`` [rows] (fp32) from the logit block ``z`` [rows, V]; with
        ``write_grad`` overwrite ``z`` with the unscaled gradient ``a * softmax(z) - onehot``,
        ``a = 1 + z_scale * lse`` (the z-loss term; ``a = 1`` exactly when ``z_scale`` is 0)."""

    def grad_(self, z: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, scale: torch.Tensor,
              col_offset: int, z_scale: float = 0.0) -> None:
        """``z <- (a * exp(z - lse) - onehot(labels - col_offset)) * scale`` in place, ``a`` as
        above; rows whose scale is 0 become exactly 0."""

    def segment_sums(self, values: torch.Tensor, valid: torch.Tensor, layout: SampleLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample sums of ``values`` and of ``valid`` (both fp32 [N]) in a fixed order."""


class TorchEpilogue:
    """PyTorch ops (CPU training; also runs on CUDA). Temporaries: an fp32 copy of the block."""

    name = "torch"

    def lse_target(self, z, labels, lse, target, write_grad, z_scale=0.0):
        zf = z.float()
        v = z.shape[1]
        lse.copy_(torch.logsumexp(zf, dim=1))
        in_range = (labels >= 0) & (labels < v)
        safe = labels.clamp(0, v - 1)[:, None]
        target.copy_(torch.where(in_range, zf.gather(1, safe).squeeze(1), torch.zeros_like(lse)))
        if write_grad:
            g = torch.exp(zf - lse[:, None])
            if z_scale:
                g.mul_((1.0 + z_scale * lse)[:, None])
            g.scatter_add_(1, safe, -in_range.to(g.dtype)[:, None])
            z.copy_(g)

    def grad_(self, z, labels, lse, scale, col_offset, z_scale=0.0):
        v = z.shape[1]
        col = labels - col_offset
        hit = (col >= 0) & (col < v)
        g = torch.exp(z.float() - lse[:, None])
        if z_scale:
            g.mul_((1.0 + z_scale * lse)[:, None])
        g.scatter_add_(1, col.clamp(0, v - 1)[:, None], -hit.to(g.dtype)[:, None])
        g.mul_(scale[:, None]).masked_fill_((scale == 0)[:, None], 0.0)
        z.copy_(g)

    def segment_sums(self, values, valid, layout):
        # segment_reduce walks each segment in order (CPU loop; CUDA: per-segment reduction, no
        # atomics), so the result does not depend on scheduling.
        sums = torch.segment_reduce(values[layout.order], "sum", offsets=layout.offsets, initial=0.0)
        counts = torch.segment_reduce(valid[layout.order], "sum", offsets=layout.offsets, initial=0.0)
        return sums, counts


class TritonEpilogue:
    """Triton kernels (:mod:`megareweight.kernels.weighted_ce.triton_kernels`): CUDA, or CPU tensors under
    ``TRITON_INTERPRET=1`` (tests). Imported lazily so that ``import kernels`` needs no Triton."""

    name = "triton"

    def __init__(self, device: torch.device):
        from megareweight.kernels.weighted_ce import triton_kernels

        if device.type != "cuda" and not triton_kernels.INTERPRET:
            raise RuntimeError(
                "the Triton epilogue (loss.impl=fused) needs CUDA tensors, or TRITON_INTERPRET=1 set "
                "before megareweight.kernels.weighted_ce.triton_kernels is imported; use loss.impl=chunked on CPU"
            )
        self._k = triton_kernels

    def lse_target(self, z, labels, lse, target, write_grad, z_scale=0.0):
        self._k.lse_target_launch(z, labels, lse, target, write_grad, z_scale)()

    def grad_(self, z, labels, lse, scale, col_offset, z_scale=0.0):
        self._k.grad_launch(z, labels, lse, scale, int(col_offset), z_scale)()

    def segment_sums(self, values, valid, layout):
        sums = torch.empty(layout.num_samples, dtype=torch.float32, device=values.device)
        counts = torch.empty_like(sums)
        if layout.num_samples:
            self._k.segment_sum_launch(values.contiguous(), valid.contiguous(), layout.order.contiguous(),
                                       layout.offsets.contiguous(), sums, counts)()
        return sums, counts
