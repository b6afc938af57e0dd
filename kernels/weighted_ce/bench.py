"""Benchmark: LM head + per-sample reweighted CE, ours (fast / lean) against the usual peers.

    python -m megareweight.kernels.bench [--out DIR] [--quick] [--shapes 16384x4096x128256,...]

Peers, all computing the same reweighted loss (strategy linupper, r=1): ``eager`` (materialise
[N, V] logits, CE, weights: what a naive trainer does), ``compile`` (``torch.compile`` of that),
``liger`` (Liger-Kernel fused linear CE with ``reduction="none"``, >= 0.8.2, then the per-sample
mean and the Sow et al. weighting in PyTorch), ``cce`` (Cut Cross-Entropy with
``reduction="none"``, same weighting; ``impl="torch_compile"`` on CPU, where its Triton path does
not run), ``torch_core`` (PyTorch's own ``F.linear_cross_entropy``, torch >= 2.13, chunked with
``LinearCrossEntropyOptions()``, ``reduction="none"``, same weighting) and ours:
``fused_fast``/``fused_lean`` (Triton epilogue) and ``chunked_fast``/``chunked_lean`` (PyTorch
epilogue). Inputs are built once per shape, on the device, and shared by every implementation.

Before anything is timed each implementation's loss, dH and dW are compared with the reference:
relative error ``||x - ref32|| / ||ref32||`` against the fp32 reference on the same (rounded)
inputs must be at most ``VERIFY_FACTOR`` times that of the reference run in the benchmark dtype,
plus 1e-5. A mismatch is reported as ``status: failed`` and not timed. On a GPU the check runs on
the first ``GPU_VERIFY_TOKENS`` tokens (the fp32 reference at V=128256 needs ~30 GB per 8k tokens).

Reported per row: median and minimum ms (CUDA events), peak memory above the inputs and the
workspace (that peak minus the dH and dW every implementation returns), TFLOP/s counted on
6NDV and on 8NDV for forward+backward (2NDV forward) and the fraction of the device's dense bf16
peak. Without CUDA one small fp32 shape runs (Triton under ``TRITON_INTERPRET=1``): it exercises
the harness and the verification; its timings say nothing about GPU speed.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version as dist_version
from pathlib import Path
from typing import Callable, Optional

import torch

if not torch.cuda.is_available():
    # Must happen before anything imports triton (Liger does at import time).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from megareweight.hardware import lookup_peak_tflops  # noqa: E402
from megareweight.kernels.weighted_ce.function import auto_chunk_size, fused_linear_weighted_ce  # noqa: E402
from megareweight.kernels.weighted_ce.reference import linear_weighted_ce as reference_ce, per_sample_ce  # noqa: E402
from megareweight.reweighting import weighted_loss  # noqa: E402

GPU_SHAPES = [(n, d, v) for n in (4096, 16384) for d in (2048, 4096) for v in (32000, 128256)]
TARGET_SHAPE = (16384, 4096, 128256)
CPU_SHAPES = [(256, 64, 512)]
STRATEGY, R = "linupper", 1.0
VERIFY_FACTOR = 4.0
GPU_VERIFY_TOKENS = 8192
FIELDS = ["impl", "N", "D", "V", "dtype", "mode", "status", "ms", "ms_min", "peak_mem_mib", "workspace_mib", "peak_rss_mib",
          "tflops_6ndv", "tflops_8ndv", "frac_peak_6ndv", "frac_peak_8ndv", "loss",
          "err_loss", "err_dh", "err_dw", "bound_loss", "bound_dh", "bound_dw"]


def _weighting(token_losses: torch.Tensor, labels: torch.Tensor, strategy: str, r: float) -> torch.Tensor:
    """Per-row mean of per-token losses, then the Sow et al. weighting (what a peer kernel needs)."""
    b, t = labels.shape
    flat = labels.reshape(-1)
    index = torch.arange(b, device=labels.device).repeat_interleave(t)
    losses, counts = per_sample_ce(token_losses, flat != -100, index, b)
    return weighted_loss(losses, strategy, r, mask=counts > 0).loss


def _liger(hidden, weight, labels, strategy, r):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    tok = liger_fused_linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
                                           ignore_index=-100, reduction="none")
    return _weighting(tok, labels, strategy, r)


def _cce(hidden, weight, labels, strategy, r):
    from cut_cross_entropy import linear_cross_entropy

    impl = "cce" if hidden.is_cuda else "torch_compile"
    tok = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
                               ignore_index=-100, reduction="none", impl=impl)
    return _weighting(tok, labels, strategy, r)


def _torch_core(hidden, weight, labels, strategy, r):
    import torch.nn.functional as F

    tok = F.linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1), ignore_index=-100,
                                 reduction="none", options=torch.nn.LinearCrossEntropyOptions())
    return _weighting(tok, labels, strategy, r)


def implementations(quick: bool, on_cuda: bool) -> dict[str, Callable | str]:
    """name -> fn(hidden, weight, labels, strategy, r) returning the loss, or a skip reason."""
    impls: dict[str, Callable | str] = {"eager": lambda h, w, y, s, r: reference_ce(h, w, y, strategy=s, r=r).loss}
    if hasattr(torch.nn.functional, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):
        impls["torch_core"] = _torch_core
    else:
        impls["torch_core"] = f"skipped: torch {torch.__version__} has no F.linear_cross_entropy (2.13+)"
    if quick and on_cuda:
        # A short GPU window: torch.compile recompiles for the verification slice and the timed
        # shape (minutes at V=128256); the full run keeps it.
        impls["compile"] = "skipped: --quick (compiles twice, minutes); run without --quick"
    elif quick:
        impls["compile"] = impls["cce"] = "skipped: --quick on CPU (compilation takes tens of seconds)"
    else:
        if not on_cuda:
            # torch 2.13's Inductor CPU vectoriser asserts on index_add (scatter atomic_add) into
            # the small per-sample buffer; scalar C++ codegen compiles it fine.
            import torch._inductor.config as inductor_config

            inductor_config.cpp.simdlen = 1
        compiled = torch.compile(reference_ce)
        impls["compile"] = lambda h, w, y, s, r: compiled(h, w, y, strategy=s, r=r).loss
    for name, fn, module in (("liger", _liger, "liger_kernel.transformers.functional"), ("cce", _cce, "cut_cross_entropy")):
        if name in impls:
            continue
        try:
            __import__(module)
            impls[name] = fn
        except Exception as exc:  # noqa: BLE001 - report any import failure as a skip
            impls[name] = f"skipped: {module} unavailable ({exc.__class__.__name__})"
    for epilogue, prefix in (("triton", "fused"), ("torch", "chunked")):
        for mode in ("fast", "lean"):
            impls[f"{prefix}_{mode}"] = (lambda e, m: lambda h, w, y, s, r: fused_linear_weighted_ce(
                h, w, y, strategy=s, r=r, mode=m, epilogue=e).loss)(epilogue, mode)
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
    peak = None if base is None else (torch.cuda.max_memory_allocated(device) - base) / 2**20
    times.sort()
    return times[len(times) // 2], times[0], peak


def _sig(x: float) -> float:
    """Four significant digits: keeps interpreter-scale numbers (1e-4 TFLOP/s) readable."""
    return float(f"{x:.4g}")


def make_inputs(n, d, v, dtype, device):
    gen = torch.Generator(device="cpu").manual_seed(0)
    b = max(1, n // 256)
    t = n // b
    hidden = torch.randn(b, t, d, generator=gen).to(device=device, dtype=dtype)
    weight = (torch.randn(v, d, generator=gen) / d**0.5).to(device=device, dtype=dtype)
    labels = torch.randint(0, v, (b, t), generator=gen).to(device)
    labels[:, :3] = -100
    return hidden, weight, labels


def _grads(fn, hidden, weight, labels, dtype) -> dict[str, torch.Tensor]:
    h = hidden.detach().to(dtype).requires_grad_()
    w = weight.detach().to(dtype).requires_grad_()
    loss = fn(h, w, labels, STRATEGY, R)
    loss.backward()
    # Kept on the host: the references must not take device memory from the timed runs.
    return {"loss": loss.detach().float().cpu(), "dh": h.grad.float().cpu(), "dw": w.grad.float().cpu()}


def verify(fn, hidden, weight, labels, refs) -> dict:
    """Relative errors of loss, dH, dW against the fp32 reference and their bounds."""
    ours = _grads(fn, hidden, weight, labels, hidden.dtype)
    ref32, ref_dt = refs
    row = {}
    for key in ("loss", "dh", "dw"):
        norm = ref32[key].norm().clamp_min(1e-30)
        err = float((ours[key] - ref32[key]).norm() / norm)
        bound = VERIFY_FACTOR * float((ref_dt[key] - ref32[key]).norm() / norm) + 1e-5
        row[f"err_{key}"], row[f"bound_{key}"] = _sig(err), _sig(bound)
    del ours
    return row


def bench_shape(name, fn, inputs, dtype, device, warmup, iters, peak_tflops, refs, verify_tokens) -> list[dict]:
    """Verify ``fn`` on the first ``verify_tokens`` tokens, then time it on the whole ``inputs``
    (built once per shape and shared: at the target shape they are 2 GB of bf16)."""
    hidden, weight, labels = inputs
    n, d, v = hidden.shape[0] * hidden.shape[1], hidden.shape[2], weight.shape[0]
    base = {"impl": name, "N": n, "D": d, "V": v, "dtype": str(dtype).replace("torch.", "")}
    try:
        b = max(1, verify_tokens // labels.shape[1])
        check = verify(fn, hidden[:b], weight, labels[:b], refs)
    except torch.cuda.OutOfMemoryError:
        return [{**base, "mode": m, "status": "oom (verification)"} for m in ("fwd", "fwd+bwd")]
    except Exception as exc:  # noqa: BLE001 - a broken impl must not kill the whole table
        return [{**base, "mode": m, "status": f"error: {exc.__class__.__name__}: {str(exc)[:200]}"} for m in ("fwd", "fwd+bwd")]
    bad = [k for k in ("loss", "dh", "dw") if not check[f"err_{k}"] <= check[f"bound_{k}"]]
    if bad:
        return [{**base, **check, "mode": m, "status": "failed: " + ", ".join(f"{k} err {check['err_' + k]} > {check['bound_' + k]}" for k in bad)}
                for m in ("fwd", "fwd+bwd")]
    hidden.requires_grad_()
    weight.requires_grad_()
    grad_mib = (hidden.numel() * hidden.element_size() + weight.numel() * weight.element_size()) / 2**20
    out = {}
    rows = []

    def fwd() -> None:
        out["loss"] = fn(hidden, weight, labels, STRATEGY, R)

    def fwd_bwd() -> None:
        hidden.grad = weight.grad = None
        fn(hidden, weight, labels, STRATEGY, R).backward()

    ndv = n * d * v
    for mode, step, flops6, flops8 in (("fwd", fwd, 2 * ndv, 2 * ndv), ("fwd+bwd", fwd_bwd, 6 * ndv, 8 * ndv)):
        row = {**base, **check, "mode": mode}
        try:
            ms, ms_min, peak = time_call(step, device, warmup, iters)
            t6, t8 = flops6 / (ms * 1e-3) / 1e12, flops8 / (ms * 1e-3) / 1e12
            row.update(status="ok", ms=_sig(ms), ms_min=_sig(ms_min), tflops_6ndv=_sig(t6), tflops_8ndv=_sig(t8),
                       peak_mem_mib=None if peak is None else round(peak, 1),
                       workspace_mib=None if peak is None else round(peak - (grad_mib if mode == "fwd+bwd" else 0), 1),
                       frac_peak_6ndv=None if peak_tflops is None else _sig(t6 / peak_tflops),
                       frac_peak_8ndv=None if peak_tflops is None else _sig(t8 / peak_tflops))
            if mode == "fwd":
                row["loss"] = float(out["loss"].detach().float().cpu())
        except torch.cuda.OutOfMemoryError:
            row.update(status="oom")
        except Exception as exc:  # noqa: BLE001
            row.update(status=f"error: {exc.__class__.__name__}: {str(exc)[:200]}")
        out.clear()
        hidden.grad = weight.grad = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
    hidden.requires_grad_(False)
    weight.requires_grad_(False)
    return rows


def references(inputs, dtype, verify_tokens):
    """(fp32 reference, same-dtype reference) gradients on the verification slice."""
    hidden, weight, labels = inputs
    b = max(1, verify_tokens // labels.shape[1])
    hidden, labels = hidden[:b], labels[:b]
    ref = lambda h, w, y, s, r: reference_ce(h, w, y, strategy=s, r=r).loss  # noqa: E731
    ref32 = _grads(ref, hidden, weight, labels, torch.float32)
    ref_dt = ref32 if dtype == torch.float32 else _grads(ref, hidden, weight, labels, dtype)
    return ref32, ref_dt


def _package(name: str) -> Optional[str]:
    try:
        return dist_version(name)
    except PackageNotFoundError:
        return None


def _driver() -> Optional[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    shapes = []
    for part in text.split(","):
        try:
            n, d, v = (int(x) for x in part.lower().split("x"))
        except ValueError:
            raise ValueError(f"--shapes: {part!r} is not NxDxV (e.g. 16384x4096x128256)") from None
        if min(n, d, v) < 1:
            raise ValueError(f"--shapes: {part!r} has a size < 1")
        shapes.append((n, d, v))
    return shapes


def run(out_dir: Path, quick: bool, argv: list[str], shapes: Optional[list[tuple[int, int, int]]] = None,
        cpu_memory: bool = False, only: Optional[list[str]] = None) -> dict:
    """Verify and time every implementation (or those in ``only``), write bench.json and
    bench.csv; restores torch's threads."""
    threads = torch.get_num_threads()
    try:
        return _run(out_dir, quick, argv, shapes, cpu_memory, only)
    finally:
        torch.set_num_threads(threads)


def peak_rss_mib(name: str, n: int, d: int, v: int, dtype: torch.dtype) -> Optional[float]:
    """CPU peak memory of one forward+backward of ``name``: a fresh process builds the inputs,
    then runs it once; the growth of its resident-set high-water mark (Linux ``VmHWM``) is the
    peak above the inputs (the CPU allocator keeps no statistics of its own)."""
    probe = subprocess.run([sys.executable, "-m", "megareweight.kernels.weighted_ce.bench", "--rss-probe",
                            f"{name},{n},{d},{v},{str(dtype).replace('torch.', '')}"],
                           capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=1800)
    try:
        return round(float(probe.stdout.strip().splitlines()[-1]), 1)
    except (IndexError, ValueError):
        return None


def _vm_hwm_mib() -> float:
    """This process's resident-set high-water mark. Not ``ru_maxrss``: that survives ``exec`` and
    so starts at the parent's size in a child process."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise OSError("no VmHWM in /proc/self/status")


def _rss_probe(spec: str) -> None:
    name, n, d, v, dtype = spec.split(",")
    torch.set_num_threads(1)
    fn = implementations(quick=True, on_cuda=False)[name]
    hidden, weight, labels = make_inputs(int(n), int(d), int(v), getattr(torch, dtype), torch.device("cpu"))
    hidden.requires_grad_()
    weight.requires_grad_()
    before = _vm_hwm_mib()
    fn(hidden, weight, labels, STRATEGY, R).backward()
    print(_vm_hwm_mib() - before)


def _run(out_dir: Path, quick: bool, argv: list[str], shapes, cpu_memory: bool = False,
         only: Optional[list[str]] = None) -> dict:
    on_cuda = torch.cuda.is_available()
    device = torch.device("cuda" if on_cuda else "cpu")
    device_name = torch.cuda.get_device_name(device) if on_cuda else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    peak = lookup_peak_tflops(device_name) if on_cuda else None
    if on_cuda:
        shapes = shapes or ([TARGET_SHAPE] if quick else GPU_SHAPES)
        dtype, verify_tokens = torch.bfloat16, GPU_VERIFY_TOKENS
        warmup, iters = (1, 3) if quick else (3, 10)
    else:
        # One thread: on a small shared machine OpenMP barriers stall for whole scheduler quanta
        # whenever another process holds a core, which swamped these tiny timings (40 ms vs 1 ms).
        torch.set_num_threads(1)
        shapes, dtype = shapes or CPU_SHAPES, torch.float32
        verify_tokens = max(n for n, _, _ in shapes)
        warmup, iters = (1, 1) if quick else (2, 5)
    impls = implementations(quick, on_cuda)
    if only:
        unknown = sorted(set(only) - set(impls))
        if unknown:
            raise ValueError(f"--impls: unknown {', '.join(unknown)}; allowed: {', '.join(impls)}")
        impls = {k: v for k, v in impls.items() if k in only}
    rows = []
    for n, d, v in shapes:
        inputs = make_inputs(n, d, v, dtype, device)
        refs = references(inputs, dtype, verify_tokens)
        for name, fn in impls.items():
            if isinstance(fn, str):
                rows.extend({"impl": name, "N": n, "D": d, "V": v, "dtype": str(dtype).replace("torch.", ""),
                             "mode": mode, "status": fn} for mode in ("fwd", "fwd+bwd"))
                continue
            shape_rows = bench_shape(name, fn, inputs, dtype, device, warmup, iters, peak, refs, verify_tokens)
            if cpu_memory and not on_cuda and shape_rows[-1]["status"] == "ok":
                shape_rows[-1]["peak_rss_mib"] = peak_rss_mib(name, n, d, v, dtype)
            rows.extend(shape_rows)
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        del refs, inputs
    result = {
        "meta": {
            "command": "python -m megareweight.kernels.bench " + " ".join(shlex.quote(a) for a in argv),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "device": device_name,
            "driver": _driver() if on_cuda else None,
            "cuda": torch.version.cuda,
            "peak_bf16_tflops": peak,
            "torch": torch.__version__,
            "triton": _package("triton"),
            "liger_kernel": _package("liger_kernel"),
            "cut_cross_entropy": _package("cut-cross-entropy"),
            "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
            "strategy": STRATEGY,
            "r": R,
            "chunk_size": {f"{n}x{d}x{v}": auto_chunk_size(v, dtype, device) for n, d, v in shapes},
            "torch_threads": torch.get_num_threads(),
            "warmup": warmup,
            "iters": iters,
            "timing": "ms = median, ms_min = minimum over iters; TFLOP/s and fractions of peak from the median",
            "flops_convention": "fwd 2*N*D*V; fwd+bwd 6*N*D*V (tflops_6ndv) and 8*N*D*V (tflops_8ndv, counts lean's recompute)",
            "memory": ("peak_mem_mib: peak allocated above the inputs; workspace_mib: that minus the dH and dW returned "
                       "(CUDA); peak_rss_mib (CPU, --cpu-memory): growth of a fresh process's peak resident set over "
                       "one forward+backward, gradients included"),
            "verification": (f"loss, dH, dW on the first {verify_tokens} tokens vs the fp32 reference: "
                             f"rel err <= {VERIFY_FACTOR} x rel err of the reference in the bench dtype + 1e-5; "
                             "failed rows are not timed"),
            "note": None if on_cuda else "CPU run: exercises the harness and the verification; timings are not GPU-relevant",
        },
        "results": rows,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    with open(out_dir / "bench.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k) for k in FIELDS})
    return result


def default_out_dir() -> str:
    if not torch.cuda.is_available():
        return "kernels/results/cpu"
    name = torch.cuda.get_device_name().lower()
    return "kernels/results/" + "".join(c if c.isalnum() else "_" for c in name).strip("_")


def main(argv: Optional[list[str]] = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m megareweight.kernels.bench", description=__doc__.splitlines()[0])
    default = default_out_dir()
    parser.add_argument("--out", default=default, help=f"output directory (default {default})")
    parser.add_argument("--quick", action="store_true", help="one shape (the target on GPU), few iterations, no compilers on CPU")
    parser.add_argument("--shapes", help="comma-separated NxDxV list, e.g. 16384x4096x128256")
    parser.add_argument("--cpu-memory", action="store_true",
                        help="CPU: also measure each implementation's peak memory in a fresh process (slower)")
    parser.add_argument("--impls", help="comma-separated subset of the implementations (default: all)")
    parser.add_argument("--rss-probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_probe:
        _rss_probe(args.rss_probe)
        return {}
    try:
        shapes = parse_shapes(args.shapes) if args.shapes else None
    except ValueError as exc:
        parser.error(str(exc))
    try:
        result = run(Path(args.out), args.quick, argv, shapes, args.cpu_memory,
                     args.impls.split(",") if args.impls else None)
    except ValueError as exc:
        parser.error(str(exc))
    for row in result["results"]:
        print(f"{row['impl']:14s} N={row['N']:<6d} D={row['D']:<5d} V={row['V']:<7d} {row['mode']:8s} "
              f"{row['status'][:40]:8s} ms={row.get('ms')} TFLOP/s(6NDV)={row.get('tflops_6ndv')} "
              f"workspaceMiB={row.get('workspace_mib')}")
    return result


if __name__ == "__main__":
    main()
