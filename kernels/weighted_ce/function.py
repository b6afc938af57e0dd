"""Exact reweighted linear cross-entropy at GEMM speed: the autograd Function and its planning.

Why not a per-token gradient in the forward, as Liger's fused linear CE does: a token's gradient
is ``c_t * (softmax(z_t) - onehot(y_t))`` with ``c_t = w_i * world / count_i * grad`` and the
weight ``w_i`` of its sample (Sow et al., ICLR 2025) is a softmax over the *global* batch of
normalised losses, known only after every token of every rank is reduced and all-gathered. But
``c_t`` is one scalar per row, so ``dH = c ⊙ (G W)`` and ``dW = G^T (c ⊙ H)`` with the unscaled
``G = softmax - onehot``: the scale can wait. Two exact modes follow:

* **lean** (memory O(block)): the forward keeps only the per-token LSE; the backward recomputes
  each logit block, the epilogue writes ``G * c`` once in the input dtype, then ``dH`` and ``dW``
  come from two more GEMMs. The backward walks the vocabulary in blocks when N <= V (each dW block
  is final; dH is accumulated in fp32, N*D*4 bytes) and the tokens otherwise (dW accumulated), so
  the fp32 accumulator is the smaller of the two. 8NDV FLOPs.
* **fast** (stores ``G``, N*V*itemsize bytes, and ``U = G W`` in fp32, N*D*4): the forward's
  epilogue also writes the unscaled ``G`` into the stored buffer and ``U`` follows from one GEMM;
  the backward is ``dH = c ⊙ U`` and one GEMM ``dW = G^T (c ⊙ H)``. 6NDV FLOPs.

Both modes run the same forward loop over token chunks (same GEMM shapes), so their losses,
per-sample losses and weights are bitwise identical; only the gradients' rounding differs.

On paper at N=16384, D=4096, V=128256, bf16 on an H100 (989 TF/s dense, 3.35 TB/s):

| mode | GEMM FLOPs | GEMM floor | epilogue HBM bytes | epilogue floor | extra memory |
|---|---|---|---|---|---|
| fast | 6NDV = 51.6 T | 52.2 ms | 12.6 GB fwd (z read twice, G written once) + ~2.3 GB bwd in PyTorch ops (c ⊙ U, c ⊙ H in fp32, casts) | 4.5 ms | G 4.2 GB + U 0.27 GB, and ~0.5 GB of fp32 transients (c ⊙ U, c ⊙ H) in the backward |
| lean | 8NDV = 68.9 T | 69.6 ms | 4.2 GB fwd + 8.4 GB bwd (read z, write G*c) | 3.8 ms | one 0.5 GiB block + dH fp32 0.27 GB |

The GEMM floors are at the datasheet's 989 TF/s; at a realistic cuBLAS rate (~700 TF/s, what an
8k^3 bf16 product reaches on the lent H100/H200) and this chunking, expect ~80 ms (fast) and
~105 ms (lean) for forward + backward, epilogues included.

The forward (deliverable 2 of issue 9) is a cuBLAS GEMM per token chunk + a Triton LSE/target
epilogue rather than one Triton kernel on 2-D (128 x 256) tiles with a split-V LSE merge. On paper
both do 2NDV = 17.2 TFLOP (17.4 ms at peak); the tiled kernel saves the logit round trip through
HBM (write 4.2 GB inside the GEMM, read 4.2 GB in the epilogue: ~1.3 ms that does not overlap)
but re-reads its H and W tiles from L2 for every output tile (N/128 * V/256 tiles x 3.1 MB =
~200 GB of L2 traffic, ~17 ms at ~12 TB/s, i.e. it is L2-bound unless tiles grow) and its GEMM is
Triton's, not cuBLAS's (on H100, Triton bf16 GEMMs typically reach 60-75 % of peak against
75-85 % for cuBLAS). cuBLAS + epilogue wins unless the Triton GEMM gets within ~7 % of cuBLAS,
and fast mode needs the logits written anyway (they become G). To be confirmed by
``python -m megareweight.kernels.bench`` on a GPU.

Determinism: GEMMs, the Triton epilogues (no atomics, fixed reduction trees), the sorted-segment
per-sample sums and the reweighting are all order-fixed, so identical inputs give identical bits.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

from megareweight.kernels.weighted_ce.epilogue import EpilogueOps, SampleLayout, TorchEpilogue, TritonEpilogue, sample_layout
from megareweight.kernels.weighted_ce.reference import (
    LossOutput,
    check_labels,
    check_strategy,
    check_z_loss,
    reweight_from_sums,
    samples_per_call,
)

MODES = ("auto", "fast", "lean")
EPILOGUES = ("auto", "triton", "torch")

#: Bytes of one [chunk, V] logit block: 512 MiB (2048 tokens at V=128256 in bf16) keeps every
#: GEMM large (a [2048, 4096] x [4096, 128256] GEMM has 8000 128x256 output tiles for 132 SMs)
#: while lean mode's workspace (block + fp32 dH accumulator) stays under 1 GB at the target
#: shape; at most 1/64 of the GPU's memory on smaller GPUs.
GPU_BLOCK_BYTES = 512 << 20
GPU_CHUNK_RANGE = (256, 8192)
#: On CPU the PyTorch epilogue makes two or three fp32 temporaries of the block: keep it small.
CPU_BLOCK_BYTES = 16 << 20
CPU_CHUNK_RANGE = (16, 8192)
#: ``mode="auto"`` stores the gradient (fast) when it takes at most this share of the GPU's total
#: memory (8 GB on an H100: the 4.2 GB of the target shape fits) and half of what is free now.
FAST_MAX_TOTAL_FRACTION = 0.10
#: ... and on CPU when it takes at most this many bytes.
CPU_FAST_MAX_BYTES = 1 << 30


class Plan(NamedTuple):
    """How one call runs: ``mode`` (fast or lean), ``chunk`` tokens per forward block, epilogue."""

    mode: str
    chunk: int
    epilogue: EpilogueOps


class Reweighting(NamedTuple):
    strategy: str
    r: float
    delta: float
    ignore_index: int
    group: Optional[dist.ProcessGroup]
    log_prior: Optional[torch.Tensor] = None  # [S] per-sample log weights (the ``domain`` strategy)
    z_loss: float = 0.0  # coefficient of the z-loss ``z_loss * lse^2`` per token


def _round_down(x: int, multiple: int) -> int:
    return x - x % multiple if x >= multiple else x


def chunk_rows(v: int, itemsize: int, gpu_memory: Optional[int]) -> int:
    """Tokens per [chunk, V] block: ``GPU_BLOCK_BYTES`` (at most 1/64 of the GPU) or
    ``CPU_BLOCK_BYTES`` (``gpu_memory=None``), clamped, a multiple of 128 (GPU) or 16 (CPU)."""
    if gpu_memory is not None:
        rows = min(GPU_BLOCK_BYTES, gpu_memory // 64) // (v * itemsize)
        lo, hi = GPU_CHUNK_RANGE
        return max(lo, min(hi, _round_down(rows, 128)))
    lo, hi = CPU_CHUNK_RANGE
    return max(lo, min(hi, _round_down(CPU_BLOCK_BYTES // (v * itemsize), 16)))


def auto_chunk_size(v: int, dtype: torch.dtype, device: torch.device) -> int:
    """:func:`chunk_rows` for this device, from its *total* memory.

    Why not free memory: the block shapes fix the GEMM calls and so the bits of the result; a
    chunk size that followed the allocator's state would make the loss curve depend on it.
    """
    gpu_memory = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    return chunk_rows(v, torch.empty((), dtype=dtype).element_size(), gpu_memory)


def stored_bytes(n: int, v: int, d: int, dtype: torch.dtype, need_h: bool, need_w: bool) -> int:
    """What fast mode keeps from forward to backward: G [N, V] (for dW) and U [N, D] fp32 (for dH)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return (n * v * itemsize if need_w else 0) + (n * d * 4 if need_h else 0)


def fast_budget(device: torch.device) -> int:
    """Default bytes fast mode may keep: ``FAST_MAX_TOTAL_FRACTION`` of the GPU's total memory,
    ``CPU_FAST_MAX_BYTES`` on CPU."""
    if device.type == "cuda":
        return int(FAST_MAX_TOTAL_FRACTION * torch.cuda.get_device_properties(device).total_memory)
    return CPU_FAST_MAX_BYTES


def resolve_mode(mode: str, stored: int, device: torch.device, budget: Optional[int] = None) -> str:
    """``auto`` -> fast when the stored gradient fits ``budget`` (default :func:`fast_budget`), else lean.

    The budget depends on the device's size (or the configured ``loss.fast_memory_gb``), never on
    the allocator's state: free memory changes from step to step, and a mode that followed it
    would change the numerics and the memory of a run mid-way.
    """
    if mode != "auto":
        return mode
    return "fast" if stored <= (fast_budget(device) if budget is None else budget) else "lean"


def plan_for_run(tokens: int, d: int, v: int, dtype: torch.dtype, device: torch.device, mode: str = "auto",
                 chunk_size: Optional[int] = None, budget: Optional[int] = None) -> tuple[str, int]:
    """The (mode, chunk size) a training run uses for every call, decided once at its start from
    the per-call shape (``tokens`` = micro-batch x sequence length) and the memory budget; the
    trainer logs it and stores it in its checkpoints, so a resumed run keeps it."""
    check_options(mode, chunk_size)
    stored = stored_bytes(tokens, v, d, dtype, need_h=True, need_w=True)
    return resolve_mode(mode, stored, device, budget), chunk_size or auto_chunk_size(v, dtype, device)


def _spans(n: int, step: int):
    for start in range(0, n, step):
        yield start, min(start + step, n)


def _mm_f32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """``out`` (fp32) = a @ b with fp32 output: cuBLAS accumulates in fp32 and rounds once."""
    if a.dtype == torch.float32:
        torch.mm(a, b, out=out)
    elif a.is_cuda:
        torch.mm(a, b, out_dtype=torch.float32, out=out)
    else:  # CPU has no mixed-dtype GEMM
        torch.mm(a.float(), b.float(), out=out)


def _addmm_f32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc`` (fp32) += a @ b without rounding the partial product to the inputs' dtype."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif not a.is_cuda:
        acc.addmm_(a.float(), b.float())
    else:
        try:  # cuBLAS C = A B + C with bf16/fp16 A, B and an fp32 C
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        except RuntimeError:  # builds whose addmm.dtype wants C in the inputs' dtype: one fp32 temporary
            acc.add_(torch.mm(a, b, out_dtype=torch.float32))


class LinearWeightedCE(torch.autograd.Function):
    """(h [N, D], w [V, D], labels [N]) -> (loss, per-sample loss, weights); see the module doc."""

    @staticmethod
    def forward(ctx, h, w, labels, layout: SampleLayout, rw: Reweighting, plan: Plan):
        n, d = h.shape
        v = w.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        fast = plan.mode == "fast" and (need_h or need_w)
        ep = plan.epilogue
        lse = torch.empty(n, dtype=torch.float32, device=h.device)
        target = torch.empty_like(lse)
        g_all = torch.empty((n, v), dtype=h.dtype, device=h.device) if fast and need_w else None
        u = torch.empty((n, d), dtype=torch.float32, device=h.device) if fast and need_h else None
        work = None if g_all is not None else torch.empty(min(plan.chunk, n) * v, dtype=h.dtype, device=h.device)
        z_scale = 2.0 * rw.z_loss  # d(z_loss * lse^2)/dz = 2 z_loss lse softmax: a per-row softmax factor
        for s, e in _spans(n, plan.chunk):
            z = g_all[s:e] if g_all is not None else work[: (e - s) * v].view(e - s, v)
            torch.matmul(h[s:e], w.t(), out=z)
            ep.lse_target(z, labels[s:e], lse[s:e], target[s:e], write_grad=fast, z_scale=z_scale)
            if u is not None:
                _mm_f32(z, w, out=u[s:e])
        del work
        valid = labels != rw.ignore_index
        token_loss = torch.where(valid, lse - target, torch.zeros_like(lse))
        sums, counts = ep.segment_sums(token_loss, valid.float(), layout)
        z_sums = None
        if rw.z_loss:
            z_sums, _ = ep.segment_sums(torch.where(valid, rw.z_loss * lse * lse, torch.zeros_like(lse)), valid.float(), layout)
        out = reweight_from_sums(sums, counts, rw.strategy, rw.r, rw.delta, rw.group, rw.log_prior, z_sums)
        coef = torch.where(valid, out.coef[layout.index], torch.zeros_like(lse))
        ctx.fast, ctx.plan, ctx.dtype, ctx.z_scale = fast, plan, h.dtype, z_scale
        if fast:
            ctx.save_for_backward(h if need_w else None, g_all, u, coef)
        else:
            ctx.save_for_backward(h, w, labels, lse, coef)
        z_out = out.z_loss if out.z_loss is not None else torch.empty(0, device=h.device)
        ctx.mark_non_differentiable(out.per_sample_loss, out.weights, z_out)
        return out.loss, out.per_sample_loss, out.weights, z_out

    @staticmethod
    def backward(ctx, grad_loss, _grad_per_sample, _grad_weights, _grad_z):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if ctx.fast:
            h, g_all, u, coef = ctx.saved_tensors
            scale = (coef * grad_loss.float())[:, None]
            dh = (u * scale).masked_fill_(scale == 0, 0.0).to(ctx.dtype) if need_h else None
            dw = g_all.t() @ (h * scale).to(ctx.dtype) if need_w else None
            return dh, dw, None, None, None, None
        h, w, labels, lse, coef = ctx.saved_tensors
        dh, dw = lean_backward(h, w, labels, lse, coef * grad_loss.float(), ctx.plan, need_h, need_w, ctx.z_scale)
        return dh, dw, None, None, None, None


def lean_backward(h, w, labels, lse, scale, plan: Plan, need_h: bool, need_w: bool, z_scale: float = 0.0):
    """dH, dW of ``sum_t scale_t * CE_t`` by recomputing logit blocks (see the module doc).

    Each block ``z`` is [chunk, V] (token blocks) or [N, chunk*V/N] (vocabulary blocks); the
    epilogue turns it into ``G * c`` in place in the input dtype; the output whose block is whole
    is written by a plain GEMM (one rounding), the other is accumulated in fp32.
    """
    if not (need_h or need_w):
        return None, None
    n, d = h.shape
    v = w.shape[0]
    blocks = lean_blocks(n, v, plan.chunk, need_h, need_w)
    by_vocab = _by_vocab(n, v, need_h, need_w)
    rows_max = max(r.stop - r.start for r, _ in blocks)
    cols_max = max(c.stop - c.start for _, c in blocks)
    work = torch.empty(rows_max * cols_max, dtype=h.dtype, device=h.device)
    f32 = {"dtype": torch.float32, "device": h.device}
    dh = torch.empty_like(h) if need_h and not by_vocab else None
    dw = torch.empty_like(w) if need_w and by_vocab else None
    dh32 = torch.zeros((n, d), **f32) if need_h and by_vocab else None
    dw32 = torch.zeros((v, d), **f32) if need_w and not by_vocab else None
    for rows, cols in blocks:
        shape = (rows.stop - rows.start, cols.stop - cols.start)
        z = work[: shape[0] * shape[1]].view(shape)
        torch.matmul(h[rows], w[cols].t(), out=z)
        plan.epilogue.grad_(z, labels[rows], lse[rows], scale[rows], cols.start, z_scale)
        if dh is not None:
            torch.matmul(z, w, out=dh[rows])
        if dh32 is not None:
            _addmm_f32_(dh32, z, w[cols])
        if dw is not None:
            torch.matmul(z.t(), h, out=dw[cols])
        if dw32 is not None:
            _addmm_f32_(dw32, z.t(), h[rows])
    if dh32 is not None:
        dh = dh32.to(h.dtype)
    if dw32 is not None:
        dw = dw32.to(w.dtype)
    return dh, dw


def _by_vocab(n: int, v: int, need_h: bool, need_w: bool) -> bool:
    return not need_h or (need_w and n <= v)


def lean_blocks(n: int, v: int, chunk: int, need_h: bool, need_w: bool) -> list[tuple[slice, slice]]:
    """(token rows, vocabulary columns) of each backward block of lean mode.

    Vocabulary blocks [N, ~chunk*V/N] when the fp32 accumulator would otherwise be dW (N <= V)
    or when only dW is needed; token blocks [chunk, V] otherwise.
    """
    if _by_vocab(n, v, need_h, need_w):
        # As many blocks as the budget needs, of equal width (a multiple of 128 when that is
        # >= 128), so that no thin tail block runs a GEMM at a fraction of the device's speed.
        count = -(-v // max(1, chunk * v // n))
        step = -(-v // count)
        step = min(v, step + (-step) % 128) if step >= 128 else step
        return [(slice(0, n), slice(a, b)) for a, b in _spans(v, step)]
    return [(slice(s, e), slice(0, v)) for s, e in _spans(n, chunk)]


def _epilogue(name: str, device: torch.device) -> EpilogueOps:
    if name == "auto":
        from megareweight.kernels.weighted_ce.impls import triton_available  # here: impls imports this module

        name = "triton" if device.type == "cuda" and triton_available() else "torch"
    return TritonEpilogue(device) if name == "triton" else TorchEpilogue()


def check_options(mode: str, chunk_size: Optional[int], epilogue: str = "auto") -> None:
    """One-line errors naming the argument and its allowed values, before any compute."""
    if mode not in MODES:
        raise ValueError(f"mode: unknown {mode!r}; allowed: {', '.join(MODES)}")
    if epilogue not in EPILOGUES:
        raise ValueError(f"epilogue: unknown {epilogue!r}; allowed: {', '.join(EPILOGUES)}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size: must be a positive number of tokens or None (auto), got {chunk_size!r}")


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
    sample_log_prior: Optional[torch.Tensor] = None,
    z_loss: float = 0.0,
    mode: str = "auto",
    chunk_size: Optional[int] = None,
    epilogue: str = "auto",
) -> LossOutput:
    """Reweighted LM-head cross-entropy without [N, V] fp32 logits; contract of
    :func:`megareweight.kernels.weighted_ce.reference.linear_weighted_ce` plus:

    ``mode``: ``"fast"`` (6NDV, stores the unscaled gradient: N*V*itemsize + N*D*4 bytes),
    ``"lean"`` (8NDV, one logit block of memory) or ``"auto"`` (fast when that fits
    :func:`resolve_mode`'s budget). ``chunk_size``: tokens per forward block (None: from V and
    the device, :func:`auto_chunk_size`). ``epilogue``: ``"triton"`` (``loss.impl=fused``),
    ``"torch"`` (``loss.impl=chunked``) or ``"auto"`` (Triton on CUDA).

    Under ``torch.autocast`` the GEMMs run in the autocast dtype, as the reference's matmul does;
    otherwise in the promoted dtype of ``hidden`` and ``weight``.
    """
    b, t, d = hidden.shape
    check_strategy(strategy, sample_log_prior, samples_per_call(b, segment_ids, num_segments))
    check_options(mode, chunk_size, epilogue)
    z_loss = check_z_loss(z_loss)
    if weight.dim() != 2 or weight.shape[1] != d:
        raise ValueError(f"weight: expected [V, {d}] to match hidden [B, T, {d}], got {tuple(weight.shape)}")
    if tuple(labels.shape) != (b, t):
        raise ValueError(f"labels: expected shape {(b, t)} to match hidden, got {tuple(labels.shape)}")
    device = hidden.device
    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
    else:
        dtype = torch.promote_types(hidden.dtype, weight.dtype)
    h2d = hidden.reshape(b * t, d).to(dtype).contiguous()
    w = weight.to(dtype).contiguous()
    v = w.shape[0]
    need_h, need_w = torch.is_grad_enabled() and h2d.requires_grad, torch.is_grad_enabled() and w.requires_grad
    plan = Plan(
        resolve_mode(mode, stored_bytes(b * t, v, d, dtype, need_h, need_w), device),
        chunk_size or auto_chunk_size(v, dtype, device),
        _epilogue(epilogue, device),
    )
    check_labels(labels, v, ignore_index)
    layout = sample_layout(labels, segment_ids, num_segments)
    rw = Reweighting(strategy, float(r), float(delta), int(ignore_index), group, sample_log_prior, z_loss)
    with torch.autocast(device.type, enabled=False):
        loss, per_sample, weights, z_out = LinearWeightedCE.apply(h2d, w, labels.reshape(-1).long().contiguous(), layout,
                                                                  rw, plan)
    return LossOutput(loss, per_sample, weights, z_out if z_loss else None)
