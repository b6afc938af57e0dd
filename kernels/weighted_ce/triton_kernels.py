"""Triton epilogue kernels of the reweighted linear cross-entropy (the ``fused`` epilogue).

The GEMMs (logits ``H W^T``, ``G W``, ``G^T H``) run in cuBLAS through ``torch.matmul``; these
kernels do everything elementwise or per row around them, reading each [rows, V] logit block
once (or twice) and never materialising an fp32 copy of it:

* :func:`lse_target_launch`: one program per row. Pass 1 streams the row in ``BLOCK_V`` tiles with
  an online log-sum-exp (fp32) and loads the target logit; with ``WRITE_GRAD`` a pass 2 overwrites
  the row in place with the unscaled gradient ``exp(z - lse) - onehot`` (the "fast" mode keeps it).
* :func:`grad_launch`: one program per (row, tile): ``g = (exp(z - lse) - onehot) * c`` in place,
  where ``c`` is the token's coefficient (``w_i * world / count_i * grad``; 0 for ignored tokens);
  ``col_offset`` places a block that covers only columns ``[col_offset, col_offset + V)``.
* :func:`segment_sum_launch`: one program per sample sums its token losses and counts in a fixed
  order over the tokens sorted by sample (a stable sort done by the caller). No atomics, so the
  per-sample losses, and with them the weights, are bitwise reproducible.

Roofline at N=16384 tokens, V=128256, bf16, H100 (3.35 TB/s HBM): a logit block of all N rows is
N*V*2 = 4.2 GB. ``lse_target`` reads it once (4.2 GB, 1.3 ms); with ``WRITE_GRAD`` it reads twice
and writes once (12.6 GB, 3.8 ms; the second read partly hits L2); ``grad`` reads and writes once
(8.4 GB, 2.5 ms). The exponentials (one per element, 2.1e9, ``exp2`` on the SFU) are far below
these times. Against the 2*N*D*V = 17.2 TFLOP = 17.4 ms of each GEMM at 989 TF/s (D=4096) the
epilogues add 7-20 % per GEMM they follow: memory-bound, no atomics, no shared-memory tiles.

Interpreter (``TRITON_INTERPRET=1``, CPU tensors, used by the tests): there fp32 -> bf16 casts
truncate instead of rounding, so ``RNE_BF16`` rounds to nearest-even by integer arithmetic before
the store (on a GPU the store's own conversion rounds, and the flag is off).
"""
from __future__ import annotations

import os
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

#: Read at import because ``triton.jit`` picks the interpreter when the decorator runs.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

#: Columns per tile. GPU values are first guesses to be tuned on an H100 (``python -m
#: megareweight.kernels.bench``); 4096 bf16 columns = 8 KiB per tile, 16 per thread with 8 warps.
MAX_BLOCK_V = 4096
ROW_WARPS = 8
SEGMENT_BLOCK = 1024
SEGMENT_WARPS = 4
LOG2E = tl.constexpr(1.4426950408889634)


class Launch(NamedTuple):
    """A kernel with its grid, arguments and launch options, built by one function and used both
    to run it and, by :mod:`megareweight.kernels.aot`, to compile exactly what the runtime would compile."""

    kernel: Any
    grid: tuple[int, ...]
    args: tuple
    constexprs: dict
    options: dict

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.constexprs, **self.options)


@triton.jit
def _store_rounded(ptr, x, mask, RNE_BF16: tl.constexpr):
    """Store fp32 ``x`` into ``ptr``'s element type, rounding to nearest-even also in the
    interpreter (whose own fp32 -> bf16 cast truncates)."""
    if RNE_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    tl.store(ptr, x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lse_target_kernel(z_ptr, labels_ptr, lse_ptr, target_ptr, V, stride_z, z_scale,
                       WRITE_GRAD: tl.constexpr, HAS_Z: tl.constexpr, BLOCK_V: tl.constexpr, RNE_BF16: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * stride_z
    label = tl.load(labels_ptr + row)
    cols = tl.arange(0, BLOCK_V)
    # Online log-sum-exp in base 2; every tile has at least one real column, so m stays finite
    # after the first tile and exp2(m - m_new) never sees inf - inf.
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.full([], 0.0, tl.float32)
    for v0 in range(0, V, BLOCK_V):
        mask = v0 + cols < V
        z = tl.load(base + v0 + cols, mask=mask, other=float("-inf")).to(tl.float32) * LOG2E
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp2(m - m_new) + tl.sum(tl.exp2(z - m_new), axis=0)
        m = m_new
    lse = (m + tl.log2(s)) / LOG2E
    in_range = (label >= 0) & (label < V)
    target = tl.load(base + label, mask=in_range, other=0.0).to(tl.float32)
    tl.store(lse_ptr + row, lse)
    tl.store(target_ptr + row, target)
    if WRITE_GRAD:
        # z-loss (HAS_Z): d(z_scale/2 * lse^2)/dz = z_scale * lse * softmax, a per-row factor on softmax
        a = 1.0 + z_scale * lse if HAS_Z else 1.0
        for v0 in range(0, V, BLOCK_V):
            mask = v0 + cols < V
            z = tl.load(base + v0 + cols, mask=mask, other=0.0).to(tl.float32)
            g = a * tl.exp2((z - lse) * LOG2E) - tl.where(v0 + cols == label, 1.0, 0.0)
            _store_rounded(base + v0 + cols, g, mask, RNE_BF16)


@triton.jit
def _grad_kernel(z_ptr, labels_ptr, lse_ptr, scale_ptr, V, stride_z, col_offset, z_scale,
                 HAS_Z: tl.constexpr, BLOCK_V: tl.constexpr, RNE_BF16: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = cols < V
    ptrs = z_ptr + row * stride_z + cols
    label = tl.load(labels_ptr + row) - col_offset
    lse = tl.load(lse_ptr + row)
    scale = tl.load(scale_ptr + row)
    z = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    a = 1.0 + z_scale * lse if HAS_Z else 1.0
    g = (a * tl.exp2((z - lse) * LOG2E) - tl.where(cols == label, 1.0, 0.0)) * scale
    # A token with coefficient 0 (ignored, or its sample left out of the weighting) gets an exact
    # zero gradient even if its logits are not finite, as in the autograd reference.
    g = tl.where(scale == 0.0, 0.0, g)
    _store_rounded(ptrs, g, mask, RNE_BF16)


@triton.jit
def _segment_sum_kernel(values_ptr, valid_ptr, order_ptr, offsets_ptr, sums_ptr, counts_ptr,
                        BLOCK: tl.constexpr):
    sample = tl.program_id(0)
    start = tl.load(offsets_ptr + sample)
    end = tl.load(offsets_ptr + sample + 1)
    acc = tl.zeros([BLOCK], tl.float32)
    cnt = tl.zeros([BLOCK], tl.float32)
    for i0 in range(start, end, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        mask = i < end
        token = tl.load(order_ptr + i, mask=mask, other=0)
        acc += tl.load(values_ptr + token, mask=mask, other=0.0)
        cnt += tl.load(valid_ptr + token, mask=mask, other=0.0)
    tl.store(sums_ptr + sample, tl.sum(acc, axis=0))
    tl.store(counts_ptr + sample, tl.sum(cnt, axis=0))


def _block_v(v: int) -> int:
    return max(16, min(MAX_BLOCK_V, triton.next_power_of_2(v)))


def _rne(z) -> bool:
    return INTERPRET and z.dtype == torch.bfloat16


def _options(num_warps: int) -> dict:
    return {} if INTERPRET else {"num_warps": num_warps}


def lse_target_launch(z, labels, lse, target, write_grad: bool, z_scale: float = 0.0) -> Launch:
    """Per-row LSE and target logit of the contiguous block ``z`` [rows, V]; with ``write_grad``
    also ``z <- a * exp(z - lse) - onehot`` in place (``a = 1 + z_scale * lse``, the z-loss)."""
    rows, v = z.shape
    return Launch(_lse_target_kernel, (rows,), (z, labels, lse, target, v, z.stride(0), float(z_scale)),
                  {"WRITE_GRAD": bool(write_grad), "HAS_Z": bool(z_scale), "BLOCK_V": _block_v(v), "RNE_BF16": _rne(z)},
                  _options(ROW_WARPS))


def grad_launch(z, labels, lse, scale, col_offset: int, z_scale: float = 0.0) -> Launch:
    """``z <- (a * exp(z - lse) - onehot(labels - col_offset)) * scale`` in place, per row."""
    rows, v = z.shape
    block = _block_v(v)
    return Launch(_grad_kernel, (rows, triton.cdiv(v, block)),
                  (z, labels, lse, scale, v, z.stride(0), col_offset, float(z_scale)),
                  {"HAS_Z": bool(z_scale), "BLOCK_V": block, "RNE_BF16": _rne(z)}, _options(ROW_WARPS))


def segment_sum_launch(values, valid, order, offsets, sums, counts) -> Launch:
    """``sums[s] = sum(values[order[offsets[s]:offsets[s+1]]])`` and the same for ``valid``."""
    return Launch(_segment_sum_kernel, (sums.shape[0],), (values, valid, order, offsets, sums, counts),
                  {"BLOCK": SEGMENT_BLOCK}, _options(SEGMENT_WARPS))

