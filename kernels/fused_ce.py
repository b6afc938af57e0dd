"""Triton fused LM-head + reweighted cross-entropy (Sow et al., ICLR 2025).

Forward (one program per block of tokens): stream the vocabulary in tiles of ``BLOCK_V``; each
logit tile ``H[n] @ W[v].T`` is built in fp32 over ``BLOCK_D`` slices and folded into an online
log-sum-exp and the target logit, so the [N, V] logits never exist. The token loss
``lse - logit[label]`` and a token count are atomically added into per-sample buffers (a sample
is a row, or a packed document). Then, on the device and without a host sync: all-gather of the
per-sample means over the data-parallel group, min-max normalisation
``x_i = 2*delta*(l_i - (l_max+l_min)/2) / max(l_max-l_min, 1e-6)``, strategy score ``f(x)``, and
``w = softmax(f/r)`` (:func:`kernels.reference.reweight_from_sums`). The loss to back-propagate
is ``sum_i w_i * l_i * world_size``.

Backward (one program per (token block, vocab tile)): recompute the logit tile, turn it into
``g = (exp(logit - lse) - onehot) * w_i * world_size / count_i * grad`` using the ``lse`` saved
by the forward, then accumulate ``dH += g @ W`` and ``dW += g.T @ H`` slice by slice over D with
fp32 atomic adds. Why recompute rather than compute the gradient in the forward (as Liger does):
a token's gradient needs its sample's weight, which depends on every sample of the global batch.
``backward="gemm"`` swaps this for a chunked cuBLAS recompute (see
:func:`kernels.chunked.chunked_backward`) without atomics.

Interpreter (``TRITON_INTERPRET=1``, CPU tensors): bf16 ``tl.dot`` is wrong there, so every dot
gets fp32 operands; block sizes are chosen large to cut Python overhead. On a GPU, fp32 inputs use
IEEE fp32 dots (like torch's default, no TF32); fp16/bf16 inputs use tensor-core dots with fp32
accumulation. Atomic accumulation makes results non-deterministic in the last bits on a GPU.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from kernels.chunked import DEFAULT_CHUNK_ELEMENTS, chunked_backward
from kernels.reference import LossOutput, check_strategy, reweight_from_sums, sample_index

#: Read at import because ``triton.jit`` picks the interpreter when the decorator runs.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# (BLOCK_N, BLOCK_V, BLOCK_D). GPU values are untuned first guesses (no GPU was available while
# writing this); interpreter values minimise the number of Python-level block operations.
GPU_FWD_BLOCKS = (64, 128, 64)
GPU_BWD_BLOCKS = (64, 128, 64)
INTERPRET_BLOCKS = (32, 128, 64)
GPU_NUM_WARPS = 8
BACKWARD_MODES = ("atomic", "gemm")


@triton.jit
def _logit_tile(h_ptr, w_ptr, offs_n, mask_n, offs_v, mask_v, D, stride_h, stride_w,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                FP32_DOT: tl.constexpr):
    """fp32 [BLOCK_N, BLOCK_V] tile of H @ W.T, accumulated over D in BLOCK_D slices."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    rows_h = offs_n.to(tl.int64)[:, None] * stride_h
    rows_w = offs_v.to(tl.int64)[None, :] * stride_w
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        h = tl.load(h_ptr + rows_h + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        w = tl.load(w_ptr + rows_w + offs_d[:, None], mask=mask_v[None, :] & mask_d[:, None], other=0.0)
        if FP32_DOT:
            acc = tl.dot(h.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(h, w, acc)
    return acc


@triton.jit
def _forward_kernel(h_ptr, w_ptr, labels_ptr, sample_ptr, lse_ptr, sums_ptr, counts_ptr,
                    N, V, D, stride_h, stride_w, ignore_index,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                    FP32_DOT: tl.constexpr):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    labels = tl.load(labels_ptr + offs_n, mask=mask_n, other=ignore_index)
    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    target = tl.zeros([BLOCK_N], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        logits = _logit_tile(h_ptr, w_ptr, offs_n, mask_n, offs_v, mask_v, D, stride_h, stride_w,
                             BLOCK_N, BLOCK_V, BLOCK_D, FP32_DOT)
        logits = tl.where(mask_v[None, :], logits, float("-inf"))
        # Online log-sum-exp: every tile has at least one real column, so m_new is finite.
        m_new = tl.maximum(m, tl.max(logits, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), axis=1)
        m = m_new
        target += tl.sum(tl.where(offs_v[None, :] == labels[:, None], logits, 0.0), axis=1)
    lse = m + tl.log(s)
    tl.store(lse_ptr + offs_n, lse, mask=mask_n)
    valid = mask_n & (labels != ignore_index)
    sample = tl.load(sample_ptr + offs_n, mask=mask_n, other=0)
    tl.atomic_add(sums_ptr + sample, lse - target, mask=valid)
    tl.atomic_add(counts_ptr + sample, tl.full([BLOCK_N], 1.0, dtype=tl.float32), mask=valid)


@triton.jit
def _backward_kernel(h_ptr, w_ptr, labels_ptr, lse_ptr, scale_ptr, dh_ptr, dw_ptr,
                     N, V, D, stride_h, stride_w,
                     BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                     FP32_DOT: tl.constexpr, COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_n = offs_n < N
    mask_v = offs_v < V
    # scale = w_i * world / count_i * grad for the token's sample; 0 for ignored / padded tokens.
    scale = tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0)
    labels = tl.load(labels_ptr + offs_n, mask=mask_n, other=-1)
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
    logits = _logit_tile(h_ptr, w_ptr, offs_n, mask_n, offs_v, mask_v, D, stride_h, stride_w,
                         BLOCK_N, BLOCK_V, BLOCK_D, FP32_DOT)
    p = tl.exp(logits - lse[:, None])
    onehot = tl.where(offs_v[None, :] == labels[:, None], 1.0, 0.0)
    g = tl.where(mask_v[None, :], (p - onehot) * scale[:, None], 0.0)
    if FP32_DOT:
        g_op = g
    else:
        g_op = g.to(h_ptr.dtype.element_ty)
    rows_h = offs_n.to(tl.int64)[:, None] * stride_h
    rows_w = offs_v.to(tl.int64)[:, None] * stride_w
    rows_dh = offs_n.to(tl.int64)[:, None] * D
    rows_dw = offs_v.to(tl.int64)[:, None] * D
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        if COMPUTE_DH:
            w = tl.load(w_ptr + rows_w + offs_d[None, :], mask=mask_v[:, None] & mask_d[None, :], other=0.0)
            if FP32_DOT:
                dh = tl.dot(g_op, w.to(tl.float32), input_precision="ieee")
            else:
                dh = tl.dot(g_op, w)
            tl.atomic_add(dh_ptr + rows_dh + offs_d[None, :], dh, mask=mask_n[:, None] & mask_d[None, :])
        if COMPUTE_DW:
            h = tl.load(h_ptr + rows_h + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0)
            if FP32_DOT:
                dw = tl.dot(tl.trans(g_op), h.to(tl.float32), input_precision="ieee")
            else:
                dw = tl.dot(tl.trans(g_op), h)
            tl.atomic_add(dw_ptr + rows_dw + offs_d[None, :], dw, mask=mask_v[:, None] & mask_d[None, :])


def _launch_options(h2d: torch.Tensor, blocks: Optional[tuple[int, int, int]], backward: bool) -> tuple[tuple[int, int, int], bool, dict]:
    if h2d.device.type != "cuda" and not INTERPRET:
        raise RuntimeError(
            "fused_linear_weighted_ce needs CUDA tensors, or TRITON_INTERPRET=1 set before "
            "kernels.fused_ce is imported (CPU interpreter); use kernels.chunked on CPU"
        )
    if blocks is None:
        blocks = INTERPRET_BLOCKS if INTERPRET else (GPU_BWD_BLOCKS if backward else GPU_FWD_BLOCKS)
    fp32_dot = INTERPRET or h2d.dtype == torch.float32
    extra = {} if INTERPRET else {"num_warps": GPU_NUM_WARPS}
    return blocks, fp32_dot, extra


class _FusedLinearWeightedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h2d, weight, labels, index, num_samples, strategy, r, delta, ignore_index, group, blocks, backward_mode):
        n, d = h2d.shape
        v = weight.shape[0]
        (bn, bv, bd), fp32_dot, extra = _launch_options(h2d, blocks, backward=False)
        lse = torch.empty(n, dtype=torch.float32, device=h2d.device)
        sums = torch.zeros(num_samples, dtype=torch.float32, device=h2d.device)
        counts = torch.zeros(num_samples, dtype=torch.float32, device=h2d.device)
        _forward_kernel[(triton.cdiv(n, bn),)](
            h2d, weight, labels, index, lse, sums, counts,
            n, v, d, h2d.stride(0), weight.stride(0), ignore_index,
            BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd, FP32_DOT=fp32_dot, **extra,
        )
        ep = reweight_from_sums(sums, counts, strategy, r, delta, group)
        valid = labels != ignore_index
        coef_token = torch.where(valid, ep.coef[index], torch.zeros_like(lse))
        ctx.save_for_backward(h2d, weight, labels, lse, coef_token)
        ctx.blocks = blocks
        ctx.backward_mode = backward_mode
        ctx.mark_non_differentiable(ep.per_sample_loss, ep.weights)
        return ep.loss, ep.per_sample_loss, ep.weights

    @staticmethod
    def backward(ctx, grad_loss, _grad_per_sample, _grad_weights):
        h2d, weight, labels, lse, coef_token = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, d = h2d.shape
        v = weight.shape[0]
        scale = (coef_token * grad_loss.float()).contiguous()
        if ctx.backward_mode == "gemm":
            safe_labels = torch.where(scale != 0, labels, torch.zeros_like(labels)).clamp_(0, v - 1)
            chunk = max(1, DEFAULT_CHUNK_ELEMENTS // v)
            dh, dw = chunked_backward(h2d, weight, safe_labels, lse, scale, need_h, need_w, chunk)
            return dh, dw, None, None, None, None, None, None, None, None, None, None
        (bn, bv, bd), fp32_dot, extra = _launch_options(h2d, ctx.blocks, backward=True)
        dh = torch.zeros((n, d), dtype=torch.float32, device=h2d.device) if need_h else lse  # dummy ptr
        dw = torch.zeros((v, d), dtype=torch.float32, device=h2d.device) if need_w else lse
        if need_h or need_w:
            _backward_kernel[(triton.cdiv(n, bn), triton.cdiv(v, bv))](
                h2d, weight, labels, lse, scale, dh, dw,
                n, v, d, h2d.stride(0), weight.stride(0),
                BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd, FP32_DOT=fp32_dot,
                COMPUTE_DH=need_h, COMPUTE_DW=need_w, **extra,
            )
        grad_h = dh.to(h2d.dtype) if need_h else None
        grad_w = dw.to(weight.dtype) if need_w else None
        return grad_h, grad_w, None, None, None, None, None, None, None, None, None, None


def fused_linear_weighted_ce(
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
    block_sizes: Optional[tuple[int, int, int]] = None,
    backward: str = "atomic",
) -> LossOutput:
    """Reweighted LM-head cross-entropy, fused in Triton; contract of
    :func:`kernels.reference.linear_weighted_ce`.

    ``block_sizes`` = (BLOCK_N, BLOCK_V, BLOCK_D), each a power of two >= 16, overrides the
    defaults (tests use small blocks to exercise several vocab tiles on tiny shapes).

    ``backward``: ``"atomic"`` (default) is the fully fused Triton backward described above;
    ``"gemm"`` recomputes logits per token chunk with the GEMM library (cuBLAS) and applies the
    same ``softmax - onehot`` scaling in PyTorch: one [chunk, V] block is materialised, but no
    atomics. Which is faster depends on the GPU and on V (dH receives V / BLOCK_V atomic adds per
    element); ``python -m kernels.bench`` times both.
    """
    check_strategy(strategy)
    if backward not in BACKWARD_MODES:
        raise ValueError(f"backward: unknown {backward!r}; allowed: {', '.join(BACKWARD_MODES)}")
    b, t, d = hidden.shape
    if weight.shape[1] != d:
        raise ValueError(f"hidden has D={d} but weight is {tuple(weight.shape)}")
    h2d = hidden.reshape(b * t, d).contiguous()
    weight_c = weight.contiguous()
    index, num_samples = sample_index(labels, segment_ids, num_segments)
    loss, per_sample, weights = _FusedLinearWeightedCE.apply(
        h2d, weight_c, labels.reshape(-1).contiguous(), index.to(torch.int32).contiguous(), num_samples,
        strategy, float(r), float(delta), int(ignore_index), group, block_sizes, backward,
    )
    return LossOutput(loss, per_sample, weights)


def aot_compile(arch: int = 90, dtype: str = "bf16") -> dict[str, int]:
    """Compile both kernels for a CUDA target without a GPU (Triton's bundled ptxas).

    Why: this machine class has no GPU, and the interpreter takes other code paths (fp32 dots),
    so this is the only local check that the tensor-core path type-checks, lowers and fits in
    shared memory. Returns the shared memory (bytes) per kernel. Needs TRITON_INTERPRET unset.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if INTERPRET:
        raise RuntimeError("aot_compile needs TRITON_INTERPRET unset when kernels.fused_ce is imported")
    ptr = f"*{dtype}"
    fp32_dot = dtype == "fp32"
    common = {"N": "i32", "V": "i32", "D": "i32", "stride_h": "i32", "stride_w": "i32",
              "BLOCK_N": "constexpr", "BLOCK_V": "constexpr", "BLOCK_D": "constexpr", "FP32_DOT": "constexpr"}
    fwd_sig = {"h_ptr": ptr, "w_ptr": ptr, "labels_ptr": "*i64", "sample_ptr": "*i32", "lse_ptr": "*fp32",
               "sums_ptr": "*fp32", "counts_ptr": "*fp32", **common, "ignore_index": "i32"}
    bwd_sig = {"h_ptr": ptr, "w_ptr": ptr, "labels_ptr": "*i64", "lse_ptr": "*fp32", "scale_ptr": "*fp32",
               "dh_ptr": "*fp32", "dw_ptr": "*fp32", **common, "COMPUTE_DH": "constexpr", "COMPUTE_DW": "constexpr"}
    target = GPUTarget("cuda", arch, 32)
    out = {}
    for name, fn, sig, blocks, extra in (
        ("forward", _forward_kernel, fwd_sig, GPU_FWD_BLOCKS, {}),
        ("backward", _backward_kernel, bwd_sig, GPU_BWD_BLOCKS, {"COMPUTE_DH": True, "COMPUTE_DW": True}),
    ):
        constexprs = {"BLOCK_N": blocks[0], "BLOCK_V": blocks[1], "BLOCK_D": blocks[2], "FP32_DOT": fp32_dot, **extra}
        compiled = triton.compile(ASTSource(fn, sig, constexprs=constexprs), target=target,
                                  options={"num_warps": GPU_NUM_WARPS})
        out[name] = compiled.metadata.shared
    return out
