"""Ahead-of-time check of the Triton kernels for a CUDA target, without a GPU.

    python -m megareweight.kernels.aot --arch 90 --dtype bf16 --out DIR [--tokens 16384 --hidden 4096 --vocab 128256]

Why: the CPU interpreter runs other code (no tensor cores, no shared memory, no pipelining), so
this is the only local check of what a GPU would run. What the runtime compiles depends on its
*specialisation* of the arguments: a pointer that is 16-byte aligned and an integer divisible by 16
carry ``tt.divisibility=16`` (vectorised, pipelined loads) and an integer equal to 1 becomes a
constant. Compiling without that checks a different kernel. So this module builds every launch the
default path makes at the given shape with the very functions the runtime launches with
(:mod:`megareweight.kernels.weighted_ce.triton_kernels`'s ``*_launch``), turns their arguments into a
specialisation with Triton's own binder (``create_function_from_signature`` + ``_pack_args``,
as ``JITFunction.run`` does; mock tensors stand for aligned allocations: at these shapes every
chunk starts at a multiple of 128 rows) and compiles each distinct specialisation for sm_<arch>.

Writes ``DIR/<kernel>.ptx`` and ``DIR/summary.json`` = ``[{kernel, specialization, shared_bytes,
registers, spills}]``: shared memory from the compiled metadata, registers and spill bytes from
``ptxas -v`` (the ptxas that Triton bundles, run with the flags Triton uses). Exit status 1 when a
kernel needs more than 232,448 B of shared memory (227 KiB, an H100 SM's opt-in maximum), spills,
or has a full memory barrier in its PTX (``membar.gl``, ``fence.sc``, ``fence.acq_rel``: what
acq_rel atomics compile to, and none of these kernels needs one); 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

MAX_SHARED_BYTES = 232_448
FORBIDDEN_PTX = ("membar.gl", "fence.sc", "fence.acq_rel")
DTYPES = ("bf16", "fp16", "fp32")


class MockTensor:
    """Stands for a tensor in a launch: dtype, shape, strides and a 16-byte-aligned address."""

    def __init__(self, dtype, *shape: int):
        self.dtype = dtype
        self.shape = tuple(shape)

    def stride(self, dim: Optional[int] = None):
        strides = [1] * len(self.shape)
        for i in range(len(self.shape) - 2, -1, -1):
            strides[i] = strides[i + 1] * self.shape[i + 1]
        return tuple(strides) if dim is None else strides[dim]

    @staticmethod
    def data_ptr() -> int:
        return 0


def default_launches(n: int, d: int, v: int, dtype, gpu_memory: int) -> list[tuple[str, object]]:
    """Every Triton launch of ``loss.impl=fused`` at this shape (both modes), as (name, Launch).

    Uses the planner's own chunk rules (:func:`megareweight.kernels.weighted_ce.function.chunk_rows`,
    :func:`megareweight.kernels.weighted_ce.function.lean_blocks`) with a GPU of ``gpu_memory`` bytes.
    """
    import torch

    from megareweight.kernels.weighted_ce import triton_kernels as tk
    from megareweight.kernels.weighted_ce.function import _spans, chunk_rows, lean_blocks

    itemsize = torch.empty((), dtype=dtype).element_size()
    chunk = chunk_rows(v, itemsize, gpu_memory)
    f32, i64 = torch.float32, torch.int64
    out = []
    for s, e in _spans(n, chunk):
        rows = e - s
        for write_grad in (False, True):
            name = "lse_target_write_grad" if write_grad else "lse_target"
            out.append((name, tk.lse_target_launch(MockTensor(dtype, rows, v), MockTensor(i64, rows),
                                                   MockTensor(f32, rows), MockTensor(f32, rows), write_grad)))
    for need_h, need_w in ((True, True), (True, False), (False, True)):
        for rows, cols in lean_blocks(n, v, chunk, need_h, need_w):
            r, c = rows.stop - rows.start, cols.stop - cols.start
            out.append(("grad", tk.grad_launch(MockTensor(dtype, r, c), MockTensor(i64, r), MockTensor(f32, r),
                                               MockTensor(f32, r), cols.start)))
    for samples in (n // 4096 or 1, n):  # one sample per 4096-token row, or many packed documents
        out.append(("segment_sum", tk.segment_sum_launch(MockTensor(f32, n), MockTensor(f32, n), MockTensor(i64, n),
                                                         MockTensor(i64, samples + 1), MockTensor(f32, samples),
                                                         MockTensor(f32, samples))))
    return out


def specialize(launch, backend):
    """(signature, constexprs, attrs, options) exactly as ``JITFunction.run`` derives them."""
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    kwargs = {**launch.constexprs, **launch.options, "debug": False}
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return signature, constexprs, attrs, options, specialization


def describe(fn, specialization) -> str:
    """'V=i32:D stride_z=i32:D ...': each argument's type and runtime specialisation."""
    parts = []
    for name, (kind, attr) in zip(fn.arg_names, specialization):
        parts.append(f"{name}={kind}" + (f":{attr}" if attr not in (None, "") and kind != "constexpr" else "")
                     + (f"={attr}" if kind == "constexpr" else ""))
    return " ".join(parts)


def ptxas_usage(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spill bytes) from ``ptxas -v`` with the flags Triton's own compile uses."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        cmd = [get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(arch)}", str(src), "-o", str(Path(tmp) / "k.cubin")]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    if regs is None:
        raise RuntimeError(f"could not read the register count from ptxas -v:\n{log}")
    return int(regs.group(1)), sum(spills)


def compile_all(arch: int, dtype_name: str, out_dir: Path, n: int, d: int, v: int, gpu_memory: int) -> list[dict]:
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    seen: set[str] = set()
    per_role: dict[str, int] = {}
    rows = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for role, launch in default_launches(n, d, v, dtype, gpu_memory):
        signature, constexprs, attrs, options, spec = specialize(launch, backend)
        key = describe(launch.kernel, spec) + repr(sorted(options.__dict__.items()))
        if key in seen:
            continue
        seen.add(key)
        name = role if role not in per_role else f"{role}_{per_role[role]}"
        per_role[role] = per_role.get(role, 0) + 1
        compiled = triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
        ptx = compiled.asm["ptx"]
        (out_dir / f"{name}.ptx").write_text(ptx)
        registers, spills = ptxas_usage(ptx, arch)
        barriers = [b for b in FORBIDDEN_PTX if b in ptx]
        rows.append({"kernel": name, "specialization": describe(launch.kernel, spec),
                     "num_warps": options.num_warps, "shared_bytes": int(compiled.metadata.shared),
                     "registers": registers, "spills": spills, "full_barriers": barriers})
    return rows


def problems(rows: list[dict]) -> list[str]:
    out = []
    for row in rows:
        if row["shared_bytes"] > MAX_SHARED_BYTES:
            out.append(f"{row['kernel']}: {row['shared_bytes']} B shared memory > {MAX_SHARED_BYTES}")
        if row["spills"]:
            out.append(f"{row['kernel']}: spills {row['spills']} B of registers")
        if row["full_barriers"]:
            out.append(f"{row['kernel']}: full memory barrier in PTX ({', '.join(row['full_barriers'])})")
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megareweight.kernels.aot", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 (H100/H200)")
    parser.add_argument("--dtype", default="bf16", choices=DTYPES)
    parser.add_argument("--out", required=True, help="directory for <kernel>.ptx and summary.json")
    parser.add_argument("--tokens", type=int, default=16384, help="N (default 16384)")
    parser.add_argument("--hidden", type=int, default=4096, help="D (default 4096)")
    parser.add_argument("--vocab", type=int, default=128256, help="V (default 128256)")
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0, help="device memory the chunk rule assumes")
    args = parser.parse_args(argv)
    for key in ("tokens", "hidden", "vocab"):
        if getattr(args, key) < 1:
            parser.error(f"--{key} must be >= 1")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("TRITON_INTERPRET=1 is set: unset it, the interpreter compiles nothing")
    rows = compile_all(args.arch, args.dtype, Path(args.out), args.tokens, args.hidden, args.vocab,
                       int(args.gpu_memory_gb * 1e9))
    (Path(args.out) / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    for row in rows:
        print(f"{row['kernel']:24s} shared={row['shared_bytes']:>7d} B  registers={row['registers']:>3d}  "
              f"spills={row['spills']}  warps={row['num_warps']}")
    bad = problems(rows)
    for line in bad:
        print(f"megareweight.kernels.aot: error: {line}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
