"""Throughput telemetry: model FLOPs per token, the device's peak, tokens/s, TFLOP/s, MFU, memory.

**FLOPs per token** (:func:`flops_per_token`; PaLM, Chowdhery et al. 2022, appendix B)::

    6 * N_matmul  +  12 * n_layers * d_model * seq_len

* ``N_matmul``: every weight that takes part in a matrix multiply: the attention and SwiGLU
  projections and the LM head. Not counted: the input-embedding lookup (a gather, no FLOPs) and
  the RMSNorm gains (element-wise). With tied embeddings the shared [V, D] matrix is counted once,
  as the LM head. ``6 = 2`` (multiply-add) ``x 3`` (forward, backward w.r.t. inputs, backward
  w.r.t. weights).
* ``12 * L * d * T``: the attention scores ``Q K^T`` and the weighted sum ``A V`` (``2 * T * d``
  multiply-adds each per token and layer, times 3 for forward and backward). **No causal
  halving**: the causal mask means a FlashAttention kernel executes about half of these, but
  PaLM, Megatron-LM and torchtitan all count the full square, so MFU figures stay comparable with
  published ones. At the 1.4b shape (d 2048, 24 layers, T 2048, 32k vocabulary) the attention
  term is 1.21e9 of 9.00e9 FLOPs per token (13 %); halving it would lower MFU by 6.7 %
  (``megareweight model-info --size 1.4b``).
* Model FLOPs, not hardware FLOPs: recomputation (activation checkpointing; the fused loss's
  "lean" backward that recomputes the logits) is not counted, as MFU's definition requires.

**MFU** = achieved model FLOP/s per device / the device's dense bf16 peak. The peak comes from
``train.peak_tflops`` when set, else from :data:`PEAK_BF16_TFLOPS` matched on the CUDA device
name; for any other device (CPU included) MFU is not reported rather than guessed.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
import torch.nn as nn

from megareweight.model import ModelArgs, build_model, count_parameters
from megareweight.hardware import PEAK_BF16_TFLOPS, lookup_peak_tflops  # noqa: F401 (re-exported)

GIB = 1024**3


def matmul_parameters(model: nn.Module) -> int:
    """Parameters used in matrix multiplies: all but norm gains and an untied input embedding."""
    total = count_parameters(model)
    norms = sum(p.numel() for p in model.parameters() if p.dim() == 1)
    untied_embedding = 0 if model.args.tie_embeddings else model.embed.weight.numel()
    return total - norms - untied_embedding


def flops_per_token(args: ModelArgs, seq_len: int) -> int:
    """Training FLOPs per token, ``6 * N_matmul + 12 * n_layers * d_model * seq_len`` (module doc).

    Counted on a meta-device model built from ``args`` (exact, allocation-free, also when the
    training model is sharded by ZeRO-3).
    """
    model = build_model(args, device="meta")
    return 6 * matmul_parameters(model) + 12 * args.n_layers * args.d_model * seq_len


def device_name(device: torch.device) -> str:
    """``torch.cuda.get_device_name`` on CUDA, else the device type (``cpu``)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def peak_tflops(device: torch.device, configured: Optional[float] = None) -> Optional[float]:
    """``train.peak_tflops`` when set, else the table's value for a CUDA device, else None."""
    if configured:
        return float(configured)
    return lookup_peak_tflops(device_name(device)) if device.type == "cuda" else None


@dataclasses.dataclass
class ThroughputMeter:
    """Counts tokens and step time; :meth:`row` turns the last log interval into metrics.

    The time of a step runs from fetching its first micro-batch to the end of its optimizer step
    (as the loop measures it); evaluation, checkpoints and logging between steps are excluded, so
    tokens/s is the training speed, not the wall-clock average. The loop's one host sync per step
    sits inside that window, so device work is accounted to the step that queued it (the optimizer
    step's kernels may finish during the next step: in a steady state the sums agree).

    ``tokens`` is cumulative over the whole run, also across resumes: it is restored from the
    checkpoint, not recomputed as step x tokens-per-step (the global batch may change on resume).
    """

    flops_per_token: int
    world_size: int
    device: torch.device
    peak_tflops: Optional[float] = None
    tokens: int = 0
    _interval_tokens: int = 0
    _interval_seconds: float = 0.0

    def add_step(self, tokens: int, seconds: float) -> None:
        """One optimizer step over ``tokens`` global tokens took ``seconds``."""
        self.tokens += tokens
        self._interval_tokens += tokens
        self._interval_seconds += seconds

    def row(self) -> dict[str, Any]:
        """``tokens``, ``tokens_per_s`` (global), ``model_tflops`` (per device), ``mfu`` (when the
        peak is known), ``max_memory_gib`` (CUDA: this rank's peak allocation since the last row).
        Starts a new interval."""
        row: dict[str, Any] = {"tokens": self.tokens}
        if self._interval_seconds > 0:
            tokens_per_s = self._interval_tokens / self._interval_seconds
            tflops = tokens_per_s * self.flops_per_token / self.world_size / 1e12
            row.update(tokens_per_s=tokens_per_s, model_tflops=tflops)
            if self.peak_tflops:
                row["mfu"] = tflops / self.peak_tflops
        if self.device.type == "cuda":
            row["max_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / GIB
            torch.cuda.reset_peak_memory_stats(self.device)
        self._interval_tokens, self._interval_seconds = 0, 0.0
        return row
