"""Kernel tests: both modes (fast, lean) x both epilogues (PyTorch, Triton under the interpreter)
against the pure-PyTorch reference, determinism, options, the AOT check, the bench, two ranks.

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
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
from hypothesis import given, settings, strategies as st
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megareweight.kernels import weighted_ce as kernels
from megareweight.kernels.weighted_ce import impls, torch_core
from megareweight.kernels.weighted_ce.reference import linear_weighted_ce as reference_ce
from megareweight.kernels.weighted_ce import function as F

ROOT = Path(__file__).resolve().parents[1]
triton_ok = kernels.triton_available() and os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
needs_triton = pytest.mark.skipif(not triton_ok, reason="triton unavailable")


def ours(epilogue: str, mode: str, chunk_size=4) -> Callable:
    """Small chunks so that tiny shapes span several forward chunks and backward blocks."""
    return functools.partial(kernels.fused_linear_weighted_ce, epilogue=epilogue, mode=mode, chunk_size=chunk_size)


VARIANTS = [(e, m) for e in ("torch", "triton") for m in ("fast", "lean")]
VARIANT_IDS = [f"{e}-{m}" for e, m in VARIANTS]
VARIANT_PARAMS = [pytest.param(e, m, marks=[needs_triton] if e == "triton" else [], id=f"{e}-{m}") for e, m in VARIANTS]
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


def run(fn: Callable, hidden, weight, labels, dtype, grad_scale=1.0, grads=(True, True), **kw):
    h = hidden.detach().clone().to(dtype).requires_grad_(grads[0])
    w = weight.detach().clone().to(dtype).requires_grad_(grads[1])
    out = fn(h, w, labels, **kw)
    (out.loss * grad_scale).backward()
    res = {"loss": out.loss.detach().float(), "per_sample": out.per_sample_loss.float(), "weights": out.weights.float()}
    if out.z_loss is not None:
        res["z_loss"] = out.z_loss.float()
    if grads[0]:
        res["dh"] = h.grad.float()
    if grads[1]:
        res["dw"] = w.grad.float()
    return res


def assert_close(got, ref32, ref_dtype, dtype, name):
    """NaNs in the same places; element-wise, no worse than the same-dtype reference up to a
    rounding budget (fast mode rounds the *unscaled* gradient, so its rounding errors fall on
    other elements than the reference's); in norm, at most 1.5x the same-dtype reference's error."""
    assert torch.equal(torch.isnan(got), torch.isnan(ref32)), f"{name}: NaN pattern differs"
    keep = ~torch.isnan(ref32)
    got, ref32, ref_dtype = got[keep], ref32[keep], ref_dtype[keep]
    scale = ref32.abs().max() if ref32.numel() else torch.tensor(0.0)
    tol = 1e-5 * (ref32.abs() + scale) + 1e-6 + 12 * EPS[dtype] * (ref32.abs() + 0.05 * scale)
    bound = (ref32 - ref_dtype).abs() + tol
    err = (ref32 - got).abs()
    assert bool((err <= bound).all()), f"{name}: max excess {(err - bound).max().item():.3g} (max err {err.max().item():.3g})"
    norm_bound = 1.5 * (ref32 - ref_dtype).norm() + 1e-5 * ref32.norm() + 1e-6
    assert err.norm() <= norm_bound, f"{name}: error norm {err.norm():.3g} > {norm_bound:.3g}"


def compare(fn, hidden, weight, labels, dtype=torch.float32, **kw):
    hidden = hidden.to(dtype)  # the fp32 reference sees exactly the low-precision inputs
    weight = weight.to(dtype)
    got = run(fn, hidden, weight, labels, dtype, **kw)
    ref32 = run(reference_ce, hidden, weight, labels, torch.float32, **kw)
    ref_dt = ref32 if dtype == torch.float32 else run(reference_ce, hidden, weight, labels, dtype, **kw)
    for key in got:
        assert_close(got[key], ref32[key], ref_dt[key], dtype, key)
    for key in ("loss", "dh", "dw"):
        assert key not in got or torch.isfinite(got[key]).all(), key
    return got


@pytest.mark.parametrize("epilogue,mode", VARIANT_PARAMS)
@pytest.mark.parametrize(
    "shape,chunk,strategy,dtype",
    [
        ((3, 5, 24, 37), 4, "linupper", torch.float32),   # N < V: lean backward walks vocabulary blocks
        ((2, 7, 20, 50), 14, "uniform", torch.float32),   # one chunk holds every token
        ((2, 7, 20, 50), 3, "linear", torch.float32),
        ((3, 6, 17, 33), 5, "quadratic", torch.float32),
        ((4, 9, 40, 30), 7, "extremes", torch.float32),   # N > V: lean backward walks token blocks
        ((3, 5, 24, 37), 4, "linupper", torch.float16),
        ((3, 5, 24, 37), 6, "quadratic", torch.bfloat16),
        ((5, 9, 16, 20), 8, "linupper", torch.bfloat16),  # N > V in bf16
    ],
    ids=lambda p: str(p).replace("torch.", "").replace(" ", ""),
)
def test_matches_reference(epilogue, mode, shape, chunk, strategy, dtype):
    hidden, weight, labels = make_batch(*shape, seed=sum(shape))
    compare(ours(epilogue, mode, chunk), hidden, weight, labels, dtype, strategy=strategy, r=0.4)


@pytest.mark.parametrize("epilogue,mode", VARIANT_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_domain_prior_matches_reference(epilogue, mode, dtype):
    """strategy=domain: the weights are c_d / sum c (per-sample log prior), forward and backward
    like the reference, in every variant; the empty row keeps weight 0."""
    hidden, weight, labels = make_batch(4, 5, 24, 37, seed=3)
    prior = torch.log(torch.tensor([3.0, 1.0, 0.5, 2.0]))
    got = compare(ours(epilogue, mode, 4), hidden, weight, labels, dtype, strategy="domain", r=0.4,
                  sample_log_prior=prior)
    expected = torch.tensor([3.0, 0.0, 0.5, 2.0]) / 5.5  # row 1 has no valid token
    assert torch.allclose(got["weights"], expected, atol=1e-6)


def z_loss_float64(hidden, weight, labels, z_loss, r=0.4, ignore_index=-100):
    """An independent float64 statement of the z-loss objective: weights from the CE alone
    (LinUpper, delta 1), loss = sum_i w_i (CE_i + z_loss * mean_t lse_t^2) over rows."""
    h = hidden.double().requires_grad_(True)
    w = weight.double().requires_grad_(True)
    logits = h.reshape(-1, h.shape[-1]) @ w.t()
    lse = torch.logsumexp(logits, dim=1)
    flat = labels.reshape(-1)
    valid = flat != ignore_index
    tgt = logits.gather(1, flat.clamp(min=0)[:, None]).squeeze(1)
    b, t = labels.shape
    ce_tok = torch.where(valid, lse - tgt, torch.zeros_like(lse)).reshape(b, t)
    z_tok = torch.where(valid, z_loss * lse * lse, torch.zeros_like(lse)).reshape(b, t)
    count = valid.reshape(b, t).sum(1)
    ok = count > 0
    ce = ce_tok.sum(1) / count.clamp(min=1)
    zl = z_tok.sum(1) / count.clamp(min=1)
    x = ce.detach()
    lo, hi = x[ok].min(), x[ok].max()
    xn = 2 * (x - (hi + lo) / 2) / torch.clamp(hi - lo, min=1e-6)
    score = torch.where(ok, torch.clamp(xn + 1, max=1.0) / r, torch.full_like(xn, float("-inf")))
    weights = torch.softmax(score, 0)
    loss = (weights * torch.where(ok, ce + zl, torch.zeros_like(ce))).sum()
    loss.backward()
    return loss.detach(), h.grad, w.grad, torch.where(ok, zl.detach(), torch.full_like(zl, float("nan")))


@pytest.mark.parametrize("impl", [pytest.param(("triton", m), marks=needs_triton, id=f"triton-{m}") for m in ("fast", "lean")]
                         + [pytest.param(("torch", m), id=f"torch-{m}") for m in ("fast", "lean")]
                         + [pytest.param(("reference", None), id="reference")])
def test_z_loss_matches_an_independent_float64_gradient(impl):
    """z_loss * lse^2 per token, weighted like the CE, weights from the CE alone: loss, per-sample
    z-loss, dH and dW of every impl against a float64 autograd statement of the objective."""
    hidden, weight, labels = make_batch(3, 5, 24, 37, seed=11)
    hidden = hidden * 3  # larger logits: the z-loss term matters
    ref_loss, ref_dh, ref_dw, ref_z = z_loss_float64(hidden, weight, labels, 0.05)
    fn = reference_ce if impl[0] == "reference" else ours(*impl)
    got = run(fn, hidden, weight, labels, torch.float32, strategy="linupper", r=0.4, z_loss=0.05)
    torch.testing.assert_close(got["loss"].double(), ref_loss, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(got["z_loss"].double(), ref_z, rtol=2e-5, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(got["dh"].double(), ref_dh, rtol=2e-4, atol=2e-6)
    torch.testing.assert_close(got["dw"].double(), ref_dw, rtol=2e-4, atol=2e-6)
    without = run(fn, hidden, weight, labels, torch.float32, strategy="linupper", r=0.4)
    assert "z_loss" not in without and torch.equal(without["weights"], got["weights"])  # weights from the CE alone
    assert float(got["loss"]) > float(without["loss"])


@pytest.mark.parametrize("epilogue,mode", VARIANT_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_z_loss_matches_reference(epilogue, mode, dtype):
    hidden, weight, labels = make_batch(4, 5, 24, 37, seed=5)
    compare(ours(epilogue, mode, 4), hidden * 2, weight, labels, dtype, strategy="quadratic", r=0.4, z_loss=1e-2)


@pytest.mark.parametrize("impl", [pytest.param(("triton", m), marks=needs_triton, id=f"triton-{m}") for m in ("fast", "lean")]
                         + [pytest.param(("torch", m), id=f"torch-{m}") for m in ("fast", "lean")]
                         + [pytest.param(("reference", None), id="reference")])
@pytest.mark.parametrize("bad", [37, 1000, -5], ids=["V", "far", "negative"])
def test_labels_outside_the_vocabulary_fail(impl, bad):
    """A label outside [0, V) that is not ignore_index fails like F.cross_entropy does, in every
    impl (the fused ones used to mask the target to 0 and train on the LSE)."""
    hidden, weight, labels = make_batch(2, 4, 8, 37, seed=1)
    fn = reference_ce if impl[0] == "reference" else ours(*impl)
    fn(hidden, weight, labels)  # ignore_index (-100) and in-range labels are fine
    labels[0, 2] = bad
    with pytest.raises(RuntimeError, match=r"labels: a label is outside \[0, 37\) and is not ignore_index=-100"):
        fn(hidden, weight, labels)


@pytest.mark.skipif(not torch_core.available(), reason="torch < 2.13 has no F.linear_cross_entropy")
@pytest.mark.parametrize("strategy,prior", [("linupper", None), ("quadratic", None), ("domain", [0.0, 1.0, -0.5, 0.2])])
def test_torch_core_impl_matches_reference(strategy, prior):
    """loss.impl=torch_core: PyTorch's F.linear_cross_entropy + the same reweighting gives the
    reference's loss, per-sample losses, weights, dH and dW (fp32, an empty row, ignored tokens)."""
    hidden, weight, labels = make_batch(4, 6, 24, 37, seed=9)
    kw = {"strategy": strategy, "r": 0.4}
    if prior is not None:
        kw["sample_log_prior"] = torch.tensor(prior)
    compare(torch_core.linear_weighted_ce_torch_core, hidden, weight, labels, torch.float32, **kw)
    name, fn = kernels.get_loss_impl("torch_core", "cpu")
    assert name == "torch_core" and fn is torch_core.linear_weighted_ce_torch_core
    with pytest.raises(ValueError, match="loss.z_loss: not available with loss.impl=torch_core"):
        kernels.get_loss_impl("torch_core", "cpu", z_loss=1e-4)
    labels[0, 0] = 37
    with pytest.raises(RuntimeError, match="labels: a label is outside"):
        torch_core.linear_weighted_ce_torch_core(hidden, weight, labels)


def test_z_loss_coefficient_is_validated():
    hidden, weight, labels = make_batch(2, 3, 8, 11)
    for fn in (reference_ce, ours("torch", "fast")):
        for bad in (-1e-4, float("nan"), float("inf")):
            with pytest.raises(ValueError, match="z_loss: must be a finite number >= 0"):
                fn(hidden, weight, labels, z_loss=bad)


def test_domain_strategy_without_prior_fails_before_compute():
    hidden, weight, labels = make_batch(2, 3, 8, 11)
    for fn in (reference_ce, ours("torch", "fast")):
        with pytest.raises(ValueError, match="domain.*sample_log_prior"):
            fn(hidden, weight, labels, strategy="domain")
        with pytest.raises(ValueError, match=r"sample_log_prior: expected shape \(2,\)"):
            fn(hidden, weight, labels, strategy="domain", sample_log_prior=torch.zeros(3))


@settings(max_examples=6, deadline=None, derandomize=True)
@given(b=st.integers(1, 3), t=st.integers(1, 6), d=st.integers(1, 33), v=st.integers(1, 40),
       chunk=st.integers(1, 9), strategy=st.sampled_from(["uniform", "linear", "linupper", "quadratic", "extremes"]),
       seed=st.integers(0, 2**16))
def test_random_shapes(b, t, d, v, chunk, strategy, seed):
    """Edge shapes (V or D of 1, a single token, chunks that do not divide N) for every variant."""
    hidden, weight, labels = make_batch(b, t, d, v, seed=seed)
    for epilogue, mode in VARIANTS:
        if epilogue == "triton" and not triton_ok:
            continue
        compare(ours(epilogue, mode, chunk), hidden, weight, labels, strategy=strategy, r=0.7)


@pytest.mark.parametrize("epilogue,mode", VARIANT_PARAMS)
def test_packed_segments(epilogue, mode):
    """Samples are (row, segment), not in token order within a row; segment 3 never occurs ->
    empty samples with weight 0."""
    hidden, weight, labels = make_batch(2, 11, 16, 33, seed=3, empty_row=False)
    seg = torch.tensor([[0] * 3 + [1] * 4 + [0] * 2 + [2] * 2, [2] * 5 + [0] * 6])
    got = compare(ours(epilogue, mode), hidden, weight, labels, segment_ids=seg, num_segments=4, strategy="linupper", r=1.0)
    assert got["per_sample"].shape == (8,) and got["weights"].shape == (8,)
    assert torch.isnan(got["per_sample"][[3, 5, 7]]).all() and (got["weights"][[3, 5, 7]] == 0).all()


@pytest.mark.parametrize("epilogue,mode", VARIANT_PARAMS)
def test_upstream_grad_delta_and_default_chunk(epilogue, mode):
    """Upstream gradient != 1, delta != 1, and the automatic chunk size."""
    hidden, weight, labels = make_batch(3, 7, 24, 45, seed=7)
    compare(ours(epilogue, mode, None), hidden, weight, labels, grad_scale=2.5, strategy="extremes", r=1.0, delta=2.0)


@pytest.mark.parametrize("epilogue,mode", VARIANT_PARAMS)
def test_all_tokens_ignored(epilogue, mode):
    hidden, weight, labels = make_batch(2, 4, 16, 20)
    labels[:] = -100
    got = run(ours(epilogue, mode), hidden, weight, labels, torch.float32)
    assert got["loss"].item() == 0.0
    assert torch.isnan(got["per_sample"]).all() and (got["weights"] == 0).all()
    assert (got["dh"] == 0).all() and (got["dw"] == 0).all()


@pytest.mark.parametrize("epilogue,mode", VARIANT_PARAMS)
@pytest.mark.parametrize("grads", [(True, False), (False, True)], ids=["frozen-weight", "frozen-hidden"])
def test_partial_gradients(epilogue, mode, grads):
    """Only one input needs a gradient: the lean backward picks its blocks accordingly, fast mode
    stores only what that gradient needs."""
    hidden, weight, labels = make_batch(4, 9, 16, 30, seed=5)
    compare(ours(epilogue, mode, 5), hidden, weight, labels, grads=grads, strategy="linear")


@pytest.mark.parametrize("epilogue", [pytest.param("triton", marks=needs_triton), "torch"])
def test_deterministic_and_modes_share_the_forward(epilogue):
    """Identical inputs give identical bits; fast and lean differ only in their backward."""
    hidden, weight, labels = make_batch(4, 6, 16, 29, seed=2)
    seg = torch.tensor([[0, 0, 1, 1, 0, 2]] * 4)
    kw = dict(segment_ids=seg, num_segments=3, strategy="linupper", r=0.4)
    outs = {m: [run(ours(epilogue, m, 5), hidden, weight, labels, torch.float32, **kw) for _ in range(2)]
            for m in ("fast", "lean")}
    for first, second in outs.values():
        for key in first:
            assert torch.equal(first[key].nan_to_num(7.0), second[key].nan_to_num(7.0)), key
    for key in ("loss", "per_sample", "weights"):
        assert torch.equal(outs["fast"][0][key].nan_to_num(7.0), outs["lean"][0][key].nan_to_num(7.0)), key


def test_autocast_runs_gemms_in_autocast_dtype():
    """Under CPU autocast (bf16) with fp32 parameters the GEMMs run in bf16, as the reference's
    matmul does, and gradients come back in fp32."""
    hidden, weight, labels = make_batch(2, 6, 16, 24, seed=4)
    results = []
    for fn in (ours("torch", "lean"), ours("torch", "fast"), reference_ce):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(h, w, labels, strategy="linupper")
        out.loss.backward()
        assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
        results.append((out.loss.detach(), h.grad, w.grad))
    for got in results[:2]:
        for g, r in zip(got, results[2]):
            torch.testing.assert_close(g, r, rtol=2e-2, atol=2e-3)


def test_options_are_validated():
    hidden, weight, labels = make_batch(2, 5, 16, 21)
    fn = kernels.fused_linear_weighted_ce
    with pytest.raises(ValueError, match="mode: unknown 'quick'; allowed: auto, fast, lean"):
        fn(hidden, weight, labels, mode="quick")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="chunk_size: must be a positive"):
            fn(hidden, weight, labels, chunk_size=bad)
    with pytest.raises(ValueError, match="epilogue: unknown 'cuda'; allowed: auto, triton, torch"):
        fn(hidden, weight, labels, epilogue="cuda")
    with pytest.raises(ValueError, match="linupper"):
        fn(hidden, weight, labels, strategy="lin-upper")
    with pytest.raises(ValueError, match="weight: expected"):
        fn(hidden, weight[:, :5], labels)
    with pytest.raises(ValueError, match="loss.mode: unknown 'x'"):
        kernels.get_loss_impl("chunked", "cpu", mode="x")
    with pytest.raises(ValueError, match="loss.chunk_size"):
        kernels.get_loss_impl("chunked", "cpu", chunk_size=-1)


def test_chunk_and_mode_selection():
    """Chunk sizes follow V and the device size (never a handful of tokens); auto mode follows
    the stored-gradient budget."""
    assert F.chunk_rows(128256, 2, 80 * 10**9) == 2048  # 512 MiB of bf16 logits at the target V
    assert F.chunk_rows(32000, 2, 80 * 10**9) == 8192  # clamped
    assert F.chunk_rows(10**7, 2, 80 * 10**9) == 256  # huge vocabulary: clamped below
    assert F.chunk_rows(128256, 2, 16 * 10**9) == 896  # small GPU: 1/64 of its memory (250 MB)
    assert F.chunk_rows(4096, 4, None) == 1024 and F.chunk_rows(10**6, 4, None) == 16
    assert F.auto_chunk_size(4096, torch.float32, torch.device("cpu")) == 1024
    # Target shape: G (4.2 GB bf16) + U (0.27 GB fp32)
    assert F.stored_bytes(16384, 128256, 4096, torch.bfloat16, True, True) == 16384 * 128256 * 2 + 16384 * 4096 * 4
    assert F.resolve_mode("auto", 10**6, torch.device("cpu")) == "fast"
    assert F.resolve_mode("auto", 2 * F.CPU_FAST_MAX_BYTES, torch.device("cpu")) == "lean"
    assert F.resolve_mode("lean", 1, torch.device("cpu")) == "lean"
    # Lean backward blocks: equal-width vocabulary blocks (multiples of 128) at the target shape.
    widths = [c.stop - c.start for _, c in F.lean_blocks(16384, 128256, 2048, True, True)]
    assert sum(widths) == 128256 and len(widths) == 8 and all(w % 128 == 0 for w in widths[:-1])
    rows = [r.stop - r.start for r, _ in F.lean_blocks(65536, 32000, 8192, True, True)]
    assert rows == [8192] * 8  # N > V: token blocks, dW accumulated in fp32


def test_aot_check_compiles_the_runtime_specialisation(tmp_path):
    """Every Triton kernel of the default path, specialised as the runtime would (16-byte
    divisibility), compiled for sm_90 in bf16: fits in shared memory, no spills, no full barrier."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_DEFAULT_FP_FUSION="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "megareweight.kernels.aot", "--arch", "90", "--dtype", "bf16", "--out", str(tmp_path)],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    names = {row["kernel"] for row in summary}
    assert {"lse_target", "lse_target_write_grad", "grad", "segment_sum"} <= names
    for row in summary:
        assert (tmp_path / f"{row['kernel']}.ptx").exists()
        assert row["spills"] == 0 and row["shared_bytes"] <= 232448 and row["registers"] > 0
        assert ":D" in row["specialization"]
    # The divisibility attributes reached code generation: 128-bit loads (scalar loads without them).
    for name in ("lse_target", "lse_target_write_grad", "grad"):
        assert "ld.global.v4" in (tmp_path / f"{name}.ptx").read_text(), name


def test_aot_problems_are_reported():
    from megareweight.kernels import aot

    ok = {"kernel": "k", "shared_bytes": 1024, "spills": 0, "full_barriers": []}
    assert aot.problems([ok]) == []
    bad = [{**ok, "shared_bytes": 272 * 1024}, {**ok, "spills": 8}, {**ok, "full_barriers": ["membar.gl"]}]
    messages = aot.problems(bad)
    assert len(messages) == 3
    assert "shared memory > 232448" in messages[0] and "spills 8 B" in messages[1] and "membar.gl" in messages[2]


def test_get_loss_impl():
    name, fn = kernels.get_loss_impl("auto", torch.device("cpu"), mode="lean", chunk_size=0)
    assert name == "chunked" and fn.keywords == {"mode": "lean", "chunk_size": None, "epilogue": "torch", "z_loss": 0.0}
    assert kernels.get_loss_impl("reference", "cpu")[1] is reference_ce
    assert kernels.get_loss_impl("reference", "cpu", z_loss=1e-4)[1].keywords == {"z_loss": 1e-4}
    assert kernels.get_loss_impl("chunked", "cpu", chunk_size=64)[1].keywords["chunk_size"] == 64
    if kernels.triton_available():
        assert kernels.get_loss_impl("auto", torch.device("cuda"))[0] == "fused"
        assert kernels.get_loss_impl("fused", "cpu")[1].keywords["epilogue"] == "triton"
    with pytest.raises(ValueError, match="auto, fused, chunked, reference, torch_core"):
        kernels.get_loss_impl("triton", "cpu")
    assert kernels.LossOutput._fields == ("loss", "per_sample_loss", "weights", "z_loss")


def test_trainer_passes_loss_mode_and_chunk_size(prepared_dir, tmp_path, monkeypatch):
    """``loss.mode``/``loss.chunk_size`` reach the kernel: lean runs its backward with the
    configured chunk, fast never recomputes; both train the same curve up to rounding, with an
    identical first loss (the modes share the forward)."""
    from megareweight.train.loop import train
    from tests.conftest import tiny_config

    chunks = []
    original = F.lean_backward
    monkeypatch.setattr(F, "lean_backward", lambda *a: chunks.append(a[5].chunk) or original(*a))
    curves = {}
    for mode, chunk in (("fast", 0), ("lean", 24)):
        chunks.clear()
        cfg = tiny_config(prepared_dir, train={"max_steps": 4, "eval_interval": 0},
                          reweight={"strategy": "linupper", "r": 0.4}, loss={"impl": "chunked", "mode": mode, "chunk_size": chunk})
        train(cfg, tmp_path / mode, progress=False)
        curves[mode] = [json.loads(line)["loss"] for line in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
        assert chunks == ([24] * 4 if mode == "lean" else [])
    assert curves["fast"][0] == curves["lean"][0]
    assert curves["fast"] == pytest.approx(curves["lean"], rel=1e-4)


def test_import_without_triton(monkeypatch):
    """Importing the kernels must not pull triton in (macOS has none); without it auto -> chunked."""
    code = "import sys, megareweight.kernels.weighted_ce.function; print('triton' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"
    monkeypatch.setattr(impls, "triton_available", lambda: False)
    assert kernels.get_loss_impl("auto", "cuda")[0] == "chunked"
    with pytest.raises(RuntimeError, match="triton"):
        kernels.get_loss_impl("fused", "cuda")


def test_bench_quick_verifies_before_timing(tmp_path, monkeypatch):
    from megareweight.kernels.weighted_ce import bench

    result = bench.main(["--quick", "--shapes", "64x16x96", "--out", str(tmp_path)])
    assert (tmp_path / "bench.json").exists() and (tmp_path / "bench.csv").exists()
    rows = {(r["impl"], r["mode"]): r for r in result["results"]}
    expected = ["eager", "chunked_fast", "chunked_lean"] + (["fused_fast", "fused_lean"] if triton_ok else [])
    for impl in expected:
        row = rows[(impl, "fwd+bwd")]
        assert row["status"] == "ok" and row["err_dw"] <= row["bound_dw"] and row["tflops_8ndv"] > row["tflops_6ndv"]
        assert rows[(impl, "fwd")]["loss"] == pytest.approx(rows[("eager", "fwd")]["loss"], rel=1e-5)
    assert result["meta"]["torch"] == torch.__version__ and "not GPU-relevant" in result["meta"]["note"]

    # A wrong gradient is caught and not timed.
    broken = bench.implementations(True, False)
    monkeypatch.setattr(bench, "implementations", lambda quick, cuda: {
        "eager": broken["eager"], "broken": lambda h, w, y, s, r: broken["chunked_lean"](h, w * 1.01, y, s, r)})
    result = bench.main(["--quick", "--shapes", "64x16x96", "--out", str(tmp_path)])
    assert all(r["status"].startswith("failed: ") and "ms" not in r for r in result["results"] if r["impl"] == "broken")


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
        for epilogue, mode in VARIANTS:
            if epilogue == "triton" and not triton_ok:
                continue
            results[f"{epilogue}-{mode}"] = run(ours(epilogue, mode), hidden[rows], weight, labels[rows], torch.float32,
                                                group=dist.group.WORLD, segment_ids=seg[rows], num_segments=2,
                                                strategy="linupper", r=0.4)
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
    assert len(parts[0]) == (4 if triton_ok else 2)
    for name in parts[0]:
        got = [p[name] for p in parts]
        for g in got:
            torch.testing.assert_close(g["weights"], single["weights"], rtol=1e-5, atol=1e-7, equal_nan=True)
        torch.testing.assert_close(torch.cat([g["per_sample"] for g in got]), single["per_sample"], equal_nan=True)
        # DDP averages parameter grads over ranks; the loss is scaled by world size to undo it.
        torch.testing.assert_close(sum(g["loss"] for g in got) / world, single["loss"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sum(g["dw"] for g in got) / world, single["dw"], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(torch.cat([g["dh"] for g in got]) / world, single["dh"], rtol=1e-4, atol=1e-6)
