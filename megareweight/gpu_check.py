"""One command for a short GPU window: every GPU figure the project lacks, in under 8 minutes.

    launch/gpu_check.sh OUT_DIR [BUNDLE_DIR]     # = python -m megareweight.gpu_check OUT_DIR [BUNDLE_DIR]
    launch/gpu_check.sh --plan                   # the stages and their time budget; no GPU needed

For one H100/H200 set up like an air-gapped cluster node: no package index, a preinstalled CUDA
PyTorch (2.11 with Triton 3.6 and transformers 5.17 were seen), at most 10 minutes per command
and at most 8 flat files brought back. Nothing here replaces the node's torch: the packages it
lacks install offline, without dependencies, from ``BUNDLE_DIR/wheels`` (``make gpu-bundle``,
:mod:`megareweight.gpu_bundle`) into a private directory put on ``PYTHONPATH``; the repository
itself is imported from its checkout. Stages, each timed and bounded:

1. ``env``: GPU, driver, CUDA, Python and package versions; torch >= 2.11 or a clear error.
2. ``install``: the bundle's wheels (``pip install --no-index --no-deps --target``).
3. ``kernels``: ``python -m megareweight.kernels.bench --quick``: N=16384, D=4096, V=128256 bf16,
   inputs built once on the device; ours (fused and chunked, fast and lean), Liger, Cut
   Cross-Entropy, PyTorch's ``F.linear_cross_entropy`` when the torch has it, eager; each
   verified against the reference before it is timed; fwd and fwd+bwd; ms, TFLOP/s on 6NDV and
   8NDV, fraction of peak, peak memory.
4. ``train_125m`` and ``train_1.4b``: ``launch/bench_gpu.sh`` on the bundle's 32k-vocabulary data:
   ZeRO-3, bf16, fused loss, LinUpper from step 1; tokens/s, TFLOP/s, MFU, memory.

Files in OUT_DIR (flat, at most 8): ``gpu_check.json`` (environment, stage times and outcomes, the
training rows), ``kernels_bench.json``, ``kernels_bench.csv``, ``train_bench.json``,
``gpu_check.log`` (everything the stages printed). A stage that fails or runs out of its time is
recorded as such and the next one still runs: a short window must not be lost to one failure.

``GPU_CHECK_SMOKE=1`` runs the stages on a CPU with tiny settings (no wheels needed; the kernel
table without the interpreted Triton and Liger rows; one training stage, a tiny model through
DeepSpeed's CPU accelerator; limits x10 for a shared 2-core machine): the test suite uses it to
check the plumbing and the files; its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
TOTAL_BUDGET_S = 480


@dataclass(frozen=True)
class Stage:
    name: str
    budget_s: int  # hard limit: the stage is stopped when it runs past it
    estimate_s: int  # what it should take on one H100 (the basis is in ``why``)
    why: str


STAGES = (
    Stage("env", 30, 5, "nvidia-smi and imports"),
    Stage("install", 60, 15, "8 wheels, no dependencies, no compile"),
    Stage("kernels", 150, 90, "Triton JIT of 3 kernels (~20 s), 9 implementations x (verify on 8k tokens + 1 warm-up + "
          "3 timed fwd and fwd+bwd, ~0.1-1 s each), eager's fp32 [N, V] logits"),
    Stage("train_125m", 100, 70, "DeepSpeed start + FusedAdam JIT (~30 s), torch.compile of 12 blocks (~20 s), 30 steps"),
    Stage("train_1.4b", 140, 100, "ZeRO-3 init of 1.4 B parameters, torch.compile of 24 blocks (~40 s), 30 steps"),
)


def plan_text() -> str:
    lines = ["gpu_check plan (one H100/H200; estimates, then the hard limit of each stage):"]
    for s in STAGES:
        lines.append(f"  {s.name:11s} ~{s.estimate_s:4d} s   limit {s.budget_s:4d} s   {s.why}")
    est, limit = sum(s.estimate_s for s in STAGES), sum(s.budget_s for s in STAGES)
    lines.append(f"  total       ~{est:4d} s   limit {limit:4d} s   (budget {TOTAL_BUDGET_S} s = 8 min; the machine's "
                 "start, ~1-2 min, comes on top)")
    return "\n".join(lines)


class Log:
    """Everything the stages print, also into OUT/gpu_check.log."""

    def __init__(self, path: Path):
        self.fh = open(path, "a", buffering=1)

    def __call__(self, text: str) -> None:
        print(text, flush=True)
        self.fh.write(text + "\n")


def run_stage(stage: Stage, cmd: list[str], log: Log, env: dict[str, str], limit_scale: float = 1.0) -> dict:
    """Run ``cmd`` with the stage's time limit (times ``limit_scale``); output goes to the log.
    Never raises."""
    log(f"[gpu_check] {stage.name}: {' '.join(cmd)}")
    start = time.time()
    limit = stage.budget_s * limit_scale
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=limit)
        log(proc.stdout.rstrip())
        status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
    except subprocess.TimeoutExpired as exc:
        log((exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or ""))
        status = f"timeout after {limit:.0f} s"
    seconds = round(time.time() - start, 1)
    log(f"[gpu_check] {stage.name}: {status} in {seconds} s")
    return {"status": status, "seconds": seconds}


def environment() -> dict:
    """Versions of what the node brings; a torch older than the project declares is an error
    naming both (the kernels' own import check)."""
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    for name in ("triton", "transformers", "deepspeed", "liger_kernel", "cut_cross_entropy", "numpy"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - absent or broken: recorded as such
            info[name] = None
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        info["nvidia_smi"] = smi.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        info["nvidia_smi"] = None
    try:
        import megareweight.kernels.weighted_ce  # noqa: F401 - raises on a torch below the declared minimum
    except ImportError as exc:
        raise SystemExit(f"gpu_check: error: {exc}") from None
    return info


#: ``launch/bench_gpu.sh`` settings of a CPU smoke run (``GPU_CHECK_SMOKE=1``).
SMOKE_TRAIN_ENV = {"SIZES": "tiny", "DS_ACCELERATOR": "cpu", "NUM_ACCELERATORS": "1", "STEPS": "3", "WARMUP": "1", "SEQ_LEN": "32",
                   "MBS": "2", "COMPILE": "false", "LOSS_IMPL": "chunked", "PRECISION": "fp32",
                   "DS_CONFIG": "ds_configs/zero3_cpu_tiny.json"}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="launch/gpu_check.sh", description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, help="directory for the (at most 8, flat) result files")
    parser.add_argument("bundle", nargs="?", type=Path, default=REPO / ".gpu_bundle",
                        help="the directory `make gpu-bundle` wrote (wheels/, prepared32k/)")
    parser.add_argument("--plan", action="store_true", help="print the stages and their time budget, run nothing")
    args = parser.parse_args(argv)
    if args.plan:
        print(plan_text())
        return 0
    if args.out is None:
        parser.error("OUT_DIR is required (or --plan)")
    smoke = os.environ.get("GPU_CHECK_SMOKE") == "1"
    wheels, prepared = args.bundle / "wheels", args.bundle / "prepared32k"
    if not (prepared / "manifest.json").is_file() or not (smoke or list(wheels.glob("*.whl"))):
        parser.error(f"{args.bundle}: no wheels/*.whl or prepared32k/manifest.json; run `make gpu-bundle` where PyPI "
                     "is reachable and carry the directory")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "gpu_check.log")
    started = time.time()
    report: dict = {"plan": {s.name: s.budget_s for s in STAGES}, "stages": {}, "smoke": smoke}

    report["env"] = environment()
    report["stages"]["env"] = {"status": "ok", "seconds": round(time.time() - started, 1)}
    log(f"[gpu_check] env: {json.dumps(report['env'])}")

    site = Path(os.environ.get("TMPDIR", "/tmp")) / "megareweight_site"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled",
           "TORCH_EXTENSIONS_DIR": str(out.parent / ".gpu_check_torch_extensions"),
           "PYTHONPATH": os.pathsep.join([str(site), str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    stages = {s.name: s for s in STAGES}
    whls = sorted(wheels.glob("*.whl"))
    report["stages"]["install"] = run_stage(
        stages["install"], [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                            "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, whls)],
        log, env) if whls else {"status": "ok", "seconds": 0.0, "note": "no wheels (smoke run)"}
    scale = 10.0 if smoke else 1.0

    kernels_dir = out.parent / ".gpu_check_kernels"
    report["stages"]["kernels"] = run_stage(
        stages["kernels"], [sys.executable, "-m", "megareweight.kernels.bench", "--quick", "--out", str(kernels_dir),
                            *(["--impls", "eager,torch_core,chunked_fast,chunked_lean"] if smoke else [])],
        log, env, scale)
    for name in ("bench.json", "bench.csv"):
        if (kernels_dir / name).is_file():
            shutil.copy(kernels_dir / name, out / f"kernels_{name}")

    results = out.parent / ".gpu_check_train"
    for size in ("125m",) if smoke else ("125m", "1.4b"):
        stage = stages[f"train_{size}"]
        train_env = {**env, "SIZES": size, "STEPS": "30", "WARMUP": "10", "RESULTS_DIR": str(results),
                     "PYTHON": sys.executable, "DEEPSPEED": f"{sys.executable} -m deepspeed.launcher.runner",
                     **(SMOKE_TRAIN_ENV if smoke else {})}
        report["stages"][stage.name] = run_stage(stage, ["bash", str(REPO / "launch" / "bench_gpu.sh"), str(prepared)],
                                                 log, train_env, scale)
    rows = [json.loads(p.read_text()) for p in sorted(results.glob("*/train_bench.json"))]
    if rows:
        (out / "train_bench.json").write_text(json.dumps(rows, indent=2) + "\n")
        report["train"] = rows
    report["total_seconds"] = round(time.time() - started, 1)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"[gpu_check] done in {report['total_seconds']} s: "
        + ", ".join(f"{k} {v['status']}" for k, v in report["stages"].items()))
    return 0 if all(v["status"] == "ok" for v in report["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
