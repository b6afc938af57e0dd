"""Microbenchmark: LM head + per-sample reweighted CE, ours vs. PyTorch eager, torch.compile, Liger.

Why these peers: eager is what a naive trainer does (materialise [N, V] logits, CE, weights);
torch.compile is the cheap way to fuse it; Liger's fused linear CE (``reduction="none"``, then a
PyTorch per-sample reduction and the Sow et al. weighting) is the strongest off-the-shelf kernel.
Every implementation computes the same reweighted loss (strategy linupper, r=1).

On CUDA: bf16, N in {4096, 16384}, D in {2048, 4096}, V in {32000, 128256}; time (CUDA events)
and peak allocated memory above the inputs, for forward and forward+backward; achieved TFLOP/s
(2*N*D*V forward, 6*N*D*V forward+backward by convention) and the fraction of the device's dense
bf16 peak. Without CUDA it runs one small fp32 shape (Triton paths under TRITON_INTERPRET=1) so
the harness itself is exercised; those timings say nothing about GPU speed.

    python -m kernels.bench [--out DIR] [--quick]
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

if not torch.cuda.is_available():
    # Must happen before anything imports triton (Liger does at import time).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels.reference import linear_weighted_ce as reference_ce, per_sample_ce  # noqa: E402
from megareweight.reweighting import weighted_loss  # noqa: E402

#: Dense bf16 tensor-core peaks (TFLOP/s, without sparsity), matched by substring of the name.
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}

GPU_SHAPES = [(n, d, v) for n in (4096, 16384) for d in (2048, 4096) for v in (32000, 128256)]
CPU_SHAPES = [(256, 64, 512)]
STRATEGY, R = "linupper", 1.0


def device_peak(name: str) -> Optional[float]:
    for key, peak in PEAK_BF16_TFLOPS.items():  # "H100 PCIe" is checked before "H100"
        if key in name:
            return peak
    return None


def _liger_ce(hidden, weight, labels, **kw):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    b, t, d = hidden.shape
    flat = labels.reshape(-1)
    tok = liger_fused_linear_cross_entropy(hidden.reshape(-1, d), weight, flat, ignore_index=-100, reduction="none")
    index = torch.arange(b, device=hidden.device).repeat_interleave(t)
    losses, counts = per_sample_ce(tok, flat != -100, index, b)
    return weighted_loss(losses, kw["strategy"], kw["r"], mask=counts > 0).loss


def implementations(quick: bool, on_cuda: bool) -> dict[str, Callable | str]:
    """name -> fn(hidden, weight, labels, strategy=, r=) returning the loss, or a skip reason."""
    from kernels.chunked import linear_weighted_ce as chunked_ce

    # "fused_gemm_bwd": our Triton forward with the chunked cuBLAS backward instead of the atomic one.
    impls: dict[str, Callable | str] = {"eager": lambda *a, **k: reference_ce(*a, **k).loss}
    if quick and not on_cuda:
        impls["compile"] = "skipped: --quick on CPU (compilation takes tens of seconds)"
    else:
        if not on_cuda:
            # torch 2.13's Inductor CPU vectoriser asserts on index_add (scatter atomic_add) into
            # the small per-sample buffer; scalar C++ codegen compiles it fine.
            import torch._inductor.config as inductor_config

            inductor_config.cpp.simdlen = 1
        compiled = torch.compile(reference_ce)
        impls["compile"] = lambda *a, **k: compiled(*a, **k).loss
    try:
        import liger_kernel.transformers.functional  # noqa: F401

        impls["liger"] = _liger_ce
    except Exception as exc:  # noqa: BLE001 - report any import failure as a skip
        impls["liger"] = f"skipped: liger_kernel unavailable ({exc.__class__.__name__})"
    impls["chunked"] = lambda *a, **k: chunked_ce(*a, **k).loss
    try:
        from kernels.fused_ce import fused_linear_weighted_ce

        impls["fused"] = lambda *a, **k: fused_linear_weighted_ce(*a, **k).loss
        impls["fused_gemm_bwd"] = lambda *a, **k: fused_linear_weighted_ce(*a, backward="gemm", **k).loss
    except Exception as exc:  # noqa: BLE001
        impls["fused"] = impls["fused_gemm_bwd"] = f"skipped: triton unavailable ({exc.__class__.__name__})"
    return impls


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(step: Callable[[], None], device: torch.device, warmup: int, iters: int) -> tuple[float, float, Optional[float]]:
    """Median and minimum milliseconds per call, and peak memory (MiB) above what was allocated
    before (CUDA only; CPU has no allocator statistics). On shared CPUs the minimum is the more
    honest number: the median absorbs scheduling stalls from other processes."""
    for _ in range(warmup):
        step()
    _sync(device)
    base = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    peak = None
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    times.sort()
    return times[len(times) // 2], times[0], peak


def _sig(x: float) -> float:
    """Four significant digits: keeps interpreter-scale numbers (1e-4 TFLOP/s) readable."""
    return float(f"{x:.4g}")


def bench_shape(name, fn, n, d, v, dtype, device, warmup, iters, peak_tflops) -> list[dict]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    b = max(1, n // 256)
    t = n // b
    hidden = torch.randn(b, t, d, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, d, generator=gen) / d**0.5).to(device=device, dtype=dtype).requires_grad_()
    labels = torch.randint(0, v, (b, t), generator=gen).to(device)
    labels[:, :3] = -100
    rows = []
    out = {}

    def fwd() -> None:
        out["loss"] = fn(hidden, weight, labels, strategy=STRATEGY, r=R)

    def fwd_bwd() -> None:
        hidden.grad = weight.grad = None
        fn(hidden, weight, labels, strategy=STRATEGY, r=R).backward()

    for mode, step, flops in (("fwd", fwd, 2 * n * d * v), ("fwd+bwd", fwd_bwd, 6 * n * d * v)):
        row = {"impl": name, "N": n, "D": d, "V": v, "dtype": str(dtype).replace("torch.", ""), "mode": mode}
        try:
            ms, ms_min, peak = time_call(step, device, warmup, iters)
            tflops = flops / (ms * 1e-3) / 1e12
            row.update(status="ok", ms=_sig(ms), ms_min=_sig(ms_min), peak_mem_mib=None if peak is None else round(peak, 1),
                       tflops=_sig(tflops), frac_peak=None if peak_tflops is None else _sig(tflops / peak_tflops))
            if mode == "fwd":
                row["loss"] = float(out["loss"].detach().float().cpu())
        except torch.cuda.OutOfMemoryError:
            row.update(status="oom")
        except Exception as exc:  # noqa: BLE001 - a broken impl must not kill the whole table
            row.update(status=f"error: {exc.__class__.__name__}: {str(exc)[:200]}")
        out.clear()
        hidden.grad = weight.grad = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
    return rows


def run(out_dir: Path, quick: bool, argv: list[str]) -> dict:
    """Benchmark every implementation, write bench.json and bench.csv; restores torch's threads."""
    threads = torch.get_num_threads()
    try:
        return _run(out_dir, quick, argv)
    finally:
        torch.set_num_threads(threads)


def _run(out_dir: Path, quick: bool, argv: list[str]) -> dict:
    on_cuda = torch.cuda.is_available()
    device = torch.device("cuda" if on_cuda else "cpu")
    device_name = torch.cuda.get_device_name(device) if on_cuda else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    peak = device_peak(device_name) if on_cuda else None
    if on_cuda:
        shapes, dtype = (GPU_SHAPES[:1] if quick else GPU_SHAPES), torch.bfloat16
        warmup, iters = (1, 3) if quick else (3, 10)
    else:
        # One thread: on a small shared machine OpenMP barriers stall for whole scheduler quanta
        # whenever another process holds a core, which swamped these tiny timings (40 ms vs 1 ms).
        torch.set_num_threads(1)
        shapes, dtype = CPU_SHAPES, torch.float32
        warmup, iters = (1, 1) if quick else (2, 5)
    impls = implementations(quick, on_cuda)
    rows = []
    for n, d, v in shapes:
        for name, fn in impls.items():
            if isinstance(fn, str):
                rows.extend({"impl": name, "N": n, "D": d, "V": v, "dtype": str(dtype).replace("torch.", ""),
                             "mode": mode, "status": fn} for mode in ("fwd", "fwd+bwd"))
                continue
            rows.extend(bench_shape(name, fn, n, d, v, dtype, device, warmup, iters, peak))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    def version(mod: str) -> Optional[str]:
        try:
            return __import__(mod).__version__
        except Exception:  # noqa: BLE001
            return None

    from importlib.metadata import PackageNotFoundError, version as dist_version

    try:
        liger_version = dist_version("liger_kernel")
    except PackageNotFoundError:
        liger_version = None
    result = {
        "meta": {
            "command": "python -m kernels.bench " + " ".join(shlex.quote(a) for a in argv),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "device": device_name,
            "peak_bf16_tflops": peak,
            "torch": torch.__version__,
            "triton": version("triton"),
            "liger_kernel": liger_version,
            "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
            "strategy": STRATEGY,
            "r": R,
            "torch_threads": torch.get_num_threads(),
            "warmup": warmup,
            "iters": iters,
            "timing": "ms = median, ms_min = minimum over iters; TFLOP/s from the median",
            "flops_convention": "fwd 2*N*D*V, fwd+bwd 6*N*D*V",
            "note": None if on_cuda else "CPU sanity run: exercises the harness; timings are not GPU-relevant",
        },
        "results": rows,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    fields = ["impl", "N", "D", "V", "dtype", "mode", "status", "ms", "ms_min", "peak_mem_mib", "tflops", "frac_peak", "loss"]
    with open(out_dir / "bench.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k) for k in fields})
    return result


def main(argv: Optional[list[str]] = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__.splitlines()[0])
    default = "kernels/results/" + ("cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=default, help=f"output directory (default {default})")
    parser.add_argument("--quick", action="store_true", help="one shape, few iterations, no torch.compile on CPU")
    args = parser.parse_args(argv)
    result = run(Path(args.out), args.quick, argv)
    for row in result["results"]:
        print(f"{row['impl']:14s} N={row['N']:<6d} D={row['D']:<5d} V={row['V']:<7d} {row['mode']:8s} "
              f"{row['status'][:40]:8s} ms={row.get('ms')} min={row.get('ms_min')} TFLOP/s={row.get('tflops')} peakMiB={row.get('peak_mem_mib')}")
    return result


if __name__ == "__main__":
    main()
