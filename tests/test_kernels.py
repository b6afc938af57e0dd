"""Kernel tests: chunked and Triton (interpreter) paths against the pure-PyTorch reference.

Pass rule for low precision: ``|ref_fp32 - ours| <= |ref_fp32 - ref_same_dtype| + tol``, i.e. we
may not be worse than the reference computed in the same dtype, up to a small rounding budget.
The fp32 reference is run on the low-precision inputs upcast, so only compute precision differs.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import functools
import json
import math
import socket
from typing import Callable

import pytest
from hypothesis import given, settings, strategies as st
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import kernels
from kernels.chunked import linear_weighted_ce as chunked_ce
from kernels.reference import linear_weighted_ce as reference_ce

triton_ok = kernels.triton_available() and os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()


def fused_small(*args, **kwargs):
    """Small blocks so that tiny shapes still span several N, V and D tiles plus a ragged edge."""
    return kernels.fused_linear_weighted_ce(*args, block_sizes=(16, 16, 16), **kwargs)


def fused_gemm_bwd(*args, **kwargs):
    return kernels.fused_linear_weighted_ce(*args, block_sizes=(16, 16, 16), backward="gemm", **kwargs)


def chunked_small(*args, **kwargs):
    return chunked_ce(*args, chunk_size=4, **kwargs)


IMPLS = {
    "chunked": chunked_small,
    "fused": pytest.param(fused_small, marks=pytest.mark.skipif(not triton_ok, reason="triton unavailable")),
    "fused-gemm-bwd": pytest.param(fused_gemm_bwd, marks=pytest.mark.skipif(not triton_ok, reason="triton unavailable")),
}
EPS = {torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def make_batch(b, t, d, v, seed=0, ignore_frac=0.2, empty_row=True):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, d, generator=gen)
    weight = torch.randn(v, d, generator=gen) * (2.0 / math.sqrt(d))
    labels = torch.randint(0, v, (b, t), generator=gen)
    labels[torch.rand(b, t, generator=gen) < ignore_frac] = -100
    if empty_row and b > 1:
        labels[1] = -100  # a sample with no valid token: weight 0, NaN per-sample loss
    return hidden, weight, labels


def run(fn: Callable, hidden, weight, labels, dtype, grad_scale=1.0, **kw):
    h = hidden.detach().clone().to(dtype).requires_grad_()
    w = weight.detach().clone().to(dtype).requires_grad_()
    out = fn(h, w, labels, **kw)
    (out.loss * grad_scale).backward()
    return {"loss": out.loss.detach().float(), "per_sample": out.per_sample_loss.float(),
            "weights": out.weights.float(), "dh": h.grad.float(), "dw": w.grad.float()}


def assert_close(ours, ref32, ref_dtype, dtype, name):
    """Element-wise pass rule; NaNs must sit in the same places."""
    assert torch.equal(torch.isnan(ours), torch.isnan(ref32)), f"{name}: NaN pattern differs"
    keep = ~torch.isnan(ref32)
    ours, ref32, ref_dtype = ours[keep], ref32[keep], ref_dtype[keep]
    scale = ref32.abs().max() if ref32.numel() else torch.tensor(0.0)
    tol = 1e-5 * (ref32.abs() + scale) + 1e-6 + 4 * EPS[dtype] * (ref32.abs() + 0.05 * scale)
    bound = (ref32 - ref_dtype).abs() + tol
    err = (ref32 - ours).abs()
    assert bool((err <= bound).all()), f"{name}: max excess {(err - bound).max().item():.3g} (max err {err.max().item():.3g})"


def compare(fn, hidden, weight, labels, dtype=torch.float32, **kw):
    hidden = hidden.to(dtype)  # the fp32 reference sees exactly the low-precision inputs
    weight = weight.to(dtype)
    ours = run(fn, hidden, weight, labels, dtype, **kw)
    ref32 = run(reference_ce, hidden, weight, labels, torch.float32, **kw)
    ref_dt = ref32 if dtype == torch.float32 else run(reference_ce, hidden, weight, labels, dtype, **kw)
    for key in ours:
        assert_close(ours[key], ref32[key], ref_dt[key], dtype, key)
    for key in ("loss", "dh", "dw"):
        assert torch.isfinite(ours[key]).all(), key
    return ours


@pytest.mark.parametrize("impl", list(IMPLS.values()), ids=list(IMPLS))
@pytest.mark.parametrize(
    "shape,strategy,dtype",
    [
        ((3, 5, 24, 37), "linupper", torch.float32),
        ((2, 7, 20, 50), "uniform", torch.float32),
        ((2, 7, 20, 50), "linear", torch.float32),
        ((3, 6, 17, 33), "quadratic", torch.float32),
        ((4, 9, 40, 70), "extremes", torch.float32),
        ((3, 5, 24, 37), "linupper", torch.float16),
        ((3, 5, 24, 37), "quadratic", torch.bfloat16),
    ],
    ids=lambda p: str(p).replace("torch.", "").replace(" ", ""),
)
def test_matches_reference(impl, shape, strategy, dtype):
    hidden, weight, labels = make_batch(*shape, seed=sum(shape))
    compare(impl, hidden, weight, labels, dtype, strategy=strategy, r=0.4)


@settings(max_examples=6, deadline=None, derandomize=True)
@given(b=st.integers(1, 3), t=st.integers(1, 6), d=st.integers(1, 33), v=st.integers(1, 40),
       strategy=st.sampled_from(["uniform", "linear", "linupper", "quadratic", "extremes"]),
       seed=st.integers(0, 2**16))
def test_random_shapes(b, t, d, v, strategy, seed):
    """Edge shapes (V or D of 1, a single token, tiles mostly padding) for every implementation."""
    hidden, weight, labels = make_batch(b, t, d, v, seed=seed)
    impls = [chunked_small] + ([fused_small, fused_gemm_bwd] if triton_ok else [])
    for impl in impls:
        compare(impl, hidden, weight, labels, strategy=strategy, r=0.7)


@pytest.mark.parametrize("impl", list(IMPLS.values()), ids=list(IMPLS))
def test_packed_segments(impl):
    """Samples are (row, segment); segment 3 never occurs -> empty samples with weight 0."""
    hidden, weight, labels = make_batch(2, 11, 16, 33, seed=3, empty_row=False)
    seg = torch.tensor([[0] * 4 + [1] * 5 + [2] * 2, [0] * 6 + [2] * 5])
    out = compare(impl, hidden, weight, labels, segment_ids=seg, num_segments=4, strategy="linupper", r=1.0)
    assert out["per_sample"].shape == (8,) and out["weights"].shape == (8,)
    assert torch.isnan(out["per_sample"][[3, 5, 7]]).all() and (out["weights"][[3, 5, 7]] == 0).all()


@pytest.mark.parametrize("impl", list(IMPLS.values()), ids=list(IMPLS))
def test_upstream_grad_delta_and_default_blocks(impl):
    """Upstream gradient != 1, delta != 1, and the default block sizes / chunk size."""
    default = {chunked_small: chunked_ce, fused_small: kernels.fused_linear_weighted_ce,
               fused_gemm_bwd: functools.partial(kernels.fused_linear_weighted_ce, backward="gemm")}[impl]
    hidden, weight, labels = make_batch(3, 7, 24, 45, seed=7)
    compare(default, hidden, weight, labels, grad_scale=2.5, strategy="extremes", r=1.0, delta=2.0)


@pytest.mark.parametrize("impl", list(IMPLS.values()), ids=list(IMPLS))
def test_all_tokens_ignored(impl):
    hidden, weight, labels = make_batch(2, 4, 16, 20)
    labels[:] = -100
    out = run(impl, hidden, weight, labels, torch.float32)
    assert out["loss"].item() == 0.0
    assert torch.isnan(out["per_sample"]).all() and (out["weights"] == 0).all()
    assert (out["dh"] == 0).all() and (out["dw"] == 0).all()


@pytest.mark.parametrize("impl", list(IMPLS.values()), ids=list(IMPLS))
def test_frozen_weight_and_unknown_strategy(impl):
    hidden, weight, labels = make_batch(2, 5, 16, 21)
    h = hidden.clone().requires_grad_()
    out = impl(h, weight, labels, strategy="linear")
    out.loss.backward()
    ref = hidden.clone().requires_grad_()
    reference_ce(ref, weight, labels, strategy="linear").loss.backward()
    torch.testing.assert_close(h.grad, ref.grad, rtol=1e-5, atol=1e-6)
    assert not out.weights.requires_grad and not out.per_sample_loss.requires_grad
    with pytest.raises(ValueError, match="linupper"):
        impl(hidden, weight, labels, strategy="lin-upper")
    if impl is fused_small:
        with pytest.raises(ValueError, match="atomic, gemm"):
            kernels.fused_linear_weighted_ce(hidden, weight, labels, backward="cublas")


def test_gpu_path_compiles_for_sm90():
    """The tensor-core (bf16) path is not what the interpreter runs: compile it for an H100."""
    import subprocess
    import sys

    pytest.importorskip("triton")
    code = "import json, kernels.fused_ce as f; print(json.dumps(f.aot_compile(90, 'bf16')))"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if out.returncode != 0 and "ptxas" in out.stderr and "not found" in out.stderr.lower():
        pytest.skip("no ptxas bundled with this triton")
    assert out.returncode == 0, out.stderr[-2000:]
    shared = json.loads(out.stdout.strip().splitlines()[-1])
    assert 0 < max(shared.values()) <= 227 * 1024  # fits an H100 SM's shared memory


def test_get_loss_impl():
    assert kernels.get_loss_impl("auto", torch.device("cpu"))[0] == "chunked"
    assert kernels.get_loss_impl("reference", "cpu")[1] is reference_ce
    assert kernels.get_loss_impl("chunked", "cpu")[1] is chunked_ce
    if kernels.triton_available():
        assert kernels.get_loss_impl("auto", torch.device("cuda"))[0] == "fused"
        assert kernels.get_loss_impl("fused", "cpu")[0] == "fused"
    with pytest.raises(ValueError, match="auto, fused, chunked, reference"):
        kernels.get_loss_impl("triton", "cpu")
    assert kernels.LossOutput._fields == ("loss", "per_sample_loss", "weights")


def test_import_without_triton(monkeypatch):
    """``import kernels`` must not pull triton in (macOS has none); without it auto -> chunked."""
    import subprocess
    import sys

    code = "import sys, kernels, kernels.chunked; print('triton' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == "False"
    monkeypatch.setattr(kernels, "triton_available", lambda: False)
    assert kernels.get_loss_impl("auto", "cuda")[0] == "chunked"
    with pytest.raises(RuntimeError, match="triton"):
        kernels.get_loss_impl("fused", "cuda")


def test_bench_quick(tmp_path):
    from kernels import bench

    result = bench.main(["--quick", "--out", str(tmp_path)])
    assert (tmp_path / "bench.json").exists() and (tmp_path / "bench.csv").exists()
    rows = {(r["impl"], r["mode"]): r for r in result["results"]}
    assert rows[("eager", "fwd")]["status"] == "ok" and rows[("chunked", "fwd+bwd")]["status"] == "ok"
    if triton_ok:
        assert rows[("fused", "fwd+bwd")]["status"] == "ok" and rows[("fused_gemm_bwd", "fwd+bwd")]["status"] == "ok"
        assert rows[("fused", "fwd")]["loss"] == pytest.approx(rows[("eager", "fwd")]["loss"], rel=1e-5)
    assert result["meta"]["torch"] == torch.__version__


# ---------------------------------------------------------------- two ranks over gloo

DIST_SHAPE = (4, 6, 16, 29)  # global batch: 4 rows, 2 per rank


def _dist_batch():
    hidden, weight, labels = make_batch(*DIST_SHAPE, seed=11, empty_row=False)
    labels[3] = -100  # rank 1 holds a sample with no valid token
    seg = torch.tensor([[0, 0, 0, 1, 1, 1]] * 4)
    return hidden, weight, labels, seg


def _dist_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import datetime

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        hidden, weight, labels, seg = _dist_batch()
        rows = slice(rank * 2, rank * 2 + 2)
        results = {}
        for name, fn in (("chunked", chunked_small), ("fused", fused_small), ("fused-gemm-bwd", fused_gemm_bwd)):
            if name.startswith("fused") and not triton_ok:
                continue
            results[name] = run(fn, hidden[rows], weight, labels[rows], torch.float32, group=dist.group.WORLD,
                                segment_ids=seg[rows], num_segments=2, strategy="linupper", r=0.4)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_match_one_process(tmp_path):
    """Weights are global and sliced by rank; the DP-averaged dW and world-scaled dH match 1 process."""
    world = 2
    mp.spawn(_dist_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    hidden, weight, labels, seg = _dist_batch()
    single = run(reference_ce, hidden, weight, labels, torch.float32, segment_ids=seg, num_segments=2,
                 strategy="linupper", r=0.4)
    for name in parts[0]:
        got = [p[name] for p in parts]
        for g in got:
            torch.testing.assert_close(g["weights"], single["weights"], rtol=1e-5, atol=1e-7, equal_nan=True)
        torch.testing.assert_close(torch.cat([g["per_sample"] for g in got]), single["per_sample"], equal_nan=True)
        # DDP averages parameter grads over ranks; the loss is scaled by world size to undo it.
        torch.testing.assert_close(sum(g["loss"] for g in got) / world, single["loss"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sum(g["dw"] for g in got) / world, single["dw"], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(torch.cat([g["dh"] for g in got]) / world, single["dh"], rtol=1e-4, atol=1e-6)
