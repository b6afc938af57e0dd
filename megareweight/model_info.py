"""``megareweight model-info``: parameter count, ZeRO-3 memory per GPU and training FLOPs per token.

Why: to size a cluster job before launching it. Everything is computed without allocating the
model: it is built on PyTorch's ``meta`` device, so the 7b count is exact (not a formula) and
takes milliseconds.

* ``parameters``: distinct parameters (a tied embedding counts once).
* ZeRO-3 model-state memory per GPU: DeepSpeed's own estimator
  (``deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs``; mixed-precision Adam,
  18 bytes per parameter spread over all GPUs, plus the largest layer gathered in fp32), with the
  optimizer and parameters on the GPU (no offload) and with both offloaded to CPU. Activations
  are not included: they depend on micro-batch size and activation checkpointing.
* ``flops_per_token``: training FLOPs per token as used for MFU,
  ``6 * N_matmul + 12 * n_layers * d_model * seq_len`` (PaLM's convention, no causal halving):
  the same function the trainer logs ``model_tflops``/``mfu`` with,
  :func:`megareweight.train.throughput.flops_per_token`, whose docstring explains each term.
"""
from __future__ import annotations

from typing import Any

import torch.nn as nn

from megareweight.model import build_model, count_parameters, model_args
from megareweight.train.throughput import flops_per_token, matmul_parameters

GIB = 1024**3


def largest_layer_parameters(model: nn.Module) -> int:
    """The most parameters any single module owns directly (what ZeRO-3 gathers at once)."""
    return max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)


def model_info(size: str, vocab_size: int = 32000, seq_len: int = 2048, nodes: int = 1,
               gpus_per_node: int = 8, **shape: Any) -> dict[str, Any]:
    """Facts about a named model size for a ``nodes`` x ``gpus_per_node`` job (see module doc).

    ``shape`` takes the same overrides as the config's ``model.*`` keys (``d_model``, ``n_layers``,
    ``n_heads``, ``n_kv_heads``, ``ffn_dim``, ``max_seq_len``, ``tie_embeddings``; None = the
    size's value), so a config's model can be sized before it is trained.
    """
    if nodes < 1 or gpus_per_node < 1:
        raise ValueError(f"--nodes and --gpus-per-node must be >= 1, got {nodes}, {gpus_per_node}")
    args = model_args(size, vocab_size=vocab_size, **shape)
    if seq_len < 1 or seq_len > args.max_seq_len:
        raise ValueError(f"--seq-len must be in [1, {args.max_seq_len}] for {size}, got {seq_len}")
    model = build_model(args, device="meta")
    total = count_parameters(model)
    largest = largest_layer_parameters(model)
    n_matmul = matmul_parameters(model)
    flops = flops_per_token(args, seq_len)

    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    _, gpu_no_offload, _ = estimate_zero3_model_states_mem_needs(
        total, largest, gpus_per_node, nodes, cpu_offload=False, zero_init=True)
    cpu_offload_host, gpu_offload, _ = estimate_zero3_model_states_mem_needs(
        total, largest, gpus_per_node, nodes, cpu_offload=True, cpu_offload_params=True, zero_init=True)
    return {
        "size": size,
        "parameters": total,
        "matmul_parameters": n_matmul,
        "largest_layer_parameters": largest,
        "d_model": args.d_model,
        "n_layers": args.n_layers,
        "n_heads": args.n_heads,
        "vocab_size": args.vocab_size,
        "tie_embeddings": args.tie_embeddings,
        "seq_len": seq_len,
        "nodes": nodes,
        "gpus_per_node": gpus_per_node,
        "zero3_model_states_gib_per_gpu": round(gpu_no_offload / GIB, 3),
        "zero3_offload_gib_per_gpu": round(gpu_offload / GIB, 3),
        "zero3_offload_host_gib_per_node": round(cpu_offload_host / GIB, 3),
        "flops_per_token": flops,
        "flops_per_token_formula": "6*matmul_parameters + 12*n_layers*d_model*seq_len",
    }
